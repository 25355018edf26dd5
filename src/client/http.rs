//! [`BulkClient`]: the HTTP side of kick-off, polling, downloads and DELETE, with retries and
//! the token policy in one place.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use reqwest::{
    Method, Response, StatusCode,
    header::{
        ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LOCATION, CONTENT_RANGE,
        CONTENT_TYPE, HeaderValue, LOCATION, RANGE, RETRY_AFTER,
    },
};
use url::Url;

use super::{
    ClientError, ExportRequest, Manifest, RetryConfig, SmartAuth,
    download::{self, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_REDIRECTS},
    error::{OperationOutcome, body_detail, redact},
    limiter::{DEFAULT_MAX_CONCURRENT_REQUESTS, Limiter, Permit},
    parse_retry_after,
    stats::{HttpStats, HttpSummary, is_throttle},
};

/// How requests are authorised.
#[derive(Clone, Default)]
pub enum Auth {
    /// No Authorization header.
    #[default]
    None,
    /// A static bearer token.
    Bearer(String),
    /// SMART Backend Services: a token obtained with a signed client assertion, renewed before
    /// it expires and once more when the server answers `401`.
    Smart(Arc<SmartAuth>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::Bearer(_) => f.write_str("Auth::Bearer(<redacted>)"),
            Auth::Smart(s) => write!(f, "Auth::Smart({s:?})"),
        }
    }
}

/// Configures a [`BulkClient`].
#[derive(Debug, Clone)]
pub struct BulkClientBuilder {
    base: Url,
    auth: Auth,
    headers: Vec<(String, String)>,
    retry: RetryConfig,
    token_hosts: Vec<String>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_redirects: u32,
    max_concurrent_requests: usize,
    allow_insecure_http: bool,
}

