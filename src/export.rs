//! Wires one Bulk Data export run: kick-off → poll → parallel downloads, each streamed through
//! its own decoder into staged Parquet parts → per-file commit → run manifest → DELETE.
//!
//! ```text
//!  BulkClient::kick_off ─► poll (Retry-After / backoff) ─► manifest pages
//!        │ job record (_jobs/<run>.json): status URL, then every file's state
//!        ▼
//!  per file (Semaphore, --concurrency):  HTTP body chunks ─► mpsc(bounded) ─► decode thread
//!        (spawn_blocking: gunzip + Decoder) ─► mpsc(bounded) ─► DatasetWriter (staged parts)
//!        ▼
//!  commit: job record marks the file "committing" with its parts ─► rename parts visible ─►
//!          "committed"
//! ```
//!
//! A file's rows are committed exactly once: an attempt that fails part-way discards its staged
//! parts (a cut identity-encoded download resumes with `Range` into the same decoder instead), a
//! killed run leaves only staged parts that no reader lists, and `--resume` rolls a
//! "committing" file forward and skips committed ones.

use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use url::Url;

use crate::{
    Error, Result,
    client::{BulkClient, ClientError, ExportRequest, Manifest, ManifestItem, PollOutcome},
    flatten::{DecodeStats, DecoderBuilder, FlattenError, Reject, ViewBatch},
    pipeline::{Progress, new_run_ids},
    sink::{
        DatasetLocation, DatasetWriter, DatasetWriterBuilder, REJECTS_TABLE, RunManifest,
        SinkError, WrittenFile, commit_staged, discard_staged, manifest::InputRecord,
        rejects_batch,
    },
    view::ViewRegistry,
};

/// Directory of job records.
pub const JOBS_DIR: &str = "_jobs";
/// Table of deleted resources announced by servers.
pub const DELETED_TABLE: &str = "_deleted";
/// Table of OperationOutcome issues from the servers' error files.
pub const OUTCOMES_TABLE: &str = "_outcomes";
/// Default files downloaded in parallel.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Default limit for the whole job (exports of real EHRs run for hours, sometimes days).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);
/// `--since auto`: continue from the last published run of the same export (see
/// [`resolve_since_auto`]).
pub const SINCE_AUTO: &str = "auto";
/// Largest error/deleted file read into memory.
const MAX_SMALL_FILE: usize = 256 << 20;

/// Options of an export run.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Files downloaded in parallel (default [`DEFAULT_CONCURRENCY`]).
    pub concurrency: usize,
    /// Limit for the whole job (default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// Rows per batch.
    pub batch_size: usize,
    /// Parquet compression.
    pub compression: parquet::basic::Compression,
    /// Send DELETE to the status URL after success (default true).
    pub delete_after: bool,
    /// Also archive every downloaded file, as received, into this folder (`--keep-ndjson`).
    pub keep_ndjson: Option<std::path::PathBuf>,
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
        }
    }
}

/// State of one downloaded file in the job record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Parts are complete and being renamed visible (rolled forward on resume).
    Committing,
    /// Done; skipped on resume.
    Committed,
}

/// One file of the job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    /// `output`, `deleted` or `error`.
    pub kind: String,
    /// Declared resource type.
    pub resource_type: Option<String>,
    /// Commit state.
    pub state: FileState,
    /// Parts written for it.
    pub parts: Vec<WrittenFile>,
    /// What was read.
    pub stats: DecodeStats,
    /// Declared `count`.
    pub count: Option<u64>,
    /// Deleted entries or outcome issues by severity (for deleted / error files).
    #[serde(default)]
    pub extra: BTreeMap<String, u64>,
    /// The URL the file was finally read from, when its manifest URL had expired (`404`/`410`)
    /// and a re-fetched manifest gave a new one. A resumed run skips both URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_url: Option<String>,
}

