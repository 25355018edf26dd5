//! File downloads: `GET [files base]/$export-file/{job}/{n}.ndjson` and the storage origin's
//! `GET /storage/{job}/{n}.ndjson`, with gzip, `Range` and the download faults (429, cut, stall,
//! gone, slow, redirect, no-gzip, gzip bomb).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::watch;

use super::bomb::GzipBomb;
use super::faults::FileRedirect;
use super::job::{ExportFile, FileKind, Job};
use super::outcome::{Issue, Rejection};
use super::server::AppState;

/// Body chunk size when the `slow` fault is on.
const SLOW_CHUNK_BYTES: usize = 8 * 1024;
/// Body chunk size under a per-download rate ([`super::ServerBuilder::with_file_rate`]).
const PACED_CHUNK_BYTES: usize = 64 * 1024;
/// `application/fhir+ndjson`
const FHIR_NDJSON: &str = "application/fhir+ndjson";

/// Serve one file of a job (or, with the `redirect-file` fault, redirect to it).
pub(super) async fn download(
    State(state): State<Arc<AppState>>,
    Path((id, file)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some(job) = state.job(&id) else {
        return Rejection::not_found(format!("no export job {id:?} (never started, or deleted)"))
            .into_response();
    };
    if job.requires_access_token
        && let Some(resp) = state.file_rejection(&headers)
    {
        return resp;
    }
    if job.faults.file_401 && !std::mem::replace(&mut job.state().revoked, true) {
        return state.revoke_token(&headers);
    }
    let (n, output) = match file_of(&job, &file) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    let query = |name: &str| {
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    if job.faults.file_429 > 0 {
        let throttle = {
            let mut s = job.state();
            let n429 = s.throttled.entry(n).or_default();
            *n429 += 1;
            *n429 <= job.faults.file_429
        };
        if throttle {
            let mut resp = Issue::error("throttled", "too many downloads (fault file-429)")
                .response(StatusCode::TOO_MANY_REQUESTS);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, state.retry_after(&job.faults));
            return resp;
        }
    }
    let fresh = query("fresh").is_some_and(|v| v == "1");
    if job.faults.file_gone == Some(n) && !fresh {
        job.state().gone_served = true;
        return Issue::error(
            "not-found",
            format!("file {n} has expired (fault file-gone)"),
        )
        .response(StatusCode::GONE);
    }
    if job.faults.file_lost == Some(n) {
        return Issue::error("not-found", format!("file {n} is lost (fault file-lost)"))
            .response(StatusCode::NOT_FOUND);
    }
    if job.faults.file_html == Some(n) {
        let page = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n\
                    <body><form action=\"/login\">Please sign in</form></body></html>\n";
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response();
    }
    if job.faults.file_outcome == Some(n) {
        let outcome = serde_json::json!({"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "exception",
            "diagnostics": "the file could not be generated (fault file-outcome)"}]});
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            format!("{outcome}\n"),
        )
            .into_response();
    }
    let hop: u32 = query("hop").and_then(|h| h.parse().ok()).unwrap_or(0);
    if let Some(redirect) = job.faults.redirect_file
        && hop < redirect.hops
    {
        return redirect_to(&state, &job, n, &uri, hop, redirect);
    }
    serve(&state, &job, n, &output.files[n], &headers).await
}

