//! [`LiveFiles`]: the dataset's store as DataFusion sees it — only files a reader should read.
//!
//! A ListingTable lists directories, so on its own it would also read files that are not (or no
//! longer) part of the dataset: parts of a run that never published its manifest, staged parts,
//! and the small files a compaction replaced but has not deleted yet. Wrapping the store so that
//! listings only return the live files ([`crate::dataset::live_files`]) makes the switch
//! from old to compacted files atomic for `query`, with DataFusion's listing, partition pruning
//! and schema inference unchanged. Everything except listing is passed through.

use std::{collections::HashSet, fmt, ops::Range, sync::Arc};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, path::Path,
};

/// A store (already rooted at the dataset) whose listings hold only `live` objects, by path
/// relative to the dataset root.
#[derive(Debug)]
pub struct LiveFiles {
    inner: Arc<dyn ObjectStore>,
    live: Arc<HashSet<Path>>,
}

impl LiveFiles {
    /// Wrap `inner` (rooted at the dataset) so that listings return only `live` paths.
    pub fn new(inner: Arc<dyn ObjectStore>, live: HashSet<Path>) -> Self {
        LiveFiles {
            inner,
            live: Arc::new(live),
        }
    }
}

impl fmt::Display for LiveFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LiveFiles({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for LiveFiles {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let live = self.live.clone();
        self.inner
            .list(prefix)
            .try_filter(move |m| futures::future::ready(live.contains(&m.location)))
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let live = self.live.clone();
        self.inner
            .list_with_offset(prefix, offset)
            .try_filter(move |m| futures::future::ready(live.contains(&m.location)))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut r = self.inner.list_with_delimiter(prefix).await?;
        r.objects.retain(|m| self.live.contains(&m.location));
        Ok(r)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