/// The persistent record of an export job (`_jobs/<run id>.json`), written as the job advances.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Run id (also the job id).
    pub run_id: String,
    /// `export=` partition value.
    pub export: String,
    /// Start time.
    pub started: String,
    /// FHIR base URL.
    pub base_url: String,
    /// The kick-off request.
    pub request: ExportRequest,
    /// Status URL from `Content-Location`.
    pub status_url: Option<String>,
    /// `transactionTime` of the manifest.
    pub transaction_time: Option<String>,
    /// `kicked-off`, `complete` or `failed`.
    pub state: String,
    /// Files by URL.
    pub files: BTreeMap<String, FileRecord>,
}

impl JobRecord {
    fn path(run_id: &str) -> String {
        format!("{JOBS_DIR}/{run_id}.json")
    }

    /// Save atomically.
    pub async fn save(&self, loc: &DatasetLocation) -> Result<(), SinkError> {
        loc.put_json(&Self::path(&self.run_id), self).await
    }

    /// The newest unfinished job of a dataset, if any.
    pub async fn latest_unfinished(loc: &DatasetLocation) -> Result<Option<JobRecord>, SinkError> {
        let mut jobs: Vec<JobRecord> = loc.list_json(JOBS_DIR).await?;
        jobs.retain(|j| j.state != "complete" && j.state != "failed");
        jobs.sort_by(|a, b| a.started.cmp(&b.started));
        Ok(jobs.pop())
    }
}

/// What an export run produced.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The published run manifest.
    pub manifest: RunManifest,
    /// Whether the server's error files held fatal or error issues.
    pub server_errors: bool,
}

/// Replace `since: "auto"` ([`SINCE_AUTO`]) by the `transactionTime` of the newest published
/// export run in `location` from the same server (`base_url`) with the same level, group, `_type`
/// set, `_typeFilter` set and `patient` set; with no such run `since` is cleared and the export is
/// a full one. Any other request is returned unchanged.
pub async fn resolve_since_auto(
    location: &DatasetLocation,
    base_url: &str,
    mut request: ExportRequest,
) -> Result<ExportRequest, SinkError> {
    if request.since.as_deref() != Some(SINCE_AUTO) {
        return Ok(request);
    }
    let runs = RunManifest::list(location).await?;
    let base = base_url.trim_end_matches('/');
    let newest = runs
        .iter()
        .filter(|r| r.kind == "export")
        .filter(|r| r.source.as_deref().map(|s| s.trim_end_matches('/')) == Some(base))
        .filter(|r| {
            r.request
                .as_ref()
                .is_some_and(|q| same_population(q, &request))
        })
        .filter_map(|r| {
            let t = r.transaction_time.as_deref()?;
            Some((chrono::DateTime::parse_from_rfc3339(t).ok()?, t))
        })
        .max_by_key(|(at, _)| *at);
    match newest {
        Some((_, t)) => {
            tracing::info!(
                since = t,
                "--since auto: continuing from the last run's transactionTime"
            );
            request.since = Some(t.to_string());
        }
        None => {
            tracing::info!(
                "--since auto: no earlier run of this export in the dataset; full export"
            );
            request.since = None;
        }
    }
    Ok(request)
}

