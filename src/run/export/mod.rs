//! `export`: one Bulk Data export run, composed of the client, the [driver](super::Driver) and
//! the dataset protocol.
//!
//! ```text
//!  kick-off ─► poll (Retry-After / backoff; partial manifests start downloads early)
//!     │ job record: Created → KickedOff → Downloading → Complete (dataset::job)
//!     ▼
//!  per manifest file, --concurrency at a time (files.rs): client body stream ─► Driver
//!     ─► staged parts ─► job: file staged ─► rename visible ─► job: file committed
//!     ▼
//!  run record (_runs/<run>.json) ─► job Complete ─► DELETE the server's job
//! ```
//!
//! `output` files are decoded by the views; `deleted` Bundles and `error` OperationOutcomes by
//! flatfhir's own views ([`crate::flatten::bulk_files`]) into `_deleted` and `_outcomes`. A
//! file's rows are committed exactly once: a failed attempt's staged parts are never renamed, a
//! killed run leaves only staged parts no reader lists, and `--resume` rolls a committing file
//! forward and skips committed ones. `--timeout` bounds the whole job, downloads included.

pub mod coalesce;
mod files;
mod since;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use object_store::ObjectStoreExt;
use url::Url;

pub use since::{SINCE_AUTO, resolve_since_auto};

use super::Progress;
use crate::{
    Error, Result,
    client::{BulkClient, ClientError, ExportRequest, Manifest, ManifestItem, PollOutcome},
    dataset::{
        DatasetLocation, FileKind, FileState, InputRecord, JobRecord, RunIds, RunManifest,
        commit_staged,
    },
    flatten::DecodeStats,
    view::ViewRegistry,
};

/// Default files downloaded in parallel.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Default limit for the whole job, downloads included (exports of real EHRs run for hours,
/// sometimes days).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

/// Errors of an export run (beyond those of the client and the dataset, which pass through).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// `--timeout` expired.
    #[error("the export did not finish within {limit:?}; still {running}")]
    Timeout {
        /// The limit.
        limit: Duration,
        /// What was still running (polling, or the files still downloading).
        running: String,
    },
    /// A manifest file failed after its retries.
    #[error("{kind} file {url} failed: {source}")]
    File {
        /// Which manifest list it came from.
        kind: FileKind,
        /// Its URL, redacted.
        url: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// `--resume`: the dataset holds no unfinished job.
    #[error("no unfinished export job in {location}")]
    NothingToResume {
        /// The dataset.
        location: String,
    },
    /// Interrupted (Ctrl-C).
    #[error("interrupted; {}", if *resumable {
        "the server job is kept: continue with `flatfhir export --resume DIR`"
    } else {
        "the export job was cancelled on the server"
    })]
    Interrupted {
        /// Whether the server's job was kept for `--resume`.
        resumable: bool,
    },
}

/// Options of an export run.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Files downloaded in parallel (default [`DEFAULT_CONCURRENCY`]).
    pub concurrency: usize,
    /// Limit for the whole job, downloads included (default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// Rows per batch.
    pub batch_size: usize,
    /// Parquet compression.
    pub compression: parquet::basic::Compression,
    /// Send DELETE to the status URL after success (default true).
    pub delete_after: bool,
    /// Also archive every downloaded file, as received, into this folder (`--keep-ndjson`).
    pub keep_ndjson: Option<PathBuf>,
    /// Rewrite the small parts of many small files into parts of a sensible size before the
    /// run is published ([`coalesce`]; default true).
    pub coalesce: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            batch_size: crate::flatten::DEFAULT_BATCH_SIZE,
            compression: parquet::basic::Compression::ZSTD(Default::default()),
            delete_after: true,
            keep_ndjson: None,
            coalesce: true,
        }
    }
}

/// What an export run produced.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The published run record.
    pub manifest: RunManifest,
    /// Whether the server's error files held fatal or error issues.
    pub server_errors: bool,
}

