//! A small, real FHIR Bulk Data server: `$export` over a folder of ndjson.
//!
//! Why it exists: a Bulk Data client can only be trusted once it has survived the things real
//! servers do — answer `202` for a while, send `Retry-After` as a date, fail a poll with a
//! transient OperationOutcome, cut a download in half, page a manifest, expire a file. Public
//! test servers do some of that, slowly and not on demand. This module does all of it in-process,
//! on a loopback port, over real HTTP, so that
//!
//! * the client's integration tests drive the whole kick-off → poll → download path with exact
//!   row counts afterwards (one test per fault);
//! * `flatfhir serve --data DIR` lets users point any Bulk Data client at their own ndjson;
//! * `flatfhir demo` runs the full pipeline without an outside service.
//!
//! ```text
//!  DataSource ──load──► Dataset (raw lines + type, id, lastUpdated, patient refs, groups)
//!                          │
//!  GET|POST $export ──► ExportRequest (validated) ──spawn_blocking──► JobOutput (files of lines)
//!  GET $export-status/{job} ──► 202 + X-Progress + Retry-After … until `delay` ──► 200 manifest
//!  GET $export-file/{job}/{n}.ndjson ──► ndjson (gzip, Range, faults)      DELETE ──► 202, then 404
//! ```
//!
//! # Endpoints (FHIR base `/fhir/`)
//!
//! | Method | Path | Notes |
//! |---|---|---|
//! | GET, POST | `$export`, `Patient/$export`, `Group/{id}/$export` | kick-off; `202` + absolute `Content-Location` |
//! | GET | `$export-status/{job}[?page=N]` | `202` while working, then `200` + manifest |
//! | DELETE | `$export-status/{job}` | `202`; afterwards the status URL and files answer `404` |
//! | GET | `$export-file/{job}/{n}.ndjson` | output, error and deleted files; gzip on `Accept-Encoding`; `Range: bytes=…` → `206` (range offsets count plain ndjson bytes: a range request is answered without gzip) |
//! | GET | `metadata` | minimal CapabilityStatement (never needs a token) |
//! | GET | `/storage/{job}/{n}.ndjson?sig=…` (storage origin) | the same file bodies, never needing a token: where `redirect-file` sends downloads |
//!
//! The storage origin is a second listener on the same IP and an ephemeral port (another port is
//! another origin), always started ([`RunningServer::storage_base_url`]). It stands for object
//! storage behind signed URLs; [`RunningServer::storage_authorized`] counts requests that
//! reached it with an `Authorization` header, which a careful client never sends there.
//!
//! Kick-off requires `Accept: application/fhir+json` and a `Prefer` header with the
//! `respond-async` token (other tokens such as `handling=lenient` may accompany it), like the
//! SMART reference server. Parameters come from the query string (GET, POST) or a FHIR
//! `Parameters` body (POST, `Content-Type: application/fhir+json`, any `value[x]`):
//! `_outputFormat`, `_since`, `_until`, `_type`, `_elements`, `patient` (POST only),
//! `_typeFilter` (`Type?element=value[&…]`, string elements or `code` / `system|code` on
//! CodeableConcept and Coding elements, `reference` on References; a comma in a value means OR),
//! `includeAssociatedData` (ignored, noted in the error file), `organizeOutputBy` (not
//! supported), `allowPartialManifests` (`true`: in the second half of the delay, `202` polls carry a JSON
//! manifest of the first half of the output files) and
//! `_flatfhirFault` (below). Unknown or unsupported parameters are a `400` OperationOutcome
//! unless the request says `Prefer: handling=lenient`; then they are ignored and each one is
//! reported as an OperationOutcome line in the manifest's `error` file.
//!
//! Populations: system level exports everything; Patient level exports every resource in some
//! patient compartment plus every resource that references no patient (Organization,
//! Practitioner, …), so a Patient-level export of a Synthea folder returns every line; Group
//! level exports the compartments of the Group's members plus the resources that reference no
//! patient. `_since` is exclusive (`meta.lastUpdated > _since`), `_until` is exclusive
//! (`meta.lastUpdated < _until`); resources without `meta.lastUpdated` always pass.
//! Output files hold one type each and are split every
//! [`DEFAULT_RESOURCES_PER_FILE`] resources.
//!
//! # Faults
//!
//! Faults make the server misbehave on purpose. They are chosen for the whole server with
//! [`ServerBuilder::with_faults`], or for one export job with the kick-off parameter
//! `_flatfhirFault` (repeatable, or a comma list of the names below). A per-request count-based
//! fault fires once per job (or `N` times with `name:N`) and then stops.
//!
//! | `_flatfhirFault` | [`Faults`] field | Behaviour |
//! |---|---|---|
//! | `kickoff-429[:N]` | `kickoff_429` | kick-off answers `429` + `Retry-After` (server-wide: the first N kick-offs; per request: the first N identical requests) |
//! | `kickoff-500` | `kickoff_500` | kick-off answers `500` with a `processing` OperationOutcome |
//! | `status-transient[:N]` | `status_transient` | the first N polls answer `500` with a `transient` OperationOutcome |
//! | `status-429[:N]` | `status_429` | the first N polls answer `429` + `Retry-After` |
//! | `status-fatal` | `status_fatal` | once the job is done, polls answer `500` with a `processing` OperationOutcome |
//! | `file-429[:N]` | `file_429` | the first N requests for each file answer `429` + `Retry-After` |
//! | `cut-file` | `cut_file_once` | every file's first download is cut after about half of its bytes |
//! | `short-file[:N]` | `short_file` | the first N (default 1) downloads of each output file are complete bodies of only the first half of its lines (the manifest's `count` is the whole file's) |
//! | `file-gone[:N]` | `file_gone` | file N (default 0) answers `410`; manifests fetched after that list a fresh URL for it |
//! | `file-lost[:N]` | `file_lost` | file N (default 0) answers `404` to every download while the job lives on, under the same URL in every manifest |
//! | `file-outcome[:N]` | `file_outcome` | file N (default 0) answers `200 application/fhir+json` with one OperationOutcome line instead of its resources |
//! | `file-html[:N]` | `file_html` | file N (default 0) answers `200 text/html` with a login page (an SSO gateway or a proxy's error page) |
//! | `slow[:MS]` | `slow_chunk` | a delay (default 50 ms) between 8 KiB body chunks |
//! | `retry-after-date` | `retry_after_http_date` | `Retry-After` is an HTTP-date instead of delta-seconds |
//! | `deleted:Type/id` | `deleted` | a `deleted` file of DELETE Bundles (these resources are left out of `output`) |
//! | `outcome-warning` | `outcome_warning` | the `error` file carries a `warning` OperationOutcome |
//! | `outcome-fatal` | `outcome_fatal` | the `error` file carries a `fatal` OperationOutcome (the manifest is still `200`) |
//! | `missing-content-location` | `missing_content_location` | the kick-off `202` has no `Content-Location` |
//! | `file-401` | `file_401` | the first file download of the job answers `401` and revokes the token it carried (SMART auth) |
//! | `paged[:N]` | [`ServerBuilder::with_files_per_page`] | manifest pages of N (default 1) output files, chained by `link[next]` |
//! | `redirect-file[:N][:same]` | `redirect_file` ([`FileRedirect`]) | every file URL answers `307`, then each hop `302`/`307` alternately, N hops in all (default 1); the last leads to the storage origin, or with `same` to the file endpoint itself (same-origin hops use a relative `Location`) |
//! | `stall-file` | `stall_file` | every file's first download sends about half a line, then nothing, keeping the connection open (until shutdown) |
//! | `slow-delete[:MS]` | `slow_delete` | `DELETE` of the job's status URL answers only after MS (default 30,000) milliseconds |
//! | `no-gzip` | `no_gzip` | file bodies are never gzip-encoded (so cut bodies can be resumed with `Range`) |
//! | `gzip-bomb[:MiB]` | `gzip_bomb` | one more Patient `output` file: a valid Patient line repeated to MiB (default 300) plain, served gzip-encoded at about 290:1, 300 MiB in about 1 MiB (all lines share one `id`) |
//! | `first-value-only` | `first_value_only` | only the first of repeated `_type` / `_elements` parameters counts, the rest are ignored silently, as HAPI FHIR binds them (a comma-joined value counts in full) |
//! | `scope-filter` | `scope_filter` | requested types the access token's scopes do not cover are left out silently (SMART's reference server filters `_type` to the granted scopes) instead of a `403` kick-off |
//!
//! # Auth
//!
//! With [`ServerBuilder::with_bearer_token`] every FHIR endpoint except `metadata` needs
//! `Authorization: Bearer <token>` (`401` + OperationOutcome otherwise). File downloads need it
//! only when the manifest says `requiresAccessToken: true`; with `false` the file URLs are
//! capability URLs that work without credentials.
//!
//! With [`ServerBuilder::with_smart_clients`] the server does SMART Backend Services instead:
//! `GET .well-known/smart-configuration`, `POST /auth/token` (client assertion → opaque token,
//! lifetime [`ServerBuilder::with_token_lifetime`]), and every FHIR endpoint needs a token that is
//! valid and unexpired; a kick-off also needs scopes that cover every exported type (`403`
//! otherwise). See [`auth`](self::AuthClient) for what the token endpoint verifies. [`RunningServer::log`] records whether each
//! request carried an `Authorization` header (never its value), so tests can assert that a client
//! did not send its token where it must not.
//!
//! # Example
//!
//! ```
//! use flatfhir::serve::{DataSource, ServerBuilder};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let line = br#"{"resourceType":"Patient","id":"p1"}"#;
//! let data = DataSource::Files(vec![("Patient.ndjson".into(), bytes::Bytes::from_static(line))]);
//! let server = ServerBuilder::new(data).start().await.unwrap();
//! assert_eq!(server.counts()["Patient"], 1);
//! assert!(server.base_url().as_str().ends_with("/fhir/"));
//! server.shutdown().await;
//! # });
//! ```

