//! The server itself: builder, shared state, router, request log, start and shutdown.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use url::Url;

use super::auth::{self, AuthClient, AuthState, Grant, ScopeSyntax, SmartSettings};
use super::data::Dataset;
use super::faults::Faults;
use super::job::Job;
use super::outcome::{FHIR_JSON, Issue};
use super::{DataSource, ServeError, files, kickoff, status};

/// Default listening address: loopback, ephemeral port.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
/// Default time a job stays "in progress" (status `202`) after kick-off.
pub const DEFAULT_DELAY: Duration = Duration::from_secs(2);
/// Default `Retry-After` (seconds) on status `202` and `429` responses.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
/// Default number of resources per output file (the SMART reference server's default).
pub const DEFAULT_RESOURCES_PER_FILE: usize = 10_000;

/// How long [`RunningServer::shutdown`] waits for open connections before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Configures and starts a Bulk Data server.
///
/// ```
/// # use std::time::Duration;
/// # use flatfhir::serve::{DataSource, ServerBuilder, DEFAULT_DELAY};
/// let builder = ServerBuilder::new(DataSource::Dir("data/".into()))
///     .with_delay(Duration::from_millis(200))
///     .with_resources_per_file(1_000);
/// ```
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    data: DataSource,
    addr: SocketAddr,
    config: Config,
}

/// Behaviour settings shared by the handlers.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub delay: Duration,
    pub retry_after: u64,
    pub resources_per_file: usize,
    pub files_per_page: Option<usize>,
    pub requires_access_token: Option<bool>,
    pub bearer_token: Option<String>,
    pub smart: SmartSettings,
    pub files_on_separate_origin: bool,
    pub file_rate: Option<u64>,
    pub faults: Faults,
}

impl Config {
    /// The SMART settings, when SMART clients are registered.
    pub fn smart(&self) -> Option<&SmartSettings> {
        (!self.smart.clients.is_empty()).then_some(&self.smart)
    }
}

impl ServerBuilder {
    /// A server for `data` with every default: [`DEFAULT_ADDR`], [`DEFAULT_DELAY`],
    /// [`DEFAULT_RETRY_AFTER_SECS`], [`DEFAULT_RESOURCES_PER_FILE`], no manifest paging, no
    /// auth, files on the same origin, no faults.
    pub fn new(data: DataSource) -> Self {
        Self {
            data,
            addr: DEFAULT_ADDR,
            config: Config {
                delay: DEFAULT_DELAY,
                retry_after: DEFAULT_RETRY_AFTER_SECS,
                resources_per_file: DEFAULT_RESOURCES_PER_FILE,
                files_per_page: None,
                requires_access_token: None,
                bearer_token: None,
                smart: SmartSettings {
                    clients: Vec::new(),
                    token_lifetime: auth::DEFAULT_TOKEN_LIFETIME,
                    scope_syntax: ScopeSyntax::Both,
                },
                files_on_separate_origin: false,
                file_rate: None,
                faults: Faults::default(),
            },
        }
    }

