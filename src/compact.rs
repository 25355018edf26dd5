//! `flatfhir compact`: Delta OPTIMIZE (small files into large ones, one commit per table), then,
//! when asked, VACUUM (delete the files no version within the retention needs).
//!
//! An export writes one part per downloaded file and view, and every current-state merge
//! rewrites some files, so nightly runs leave many small files behind. OPTIMIZE bin-packs the
//! files of each partition (one run's partition of a history table; the whole of a current
//! table) into files of about [`CompactOptions::target_size`] and commits the swap in one
//! commit: every reader — flatfhir, Spark, DuckDB — sees either the old files or the new ones,
//! never both, and a reader holding the previous version keeps reading it. A run that merges
//! into a current table while it is compacted makes OPTIMIZE's commit conflict (it would bring
//! back rows the merge removed): the table is compacted again from the merged version, up to
//! [`MAX_COMMIT_ATTEMPTS`] times.
//!
//! Replaced files stay on disk (time travel to earlier versions reads them) until a VACUUM with
//! a retention (`--retain 7d`) deletes the files removed longer ago than that. A reader of a
//! version committed within the retention still finds every file it needs, and so does a reader
//! of the version just before this compaction, whatever the retention (even `--retain 0s`).
//!
//! The same VACUUM also removes what runs that died (killed, out of memory, a lost machine)
//! left behind: parts under a run's `export=` partition of a table that no commit names, which
//! Delta's own VACUUM leaves alone (delta-rs's default mode only deletes files a commit
//! removed). A run counts as dead when it published no run record, is no unfinished export job
//! (`--resume` may still finish those) or run interrupted while it published (the next run
//! finishes those), and started longer ago than both the retention and
//! [`DEAD_RUN_AGE`], so that a run still writing is never swept from under its writer — nor is a
//! run that old whose uncommitted files include one written since then (a convert of many
//! terabytes still at work: converts hold no lease).

use std::{collections::HashSet, num::NonZeroU64, time::Duration};

use object_store::path::Path;

use crate::{
    Result,
    dataset::{
        DatasetError, DatasetLocation,
        delta::{MAX_COMMIT_ATTEMPTS, is_conflict},
    },
};

/// How long ago a run that never committed must have started before VACUUM removes its parts
/// (24 h), whatever the retention: a shorter retention must not delete a run still at work.
pub const DEAD_RUN_AGE: Duration = Duration::from_secs(24 * 3600);

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
    /// The parts of dead runs VACUUM removed (see the [module docs](self)).
    pub dead_runs: DeadRuns,
}

/// What the sweep of dead runs removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeadRuns {
    /// Their run ids.
    pub runs: Vec<String>,
    /// Objects deleted.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
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
    'tables: for name in names
        .iter()
        .filter(|n| opts.views.is_empty() || opts.views.contains(n))
    {
        let err = |source| DatasetError::Delta {
            table: name.clone(),
            source: Box::new(source),
        };
        let mut attempt = 0;
        let (before, table, metrics) = loop {
            attempt += 1;
            let Some(table) = location.open_table(name).await? else {
                continue 'tables;
            };
            let before = table.version().unwrap_or_default();
            let optimized = table
                .optimize()
                .with_target_size(target)
                .with_writer_properties(props.clone())
                .await;
            match optimized {
                Ok((table, metrics)) => break (before, table, metrics),
                Err(e) if is_conflict(&e) && attempt < MAX_COMMIT_ATTEMPTS => {
                    tracing::info!(
                        table = %name,
                        attempt,
                        error = %e,
                        "the table changed while it was compacted (a run merged into it); compacting it again"
                    );
                }
                Err(e) => return Err(err(e).into()),
            }
        };
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
    if let Some(retain) = opts.retain {
        summary.dead_runs =
            sweep_dead_runs(location, &opts.views, retain.max(DEAD_RUN_AGE)).await?;
    }
    Ok(summary)
}

