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
//!
//! A job that cannot be continued — the server reports it failed, forgot it (`404`/`410` from
//! its status URL), or Ctrl-C cancelled it — is abandoned: marked failed, its parts
//! deleted. Those parts are in no run record or Delta commit, so nothing else would ever remove
//! them. The same command run again (not `--resume`) then starts a new job rather than failing
//! on the forgotten one night after night.

mod builder;
pub mod coalesce;
mod files;
pub mod members;
mod poll;
mod record;
mod since;

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use object_store::ObjectStoreExt;
use tracing::Instrument;
use url::Url;

use builder::Running;
pub use builder::{ExportBuilder, ExportOptions, OnCtrlC, find_unfinished};
pub use since::{SINCE_AUTO, reached as since_auto_start, resolve_since_auto};

use super::Progress;
use crate::{
    Error, Result,
    client::{BulkClient, ClientError, Manifest, ManifestItem},
    dataset::{
        DatasetLocation, FileKind, JobRecord, RunIds, RunManifest, commit_staged, discard_run,
    },
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
    /// Another process is working on the job (an overlapping scheduled run).
    #[error(
        "export job {run} is being run by another flatfhir process (host {host}, pid {pid}, alive {seconds} s ago); not starting a second one"
    )]
    Busy {
        /// The job's run id.
        run: String,
        /// The holder's host.
        host: String,
        /// The holder's process id.
        pid: u32,
        /// Seconds since the holder renewed its lease.
        seconds: u64,
    },
    /// `--snapshot` on an export that is not full.
    #[error(
        "--snapshot needs a full export, and {why}: a snapshot would remove from the current state every resource it did not bring"
    )]
    NotASnapshot {
        /// Which parameter makes the export partial.
        why: String,
    },
    /// The server no longer has the job (its status URL answers 404 or 410: deleted, expired,
    /// or the server restarted; asked again when a file is gone even at the link a re-fetched
    /// manifest gives): nothing can be resumed, so the job was abandoned.
    #[error(
        "the server no longer has export job {run} (HTTP {status} from {from}): the job is abandoned and its unpublished files removed ({objects} objects); {}",
        if *resumed { "run the export command again (without --resume) to start a new one" } else { "nothing was published" }
    )]
    JobGone {
        /// The job's run id.
        run: String,
        /// The status code.
        status: u16,
        /// What answered it (its status URL, maybe after a file).
        from: String,
        /// Objects of the job removed from the dataset.
        objects: usize,
        /// Whether the job was kicked off by an earlier process (a resumed job).
        resumed: bool,
    },
    /// Interrupted (Ctrl-C).
    #[error("interrupted; {}", if *resumable {
        format!("the server job is kept: continue with `flatfhir export --resume {dataset}`")
    } else {
        "the export job was cancelled on the server".to_string()
    })]
    Interrupted {
        /// Whether the server's job was kept for `--resume`.
        resumable: bool,
        /// The dataset (a folder or URL), for the command that continues.
        dataset: String,
    },
    /// Interrupted by a second Ctrl-C during the clean-up after the first.
    #[error(
        "interrupted twice: stopped without cleaning up; `flatfhir export --resume {dataset}` continues the job unless its cancellation had begun (`flatfhir compact --retain` removes what an abandoned job left)"
    )]
    InterruptedTwice {
        /// The dataset (a folder or URL).
        dataset: String,
    },
}

/// A snapshot needs a full export: every resource of the exported types that the population
/// holds (see [`ExportBuilder::with_snapshot`]).
fn check_snapshot(request: &crate::client::ExportRequest, auto: bool) -> Result<()> {
    let why = if let Some(since) = &request.since {
        if auto {
            format!("--since auto continues from the last run ({since}) and exports only changes")
        } else {
            "--since exports only what changed".into()
        }
    } else if request.until.is_some() {
        "--until leaves out what changed later".into()
    } else if !request.type_filters.is_empty() {
        "--type-filter exports a subset of each type".into()
    } else if !request.patients.is_empty() {
        "--patient exports a subset of the population".into()
    } else {
        return Ok(());
    };
    Err(ExportError::NotASnapshot { why }.into())
}

/// What an export run produced.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The published run record.
    pub manifest: RunManifest,
    /// Whether the server's error files held fatal or error issues.
    pub server_errors: bool,
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

