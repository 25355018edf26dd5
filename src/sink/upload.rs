//! [`Upload`]: one object written piece by piece, that can be aborted without leaving anything.
//!
//! object_store's `BufWriter` and `WriteMultipart` do what this does, except on abort: they
//! cancel the in-flight part requests on the client and send AbortMultipartUpload at once. A
//! part the server is still receiving then lands *after* the abort, and stays in the store as an
//! orphaned piece of an upload that no longer exists (S3 says as much: an abort may have to be
//! repeated once in-flight parts finish; s3s-fs keeps it as a `.upload_id-…part-N` file). Here an
//! abort first waits for the parts in flight to end, then aborts, so nothing arrives after it.
//!
//! Small objects (below one part) are written with a single PUT, as `BufWriter` does; larger
//! ones go multipart, in parts of exactly one part size (some stores want equal parts).

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::{
    MultipartUpload, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutPayloadMut,
    path::Path as StorePath,
};
use parquet::{arrow::async_writer::AsyncFileWriter, errors::ParquetError};
use tokio::task::JoinSet;

use crate::dataset::DatasetLocation;

/// Part size on a cloud store (5 MiB, the smallest part S3 accepts; object_store's default is
/// 10 MiB). An open file buffers up to one part, and with one open file per view that bounds
/// what the writer holds.
const PART_BYTES: usize = 5 << 20;
/// The same for local and in-memory stores, whose parts may be of any size.
const LOCAL_PART_BYTES: usize = 1 << 20;
/// Parts of one upload in flight at once (object_store's default).
const PARTS_IN_FLIGHT: usize = 8;
/// How long an abort waits for the parts in flight to end (10 s) before it cancels them and
/// aborts anyway: a part retried against a failing store could otherwise hold it for minutes,
/// and the dataset writer's own time limit (30 s) would then drop the abort unsent.
const PARTS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where an [`Upload`] stands.
enum State {
    /// Gathering the first part; nothing has reached the store.
    Buffering,
    /// A multipart upload has begun: parts go out as they fill up.
    Multipart {
        upload: Box<dyn MultipartUpload>,
        parts: JoinSet<object_store::Result<()>>,
    },
    /// Completing has begun (the single PUT or the completion request): it can no longer be
    /// aborted, and a failed completion has already aborted itself.
    Closed,
}

/// The upload of one object to a dataset's store (see the module docs).
pub(crate) struct Upload {
    store: Arc<dyn ObjectStore>,
    /// The object, for the store.
    location: StorePath,
    /// The object relative to the dataset, for log lines.
    path: String,
    part_bytes: usize,
    buffer: PutPayloadMut,
    state: State,
}

impl Upload {
    /// An upload of the object at `path` (relative to the dataset root), in parts of the size
    /// the store wants.
    pub(crate) fn new(location: &DatasetLocation, path: &str) -> Upload {
        let part_bytes = match location.url.scheme() {
            "file" | "memory" => LOCAL_PART_BYTES,
            _ => PART_BYTES,
        };
        Upload {
            store: location.store.clone(),
            location: location.child(path),
            path: path.to_string(),
            part_bytes,
            buffer: PutPayloadMut::new(),
            state: State::Buffering,
        }
    }

