//! An export job: its state between kick-off and DELETE, its files and its manifest.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use url::Url;

use super::bomb::GzipBomb;
use super::faults::Faults;

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileKind {
    /// Resources of one type (`output`).
    Output,
    /// OperationOutcomes (`error`).
    Error,
    /// DELETE transaction Bundles (`deleted`).
    Deleted,
}

/// One file of a job: its lines, each without the newline — or a gzip bomb.
#[derive(Debug)]
pub(super) struct ExportFile {
    pub kind: FileKind,
    pub resource_type: String,
    pub lines: Vec<Bytes>,
    /// The `gzip-bomb` fault's file (then `lines` is empty).
    pub bomb: Option<Arc<GzipBomb>>,
}

impl ExportFile {
    /// A file of these lines.
    pub fn new(kind: FileKind, resource_type: String, lines: Vec<Bytes>) -> Self {
        ExportFile {
            kind,
            resource_type,
            lines,
            bomb: None,
        }
    }

    /// Resources in the file (the manifest's `count`).
    pub fn count(&self) -> u64 {
        match &self.bomb {
            Some(b) => b.lines,
            None => self.lines.len() as u64,
        }
    }

    /// The ndjson body: every line followed by `\n`.
    pub fn body(&self) -> Bytes {
        self.body_of(self.lines.len())
    }

    /// The body of the first `n` lines.
    pub fn body_of(&self, n: usize) -> Bytes {
        let lines = &self.lines[..n.min(self.lines.len())];
        let len = lines.iter().map(|l| l.len() + 1).sum();
        let mut out = BytesMut::with_capacity(len);
        for line in lines {
            out.put_slice(line);
            out.put_u8(b'\n');
        }
        out.freeze()
    }
}

/// Every file of a finished job, numbered by position (`{n}.ndjson`).
#[derive(Debug, Default)]
pub(super) struct JobOutput {
    pub files: Vec<ExportFile>,
}

/// Mutable per-job counters for faults.
#[derive(Debug, Default)]
pub(super) struct JobState {
    /// Status polls so far.
    pub polls: u32,
    /// `429` answers so far per file (for `file_429`).
    pub throttled: HashMap<usize, u32>,
    /// Files downloaded at least once (for `cut_file_once`).
    pub downloaded: HashSet<usize>,
    /// Short bodies served so far per file (for `short_file`).
    pub shortened: HashMap<usize, u32>,
    /// The `file_gone` file has answered `410`, so manifests now list a fresh URL.
    pub gone_served: bool,
    /// The `file_401` fault has fired.
    pub revoked: bool,
}

/// One accepted kick-off.
#[derive(Debug)]
pub(super) struct Job {
    pub id: String,
    pub started: Instant,
    pub transaction_time: DateTime<Utc>,
    /// The kick-off URL (for the manifest's `request`).
    pub request_url: String,
    pub requires_access_token: bool,
    pub faults: Faults,
    pub files_per_page: Option<usize>,
    /// STU3 `Prefer: separate-export-status`: polls answer `200` with the job's status in
    /// `X-Export-Status`.
    pub separate_status: bool,
    /// `allowPartialManifests=true`: once the files are built, `202` polls in the second half
    /// of the delay list the first half of the output files.
    pub allow_partial: bool,
    /// Set once the files are built (`Err` if building them panicked).
    pub output: OnceLock<Result<Arc<JobOutput>, String>>,
    state: Mutex<JobState>,
}

impl Job {
    /// A job started now.
    pub fn new(
        request_url: String,
        requires_access_token: bool,
        faults: Faults,
        files_per_page: Option<usize>,
    ) -> Self {
        Self {
            id: format!("{:032x}", rand::random::<u128>()),
            started: Instant::now(),
            transaction_time: Utc::now(),
            request_url,
            requires_access_token,
            faults,
            files_per_page,
            separate_status: false,
            allow_partial: false,
            output: OnceLock::new(),
            state: Mutex::new(JobState::default()),
        }
    }

    /// The fault counters (a poisoned lock only means a handler panicked; the data is fine).
    pub fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The URL of file `n`.
    pub fn file_url(&self, files_base: &Url, n: usize, fresh: bool) -> String {
        let mut url = files_base
            .join(&format!("$export-file/{}/{n}.ndjson", self.id))
            .map(String::from)
            .unwrap_or_default();
        if fresh {
            url.push_str("?fresh=1");
        }
        url
    }