    /// Listening address (default [`DEFAULT_ADDR`]; port 0 picks a free port).
    pub fn with_addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// How long a job answers `202` before its manifest is ready (default [`DEFAULT_DELAY`]).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.config.delay = delay;
        self
    }

    /// `Retry-After` seconds on `202` and `429` (default [`DEFAULT_RETRY_AFTER_SECS`]).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.config.retry_after = secs;
        self
    }

    /// Split output files every `n` resources (default [`DEFAULT_RESOURCES_PER_FILE`]; 0 acts
    /// as 1).
    pub fn with_resources_per_file(mut self, n: usize) -> Self {
        self.config.resources_per_file = n;
        self
    }

    /// Page manifests: at most `n` output files per page, pages chained by `link[next]`
    /// (default `None`: one manifest). The per-request `paged` fault does the same for one job.
    pub fn with_files_per_page(mut self, n: Option<usize>) -> Self {
        self.config.files_per_page = n;
        self
    }

    /// The manifest's `requiresAccessToken`: whether file downloads need the bearer token.
    /// Default: `true` exactly when [`with_bearer_token`](Self::with_bearer_token) set a token
    /// (the IG's SHALL for servers whose FHIR and file endpoints both use bearer tokens).
    /// With `true` and no configured token, any `Bearer` token is accepted for files.
    pub fn with_requires_access_token(mut self, required: bool) -> Self {
        self.config.requires_access_token = Some(required);
        self
    }

    /// Require `Authorization: Bearer <token>` on every FHIR endpoint except `metadata`
    /// (`401` + OperationOutcome otherwise); files need it iff `requiresAccessToken` is true.
    /// Default `None`: no auth.
    pub fn with_bearer_token(mut self, token: Option<String>) -> Self {
        self.config.bearer_token = token;
        self
    }

    /// SMART Backend Services with these registered clients (default none: no SMART auth).
    /// Every FHIR endpoint except `metadata` and discovery then needs an access token from the
    /// token endpoint, and manifests say `requiresAccessToken: true` unless
    /// [`with_requires_access_token`](Self::with_requires_access_token) says otherwise.
    pub fn with_smart_clients(mut self, clients: Vec<AuthClient>) -> Self {
        self.config.smart.clients = clients;
        self
    }

    /// Lifetime of issued access tokens (default [`auth::DEFAULT_TOKEN_LIFETIME`], five
    /// minutes). Short lifetimes make token renewal during an export testable.
    pub fn with_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.config.smart.token_lifetime = lifetime;
        self
    }

    /// The SMART scope syntaxes the token endpoint accepts (default both, as SMART asks); one
    /// alone makes a client's scope fallback testable.
    pub fn with_scope_syntax(mut self, syntax: ScopeSyntax) -> Self {
        self.config.smart.scope_syntax = syntax;
        self
    }

    /// Serve file downloads from a second listener (same IP, another port = another origin),
    /// as servers that put files on S3 or a CDN do. Default `false`.
    pub fn with_files_on_separate_origin(mut self, separate: bool) -> Self {
        self.config.files_on_separate_origin = separate;
        self
    }

    /// Send each file download at most `bytes_per_sec` bytes per second on the wire (gzip
    /// bytes when gzip is negotiated), as a real server's storage does; default `None`: as fast
    /// as the client reads. A benchmark of a client against a throttled local server measures
    /// what the client adds to the download time, without the server taking the cores.
    pub fn with_file_rate(mut self, bytes_per_sec: Option<u64>) -> Self {
        self.config.file_rate = bytes_per_sec.filter(|r| *r > 0);
        self
    }

    /// Faults for every job (default none). Jobs add their own with `_flatfhirFault`.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.config.faults = faults;
        self
    }

    /// Load the data, bind the listener(s) and start serving in background tasks.
    pub async fn start(self) -> Result<RunningServer, ServeError> {
        let source = self.data;
        let data = tokio::task::spawn_blocking(move || Dataset::load(source))
            .await
            .map_err(|e| ServeError::Internal(format!("loading the data panicked: {e}")))??;

        let bind = |addr: SocketAddr| async move {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            Ok::<_, ServeError>((listener, base_url_for(local)?))
        };
        let (listener, base_url) = bind(self.addr).await?;
        let files = if self.config.files_on_separate_origin {
            let mut addr = self.addr;
            addr.set_port(0);
            Some(bind(addr).await?)
        } else {
            None
        };
        let files_base_url = files.as_ref().map_or(base_url.clone(), |(_, u)| u.clone());
        // The storage origin (the `redirect-file` fault's target): always there, since any job
        // may ask for the fault.
        let (storage, storage_base_url) = {
            let mut addr = self.addr;
            addr.set_port(0);
            let (listener, url) = bind(addr).await?;
            let root = url
                .join("/")
                .map_err(|e| ServeError::Internal(format!("storage URL: {e}")))?;
            (listener, root)
        };

        let (shutdown, signal) = watch::channel(false);
        let state = Arc::new(AppState {
            config: self.config,
            data,
            base_url: base_url.clone(),
            files_base_url: files_base_url.clone(),
            storage_base_url: storage_base_url.clone(),
            jobs: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            kickoffs: Mutex::new(KickoffCounters::default()),
            auth: AuthState::default(),
            storage_requests: AtomicU64::new(0),
            storage_authorized: AtomicU64::new(0),
            shutdown: signal.clone(),
        });
        let mut tasks = Vec::new();
        let separate = files.is_some();
        tasks.push(spawn_listener(
            listener,
            router(&state, !separate, true),
            signal.clone(),
        ));
        if let Some((listener, _)) = files {
            tasks.push(spawn_listener(
                listener,
                router(&state, true, false),
                signal.clone(),
            ));
        }
        tasks.push(spawn_listener(storage, storage_router(&state), signal));
        tracing::info!(%base_url, %files_base_url, %storage_base_url, "Bulk Data server listening.");
        Ok(RunningServer {
            base_url,
            files_base_url,
            storage_base_url,
            state,
            shutdown,
            tasks,
        })
    }
}

