//! The job record of an export (`_jobs/<run id>.json` plus one small record per committed file
//! under `_jobs/<run id>/`): what `--resume` needs to continue a killed run without kicking off
//! again, downloading a committed file twice, or losing a file that was half-way through its
//! commit.
//!
//! The job is a state machine; each transition is a method that refuses an event that cannot
//! happen in the current state (a bug, reported as [`InvalidTransition`]):
//!
//! ```text
//!  Created ──kicked_off──► KickedOff ──manifest_received──► Downloading ──completed──► Complete
//!     │                      │  ▲ file_staged / file_committed    │ (all files committed)
//!     └──────────────────────┴──┴──────────── failed ─────────────┴──► Failed
//! ```
//!
//! A file is `Committing` once its parts are complete under staged names and recorded here, and
//! `Committed` once they are renamed visible. Each file's record is its own small object, so a
//! file's commit costs the same whether the export has 19 files or 20,000 (the job record proper
//! is written only when the job's state changes).

use std::collections::{BTreeMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use url::Url;

use super::{DatasetError, DatasetLocation, JOBS_DIR, RunIds, WrittenFile};
use crate::{client::ExportRequest, flatten::DecodeStats};

/// State of an export job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Recorded; the kick-off request has not been accepted yet.
    Created,
    /// The server accepted the kick-off: its status URL is being polled (files of partial
    /// manifests may already be downloading).
    KickedOff,
    /// The complete manifest arrived; its files are downloading.
    Downloading,
    /// The run record is published.
    Complete,
    /// The server's job failed or the user cancelled it: nothing to resume.
    Failed,
}

impl JobState {
    /// Whether the job has ended (nothing to resume).
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Complete | JobState::Failed)
    }
}

/// Which list of the manifest a file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// `output`: resources.
    Output,
    /// `deleted`: Bundles of deleted resources (tombstones).
    Deleted,
    /// `error`: OperationOutcome resources.
    Error,
}

impl FileKind {
    /// The manifest field name.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Output => "output",
            FileKind::Deleted => "deleted",
            FileKind::Error => "error",
        }
    }
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Commit state of one downloaded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Parts are complete under staged names and being renamed visible (rolled forward on
    /// resume).
    Committing,
    /// Visible; skipped on resume.
    Committed,
}

/// One file of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// The manifest URL of the file (the key of [`JobRecord::files`]).
    #[serde(default)]
    pub url: String,
    /// Which manifest list it came from.
    pub kind: FileKind,
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
    /// For `error` files: OperationOutcome issues by severity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outcomes: BTreeMap<String, u64>,
    /// The URL the file was finally read from, when its manifest URL had expired (`404`/`410`)
    /// and a re-fetched manifest gave a new one. A resumed run skips both URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_url: Option<String>,
}

/// An event that cannot happen in the job's current state: a bug in flatfhir.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("export job {run_id}: `{event}` is not possible in state {state:?}")]
pub struct InvalidTransition {
    /// The job.
    pub run_id: String,
    /// Its state.
    pub state: JobState,
    /// What was attempted.
    pub event: &'static str,
}

/// The persistent record of an export job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Run id (also the job id).
    pub run_id: String,
    /// `export=` partition value.
    pub export: String,
    /// Start time.
    pub started: String,
    /// FHIR base URL.
    pub base_url: String,
    /// The kick-off request (with `--since auto` already resolved).
    pub request: ExportRequest,
    /// Status URL from `Content-Location`.
    pub status_url: Option<String>,
    /// `transactionTime` of the manifest.
    pub transaction_time: Option<String>,
    /// Where the job is.
    pub state: JobState,
    /// A full snapshot (`export --snapshot`): see [`super::RunManifest::snapshot`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
    /// New Group members whose history was fetched before this job (done once: a resumed job
    /// does not look again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<super::Backfill>,
    /// Every file of the complete manifest is committed ([`Self::all_downloaded`]): what is
    /// left (coalescing, publishing) needs nothing from the server, so a resumed job finishes
    /// even when the server has forgotten the export.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downloaded: bool,
    /// Files by manifest URL (stored one object per file, not in the job's own object).
    #[serde(skip)]
    pub files: BTreeMap<String, FileRecord>,
}

/// What a resumed job must do before it continues ([`JobRecord::resume_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePlan {
    /// The status URL to poll; `None`: the kick-off was never accepted, kick off again.
    pub status_url: Option<String>,
    /// Files whose staged parts must be renamed visible before anything else.
    pub roll_forward: Vec<String>,
    /// URLs not to download again (committed files, both their manifest and refreshed URLs).
    pub skip: HashSet<String>,
}

