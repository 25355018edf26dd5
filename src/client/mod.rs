//! Stage 1 — the FHIR Bulk Data client: kick-off → poll → download, as the HL7 Bulk Data IG
//! (STU2, STU3 and the 4.0 ballot) describes it.
//!
//! ```text
//!  kick-off  GET|POST [base]/$export, Patient/$export, Group/{id}/$export
//!     │      Accept: application/fhir+json, Prefer: respond-async      → 202 + Content-Location
//!     ▼
//!  poll      GET status URL (Retry-After ≥ 1 s, X-Progress, backoff with jitter; transient
//!     │      errors retried; 429 waited out, not counted)               → 200 + manifest
//!     ▼
//!  download  GET each output/deleted/error file (Accept-Encoding: gzip; Range to resume;
//!            redirects followed by hand, ≤ 5 hops; an idle timeout on every chunk);
//!            the bearer token only when requiresAccessToken is true and the origin is trusted
//!            (a 200 whose Content-Type is HTML or XML — a sign-in page — is refused)
//! ```
//!
//! Everything a server says is untrusted input: manifest URLs must be http(s) (https when the
//! server is), relative `Content-Location`s are resolved against the kick-off URL, the access
//! token is never sent to another origin unless the user allowed that host (nor are the user's
//! extra headers, on any request: status URL, manifest page, DELETE or file, redirected or not), and server error bodies are shown
//! through their OperationOutcome diagnostics (truncated). URLs in messages are redacted
//! ([`error_redact`]).
//!
//! A file body is consumed as a [`Download`]: a `Stream` of raw (possibly gzip-encoded) bytes
//! that resumes a cut identity body with `Range` by itself.
//!
//! Politeness ([`limiter`]): at most `max_concurrent_requests` requests in flight, fewer while
//! the server answers `429`/`503`; what the requests did is counted in [`stats`].
//!
//! Authorization ([`Auth`]): none, a static bearer token, or SMART Backend Services
//! ([`SmartAuth`]: signed client assertion → short-lived token, renewed before expiry and once
//! more on a `401`).

pub mod download;
mod error;
mod http;
pub mod limiter;
pub mod manifest;
pub mod request;
pub mod retry;
pub mod smart;
pub mod stats;

pub use download::{DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_REDIRECTS, Download};
pub use error::{ClientError, OperationOutcome, redact as error_redact, redact_raw};
pub use http::{Auth, BulkClient, BulkClientBuilder, FileResponse, PollOutcome};
pub use limiter::DEFAULT_MAX_CONCURRENT_REQUESTS;
pub use manifest::{Manifest, ManifestItem};
pub use request::{ExportLevel, ExportRequest};
pub use retry::{RetryConfig, parse_retry_after};
pub use smart::{SmartAuth, SmartConfig};
pub use stats::HttpSummary;