/// `http://ip:port/fhir/`; an unspecified IP (0.0.0.0) is advertised as loopback.
fn base_url_for(mut addr: SocketAddr) -> Result<Url, ServeError> {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Url::parse(&format!("http://{addr}/fhir/"))
        .map_err(|e| ServeError::Internal(format!("base URL for {addr}: {e}")))
}

fn spawn_listener(
    listener: TcpListener,
    router: Router,
    mut signal: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = signal.wait_for(|stop| *stop).await;
            })
            .await
    })
}

/// The routes of one listener: the FHIR endpoints and/or the file endpoint.
fn router(state: &Arc<AppState>, with_files: bool, with_fhir: bool) -> Router {
    let mut router = Router::new();
    if with_fhir {
        router = router
            .route("/fhir/metadata", get(metadata))
            .route(
                "/fhir/.well-known/smart-configuration",
                get(auth::smart_configuration),
            )
            .route("/auth/token", axum::routing::post(auth::token))
            .route("/fhir/$export", get(kickoff::system).post(kickoff::system))
            .route(
                "/fhir/Patient/$export",
                get(kickoff::patient).post(kickoff::patient),
            )
            .route(
                "/fhir/Group/{id}/$export",
                get(kickoff::group).post(kickoff::group),
            )
            .route(
                "/fhir/$export-status/{job}",
                get(status::poll).delete(status::cancel),
            );
    }
    if with_files {
        router = router.route("/fhir/$export-file/{job}/{file}", get(files::download));
    }
    router
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state.clone())
}

/// The storage origin's routes: file copies at `/storage/{job}/{n}.ndjson`.
fn storage_router(state: &Arc<AppState>) -> Router {
    Router::new()
        .route("/storage/{job}/{file}", get(files::storage))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state.clone())
}

async fn not_found() -> Response {
    Issue::error("not-found", "no such endpoint").response(StatusCode::NOT_FOUND)
}

/// `GET metadata`: a minimal CapabilityStatement naming the export operations.
async fn metadata(State(state): State<Arc<AppState>>) -> Response {
    let op = |name: &str, def: &str| json!({ "name": name, "definition": format!("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{def}") });
    let mut body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "kind": "instance",
        "software": { "name": "flatfhir serve", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "flatfhir built-in Bulk Data server", "url": state.base_url.as_str() },
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "resource": [
                { "type": "Patient", "operation": [op("export", "patient-export")] },
                { "type": "Group", "operation": [op("export", "group-export")] },
            ],
            "operation": [op("export", "export")],
        }],
    });
    if state.config.smart().is_some() {
        // The legacy (pre-well-known) way of advertising the token endpoint.
        body["rest"][0]["security"] = json!({
            "service": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR" }] }],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{ "url": "token", "valueUri": state.token_url().as_str() }],
            }],
        });
    }
    let mut resp = axum::Json(body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

/// One request as the server saw it.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, `DELETE`, …
    pub method: String,
    /// Path and query, e.g. `/fhir/$export-status/abc?page=2`.
    pub path: String,
    /// Whether an `Authorization` header was present (its value is never kept).
    pub authorization: bool,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Accept-Encoding` header, if any.
    pub accept_encoding: Option<String>,
    /// The response status (`200` also for a download that was then cut).
    pub status: u16,
    /// Served by the storage origin (the `redirect-file` fault's target).
    pub storage: bool,
    /// The names of the request's headers, lowercase (never their values).
    pub header_names: Vec<String>,
}

/// Kick-off counters for `kickoff_429`.
#[derive(Debug, Default)]
pub(super) struct KickoffCounters {
    /// Kick-offs seen, server-wide.
    pub total: u32,
    /// Kick-offs seen per request fingerprint (method, URI, body), for per-request faults.
    pub by_request: HashMap<String, u32>,
}

/// State shared by all handlers of both listeners.
#[derive(Debug)]
pub(super) struct AppState {
    pub config: Config,
    pub data: Dataset,
    pub base_url: Url,
    pub files_base_url: Url,
    /// Root of the storage origin, e.g. `http://127.0.0.1:PORT/`.
    pub storage_base_url: Url,
    pub jobs: Mutex<HashMap<String, Arc<Job>>>,
    pub log: Mutex<Vec<RequestRecord>>,
    pub kickoffs: Mutex<KickoffCounters>,
    pub auth: AuthState,
    /// Requests the storage origin served, and how many of them carried `Authorization`.
    pub storage_requests: AtomicU64,
    pub storage_authorized: AtomicU64,
    /// Becomes `true` when the server shuts down (ends stalled bodies).
    pub shutdown: watch::Receiver<bool>,
}