impl JobRecord {
    /// A new job (state [`JobState::Created`]).
    pub fn new(ids: RunIds, base_url: &str, request: ExportRequest) -> Self {
        JobRecord {
            run_id: ids.run_id,
            export: ids.export,
            started: ids.started,
            base_url: base_url.to_string(),
            request,
            status_url: None,
            transaction_time: None,
            state: JobState::Created,
            snapshot: false,
            backfill: None,
            downloaded: false,
            files: BTreeMap::new(),
        }
    }

    fn refuse(&self, event: &'static str) -> InvalidTransition {
        InvalidTransition {
            run_id: self.run_id.clone(),
            state: self.state,
            event,
        }
    }

    /// The server accepted the kick-off.
    pub fn kicked_off(&mut self, status: &Url) -> Result<(), InvalidTransition> {
        match self.state {
            JobState::Created => {
                self.status_url = Some(status.to_string());
                self.state = JobState::KickedOff;
                Ok(())
            }
            _ => Err(self.refuse("kicked_off")),
        }
    }

    /// The complete manifest arrived (again, on resume: the `transactionTime` is kept from the
    /// first time).
    pub fn manifest_received(&mut self, transaction_time: &str) -> Result<(), InvalidTransition> {
        match self.state {
            JobState::KickedOff | JobState::Downloading => {
                self.transaction_time
                    .get_or_insert_with(|| transaction_time.to_string());
                self.state = JobState::Downloading;
                Ok(())
            }
            _ => Err(self.refuse("manifest_received")),
        }
    }

    /// A file's parts are complete under staged names.
    pub fn file_staged(&mut self, mut rec: FileRecord) -> Result<(), InvalidTransition> {
        match self.state {
            JobState::KickedOff | JobState::Downloading
                if self
                    .files
                    .get(&rec.url)
                    .is_none_or(|r| r.state == FileState::Committing) =>
            {
                rec.state = FileState::Committing;
                self.files.insert(rec.url.clone(), rec);
                Ok(())
            }
            _ => Err(self.refuse("file_staged")),
        }
    }

    /// A staged file's parts are visible.
    pub fn file_committed(&mut self, url: &str) -> Result<(), InvalidTransition> {
        let finished = self.state.is_finished();
        match self.files.get_mut(url) {
            Some(rec) if !finished => {
                rec.state = FileState::Committed;
                Ok(())
            }
            _ => Err(self.refuse("file_committed")),
        }
    }

    /// The run record is published: every file must be committed.
    pub fn completed(&mut self) -> Result<(), InvalidTransition> {
        let all_committed = self.files.values().all(|f| f.state == FileState::Committed);
        match self.state {
            JobState::Downloading if all_committed => {
                self.state = JobState::Complete;
                Ok(())
            }
            _ => Err(self.refuse("completed")),
        }
    }

    /// Every file of the complete manifest is downloaded and committed: the manifest's list is
    /// now the files' records.
    pub fn all_downloaded(&mut self) -> Result<(), InvalidTransition> {
        let all_committed = self.files.values().all(|f| f.state == FileState::Committed);
        match self.state {
            JobState::Downloading if all_committed => {
                self.downloaded = true;
                Ok(())
            }
            _ => Err(self.refuse("all_downloaded")),
        }
    }

    /// The server's job failed (or was cancelled): nothing can be resumed.
    pub fn failed(&mut self) -> Result<(), InvalidTransition> {
        match self.state {
            JobState::Complete => Err(self.refuse("failed")),
            _ => {
                self.state = JobState::Failed;
                Ok(())
            }
        }
    }

    /// What a resumed run must do: poll or kick off again, which files to roll forward, which
    /// URLs to skip.
    pub fn resume_plan(&self) -> ResumePlan {
        let mut skip = HashSet::new();
        let mut roll_forward = Vec::new();
        for (url, rec) in &self.files {
            if rec.state == FileState::Committing {
                roll_forward.push(url.clone());
            }
            // Committing files are rolled forward, so they are done too.
            skip.insert(url.clone());
            skip.extend(rec.refreshed_url.clone());
        }
        ResumePlan {
            status_url: self.status_url.clone(),
            roll_forward,
            skip,
        }
    }

    /// Whether this job exports the same thing as `request` from `base_url` (the same command
    /// run again continues the job it left unfinished).
    pub fn same_export(&self, base_url: &str, request: &ExportRequest) -> bool {
        self.request == *request
            && self.base_url.trim_end_matches('/') == base_url.trim_end_matches('/')
    }

