//! Client errors: what failed, where (method and redacted URL), and what the server said.

use serde::Deserialize;

/// The parts of an OperationOutcome a client reports.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct OperationOutcome {
    /// The issues.
    #[serde(default)]
    pub issue: Vec<OutcomeIssue>,
}

/// One OperationOutcome issue.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct OutcomeIssue {
    /// fatal | error | warning | information | success.
    #[serde(default)]
    pub severity: String,
    /// IssueType code (e.g. `transient`, `processing`).
    #[serde(default)]
    pub code: String,
    /// Free text.
    pub diagnostics: Option<String>,
    /// Coded or text details.
    pub details: Option<serde_json::Value>,
}

/// IssueType codes that mean "try again later" (R4 `transient` and its children).
pub const TRANSIENT_CODES: &[&str] = &[
    "transient",
    "lock-error",
    "no-store",
    "exception",
    "timeout",
    "incomplete",
    "throttled",
];

impl OperationOutcome {
    /// Parse a body as an OperationOutcome, if it is one.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        if v.get("resourceType")?.as_str()? != "OperationOutcome" {
            return None;
        }
        serde_json::from_value(v).ok()
    }

    /// Whether every issue is transient.
    pub fn is_transient(&self) -> bool {
        !self.issue.is_empty()
            && self
                .issue
                .iter()
                .all(|i| TRANSIENT_CODES.contains(&i.code.as_str()))
    }

    /// `severity code: diagnostics; …`
    pub fn summary(&self) -> String {
        self.issue
            .iter()
            .map(|i| {
                let text = i
                    .diagnostics
                    .clone()
                    .or_else(|| {
                        i.details
                            .as_ref()
                            .and_then(|d| d.get("text"))
                            .and_then(|t| t.as_str())
                            .map(String::from)
                    })
                    .unwrap_or_default();
                format!("{} {}: {}", i.severity, i.code, truncate(&text, 300))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// Errors of the export client.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be built (bad base URL, bad parameter).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The server answered with an error status.
    #[error("{method} {url}: HTTP {status}{}", detail.as_ref().map(|d| format!(" — {d}")).unwrap_or_default())]
    Status {
        /// HTTP method.
        method: &'static str,
        /// URL with query and credentials removed.
        url: String,
        /// Status code.
        status: u16,
        /// OperationOutcome summary or a truncated body.
        detail: Option<String>,
    },
    /// The export job failed on the server.
    #[error("export failed: {0}")]
    JobFailed(String),
    /// The network failed (after retries).
    #[error("{method} {url}: {source}")]
    Network {
        /// HTTP method.
        method: &'static str,
        /// Redacted URL.
        url: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// The server broke the protocol (no Content-Location, a manifest that does not parse, …).
    #[error("protocol error from {url}: {message}")]
    Protocol {
        /// Redacted URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// Authorization failed: discovery, the token request, or a key problem. The message names
    /// the cause (the server's `error` / `error_description`); it never contains a secret.
    #[error("authorization failed ({url}): {message}")]
    Auth {
        /// The token endpoint or discovery URL, redacted.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// `--timeout` expired.
    #[error("export did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection failed after a kick-off was sent, so the server may have started an export
    /// job whose status URL flatfhir never got. Not retried: each kick-off starts a job, and a
    /// server that runs one export per client (Epic) refuses the next kick-off while an orphan
    /// runs.
    #[error(
        "kick-off {method} {url}: {cause}; the server may have started an export job that \
         flatfhir cannot see (the kick-off is not sent again, so as not to start a second one); \
         if the next run's kick-off is refused, that job must finish or expire first"
    )]
    KickOffLost {
        /// HTTP method.
        method: &'static str,
        /// Redacted URL.
        url: String,
        /// What broke (the connection error, or the idle timeout).
        cause: String,
    },
    /// The server sent nothing for the idle timeout (no response headers, or no body bytes):
    /// the connection was dropped. Retryable for idempotent requests (every request but a POST
    /// kick-off, which must not be replayed blindly).
    #[error("{method} {url}: nothing received for {idle:?} (idle timeout); connection dropped")]
    Stalled {
        /// HTTP method.
        method: &'static str,
        /// Redacted URL.
        url: String,
        /// The idle timeout that expired.
        idle: std::time::Duration,
    },
}

impl ClientError {
    /// Whether retrying the same request may help (5xx, 429, 408, network errors).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            ClientError::Network { .. } => true,
            ClientError::Stalled { method, .. } => *method != "POST",
            _ => false,
        }
    }
}

/// A URL for messages: scheme, host, port and path only — credentials and the fragment are
/// dropped, and a query (signed URLs carry their signature there) is shown as `?…`, readably
/// rather than percent-encoded: `https://h/p?…`.
///
/// ```
/// let u = url::Url::parse("https://user:pw@h.example/f/1.ndjson?X-Amz-Signature=abc#t").unwrap();
/// assert_eq!(flatfhir::client::error_redact(&u), "https://h.example/f/1.ndjson?…");
/// ```
pub fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut shown = String::from(u);
    if had_query {
        shown.push_str("?…");
    }
    shown
}