/// Lock a mutex whose data stays valid even if a handler panicked while holding it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AppState {
    /// The job with this id, if it exists and was not deleted.
    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).get(id).cloned()
    }

    /// A signed-looking URL of file `n` of job `id` on the storage origin.
    pub fn storage_file_url(&self, id: &str, n: usize) -> String {
        let mut url = self
            .storage_base_url
            .join(&format!("storage/{id}/{n}.ndjson"))
            .unwrap_or_else(|_| self.storage_base_url.clone());
        url.query_pairs_mut()
            .append_pair("sig", &format!("{:016x}", rand::random::<u64>()));
        url.into()
    }

    /// A receiver that sees `true` once the server shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// The token endpoint (`/auth/token` on the FHIR listener).
    pub fn token_url(&self) -> Url {
        self.base_url
            .join("/auth/token")
            .unwrap_or_else(|_| self.base_url.clone())
    }

    /// For a FHIR endpoint: the SMART grant of the request (`None` without SMART), or a `401`
    /// when the configured auth (SMART or a static token) is not satisfied.
    #[allow(clippy::result_large_err)] // the error is the response to send, built once
    pub fn authorize(&self, headers: &HeaderMap) -> Result<Option<Grant>, Response> {
        if self.config.smart().is_some() {
            return auth::check_token(self, headers).map(Some);
        }
        match self.config.bearer_token.as_deref() {
            Some(token) => match bearer_rejection(headers, Some(token)) {
                Some(resp) => Err(resp),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// A `401` unless the request satisfies the configured auth (see [`authorize`](Self::authorize)).
    pub fn bearer_rejection(&self, headers: &HeaderMap) -> Option<Response> {
        self.authorize(headers).err()
    }

    /// For a file of a job with `requiresAccessToken: true`: a `401` unless the request carries
    /// a valid token (any bearer token when the server has no auth configured).
    pub fn file_rejection(&self, headers: &HeaderMap) -> Option<Response> {
        if self.config.smart().is_some() {
            return auth::check_token(self, headers).err();
        }
        bearer_rejection(headers, self.config.bearer_token.as_deref())
    }

    /// Revoke the request's access token and answer `401` (the `file_401` fault).
    pub fn revoke_token(&self, headers: &HeaderMap) -> Response {
        auth::revoke(self, headers);
        let mut resp = Issue::error("login", "the access token was revoked (fault file-401)")
            .response(StatusCode::UNAUTHORIZED);
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        resp
    }

    /// `requiresAccessToken` for new jobs.
    pub fn requires_access_token(&self) -> bool {
        self.config
            .requires_access_token
            .unwrap_or(self.config.bearer_token.is_some() || self.config.smart().is_some())
    }

    /// `Retry-After`: delta-seconds, or an HTTP-date that many seconds (rounded up) from now.
    pub fn retry_after(&self, faults: &Faults) -> HeaderValue {
        let secs = self.config.retry_after;
        if faults.retry_after_http_date {
            let at = SystemTime::now() + Duration::from_secs(secs + 1);
            HeaderValue::from_str(&httpdate::fmt_http_date(at))
        } else {
            HeaderValue::from_str(&secs.to_string())
        }
        .unwrap_or(HeaderValue::from_static("1"))
    }
}

/// A `401` unless `Authorization: Bearer <token>` (any token when `token` is `None`).
pub(super) fn bearer_rejection(headers: &HeaderMap, token: Option<&str>) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match (given, token) {
        (Some(g), Some(t)) if g == t => None,
        (Some(g), None) if !g.is_empty() => None,
        _ => {
            let mut resp = Issue::error("login", "a valid bearer token is required")
                .response(StatusCode::UNAUTHORIZED);
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(resp)
        }
    }
}

/// Middleware: log every request (debug) and keep a [`RequestRecord`].
async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let mut entry = RequestRecord {
        method: request.method().to_string(),
        path: request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().path().to_string(), |p| p.to_string()),
        authorization: headers.contains_key(header::AUTHORIZATION),
        range: header(header::RANGE),
        accept_encoding: header(header::ACCEPT_ENCODING),
        status: 0,
        storage: request.uri().path().starts_with("/storage/"),
        header_names: headers.keys().map(|k| k.as_str().to_string()).collect(),
    };
    if entry.storage {
        state.storage_requests.fetch_add(1, Ordering::Relaxed);
        if entry.authorization {
            state.storage_authorized.fetch_add(1, Ordering::Relaxed);
        }
    }
    let response = next.run(request).await;
    entry.status = response.status().as_u16();
    tracing::debug!(
        method = %entry.method,
        path = %entry.path,
        authorization = entry.authorization,
        range = entry.range.as_deref(),
        status = entry.status,
        "Served a request."
    );
    lock(&state.log).push(entry);
    response
}