/// The storage origin's copy of a file: what a signed object-store URL serves. No token is
/// needed (the `sig` query stands for the signature); the request log records whether one was
/// sent anyway.
pub(super) async fn storage(
    State(state): State<Arc<AppState>>,
    Path((id, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(job) = state.job(&id) else {
        return Rejection::not_found(format!("no export job {id:?} (never started, or deleted)"))
            .into_response();
    };
    let (n, output) = match file_of(&job, &file) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    serve(&state, &job, n, &output.files[n], &headers).await
}

/// File `{n}.ndjson` of a finished job: its index and the job's output.
#[allow(clippy::result_large_err)] // the error is the response to send
fn file_of(job: &Job, file: &str) -> Result<(usize, Arc<super::job::JobOutput>), Response> {
    let Some(Ok(output)) = job.output.get() else {
        return Err(
            Rejection::not_found(format!("export {} has no files yet", job.id)).into_response(),
        );
    };
    match file
        .strip_suffix(".ndjson")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < output.files.len())
    {
        Some(n) => Ok((n, output.clone())),
        None => Err(
            Rejection::not_found(format!("export {} has no file {file:?}", job.id)).into_response(),
        ),
    }
}

/// The `redirect-file` fault: hop `hop` of `redirect.hops`. Same-origin hops point back at this
/// endpoint with a relative `Location` (`{n}.ndjson?…&hop=N`); the last one goes to the storage
/// origin unless `same_origin`.
fn redirect_to(
    state: &AppState,
    job: &Job,
    n: usize,
    uri: &Uri,
    hop: u32,
    redirect: FileRedirect,
) -> Response {
    let status = if hop.is_multiple_of(2) {
        StatusCode::TEMPORARY_REDIRECT
    } else {
        StatusCode::FOUND
    };
    let next = hop + 1;
    let location = if next < redirect.hops || redirect.same_origin {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            if k != "hop" {
                query.append_pair(&k, &v);
            }
        }
        query.append_pair("hop", &next.to_string());
        format!("{n}.ndjson?{}", query.finish())
    } else {
        state.storage_file_url(&job.id, n)
    };
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            let mut resp = status.into_response();
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(e) => Issue::error("exception", format!("redirect location: {e}"))
            .response(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// The body of file `n`: gzip when accepted (unless `no-gzip`), `Range` → `206` from the
/// identity encoding, and the first-download faults (stall wins over cut).
async fn serve(
    state: &AppState,
    job: &Job,
    n: usize,
    export_file: &ExportFile,
    headers: &HeaderMap,
) -> Response {
    let first_download = job.state().downloaded.insert(n);
    let faults = &job.faults;
    let ending = if faults.stall_file && first_download {
        // About half of the first line, then nothing.
        let first_line = export_file
            .lines
            .first()
            .map_or(usize::MAX, |l| l.len() + 1);
        Ending::Stall(first_line / 2, state.shutdown_signal())
    } else if faults.cut_file_once && first_download {
        Ending::Cut
    } else {
        Ending::Whole
    };
    let gzip_ok = accepts_gzip(headers) && !faults.no_gzip;
    let pace = match (faults.slow_chunk, state.config.file_rate) {
        (Some(delay), _) => Pace::Delay(delay),
        (None, Some(rate)) => Pace::Rate(rate),
        (None, None) => Pace::Free,
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let resp = Response::builder()
        .header(header::CONTENT_TYPE, FHIR_NDJSON)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::VARY, "accept-encoding");
    if let Some(bomb) = &export_file.bomb {
        return serve_bomb(resp, bomb, range, gzip_ok, ending, pace);
    }

    let short = export_file.kind == FileKind::Output && {
        let mut state = job.state();
        let served = state.shortened.entry(n).or_default();
        let short = *served < faults.short_file;
        *served += u32::from(short);
        short
    };
    let body = if short {
        export_file.body_of(export_file.lines.len() / 2)
    } else {
        export_file.body()
    };
    let total = body.len();
    let mut resp = resp;
    // A range request is answered from the identity encoding, so offsets are plain ndjson bytes.
    let data = match range {
        Some(range) => match parse_range(range, total) {
            Some(Ok((start, end))) => {
                resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{total}", end - 1),
                );
                body.slice(start..end)
            }
            Some(Err(())) => return unsatisfiable(range, total as u64),
            None => body,
        },
        None if gzip_ok => {
            resp = resp.header(header::CONTENT_ENCODING, "gzip");
            match tokio::task::spawn_blocking(move || gzip(&body)).await {
                Ok(gz) => gz,
                Err(e) => {
                    return Issue::error("exception", format!("compressing failed: {e}"))
                        .response(StatusCode::INTERNAL_SERVER_ERROR);
                }
            }
        }
        None => body,
    };
    resp.header(header::CONTENT_LENGTH, data.len())
        .body(body_of(data, ending, pace))
        .unwrap_or_else(|e| {
            Issue::error("exception", e.to_string()).response(StatusCode::INTERNAL_SERVER_ERROR)
        })
}

/// The gzip bomb: its gzip encoding when accepted (with the body faults), else plain bytes
/// from the generator (whole, or a `Range`).
fn serve_bomb(
    mut resp: axum::http::response::Builder,
    bomb: &GzipBomb,
    range: Option<&str>,
    gzip_ok: bool,
    ending: Ending,
    pace: Pace,
) -> Response {
    let total = bomb.plain_len();
    let built = match range.map(|r| (r, parse_range(r, total as usize))) {
        Some((_, Some(Ok((start, end))))) => resp
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", end - 1),
            )
            .header(header::CONTENT_LENGTH, end - start)
            .body(Body::from_stream(bomb.plain(start as u64, end as u64))),
        Some((r, Some(Err(())))) => return unsatisfiable(r, total),
        _ if gzip_ok => {
            resp = resp.header(header::CONTENT_ENCODING, "gzip");
            resp.header(header::CONTENT_LENGTH, bomb.gzip.len())
                .body(body_of(bomb.gzip.clone(), ending, pace))
        }
        _ => resp
            .header(header::CONTENT_LENGTH, total)
            .body(Body::from_stream(bomb.plain(0, total))),
    };
    built.unwrap_or_else(|e| {
        Issue::error("exception", e.to_string()).response(StatusCode::INTERNAL_SERVER_ERROR)
    })
}

