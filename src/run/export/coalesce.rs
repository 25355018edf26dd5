//! Small parts into parts of a sensible size, before the run is published.
//!
//! An export commits every downloaded file on its own, so each file leaves its own part in each
//! view it fed. Servers that cut exports into thousands of tiny files (Oracle Health/Cerner:
//! 20,000 files for one export is reported) would leave tens of thousands of tiny parts, which
//! every reader then opens. Before the run record is published, the small parts of each view
//! are rewritten into as few parts as the row limit allows: a resource type's parts as soon as
//! the last file declared of that type is committed, while other files still download
//! (`EarlyCoalescing`), the rest once every file is committed ([`coalesce`]). The run record
//! lists the new parts, and the small ones are deleted after it is published. Parts whose row
//! groups are already of a good size (files of thousands of resources) are joined by copying
//! their row groups ([`crate::sink::concat_parts`]); only parts of small files are decoded and
//! re-encoded. Nothing a reader
//! sees changes in between: `query` reads only published runs. A run killed during this step
//! redoes it on `--resume` (the small parts are still there, the new parts get the same names).

use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use std::collections::BTreeMap;

use crate::{
    Result,
    client::ManifestItem,
    dataset::{DatasetError, DatasetLocation, FileKind, FileRecord, FileState, WrittenFile},
    sink::{DEFAULT_MAX_ROWS_PER_FILE, DatasetWriterBuilder, concat_parts, copies_whole},
};

/// Parts smaller than this (16 MiB) are small: rewritten together with the view's other small
/// parts.
pub const SMALL_PART_BYTES: u64 = 16 << 20;
/// A view's small parts are coalesced once it has at least this many.
pub const MIN_SMALL_PARTS: usize = 4;

/// What coalescing did.
#[derive(Debug, Default)]
pub struct Coalesced {
    /// The run's parts after coalescing.
    pub parts: Vec<WrittenFile>,
    /// The small parts they replace, to delete once the run record is published.
    pub replaced: Vec<WrittenFile>,
}

