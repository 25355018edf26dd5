//! Fault injection: the ways the server misbehaves on purpose, server-wide or per job.

use std::time::Duration;

/// Delay between body chunks for the per-request `slow` fault without a value.
const DEFAULT_SLOW_CHUNK: Duration = Duration::from_millis(50);
/// Delay of a `DELETE` for the `slow-delete` fault without a value, in milliseconds.
const DEFAULT_SLOW_DELETE_MS: u64 = 30_000;

/// How file downloads are redirected (the `redirect-file` fault).
///
/// The file URL answers a redirect, then each hop another one, `hops` in all, alternating `307`
/// and `302` (the first is `307`); same-origin hops use a relative `Location`. The last hop
/// leads to the server's storage origin (a second listener, like a signed object-store URL,
/// which never needs a token), or with `same_origin` to the file endpoint itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRedirect {
    /// Redirects before the body (at least 1).
    pub hops: u32,
    /// The last hop stays on the FHIR server's origin instead of going to the storage origin.
    pub same_origin: bool,
}

/// Faults to inject. `Faults::default()` injects none.
///
/// Set server-wide with [`ServerBuilder::with_faults`](super::ServerBuilder::with_faults); the
/// same faults can be chosen per export job with the `_flatfhirFault` kick-off parameter (see the
/// [module docs](super)). A job's faults are the server-wide ones combined with its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Answer this many kick-offs with `429` + `Retry-After` before accepting one.
    pub kickoff_429: u32,
    /// Answer every kick-off with `500` and a `processing` OperationOutcome.
    pub kickoff_500: bool,
    /// Answer this many status polls of each job with `500` and a `transient` OperationOutcome.
    pub status_transient: u32,
    /// Answer this many status polls of each job with `429` + `Retry-After`.
    pub status_429: u32,
    /// Fail the job: once it is done, polls answer `500` with a `processing` OperationOutcome.
    pub status_fatal: bool,
    /// Answer the first this-many requests for each file with `429` + `Retry-After` (a server
    /// that throttles downloads).
    pub file_429: u32,
    /// Cut every file's first download after about half its bytes (connection reset mid-body).
    pub cut_file_once: bool,
    /// Serve the first this-many downloads of each output file as only the first half of its
    /// lines, a complete body that ends at a line end (what a proxy that truncates a
    /// close-delimited body, or a server that lost part of a file, hands out): only the
    /// manifest's `count` tells.
    pub short_file: u32,
    /// Index of a file (the `n` of `{n}.ndjson`) that answers `410 Gone`. Manifests fetched after
    /// the `410` list a fresh URL for it, as a server that refreshes expired links would.
    pub file_gone: Option<usize>,
    /// Index of a file that answers `404` to every download while its job lives on, listed
    /// under the same URL by every manifest (a file lost from the server's storage).
    pub file_lost: Option<usize>,
    /// Index of a file that answers `200 text/html` with a login page to every download (an SSO
    /// gateway or a proxy's error page in front of the file server).
    pub file_html: Option<usize>,
    /// Index of a file that answers `200` with one OperationOutcome line (`application/fhir+json`)
    /// to every download instead of its resources (a server reporting an error in the file).
    pub file_outcome: Option<usize>,
    /// Delay between 8 KiB chunks of every file body.
    pub slow_chunk: Option<Duration>,
    /// Send `Retry-After` as an HTTP-date instead of delta-seconds.
    pub retry_after_http_date: bool,
    /// `Type/id` entries for a `deleted` file of DELETE transaction Bundles (one per line).
    pub deleted: Vec<String>,
    /// Put a `warning` OperationOutcome in the manifest's `error` file.
    pub outcome_warning: bool,
    /// Put a `fatal` OperationOutcome in the manifest's `error` file (the manifest is still `200`).
    pub outcome_fatal: bool,
    /// Leave `Content-Location` out of the kick-off `202`.
    pub missing_content_location: bool,
    /// Revoke the access token presented with a job's first file download and answer it `401`
    /// (as a server does whose tokens were revoked or expired early). SMART auth only.
    pub file_401: bool,
    /// Redirect every file download (Oracle Health/Cerner redirect every file to storage).
    pub redirect_file: Option<FileRedirect>,
    /// The first download of each file sends about half a line, then stalls: the connection
    /// stays open and sends nothing more (until the server shuts down).
    pub stall_file: bool,
    /// Never gzip file bodies, whatever `Accept-Encoding` says.
    pub no_gzip: bool,
    /// Answer `DELETE` of a job's status URL only after this delay (a server slow to cancel).
    pub slow_delete: Option<Duration>,
    /// Add one more Patient `output` file: a gzip bomb whose plain body is about
    /// this many bytes of one valid Patient line repeated (same `id` on every line), served
    /// gzip-encoded at about 290:1 when the client accepts gzip.
    pub gzip_bomb: Option<u64>,
    /// How many such bomb files (`gzip-bomb:MiB:N`; default 1): several at once test that a
    /// client's memory does not grow with the ratio times its download concurrency.
    pub gzip_bombs: usize,
    /// Bind only the first of repeated `_type` and `_elements` parameters and ignore the rest
    /// silently, as HAPI FHIR does (a comma-joined value still counts in full).
    pub first_value_only: bool,
    /// Leave out, silently, the requested types the access token's scopes do not cover (as
    /// SMART's reference server filters `_type` to the granted scopes), instead of refusing
    /// the kick-off with `403`.
    pub scope_filter: bool,
}

