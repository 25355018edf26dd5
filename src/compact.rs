//! `flatfhir compact`: rewrite the many small files of a dataset into fewer large ones,
//! atomically for `query`, so that nightly incremental runs do not slow queries down.
//!
//! An export writes one part per downloaded file and view, so a run of 500 server files leaves
//! 500 small parts in each `<view>/export=<run>/` partition. Compaction rewrites every partition
//! holding at least [`DEFAULT_MIN_FILES`] live files into as few files as the row limit allows,
//! in the same partition (the `export` column and the Hive layout do not change):
//!
//! ```text
//!  live files ──► (view, export) partitions with ≥ min_files ──► DataFusion scan ──► DatasetWriter
//!     ▲                                                  (rows checked) ──► _compactions/<id>.json
//!     └── runs − removed + added                                            (the commit point)
//!                                                       ──► delete the replaced files (best effort)
//! ```
//!
//! Readers switch atomically: `query` reads only live files ([`crate::query::live`]), and the
//! compaction record that swaps old for new is one object, published after every new file is
//! complete and before any old file is deleted. A compaction that stops early leaves new files
//! that no record lists (never read by `query`); replaced files that could not be deleted are
//! deleted by the next compaction. Engines that read the directory tree directly (DuckDB, Spark)
//! see both old and new files between the rename and the deletion — run `compact` when they are
//! not reading. Do not run two compactions of one dataset at once.
//!
//! With `latest_only` every partition of each view that has a `<view>_latest` view is rewritten
//! to hold only the rows of `<view>_latest` (older versions and deleted resources are dropped;
//! history is lost, tombstones are kept).

use std::collections::BTreeMap;

use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::{
    Error, Result,
    dataset::{
        CompactedPartition, CompactionManifest, DatasetLocation, PARTITION_COLUMN, RunIds,
        RunManifest, WrittenFile, live_files,
    },
    query::{Dataset, LATEST_SUFFIX},
    sink::DatasetWriterBuilder,
};

/// Partitions with at least this many live files are rewritten.
pub const DEFAULT_MIN_FILES: usize = 2;

/// Options of a compaction.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Rewrite partitions with at least this many files (default [`DEFAULT_MIN_FILES`]).
    pub min_files: usize,
    /// Only these views (tables); empty means all.
    pub views: Vec<String>,
    /// Keep only the rows of `<view>_latest` (default `false`).
    pub latest_only: bool,
    /// Parquet compression (default zstd).
    pub compression: parquet::basic::Compression,
    /// Rows per output file (default [`crate::sink::DEFAULT_MAX_ROWS_PER_FILE`]).
    pub max_rows_per_file: usize,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            min_files: DEFAULT_MIN_FILES,
            views: Vec::new(),
            latest_only: false,
            compression: parquet::basic::Compression::ZSTD(Default::default()),
            max_rows_per_file: crate::sink::DEFAULT_MAX_ROWS_PER_FILE,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Default)]
pub struct CompactSummary {
    /// The published record (`None` when nothing needed compacting).
    pub manifest: Option<CompactionManifest>,
    /// Live files before.
    pub files_before: usize,
    /// Live files after.
    pub files_after: usize,
    /// Rows in the rewritten partitions, before and after (equal unless `latest_only`).
    pub rows: (u64, u64),
    /// Replaced files that could not be deleted (they are no longer read; retried next time).
    pub not_deleted: usize,
}