/// Rewrite the small parts of each view of one run (`export`) into new parts tagged `tag`.
pub async fn coalesce(
    location: &DatasetLocation,
    export: &str,
    tag: &str,
    compression: parquet::basic::Compression,
    parts: Vec<WrittenFile>,
) -> Result<Coalesced> {
    let mut by_view: std::collections::BTreeMap<String, Vec<WrittenFile>> = Default::default();
    let mut out = Coalesced::default();
    for p in parts {
        if p.bytes < SMALL_PART_BYTES {
            by_view.entry(p.view.clone()).or_default().push(p);
        } else {
            out.parts.push(p);
        }
    }
    let mut groups = Vec::new();
    for (view, mut small) in by_view {
        if small.len() < MIN_SMALL_PARTS {
            out.parts.extend(small);
        } else {
            small.sort_by(|a, b| a.path.cmp(&b.path)); // the same input order on a retry
            groups.push((view, small));
        }
    }
    if groups.is_empty() {
        return Ok(out);
    }
    // Decoding and encoding Parquet is CPU work: off the I/O runtime, like the driver's sink,
    // and spread over the cores: the views are dealt into COALESCE_BUCKETS buckets of about
    // equal bytes (the same buckets, so the same part names, on a resumed run), rewritten side
    // by side.
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut buckets: Vec<(u64, Vec<ViewParts>)> =
        (0..COALESCE_BUCKETS).map(|_| (0, Vec::new())).collect();
    groups.sort_by_key(|(view, small)| {
        let bytes: u64 = small.iter().map(|p| p.bytes).sum();
        (std::cmp::Reverse(bytes), view.clone())
    });
    for (view, small) in groups {
        let bytes: u64 = small.iter().map(|p| p.bytes).sum();
        let lightest = buckets
            .iter_mut()
            .min_by_key(|(b, _)| *b)
            .expect("COALESCE_BUCKETS > 0");
        lightest.0 += bytes;
        lightest.1.push((view, small));
    }
    let jobs = buckets
        .into_iter()
        .enumerate()
        .filter(|(_, (_, groups))| !groups.is_empty())
        .map(|(k, (_, groups))| {
            // Bucket 0 keeps the tag of a single rewriter (`<tag>-c`).
            let tag = if k == 0 {
                format!("{tag}-c")
            } else {
                format!("{tag}-c{k}")
            };
            rewrite(
                location.clone(),
                export.to_string(),
                tag,
                compression,
                groups,
            )
        });
    use futures::{StreamExt, TryStreamExt};
    let rewritten: Vec<(Vec<WrittenFile>, Vec<WrittenFile>)> = futures::stream::iter(jobs)
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    for (parts, replaced) in rewritten {
        out.parts.extend(parts);
        out.replaced.extend(replaced);
    }
    out.parts.sort_by(|a, b| a.path.cmp(&b.path));
    out.replaced.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// A view and its small parts.
type ViewParts = (String, Vec<WrittenFile>);

/// Coalescing of one resource type's parts as soon as the last file declared of that type is
/// committed, while the other files still download.
///
/// Coalescing every small part once all downloads are done put its whole cost after the last
/// byte arrived: on an export of synthea ×10 at 2 MB/s per file, 0.7 s after 7.1 s of downloads.
/// A type's files usually finish long before the export's last file, and the cores are mostly
/// idle while files arrive at an EHR's pace, so each type's parts are rewritten then (one type
/// at a time). The group is every part of the type's committed files (the run's own tables
/// `_rejects`, `_deleted`, `_outcomes` excepted): the same parts, so the same part names, when a
/// resumed run redoes it. Parts of files without a declared type, and of the run's own tables,
/// are left to the final [`coalesce`].
pub(crate) struct EarlyCoalescing {
    location: DatasetLocation,
    export: String,
    tag: String,
    compression: parquet::basic::Compression,
    /// Output files of each declared type not yet committed, for the types with files left.
    pending: std::collections::HashMap<String, usize>,
    /// One type at a time.
    turn: std::sync::Arc<tokio::sync::Semaphore>,
    tasks: tokio::task::JoinSet<Result<(Vec<WrittenFile>, Coalesced)>>,
}

/// What the early coalescing did: the parts it took, and what they became.
#[derive(Debug, Default)]
pub(crate) struct EarlyCoalesced {
    /// Paths of the parts it handled (not to be coalesced again).
    pub taken: std::collections::HashSet<String>,
    /// Its result, as [`coalesce`] gives it.
    pub coalesced: Coalesced,
}

impl EarlyCoalescing {
    /// For an export whose manifest lists `items` and whose `files` are those committed so far
    /// (on a resumed run). Types already complete start at once.
    pub(crate) fn new<'i>(
        location: &DatasetLocation,
        export: &str,
        tag: &str,
        compression: parquet::basic::Compression,
        items: impl IntoIterator<Item = (FileKind, &'i ManifestItem)>,
        files: &BTreeMap<String, FileRecord>,
    ) -> Self {
        let mut pending = std::collections::HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for (kind, item) in items {
            if let (FileKind::Output, Some(ty)) = (kind, &item.type_)
                && seen.insert(item.url.as_str())
            {
                let left = files
                    .get(&item.url)
                    .is_none_or(|r| r.state != FileState::Committed);
                *pending.entry(ty.clone()).or_insert(0) += usize::from(left);
            }
        }
        let mut early = EarlyCoalescing {
            location: location.clone(),
            export: export.to_string(),
            tag: tag.to_string(),
            compression,
            pending,
            turn: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
            tasks: tokio::task::JoinSet::new(),
        };
        let complete: Vec<String> = early
            .pending
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(t, _)| t.clone())
            .collect();
        for ty in complete {
            early.start(&ty, files);
        }
        early
    }

    /// A file was committed (`files` holds it): start its type's coalescing when it was the
    /// type's last file.
    pub(crate) fn committed(
        &mut self,
        kind: FileKind,
        resource_type: Option<&str>,
        files: &BTreeMap<String, FileRecord>,
    ) {
        let Some(ty) = resource_type.filter(|_| kind == FileKind::Output) else {
            return;
        };
        if let Some(n) = self.pending.get_mut(ty) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.start(ty, files);
            }
        }
    }

    fn start(&mut self, ty: &str, files: &BTreeMap<String, FileRecord>) {
        self.pending.remove(ty);
        let parts: Vec<WrittenFile> = files
            .values()
            .filter(|r| r.kind == FileKind::Output && r.state == FileState::Committed)
            .filter(|r| r.resource_type.as_deref() == Some(ty))
            .flat_map(|r| r.parts.iter().filter(|p| !p.view.starts_with('_')).cloned())
            .collect();
        if parts.is_empty() {
            return;
        }
        let (location, export, compression) =
            (self.location.clone(), self.export.clone(), self.compression);
        // Type names are `[A-Z][A-Za-z0-9]*` (checked when the file was decoded): safe in a name.
        let tag = format!("{}-{}", self.tag, crate::view::snake_case(ty));
        let turn = self.turn.clone();
        let span = tracing::Span::current();
        self.tasks.spawn(tracing::Instrument::instrument(
            async move {
                let _turn = turn.acquire_owned().await;
                let taken = parts.clone();
                let c = coalesce(&location, &export, &tag, compression, parts).await?;
                Ok((taken, c))
            },
            span,
        ));
    }

    /// Wait for the coalescing started so far.
    pub(crate) async fn finish(mut self) -> Result<EarlyCoalesced> {
        let mut out = EarlyCoalesced::default();
        while let Some(joined) = self.tasks.join_next().await {
            let (taken, c) = joined
                .map_err(|e| crate::Error::Internal(format!("a coalescing task failed: {e}")))??;
            out.taken.extend(taken.into_iter().map(|p| p.path));
            out.coalesced.parts.extend(c.parts);
            out.coalesced.replaced.extend(c.replaced);
        }
        Ok(out)
    }
}