/// Faults of one kick-off request, plus the `paged` option that only exists per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RequestFaults {
    pub faults: Faults,
    pub files_per_page: Option<usize>,
}

impl RequestFaults {
    /// Parse `_flatfhirFault` values (each may be a comma list).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut out = Self::default();
        let f = &mut out.faults;
        for item in values.into_iter().flat_map(|v| v.split(',')) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (name, arg) = match item.split_once(':') {
                Some((n, a)) => (n, Some(a)),
                None => (item, None),
            };
            let number = |default: u64| -> Result<u64, String> {
                arg.map_or(Ok(default), |a| {
                    a.parse()
                        .map_err(|_| format!("fault {name}: {a:?} is not a number"))
                })
            };
            match name {
                "kickoff-429" => f.kickoff_429 = number(1)? as u32,
                "kickoff-500" => f.kickoff_500 = true,
                "status-transient" => f.status_transient = number(1)? as u32,
                "status-429" => f.status_429 = number(1)? as u32,
                "status-fatal" => f.status_fatal = true,
                "file-429" => f.file_429 = number(1)? as u32,
                "cut-file" => f.cut_file_once = true,
                "short-file" => f.short_file = number(1)? as u32,
                "file-gone" => f.file_gone = Some(number(0)? as usize),
                "file-lost" => f.file_lost = Some(number(0)? as usize),
                "file-html" => f.file_html = Some(number(0)? as usize),
                "file-outcome" => f.file_outcome = Some(number(0)? as usize),
                "slow" => {
                    f.slow_chunk = Some(match arg {
                        Some(_) => Duration::from_millis(number(0)?),
                        None => DEFAULT_SLOW_CHUNK,
                    })
                }
                "retry-after-date" => f.retry_after_http_date = true,
                "deleted" => match arg {
                    Some(r) if r.contains('/') => f.deleted.push(r.to_string()),
                    _ => {
                        return Err("fault deleted needs a Type/id, as in deleted:Patient/1".into());
                    }
                },
                "outcome-warning" => f.outcome_warning = true,
                "outcome-fatal" => f.outcome_fatal = true,
                "missing-content-location" => f.missing_content_location = true,
                "file-401" => f.file_401 = true,
                "redirect-file" => {
                    let mut r = FileRedirect {
                        hops: 1,
                        same_origin: false,
                    };
                    for part in arg.into_iter().flat_map(|a| a.split(':')) {
                        match part {
                            "same" => r.same_origin = true,
                            "other" => r.same_origin = false,
                            n => {
                                r.hops =
                                    n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                                        format!(
                                            "fault redirect-file: {n:?} is neither same, other nor \
                                         a number of hops"
                                        )
                                    })?
                            }
                        }
                    }
                    f.redirect_file = Some(r);
                }
                "stall-file" => f.stall_file = true,
                "no-gzip" => f.no_gzip = true,
                "slow-delete" => {
                    f.slow_delete = Some(Duration::from_millis(number(DEFAULT_SLOW_DELETE_MS)?))
                }
                "gzip-bomb" => {
                    let (size, count) = match arg.map(|a| a.split_once(':').unwrap_or((a, "1"))) {
                        Some((size, count)) => {
                            let n = |s: &str| {
                                s.parse::<u64>()
                                    .map_err(|_| format!("fault {name}: {s:?} is not a number"))
                            };
                            (n(size)?.saturating_mul(1 << 20), n(count)?.max(1) as usize)
                        }
                        None => (super::bomb::DEFAULT_BOMB_BYTES, 1),
                    };
                    f.gzip_bomb = Some(size);
                    f.gzip_bombs = count;
                }
                "first-value-only" => f.first_value_only = true,
                "scope-filter" => f.scope_filter = true,
                "paged" => out.files_per_page = Some(number(1)?.max(1) as usize),
                other => return Err(format!("unknown _flatfhirFault {other:?}")),
            }
        }
        Ok(out)
    }
}

