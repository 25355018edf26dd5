//! The builder of an export run: options, resume, Ctrl-C, and the job-wide timeout.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use url::Url;

use super::{DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, ExportError, ExportSummary, run_export};
use crate::{
    Result,
    client::{BulkClient, ExportRequest},
    dataset::{DatasetLocation, JobRecord},
    run::{Progress, StopSignal},
    view::ViewRegistry,
};

/// Options of an export run.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Files downloaded in parallel (default [`DEFAULT_CONCURRENCY`]).
    pub concurrency: usize,
    /// Limit for the whole job, downloads included (default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// Rows per batch.
    pub batch_size: usize,
    /// Longest accepted ndjson line (default [`crate::flatten::DEFAULT_MAX_LINE_BYTES`]).
    pub max_line_bytes: usize,
    /// Parquet compression.
    pub compression: parquet::basic::Compression,
    /// Send DELETE to the status URL after success (default true).
    pub delete_after: bool,
    /// Also archive every downloaded file, as received, into this folder (`--keep-ndjson`).
    pub keep_ndjson: Option<PathBuf>,
    /// Rewrite the small parts of many small files into parts of a sensible size before the
    /// run is published ([`super::coalesce`]; default true).
    pub coalesce: bool,
    /// On a Group export with `_since`, fetch the whole history of members that joined since
    /// the earlier runs first ([`super::members`]; default true).
    pub backfill: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            batch_size: crate::flatten::DEFAULT_BATCH_SIZE,
            max_line_bytes: crate::flatten::DEFAULT_MAX_LINE_BYTES,
            compression: parquet::basic::Compression::ZSTD(Default::default()),
            delete_after: true,
            keep_ndjson: None,
            coalesce: true,
            backfill: true,
        }
    }
}

/// What Ctrl-C does to a running export (see [`ExportBuilder::with_ctrl_c`]). Unless
/// [`Ignore`](Self::Ignore), SIGTERM stops the export too, keeping the server's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCtrlC {
    /// Nothing: the caller handles signals (the default for library use).
    Ignore,
    /// Stop, and cancel the server's job with DELETE.
    CancelServerJob,
    /// Stop, and keep the server's job for `--resume`.
    KeepServerJob,
}

/// Configures an export run.
pub struct ExportBuilder {
    pub(super) client: BulkClient,
    pub(super) registry: Arc<ViewRegistry>,
    pub(super) location: DatasetLocation,
    pub(super) request: ExportRequest,
    pub(super) options: ExportOptions,
    pub(super) progress: Arc<Progress>,
    pub(super) resume: Option<JobRecord>,
    pub(super) restart_when_gone: bool,
    pub(super) ctrl_c: OnCtrlC,
    pub(super) snapshot: bool,
}