/// Buckets the views to coalesce are dealt into (4): at most this many rewriters, each with its
/// own writer, run side by side (as many at once as there are cores).
const COALESCE_BUCKETS: usize = 4;

/// Rewrite each view's small parts of `groups` into new parts tagged `tag` (copied ones
/// `<tag>-v`), on a blocking thread. Returns the view's parts after it (new ones, and a lone
/// part of a kind left as it was) and the small parts the new ones replace.
async fn rewrite(
    location: DatasetLocation,
    export: String,
    tag: String,
    compression: parquet::basic::Compression,
    groups: Vec<ViewParts>,
) -> Result<(Vec<WrittenFile>, Vec<WrittenFile>)> {
    let handle = tokio::runtime::Handle::current();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        let mut parts = Vec::new();
        let mut replaced = Vec::new();
        let mut encode = Vec::new();
        for (view, small) in groups {
            // Parts whose row groups are fine as they are are copied (`sink::concat_parts`),
            // the others re-encoded; a lone part of either kind stays as it is.
            let (whole, mut rest): (Vec<_>, Vec<_>) = small.into_iter().partition(copies_whole);
            if whole.len() >= 2 {
                let before: u64 = whole.iter().map(|p| p.rows).sum();
                let max_rows = DEFAULT_MAX_ROWS_PER_FILE as u64;
                let copy_tag = format!("{tag}-v");
                let new = concat_parts(
                    &handle, &location, &export, &copy_tag, &view, &whole, max_rows,
                )?;
                let rows: u64 = new.iter().map(|p| p.rows).sum();
                if rows != before {
                    return Err(crate::Error::Internal(format!(
                        "coalescing {view}: copied {rows} rows, the parts list {before}"
                    )));
                }
                tracing::debug!(view = %view, parts = whole.len(), rows, "parts concatenated");
                parts.extend(new);
                replaced.extend(whole);
            } else {
                rest.extend(whole);
                rest.sort_by(|a, b| a.path.cmp(&b.path));
            }
            if rest.len() >= 2 {
                encode.push((view, rest));
            } else {
                parts.extend(rest);
            }
        }
        handle.block_on(async move {
            let mut writer = DatasetWriterBuilder::new(location.clone(), tag, export)
                .with_compression(compression)
                .build();
            let joined = async {
                for (view, small) in encode {
                    let before: u64 = small.iter().map(|p| p.rows).sum();
                    let mut rows = 0;
                    for part in &small {
                        let path = location.child(&part.path);
                        let pq = |source| DatasetError::Parquet {
                            path: part.path.clone(),
                            source,
                        };
                        // A small part is read whole (at most SMALL_PART_BYTES at a time).
                        let store_err = |source| DatasetError::Store {
                            path: part.path.clone(),
                            source,
                        };
                        let bytes = location
                            .store
                            .get(&path)
                            .await
                            .map_err(store_err)?
                            .bytes()
                            .await
                            .map_err(store_err)?;
                        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                            .map_err(pq)?
                            .build()
                            .map_err(pq)?;
                        for batch in reader {
                            let batch = batch.map_err(|e| pq(e.into()))?;
                            rows += batch.num_rows() as u64;
                            writer.write_batch(&view, &batch).await?;
                        }
                    }
                    if rows != before {
                        return Err(crate::Error::Internal(format!(
                            "coalescing {view}: read {rows} rows, the parts list {before}"
                        )));
                    }
                    tracing::debug!(view = %view, parts = small.len(), rows, "small parts coalesced");
                    replaced.extend(small);
                }
                Ok::<_, crate::Error>(())
            }
            .await;
            if let Err(e) = joined {
                // Nothing half-uploaded stays behind (see `DatasetWriter::abort`).
                writer.abort().await;
                return Err(e);
            }
            parts.extend(writer.finish().await?);
            Ok::<_, crate::Error>((parts, replaced))
        })
    })
    .await
    .map_err(|e| crate::Error::Internal(format!("the coalescing thread failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::{
        array::{Int64Array, RecordBatch, StringArray},
        datatypes::{DataType, Field, Schema},
    };

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_parts_become_one_and_big_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let loc = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let mut parts = Vec::new();
        for i in 0..10i64 {
            let mut w = DatasetWriterBuilder::new(loc.clone(), format!("f{i}"), "e1").build();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![i, i + 100]))],
            )
            .unwrap();
            w.write_batch("v", &batch).await.unwrap();
            w.write_batch("few", &batch).await.unwrap();
            for p in w.finish().await.unwrap() {
                // Three parts of `few` only: below the threshold, left alone.
                if p.view == "v" || i < 3 {
                    parts.push(p);
                }
            }
        }
        let compression = parquet::basic::Compression::UNCOMPRESSED;
        let c = coalesce(&loc, "e1", "run", compression, parts)
            .await
            .unwrap();
        let views: Vec<(&str, u64)> = c.parts.iter().map(|p| (p.view.as_str(), p.rows)).collect();
        assert_eq!(views, [("few", 2), ("few", 2), ("few", 2), ("v", 20)]);
        assert_eq!(c.replaced.len(), 10);
        assert!(c.parts.iter().any(|p| p.path.ends_with("-run-c.parquet")));
        // Again (a resumed run): the same names.
        let again = coalesce(&loc, "e1", "run", compression, c.replaced.clone())
            .await
            .unwrap();
        assert_eq!(
            again.parts.last().unwrap().path,
            c.parts.last().unwrap().path
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn views_are_rewritten_side_by_side_under_stable_names() {
        let dir = tempfile::tempdir().unwrap();
        let loc = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let views = ["a", "b", "c", "d", "e", "f"];
        let mut parts = Vec::new();
        for i in 0..5i64 {
            let mut w = DatasetWriterBuilder::new(loc.clone(), format!("f{i}"), "e1").build();
            for (k, view) in views.iter().enumerate() {
                // Views of different sizes, so the buckets are dealt by bytes.
                let n: Vec<i64> = (0..(k as i64 + 1) * 50).map(|j| i * 1000 + j).collect();
                let batch =
                    RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(n))])
                        .unwrap();
                w.write_batch(view, &batch).await.unwrap();
            }
            parts.extend(w.finish().await.unwrap());
        }
        let compression = parquet::basic::Compression::UNCOMPRESSED;
        let c = coalesce(&loc, "e1", "run", compression, parts.clone())
            .await
            .unwrap();
        // One part per view, exact rows, written by more than one rewriter.
        let rows: Vec<(&str, u64)> = c.parts.iter().map(|p| (p.view.as_str(), p.rows)).collect();
        let want: Vec<(&str, u64)> = views
            .iter()
            .enumerate()
            .map(|(k, v)| (*v, 5 * 50 * (k as u64 + 1)))
            .collect();
        let mut sorted = rows.clone();
        sorted.sort();
        assert_eq!(sorted, want);
        assert_eq!(c.replaced.len(), parts.len());
        let tags: std::collections::BTreeSet<&str> = c
            .parts
            .iter()
            .filter_map(|p| p.path.rsplit_once("-run-")?.1.strip_suffix(".parquet"))
            .collect();
        assert!(tags.len() > 1, "{tags:?}");
        // Again (a resumed run): the same names.
        let again = coalesce(&loc, "e1", "run", compression, parts)
            .await
            .unwrap();
        let names = |c: &Coalesced| c.parts.iter().map(|p| p.path.clone()).collect::<Vec<_>>();
        assert_eq!(names(&again), names(&c));
    }

    /// Parts of files of ten thousand resources are copied row group by row group (nothing
    /// decoded), tiny ones beside them re-encoded, and every row reads back in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parts_with_big_row_groups_are_copied_not_reencoded() {
        let dir = tempfile::tempdir().unwrap();
        let loc = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
        ]));
        let batch = |from: i64, rows: i64| {
            let n: Vec<i64> = (from..from + rows).collect();
            let s: Vec<Option<String>> = n
                .iter()
                .map(|i| (i % 7 != 0).then(|| format!("value {i}")))
                .collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(n)),
                    Arc::new(StringArray::from(s)),
                ],
            )
            .unwrap()
        };
        let mut parts = Vec::new();
        // Five parts of 10,000 rows in row groups of 4,096, then two of 100 rows.
        for (i, rows) in [10_000, 10_000, 10_000, 10_000, 10_000, 100, 100]
            .into_iter()
            .enumerate()
        {
            let mut w = DatasetWriterBuilder::new(loc.clone(), format!("f{i}"), "e1")
                .with_row_group_rows(4096)
                .build();
            w.write_batch("v", &batch(i as i64 * 100_000, rows))
                .await
                .unwrap();
            parts.extend(w.finish().await.unwrap());
        }
        assert_eq!(parts.iter().filter(|p| copies_whole(p)).count(), 5);
        let compression = parquet::basic::Compression::SNAPPY;
        let c = coalesce(&loc, "e1", "run", compression, parts.clone())
            .await
            .unwrap();
        assert_eq!(c.replaced.len(), 7);
        let names: Vec<&str> = c.parts.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "v/export=e1/part-00000-run-c-v.parquet",
                "v/export=e1/part-00000-run-c.parquet"
            ]
        );
        let read = |p: &WrittenFile| {
            let file = std::fs::File::open(dir.path().join(&p.path)).unwrap();
            let b = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
            let groups: Vec<i64> = b
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_rows())
                .collect();
            let stats = b.metadata().row_group(0).column(0).statistics().cloned();
            let batches: Vec<RecordBatch> = b.build().unwrap().map(Result::unwrap).collect();
            (groups, stats, batches)
        };
        let (groups, stats, batches) = read(&c.parts[0]);
        // The parts' row groups, as they were (3 per part), with their statistics.
        assert_eq!(groups, [4096, 4096, 1808].repeat(5));
        assert!(stats.is_some());
        let copied = datafusion::arrow::compute::concat_batches(&schema, &batches).unwrap();
        let want: Vec<RecordBatch> = (0..5).map(|i| batch(i * 100_000, 10_000)).collect();
        assert_eq!(
            copied,
            datafusion::arrow::compute::concat_batches(&schema, &want).unwrap()
        );
        assert_eq!(c.parts[0].rows, 50_000);
        let stats = c.parts[0].stats.as_deref().unwrap();
        assert!(stats.contains("\"numRecords\":50000"), "{stats}");
        assert!(stats.contains("\"n\":409999"), "{stats}");
        let (_, _, batches) = read(&c.parts[1]);
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!((rows, c.parts[1].rows), (200, 200));
        // Again (a resumed run): the same names, the same bytes.
        let again = coalesce(&loc, "e1", "run", compression, parts)
            .await
            .unwrap();
        let sizes = |c: &Coalesced| {
            c.parts
                .iter()
                .map(|p| (p.path.clone(), p.bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(&again), sizes(&c));
    }
}