/// Delete the partitions of runs that died before committing to a table (see the
/// [module docs](self)), in `views` (empty: every table), for runs started more than `age` ago.
async fn sweep_dead_runs(
    location: &DatasetLocation,
    views: &[String],
    age: Duration,
) -> Result<DeadRuns> {
    use futures::TryStreamExt;
    let cutoff =
        chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
    let store_err = |path: &Path, source| DatasetError::Store {
        path: path.to_string(),
        source,
    };
    let runs_dir = location.child(crate::dataset::RUNS_DIR);
    let published: HashSet<String> = location
        .store
        .list(Some(&runs_dir))
        .map_ok(|o| {
            o.location
                .filename()
                .unwrap_or_default()
                .trim_end_matches(".json")
                .to_string()
        })
        .try_collect()
        .await
        .map_err(|e| store_err(&runs_dir, e))?;
    let mut resumable: HashSet<String> = crate::dataset::JobRecord::list(location)
        .await?
        .into_iter()
        .filter(|j| !j.state.is_finished())
        .map(|j| j.export)
        .collect();
    // Runs interrupted while they published: the next run finishes them, with their files.
    let publishing: Vec<crate::dataset::RunManifest> = location
        .list_json_shallow(crate::dataset::PUBLISHING_DIR)
        .await?;
    resumable.extend(publishing.into_iter().map(|r| r.export));
    let top = location
        .store
        .list_with_delimiter(Some(&location.prefix))
        .await
        .map_err(|e| store_err(&location.prefix, e))?;
    let mut dead = DeadRuns::default();
    let mut runs = std::collections::BTreeSet::new();
    // Partitions that may be swept, by run: the newest file of them all, and their tables.
    type Candidates =
        std::collections::BTreeMap<String, (Option<chrono::DateTime<chrono::Utc>>, Vec<String>)>;
    let mut candidates = Candidates::new();
    for dir in &top.common_prefixes {
        let Some(table) = dir.filename() else {
            continue;
        };
        // Current-state tables are skipped: their merges write files into the partitions of
        // earlier runs (a row keeps its run's partition), so a partition there says nothing
        // about a run being alive.
        if [
            crate::dataset::RUNS_DIR,
            crate::dataset::JOBS_DIR,
            crate::dataset::PUBLISHING_DIR,
        ]
        .contains(&table)
            || table.starts_with('.')
            || table.ends_with(crate::dataset::current::LATEST_SUFFIX)
            || !(views.is_empty() || views.iter().any(|v| v == table))
        {
            continue;
        }
        let partitions = location
            .store
            .list_with_delimiter(Some(dir))
            .await
            .map_err(|e| store_err(dir, e))?;
        let mut opened = None;
        for p in &partitions.common_prefixes {
            let Some(run) = p
                .filename()
                .and_then(|f| f.strip_prefix(&format!("{}=", crate::dataset::PARTITION_COLUMN)))
            else {
                continue;
            };
            if published.contains(run)
                || resumable.contains(run)
                || run_started(run).is_none_or(|t| t >= cutoff)
            {
                continue;
            }
            if opened.is_none() {
                let t = location.open_table(table).await?;
                let live = match &t {
                    Some(t) => crate::dataset::current::live_partitions(t, table)?,
                    None => HashSet::new(),
                };
                opened = Some((t, live));
            }
            // A partition with a file some version reads, or of a run the table committed, is
            // never swept, whatever the records say.
            if let Some((t, live)) = &opened
                && (live.contains(run)
                    || match t {
                        Some(t) => crate::dataset::delta::holds_run(t, run)
                            .await
                            .unwrap_or(true),
                        None => false,
                    })
            {
                continue;
            }
            // The newest file of the partition: a run that wrote one since the cutoff is alive.
            let newest = location
                .store
                .list(Some(p))
                .try_fold(
                    None,
                    |n: Option<chrono::DateTime<chrono::Utc>>, o| async move {
                        Ok(n.max(Some(o.last_modified)))
                    },
                )
                .await
                .map_err(|e| store_err(p, e))?;
            let newest_of_run = candidates
                .entry(run.to_string())
                .or_insert((None, Vec::new()));
            newest_of_run.0 = newest_of_run.0.max(newest);
            newest_of_run.1.push(table.to_string());
        }
    }
    for (run, (newest, tables)) in candidates {
        if newest.is_some_and(|t| t >= cutoff) {
            tracing::info!(
                %run,
                "kept the uncommitted parts of an old run that wrote a file since the cutoff (still at work?)"
            );
            continue;
        }
        for table in tables {
            let (files, bytes) =
                crate::dataset::staging::delete_partition(location, &table, &run).await;
            tracing::info!(
                table,
                run,
                files,
                bytes,
                "removed the parts of a run that never committed"
            );
            dead.files += files;
            dead.bytes += bytes;
        }
        runs.insert(run);
    }
    dead.runs = runs.into_iter().collect();
    Ok(dead)
}

/// The start of a run from its id (`20261204T173000.123Z-…`); `None` for anything else, which
/// is then never swept.
fn run_started(run: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let (stamp, _) = run.split_once('-')?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ")
        .ok()
        .map(|t| t.and_utc())
}