mod auth;
mod bomb;
mod data;
mod faults;
mod files;
mod job;
mod kickoff;
mod outcome;
mod request;
mod select;
mod server;
mod status;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use auth::{AuthClient, DEFAULT_ALLOWED_SCOPES, DEFAULT_TOKEN_LIFETIME, ScopeSyntax};
pub use faults::{Faults, FileRedirect};
pub use server::{
    DEFAULT_ADDR, DEFAULT_DELAY, DEFAULT_RESOURCES_PER_FILE, DEFAULT_RETRY_AFTER_SECS,
    RequestRecord, RunningServer, ServerBuilder,
};

/// Where the served resources come from.
///
/// Files are ndjson, plain or gzip-compressed (detected by the magic bytes, whatever the name).
/// The resource type of each line is its `resourceType`, not the file name; lines without one
/// are skipped with a warning.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// Every `*.ndjson` and `*.ndjson.gz` file directly inside this directory.
    Dir(PathBuf),
    /// In-memory files: `(name, content)`. The name only appears in logs and errors.
    Files(Vec<(String, bytes::Bytes)>),
}

/// Errors starting the server.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data could not be read (missing directory, unreadable or corrupt gzip file).
    #[error("reading {path}: {source}")]
    Data {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The listening socket could not be opened (port in use, no permission).
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The requested address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration problem (an unreadable JWKS, …).
    #[error("server configuration: {0}")]
    Config(String),
    /// A broken invariant: this is a bug in flatfhir, please report it.
    #[error("internal error (this is a bug in flatfhir): {0}")]
    Internal(String),
}