    /// Append `bytes`; a part that fills up is sent (waiting while [`PARTS_IN_FLIGHT`] are).
    pub(crate) async fn write(&mut self, mut bytes: &[u8]) -> object_store::Result<()> {
        while !bytes.is_empty() {
            let room = self.part_bytes - self.buffer.content_length();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.buffer.extend_from_slice(now);
            bytes = rest;
            if self.buffer.content_length() == self.part_bytes {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// Send the buffer as the next part, starting the multipart upload if need be.
    async fn send_part(&mut self) -> object_store::Result<()> {
        if matches!(self.state, State::Buffering) {
            let upload = self
                .store
                .put_multipart_opts(&self.location, PutMultipartOptions::default())
                .await?;
            self.state = State::Multipart {
                upload,
                parts: JoinSet::new(),
            };
        }
        let State::Multipart { upload, parts } = &mut self.state else {
            return Err(closed());
        };
        while parts.len() >= PARTS_IN_FLIGHT {
            if let Some(done) = parts.join_next().await {
                done??;
            }
        }
        let part = std::mem::take(&mut self.buffer).freeze();
        parts.spawn(upload.put_part(part));
        Ok(())
    }

    /// Write what is buffered and complete the object. A multipart upload whose parts or
    /// completion fail is aborted before the error is returned.
    pub(crate) async fn finish(&mut self) -> object_store::Result<()> {
        if matches!(self.state, State::Closed) {
            return Err(closed());
        }
        if matches!(self.state, State::Buffering) {
            self.state = State::Closed;
            let payload = std::mem::take(&mut self.buffer).freeze();
            self.store.put(&self.location, payload).await?;
            return Ok(());
        }
        if !self.buffer.is_empty()
            && let Err(e) = self.send_part().await
        {
            self.abort().await;
            return Err(e);
        }
        let State::Multipart { upload, parts } = &mut self.state else {
            return Err(closed());
        };
        while let Some(done) = parts.join_next().await {
            if let Err(e) = done.map_err(object_store::Error::from).and_then(|r| r) {
                self.abort().await;
                return Err(e);
            }
        }
        let result = upload.complete().await;
        if result.is_err() {
            self.abort().await;
        }
        self.state = State::Closed;
        result.map(|_| ())
    }

    /// Abort the upload unless it is closed: wait for the parts in flight to end (whatever their
    /// outcome, for at most [`PARTS_WAIT`]), then abort, so no part reaches the store after the
    /// abort. A failure to abort is
    /// logged, not returned: the run has already failed, and its error is the one to report.
    pub(crate) async fn abort(&mut self) {
        let State::Multipart { upload, parts } = &mut self.state else {
            self.state = State::Closed;
            return;
        };
        let drained = async { while parts.join_next().await.is_some() {} };
        if tokio::time::timeout(PARTS_WAIT, drained).await.is_err() {
            // A store that keeps failing retries each part for minutes: abort anyway.
            parts.shutdown().await;
        }
        let aborted = upload.abort().await;
        self.state = State::Closed;
        if let Err(error) = aborted {
            let path = &self.path;
            tracing::warn!(%path, %error, "could not abort an unfinished upload; an object store lifecycle rule for incomplete multipart uploads removes it");
        }
    }
}

/// The error of writing to or finishing an upload that is already closed (a bug of its caller).
fn closed() -> object_store::Error {
    object_store::Error::Generic {
        store: "flatfhir",
        source: "the upload is already completed or aborted".into(),
    }
}

/// Parquet's async writer writes through an [`Upload`]. Each flushed buffer (a row group) is
/// copied into the upload's part buffer rather than kept whole: kept, a row group's buffer stays
/// alive until its last piece is uploaded, and synthea ×10's peak RSS grew from ~208 to ~240 MB.
impl AsyncFileWriter for Upload {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            Upload::write(self, &bs)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            self.finish()
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (tempfile::TempDir, DatasetLocation) {
        let dir = tempfile::tempdir().unwrap();
        let loc = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        (dir, loc)
    }

    #[tokio::test]
    async fn small_and_multipart_objects_arrive_whole() {
        let (_dir, loc) = local();
        for (name, len) in [
            ("small", 1000),
            ("exact", LOCAL_PART_BYTES),
            ("big", 3 * LOCAL_PART_BYTES + 17),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut up = Upload::new(&loc, name);
            for piece in data.chunks(300_001) {
                up.write(piece).await.unwrap();
            }
            up.finish().await.unwrap();
            let got = loc
                .store
                .get(&loc.child(name))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(got.as_ref(), &data[..], "{name}");
        }
    }

    /// A store whose part uploads take a while on the "server": a part whose request the
    /// client stops waiting for still lands, as on S3. It logs parts landing and aborts.
    #[derive(Debug)]
    struct SlowParts {
        inner: object_store::memory::InMemory,
        log: Arc<std::sync::Mutex<Vec<&'static str>>>,
        part_takes: std::time::Duration,
    }

    impl std::fmt::Display for SlowParts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("SlowParts")
        }
    }

    #[derive(Debug)]
    struct SlowUpload {
        inner: Box<dyn MultipartUpload>,
        log: Arc<std::sync::Mutex<Vec<&'static str>>>,
        part_takes: std::time::Duration,
    }

    #[async_trait::async_trait]
    impl MultipartUpload for SlowUpload {
        fn put_part(&mut self, data: object_store::PutPayload) -> object_store::UploadPart {
            let part = self.inner.put_part(data);
            let (log, takes) = (self.log.clone(), self.part_takes);
            let server = tokio::spawn(async move {
                tokio::time::sleep(takes).await;
                let r = part.await;
                log.lock().unwrap().push("part");
                r
            });
            Box::pin(async move { server.await? })
        }
        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            self.inner.complete().await
        }
        async fn abort(&mut self) -> object_store::Result<()> {
            self.log.lock().unwrap().push("abort");
            self.inner.abort().await
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for SlowParts {
        async fn put_opts(
            &self,
            location: &StorePath,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &StorePath,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            let inner = self.inner.put_multipart_opts(location, opts).await?;
            let (log, part_takes) = (self.log.clone(), self.part_takes);
            Ok(Box::new(SlowUpload {
                inner,
                log,
                part_takes,
            }))
        }
        async fn get_opts(
            &self,
            location: &StorePath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<StorePath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<StorePath>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&StorePath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&StorePath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &StorePath,
            to: &StorePath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// The race that left `.upload_id-….part-N` files in s3s-fs: an abort sent while parts
    /// are in flight is overtaken by them. Here every part lands before the abort is sent.
    /// An upload to a [`SlowParts`] store whose parts take `part_takes`, with three parts in
    /// flight, and the store's log.
    #[allow(clippy::type_complexity)]
    async fn three_parts_in_flight(
        part_takes: std::time::Duration,
    ) -> (Upload, Arc<std::sync::Mutex<Vec<&'static str>>>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = SlowParts {
            inner: object_store::memory::InMemory::new(),
            log: log.clone(),
            part_takes,
        };
        let loc = DatasetLocation {
            store: Arc::new(store),
            prefix: StorePath::from("ds"),
            url: "s3://bucket/ds/".parse().unwrap(),
        };
        let mut up = Upload::new(&loc, "part.parquet");
        up.write(&vec![1u8; 3 * PART_BYTES + 1]).await.unwrap();
        (up, log)
    }

    #[tokio::test]
    async fn an_abort_waits_for_the_parts_in_flight() {
        let (mut up, log) = three_parts_in_flight(std::time::Duration::from_millis(100)).await;
        up.abort().await;
        // Whatever was still on its way has had the time to arrive.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(*log.lock().unwrap(), ["part", "part", "part", "abort"]);
    }

    /// Parts that never end (a store failing every retry) hold the abort for [`PARTS_WAIT`]
    /// only: then it is sent anyway.
    #[tokio::test]
    async fn an_abort_waits_for_hung_parts_only_so_long() {
        let (mut up, log) = three_parts_in_flight(std::time::Duration::from_secs(3600)).await;
        let aborted = tokio::time::timeout(PARTS_WAIT * 3, up.abort()).await;
        assert!(aborted.is_ok(), "the abort waited for parts that never end");
        assert_eq!(*log.lock().unwrap(), ["abort"]);
    }

    #[tokio::test]
    async fn an_aborted_upload_leaves_nothing() {
        let (dir, loc) = local();
        let mut up = Upload::new(&loc, "gone");
        up.write(&vec![7u8; 2 * LOCAL_PART_BYTES + 5])
            .await
            .unwrap();
        up.abort().await;
        // Aborting twice, or after closing, does nothing.
        up.abort().await;
        assert!(loc.store.head(&loc.child("gone")).await.is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