impl BulkClientBuilder {
    /// A client for the FHIR server at `base` (e.g. `https://ehr.example/fhir`).
    pub fn new(base: Url) -> Self {
        BulkClientBuilder {
            base,
            auth: Auth::None,
            headers: Vec::new(),
            retry: RetryConfig::default(),
            token_hosts: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            allow_insecure_http: false,
        }
    }
    /// Send the access token over plain HTTP to a base URL that is not on loopback (default
    /// `false`: [`Self::build`] refuses, as the IG requires TLS for every authorised request).
    pub fn with_insecure_http(mut self, allow: bool) -> Self {
        self.allow_insecure_http = allow;
        self
    }
    /// Authorisation (default none).
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }
    /// Extra headers (`--header`): on every request to an origin that may receive the access
    /// token ([`BulkClient::token_allowed`]) — never on a kick-off, status, manifest page, DELETE
    /// or file request to, or redirected to, another origin.
    pub fn with_headers(mut self, h: Vec<(String, String)>) -> Self {
        self.headers = h;
        self
    }
    /// Retry policy.
    pub fn with_retry(mut self, r: RetryConfig) -> Self {
        self.retry = r;
        self
    }
    /// Other hosts that may receive the access token (`--allow-token-host`), and with it the
    /// extra headers on file requests.
    pub fn with_token_hosts(mut self, hosts: Vec<String>) -> Self {
        self.token_hosts = hosts;
        self
    }
    /// The idle timeout (default [`DEFAULT_IDLE_TIMEOUT`]): the longest any request may wait for
    /// its response headers or for the next body chunk. A file request that stalls is retried
    /// (resumed with `Range` where possible, see [`Download`](super::Download)).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }
    /// Most redirects followed for one file request (default [`DEFAULT_MAX_REDIRECTS`]; 0
    /// refuses every redirect). Kick-off and status requests never follow redirects.
    pub fn with_max_redirects(mut self, hops: u32) -> Self {
        self.max_redirects = hops;
        self
    }
    /// Most requests in flight at once (default [`DEFAULT_MAX_CONCURRENT_REQUESTS`], at least
    /// 1): kick-off, status and file requests all count, and a file download holds its slot
    /// until its body is read. The limit halves whenever the server answers `429` or `503` and
    /// climbs back by one after a round of successes ([`limiter`](super::limiter)).
    pub fn with_max_concurrent_requests(mut self, n: usize) -> Self {
        self.max_concurrent_requests = n.max(1);
        self
    }
    /// Build.
    pub fn build(self) -> Result<BulkClient, ClientError> {
        match self.base.scheme() {
            "http" | "https" => {}
            s => {
                return Err(ClientError::Invalid(format!(
                    "base URL must be http(s), not {s:?}"
                )));
            }
        }
        if self.base.scheme() == "http"
            && !matches!(self.auth, Auth::None)
            && !super::smart::is_loopback(&self.base)
            && !self.allow_insecure_http
        {
            return Err(ClientError::Invalid(format!(
                "refusing to send the access token over plain HTTP to {} (not loopback): use \
                 https, or --allow-insecure-http if you really mean it",
                super::error::redact(&self.base)
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            // Per request, reset by every chunk received: an idle timeout, not a total one.
            .read_timeout(self.idle_timeout)
            // File redirects are followed by hand, deciding per hop where credentials may go.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("flatfhir/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        Ok(BulkClient {
            http,
            limiter: Limiter::new(self.max_concurrent_requests),
            stats: Arc::new(HttpStats::default()),
            poll_floor_ms: Arc::new(AtomicU64::new(0)),
            cfg: self,
        })
    }
}

/// What one status request said.
#[derive(Debug)]
pub enum PollOutcome {
    /// Still running.
    InProgress {
        /// `X-Progress`.
        progress: Option<String>,
        /// `Retry-After`, parsed.
        retry_after: Option<Duration>,
        /// A partial manifest (STU3 `allowPartialManifests`).
        partial: Option<Manifest>,
    },
    /// Done.
    Complete(Manifest),
}

/// An open file download (see [`BulkClient::download`] for the stream that resumes it).
pub struct FileResponse {
    /// The response whose body is the file (from `offset`).
    pub response: Response,
    /// The URL that answered, after redirects.
    pub url: Url,
    /// The body is gzip-encoded.
    pub gzip: bool,
    /// Byte offset the body starts at (a `Range` request was honoured).
    pub offset: u64,
    /// The server accepts byte ranges (`Accept-Ranges: bytes`).
    pub ranges: bool,
    /// The request's slot in the client's concurrency limit, held while the body is read.
    pub(super) permit: Option<Permit>,
}

/// The Bulk Data HTTP client. Clones share the connection pool, the concurrency limit, the
/// counters and the poll interval floor.
#[derive(Debug, Clone)]
pub struct BulkClient {
    http: reqwest::Client,
    cfg: BulkClientBuilder,
    limiter: Arc<Limiter>,
    stats: Arc<HttpStats>,
    /// The shortest wait between status requests from now on ([`BulkClient::poll_floor`]), in
    /// milliseconds; `0` until the server first answers a poll with `429`.
    poll_floor_ms: Arc<AtomicU64>,
}

impl BulkClient {
    /// The FHIR base URL.
    pub fn base(&self) -> &Url {
        &self.cfg.base
    }

    /// The retry policy.
    pub fn retry(&self) -> &RetryConfig {
        &self.cfg.retry
    }

    /// The shortest wait between two status requests from now on. It is zero (the retry
    /// policy's [`min_poll_interval`](RetryConfig::min_poll_interval) applies) until the server
    /// answers a poll with `429` ("polling too fast"); then it doubles with each such answer,
    /// from twice `min_poll_interval` up to `max_poll_interval`, and stays: the client slows down
    /// for good rather than returning to the pace that tripped the limit (SMART's reference
    /// server keeps answering `429` for five minutes once more than 60 requests a minute came).
    pub fn poll_floor(&self) -> Duration {
        Duration::from_millis(self.poll_floor_ms.load(Ordering::Relaxed))
    }

    /// A `429` on a status request: double [`Self::poll_floor`]; returns the new floor.
    fn slow_polling(&self) -> Duration {
        let retry = &self.cfg.retry;
        let start = (retry.min_poll_interval * 2).as_millis() as u64;
        let cap = retry.max_poll_interval.as_millis() as u64;
        let next = |f: u64| f.saturating_mul(2).max(start).min(cap);
        let prev = self
            .poll_floor_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| Some(next(f)))
            .unwrap_or_default();
        Duration::from_millis(next(prev))
    }

    /// The counters of this client's requests (shared by its clones), for callers that retry
    /// whole files on their own.
    pub fn http_stats(&self) -> &Arc<HttpStats> {
        &self.stats
    }

    /// The scopes the SMART token grants (`None` without SMART auth or before the first
    /// token): see [`SmartAuth::granted_scope`](super::SmartAuth::granted_scope).
    pub async fn granted_scope(&self) -> Option<String> {
        match &self.cfg.auth {
            Auth::Smart(s) => s.granted_scope().await,
            _ => None,
        }
    }

    /// What this client's requests did so far, with the concurrency limit's figures.
    pub fn http_summary(&self) -> HttpSummary {
        let aimd = self.limiter.snapshot();
        HttpSummary {
            max_concurrency: aimd.cap() as u64,
            min_concurrency: aimd.min_limit() as u64,
            ..self.stats.summary()
        }
    }

    /// The idle timeout of every request ([`BulkClientBuilder::with_idle_timeout`]).
    pub fn idle_timeout(&self) -> Duration {
        self.cfg.idle_timeout
    }

    /// Whether `url` may receive the access token: same origin as the FHIR base, or an allowed host.
    pub fn token_allowed(&self, url: &Url) -> bool {
        url.origin() == self.cfg.base.origin()
            || url.host_str().is_some_and(|h| {
                self.cfg
                    .token_hosts
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(h))
            })
    }

    /// A request with, when the origin is trusted ([`token_allowed`](Self::token_allowed)), the
    /// user's headers and (when `with_token`) the access token, marked sensitive so no debug
    /// output shows it. A status URL, a manifest page or a DELETE on another origin gets
    /// neither: `--header`s carry secrets too (`Authorization: Basic`, API keys). Returns the
    /// token used, for [`renew_after_401`](Self::renew_after_401).
    async fn request(
        &self,
        method: Method,
        url: &Url,
        with_token: bool,
    ) -> Result<(reqwest::RequestBuilder, Option<Arc<str>>), ClientError> {
        let trusted = self.token_allowed(url);
        self.request_with(method, url, with_token, trusted).await
    }

    /// [`request`](Self::request), with the user's headers only when `with_headers`.
    async fn request_with(
        &self,
        method: Method,
        url: &Url,
        with_token: bool,
        with_headers: bool,
    ) -> Result<(reqwest::RequestBuilder, Option<Arc<str>>), ClientError> {
        let mut rb = self.http.request(method, url.clone());
        if with_headers {
            for (k, v) in &self.cfg.headers {
                rb = rb.header(k, v);
            }
        }
        let mut used = None;
        if with_token && self.token_allowed(url) {
            let token: Option<Arc<str>> = match &self.cfg.auth {
                Auth::None => None,
                Auth::Bearer(t) => Some(Arc::from(t.as_str())),
                Auth::Smart(s) => Some(s.token().await?),
            };
            if let Some(t) = token {
                let mut value = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    ClientError::Invalid("the access token is not a valid header value".into())
                })?;
                value.set_sensitive(true);
                rb = rb.header(AUTHORIZATION, value);
                used = Some(t);
            }
        }
        Ok((rb, used))
    }

    /// After a `401`: with SMART auth, drop the token that was refused (once per request) and
    /// say the request should be sent again with a new one.
    async fn renew_after_401(
        &self,
        resp: &Result<Response, ClientError>,
        used: &Option<Arc<str>>,
        renewed: &mut bool,
    ) -> bool {
        let Ok(resp) = resp else { return false };
        if resp.status() != StatusCode::UNAUTHORIZED || *renewed {
            return false;
        }
        if let (Auth::Smart(s), Some(t)) = (&self.cfg.auth, used) {
            *renewed = true;
            tracing::info!("The server answered 401; renewing the access token.");
            s.invalidate(t).await;
            return true;
        }
        false
    }

    async fn send(
        &self,
        method: &'static str,
        url: &Url,
        rb: reqwest::RequestBuilder,
    ) -> Result<Response, ClientError> {
        self.send_as(method, url, rb, false).await
    }

    /// [`Self::send`]; `poll` for a status request, whose `429` means "poll less often" (a
    /// rate, slowed by [`Self::poll_floor`]), not "fewer requests at once": it leaves the
    /// concurrency limit of the downloads alone. A `503` lowers it whatever the request.
    async fn send_as(
        &self,
        method: &'static str,
        url: &Url,
        rb: reqwest::RequestBuilder,
        poll: bool,
    ) -> Result<Response, ClientError> {
        let sent = rb.send().await;
        match &sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                self.stats.response(status);
                if is_throttle(status) && !(poll && status == 429) {
                    self.limiter.throttled();
                } else if resp.status().is_success() {
                    self.limiter.succeeded();
                }
            }
            Err(_) => self.stats.transport_error(),
        }
        sent.map_err(|source| {
            if source.is_timeout() {
                ClientError::Stalled {
                    method,
                    url: redact(url),
                    idle: self.cfg.idle_timeout,
                }
            } else {
                // The error's own URL would print the query (a signed URL's signature).
                ClientError::Network {
                    method,
                    url: redact(url),
                    source: source.without_url(),
                }
            }
        })
    }

    async fn status_error(method: &'static str, url: &Url, resp: Response) -> ClientError {
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        ClientError::Status {
            method,
            url: redact(url),
            status,
            detail: body_detail(&body),
        }
    }

    /// Wait before retry `attempt` after `e`: the server's `Retry-After` (`hint`) when it sent
    /// one, else backoff. Counted as a retry, and the wait as throttling when `e` is a `429` or
    /// `503`.
    async fn backoff(
        &self,
        attempt: u32,
        prev: &mut Duration,
        hint: Option<Duration>,
        what: &str,
        e: &ClientError,
    ) {
        let wait = hint
            .map(|h| self.cfg.retry.clamp_poll(h))
            .unwrap_or_else(|| self.cfg.retry.next_backoff(*prev));
        *prev = wait;
        let throttled = matches!(e, ClientError::Status { status, .. } if is_throttle(*status));
        self.stats.retry();
        if throttled {
            self.stats.waited_throttled(wait);
        }
        tracing::info!(
            retry = attempt,
            of = self.cfg.retry.max_retries,
            wait_ms = wait.as_millis() as u64,
            throttled,
            "{what}: retry {attempt} of {}",
            self.cfg.retry.max_retries
        );
        tokio::time::sleep(wait).await;
    }

    /// Kick off an export; returns the status URL. 429 and 5xx are retried.
    pub async fn kick_off(&self, req: &ExportRequest) -> Result<Url, ClientError> {
        req.validate()?;
        let (method, url) = if req.uses_post() {
            (Method::POST, req.endpoint(&self.cfg.base)?)
        } else {
            (Method::GET, req.get_url(&self.cfg.base)?)
        };
        let mut prefer = String::from("respond-async");
        if req.lenient {
            prefer.push_str(", handling=lenient");
        }
        if req.separate_export_status {
            prefer.push_str(", separate-export-status");
        }
        let mut prev = self.cfg.retry.base;
        let mut attempt = 0;
        let mut renewed = false;
        loop {
            let (rb, used) = self.request(method.clone(), &url, true).await?;
            let mut rb = rb
                .header(ACCEPT, "application/fhir+json")
                .header("Prefer", prefer.as_str());
            if method == Method::POST {
                rb = rb
                    .header(CONTENT_TYPE, "application/fhir+json")
                    .body(req.parameters_body().to_string());
            }
            let name = if method == Method::POST {
                "POST"
            } else {
                "GET"
            };
            let permit = self.limiter.acquire().await;
            let sent = self.send(name, &url, rb).await;
            drop(permit);
            if self.renew_after_401(&sent, &used, &mut renewed).await {
                continue;
            }
            let (e, hint) = match sent {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    let loc = resp
                        .headers()
                        .get(CONTENT_LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let Some(loc) = loc else {
                        return Err(ClientError::Protocol {
                            url: redact(&url),
                            message: "202 Accepted without a Content-Location header".into(),
                        });
                    };
                    return super::manifest::check_url(&loc, &url).map_err(|message| {
                        ClientError::Protocol {
                            url: redact(&url),
                            message,
                        }
                    });
                }
                Ok(resp) if resp.status().is_success() => {
                    return Err(ClientError::Protocol {
                        url: redact(&url),
                        message: format!(
                            "kick-off answered {} instead of 202 Accepted",
                            resp.status()
                        ),
                    });
                }
                Ok(resp) => {
                    let hint = retry_after(&resp);
                    (Self::status_error(name, &url, resp).await, hint)
                }
                Err(e) => (e, None),
            };
            let e = match e {
                // The request may have reached the server: sending it again could start a
                // second job. Only a connection never made is safe to retry.
                ClientError::Network { source, .. } if !source.is_connect() => {
                    return Err(ClientError::KickOffLost {
                        method: name,
                        url: redact(&url),
                        cause: error_chain(&source),
                    });
                }
                ClientError::Stalled { idle, .. } => {
                    return Err(ClientError::KickOffLost {
                        method: name,
                        url: redact(&url),
                        cause: format!("nothing received for {idle:?}"),
                    });
                }
                e => e,
            };
            if !e.is_retryable() || attempt >= self.cfg.retry.max_retries {
                return Err(e);
            }
            attempt += 1;
            tracing::warn!(error = %e, "kick-off failed");
            self.backoff(attempt, &mut prev, hint, "kick-off", &e).await;
        }
    }

    /// One status request (transient failures retried a bounded number of times).
    ///
    /// A `429` is not a failure: the IG says it means the client polls too fast, and the job is
    /// fine. It is waited out — `Retry-After` when the server sends one (at least
    /// [`min_poll_interval`](RetryConfig::min_poll_interval)), else a growing backoff up to
    /// [`max_poll_interval`](RetryConfig::max_poll_interval) — and polled again, without counting
    /// towards `max_retries`: SMART's reference server answers `429` for minutes once tripped.
    /// The export's overall timeout (`--timeout`) bounds the waiting.
    pub async fn poll(&self, status: &Url) -> Result<PollOutcome, ClientError> {
        let mut prev = self.cfg.retry.base;
        let mut attempt = 0;
        let mut renewed = false;
        let mut throttled = 0u32;
        let mut throttle_prev = self.cfg.retry.base;
        loop {
            let (rb, used) = self.request(Method::GET, status, true).await?;
            let rb = rb.header(ACCEPT, "application/json");
            let permit = self.limiter.acquire().await;
            let sent = self.send_as("GET", status, rb, true).await;
            drop(permit);
            if self.renew_after_401(&sent, &used, &mut renewed).await {
                continue;
            }
            let err = match sent {
                Ok(resp) if job_status(&resp) == StatusCode::OK => {
                    let body = resp.bytes().await.map_err(|source| ClientError::Network {
                        method: "GET",
                        url: redact(status),
                        source: source.without_url(),
                    })?;
                    return Manifest::parse(&body, status).map(PollOutcome::Complete);
                }
                Ok(resp) if job_status(&resp) == StatusCode::ACCEPTED => {
                    let progress = resp
                        .headers()
                        .get("x-progress")
                        .and_then(|v| v.to_str().ok())
                        .map(|s| {
                            s.chars()
                                .take(100)
                                .filter(|c| !c.is_control())
                                .collect::<String>()
                        });
                    let retry_after = retry_after(&resp);
                    let is_json = resp
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|c| c.contains("json"));
                    let partial = if is_json {
                        let body = resp.bytes().await.unwrap_or_default();
                        Manifest::parse(&body, status).ok()
                    } else {
                        None
                    };
                    return Ok(PollOutcome::InProgress {
                        progress,
                        retry_after,
                        partial,
                    });
                }
                Ok(resp) => {
                    let hint = retry_after(&resp);
                    let code = job_status(&resp).as_u16();
                    let body = resp.bytes().await.unwrap_or_default();
                    if code == 429 {
                        throttled += 1;
                        let floor = self.slow_polling();
                        let wait = match hint {
                            Some(h) => self.cfg.retry.clamp_poll(h),
                            None => {
                                throttle_prev = self.cfg.retry.next_backoff(throttle_prev);
                                self.cfg.retry.clamp_poll(throttle_prev)
                            }
                        };
                        let wait = wait.max(floor);
                        self.stats.waited_throttled(wait);
                        tracing::info!(
                            throttled,
                            wait_ms = wait.as_millis() as u64,
                            poll_floor_ms = floor.as_millis() as u64,
                            "status: the server asks to poll more slowly (429); waiting, and \
                             polling at most once per poll_floor_ms from now on"
                        );
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    let oo = OperationOutcome::parse(&body);
                    let transient = oo.as_ref().is_some_and(|o| o.is_transient())
                        || (code >= 500 && oo.is_none());
                    let e = ClientError::Status {
                        method: "GET",
                        url: redact(status),
                        status: code,
                        detail: body_detail(&body),
                    };
                    if !transient {
                        return Err(match oo {
                            Some(o) if code != 404 => ClientError::JobFailed(o.summary()),
                            _ => e,
                        });
                    }
                    (e, hint)
                }
                Err(e) => (e, None),
            };
            let (e, hint) = err;
            if attempt >= self.cfg.retry.max_retries {
                return Err(e);
            }
            attempt += 1;
            tracing::warn!(error = %e, "status request failed");
            self.backoff(attempt, &mut prev, hint, "status", &e).await;
        }
    }

    /// Fetch a manifest page (`link` next), with the same rules as a status request.
    pub async fn fetch_page(&self, url: &Url) -> Result<PollOutcome, ClientError> {
        self.poll(url).await
    }

    /// Open a file download, from byte `from` when resuming (`Range: bytes=from-`, identity
    /// encoding; otherwise gzip is asked for). Redirects are followed as
    /// [`download`](Self::download) describes; the token is sent only when `requires_token`
    /// and the hop's origin may receive it. 5xx/429/network errors and idle timeouts are
    /// retried with backoff; a `401` with SMART auth renews the token once.
    ///
    /// [`download`](Self::download) wraps this in a stream that resumes cut bodies.
    pub async fn open_file(
        &self,
        url: &Url,
        requires_token: bool,
        from: u64,
    ) -> Result<FileResponse, ClientError> {
        let permit = self.limiter.acquire().await;
        let mut opened = self
            .open_file_with(url, requires_token, from, from > 0)
            .await?;
        opened.permit = Some(permit);
        Ok(opened)
    }

    /// [`open_file`](Self::open_file), asking for the identity encoding when `identity` (a
    /// resumed identity body must stay identity, even from byte 0), without taking a slot of
    /// the concurrency limit (a resume runs in the slot of the download it resumes).
    pub(super) async fn open_file_with(
        &self,
        url: &Url,
        requires_token: bool,
        from: u64,
        identity: bool,
    ) -> Result<FileResponse, ClientError> {
        let mut prev = self.cfg.retry.base;
        let mut attempt = 0;
        let mut renewed = false;
        loop {
            let (sent, at, used) = match self.follow_file(url, requires_token, from, identity).await
            {
                Ok((resp, at, used)) => (Ok(resp), at, used),
                Err(e) => (Err(e), url.clone(), None),
            };
            if self.renew_after_401(&sent, &used, &mut renewed).await {
                continue;
            }
            let err = match sent {
                Ok(resp)
                    if resp.status() == StatusCode::OK
                        || resp.status() == StatusCode::PARTIAL_CONTENT =>
                {
                    if let Some(media) = refused_file_type(resp.headers().get(CONTENT_TYPE)) {
                        return Err(ClientError::Protocol {
                            url: redact(&at),
                            message: format!(
                                "the file answered {} with Content-Type {media}, a web page \
                                 (a sign-in or proxy error page?), not ndjson",
                                resp.status().as_u16()
                            ),
                        });
                    }
                    let gzip = resp
                        .headers()
                        .get(CONTENT_ENCODING)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| {
                            v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip")
                        });
                    let ranges = resp
                        .headers()
                        .get("accept-ranges")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("bytes"));
                    let offset = if resp.status() == StatusCode::PARTIAL_CONTENT {
                        range_start(&resp).unwrap_or(from)
                    } else {
                        0
                    };
                    return Ok(FileResponse {
                        response: resp,
                        url: at,
                        gzip,
                        offset,
                        ranges,
                        permit: None,
                    });
                }
                Ok(resp) => {
                    let hint = retry_after(&resp);
                    (Self::status_error("GET", &at, resp).await, hint)
                }
                Err(e) => (e, None),
            };
            let (e, hint) = err;
            if !e.is_retryable() || attempt >= self.cfg.retry.max_retries {
                return Err(e);
            }
            attempt += 1;
            tracing::warn!(error = %e, "download failed");
            self.backoff(attempt, &mut prev, hint, "download", &e).await;
        }
    }

    /// One file GET and the redirects it leads to: the final response, the URL that gave it,
    /// and the token it carried (for a `401` renewal). Each hop decides afresh whether the
    /// token and the user's headers may go to its origin.
    async fn follow_file(
        &self,
        url: &Url,
        requires_token: bool,
        from: u64,
        identity: bool,
    ) -> Result<(Response, Url, Option<Arc<str>>), ClientError> {
        let mut at = url.clone();
        let mut hops = 0;
        loop {
            let trusted = self.token_allowed(&at);
            let (rb, used) = self
                .request_with(Method::GET, &at, requires_token && trusted, trusted)
                .await?;
            let mut rb = rb.header(ACCEPT, "application/fhir+ndjson").header(
                ACCEPT_ENCODING,
                if identity || from > 0 {
                    "identity"
                } else {
                    "gzip"
                },
            );
            if from > 0 {
                rb = rb.header(RANGE, format!("bytes={from}-"));
            }
            let resp = self.send("GET", &at, rb).await?;
            if !download::follows(resp.status()) {
                return Ok((resp, at, used));
            }
            let next = download::redirect_target(
                &at,
                resp.status(),
                resp.headers().get(LOCATION),
                hops,
                self.cfg.max_redirects,
            )?;
            hops += 1;
            tracing::debug!(
                status = resp.status().as_u16(),
                from = %redact(&at),
                to = %redact(&next),
                hop = hops,
                credentials = requires_token && self.token_allowed(&next),
                "Following a file redirect."
            );
            at = next;
        }
    }

    /// DELETE the status URL (cancel, or "done with the files"). Best effort for callers.
    pub async fn delete(&self, status: &Url) -> Result<(), ClientError> {
        let mut renewed = false;
        let resp = loop {
            let (rb, used) = self.request(Method::DELETE, status, true).await?;
            let permit = self.limiter.acquire().await;
            let sent = self.send("DELETE", status, rb).await;
            drop(permit);
            if !self.renew_after_401(&sent, &used, &mut renewed).await {
                break sent?;
            }
        };
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Self::status_error("DELETE", status, resp).await)
        }
    }
}