async fn run_export(mut b: ExportBuilder, running: Arc<Running>) -> Result<ExportSummary> {
    crate::dataset::check_layout(&b.location).await?;
    let mut backfill = None;
    if b.resume.is_none() {
        let auto = b.request.since.as_deref() == Some(SINCE_AUTO);
        let request = std::mem::take(&mut b.request);
        b.request = resolve_since_auto(&b.location, b.client.base().as_str(), request).await?;
        if b.snapshot {
            check_snapshot(&b.request, auto)?;
        }
        if b.options.backfill
            && let Some(group) = members::wants_backfill(&b.request)
        {
            let group = group.to_string();
            backfill = members::backfill(&b, &group, &b.progress).await?;
        }
    }
    let ExportBuilder {
        client,
        registry,
        location,
        request,
        options: opts,
        progress,
        resume,
        restart_when_gone,
        snapshot,
        ..
    } = b;
    let resumed = resume.is_some();
    // One process at a time per export (base URL and request): two runs of the same command
    // started at the same moment (one cron line on two hosts) both found no unfinished job
    // and both kicked off. The claim is a conditional put, so exactly one of them gets it.
    let export_key = {
        let (base, req) = match &resume {
            Some(job) => (job.base_url.clone(), job.request.clone()),
            None => (client.base().as_str().to_string(), request.clone()),
        };
        let text = format!(
            "{}\n{}",
            base.trim_end_matches('/'),
            serde_json::to_string(&req).unwrap_or_default()
        );
        format!(
            "{}/{:016x}.start",
            crate::dataset::JOBS_DIR,
            crate::dataset::job::fnv1a(text.as_bytes())
        )
    };
    // The new job's ids now, so that the lease names its run.
    let new_ids = RunIds::new();
    let claimed_for = resume
        .as_ref()
        .map_or_else(|| new_ids.run_id.clone(), |j| j.run_id.clone());
    let _start = match crate::dataset::job::claim_lease(&location, export_key, &claimed_for).await?
    {
        Ok(guard) => guard,
        Err(holder) => {
            return Err(ExportError::Busy {
                run: holder
                    .run
                    .clone()
                    .unwrap_or_else(|| "of this export".into()),
                seconds: holder.age().as_secs(),
                host: holder.host,
                pid: holder.pid,
            }
            .into());
        }
    };
    let start = _start;
    // Boxed: the whole run's future is large, and a Group backfill nests runs in one task.
    let result = Box::pin(async move {
        let job = match resume {
            Some(job) => {
                if let Some(lease) = job.holder(&location).await? {
                    return Err(ExportError::Busy {
                        run: job.run_id.clone(),
                        seconds: lease.age().as_secs(),
                        host: lease.host,
                        pid: lease.pid,
                    }
                    .into());
                }
                tracing::info!(run = job.run_id, "resuming export job");
                job
            }
            None => {
                let mut job = JobRecord::new(new_ids, client.base().as_str(), request);
                job.snapshot = snapshot;
                job.backfill = backfill;
                job.save(&location).await?;
                job
            }
        };
        // What a new job needs when the server no longer has the one continued.
        let again = (resumed && restart_when_gone)
            .then(|| (job.request.clone(), job.snapshot, job.backfill.clone()));
        // Every event of the run, on every task and thread it spawns, carries the run id.
        let span = tracing::info_span!("run", run_id = %job.run_id);
        let r = run_job(
            client.clone(),
            registry.clone(),
            location.clone(),
            opts.clone(),
            progress.clone(),
            running.clone(),
            job,
            resumed,
        )
        .instrument(span)
        .await;
        let Some((request, snapshot, backfill)) = again else {
            return r;
        };
        let Err(Error::Export(ExportError::JobGone {
            run,
            status,
            objects,
            ..
        })) = &r
        else {
            return r;
        };
        // The same command run again continued a job the server has forgotten (a restart, an
        // expired or deleted job): start the export afresh rather than fail every night.
        tracing::warn!(
            run = %run,
            status,
            objects,
            "the server no longer has the unfinished export job: abandoned it (its unpublished files removed); starting a new export"
        );
        progress.start_over();
        let mut job = JobRecord::new(RunIds::new(), client.base().as_str(), request);
        job.snapshot = snapshot;
        job.backfill = backfill;
        job.save(&location).await?;
        let span = tracing::info_span!("run", run_id = %job.run_id);
        run_job(
            client, registry, location, opts, progress, running, job, false,
        )
        .instrument(span)
        .await

    })
    .await;
    start.release().await;
    result
}

/// The status of an error that says the job or its file is gone (404, 410).
fn gone_status(e: &Error) -> Option<u16> {
    match e {
        Error::Client(c) => gone_client_status(c),
        _ => None,
    }
}

fn gone_client_status(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::Status {
            status: status @ (404 | 410),
            ..
        } => Some(*status),
        _ => None,
    }
}