    fn path(run_id: &str) -> String {
        format!("{JOBS_DIR}/{run_id}.json")
    }

    fn file_path(run_id: &str, url: &str) -> String {
        format!("{JOBS_DIR}/{run_id}/{:016x}.json", fnv1a(url.as_bytes()))
    }

    /// Save the job's own record (not its files) atomically.
    pub async fn save(&self, loc: &DatasetLocation) -> Result<(), DatasetError> {
        loc.put_json(&Self::path(&self.run_id), self).await
    }

    /// Save the record of one file (after [`file_staged`](Self::file_staged) or
    /// [`file_committed`](Self::file_committed)): one small object, whatever the number of files.
    pub async fn save_file(&self, loc: &DatasetLocation, url: &str) -> Result<(), DatasetError> {
        match self.files.get(url) {
            Some(rec) => loc.put_json(&Self::file_path(&self.run_id, url), rec).await,
            None => Ok(()),
        }
    }

    /// Every job of a dataset with its files, oldest first.
    pub async fn list(loc: &DatasetLocation) -> Result<Vec<JobRecord>, DatasetError> {
        let mut jobs: Vec<JobRecord> = loc.list_json_shallow(JOBS_DIR).await?;
        jobs.sort_by(|a, b| (&a.started, &a.run_id).cmp(&(&b.started, &b.run_id)));
        Ok(jobs)
    }

    /// The newest unfinished job of a dataset, with its files, if any.
    pub async fn latest_unfinished(
        loc: &DatasetLocation,
    ) -> Result<Option<JobRecord>, DatasetError> {
        let Some(mut job) = Self::list(loc)
            .await?
            .into_iter()
            .rfind(|j| !j.state.is_finished())
        else {
            return Ok(None);
        };
        job.load_files(loc).await?;
        Ok(Some(job))
    }

    /// Read the job's file records.
    pub async fn load_files(&mut self, loc: &DatasetLocation) -> Result<(), DatasetError> {
        let dir = format!("{JOBS_DIR}/{}", self.run_id);
        let files: Vec<FileRecord> = loc.list_json(&dir).await?;
        self.files = files.into_iter().map(|f| (f.url.clone(), f)).collect();
        Ok(())
    }

    /// Delete the per-file records of a finished job (best effort: they are only needed to
    /// resume).
    pub async fn prune_files(&self, loc: &DatasetLocation) {
        let rel = format!("{JOBS_DIR}/{}", self.run_id);
        let paths = loc
            .store
            .list(Some(&loc.child(&rel)))
            .map_ok(|m| m.location)
            .boxed();
        let _ = loc.store.delete_stream(paths).try_collect::<Vec<_>>().await;
        loc.remove_empty_dir(&rel).await;
    }
}

/// How often a running export rewrites its lease ([`JobRecord::hold`]).
pub const LEASE_RENEW: std::time::Duration = std::time::Duration::from_secs(20);
/// A lease not renewed for this long belongs to a process that is gone.
pub const LEASE_STALE: std::time::Duration = std::time::Duration::from_secs(90);

/// A running process's claim on a job (`_jobs/<run id>.lease`): an overlapping cron run of the
/// same export sees the job is being worked on and leaves it alone, while a job whose process
/// was killed is continued at once (same host, process gone) or after [`LEASE_STALE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// RFC 3339 time of the last renewal.
    pub renewed: String,
    /// The run the holder works on, when the lease does not name it already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

impl Lease {
    fn now() -> Lease {
        Lease {
            host: host_name(),
            pid: std::process::id(),
            renewed: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            run: None,
        }
    }

    /// Seconds since the last renewal.
    pub fn age(&self) -> std::time::Duration {
        chrono::DateTime::parse_from_rfc3339(&self.renewed)
            .ok()
            .and_then(|t| (chrono::Utc::now() - t.to_utc()).to_std().ok())
            .unwrap_or(std::time::Duration::MAX)
    }

    /// Whether the holder may still be running.
    fn live(&self) -> bool {
        if self.age() >= LEASE_STALE {
            return false;
        }
        // On this host, a process that is gone holds nothing (a killed run resumes at once).
        let proc_fs = std::path::Path::new("/proc/self").exists();
        !(proc_fs
            && self.host == host_name()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists())
    }
}

