//! `convert`: ndjson files → a published run. A composition of the [driver](super::Driver):
//!
//! ```text
//!  files ─► plan (split big files into line-aligned ranges) ─► Driver (N decode threads)
//!        ─► DatasetWriter ─► parts ─► run record (_runs/<run>.json), published last
//! ```
//!
//! A run that fails deletes the parts it wrote, so it leaves nothing behind for any reader. A
//! stop (the cancel flag) is honoured up to the commit, not only while decoding: a run stopped
//! while its last row groups are flushed fails as cancelled too.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tracing::Instrument;

use super::{DEFAULT_SPLIT_BYTES, DriverBuilder, Progress, input::plan_files};
use crate::{
    Error, Result,
    dataset::{DatasetLocation, RunIds, RunManifest, discard_run},
    sink::{
        DEFAULT_MAX_ROWS_PER_FILE, DEFAULT_ROW_GROUP_ROWS, DatasetWriterBuilder, ShardedWriter,
    },
    view::ViewRegistry,
};

/// Options of a `convert` run.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Rows per batch (default [`crate::flatten::DEFAULT_BATCH_SIZE`]).
    pub batch_size: usize,
    /// Decode threads (default: available cores).
    pub threads: usize,
    /// Parquet writer threads (default [`default_writers`]: a third of the cores, at least two).
    pub writers: usize,
    /// Parquet compression (default zstd level 1).
    pub compression: parquet::basic::Compression,
    /// Rows per row group (default [`DEFAULT_ROW_GROUP_ROWS`]).
    pub row_group_rows: usize,
    /// Rows per file (default [`DEFAULT_MAX_ROWS_PER_FILE`]).
    pub max_rows_per_file: usize,
    /// Longest accepted ndjson line; a longer one is rejected without being read into memory
    /// (default [`crate::flatten::DEFAULT_MAX_LINE_BYTES`]).
    pub max_line_bytes: usize,
    /// Split uncompressed files larger than this into byte ranges decoded in parallel (default
    /// [`DEFAULT_SPLIT_BYTES`]; `0` disables splitting).
    pub split_bytes: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            batch_size: crate::flatten::DEFAULT_BATCH_SIZE,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            writers: default_writers(),
            compression: parquet::basic::Compression::ZSTD(Default::default()),
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            max_rows_per_file: DEFAULT_MAX_ROWS_PER_FILE,
            split_bytes: DEFAULT_SPLIT_BYTES,
            max_line_bytes: crate::flatten::DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// Finish the parts of a decoded run and publish it, unless a stop (Ctrl-C, SIGTERM, the
/// caller's cancel flag) came meanwhile. The driver honours a stop only while it decodes; one
/// that comes later, while the last row groups are flushed, used to be ignored: the run was
/// committed and exited 0 after the CLI had said it was removing what the run wrote. Until the
/// commit, a stop fails the run as cancelled and the caller removes its parts; after the
/// commit nothing can be taken back, and the run is kept (with a warning that says so).
async fn publish(
    decoded: super::Decoded<ShardedWriter>,
    ids: RunIds,
    registry: &ViewRegistry,
    location: &DatasetLocation,
    cancel: &AtomicBool,
    started: std::time::Instant,
) -> Result<RunManifest> {
    let stopped = || cancel.load(Ordering::Relaxed);
    let mut sink = decoded.sink;
    if stopped() {
        sink.abort().await;
        return Err(Error::Cancelled);
    }
    // Flushing the last row groups of big views can take seconds.
    let files = sink.finish().await?;
    if stopped() {
        return Err(Error::Cancelled);
    }
    let decode = started.elapsed().as_secs_f64();
    let mut manifest = RunManifest::finished("convert", ids, decoded.stats, decoded.inputs, files)
        .with_view_keys(registry);
    manifest.metrics.phases.decode = decode;
    manifest.publish(location).await?;
    if stopped() {
        tracing::warn!(
            run = %manifest.run_id,
            "the stop came after the run was committed: the run is kept"
        );
    }
    Ok(manifest)
}

/// Parquet writer threads by default: a third of the cores (rounded up), since encoding and
/// compressing is about a third of a run's CPU, and at least two (two on up to 6 cores, three on
/// 7 to 9). With one writer the decoders of a 2-core machine waited on it now and then (both
/// blocked on a full queue while it ran alone); two writer threads beside two decoders keep both
/// cores busier (synthea ×10, release, four alternating rounds: 2.14–2.34 s against 2.33–2.54 s;
/// ×100 17.5–17.7 s against 18.7–19.7 s, one outlier of 24 s), for the same memory (the
/// writers split the one budget).
pub fn default_writers() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    cores.div_ceil(3).max(2)
}