impl Faults {
    /// These faults combined with a job's own: flags OR-ed, the larger count, the job's choice
    /// where both name a value, `deleted` entries from both.
    pub(super) fn combine(&self, job: &Faults) -> Faults {
        Faults {
            kickoff_429: self.kickoff_429.max(job.kickoff_429),
            kickoff_500: self.kickoff_500 || job.kickoff_500,
            status_transient: self.status_transient.max(job.status_transient),
            status_429: self.status_429.max(job.status_429),
            status_fatal: self.status_fatal || job.status_fatal,
            file_429: self.file_429.max(job.file_429),
            cut_file_once: self.cut_file_once || job.cut_file_once,
            short_file: self.short_file.max(job.short_file),
            file_gone: job.file_gone.or(self.file_gone),
            file_lost: job.file_lost.or(self.file_lost),
            file_html: job.file_html.or(self.file_html),
            file_outcome: job.file_outcome.or(self.file_outcome),
            slow_chunk: job.slow_chunk.or(self.slow_chunk),
            retry_after_http_date: self.retry_after_http_date || job.retry_after_http_date,
            deleted: self.deleted.iter().chain(&job.deleted).cloned().collect(),
            outcome_warning: self.outcome_warning || job.outcome_warning,
            outcome_fatal: self.outcome_fatal || job.outcome_fatal,
            missing_content_location: self.missing_content_location || job.missing_content_location,
            file_401: self.file_401 || job.file_401,
            redirect_file: job.redirect_file.or(self.redirect_file),
            stall_file: self.stall_file || job.stall_file,
            no_gzip: self.no_gzip || job.no_gzip,
            slow_delete: job.slow_delete.or(self.slow_delete),
            gzip_bomb: job.gzip_bomb.or(self.gzip_bomb),
            gzip_bombs: if job.gzip_bomb.is_some() {
                job.gzip_bombs
            } else {
                self.gzip_bombs
            },
            first_value_only: self.first_value_only || job.first_value_only,
            scope_filter: self.scope_filter || job.scope_filter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kebab_names_lists_and_arguments() {
        let r = RequestFaults::parse([
            "kickoff-429,status-transient:3",
            "deleted:Patient/1,deleted:Observation/o",
            "slow:5, paged:2",
            "file-gone",
        ])
        .unwrap();
        assert_eq!(r.faults.kickoff_429, 1);
        assert_eq!(r.faults.status_transient, 3);
        assert_eq!(r.faults.deleted, ["Patient/1", "Observation/o"]);
        assert_eq!(r.faults.slow_chunk, Some(Duration::from_millis(5)));
        assert_eq!(r.faults.file_gone, Some(0));
        assert_eq!(r.files_per_page, Some(2));
        assert!(RequestFaults::parse(["nope"]).is_err());
        assert!(RequestFaults::parse(["deleted"]).is_err());
        assert!(RequestFaults::parse(["status-429:x"]).is_err());
    }

    #[test]
    fn download_faults() {
        let f = |s: &str| RequestFaults::parse([s]).unwrap().faults;
        let other = |hops| {
            Some(FileRedirect {
                hops,
                same_origin: false,
            })
        };
        assert_eq!(f("redirect-file").redirect_file, other(1));
        assert_eq!(f("redirect-file:3").redirect_file, other(3));
        assert_eq!(
            f("redirect-file:same:2").redirect_file,
            Some(FileRedirect {
                hops: 2,
                same_origin: true
            })
        );
        assert!(RequestFaults::parse(["redirect-file:0"]).is_err());
        assert!(RequestFaults::parse(["redirect-file:elsewhere"]).is_err());
        assert!(f("stall-file,no-gzip").stall_file && f("no-gzip").no_gzip);
        assert!(f("first-value-only").first_value_only);
        assert!(f("scope-filter").scope_filter);
        assert_eq!(f("file-html:2").file_html, Some(2));
        assert_eq!(f("slow-delete").slow_delete, Some(Duration::from_secs(30)));
        assert_eq!(
            f("slow-delete:5").slow_delete,
            Some(Duration::from_millis(5))
        );
        assert_eq!((f("file-429").file_429, f("file-429:3").file_429), (1, 3));
        assert_eq!(f("gzip-bomb:2").gzip_bomb, Some(2 << 20));
        assert_eq!(f("gzip-bomb").gzip_bomb, Some(300 << 20));
        assert_eq!(f("gzip-bomb").gzip_bombs, 1);
        let four = f("gzip-bomb:2:4");
        assert_eq!((four.gzip_bomb, four.gzip_bombs), (Some(2 << 20), 4));
    }

    #[test]
    fn combine_keeps_both() {
        let server = Faults {
            status_429: 2,
            deleted: vec!["Patient/a".into()],
            ..Faults::default()
        };
        let job = Faults {
            status_429: 1,
            cut_file_once: true,
            deleted: vec!["Patient/b".into()],
            ..Faults::default()
        };
        let c = server.combine(&job);
        assert_eq!(c.status_429, 2);
        assert!(c.cut_file_once);
        assert_eq!(c.deleted, ["Patient/a", "Patient/b"]);
    }
}