/// This machine's name (Linux's; elsewhere `HOSTNAME`, else `unknown`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Renews a job's lease while alive; dropped, it stops renewing and deletes the lease.
pub struct LeaseGuard {
    task: tokio::task::JoinHandle<()>,
    loc: DatasetLocation,
    path: String,
}

impl LeaseGuard {
    /// Stop renewing and delete the lease (the job is finished).
    pub async fn release(self) {
        use object_store::ObjectStoreExt;
        self.task.abort();
        let _ = self.loc.store.delete(&self.loc.child(&self.path)).await;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.task.abort();
        let (loc, path) = (self.loc.clone(), self.path.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                use object_store::ObjectStoreExt;
                let _ = loc.store.delete(&loc.child(&path)).await;
            });
        }
    }
}

impl JobRecord {
    fn lease_path(run_id: &str) -> String {
        format!("{JOBS_DIR}/{run_id}.lease")
    }

    /// The lease of a process that may still be working on this job, if any.
    pub async fn holder(&self, loc: &DatasetLocation) -> Result<Option<Lease>, DatasetError> {
        live_lease(loc, &Self::lease_path(&self.run_id)).await
    }

    /// Claim the job: write its lease now and every [`LEASE_RENEW`] until the guard is dropped.
    pub async fn hold(&self, loc: &DatasetLocation) -> Result<LeaseGuard, DatasetError> {
        hold_lease(loc, Self::lease_path(&self.run_id)).await
    }
}

/// The lease at `path` (relative to the dataset root), if its holder may still be running.
pub(crate) async fn live_lease(
    loc: &DatasetLocation,
    path: &str,
) -> Result<Option<Lease>, DatasetError> {
    let lease: Option<Lease> = loc.get_json_opt(path).await?;
    Ok(lease.filter(Lease::live))
}

/// Write a lease at `path` now and every [`LEASE_RENEW`] until the guard is dropped.
pub(crate) async fn hold_lease(
    loc: &DatasetLocation,
    path: String,
) -> Result<LeaseGuard, DatasetError> {
    loc.put_json(&path, &Lease::now()).await?;
    Ok(renew_lease(loc, path, Lease::now()))
}

/// Keep renewing the lease at `path` (written already) until the guard is dropped.
fn renew_lease(loc: &DatasetLocation, path: String, lease: Lease) -> LeaseGuard {
    let (l, p) = (loc.clone(), path.clone());
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE_RENEW).await;
            let renewed = Lease {
                run: lease.run.clone(),
                ..Lease::now()
            };
            if let Err(e) = l.put_json(&p, &renewed).await {
                tracing::warn!(error = %e, "could not renew a lease");
            }
        }
    });
    LeaseGuard {
        task,
        loc: loc.clone(),
        path,
    }
}

/// Claim the lease at `path` only if no live process holds it: created with a conditional put
/// (create if absent), so of two processes that start at the same moment exactly one gets it;
/// a lease whose holder is gone is taken over. `Err(lease)`: the live holder's lease. On a store
/// without conditional puts the claim is a plain write (the check-then-write of before).
pub(crate) async fn claim_lease(
    loc: &DatasetLocation,
    path: String,
    run: &str,
) -> Result<Result<LeaseGuard, Lease>, DatasetError> {
    let mine = Lease {
        run: Some(run.to_string()),
        ..Lease::now()
    };
    for _ in 0..3 {
        if loc.put_json_if_absent(&path, &mine).await? {
            return Ok(Ok(renew_lease(loc, path, mine)));
        }
        match loc.get_json_opt::<Lease>(&path).await? {
            Some(l) if l.live() => return Ok(Err(l)),
            // Its holder is gone: take it over (the next conditional put decides between
            // processes that both saw it stale).
            Some(_) => loc.delete(&path).await,
            None => {}
        }
    }
    // Lost every round to other processes claiming it: one of them holds it now.
    match loc.get_json_opt::<Lease>(&path).await? {
        Some(l) => Ok(Err(l)),
        None => Ok(Err(mine)),
    }
}