impl ExportBuilder {
    /// An export from `client`'s server into `location`, decoded with `registry`'s views.
    pub fn new(client: BulkClient, registry: Arc<ViewRegistry>, location: DatasetLocation) -> Self {
        ExportBuilder {
            client,
            registry,
            location,
            request: ExportRequest::default(),
            options: ExportOptions::default(),
            progress: Arc::new(Progress::default()),
            resume: None,
            restart_when_gone: false,
            ctrl_c: OnCtrlC::Ignore,
            snapshot: false,
        }
    }
    /// The kick-off request (`since: "auto"` is resolved against the dataset when the run
    /// starts; default: a system-level export of everything).
    pub fn with_request(mut self, request: ExportRequest) -> Self {
        self.request = request;
        self
    }
    /// Options (default [`ExportOptions::default`]).
    pub fn with_options(mut self, options: ExportOptions) -> Self {
        self.options = options;
        self
    }
    /// Counters to update (default: fresh ones).
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = progress;
        self
    }
    /// Continue this unfinished job instead of starting one (its request wins over
    /// [`with_request`](Self::with_request)); see [`find_unfinished`].
    pub fn with_resume(mut self, job: Option<JobRecord>) -> Self {
        self.resume = job;
        self.restart_when_gone = false;
        self
    }
    /// Continue this unfinished job of the same export (the same command run again, as a
    /// scheduled job does); unlike [`with_resume`](Self::with_resume), when the server no longer
    /// has the job (its status URL answers 404 or 410) it is abandoned and a new export of the
    /// same request started, instead of failing every run from then on.
    pub fn with_continue(mut self, job: Option<JobRecord>) -> Self {
        self.resume = job;
        self.restart_when_gone = true;
        self
    }
    /// A full snapshot (default false): resources of the exported types that earlier runs of
    /// the same export (same server, level and group) brought and this export does not hold are
    /// removed from the current-state tables (the history keeps them). Refused, before any
    /// request, for exports that are not full: `_since` (including `auto` continuing from an
    /// earlier run), `_until`, `_typeFilter` or `patient`.
    pub fn with_snapshot(mut self, snapshot: bool) -> Self {
        self.snapshot = snapshot;
        self
    }
    /// What Ctrl-C does (default [`OnCtrlC::Ignore`]).
    pub fn with_ctrl_c(mut self, on: OnCtrlC) -> Self {
        self.ctrl_c = on;
        self
    }

    /// Run the export; returns the published run record.
    pub async fn run(self) -> Result<ExportSummary> {
        let (client, location, ctrl_c) = (self.client.clone(), self.location.clone(), self.ctrl_c);
        let limit = self.options.timeout;
        let running = Arc::new(Running::default());
        let job = run_export(self, running.clone());
        let timed = async {
            match tokio::time::timeout(limit, job).await {
                Ok(r) => r,
                Err(_) => {
                    let running_then = running.describe();
                    // The run is dropped: let its files' writers abort their uploads.
                    running.writers.idle(WIND_DOWN).await;
                    Err(ExportError::Timeout {
                        limit,
                        running: running_then,
                    }
                    .into())
                }
            }
        };
        if ctrl_c == OnCtrlC::Ignore {
            return timed.await;
        }
        let stop = tokio::select! {
            r = timed => return r,
            s = crate::run::stop_signal() => s,
        };
        // SIGTERM comes from a scheduler stopping the job (a pod evicted, a deploy): the next
        // run continues the export, so the server's job is kept whatever Ctrl-C would do.
        let keep = ctrl_c == OnCtrlC::KeepServerJob || stop == StopSignal::Terminate;
        if stop == StopSignal::Terminate {
            tracing::warn!("terminated (SIGTERM): keeping the server's job for the next run");
        }
        let clean_up = async {
            // The run's futures are dropped; the threads writing its files stop on their own.
            if !running.writers.idle(WIND_DOWN).await {
                tracing::warn!("files were still being written {WIND_DOWN:?} after {stop:?}");
            }
            interrupted(&client, &location, keep).await
        };
        // The clean-up can take a while (waiting for writers, cancelling the server's job over a
        // slow network): a second signal stops at once, as users expect of a command line tool.
        let err = tokio::select! {
            e = clean_up => e,
            _ = crate::run::stop_signal() => ExportError::InterruptedTwice {
                dataset: location.for_humans(),
            },
        };
        Err(err.into())
    }
}

/// How long Ctrl-C waits for the files being written to be let go of before it cleans up.
pub(super) const WIND_DOWN: Duration = Duration::from_secs(30);

/// The newest unfinished job in `location` that `--resume` (no `base_url`) or the same command
/// again (the same server and resolved request) continues.
pub async fn find_unfinished(
    location: &DatasetLocation,
    same_as: Option<(&str, &ExportRequest)>,
) -> Result<Option<JobRecord>> {
    let job = JobRecord::latest_unfinished(location).await?;
    Ok(match same_as {
        None => job,
        Some((base, request)) => job.filter(|j| j.same_export(base, request)),
    })
}

/// After Ctrl-C: cancel the server's job (unless kept) and say whether it can be resumed.
async fn interrupted(client: &BulkClient, location: &DatasetLocation, keep: bool) -> ExportError {
    let dataset = location.for_humans();
    let Ok(Some(mut job)) = JobRecord::latest_unfinished(location).await else {
        return ExportError::Interrupted {
            resumable: false,
            dataset,
        };
    };
    if keep {
        return ExportError::Interrupted {
            resumable: true,
            dataset,
        };
    }
    if let Some(s) = job.status_url.as_deref().and_then(|s| Url::parse(s).ok()) {
        match client.delete(&s).await {
            Ok(()) => {
                if let Err(e) = super::abandon(&mut job, location).await {
                    tracing::warn!(error = %e, "could not remove the cancelled job's files");
                }
                return ExportError::Interrupted {
                    resumable: false,
                    dataset,
                };
            }
            Err(e) => tracing::warn!(error = %e, "cancelling the server job failed"),
        }
    }
    ExportError::Interrupted {
        resumable: true,
        dataset,
    }
}

/// What is running, for the timeout's message, and the files' sink threads, for a clean-up
/// after Ctrl-C to wait for.
#[derive(Debug, Default)]
pub(super) struct Running {
    pub(super) downloading: Mutex<BTreeSet<String>>,
    pub(super) writers: Arc<crate::run::WindDown>,
}

impl Running {
    pub(super) fn describe(&self) -> String {
        let files = self
            .downloading
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if files.is_empty() {
            return "waiting for the server's job (polling its status URL)".into();
        }
        let shown: Vec<&str> = files.iter().take(3).map(String::as_str).collect();
        format!(
            "downloading {} file{}: {}{}",
            files.len(),
            if files.len() == 1 { "" } else { "s" },
            shown.join(", "),
            if files.len() > 3 { ", …" } else { "" }
        )
    }
}