/// Configures a `convert` run.
///
/// ```no_run
/// # async fn f() -> flatfhir::Result<()> {
/// use std::sync::Arc;
/// use flatfhir::{dataset::DatasetLocation, run::convert::ConvertBuilder, view::ViewRegistry};
/// let registry = Arc::new(ViewRegistry::builtin()?);
/// let out = DatasetLocation::resolve("warehouse", true)?;
/// let run = ConvertBuilder::new(registry, out)
///     .with_files(vec!["export/Patient.ndjson".into()])
///     .run()
///     .await?;
/// println!("{} lines rejected", run.rejects);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConvertBuilder {
    registry: Arc<ViewRegistry>,
    location: DatasetLocation,
    files: Vec<PathBuf>,
    options: ConvertOptions,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
}

impl ConvertBuilder {
    /// A run of `registry`'s views into `location`.
    pub fn new(registry: Arc<ViewRegistry>, location: DatasetLocation) -> Self {
        ConvertBuilder {
            registry,
            location,
            files: Vec::new(),
            options: ConvertOptions::default(),
            progress: Arc::new(Progress::default()),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
    /// The ndjson files to read (see [`super::expand_inputs`] for folders).
    pub fn with_files(mut self, files: Vec<PathBuf>) -> Self {
        self.files = files;
        self
    }
    /// Options (default [`ConvertOptions::default`]).
    pub fn with_options(mut self, options: ConvertOptions) -> Self {
        self.options = options;
        self
    }
    /// Counters to update (default: fresh ones).
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = progress;
        self
    }
    /// A flag that stops the run when set.
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Self {
        self.cancel = cancel;
        self
    }

    /// Convert, publish the run record, and return it.
    pub async fn run(self) -> Result<RunManifest> {
        let ConvertBuilder {
            registry,
            location,
            files,
            options: opts,
            progress,
            cancel,
        } = self;
        crate::dataset::check_layout(&location).await?;
        let ids = RunIds::new();
        // Planning reads big files once (to count lines before each range): off the runtime.
        let (split, threads) = (opts.split_bytes, opts.threads.max(1));
        let inputs = tokio::task::spawn_blocking(move || plan_files(files, split, threads))
            .await
            .map_err(|e| Error::Internal(format!("the planning thread failed: {e}")))??;
        let writer = DatasetWriterBuilder::new(location.clone(), ids.tag(), &ids.export)
            .with_compression(opts.compression)
            .with_row_group_rows(opts.row_group_rows)
            .with_max_rows_per_file(opts.max_rows_per_file);
        let writer = ShardedWriter::new(writer, opts.writers);
        let driver = DriverBuilder::new(registry.clone())
            .with_threads(opts.threads)
            .with_batch_size(opts.batch_size)
            .with_max_line_bytes(opts.max_line_bytes)
            .with_progress(progress)
            .with_cancel(cancel.clone())
            .build();
        let export = ids.export.clone();
        // Every event of the run, on every thread it spawns, carries the run id.
        let span = tracing::info_span!("run", run_id = %ids.run_id);
        let published = async {
            let t = std::time::Instant::now();
            let decoded = driver.run(inputs, writer).await?;
            publish(decoded, ids, &registry, &location, &cancel, t).await
        }
        .instrument(span)
        .await;
        match published {
            Ok(manifest) => Ok(manifest),
            Err(source) => {
                // Nothing of the failed run stays behind, and the message says what it wrote.
                let discarded = discard_run(&location, &export).await;
                Err(Error::RunFailed {
                    run: export,
                    output: location.url.to_string(),
                    parts: discarded.objects,
                    bytes: discarded.bytes,
                    committed: discarded.committed,
                    source: Box::new(source),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Input;

    /// A stop that comes after the last line was decoded, but before the commit, fails the run
    /// as cancelled and publishes nothing (regression: hunt finding 12: such a run was
    /// committed and exited 0).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_after_decoding_publishes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("p.ndjson");
        std::fs::write(&input, "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n").unwrap();
        let location =
            DatasetLocation::resolve(tmp.path().join("ds").to_str().unwrap(), true).unwrap();
        let registry = Arc::new(ViewRegistry::builtin().unwrap());
        let ids = RunIds::new();
        let writer = ShardedWriter::new(
            DatasetWriterBuilder::new(location.clone(), ids.tag(), &ids.export),
            2,
        );
        let cancel = Arc::new(AtomicBool::new(false));
        let driver = DriverBuilder::new(registry.clone())
            .with_cancel(cancel.clone())
            .build();
        let decoded = driver.run(vec![Input::file(&input)], writer).await.unwrap();
        assert_eq!(decoded.stats.lines, 1);
        // The signal arrives now: decoding is done, nothing is committed yet.
        cancel.store(true, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let err = publish(decoded, ids, &registry, &location, &cancel, t)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
        assert!(RunManifest::list(&location).await.unwrap().is_empty());
    }
}