/// Give `job` up for good: it is marked failed, and every object it wrote under its `export=`
/// partitions (committed and staged parts, which no run record or Delta commit names) and its
/// per-file records are deleted, so that nothing of it is left behind. Returns the number of
/// objects deleted.
pub(super) async fn abandon(job: &mut JobRecord, location: &DatasetLocation) -> Result<usize> {
    // A published job's files are the run's: never abandoned.
    if job.state == crate::dataset::JobState::Complete {
        return Ok(0);
    }
    job.failed()?;
    job.save(location).await?;
    let discarded = discard_run(location, &job.export).await;
    job.prune_files(location).await;
    tracing::info!(
        run = %job.run_id,
        objects = discarded.objects,
        bytes = discarded.bytes,
        "abandoned the export job; removed its unpublished files"
    );
    Ok(discarded.objects)
}

/// The export of `job` (new, or `resumed` from an earlier process), from kick-off to the
/// published run record.
#[allow(clippy::too_many_arguments)]
async fn run_job(
    client: BulkClient,
    registry: Arc<ViewRegistry>,
    location: DatasetLocation,
    opts: ExportOptions,
    progress: Arc<Progress>,
    running: Arc<Running>,
    mut job: JobRecord,
    resumed: bool,
) -> Result<ExportSummary> {
    let mut phases = crate::dataset::PhaseSeconds::default();
    let lease = job.hold(&location).await?;
    if resumed {
        // The lease is ours: what an earlier process of this job left half-written is debris.
        let swept = crate::dataset::sweep_unfinished_local(&location, &job.export).await;
        if swept > 0 {
            tracing::info!(
                files = swept,
                "removed files a killed run left half-written"
            );
        }
    }
    let plan = job.resume_plan();
    for url in &plan.roll_forward {
        commit_staged(&location, &job.files[url].parts).await?;
        job.file_committed(url)?;
        job.save_file(&location, url).await?;
    }
    let status = match &plan.status_url {
        Some(s) => parse_url(s)?,
        None => {
            let t = std::time::Instant::now();
            let s = client.kick_off(&job.request).await?;
            phases.kick_off = t.elapsed().as_secs_f64();
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
    // Files between the start of their download and their parts written: the downloads'
    // slots, and as many again whose bodies are in but whose parts are still being written.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2 * opts.concurrency.max(1)));
    let mut tasks = Tasks::new();
    let mut seen: HashSet<String> = plan.skip;
    let mut index = job.files.len();
    let mut spawn_items = |items: Vec<(FileKind, ManifestItem)>,
                           requires_token: bool,
                           tasks: &mut Tasks| {
        for (kind, item) in items {
            if !seen.insert(item.url.clone()) {
                continue;
            }
            index += 1;
            let (shared, sem, n) = (shared.clone(), sem.clone(), index);
            let in_flight = in_flight.clone();
            tasks.spawn(
                async move {
                    let _in_flight = in_flight.acquire_owned().await;
                    let mut slot = files::DownloadSlot::new(sem);
                    let r = files::process_item(&shared, kind, &item, requires_token, n, &mut slot)
                        .await;
                    (item.url, kind, r)
                }
                .in_current_span(),
            );
        }
    };

    let (all_items, requires_token) = if job.downloaded {
        // Killed after its last file was committed (while coalescing or publishing): the
        // files' records are the manifest, and the server (which may have forgotten the job
        // since) is not asked again.
        tracing::info!("every file of the export is committed; publishing it");
        let items = job
            .files
            .values()
            .map(|r| {
                let item = ManifestItem {
                    type_: r.resource_type.clone(),
                    url: r.url.clone(),
                    count: r.count,
                };
                (r.kind, item)
            })
            .collect();
        (items, false)
    } else {
        let t = std::time::Instant::now();
        let pages = poll::poll_until_complete(
            &client,
            &status,
            &progress,
            |m, tasks: &mut Tasks| spawn_items(items_of(m), m.requires_access_token, tasks),
            &mut tasks,
        )
        .await;
        phases.poll = t.elapsed().as_secs_f64();
        let pages = match pages {
            Ok(p) => p,
            Err(e) => {
                let gone = gone_status(&e);
                if gone.is_none() && !matches!(e, Error::Client(ClientError::JobFailed(_))) {
                    return Err(e);
                }
                // Nothing of this job can be resumed: leave nothing of it behind either.
                tasks.shutdown().await;
                shared.running.writers.idle(builder::WIND_DOWN).await;
                let objects = abandon(&mut job, &location).await?;
                lease.release().await;
                return Err(match gone {
                    Some(status) => ExportError::JobGone {
                        run: job.run_id.clone(),
                        status,
                        from: "its status URL".into(),
                        objects,
                        resumed,
                    }
                    .into(),
                    None => e,
                });
            }
        };
        let first = &pages[0];
        job.manifest_received(&first.transaction_time)?;
        job.save(&location).await?;
        let items: Vec<(FileKind, ManifestItem)> = pages.iter().flat_map(items_of).collect();
        (items, first.requires_access_token)
    };
    let t = std::time::Instant::now();
    tracing::info!(
        files = all_items.len(),
        transaction_time = job.transaction_time.as_deref().unwrap_or(""),
        "export complete; downloading"
    );
    progress
        .files_total
        .store(all_items.len() as u64, Ordering::Relaxed);
    progress
        .files
        .store(job.files.len() as u64, Ordering::Relaxed);
    progress.set_state("downloading");
    let mut early = opts.coalesce.then(|| {
        coalesce::EarlyCoalescing::new(
            &location,
            &job.export,
            &shared.tag,
            opts.compression,
            all_items.iter().map(|(k, i)| (*k, i)),
            &job.files,
        )
    });
    spawn_items(all_items, requires_token, &mut tasks);

    let mut failure: Option<Error> = None;
    // A file the server no longer serves, even at a re-fetched manifest's link: its status and
    // URL.
    let mut expired: Option<(u16, String)> = None;
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
                let (kind, declared) = (rec.kind, rec.resource_type.clone());
                job.file_staged(rec)?;
                job.save_file(&location, &url).await?;
                commit_staged(&location, &parts).await?;
                job.file_committed(&url)?;
                job.save_file(&location, &url).await?;
                if let Some(e) = early.as_mut() {
                    e.committed(kind, declared.as_deref(), &job.files);
                }
                if let Some((ty, rows)) = rows_of {
                    progress.add_rows(&ty, rows);
                }
            }
            Err(e) => {
                let shown = parse_url(&url)
                    .map(|u| crate::client::error_redact(&u))
                    .unwrap_or(url);
                tracing::error!(%kind, url = %shown, error = %e, "file failed");
                if let Some(status) = gone_status(&e) {
                    expired.get_or_insert((status, shown.clone()));
                }
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
    if let Some((file_status, url)) = expired {
        // A file the server no longer serves, even after re-fetching the manifest. If the job
        // itself is gone too (deleted or expired on the server), it can never be completed:
        // leave nothing of it behind. If the job is still there, the file may come back (a
        // storage hiccup): the job stays resumable.
        let polled = client.poll(&status).await;
        if let Err(e) = &polled
            && let Some(status) = gone_client_status(e)
        {
            tracing::warn!(%url, file_status, status, "a file and the job's status URL are both gone");
            let objects = abandon(&mut job, &location).await?;
            lease.release().await;
            return Err(ExportError::JobGone {
                run: job.run_id.clone(),
                status,
                from: format!("its status URL, after file {url} answered {file_status}"),
                objects,
                resumed,
            }
            .into());
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if !job.downloaded {
        job.all_downloaded()?;
        job.save(&location).await?;
    }
    phases.decode = t.elapsed().as_secs_f64();

    // Small parts of many small files into parts of a sensible size, before publishing.
    progress.set_state("coalescing small parts");
    let t = std::time::Instant::now();
    let parts: Vec<_> = job.files.values().flat_map(|r| r.parts.clone()).collect();
    let coalesced = if let Some(early) = early {
        // What each type's early coalescing did, and the rest (parts of files without a
        // declared type, the run's own tables) now.
        let early = early.finish().await?;
        let rest = parts
            .into_iter()
            .filter(|p| !early.taken.contains(&p.path))
            .collect();
        let mut c =
            coalesce::coalesce(&location, &job.export, &shared.tag, opts.compression, rest).await?;
        c.parts.extend(early.coalesced.parts);
        c.replaced.extend(early.coalesced.replaced);
        c.parts.sort_by(|a, b| a.path.cmp(&b.path));
        c.replaced.sort_by(|a, b| a.path.cmp(&b.path));
        c
    } else {
        coalesce::Coalesced {
            parts,
            replaced: Vec::new(),
        }
    };
    phases.coalesce = t.elapsed().as_secs_f64();
    let (mut manifest, server_errors) = record::run_record(&job, &registry, coalesced.parts);
    manifest.metrics.phases = phases;
    manifest.metrics.http = client.http_summary();
    if let Some(granted) = client.granted_scope().await {
        manifest.not_granted = job
            .request
            .types
            .iter()
            .filter(|t| !crate::client::smart::scope_reads(&granted, t))
            .cloned()
            .collect();
        if !manifest.not_granted.is_empty() {
            tracing::warn!(
                types = %manifest.not_granted.join(","),
                granted = %granted,
                "the access token does not grant reading these requested types: the server may \
                 have left them out{}",
                if manifest.snapshot { ", so this snapshot run removes none of them" } else { "" }
            );
        }
    }
    manifest.publish(&location).await?;
    job.completed()?;
    job.save(&location).await?;
    job.prune_files(&location).await;
    lease.release().await;
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
