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
}

impl ClientError {
    /// Whether retrying the same request may help (5xx, 429, 408, network errors).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            ClientError::Network { .. } => true,
            _ => false,
        }
    }
}

/// A URL for messages: scheme, host, port and path only (no query, no credentials).
pub fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        u.set_query(Some("…"));
    }
    u.to_string()
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
