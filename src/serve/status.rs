//! Status: `GET [base]/$export-status/{job}[?page=N]` and `DELETE` of the same URL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::outcome::{Issue, Rejection};
use super::server::{AppState, lock};

/// How long files stay available after a manifest is served (the `Expires` header).
const FILES_EXPIRE_AFTER: Duration = Duration::from_secs(3600);

/// Poll a job: faults first, then `202` until the delay has passed, then the manifest.
/// Longest a status request waits for the files of a job without delay to be built.
const BUILD_WAIT: Duration = Duration::from_secs(10);

pub(super) async fn poll(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = state.bearer_rejection(&headers) {
        return resp;
    }
    let Some(job) = state.job(&id) else {
        return Rejection::not_found(format!("no export job {id:?} (never started, or deleted)"))
            .into_response();
    };
    let page = match page_of(&uri) {
        Ok(page) => page,
        Err(rejection) => return rejection.into_response(),
    };
    let faults = &job.faults;
    let polls = {
        let mut s = job.state();
        s.polls += 1;
        s.polls
    };
    if polls <= faults.status_429 {
        let mut resp = Issue::error("throttled", "polling too fast (fault status-429)")
            .response(StatusCode::TOO_MANY_REQUESTS);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, state.retry_after(faults));
        return resp;
    }
    if polls <= faults.status_429 + faults.status_transient {
        return Issue::error(
            "transient",
            "status temporarily unavailable (fault status-transient)",
        )
        .response(StatusCode::INTERNAL_SERVER_ERROR);
    }

    if state.config.delay.is_zero() {
        // No "in progress" phase was asked for: answer once the files are built (milliseconds)
        // instead of `202` and a `Retry-After` second the client would honour.
        let until = tokio::time::Instant::now() + BUILD_WAIT;
        while job.output.get().is_none() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let resp = job_status(&state, &job, &uri, &id, page);
    if job.separate_status {
        separate(resp)
    } else {
        resp
    }
}

/// STU3 `separate-export-status`: the poll itself succeeded (`200`); the job's status goes into
/// `X-Export-Status` (`202 Accepted`, `200 OK`, or the failure) and its body stays as it was.
fn separate(mut resp: Response) -> Response {
    let status = resp.status();
    let text = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if let Ok(v) = HeaderValue::from_str(text.trim()) {
        resp.headers_mut().insert("x-export-status", v);
    }
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// The job's own status: `202` while working, the manifest, or its failure.
fn job_status(
    state: &AppState,
    job: &super::job::Job,
    uri: &Uri,
    id: &str,
    page: usize,
) -> Response {
    let faults = &job.faults;
    let elapsed = job.started.elapsed();
    let delay = state.config.delay;
    let output = match job.output.get() {
        Some(output) if elapsed >= delay => output,
        _ => {
            let percent = (elapsed.as_millis() * 100)
                .checked_div(delay.as_millis())
                .unwrap_or(99)
                .min(99);
            let partial = match job.output.get() {
                Some(Ok(output)) if job.allow_partial && elapsed >= delay / 2 => {
                    Some(job.partial_manifest(output, &state.files_base_url))
                }
                _ => None,
            };
            let mut resp = match partial {
                Some(m) => (StatusCode::ACCEPTED, axum::Json(m)).into_response(),
                None => StatusCode::ACCEPTED.into_response(),
            };
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("{percent}% complete")) {
                h.insert("x-progress", v);
            }
            h.insert(header::RETRY_AFTER, state.retry_after(faults));
            return resp;
        }
    };
    let output = match output {
        Ok(output) if !faults.status_fatal => output,
        Ok(_) => {
            return Issue::error("processing", "the export failed (fault status-fatal)")
                .response(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Err(message) => {
            return Issue::error("processing", message.clone())
                .response(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    let mut status_url = state.base_url.clone();
    status_url.set_path(uri.path());
    let Some(manifest) = job.manifest(output, &state.files_base_url, &status_url, page) else {
        return Rejection::not_found(format!("export {id} has no manifest page {page}"))
            .into_response();
    };
    let mut resp = axum::Json(manifest).into_response();
    let expires = httpdate::fmt_http_date(SystemTime::now() + FILES_EXPIRE_AFTER);
    if let Ok(v) = HeaderValue::from_str(&expires) {
        resp.headers_mut().insert(header::EXPIRES, v);
    }
    resp
}

/// `?page=N` (1-based; absent = 1).
fn page_of(uri: &Uri) -> Result<usize, Rejection> {
    let query = uri.query().unwrap_or("");
    match url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "page") {
        None => Ok(1),
        Some((_, v)) => v
            .parse()
            .map_err(|_| Rejection::invalid(format!("page {v:?} is not a number"))),
    }
}

/// Cancel a job or release its files: `202`, after which the job and its files are `404`.
pub(super) async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = state.bearer_rejection(&headers) {
        return resp;
    }
    let delay = lock(&state.jobs)
        .get(&id)
        .and_then(|j| j.faults.slow_delete);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    match lock(&state.jobs).remove(&id) {
        Some(_) => Issue::info(format!("export {id} deleted")).response(StatusCode::ACCEPTED),
        None => Rejection::not_found(format!("no export job {id:?}")).into_response(),
    }
}