    /// A partial manifest (STU3 `allowPartialManifests`): the first half of the output files,
    /// no `error`/`deleted` entries and no `link` (the final manifest lists everything).
    pub fn partial_manifest(&self, output: &JobOutput, files_base: &Url) -> Value {
        let outputs: Vec<Value> = output
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind == FileKind::Output)
            .map(|(n, f)| {
                json!({
                    "type": f.resource_type,
                    "url": self.file_url(files_base, n, false),
                    "count": f.count(),
                })
            })
            .collect();
        let half = outputs.len().div_ceil(2);
        json!({
            "transactionTime": self.transaction_time.to_rfc3339_opts(SecondsFormat::Millis, true),
            "request": self.request_url,
            "requiresAccessToken": self.requires_access_token,
            "output": &outputs[..half],
            "error": [],
        })
    }

    /// Manifest page `page` (1-based), or `None` past the last page.
    pub fn manifest(
        &self,
        output: &JobOutput,
        files_base: &Url,
        status_url: &Url,
        page: usize,
    ) -> Option<Value> {
        let gone_served = self.state().gone_served;
        let item = |n: usize, f: &ExportFile| {
            let fresh = gone_served && self.faults.file_gone == Some(n);
            json!({
                "type": f.resource_type,
                "url": self.file_url(files_base, n, fresh),
                "count": f.count(),
            })
        };
        let of_kind = |kind| {
            output
                .files
                .iter()
                .enumerate()
                .filter(move |(_, f)| f.kind == kind)
                .map(|(n, f)| item(n, f))
        };
        let outputs: Vec<Value> = of_kind(FileKind::Output).collect();
        let per_page = self.files_per_page.unwrap_or(usize::MAX).max(1);
        let pages = outputs.len().div_ceil(per_page).max(1);
        if page == 0 || page > pages {
            return None;
        }
        let first = page == 1;
        let mut manifest = json!({
            "transactionTime": self.transaction_time.to_rfc3339_opts(SecondsFormat::Millis, true),
            "request": self.request_url,
            "requiresAccessToken": self.requires_access_token,
            "output": outputs.chunks(per_page).nth(page - 1).unwrap_or_default(),
            "error": if first { of_kind(FileKind::Error).collect() } else { Vec::new() },
        });
        let deleted: Vec<Value> = of_kind(FileKind::Deleted).collect();
        if !deleted.is_empty() {
            manifest["deleted"] = Value::Array(if first { deleted } else { Vec::new() });
        }
        if page < pages {
            let mut next = status_url.clone();
            next.set_query(Some(&format!("page={}", page + 1)));
            manifest["link"] = json!([{ "relation": "next", "url": next.as_str() }]);
        }
        Some(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(kind: FileKind, t: &str, n: usize) -> ExportFile {
        ExportFile::new(kind, t.into(), vec![Bytes::from_static(b"{}"); n])
    }

    #[test]
    fn manifest_pages_link_to_the_next() {
        let job = Job::new(
            "http://h/fhir/$export".into(),
            false,
            Faults::default(),
            Some(2),
        );
        let output = JobOutput {
            files: vec![
                file(FileKind::Output, "A", 1),
                file(FileKind::Output, "B", 2),
                file(FileKind::Output, "C", 3),
                file(FileKind::Error, "OperationOutcome", 1),
            ],
        };
        let base = Url::parse("http://h/fhir/").unwrap();
        let status = base.join(&format!("$export-status/{}", job.id)).unwrap();
        let p1 = job.manifest(&output, &base, &status, 1).unwrap();
        assert_eq!(p1["output"].as_array().unwrap().len(), 2);
        assert_eq!(p1["error"][0]["count"], 1);
        assert!(p1["link"][0]["url"].as_str().unwrap().ends_with("?page=2"));
        let p2 = job.manifest(&output, &base, &status, 2).unwrap();
        assert_eq!(p2["output"][0]["url"], job.file_url(&base, 2, false));
        assert_eq!(p2["output"][0]["count"], 3);
        assert!(p2.get("link").is_none() && p2["error"].as_array().unwrap().is_empty());
        assert!(job.manifest(&output, &base, &status, 3).is_none());
        assert!(p1.get("deleted").is_none());
        assert_eq!(output.files[1].body(), "{}\n{}\n");
    }
}
