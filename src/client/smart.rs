//! SMART Backend Services: find the token endpoint, trade a signed client assertion for an
//! access token, cache it, and renew it before it runs out or when the server says `401`.
//!
//! Exports outlive tokens (real ones last five minutes, exports hours), so [`SmartAuth`] is a
//! token *source*, asked before every request. Renewal is single-flight: parallel downloads
//! that all find the token stale wait for one token request instead of sending one each.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::Value;
use tokio::sync::Mutex;
use url::Url;

use super::ClientError;
use super::error::redact;
use crate::auth::PrivateKey;

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Default scope: SMART v1 read access to everything (widest server support).
pub const DEFAULT_SCOPE_V1: &str = "system/*.read";
/// The SMART v2 spelling of [`DEFAULT_SCOPE_V1`].
pub const DEFAULT_SCOPE_V2: &str = "system/*.rs";
/// Lifetime assumed when a token response has no usable `expires_in` (SMART recommends 300 s).
const DEFAULT_EXPIRES_IN: u64 = 300;
/// Longest lifetime believed of a token (a day), whatever its `expires_in` says.
const MAX_EXPIRES_IN: u64 = 24 * 3600;
/// Longest margin before expiry at which a token is renewed.
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(60);
/// Attempts of one token request on network errors.
const TOKEN_ATTEMPTS: u32 = 3;
/// Token requests in all while the endpoint answers `429` or `5xx` (8): an EHR's token endpoint
/// under load says how long to wait, and an export that gives up mid-run leaves its job behind.
const TOKEN_ATTEMPTS_WHEN_BUSY: u32 = 8;
/// Longest wait a token endpoint's `Retry-After` gets (2 minutes).
const MAX_TOKEN_RETRY_AFTER: Duration = Duration::from_secs(120);
/// The CapabilityStatement extension older servers use to advertise OAuth endpoints.
const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// Settings of SMART Backend Services authorization.
#[derive(Debug, Clone)]
pub struct SmartConfig {
    /// The registered client id (`iss` and `sub` of the assertion).
    pub client_id: String,
    /// The private key that signs assertions.
    pub key: Arc<PrivateKey>,
    /// Space-separated scopes to request.
    pub scope: String,
    /// The token endpoint; discovered from the server when `None`.
    pub token_url: Option<Url>,
    /// `jku` header: the URL of the client's registered JWKS, if it registered one.
    pub jku: Option<String>,
    /// Allow a plain-HTTP token endpoint that is not on loopback.
    pub allow_insecure_http: bool,
}

impl SmartConfig {
    /// Settings with the default scope ([`DEFAULT_SCOPE_V1`]) and a discovered token endpoint.
    pub fn new(client_id: impl Into<String>, key: PrivateKey) -> Self {
        SmartConfig {
            client_id: client_id.into(),
            key: Arc::new(key),
            scope: DEFAULT_SCOPE_V1.to_string(),
            token_url: None,
            jku: None,
            allow_insecure_http: false,
        }
    }
}

/// A scope string for an export: `base` (default v1 or v2 "everything") plus, for Group
/// exports, the Group read scope the IG asks clients to request.
pub fn export_scope(base: Option<&str>, v2: bool, group: bool) -> String {
    let default = if v2 {
        DEFAULT_SCOPE_V2
    } else {
        DEFAULT_SCOPE_V1
    };
    let mut scopes: Vec<String> = base
        .unwrap_or(default)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if group {
        let v2 = v2 || scopes.iter().any(|s| s.ends_with(".rs"));
        let g = if v2 {
            "system/Group.rs"
        } else {
            "system/Group.read"
        };
        if !scopes.iter().any(|s| s == g) {
            scopes.push(g.to_string());
        }
    }
    scopes.join(" ")
}

