//! File downloads: `GET [files base]/$export-file/{job}/{n}.ndjson`, with gzip, `Range` and the
//! download faults (cut, gone, slow).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::outcome::{Issue, Rejection};
use super::server::AppState;

/// Body chunk size when the `slow` fault is on.
const SLOW_CHUNK_BYTES: usize = 8 * 1024;
/// `application/fhir+ndjson`
const FHIR_NDJSON: &str = "application/fhir+ndjson";

/// Serve one file of a job.
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
    let n = file
        .strip_suffix(".ndjson")
        .and_then(|n| n.parse::<usize>().ok());
    let Some(Ok(output)) = job.output.get() else {
        return Rejection::not_found(format!("export {id} has no files yet")).into_response();
    };
    let Some((n, export_file)) = n.and_then(|n| Some((n, output.files.get(n)?))) else {
        return Rejection::not_found(format!("export {id} has no file {file:?}")).into_response();
    };
    let fresh = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "fresh=1"));
    if job.faults.file_gone == Some(n) && !fresh {
        job.state().gone_served = true;
        return Issue::error(
            "not-found",
            format!("file {n} has expired (fault file-gone)"),
        )
        .response(StatusCode::GONE);
    }
    let first_download = job.state().downloaded.insert(n);
    let cut = job.faults.cut_file_once && first_download;

    let body = export_file.body();
    let total = body.len();
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, FHIR_NDJSON)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::VARY, "accept-encoding");
    // A range request is answered from the identity encoding, so offsets are plain ndjson bytes.
    let data = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(range) => match parse_range(range, total) {
            Some(Ok((start, end))) => {
                resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{total}", end - 1),
                );
                body.slice(start..end)
            }
            Some(Err(())) => {
                let mut r = Issue::error("invalid", format!("range {range:?} outside 0..{total}"))
                    .response(StatusCode::RANGE_NOT_SATISFIABLE);
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
            None => body,
        },
        None if accepts_gzip(&headers) => {
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
    let cut_at = cut.then_some(data.len() / 2);
    resp.header(header::CONTENT_LENGTH, data.len())
        .body(body_of(data, cut_at, job.faults.slow_chunk))
        .unwrap_or_else(|e| {
            Issue::error("exception", e.to_string()).response(StatusCode::INTERNAL_SERVER_ERROR)
        })
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

/// The response body: whole, or in 8 KiB chunks with a delay (`slow`), and cut off with a
/// connection error after `cut_at` bytes (`cut_file_once`). With `Content-Length` set, hyper
/// closes the connection when the stream fails, so the client sees a short body and an error.
fn body_of(data: Bytes, cut_at: Option<usize>, slow: Option<Duration>) -> Body {
    if cut_at.is_none() && slow.is_none() {
        return Body::from(data);
    }
    let limit = cut_at.unwrap_or(data.len());
    let chunk = if slow.is_some() {
        SLOW_CHUNK_BYTES
    } else {
        limit.max(1)
    };
    let stream = futures::stream::unfold(Some(0usize), move |pos| {
        let data = data.clone();
        async move {
            let pos = pos?;
            if pos >= limit {
                cut_at?;
                // Let the first half reach the client before the connection drops.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let cut = std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "download cut on purpose (fault cut-file)",
                );
                return Some((Err(cut), None));
            }
            if pos > 0
                && let Some(delay) = slow
            {
                tokio::time::sleep(delay).await;
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
