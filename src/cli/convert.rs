//! `flatfhir convert`: ndjson files into a dataset.

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Result, bail};
use clap::Args;

use flatfhir::{
    dataset::{DatasetLocation, RunManifest},
    run::{
        Progress, StopSignal,
        convert::{ConvertBuilder, ConvertOptions},
        expand_inputs, stop_signal,
    },
    view::ViewRegistry,
};

use super::{
    Outcome,
    args::{MetricsArgs, SchemaArgs, StoreArgs, parse_compression, parse_max_line_bytes},
    check_rejects, output, progress,
};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input ndjson files (.ndjson, .ndjson.gz) or folders searched recursively for them.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output dataset: a folder (created if missing) or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    out: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    schema: SchemaArgs,
    /// Fail (exit code 1) when more than N lines are rejected; the run is still written.
    #[arg(long, value_name = "N")]
    max_rejects: Option<u64>,
    /// Parquet compression: zstd, zstd:LEVEL, snappy or none.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compression: parquet::basic::Compression,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = flatfhir::sink::DEFAULT_ROW_GROUP_ROWS)]
    row_group_size: usize,
    /// Rows per RecordBatch.
    #[arg(long, default_value_t = flatfhir::flatten::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// Longest accepted ndjson line (e.g. 256MiB); a longer one is rejected, without its text.
    /// A line costs a few times its size in memory while it is decoded, per decode thread.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_max_line_bytes)]
    max_line_bytes: usize,
    /// Decode threads [default: number of cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Parquet writer threads, each writing its share of the views [default: a third of the
    /// cores, at least 2]
    #[arg(long)]
    writers: Option<usize>,
    /// Print the run manifest as JSON on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// A validated `convert`: views compiled, inputs found, output resolved.
pub struct ConvertConfig {
    files: Vec<PathBuf>,
    registry: ViewRegistry,
    out: String,
    location: DatasetLocation,
    options: ConvertOptions,
    max_rejects: Option<u64>,
    json: bool,
    metrics: MetricsArgs,
}

impl ConvertArgs {
    /// `--metrics-file` and the dataset it reports on, for a run that fails validation.
    pub fn metrics(&self) -> (MetricsArgs, String) {
        (self.metrics.clone(), self.out.clone())
    }

    /// Check everything that can be checked before the run.
    pub fn validate(self) -> Result<ConvertConfig> {
        let registry = self.schema.registry()?;
        flatfhir::dataset::check_views(&registry)?;
        let files = expand_inputs(&self.inputs)?;
        if files.is_empty() {
            bail!("no input files (looked for *.ndjson, *.ndjson.gz, *.jsonl, *.jsonl.gz)");
        }
        let location = self.store.location(&self.out, true)?;
        let mut options = ConvertOptions {
            batch_size: self.batch_size.max(1),
            compression: self.compression,
            row_group_rows: self.row_group_size.max(1),
            max_line_bytes: self.max_line_bytes,
            ..Default::default()
        };
        if let Some(t) = self.threads {
            options.threads = t.max(1);
        }
        if let Some(w) = self.writers {
            options.writers = w.max(1);
        }
        Ok(ConvertConfig {
            files,
            registry,
            out: self.out,
            location,
            options,
            max_rejects: self.max_rejects,
            json: self.json,
            metrics: self.metrics,
        })
    }
}

pub async fn run(c: ConvertConfig, quiet: bool) -> Result<Outcome> {
    let started = std::time::Instant::now();
    let (metrics, dataset) = (c.metrics.clone(), c.out.clone());
    let result = convert(c, quiet).await;
    metrics.report("convert", &dataset, started, result, Default::default)
}

/// Ctrl-C (or SIGTERM) stops the run the way a failure does: its decoders stop, its uploads are
/// aborted and the files it wrote are removed, so an interrupted convert leaves nothing behind
/// (without this the process died at once and left its parts to `compact --retain`, and on
/// object storage its unfinished multipart uploads to a lifecycle rule). A second signal stops
/// at once.
async fn stopped_by(signal: StopSignal, cancel: &AtomicBool) {
    cancel.store(true, Ordering::Relaxed);
    super::logging::say(
        tracing::Level::WARN,
        &format!(
            "{}: stopping; what this run wrote is removed unless it is committed already \
             (Ctrl-C again stops at once)",
            match signal {
                StopSignal::Interrupt => "interrupted",
                StopSignal::Terminate => "terminated (SIGTERM)",
            }
        ),
    );
    stop_signal().await;
    super::logging::say(
        tracing::Level::ERROR,
        "interrupted twice: stopped without cleaning up (`flatfhir compact --retain` removes what the run left after 24 hours)",
    );
    // 2, as every failed run (the README's exit codes).
    std::process::exit(2);
}

async fn convert(c: ConvertConfig, quiet: bool) -> Result<(Outcome, RunManifest)> {
    let total: u64 = c
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let progress = Arc::new(Progress::default());
    let display =
        progress::ProgressDisplay::start(progress.clone(), total, c.files.len() as u64, quiet);
    tracing::info!(
        files = c.files.len(),
        bytes = total,
        out = c.out,
        "converting"
    );
    let cancel = Arc::new(AtomicBool::new(false));
    // Polled once here, so that the handler is in place before the run starts (a spawned task
    // may first run later), and no signal kills the process half-way.
    let mut first = Box::pin(stop_signal());
    let early = futures::poll!(first.as_mut());
    let ctrl_c = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let signal = match early {
                std::task::Poll::Ready(s) => s,
                std::task::Poll::Pending => first.await,
            };
            stopped_by(signal, &cancel).await
        }
    });
    let run = ConvertBuilder::new(Arc::new(c.registry), c.location)
        .with_files(c.files)
        .with_options(c.options)
        .with_progress(progress)
        .with_cancel(cancel)
        .run()
        .await;
    ctrl_c.abort();
    display.stop();
    let manifest = run?;
    let mut stdout = std::io::stdout().lock();
    if c.json {
        serde_json::to_writer_pretty(&mut stdout, &manifest)?;
        writeln!(stdout)?;
    } else {
        output::write_accounting(&mut stdout, &manifest, &c.out)?;
    }
    Ok((check_rejects(&manifest, c.max_rejects), manifest))
}
