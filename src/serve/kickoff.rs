//! Kick-off: `GET|POST [base]/$export`, `Patient/$export`, `Group/{id}/$export`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::auth;
use super::job::Job;
use super::outcome::{FHIR_JSON, Issue, Rejection};
use super::request::{ExportRequest, Level};
use super::select;
use super::server::{AppState, lock};

/// `[base]/$export`
pub(super) async fn system(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kickoff(state, Level::System, method, uri, headers, body).await
}

/// `[base]/Patient/$export`
pub(super) async fn patient(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kickoff(state, Level::Patient, method, uri, headers, body).await
}

/// `[base]/Group/{id}/$export`
pub(super) async fn group(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kickoff(state, Level::Group(id), method, uri, headers, body).await
}

#[tracing::instrument(skip_all, fields(level = ?level))]
async fn kickoff(
    state: Arc<AppState>,
    level: Level,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let grant = match state.authorize(&headers) {
        Ok(g) => g,
        Err(resp) => return resp,
    };
    let post = method == Method::POST;
    let (mut request, lenient) = match parse(&state, &level, post, &uri, &headers, &body) {
        Ok(parsed) => parsed,
        Err(rejection) => return rejection.into_response(),
    };
    if let Some(grant) = &grant {
        let mut types: Vec<String> = match &request.types {
            Some(t) => t.iter().cloned().collect(),
            None => state.data.counts().into_keys().collect(),
        };
        if matches!(level, Level::Group(_)) {
            types.push("Group".into());
        }
        let filter = state.config.faults.scope_filter || request.faults.faults.scope_filter;
        if filter {
            let group = matches!(level, Level::Group(_)).then(|| "Group".to_string());
            let granted: BTreeSet<String> = types
                .iter()
                .filter(|t| Some(*t) != group.as_ref() && auth::covers_read(&grant.scopes, t))
                .cloned()
                .collect();
            if !granted.is_empty() {
                types.retain(|t| granted.contains(t) || Some(t) == group.as_ref());
                request.types = Some(granted);
            }
        }
        if let Some(t) = types.iter().find(|t| !auth::covers_read(&grant.scopes, t)) {
            return Issue::error(
                "forbidden",
                format!(
                    "the access token's scopes ({}) do not allow reading {t}",
                    grant.scopes.join(" ")
                ),
            )
            .response(StatusCode::FORBIDDEN);
        }
    }
    let faults = state.config.faults.combine(&request.faults.faults);

    if faults.kickoff_500 {
        return Issue::error("processing", "export failed to start (fault kickoff-500)")
            .response(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let throttled = {
        let mut counters = lock(&state.kickoffs);
        counters.total += 1;
        let server_wide = counters.total <= state.config.faults.kickoff_429;
        let per_request = request.faults.faults.kickoff_429;
        server_wide
            || per_request > 0 && {
                let fingerprint = format!("{method} {uri} {}", String::from_utf8_lossy(&body));
                let seen = counters.by_request.entry(fingerprint).or_default();
                *seen += 1;
                *seen <= per_request
            }
    };
    if throttled {
        let mut resp = Issue::error(
            "throttled",
            "too many exports; retry later (fault kickoff-429)",
        )
        .response(StatusCode::TOO_MANY_REQUESTS);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, state.retry_after(&faults));
        return resp;
    }

    let request_url = state
        .base_url
        .join(&uri.to_string())
        .map_or_else(|_| uri.to_string(), String::from);
    let files_per_page = request
        .faults
        .files_per_page
        .or(state.config.files_per_page);
    let separate_status = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .any(|t| t.trim() == "separate-export-status");
    let mut job = Job::new(
        request_url,
        state.requires_access_token(),
        faults.clone(),
        files_per_page,
    );
    job.separate_status = separate_status;
    job.allow_partial = request.allow_partial;
    let job = Arc::new(job);
    lock(&state.jobs).insert(job.id.clone(), job.clone());
    tracing::debug!(job = %job.id, lenient, "Accepted an export.");

    let (s, j) = (state.clone(), job.clone());
    tokio::spawn(async move {
        let job = j.clone();
        let built = tokio::task::spawn_blocking(move || {
            select::build(&s.data, &request, &j.faults, s.config.resources_per_file)
        })
        .await;
        let result = built
            .map(Arc::new)
            .map_err(|e| format!("building the export failed: {e}"));
        let _ = job.output.set(result);
    });

    let mut resp =
        Issue::info(format!("export {} accepted", job.id)).response(StatusCode::ACCEPTED);
    if !faults.missing_content_location {
        let status_url = state
            .base_url
            .join(&format!("$export-status/{}", job.id))
            .map(String::from)
            .unwrap_or_default();
        if let Ok(v) = HeaderValue::from_str(&status_url) {
            resp.headers_mut().insert(header::CONTENT_LOCATION, v);
        }
    }
    if separate_status {
        resp.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("separate-export-status"),
        );
    }
    resp
}