/// What Ctrl-C does to a running export (see [`ExportBuilder::with_ctrl_c`]).
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
    client: BulkClient,
    registry: Arc<ViewRegistry>,
    location: DatasetLocation,
    request: ExportRequest,
    options: ExportOptions,
    progress: Arc<Progress>,
    resume: Option<JobRecord>,
    ctrl_c: OnCtrlC,
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
            ctrl_c: OnCtrlC::Ignore,
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
                Err(_) => Err(ExportError::Timeout {
                    limit,
                    running: running.describe(),
                }
                .into()),
            }
        };
        if ctrl_c == OnCtrlC::Ignore {
            return timed.await;
        }
        tokio::select! {
            r = timed => r,
            _ = tokio::signal::ctrl_c() => {
                Err(interrupted(&client, &location, ctrl_c == OnCtrlC::KeepServerJob).await.into())
            }
        }
    }
}

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
    let Ok(Some(mut job)) = JobRecord::latest_unfinished(location).await else {
        return ExportError::Interrupted { resumable: false };
    };
    if keep {
        return ExportError::Interrupted { resumable: true };
    }
    if let Some(s) = job.status_url.as_deref().and_then(|s| Url::parse(s).ok()) {
        match client.delete(&s).await {
            Ok(()) => {
                if job.failed().is_ok() {
                    let _ = job.save(location).await;
                }
                return ExportError::Interrupted { resumable: false };
            }
            Err(e) => tracing::warn!(error = %e, "cancelling the server job failed"),
        }
    }
    ExportError::Interrupted { resumable: true }
}

/// What is running, for the timeout's message.
#[derive(Debug, Default)]
struct Running {
    downloading: Mutex<BTreeSet<String>>,
}