/// Whether `granted` (space-separated scopes) includes `scope`, or its exact equivalent in the
/// other SMART syntax (`system/*.read` ⇔ `system/*.rs`).
fn scope_granted(granted: &str, scope: &str) -> bool {
    granted.split_whitespace().any(|g| {
        g == scope
            || [Syntax::V1, Syntax::V2]
                .into_iter()
                .any(|syn| in_syntax(scope, syn).as_deref() == Some(g))
    })
}

/// Whether the scopes `granted` let a client read and search resources of type `ty`: a
/// `system/`, `user/` or `patient/` scope for the type or `*` with read access (v1 `read` or
/// `*`, v2 `r`/`s` permissions). Scopes that are not SMART resource scopes are ignored.
pub fn scope_reads(granted: &str, ty: &str) -> bool {
    granted.split_whitespace().any(|g| {
        let Some((context, rest)) = g.split_once('/') else {
            return false;
        };
        let Some((t, perm)) = rest.split_once('.') else {
            return false;
        };
        let perm = perm.split('?').next().unwrap_or(perm);
        let v2_read = !perm.is_empty()
            && perm.chars().all(|c| "cruds".contains(c))
            && perm.contains(['r', 's']);
        ["system", "user", "patient"].contains(&context)
            && (t == "*" || t == ty)
            && (perm == "read" || perm == "*" || v2_read)
    })
}

/// SMART scope syntax: v1 (`system/*.read`) or v2 (`system/*.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    V1,
    V2,
}

/// Permissions with the same meaning in both syntaxes (SMART's v1 → v2 mapping).
const PERMISSIONS: [(&str, &str); 3] = [("read", "rs"), ("write", "cud"), ("*", "cruds")];

/// `scope` with every scope written in the `to` syntax, when each one has an exact equivalent
/// there (`system/*.read` ⇔ `system/*.rs`); `None` when nothing would change or a scope has no
/// exact equivalent (`system/Patient.r`, a v2 query suffix), so a retry never widens access.
fn in_syntax(scope: &str, to: Syntax) -> Option<String> {
    let mut changed = false;
    let mut out = Vec::new();
    for s in scope.split_whitespace() {
        let (head, perm) = s.rsplit_once('.')?;
        let (v1, v2) = PERMISSIONS
            .iter()
            .find(|(v1, v2)| perm == *v1 || perm == *v2)?;
        let want = if to == Syntax::V1 { v1 } else { v2 };
        changed |= perm != *want;
        out.push(format!("{head}.{want}"));
    }
    (changed && !out.is_empty()).then(|| out.join(" "))
}

/// The one scope syntax a server's `capabilities` list (`permission-v1` / `permission-v2`).
fn only_syntax(conf: &Value) -> Option<Syntax> {
    let caps = conf.get("capabilities")?.as_array()?;
    let has = |c: &str| caps.iter().any(|v| v.as_str() == Some(c));
    match (has("permission-v1"), has("permission-v2")) {
        (true, false) => Some(Syntax::V1),
        (false, true) => Some(Syntax::V2),
        _ => None,
    }
}

struct Cached {
    value: Arc<str>,
    renew_at: Instant,
}

#[derive(Default)]
struct State {
    token_url: Option<Url>,
    /// The scope to request when it differs from the configured one: rewritten to the syntax
    /// the server advertises, or the one it accepted after refusing the other.
    scope: Option<String>,
    token: Option<Cached>,
    issued: u64,
    /// The scope the last token response granted (its `scope`; the requested one when absent).
    granted: Option<String>,
}

/// A cached, self-renewing SMART Backend Services access token for one FHIR server.
pub struct SmartAuth {
    cfg: SmartConfig,
    base: Url,
    http: reqwest::Client,
    state: Mutex<State>,
}

impl std::fmt::Debug for SmartAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartAuth")
            .field("client_id", &self.cfg.client_id)
            .field("kid", &self.cfg.key.kid())
            .field("scope", &self.cfg.scope)
            .finish_non_exhaustive()
    }
}

fn auth_err(url: &Url, message: impl Into<String>) -> ClientError {
    ClientError::Auth {
        url: redact(url),
        message: message.into(),
    }
}