/// New run ids whose `export` value no earlier run or job of the dataset has: the value orders
/// runs (`<view>_latest`, tombstones), so two runs started within one second must not share it.
async fn fresh_run_ids(location: &DatasetLocation) -> Result<(String, String, String), SinkError> {
    let mut taken: HashSet<String> = RunManifest::list(location)
        .await?
        .into_iter()
        .map(|r| r.export)
        .collect();
    let jobs: Vec<JobRecord> = location.list_json(JOBS_DIR).await?;
    taken.extend(jobs.into_iter().map(|j| j.export));
    loop {
        let ids = new_run_ids();
        if !taken.contains(&ids.1) {
            return Ok(ids);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Same server-side population: level (and group), `_type`, `_typeFilter` and `patient`, as sets.
fn same_population(a: &ExportRequest, b: &ExportRequest) -> bool {
    fn set(v: &[String]) -> std::collections::BTreeSet<&str> {
        v.iter().map(String::as_str).collect()
    }
    a.level() == b.level()
        && set(&a.types) == set(&b.types)
        && set(&a.type_filters) == set(&b.type_filters)
        && set(&a.patients) == set(&b.patients)
}

/// Run an export (or resume `resume`) into `location`. A request with `since: "auto"` is
/// resolved first ([`resolve_since_auto`]).
pub async fn run_export(
    client: BulkClient,
    request: ExportRequest,
    registry: Arc<ViewRegistry>,
    location: DatasetLocation,
    opts: ExportOptions,
    progress: Arc<Progress>,
    resume: Option<JobRecord>,
) -> Result<ExportSummary> {
    let started_at = Instant::now();
    let request = resolve_since_auto(&location, client.base().as_str(), request).await?;
    let mut job = match resume {
        Some(job) => {
            tracing::info!(run = job.run_id, "resuming export job");
            job
        }
        None => {
            let (run_id, export, started) = fresh_run_ids(&location).await?;
            JobRecord {
                run_id,
                export,
                started,
                base_url: client.base().to_string(),
                request: request.clone(),
                status_url: None,
                transaction_time: None,
                state: "kicked-off".into(),
                files: BTreeMap::new(),
            }
        }
    };
    let status = match &job.status_url {
        Some(s) => {
            Url::parse(s).map_err(|e| ClientError::Invalid(format!("saved status URL: {e}")))?
        }
        None => {
            let s = client.kick_off(&job.request).await?;
            tracing::info!(status = %crate::client::error_redact(&s), "export accepted");
            progress.set_state("export accepted");
            job.status_url = Some(s.to_string());
            job.save(&location).await?;
            s
        }
    };

    // Roll forward files that were committing when a previous run stopped.
    for rec in job
        .files
        .values_mut()
        .filter(|r| r.state == FileState::Committing)
    {
        commit_staged(&location, &rec.parts).await?;
        rec.state = FileState::Committed;
    }

    if let Some(dir) = &opts.keep_ndjson {
        std::fs::create_dir_all(dir).map_err(|source| FlattenError::Read {
            file: dir.display().to_string(),
            source,
        })?;
    }
    let shared = Arc::new(Shared {
        status: status.clone(),
        refresh: tokio::sync::Mutex::new(()),
        transaction_time: std::sync::OnceLock::new(),
        client: client.clone(),
        registry,
        location: location.clone(),
        opts: opts.clone(),
        progress,
        export: job.export.clone(),
        run_id: job.run_id.clone(),
    });
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = Tasks::new();
    let mut seen: HashSet<String> = job.files.keys().cloned().collect();
    seen.extend(job.files.values().filter_map(|r| r.refreshed_url.clone()));
    let mut index = job.files.len();
    let spawn_items = |items: Vec<(String, ManifestItem)>,
                       requires_token: bool,
                       tasks: &mut Tasks,
                       seen: &mut HashSet<String>,
                       index: &mut usize| {
        for (kind, item) in items {
            if !seen.insert(item.url.clone()) {
                continue;
            }
            *index += 1;
            let (shared, sem, n) = (shared.clone(), sem.clone(), *index);
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let r = process_item(&shared, &kind, &item, requires_token, n).await;
                (item, kind, r)
            });
        }
    };

    // Poll until complete, starting downloads of partial manifests as they appear.
    let mut poll_url = status.clone();
    let mut wait = client.retry().base;
    let mut last_progress = String::new();
    let manifest_pages: Vec<Manifest> = loop {
        if started_at.elapsed() > opts.timeout {
            return Err(ClientError::Timeout(opts.timeout).into());
        }
        match client.poll(&poll_url).await? {
            PollOutcome::InProgress {
                progress,
                retry_after,
                partial,
            } => {
                if let Some(p) = progress.filter(|p| *p != last_progress) {
                    tracing::info!(progress = %p, "export in progress");
                    shared.progress.set_state(format!("server: {p}"));
                    last_progress = p;
                }
                if let Some(m) = partial {
                    spawn_items(
                        items_of(&m),
                        m.requires_access_token,
                        &mut tasks,
                        &mut seen,
                        &mut index,
                    );
                    if let Some(next) = m.next_page() {
                        poll_url =
                            Url::parse(next).map_err(|e| ClientError::Invalid(e.to_string()))?;
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
                    let url = Url::parse(&next).map_err(|e| ClientError::Invalid(e.to_string()))?;
                    match client.fetch_page(&url).await? {
                        PollOutcome::Complete(m) => pages.push(m),
                        PollOutcome::InProgress { retry_after, .. } => {
                            tokio::time::sleep(
                                client.retry().clamp_poll(retry_after.unwrap_or(wait)),
                            )
                            .await;
                        }
                    }
                }
                break pages;
            }
        }
    };
    let first = &manifest_pages[0];
    let requires_token = first.requires_access_token;
    job.transaction_time = Some(first.transaction_time.clone());
    let _ = shared.transaction_time.set(first.transaction_time.clone());
    job.save(&location).await?;
    let mut all_items = Vec::new();
    for m in &manifest_pages {
        all_items.extend(items_of(m));
    }
    tracing::info!(files = all_items.len(), transaction_time = %first.transaction_time, "export complete; downloading");
    shared.progress.files_total.store(
        seen.len() as u64
            + all_items
                .iter()
                .filter(|(_, i)| !seen.contains(&i.url))
                .count() as u64,
        Ordering::Relaxed,
    );
    shared.progress.set_state("downloading");
    spawn_items(all_items, requires_token, &mut tasks, &mut seen, &mut index);

    let mut failure: Option<Error> = None;
    while let Some(joined) = tasks.join_next().await {
        let (item, kind, r) =
            joined.map_err(|e| Error::Internal(format!("download task failed: {e}")))?;
        match r {
            Ok(rec) => {
                job.files.insert(
                    item.url.clone(),
                    FileRecord {
                        state: FileState::Committing,
                        ..rec
                    },
                );
                job.save(&location).await?;
                let rec = job.files.get_mut(&item.url).expect("inserted");
                commit_staged(&location, &rec.parts).await?;
                rec.state = FileState::Committed;
                if rec.kind == "output" {
                    shared.progress.add_rows(
                        rec.resource_type.as_deref().unwrap_or("?"),
                        rec.stats
                            .lines
                            .saturating_sub(rec.stats.blank_lines + rec.stats.rejects()),
                    );
                }
                job.save(&location).await?;
            }
            Err(e) => {
                tracing::error!(kind, url = %item.url, error = %e, "file failed");
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }

    // Publish the run.
    let mut stats = DecodeStats::default();
    let mut inputs = Vec::new();
    let mut files = Vec::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut deleted = 0;
    let mut warnings = Vec::new();
    for (url, rec) in &job.files {
        files.extend(rec.parts.iter().cloned());
        let shown = Url::parse(url)
            .map(|u| crate::client::error_redact(&u))
            .unwrap_or_else(|_| url.clone());
        match rec.kind.as_str() {
            "output" => {
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
            "deleted" => deleted += rec.extra.values().sum::<u64>(),
            _ => {
                for (k, v) in &rec.extra {
                    *outcomes.entry(k.clone()).or_default() += v;
                }
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let server_errors = outcomes.get("fatal").is_some_and(|n| *n > 0)
        || outcomes.get("error").is_some_and(|n| *n > 0);
    let ids = (job.run_id.clone(), job.export.clone(), job.started.clone());
    let manifest = RunManifest {
        source: Some(job.base_url.clone()),
        transaction_time: job.transaction_time.clone(),
        outcomes,
        deleted,
        warnings,
        request: Some(job.request.clone()),
        ..RunManifest::finished("export", ids, stats, inputs, files)
    }
    .with_view_keys(&shared.registry);

    manifest.publish(&location).await?;
    job.state = "complete".into();
    job.save(&location).await?;
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

/// FNV-1a, 64 bit: a stable (across runs and builds) name for a file URL.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

type Tasks = tokio::task::JoinSet<(ManifestItem, String, Result<FileRecord>)>;

fn items_of(m: &Manifest) -> Vec<(String, ManifestItem)> {
    let mut v: Vec<(String, ManifestItem)> = m
        .output
        .iter()
        .map(|i| ("output".to_string(), i.clone()))
        .collect();
    v.extend(m.deleted.iter().map(|i| ("deleted".to_string(), i.clone())));
    v.extend(m.error.iter().map(|i| ("error".to_string(), i.clone())));
    v
}

struct Shared {
    /// The status URL (re-polled for fresh file URLs when one has expired).
    status: Url,
    /// One manifest re-fetch at a time.
    refresh: tokio::sync::Mutex<()>,
    /// The manifest's transactionTime once known (recorded with deleted entries).
    transaction_time: std::sync::OnceLock<String>,
    client: BulkClient,
    registry: Arc<ViewRegistry>,
    location: DatasetLocation,
    opts: ExportOptions,
    progress: Arc<Progress>,
    export: String,
    run_id: String,
}

impl Shared {
    /// The writer for one downloaded file. Its part names carry a hash of the file's URL, so
    /// a resumed run writes a file's parts under the same names and can never overwrite the
    /// committed parts of another file.
    fn writer(&self, url: &Url) -> DatasetWriter {
        DatasetWriterBuilder::new(
            self.location.clone(),
            format!("{}-{:016x}", self.run_id, fnv1a(url.as_str().as_bytes())),
            &self.export,
        )
        .with_compression(self.opts.compression)
        .with_staging(true)
        // Up to `concurrency` files are written at once, each by its own writer: they share
        // the one budget a `convert` writer has, so memory does not grow with --concurrency.
        .with_max_buffered_bytes(
            crate::sink::DEFAULT_MAX_BUFFERED_BYTES / self.opts.concurrency.max(1),
        )
        .build()
    }
}

/// Download and store one manifest item; returns its record (parts staged, not yet committed).
async fn process_item(
    sh: &Shared,
    kind: &str,
    item: &ManifestItem,
    requires_token: bool,
    n: usize,
) -> Result<FileRecord> {
    let mut url = Url::parse(&item.url).map_err(|e| ClientError::Invalid(e.to_string()))?;
    let mut attempt = 0;
    let mut backoff = sh.client.retry().base;
    let mut refreshed = false;
    loop {
        let r = match kind {
            "output" => stream_output(sh, &url, requires_token, n).await,
            _ => small_file(sh, kind, &url, requires_token).await,
        };
        match r {
            Ok((parts, stats, extra)) => {
                sh.progress.files.fetch_add(1, Ordering::Relaxed);
                return Ok(FileRecord {
                    kind: kind.to_string(),
                    resource_type: item.type_.clone(),
                    state: FileState::Committing,
                    parts,
                    stats,
                    count: item.count,
                    extra,
                    refreshed_url: refreshed.then(|| url.to_string()),
                });
            }
            Err(Error::Client(ClientError::Status {
                status: 404 | 410, ..
            })) if !refreshed => {
                // C15: the link expired; a re-fetched manifest may carry a fresh one.
                refreshed = true;
                tracing::info!(url = %crate::client::error_redact(&url), "file URL expired; re-fetching the manifest");
                url = refreshed_url(sh, kind, item).await?;
            }
            Err(e) if attempt < sh.client.retry().max_retries && retryable(&e) => {
                attempt += 1;
                backoff = sh.client.retry().next_backoff(backoff);
                tracing::info!(retry = attempt, of = sh.client.retry().max_retries, error = %e, "file attempt failed; starting over");
                tokio::time::sleep(backoff).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The URL of `item` in a freshly fetched manifest (all pages): the entry with the same URL
/// path, else the only entry of the same kind, type and count.
async fn refreshed_url(sh: &Shared, kind: &str, item: &ManifestItem) -> Result<Url> {
    let _one_at_a_time = sh.refresh.lock().await;
    let gone = || ClientError::Protocol {
        url: crate::client::error_redact(&sh.status),
        message: format!(
            "the file {} expired and the re-fetched manifest has no replacement for it",
            Url::parse(&item.url)
                .map(|u| crate::client::error_redact(&u))
                .unwrap_or_default()
        ),
    };
    let mut items = Vec::new();
    let mut page = Some(sh.status.clone());
    while let Some(p) = page.take() {
        match sh.client.poll(&p).await? {
            PollOutcome::Complete(m) => {
                items.extend(items_of(&m));
                page = m
                    .next_page()
                    .map(|n| Url::parse(n).map_err(|e| ClientError::Invalid(e.to_string())))
                    .transpose()?;
            }
            PollOutcome::InProgress { .. } => return Err(gone().into()),
        }
    }
    let path = |u: &str| {
        Url::parse(u)
            .ok()
            .map(|u| (u.origin(), u.path().to_string()))
    };
    let same_path: Vec<&ManifestItem> = items
        .iter()
        .filter(|(k, i)| k == kind && i.url != item.url && path(&i.url) == path(&item.url))
        .map(|(_, i)| i)
        .collect();
    let candidates = if same_path.is_empty() {
        items
            .iter()
            .filter(|(k, i)| {
                k == kind && i.type_ == item.type_ && i.count == item.count && i.url != item.url
            })
            .map(|(_, i)| i)
            .collect()
    } else {
        same_path
    };
    match candidates.as_slice() {
        [one] => Ok(Url::parse(&one.url).map_err(|e| ClientError::Invalid(e.to_string()))?),
        _ => Err(gone().into()),
    }
}

fn retryable(e: &Error) -> bool {
    match e {
        Error::Client(c) => c.is_retryable(),
        Error::Flatten(FlattenError::Read { .. }) => true,
        _ => false,
    }
}

type FileResult = (Vec<WrittenFile>, DecodeStats, BTreeMap<String, u64>);

enum WMsg {
    Batches(Vec<ViewBatch>),
    Rejects(Vec<Reject>),
}

/// Stream one output file through a decoder into staged parts. A cut identity-encoded body is
/// resumed with `Range` into the same decoder; anything else fails the attempt (its staged parts
/// are discarded by the caller's retry).
async fn stream_output(
    sh: &Shared,
    url: &Url,
    requires_token: bool,
    n: usize,
) -> Result<FileResult> {
    let label = crate::client::error_redact(url);
    let mut resp = sh.client.open_file(url, requires_token, 0).await?;
    let gzip = resp.gzip;
    let (btx, mut brx) = mpsc::channel::<Bytes>(8);
    let (wtx, mut wrx) = mpsc::channel::<WMsg>(4);
    let registry = sh.registry.clone();
    let batch_size = sh.opts.batch_size;
    // The decoders of parallel downloads share what two `convert` workers would hold.
    let batch_bytes = (2 * crate::flatten::DEFAULT_BATCH_BYTES / sh.opts.concurrency.max(1))
        .min(crate::flatten::DEFAULT_BATCH_BYTES);
    let dlabel = label.clone();
    let progress = sh.progress.clone();
    let archive = sh.opts.keep_ndjson.as_ref().map(|dir| {
        let name: String = url
            .path_segments()
            .and_then(|mut s| s.next_back())
            .unwrap_or("file")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        dir.join(format!("{n:04}-{name}{}", if gzip { ".gz" } else { "" }))
    });
    let decode = tokio::task::spawn_blocking(move || -> Result<DecodeStats, FlattenError> {
        let read_err = |source| FlattenError::Read {
            file: dlabel.clone(),
            source,
        };
        let mut archive = match &archive {
            Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(
                |source| FlattenError::Read {
                    file: p.display().to_string(),
                    source,
                },
            )?)),
            None => None,
        };
        let mut d = DecoderBuilder::new(registry, dlabel.clone())
            .with_batch_size(batch_size)
            .with_batch_bytes(batch_bytes)
            .build();
        let mut gz = gzip.then(|| flate2::write::MultiGzDecoder::new(Vec::new()));
        let mut lines = 0;
        let mut feed =
            |d: &mut crate::flatten::Decoder, data: &[u8]| -> Result<bool, FlattenError> {
                d.decode(data)?;
                progress
                    .lines
                    .fetch_add(d.stats().lines - lines, Ordering::Relaxed);
                lines = d.stats().lines;
                let (b, r) = (d.take_batches(), d.take_rejects());
                Ok(
                    (b.is_empty() || wtx.blocking_send(WMsg::Batches(b)).is_ok())
                        && (r.is_empty() || wtx.blocking_send(WMsg::Rejects(r)).is_ok()),
                )
            };
        while let Some(chunk) = brx.blocking_recv() {
            if let Some(a) = archive.as_mut() {
                a.write_all(&chunk).map_err(read_err)?;
            }
            let ok = match gz.as_mut() {
                Some(g) => {
                    g.write_all(&chunk).map_err(read_err)?;
                    let out = std::mem::take(g.get_mut());
                    feed(&mut d, &out)?
                }
                None => feed(&mut d, &chunk)?,
            };
            if !ok {
                break;
            }
        }
        if let Some(g) = gz.as_mut() {
            g.try_finish().map_err(read_err)?;
            let out = std::mem::take(g.get_mut());
            feed(&mut d, &out)?;
        }
        if let Some(a) = archive.as_mut() {
            a.flush().map_err(read_err)?;
        }
        let batches = d.finish()?;
        let rejects = d.take_rejects();
        let _ = wtx.blocking_send(WMsg::Batches(batches));
        let _ = wtx.blocking_send(WMsg::Rejects(rejects));
        Ok(d.stats().clone())
    });
    let mut writer = sh.writer(url);
    let write = tokio::spawn(async move {
        let mut rejects = Vec::new();
        while let Some(m) = wrx.recv().await {
            match m {
                WMsg::Batches(bs) => {
                    for b in &bs {
                        writer.write(b).await?;
                    }
                }
                WMsg::Rejects(r) => rejects.extend(r),
            }
        }
        if !rejects.is_empty() {
            writer
                .write_batch(REJECTS_TABLE, &rejects_batch(&rejects))
                .await?;
        }
        writer.finish().await
    });

    // Download, resuming with Range where the server allows it.
    let mut offset = 0u64;
    let mut resumes = 0;
    let download: Result<(), Error> = async {
        loop {
            let mut stream = resp.response.bytes_stream();
            let mut cut = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        offset += c.len() as u64;
                        sh.progress
                            .bytes
                            .fetch_add(c.len() as u64, Ordering::Relaxed);
                        if btx.send(c).await.is_err() {
                            return Ok(()); // decoder stopped; its error is reported below
                        }
                    }
                    Err(e) => {
                        cut = Some(e);
                        break;
                    }
                }
            }
            let Some(e) = cut else { return Ok(()) };
            let can_resume = !gzip && resp.ranges && resumes < sh.client.retry().max_retries;
            if !can_resume {
                return Err(ClientError::Network {
                    method: "GET",
                    url: label.clone(),
                    source: e,
                }
                .into());
            }
            resumes += 1;
            tracing::info!(url = %label, offset, "download cut; resuming with Range");
            let next = sh.client.open_file(url, requires_token, offset).await?;
            if next.offset != offset {
                return Err(ClientError::Protocol {
                    url: label.clone(),
                    message: "server ignored the Range request".into(),
                }
                .into());
            }
            resp = next;
        }
    }
    .await;
    drop(btx);
    let decoded = decode
        .await
        .map_err(|e| Error::Internal(format!("decode task: {e}")))?;
    let written = write
        .await
        .map_err(|e| Error::Internal(format!("write task: {e}")))?;
    match (download, decoded, written) {
        (Ok(()), Ok(stats), Ok(parts)) => Ok((parts, stats, BTreeMap::new())),
        (d, s, w) => {
            if let Ok(parts) = &w {
                discard_staged(&sh.location, parts).await;
            }
            Err(d
                .err()
                .or_else(|| s.err().map(Error::from))
                .or_else(|| w.err().map(Error::from))
                .unwrap_or_else(|| Error::Internal("file attempt failed".into())))
        }
    }
}

/// Read a whole (small) body, gunzipped.
async fn read_body(sh: &Shared, url: &Url, requires_token: bool) -> Result<Vec<u8>> {
    let resp = sh.client.open_file(url, requires_token, 0).await?;
    let label = crate::client::error_redact(url);
    let gzip = resp.gzip;
    let mut body = Vec::new();
    let mut stream = resp.response.bytes_stream();
    while let Some(c) = stream.next().await {
        let c = c.map_err(|source| ClientError::Network {
            method: "GET",
            url: label.clone(),
            source,
        })?;
        body.extend_from_slice(&c);
        if body.len() > MAX_SMALL_FILE {
            return Err(ClientError::Protocol {
                url: label,
                message: "file too large".into(),
            }
            .into());
        }
    }
    if gzip {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&body[..]), &mut out)
            .map_err(|source| FlattenError::Read {
                file: label,
                source,
            })?;
        body = out;
    }
    Ok(body)
}

/// Deleted (Bundle) and error (OperationOutcome) files → `_deleted` / `_outcomes` rows.
async fn small_file(
    sh: &Shared,
    kind: &str,
    url: &Url,
    requires_token: bool,
) -> Result<FileResult> {
    use datafusion::arrow::{
        array::{ArrayRef, StringBuilder, UInt64Builder},
        datatypes::{DataType, Field, Schema},
        record_batch::RecordBatch,
    };
    let body = read_body(sh, url, requires_token).await?;
    let label = crate::client::error_redact(url);
    let mut extra: BTreeMap<String, u64> = BTreeMap::new();
    let mut tt = StringBuilder::new();
    let (mut a, mut b, mut c, mut raw, mut file, mut line) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        UInt64Builder::new(),
    );
    let mut stats = DecodeStats::default();
    for (i, l) in body.split(|b| *b == b'\n').enumerate() {
        if l.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        stats.lines += 1;
        let v: serde_json::Value = serde_json::from_slice(l).unwrap_or(serde_json::Value::Null);
        let text = String::from_utf8_lossy(l);
        if kind == "deleted" {
            for e in v
                .get("entry")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
            {
                let u = e
                    .pointer("/request/url")
                    .and_then(|u| u.as_str())
                    .unwrap_or_default();
                let (t, id) = u.trim_start_matches('/').split_once('/').unwrap_or(("", u));
                a.append_value(t);
                b.append_value(id.split('/').next().unwrap_or(id));
                c.append_option(v.pointer("/meta/lastUpdated").and_then(|x| x.as_str()));
                tt.append_option(sh.transaction_time.get());
                raw.append_value(&text);
                file.append_value(&label);
                line.append_value(i as u64 + 1);
                *extra.entry("deleted".into()).or_default() += 1;
            }
        } else {
            for issue in v
                .get("issue")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
            {
                let sev = issue
                    .get("severity")
                    .and_then(|s| s.as_str())
                    .unwrap_or("unknown");
                a.append_value(sev);
                b.append_option(issue.get("code").and_then(|s| s.as_str()));
                c.append_option(
                    issue
                        .get("diagnostics")
                        .and_then(|s| s.as_str())
                        .or_else(|| issue.pointer("/details/text").and_then(|s| s.as_str())),
                );
                raw.append_value(&text);
                file.append_value(&label);
                line.append_value(i as u64 + 1);
                tt.append_option(sh.transaction_time.get());
                *extra.entry(sev.to_string()).or_default() += 1;
            }
        }
    }
    let (table, names) = if kind == "deleted" {
        (DELETED_TABLE, ["resource_type", "id", "last_updated"])
    } else {
        (OUTCOMES_TABLE, ["severity", "code", "diagnostics"])
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new(names[0], DataType::Utf8, true),
        Field::new(names[1], DataType::Utf8, true),
        Field::new(names[2], DataType::Utf8, true),
        Field::new("raw", DataType::Utf8, true),
        Field::new("file", DataType::Utf8, true),
        Field::new("line", DataType::UInt64, true),
        Field::new("transaction_time", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(a.finish()),
        Arc::new(b.finish()),
        Arc::new(c.finish()),
        Arc::new(raw.finish()),
        Arc::new(file.finish()),
        Arc::new(line.finish()),
        Arc::new(tt.finish()),
    ];
    let batch = RecordBatch::try_new(schema, cols).map_err(|e| Error::Internal(e.to_string()))?;
    let mut w = sh.writer(url);
    w.write_batch(table, &batch).await?;
    let parts = w.finish().await?;
    Ok((parts, stats, extra))
}