fn unsatisfiable(range: &str, total: u64) -> Response {
    let mut r = Issue::error("invalid", format!("range {range:?} outside 0..{total}"))
        .response(StatusCode::RANGE_NOT_SATISFIABLE);
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

/// `bytes=N-`, `bytes=N-M` or `bytes=-N` → `Some(Ok(start..end))`; unsatisfiable →
/// `Some(Err)`; anything else (several ranges, other units, garbage) → `None`, i.e. ignore it
/// and send the whole file, as RFC 9110 allows.
fn parse_range(range: &str, total: usize) -> Option<Result<(usize, usize), ()>> {
    let spec = range.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: usize = suffix.parse().ok()?;
            (total.saturating_sub(n), total)
        }
        (s, "") => (s.parse().ok()?, total),
        (s, e) => {
            let (s, e): (usize, usize) = (s.parse().ok()?, e.parse().ok()?);
            if e < s {
                return None;
            }
            (s, e.saturating_add(1).min(total))
        }
    };
    Some(if start < end {
        Ok((start, end))
    } else {
        Err(())
    })
}

/// `Accept-Encoding` lists `gzip` (or `x-gzip`) without `q=0`.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip")) && !refused
        })
}

fn gzip(data: &[u8]) -> Bytes {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(data);
    Bytes::from(gz.finish().unwrap_or_default())
}

/// How a response body ends.
enum Ending {
    /// All of it.
    Whole,
    /// Cut with a connection error after about half of its bytes (`cut-file`).
    Cut,
    /// After this many bytes (at most half the body), nothing more until the server shuts down
    /// (`stall-file`); the connection stays open.
    Stall(usize, watch::Receiver<bool>),
}

/// How fast a response body is sent.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// As fast as the connection takes it.
    Free,
    /// 8 KiB chunks with this delay between them (the `slow` fault).
    Delay(Duration),
    /// At most this many bytes per second (the server's per-download rate).
    Rate(u64),
}

/// The response body: whole, or in chunks at a pace ([`Pace`]), cut off with a connection
/// error (`cut-file`) or stalled (`stall-file`). With `Content-Length` set, hyper closes the
/// connection when the stream fails, so the client sees a short body and an error.
fn body_of(data: Bytes, ending: Ending, pace: Pace) -> Body {
    if matches!(ending, Ending::Whole) && matches!(pace, Pace::Free) {
        return Body::from(data);
    }
    let limit = match &ending {
        Ending::Whole => data.len(),
        Ending::Cut => data.len() / 2,
        Ending::Stall(at, _) => (*at).min(data.len() / 2),
    };
    let chunk = match pace {
        Pace::Free => limit.max(1),
        Pace::Delay(_) => SLOW_CHUNK_BYTES,
        Pace::Rate(_) => PACED_CHUNK_BYTES,
    };
    let started = tokio::time::Instant::now();
    let ending = Arc::new(ending);
    let stream = futures::stream::unfold(Some(0usize), move |pos| {
        let (data, ending) = (data.clone(), ending.clone());
        async move {
            let pos = pos?;
            if pos >= limit {
                let cut = match &*ending {
                    Ending::Whole => return None,
                    Ending::Cut => {
                        // Let the first half reach the client before the connection drops.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        "download cut on purpose (fault cut-file)"
                    }
                    Ending::Stall(_, shutdown) => {
                        let mut shutdown = shutdown.clone();
                        let _ = shutdown.wait_for(|stop| *stop).await;
                        "stalled download ended by the server's shutdown (fault stall-file)"
                    }
                };
                let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, cut);
                return Some((Err(cut), None));
            }
            match pace {
                Pace::Delay(delay) if pos > 0 => tokio::time::sleep(delay).await,
                Pace::Rate(rate) => {
                    // Not before the bytes sent so far are due at `rate`.
                    let due = Duration::from_secs_f64(pos as f64 / rate.max(1) as f64);
                    tokio::time::sleep_until(started + due).await;
                }
                _ => {}
            }
            let end = (pos + chunk).min(limit);
            Some((Ok(data.slice(pos..end)), Some(end)))
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=5-", 10), Some(Ok((5, 10))));
        assert_eq!(parse_range("bytes=2-3", 10), Some(Ok((2, 4))));
        assert_eq!(parse_range("bytes=-4", 10), Some(Ok((6, 10))));
        assert_eq!(parse_range("bytes=2-100", 10), Some(Ok((2, 10))));
        assert_eq!(parse_range("bytes=10-", 10), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,3-4", 10), None);
        assert_eq!(parse_range("items=1-", 10), None);
    }

    #[test]
    fn gzip_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("deflate, gzip;q=0.5"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
    }
}