/// Whether `url`'s host is a loopback address (or `localhost`): plain HTTP stays on the machine.
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl SmartAuth {
    /// Token source for the FHIR server at `base`.
    pub fn new(cfg: SmartConfig, base: Url) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("flatfhir/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        Ok(SmartAuth {
            state: Mutex::new(State {
                token_url: cfg.token_url.clone(),
                ..Default::default()
            }),
            cfg,
            base,
            http,
        })
    }

    /// The scopes the last token grants (`None` before the first token). The token endpoint
    /// may grant fewer than were requested (SMART Backend Services: `scope` in the response),
    /// and the server then leaves out what the token does not cover.
    pub async fn granted_scope(&self) -> Option<String> {
        self.state.lock().await.granted.clone()
    }

    /// How many tokens were obtained so far (for tests and the run summary).
    pub async fn tokens_issued(&self) -> u64 {
        self.state.lock().await.issued
    }

    /// A valid access token: the cached one, or a new one when it is about to expire.
    pub async fn token(&self) -> Result<Arc<str>, ClientError> {
        let mut state = self.state.lock().await;
        if let Some(t) = &state.token
            && Instant::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        self.renew(&mut state).await
    }

    /// The server rejected `used` (`401`): forget it, so the next [`token`](Self::token) asks
    /// for a new one — unless another task already replaced it.
    pub async fn invalidate(&self, used: &str) {
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|t| &*t.value == used) {
            state.token = None;
        }
    }

    async fn renew(&self, state: &mut State) -> Result<Arc<str>, ClientError> {
        let token_url = match &state.token_url {
            Some(u) => u.clone(),
            None => {
                let (u, only) = self.discover().await?;
                if let Some(scope) = only.and_then(|syn| in_syntax(&self.cfg.scope, syn)) {
                    tracing::info!(
                        scope = %scope,
                        "The server lists one scope syntax only; requesting the scope in it."
                    );
                    state.scope = Some(scope);
                }
                state.token_url = Some(u.clone());
                u
            }
        };
        if token_url.scheme() != "https"
            && !is_loopback(&token_url)
            && !self.cfg.allow_insecure_http
        {
            return Err(auth_err(
                &token_url,
                "refusing to send a client assertion to a plain-HTTP token endpoint that is not on \
                 loopback (use https, or --allow-insecure-http if you really mean it)",
            ));
        }
        let mut requested = state
            .scope
            .clone()
            .unwrap_or_else(|| self.cfg.scope.clone());
        let (value, expires_in, scope) = self.request_token(&token_url, &mut requested).await?;
        let granted = scope.clone().unwrap_or_else(|| requested.clone());
        let missing: Vec<&str> = requested
            .split_whitespace()
            .filter(|r| !scope_granted(&granted, r))
            .collect();
        if !missing.is_empty() && state.granted.as_deref() != Some(granted.as_str()) {
            tracing::warn!(
                granted = %granted,
                not_granted = %missing.join(" "),
                "The token endpoint granted fewer scopes than requested: the server may leave \
                 out the resource types the token does not cover."
            );
        }
        state.granted = Some(granted);
        if requested != self.cfg.scope {
            state.scope = Some(requested);
        }
        let lifetime = Duration::from_secs(expires_in);
        let margin = (lifetime / 4).min(MAX_RENEW_MARGIN);
        state.token = Some(Cached {
            value: value.clone(),
            renew_at: Instant::now() + lifetime - margin,
        });
        state.issued += 1;
        tracing::info!(
            expires_in,
            scope = scope.as_deref().unwrap_or(""),
            "Obtained an access token."
        );
        Ok(value)
    }

    /// The token endpoint from `.well-known/smart-configuration` (with the one scope syntax it
    /// lists, if it lists only one), else from the CapabilityStatement's OAuth extension.
    async fn discover(&self) -> Result<(Url, Option<Syntax>), ClientError> {
        let well_known = self.join(".well-known/smart-configuration")?;
        let mut tried = Vec::new();
        match self.get_json(&well_known).await {
            Ok(conf) => {
                if let Some(t) = conf.get("token_endpoint").and_then(Value::as_str) {
                    let url = self.resolve(t, &well_known)?;
                    if let Some(algs) = conf
                        .get("token_endpoint_auth_signing_alg_values_supported")
                        .and_then(Value::as_array)
                    {
                        let alg = self.cfg.key.alg().as_str();
                        if !algs.iter().any(|a| a.as_str() == Some(alg)) {
                            let listed: Vec<&str> = algs.iter().filter_map(Value::as_str).collect();
                            return Err(auth_err(
                                &well_known,
                                format!(
                                    "the server does not accept {alg} client assertions (it lists \
                                     {}); use a key for one of those",
                                    listed.join(", ")
                                ),
                            ));
                        }
                    }
                    tracing::debug!(token_url = %redact(&url), "Discovered the token endpoint.");
                    return Ok((url, only_syntax(&conf)));
                }
                tried.push(format!("{} has no token_endpoint", redact(&well_known)));
            }
            Err(e) => tried.push(e),
        }
        let metadata = self.join("metadata")?;
        match self.get_json(&metadata).await {
            Ok(cs) => {
                if let Some(t) = oauth_token_uri(&cs) {
                    return Ok((self.resolve(&t, &metadata)?, None));
                }
                tried.push(format!(
                    "{} has no OAuth token URI extension",
                    redact(&metadata)
                ));
            }
            Err(e) => tried.push(e),
        }
        Err(auth_err(
            &self.base,
            format!(
                "cannot find the token endpoint ({}); pass --token-url",
                tried.join("; ")
            ),
        ))
    }

    fn join(&self, path: &str) -> Result<Url, ClientError> {
        let mut base = self.base.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        base.join(path)
            .map_err(|e| ClientError::Invalid(format!("{path}: {e}")))
    }

    fn resolve(&self, s: &str, against: &Url) -> Result<Url, ClientError> {
        let url = against
            .join(s)
            .map_err(|e| auth_err(against, format!("bad token endpoint {s:?}: {e}")))?;
        match url.scheme() {
            "http" | "https" => Ok(url),
            other => Err(auth_err(
                against,
                format!("token endpoint scheme {other:?} is not http(s)"),
            )),
        }
    }

    async fn get_json(&self, url: &Url) -> Result<Value, String> {
        let resp = self
            .http
            .get(url.clone())
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", redact(url)))?;
        if !resp.status().is_success() {
            return Err(format!("GET {}: HTTP {}", redact(url), resp.status()));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("GET {}: {e}", redact(url)))?;
        serde_json::from_slice(&body).map_err(|e| format!("GET {}: not JSON: {e}", redact(url)))
    }

    /// One token request for `scope`, retried on network errors and 5xx. When the server
    /// refuses the scope (`invalid_scope`) and it has an exact equivalent in the other SMART
    /// syntax, that is tried once and left in `scope` (many servers accept only one syntax).
    async fn request_token(
        &self,
        token_url: &Url,
        scope: &mut String,
    ) -> Result<(Arc<str>, u64, Option<String>), ClientError> {
        let mut attempt = 0;
        let mut switched = false;
        loop {
            attempt += 1;
            // A fresh assertion (and jti) for every request, retries included.
            let assertion = self
                .cfg
                .key
                .assertion(
                    &self.cfg.client_id,
                    token_url.as_str(),
                    self.cfg.jku.as_deref(),
                )
                .map_err(|e| auth_err(token_url, e.to_string()))?;
            let form = [
                ("grant_type", "client_credentials"),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", assertion.as_str()),
                ("scope", scope.as_str()),
            ];
            let sent = self
                .http
                .post(token_url.clone())
                .header(ACCEPT, "application/json")
                .form(&form)
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    // The causes say why (a certificate, a refused connection); the URL is in
                    // the error already, without its query.
                    let why = super::http::error_chain(&e.without_url());
                    if attempt < TOKEN_ATTEMPTS {
                        tracing::warn!(error = %why, "Token request failed; retrying.");
                        tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
                        continue;
                    }
                    return Err(auth_err(token_url, format!("token request failed: {why}")));
                }
            };
            let status = resp.status();
            // Busy (429) or down (5xx): wait as asked (`Retry-After`, at most
            // MAX_TOKEN_RETRY_AFTER), else a little longer each time.
            if (status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS)
                && attempt < TOKEN_ATTEMPTS_WHEN_BUSY
            {
                let wait = super::http::retry_after(&resp)
                    .unwrap_or(Duration::from_secs(attempt as u64))
                    .min(MAX_TOKEN_RETRY_AFTER);
                tracing::warn!(%status, wait_seconds = wait.as_secs_f32(), "Token endpoint busy or failing; retrying.");
                tokio::time::sleep(wait).await;
                continue;
            }
            let is_json = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("json"));
            let body = resp
                .bytes()
                .await
                .map_err(|e| auth_err(token_url, format!("reading the token response: {e}")))?;
            let json: Option<Value> = serde_json::from_slice(&body).ok();
            if !status.is_success() {
                let code = json
                    .as_ref()
                    .and_then(|j| j.get("error")?.as_str().map(str::to_string));
                if code.as_deref() == Some("invalid_scope") && !switched {
                    let other = [Syntax::V2, Syntax::V1]
                        .into_iter()
                        .find_map(|syn| in_syntax(scope, syn));
                    if let Some(other) = other {
                        tracing::warn!(
                            refused = %scope,
                            retry = %other,
                            "The token endpoint refused the scope (invalid_scope); retrying in \
                             the other SMART scope syntax (--scope or --smart-v2 avoids this)."
                        );
                        *scope = other;
                        switched = true;
                        continue;
                    }
                }
                let detail = json
                    .as_ref()
                    .and_then(|j| {
                        let error = j.get("error")?.as_str()?;
                        let desc = j.get("error_description").and_then(Value::as_str);
                        Some(match desc {
                            Some(d) => format!("{error}: {}", clip(d)),
                            None => error.to_string(),
                        })
                    })
                    .unwrap_or_else(|| {
                        if is_json {
                            "no OAuth error in the response".into()
                        } else {
                            clip(String::from_utf8_lossy(&body).trim())
                        }
                    });
                return Err(auth_err(
                    token_url,
                    format!("the token endpoint answered HTTP {status} — {detail}"),
                ));
            }
            let json = json.ok_or_else(|| auth_err(token_url, "the token response is not JSON"))?;
            let token = json
                .get("access_token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| auth_err(token_url, "the token response has no access_token"))?;
            if let Some(tt) = json.get("token_type").and_then(Value::as_str)
                && !tt.eq_ignore_ascii_case("bearer")
            {
                return Err(auth_err(
                    token_url,
                    format!("token_type {tt:?} is not bearer"),
                ));
            }
            let expires_in = json
                .get("expires_in")
                .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
                .filter(|&s| s > 0)
                .unwrap_or(DEFAULT_EXPIRES_IN)
                // An absurd lifetime (1e19 s) overflowed the renewal time; a day is plenty.
                .min(MAX_EXPIRES_IN);
            let scope = json
                .get("scope")
                .and_then(Value::as_str)
                .map(str::to_string);
            return Ok((Arc::from(token), expires_in, scope));
        }
    }
}

