//! `flatfhir compact`: Delta OPTIMIZE (small files into large ones, one commit per table), then,
//! when asked, VACUUM (delete the files no version within the retention needs).
//!
//! An export writes one part per downloaded file and view, and every current-state merge
//! rewrites some files, so nightly runs leave many small files behind. OPTIMIZE bin-packs the
//! files of each partition (one run's partition of a history table; the whole of a current
//! table) into files of about [`CompactOptions::target_size`] and commits the swap in one
//! commit: every reader — flatfhir, Spark, DuckDB — sees either the old files or the new ones,
//! never both, and a reader holding the previous version keeps reading it.
//!
//! Replaced files stay on disk (time travel to earlier versions reads them) until a VACUUM with
//! a retention (`--retain 7d`) deletes the files removed longer ago than that. A reader of a
//! version committed within the retention still finds every file it needs, and so does a reader
//! of the version just before this compaction, whatever the retention (even `--retain 0s`).

use std::{num::NonZeroU64, time::Duration};

use crate::{
    Result,
    dataset::{DatasetError, DatasetLocation},
};

/// Target size of the files OPTIMIZE writes (256 MiB).
pub const DEFAULT_TARGET_SIZE: u64 = 256 << 20;

/// Options of a compaction.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Only these tables; empty means all.
    pub views: Vec<String>,
    /// Target size of the files written (default [`DEFAULT_TARGET_SIZE`]).
    pub target_size: u64,
    /// Delete the files removed longer ago than this (VACUUM); `None` deletes nothing.
    pub retain: Option<Duration>,
    /// Parquet compression (default zstd).
    pub compression: parquet::basic::Compression,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            views: Vec::new(),
            target_size: DEFAULT_TARGET_SIZE,
            retain: None,
            compression: parquet::basic::Compression::ZSTD(Default::default()),
        }
    }
}

/// What a compaction did to one table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableCompaction {
    /// Table name.
    pub table: String,
    /// The version OPTIMIZE committed (`None` when nothing needed compacting).
    pub version: Option<u64>,
    /// Files replaced.
    pub files_removed: u64,
    /// Files that replace them.
    pub files_added: u64,
    /// Files VACUUM deleted.
    pub files_deleted: usize,
}

/// What a compaction did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompactSummary {
    /// Per table.
    pub tables: Vec<TableCompaction>,
}

/// Compact the dataset at `location`.
pub async fn compact(location: &DatasetLocation, opts: &CompactOptions) -> Result<CompactSummary> {
    crate::dataset::check_layout(location).await?;
    let names = location.delta_tables().await?;
    for v in &opts.views {
        if !names.contains(v) {
            return Err(DatasetError::Location {
                location: location.url.to_string(),
                message: format!("no table {v:?} (tables: {})", names.join(", ")),
            }
            .into());
        }
    }
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(opts.compression)
        .set_created_by(format!("flatfhir {}", env!("CARGO_PKG_VERSION")))
        .build();
    let target = NonZeroU64::new(opts.target_size.max(1 << 20)).expect("non-zero");
    let mut summary = CompactSummary::default();
    for name in names
        .iter()
        .filter(|n| opts.views.is_empty() || opts.views.contains(n))
    {
        let err = |source| DatasetError::Delta {
            table: name.clone(),
            source: Box::new(source),
        };
        let Some(table) = location.open_table(name).await? else {
            continue;
        };
        let before = table.version().unwrap_or_default();
        let (table, metrics) = table
            .optimize()
            .with_target_size(target)
            .with_writer_properties(props.clone())
            .await
            .map_err(err)?;
        let after = table.version().unwrap_or_default();
        let mut done = TableCompaction {
            table: name.clone(),
            version: (after != before).then_some(after),
            files_removed: metrics.num_files_removed,
            files_added: metrics.num_files_added,
            files_deleted: 0,
        };
        if let Some(retain) = opts.retain {
            let retention = chrono::Duration::from_std(retain).unwrap_or(chrono::Duration::MAX);
            // The files of the version before this compaction stay, whatever the retention:
            // a reader that opened it just before keeps reading.
            let keep = [before];
            let (_, vacuum) = table
                .vacuum()
                .with_retention_period(retention)
                .with_keep_versions(&keep)
                .with_enforce_retention_duration(false)
                .await
                .map_err(err)?;
            done.files_deleted = vacuum.files_deleted.len();
        }
        summary.tables.push(done);
    }
    Ok(summary)
}