/// [`redact`] for text that may not parse as a URL (a manifest entry, a `Location` header):
/// parsed ones are redacted as URLs; anything else loses its query, fragment and userinfo
/// textually, control characters are escaped and the result is cut at 200 characters.
pub fn redact_raw(raw: &str) -> String {
    if let Ok(u) = url::Url::parse(raw) {
        return redact(&u);
    }
    let (head, had_query) = match raw.find(['?', '#']) {
        Some(i) => (&raw[..i], raw[i..].starts_with('?')),
        None => (raw, false),
    };
    // Userinfo: `scheme://user:pw@host/...` → `scheme://host/...`.
    let head = match head.find("://") {
        Some(i) => {
            let rest = &head[i + 3..];
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{}{}", &head[..i + 3], &rest[at + 1..]),
                None => head.to_string(),
            }
        }
        None => head.to_string(),
    };
    let mut shown = String::with_capacity(head.len());
    for c in head.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    if shown.chars().count() > 200 {
        shown = format!("{}…", shown.chars().take(200).collect::<String>());
    }
    if had_query {
        shown.push_str("?…");
    }
    shown
}

/// A detail string from an error body: the OperationOutcome summary, or the start of the text.
pub fn body_detail(body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    if let Some(oo) = OperationOutcome::parse(body) {
        return Some(oo.summary());
    }
    let text = String::from_utf8_lossy(body);
    Some(truncate(text.trim(), 200))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_are_readable() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            redact(&u("https://h/p?X-Amz-Signature=abc&x=1")),
            "https://h/p?…"
        );
        assert_eq!(
            redact(&u("https://u:pw@h:8443/a/b#frag")),
            "https://h:8443/a/b"
        );
        assert_eq!(redact(&u("http://h/p?")), "http://h/p?…");
        assert_eq!(redact(&u("https://h/p")), "https://h/p");
        assert!(!redact(&u("https://h/p?sig=1")).contains("%E2"));
        // In a message, as users see it.
        let e = ClientError::Status {
            method: "GET",
            url: redact(&u("https://h/f/1.ndjson?sig=s3cr3t")),
            status: 403,
            detail: None,
        };
        assert_eq!(e.to_string(), "GET https://h/f/1.ndjson?…: HTTP 403");
    }

    #[test]
    fn raw_text_is_redacted_too() {
        assert_eq!(redact_raw("https://h/p?sig=1"), "https://h/p?…");
        assert_eq!(
            redact_raw("https://user:pw@bad host/p?sig=1#f"),
            "https://bad host/p?…"
        );
        assert_eq!(redact_raw("not a url\n#frag"), "not a url\\n");
        assert_eq!(redact_raw(&"x".repeat(300)).chars().count(), 201);
    }

    #[test]
    fn stalls_are_retried_except_for_post() {
        let stalled = |method| ClientError::Stalled {
            method,
            url: "https://h/p".into(),
            idle: std::time::Duration::from_secs(1),
        };
        assert!(stalled("GET").is_retryable());
        assert!(!stalled("POST").is_retryable());
    }
}