/// FNV-1a, 64 bit: a stable (across runs and builds) name for a file URL.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobRecord {
        JobRecord::new(RunIds::new(), "http://h/fhir", ExportRequest::default())
    }

    fn file(url: &str) -> FileRecord {
        FileRecord {
            url: url.into(),
            kind: FileKind::Output,
            resource_type: Some("Patient".into()),
            state: FileState::Committing,
            parts: Vec::new(),
            stats: DecodeStats::default(),
            count: None,
            outcomes: BTreeMap::new(),
            refreshed_url: None,
        }
    }

    fn status() -> Url {
        Url::parse("http://h/status/1").unwrap()
    }

    #[test]
    fn a_job_goes_from_created_to_complete() {
        let mut j = job();
        assert_eq!(j.state, JobState::Created);
        j.kicked_off(&status()).unwrap();
        assert_eq!(j.state, JobState::KickedOff);
        // A partial manifest's file can be staged while polling.
        j.file_staged(file("http://h/1.ndjson")).unwrap();
        j.manifest_received("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(j.state, JobState::Downloading);
        j.file_staged(file("http://h/2.ndjson")).unwrap();
        j.file_committed("http://h/1.ndjson").unwrap();
        // Not every file committed yet.
        assert_eq!(j.completed().unwrap_err().event, "completed");
        j.file_committed("http://h/2.ndjson").unwrap();
        j.completed().unwrap();
        assert!(j.state.is_finished());
        assert!(j.failed().is_err(), "a complete job cannot fail");
    }

    #[test]
    fn impossible_events_are_refused() {
        let mut j = job();
        assert!(
            j.manifest_received("t").is_err(),
            "no manifest before kick-off"
        );
        assert!(j.file_staged(file("u")).is_err(), "no file before kick-off");
        assert!(j.completed().is_err());
        j.kicked_off(&status()).unwrap();
        assert!(j.kicked_off(&status()).is_err(), "kicked off twice");
        assert!(j.file_committed("never-staged").is_err());
        j.file_staged(file("u")).unwrap();
        j.file_committed("u").unwrap();
        assert!(
            j.file_staged(file("u")).is_err(),
            "a committed file is not staged again"
        );
        j.failed().unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert!(j.file_committed("u").is_err());
    }

    #[test]
    fn the_first_transaction_time_is_kept() {
        let mut j = job();
        j.kicked_off(&status()).unwrap();
        j.manifest_received("2026-01-01T00:00:00Z").unwrap();
        j.manifest_received("2026-02-02T00:00:00Z").unwrap();
        assert_eq!(j.transaction_time.as_deref(), Some("2026-01-01T00:00:00Z"));
    }

    #[test]
    fn resume_rolls_committing_files_forward_and_skips_every_known_url() {
        let mut j = job();
        assert_eq!(
            j.resume_plan().status_url,
            None,
            "never accepted: kick off again"
        );
        j.kicked_off(&status()).unwrap();
        j.manifest_received("t").unwrap();
        j.file_staged(file("a")).unwrap();
        j.file_committed("a").unwrap();
        j.file_staged(FileRecord {
            refreshed_url: Some("b2".into()),
            ..file("b")
        })
        .unwrap();
        let plan = j.resume_plan();
        assert_eq!(plan.status_url.as_deref(), Some("http://h/status/1"));
        assert_eq!(plan.roll_forward, ["b"]);
        let mut skip: Vec<_> = plan.skip.into_iter().collect();
        skip.sort();
        assert_eq!(skip, ["a", "b", "b2"]);
    }

    #[test]
    fn states_have_stable_names_and_old_records_read() {
        for (state, name) in [
            (JobState::Created, "created"),
            (JobState::KickedOff, "kicked-off"),
            (JobState::Downloading, "downloading"),
            (JobState::Complete, "complete"),
            (JobState::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), name);
        }
        assert_eq!(serde_json::to_value(FileKind::Deleted).unwrap(), "deleted");
        assert_eq!(
            serde_json::to_value(FileState::Committed).unwrap(),
            "committed"
        );
    }

    #[tokio::test]
    async fn files_are_stored_one_object_each_and_read_back() {
        let loc = DatasetLocation::resolve("memory://job-test/ds", false).unwrap();
        let mut j = job();
        j.kicked_off(&status()).unwrap();
        j.save(&loc).await.unwrap();
        for u in ["http://h/1", "http://h/2"] {
            j.file_staged(file(u)).unwrap();
            j.save_file(&loc, u).await.unwrap();
        }
        j.file_committed("http://h/1").unwrap();
        j.save_file(&loc, "http://h/1").await.unwrap();
        let back = JobRecord::latest_unfinished(&loc).await.unwrap().unwrap();
        assert_eq!(back, j);
        assert_eq!(JobRecord::list(&loc).await.unwrap().len(), 1);
        j.prune_files(&loc).await;
        let mut back = JobRecord::list(&loc).await.unwrap().pop().unwrap();
        back.load_files(&loc).await.unwrap();
        assert!(back.files.is_empty());
    }
}
