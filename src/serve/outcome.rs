//! OperationOutcome bodies: every error response, and the lines of `error` files.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// `application/fhir+json`, the type of every FHIR JSON body.
pub(super) const FHIR_JSON: &str = "application/fhir+json";

/// One issue: severity (`fatal|error|warning|information`), IssueType code, diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Issue {
    pub severity: &'static str,
    pub code: &'static str,
    pub diagnostics: String,
}

impl Issue {
    /// An `error` issue with the given code.
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: "error",
            code,
            diagnostics: diagnostics.into(),
        }
    }

    /// An `information` issue.
    pub fn info(diagnostics: impl Into<String>) -> Self {
        Self {
            severity: "information",
            code: "informational",
            diagnostics: diagnostics.into(),
        }
    }

    /// The OperationOutcome resource carrying just this issue.
    pub fn to_outcome(&self) -> Value {
        json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": self.severity,
                "code": self.code,
                "diagnostics": self.diagnostics,
            }]
        })
    }

    /// A response with this issue as its `application/fhir+json` body.
    pub fn response(&self, status: StatusCode) -> Response {
        let body = serde_json::to_vec(&self.to_outcome()).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        resp
    }
}

/// A kick-off or status request turned down: the status and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejection {
    pub status: StatusCode,
    pub issue: Issue,
}

impl Rejection {
    /// `400` with an `invalid` issue.
    pub fn invalid(diagnostics: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            issue: Issue::error("invalid", diagnostics),
        }
    }

    /// `400` with a `not-supported` issue.
    pub fn not_supported(diagnostics: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            issue: Issue::error("not-supported", diagnostics),
        }
    }

    /// `404` with a `not-found` issue.
    pub fn not_found(diagnostics: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            issue: Issue::error("not-found", diagnostics),
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        self.issue.response(self.status)
    }
}