/// A started server. Dropping it leaves the server running until the runtime ends; call
/// [`shutdown`](Self::shutdown) to stop it.
#[derive(Debug)]
pub struct RunningServer {
    base_url: Url,
    files_base_url: Url,
    storage_base_url: Url,
    state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// The FHIR base URL, e.g. `http://127.0.0.1:PORT/fhir/` (with the trailing slash).
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// The base of file URLs: the FHIR base, or the second listener's with
    /// [`ServerBuilder::with_files_on_separate_origin`].
    pub fn files_base_url(&self) -> &Url {
        &self.files_base_url
    }

    /// The root of the storage origin, where the `redirect-file` fault sends file downloads
    /// (a second listener: same IP, another port).
    pub fn storage_base_url(&self) -> &Url {
        &self.storage_base_url
    }

    /// Requests the storage origin has received so far.
    pub fn storage_requests(&self) -> u64 {
        self.state.storage_requests.load(Ordering::Relaxed)
    }

    /// Requests to the storage origin that carried an `Authorization` header (of any value):
    /// a client that follows a redirect there must not send its token, so this should stay 0.
    pub fn storage_authorized(&self) -> u64 {
        self.state.storage_authorized.load(Ordering::Relaxed)
    }

    /// Every request served so far, in completion order.
    pub fn log(&self) -> Vec<RequestRecord> {
        lock(&self.state.log).clone()
    }

    /// Access tokens the SMART token endpoint has issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.state.auth.issued()
    }

    /// Every access token issued so far, revoked and expired ones included — for tests that
    /// check a client never logs one.
    pub fn access_tokens(&self) -> Vec<String> {
        self.state.auth.all_issued()
    }

    /// The SMART token endpoint (served whether or not SMART clients are configured).
    pub fn token_url(&self) -> Url {
        self.state.token_url()
    }

    /// Resources per type in the loaded data.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.state.data.counts()
    }

    /// Stop accepting connections, let open ones finish (up to a few seconds), and return.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for mut task in self.tasks {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "The server stopped with an error."),
                Ok(Err(e)) => tracing::warn!(error = %e, "The server task failed."),
                Err(_) => task.abort(),
            }
        }
    }

    /// Serve until Ctrl-C (or until the listeners fail), then shut down. For the CLI.
    pub async fn wait(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        let mut all = Box::pin(futures::future::join_all(tasks));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("Ctrl-C: shutting the server down.");
                let _ = self.shutdown.send(true);
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, all).await;
            }
            results = &mut all => {
                for r in results {
                    if let Ok(Err(e)) = r {
                        tracing::warn!(error = %e, "The server stopped with an error.");
                    }
                }
            }
        }
    }
}