fn clip(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).take(300).collect();
    s
}

/// `rest[].security.extension[oauth-uris].extension[token].valueUri` of a CapabilityStatement.
fn oauth_token_uri(cs: &Value) -> Option<String> {
    cs.get("rest")?.as_array()?.iter().find_map(|rest| {
        rest.get("security")?
            .get("extension")?
            .as_array()?
            .iter()
            .filter(|e| e.get("url").and_then(Value::as_str) == Some(OAUTH_URIS))
            .find_map(|e| {
                e.get("extension")?.as_array()?.iter().find_map(|sub| {
                    (sub.get("url")?.as_str()? == "token")
                        .then(|| sub.get("valueUri")?.as_str().map(str::to_string))?
                })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granted_scopes_are_read_per_type_and_syntax() {
        assert!(scope_reads("system/*.read", "Observation"));
        assert!(scope_reads("system/Patient.read launch", "Patient"));
        assert!(!scope_reads("system/Patient.read", "Observation"));
        assert!(scope_reads("system/Observation.rs", "Observation"));
        assert!(scope_reads("system/*.s", "Observation"));
        assert!(!scope_reads("system/*.cu", "Observation"));
        assert!(!scope_reads("system/*.write", "Observation"));
        assert!(scope_reads(
            "system/Observation.rs?category=laboratory",
            "Observation"
        ));
        assert!(!scope_reads("openid fhirUser", "Patient"));
        // The same scope in the other syntax counts as granted.
        assert!(scope_granted("system/*.rs", "system/*.read"));
        assert!(scope_granted("system/*.read other", "system/*.read"));
        assert!(!scope_granted("system/Patient.read", "system/*.read"));
    }

    #[test]
    fn scopes_convert_between_syntaxes_only_exactly() {
        use Syntax::{V1, V2};
        assert_eq!(
            in_syntax("system/*.read", V2).as_deref(),
            Some("system/*.rs")
        );
        assert_eq!(
            in_syntax("system/*.rs system/Group.rs", V1).as_deref(),
            Some("system/*.read system/Group.read")
        );
        assert_eq!(
            in_syntax("system/Patient.write system/*.*", V2).as_deref(),
            Some("system/Patient.cud system/*.cruds")
        );
        // Already in that syntax, no exact equivalent, or a v2 query: nothing to retry.
        assert_eq!(in_syntax("system/*.rs", V2), None);
        assert_eq!(in_syntax("system/Patient.r", V1), None);
        assert_eq!(in_syntax("system/Observation.rs?category=lab", V1), None);
        assert_eq!(in_syntax("", V1), None);
        let conf = |caps: Value| serde_json::json!({ "capabilities": caps });
        assert_eq!(
            only_syntax(&conf(serde_json::json!(["permission-v2"]))),
            Some(V2)
        );
        assert_eq!(
            only_syntax(&conf(serde_json::json!(["permission-v1"]))),
            Some(V1)
        );
        let both = serde_json::json!(["permission-v1", "permission-v2"]);
        assert_eq!(only_syntax(&conf(both)), None);
        assert_eq!(only_syntax(&serde_json::json!({})), None);
    }

    #[test]
    fn scopes_for_group_exports_include_group() {
        assert_eq!(export_scope(None, false, false), "system/*.read");
        assert_eq!(
            export_scope(None, false, true),
            "system/*.read system/Group.read"
        );
        assert_eq!(
            export_scope(None, true, true),
            "system/*.rs system/Group.rs"
        );
        assert_eq!(
            export_scope(Some("system/Patient.rs"), false, true),
            "system/Patient.rs system/Group.rs"
        );
    }

    #[test]
    fn oauth_extension_is_found() {
        let cs = serde_json::json!({"rest": [{"security": {"extension": [{
            "url": OAUTH_URIS,
            "extension": [{"url": "authorize", "valueUri": "https://a/auth"},
                          {"url": "token", "valueUri": "https://a/token"}]}]}}]});
        assert_eq!(oauth_token_uri(&cs).as_deref(), Some("https://a/token"));
    }

    #[test]
    fn loopback_detection() {
        for (u, want) in [
            ("http://127.0.0.1:8080/t", true),
            ("http://localhost/t", true),
            ("http://[::1]/t", true),
            ("http://ehr.example/t", false),
        ] {
            assert_eq!(is_loopback(&Url::parse(u).unwrap()), want, "{u}");
        }
    }
}