/// Headers and parameters of a kick-off; returns the request and whether it was lenient.
fn parse(
    state: &AppState,
    level: &Level,
    post: bool,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(ExportRequest, bool), Rejection> {
    let header = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",")
    };
    let accept = header(header::ACCEPT);
    let accepts_fhir_json = accept
        .split(',')
        .any(|m| m.split(';').next().is_some_and(|m| m.trim() == FHIR_JSON));
    if !accepts_fhir_json {
        return Err(Rejection::invalid(format!(
            "kick-off needs Accept: {FHIR_JSON} (got {accept:?})"
        )));
    }
    let prefer = header(header::HeaderName::from_static("prefer"));
    let tokens: Vec<&str> = prefer.split([',', ';']).map(str::trim).collect();
    if !tokens.contains(&"respond-async") {
        return Err(Rejection::invalid(format!(
            "kick-off needs Prefer: respond-async (got {prefer:?})"
        )));
    }
    let lenient = tokens.contains(&"handling=lenient");

    let mut params: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    if post && !body.iter().all(u8::is_ascii_whitespace) {
        let content_type = header(header::CONTENT_TYPE);
        let media = content_type.split(';').next().unwrap_or("").trim();
        if media != FHIR_JSON && media != "application/json" {
            return Err(Rejection::invalid(format!(
                "a POST kick-off body must be Content-Type: {FHIR_JSON} (got {content_type:?})"
            )));
        }
        params.extend(parameters_body(body)?);
    }
    let request = ExportRequest::parse(
        level,
        &params,
        post,
        lenient,
        state.config.faults.first_value_only,
        &state.data,
    )?;
    Ok((request, lenient))
}

/// `(name, value)` pairs of a FHIR `Parameters` body; any `value[x]` is taken as text.
fn parameters_body(body: &[u8]) -> Result<Vec<(String, String)>, Rejection> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Rejection::invalid(format!("the POST body is not JSON: {e}")))?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(Rejection::invalid(
            "the POST body must be a FHIR Parameters resource",
        ));
    }
    let mut out = Vec::new();
    for p in value
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| Rejection::invalid("every Parameters.parameter needs a name"))?;
        let text = p
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.starts_with("value")))
            .and_then(|(_, v)| match v {
                Value::String(s) => Some(s.clone()),
                Value::Bool(_) | Value::Number(_) => Some(v.to_string()),
                Value::Object(o) => ["reference", "code", "value"]
                    .iter()
                    .find_map(|k| o.get(*k).and_then(Value::as_str))
                    .map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| {
                Rejection::invalid(format!("parameter {name} has no usable value[x]"))
            })?;
        out.push((name.to_string(), text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_body_takes_any_value_type() {
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_type","valueString":"Patient"},
            {"name":"_since","valueInstant":"2020-01-01T00:00:00Z"},
            {"name":"patient","valueReference":{"reference":"Patient/1"}},
            {"name":"includeAssociatedData","valueCoding":{"code":"LatestProvenanceResources"}},
            {"name":"allowPartialManifests","valueBoolean":true}]}"#;
        let p = parameters_body(body).unwrap();
        assert_eq!(p[2], ("patient".into(), "Patient/1".into()));
        assert_eq!(p[3].1, "LatestProvenanceResources");
        assert_eq!(p[4].1, "true");
        assert!(parameters_body(br#"{"resourceType":"Patient"}"#).is_err());
        assert!(
            parameters_body(br#"{"resourceType":"Parameters","parameter":[{"name":"x"}]}"#)
                .is_err()
        );
    }
}