/// The job's status of a status response: the HTTP status, or — STU3 `separate-export-status`,
/// a `200` whose `X-Export-Status` header carries it — the leading three digits of that header.
fn job_status(resp: &Response) -> StatusCode {
    if resp.status() == StatusCode::OK
        && let Some(code) = resp
            .headers()
            .get("x-export-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().get(..3)?.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
    {
        return code;
    }
    resp.status()
}

/// The media type of a file response that cannot be ndjson: HTML, XHTML or XML (an SSO sign-in
/// page, a proxy's or a WAF's error page, an object store's XML error sent with `200`). Every
/// other type is taken, as servers label ndjson in many ways: `application/fhir+ndjson`,
/// `application/ndjson`, `application/x-ndjson`, `application/json`, `text/plain`,
/// `application/octet-stream`, `binary/octet-stream`, a gzip type, or none at all.
fn refused_file_type(value: Option<&HeaderValue>) -> Option<String> {
    let value = value?;
    let Ok(text) = value.to_str() else {
        return Some(String::from_utf8_lossy(value.as_bytes()).into_owned());
    };
    let media = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let refused = media == "text/html"
        || media == "application/xhtml+xml"
        || media == "text/xml"
        || media == "application/xml"
        || media.ends_with("+xml");
    refused.then(|| {
        media
            .chars()
            .take(100)
            .filter(|c| !c.is_control())
            .collect()
    })
}

/// A transport error and its causes, `: `-joined (reqwest's own message, "error sending
/// request", says nothing of why).
pub(crate) fn error_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The first byte of a `206`'s `Content-Range: bytes START-END/TOTAL`.
fn range_start(resp: &Response) -> Option<u64> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let (start, _) = v.trim().strip_prefix("bytes ")?.split_once('-')?;
    start.trim().parse().ok()
}