impl Running {
    fn describe(&self) -> String {
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

/// What every file task shares.
struct Shared {
    /// The status URL (re-polled for fresh file URLs when one has expired).
    status: Url,
    /// One manifest re-fetch at a time.
    refresh: tokio::sync::Mutex<()>,
    client: BulkClient,
    registry: Arc<ViewRegistry>,
    location: DatasetLocation,
    opts: ExportOptions,
    progress: Arc<Progress>,
    export: String,
    /// The run's tag in part names ([`RunIds::tag`]).
    tag: String,
    running: Arc<Running>,
}

type Tasks = tokio::task::JoinSet<(String, FileKind, Result<crate::dataset::FileRecord>)>;

fn items_of(m: &Manifest) -> Vec<(FileKind, ManifestItem)> {
    let list = |kind: FileKind, items: &[ManifestItem]| {
        items
            .iter()
            .map(move |i| (kind, i.clone()))
            .collect::<Vec<_>>()
    };
    let mut v = list(FileKind::Output, &m.output);
    v.extend(list(FileKind::Deleted, &m.deleted));
    v.extend(list(FileKind::Error, &m.error));
    v
}

fn parse_url(u: &str) -> Result<Url> {
    Url::parse(u).map_err(|e| ClientError::Invalid(format!("{u:?}: {e}")).into())
}

async fn run_export(b: ExportBuilder, running: Arc<Running>) -> Result<ExportSummary> {
    let ExportBuilder {
        client,
        registry,
        location,
        request,
        options: opts,
        progress,
        resume,
        ..
    } = b;
    let mut job = match resume {
        Some(job) => {
            tracing::info!(run = job.run_id, "resuming export job");
            job
        }
        None => {
            let request = resolve_since_auto(&location, client.base().as_str(), request).await?;
            let job = JobRecord::new(RunIds::new(), client.base().as_str(), request);
            job.save(&location).await?;
            job
        }
    };
    let plan = job.resume_plan();
    for url in &plan.roll_forward {
        commit_staged(&location, &job.files[url].parts).await?;
        job.file_committed(url)?;
        job.save_file(&location, url).await?;
    }
    let status = match &plan.status_url {
        Some(s) => parse_url(s)?,
        None => {
            let s = client.kick_off(&job.request).await?;
            tracing::info!(status = %crate::client::error_redact(&s), "export accepted");
            progress.set_state("export accepted");
            job.kicked_off(&s)?;
            job.save(&location).await?;
            s
        }
    };
    if let Some(dir) = &opts.keep_ndjson {
        std::fs::create_dir_all(dir).map_err(|source| crate::flatten::FlattenError::Read {
            file: dir.display().to_string(),
            source,
        })?;
    }
    let shared = Arc::new(Shared {
        status: status.clone(),
        refresh: tokio::sync::Mutex::new(()),
        client: client.clone(),
        registry: registry.clone(),
        location: location.clone(),
        opts: opts.clone(),
        progress: progress.clone(),
        export: job.export.clone(),
        tag: RunIds::tag_of(&job.run_id).to_string(),
        running,
    });
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = Tasks::new();
    let mut seen: HashSet<String> = plan.skip;
    let mut index = job.files.len();
    let mut spawn_items =
        |items: Vec<(FileKind, ManifestItem)>, requires_token: bool, tasks: &mut Tasks| {
            for (kind, item) in items {
                if !seen.insert(item.url.clone()) {
                    continue;
                }
                index += 1;
                let (shared, sem, n) = (shared.clone(), sem.clone(), index);
                tasks.spawn(async move {
                    let _permit = sem.acquire_owned().await;
                    let r = files::process_item(&shared, kind, &item, requires_token, n).await;
                    (item.url, kind, r)
                });
            }
        };

    let pages = poll_until_complete(
        &client,
        &status,
        &progress,
        |m, tasks: &mut Tasks| spawn_items(items_of(m), m.requires_access_token, tasks),
        &mut tasks,
    )
    .await;
    let pages = match pages {
        Ok(p) => p,
        Err(e) => {
            if matches!(e, Error::Client(ClientError::JobFailed(_))) {
                job.failed()?;
                job.save(&location).await?;
            }
            return Err(e);
        }
    };
    let first = &pages[0];
    let requires_token = first.requires_access_token;
    job.manifest_received(&first.transaction_time)?;
    job.save(&location).await?;
    let all_items: Vec<(FileKind, ManifestItem)> = pages.iter().flat_map(items_of).collect();
    tracing::info!(files = all_items.len(), transaction_time = %first.transaction_time, "export complete; downloading");
    progress
        .files_total
        .store(all_items.len() as u64, Ordering::Relaxed);
    progress
        .files
        .store(job.files.len() as u64, Ordering::Relaxed);
    progress.set_state("downloading");
    spawn_items(all_items, requires_token, &mut tasks);

    let mut failure: Option<Error> = None;
    while let Some(joined) = tasks.join_next().await {
        let (url, kind, r) =
            joined.map_err(|e| Error::Internal(format!("a download task failed: {e}")))?;
        match r {
            Ok(rec) => {
                let rows_of = (rec.kind == FileKind::Output).then(|| {
                    let s = &rec.stats;
                    let rows = s.lines.saturating_sub(s.blank_lines + s.rejects());
                    (
                        rec.resource_type.clone().unwrap_or_else(|| "?".into()),
                        rows,
                    )
                });
                let parts = rec.parts.clone();
                job.file_staged(rec)?;
                job.save_file(&location, &url).await?;
                commit_staged(&location, &parts).await?;
                job.file_committed(&url)?;
                job.save_file(&location, &url).await?;
                if let Some((ty, rows)) = rows_of {
                    progress.add_rows(&ty, rows);
                }
            }
            Err(e) => {
                let shown = parse_url(&url)
                    .map(|u| crate::client::error_redact(&u))
                    .unwrap_or(url);
                tracing::error!(%kind, url = %shown, error = %e, "file failed");
                failure.get_or_insert(
                    ExportError::File {
                        kind,
                        url: shown,
                        source: Box::new(e),
                    }
                    .into(),
                );
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }

    // Small parts of many small files into parts of a sensible size, before publishing.
    progress.set_state("coalescing small parts");
    let parts: Vec<_> = job.files.values().flat_map(|r| r.parts.clone()).collect();
    let coalesced = if opts.coalesce {
        coalesce::coalesce(&location, &job.export, &shared.tag, opts.compression, parts).await?
    } else {
        coalesce::Coalesced {
            parts,
            replaced: Vec::new(),
        }
    };
    let (manifest, server_errors) = run_record(&job, &registry, coalesced.parts);
    manifest.publish(&location).await?;
    job.completed()?;
    job.save(&location).await?;
    job.prune_files(&location).await;
    for p in &coalesced.replaced {
        if let Err(e) = location.store.delete(&location.child(&p.path)).await {
            tracing::warn!(path = %p.path, error = %e, "could not delete a coalesced small part (it is not read)");
        }
    }
    if opts.delete_after
        && let Err(e) = client.delete(&status).await
    {
        tracing::warn!(error = %e, "DELETE of the finished job failed (ignored)");
    }
    Ok(ExportSummary {
        manifest,
        server_errors,
    })
}

/// Poll `status` until the job is complete, handing every partial manifest to `partial`;
/// returns the complete manifest's pages.
async fn poll_until_complete(
    client: &BulkClient,
    status: &Url,
    progress: &Progress,
    mut partial: impl FnMut(&Manifest, &mut Tasks),
    tasks: &mut Tasks,
) -> Result<Vec<Manifest>> {
    let mut poll_url = status.clone();
    let mut wait = client.retry().base;
    let mut last_progress = String::new();
    loop {
        match client.poll(&poll_url).await? {
            PollOutcome::InProgress {
                progress: server_progress,
                retry_after,
                partial: page,
            } => {
                if let Some(p) = server_progress.filter(|p| *p != last_progress) {
                    tracing::info!(progress = %p, "export in progress");
                    progress.set_state(format!("server: {p}"));
                    last_progress = p;
                }
                if let Some(m) = page {
                    partial(&m, tasks);
                    if let Some(next) = m.next_page() {
                        poll_url = parse_url(next)?;
                        continue;
                    }
                }
                wait = match retry_after {
                    Some(r) => client.retry().clamp_poll(r),
                    None => client
                        .retry()
                        .next_backoff(wait)
                        .min(client.retry().max_poll_interval),
                };
                tokio::time::sleep(wait).await;
            }
            PollOutcome::Complete(first) => {
                let mut pages = vec![first];
                while let Some(next) = pages.last().and_then(|m| m.next_page()).map(str::to_string)
                {
                    match client.fetch_page(&parse_url(&next)?).await? {
                        PollOutcome::Complete(m) => pages.push(m),
                        PollOutcome::InProgress { retry_after, .. } => {
                            tokio::time::sleep(
                                client.retry().clamp_poll(retry_after.unwrap_or(wait)),
                            )
                            .await;
                        }
                    }
                }
                return Ok(pages);
            }
        }
    }
}

/// The run record of a job whose files are all committed (its parts: `files`), and whether the
/// server reported fatal or error issues.
fn run_record(
    job: &JobRecord,
    registry: &ViewRegistry,
    mut files: Vec<crate::dataset::WrittenFile>,
) -> (RunManifest, bool) {
    let mut stats = DecodeStats::default();
    let mut inputs = Vec::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut deleted = 0;
    let mut warnings = Vec::new();
    for (url, rec) in &job.files {
        debug_assert_eq!(rec.state, FileState::Committed);
        let shown = Url::parse(url)
            .map(|u| crate::client::error_redact(&u))
            .unwrap_or_else(|_| url.clone());
        match rec.kind {
            FileKind::Output => {
                stats.merge(&rec.stats);
                let lines = rec.stats.lines - rec.stats.blank_lines;
                if let Some(c) = rec.count.filter(|c| *c != lines) {
                    let w = format!("{shown}: manifest count {c} but {lines} lines read");
                    tracing::warn!("{w}");
                    warnings.push(w);
                }
                inputs.push(InputRecord {
                    source: shown,
                    bytes: rec.stats.bytes,
                    lines: rec.stats.lines,
                    rejects: rec.stats.rejects(),
                });
            }
            FileKind::Deleted => {
                deleted += rec
                    .stats
                    .view_rows
                    .get(crate::dataset::DELETED_TABLE)
                    .copied()
                    .unwrap_or(0);
            }
            FileKind::Error => {
                for (k, v) in &rec.outcomes {
                    *outcomes.entry(k.clone()).or_default() += v;
                }
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let server_errors = outcomes.get("fatal").is_some_and(|n| *n > 0)
        || outcomes.get("error").is_some_and(|n| *n > 0);
    let ids = RunIds {
        run_id: job.run_id.clone(),
        export: job.export.clone(),
        started: job.started.clone(),
    };
    let manifest = RunManifest {
        source: Some(job.base_url.clone()),
        transaction_time: job.transaction_time.clone(),
        outcomes,
        deleted,
        warnings,
        request: Some(job.request.clone()),
        ..RunManifest::finished("export", ids, stats, inputs, files)
    }
    .with_view_keys(registry);
    (manifest, server_errors)
}