/// Compact the dataset at `location`.
pub async fn compact(location: &DatasetLocation, opts: &CompactOptions) -> Result<CompactSummary> {
    let runs = RunManifest::list(location).await?;
    let earlier = CompactionManifest::list(location).await?;
    let live = live_files(&runs, &earlier);
    let mut summary = CompactSummary {
        files_before: live.len(),
        files_after: live.len(),
        ..Default::default()
    };
    // Files an earlier compaction replaced but could not delete.
    for p in earlier.iter().flat_map(|c| &c.partitions) {
        for r in p.removed.iter().filter(|r| !live.contains_key(*r)) {
            match location.store.delete(&location.child(r)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(path = %r, error = %e, "could not delete a replaced file");
                    summary.not_deleted += 1;
                }
            }
        }
    }

    let ds = Dataset::open(location).await?;
    let latest: Vec<&str> = ds
        .latest_views()
        .iter()
        .filter_map(|l| l.strip_suffix(LATEST_SUFFIX))
        .collect();
    let mut partitions: BTreeMap<(String, String), Vec<&WrittenFile>> = BTreeMap::new();
    for f in live.values() {
        if !opts.views.is_empty() && !opts.views.contains(&f.view) {
            continue;
        }
        if let Some(export) = export_of(&f.path) {
            partitions
                .entry((f.view.clone(), export.to_string()))
                .or_default()
                .push(f);
        }
    }
    partitions.retain(|(view, _), files| {
        files.len() >= opts.min_files.max(1) || (opts.latest_only && latest.contains(&&**view))
    });
    if partitions.is_empty() {
        tracing::info!("nothing to compact");
        return Ok(summary);
    }

    let RunIds {
        run_id, started, ..
    } = RunIds::new();
    let id = format!("compact-{run_id}");
    let mut record = CompactionManifest {
        id: id.clone(),
        started,
        latest_only: opts.latest_only,
        ..Default::default()
    };
    let mut written: Vec<WrittenFile> = Vec::new();
    let result: Result<()> = async {
        for ((view, export), files) in &partitions {
            let rows_before: u64 = files.iter().map(|f| f.rows).sum();
            let source = if opts.latest_only && latest.contains(&view.as_str()) {
                format!("{view}{LATEST_SUFFIX}")
            } else {
                view.clone()
            };
            let df = ds
                .context()
                .table(source.as_str())
                .await
                .map_err(crate::query::QueryError::from)?;
            let columns: Vec<String> = df
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|n| n != PARTITION_COLUMN)
                .collect();
            let df = df
                .filter(
                    datafusion::prelude::col(PARTITION_COLUMN)
                        .eq(datafusion::prelude::lit(export.as_str())),
                )
                .and_then(|df| df.select_columns(&columns.iter().map(String::as_str).collect::<Vec<_>>()))
                .map_err(crate::query::QueryError::from)?;
            let mut writer = DatasetWriterBuilder::new(
                location.clone(),
                format!("c{}", RunIds::tag_of(&run_id)),
                export,
            )
                .with_compression(opts.compression)
                .with_max_rows_per_file(opts.max_rows_per_file)
                .build();
            let mut stream = df
                .execute_stream()
                .await
                .map_err(crate::query::QueryError::from)?;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(crate::query::QueryError::from)?;
                writer.write_batch(view, &batch).await?;
            }
            let added = writer.finish().await?;
            written.extend(added.iter().cloned());
            let rows_after: u64 = added.iter().map(|f| f.rows).sum();
            if !opts.latest_only && rows_after != rows_before {
                return Err(Error::Internal(format!(
                    "compacting {view}/{PARTITION_COLUMN}={export}: read {rows_after} rows, the manifests list {rows_before}"
                )));
            }
            summary.rows.0 += rows_before;
            summary.rows.1 += rows_after;
            tracing::info!(view = %view, export = %export, files = files.len(), rows = rows_after, "partition compacted");
            record.partitions.push(CompactedPartition {
                view: view.clone(),
                export: export.clone(),
                removed: files.iter().map(|f| f.path.clone()).collect(),
                added,
            });
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        for f in &written {
            let _ = location.store.delete(&location.child(&f.path)).await;
        }
        return Err(e);
    }
    record.finished = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    record.publish(location).await?;
    for p in &record.partitions {
        for r in &p.removed {
            if let Err(e) = location.store.delete(&location.child(r)).await {
                tracing::warn!(path = %r, error = %e, "could not delete a replaced file; the next compaction retries");
                summary.not_deleted += 1;
            }
        }
    }
    let removed: usize = record.partitions.iter().map(|p| p.removed.len()).sum();
    let added: usize = record.partitions.iter().map(|p| p.added.len()).sum();
    summary.files_after = summary.files_before - removed + added;
    summary.manifest = Some(record);
    Ok(summary)
}

/// The `export` partition value in a file's path.
fn export_of(path: &str) -> Option<&str> {
    path.split('/')
        .find_map(|s| s.strip_prefix(PARTITION_COLUMN)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_of_path() {
        assert_eq!(
            super::export_of("patient/export=20261126T071825Z/part-00000-x.parquet"),
            Some("20261126T071825Z")
        );
        assert_eq!(super::export_of("patient/part.parquet"), None);
    }
}