pub(crate) fn retry_after(resp: &Response) -> Option<Duration> {
    resp.headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The access token never travels in clear to a server off this machine unless the user
    /// says so (the IG requires TLS; the client assertion was already refused, not the token).
    #[test]
    fn the_token_is_not_sent_over_plain_http_off_loopback() {
        let build = |base: &str, auth: Auth, allow: bool| {
            BulkClientBuilder::new(Url::parse(base).unwrap())
                .with_auth(auth)
                .with_insecure_http(allow)
                .build()
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let bearer = || Auth::Bearer("t".into());
        let e = build("http://ehr.example/fhir", bearer(), false).unwrap_err();
        assert!(
            e.contains("plain HTTP") && e.contains("--allow-insecure-http"),
            "{e}"
        );
        assert!(build("http://ehr.example/fhir", bearer(), true).is_ok());
        assert!(build("https://ehr.example/fhir", bearer(), false).is_ok());
        assert!(build("http://127.0.0.1:8080/fhir", bearer(), false).is_ok());
        assert!(build("http://localhost/fhir", bearer(), false).is_ok());
        assert!(build("http://ehr.example/fhir", Auth::None, false).is_ok());
    }

    #[test]
    fn web_pages_are_refused_as_files() {
        let refused = |ct: &str| refused_file_type(Some(&HeaderValue::from_str(ct).unwrap()));
        for ok in [
            "application/fhir+ndjson",
            "application/ndjson",
            "application/x-ndjson",
            "application/json",
            "application/json; charset=utf-8",
            "application/fhir+json",
            "text/plain",
            "application/octet-stream",
            "binary/octet-stream",
            "application/gzip",
            "Application/FHIR+NDJSON; charset=UTF-8",
        ] {
            assert_eq!(refused(ok), None, "{ok}");
        }
        assert_eq!(refused_file_type(None), None);
        for bad in [
            "text/html",
            "text/html; charset=utf-8",
            "TEXT/HTML",
            "application/xhtml+xml",
            "application/xml",
            "text/xml",
            "application/atom+xml",
        ] {
            assert!(refused(bad).is_some(), "{bad}");
        }
        assert_eq!(refused("text/html; charset=utf-8").unwrap(), "text/html");
    }
}
