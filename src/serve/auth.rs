//! SMART Backend Services on the built-in server: `.well-known/smart-configuration`, a token
//! endpoint that verifies client assertions, and the access checks of the FHIR endpoints.
//!
//! The token endpoint checks what SMART asks a server to check (RFC 7523 + the SMART rules):
//! form content, `grant_type`, `client_assertion_type`, header `alg` (RS384/ES384), `kid` and
//! `typ`, the signature with the registered key of that `kid` and a `kty` matching `alg`, `iss`
//! = `sub` = a registered client, `aud` = this token URL, `exp` not past and at most five
//! minutes ahead, and `jti` not used before. It grants the intersection of the requested and
//! the allowed scopes and issues an opaque random token with a configurable lifetime — short
//! lifetimes make "token expires mid-export" testable. Every failure is an OAuth error
//! (`invalid_client`, `invalid_request`, `invalid_scope`, …) whose description names the cause.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::json;

use super::ServeError;
use super::outcome::Issue;
use super::server::{AppState, lock};
use crate::auth::{AssertionClaims, SigningAlg};

/// Default lifetime of issued access tokens (SMART's recommended five minutes).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Scopes a registered client may get unless told otherwise: read everything, v1 or v2 syntax.
pub const DEFAULT_ALLOWED_SCOPES: &[&str] = &["system/*.read", "system/*.rs"];
/// The longest an assertion may live (`exp` − now), per SMART.
const MAX_ASSERTION_LIFETIME: u64 = 300;
/// Clock-skew allowance on `exp`.
const LEEWAY: u64 = 30;

/// A client registered with the token endpoint: its public keys and the scopes it may get.
#[derive(Debug, Clone)]
pub struct AuthClient {
    /// The client id; `None` accepts any `iss` whose assertion verifies with these keys.
    pub id: Option<String>,
    /// The client's public keys (selected by `kid`).
    pub jwks: JwkSet,
    /// Scopes the client may be granted (default [`DEFAULT_ALLOWED_SCOPES`]).
    pub allowed_scopes: Vec<String>,
}

impl AuthClient {
    /// A client from a JWKS (JSON text); private members of the keys are ignored.
    pub fn from_jwks_json(id: Option<String>, text: &str) -> Result<Self, ServeError> {
        let jwks: JwkSet = serde_json::from_str(text)
            .or_else(|_| {
                // A single JWK is accepted too.
                serde_json::from_str(text).map(|k| JwkSet { keys: vec![k] })
            })
            .map_err(|e| ServeError::Config(format!("not a JWKS or JWK: {e}")))?;
        if jwks.keys.is_empty() {
            return Err(ServeError::Config("the JWKS has no keys".into()));
        }
        if let Some(k) = jwks.keys.iter().find(|k| k.common.key_id.is_none()) {
            return Err(ServeError::Config(format!(
                "every key needs a kid (SMART); one has none: {:?}",
                k.common.public_key_use
            )));
        }
        Ok(AuthClient {
            id,
            jwks,
            allowed_scopes: DEFAULT_ALLOWED_SCOPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        })
    }

    /// Read a JWKS file.
    pub fn from_jwks_file(id: Option<String>, path: &std::path::Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServeError::Config(format!("{}: {e}", path.display())))?;
        Self::from_jwks_json(id, &text)
            .map_err(|e| ServeError::Config(format!("{}: {e}", path.display())))
    }

    /// Replace the scopes this client may be granted.
    pub fn with_allowed_scopes(mut self, scopes: Vec<String>) -> Self {
        self.allowed_scopes = scopes;
        self
    }
}

/// SMART settings of a server.
#[derive(Debug, Clone)]
pub(super) struct SmartSettings {
    pub clients: Vec<AuthClient>,
    pub token_lifetime: Duration,
    pub scope_syntax: ScopeSyntax,
}

/// The SMART scope syntaxes the token endpoint accepts (and `smart-configuration` lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScopeSyntax {
    /// v1 (`system/*.read`) and v2 (`system/*.rs`): what SMART asks servers to support.
    #[default]
    Both,
    /// v1 only, like servers built before SMART 2.
    V1,
    /// v2 only: a v1 scope is refused with `invalid_scope`.
    V2,
}

impl ScopeSyntax {
    /// Whether `scope` is written in an accepted syntax.
    fn accepts(self, scope: &str) -> bool {
        let v1 = scope
            .rsplit_once('.')
            .is_some_and(|(_, p)| matches!(p, "read" | "write" | "*"));
        match self {
            ScopeSyntax::Both => true,
            ScopeSyntax::V1 => v1,
            ScopeSyntax::V2 => !v1,
        }
    }
}

/// An issued access token.
#[derive(Debug, Clone)]
pub(super) struct Grant {
    pub scopes: Vec<String>,
    expires: Instant,
}

/// Issued tokens and used assertion ids.
#[derive(Debug, Default)]
pub(super) struct AuthState {
    tokens: Mutex<HashMap<String, Grant>>,
    jtis: Mutex<HashMap<String, u64>>,
    issued: Mutex<Vec<String>>,
}

impl AuthState {
    /// Tokens issued so far.
    pub fn issued(&self) -> u64 {
        lock(&self.issued).len() as u64
    }
    /// Every token issued so far.
    pub fn all_issued(&self) -> Vec<String> {
        lock(&self.issued).clone()
    }
}

/// Forget the request's token (the `file_401` fault).
pub(super) fn revoke(state: &AppState, headers: &HeaderMap) {
    if let Some(t) = bearer(headers) {
        lock(&state.auth.tokens).remove(t);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A scope as (resource type or `*`, permission letters from `cruds`), `system/` only.
fn parse_scope(s: &str) -> Option<(&str, String)> {
    let rest = s.strip_prefix("system/")?;
    let (ty, perm) = rest.split_once('.')?;
    let perm = perm.split('?').next()?;
    let letters = match perm {
        "read" => "rs".to_string(),
        "write" => "cud".to_string(),
        "*" => "cruds".to_string(),
        p if !p.is_empty() && is_in_order_subset(p, "cruds") => p.to_string(),
        _ => return None,
    };
    Some((ty, letters))
}

fn is_in_order_subset(p: &str, of: &str) -> bool {
    let mut it = of.chars();
    p.chars().all(|c| it.by_ref().any(|o| o == c))
}

/// Whether scope `big` grants everything scope `small` does.
fn includes(big: &str, small: &str) -> bool {
    match (parse_scope(big), parse_scope(small)) {
        (Some((bt, bp)), Some((st, sp))) => {
            (bt == "*" || bt == st) && sp.chars().all(|c| bp.contains(c))
        }
        _ => false,
    }
}

/// The intersection of requested and allowed scopes.
pub(super) fn grant_scopes(requested: &[&str], allowed: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in requested {
        if allowed.iter().any(|a| includes(a, r)) && !out.iter().any(|o| o == r) {
            out.push(r.to_string());
        }
    }
    for a in allowed {
        if requested.iter().any(|r| includes(r, a)) && !out.iter().any(|o| includes(o, a)) {
            out.push(a.clone());
        }
    }
    out
}

/// Whether `scopes` allow reading resources of type `ty`.
pub(super) fn covers_read(scopes: &[String], ty: &str) -> bool {
    scopes
        .iter()
        .any(|s| parse_scope(s).is_some_and(|(t, p)| (t == "*" || t == ty) && p.contains('r')))
}

/// An OAuth error response (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &str, description: impl Into<String>) -> Response {
    let description = description.into();
    tracing::debug!(error, description = %description, "Token request refused.");
    let mut resp = (
        status,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn invalid_client(description: impl Into<String>) -> Response {
    oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description)
}

/// `GET [base]/.well-known/smart-configuration`.
pub(super) async fn smart_configuration(State(state): State<Arc<AppState>>) -> Response {
    let Some(smart) = state.config.smart() else {
        return Issue::error("not-found", "this server does not use SMART authorization")
            .response(StatusCode::NOT_FOUND);
    };
    let (scopes, permissions) = match smart.scope_syntax {
        ScopeSyntax::Both => (
            &["system/*.read", "system/*.rs"][..],
            &["permission-v1", "permission-v2"][..],
        ),
        ScopeSyntax::V1 => (&["system/*.read"][..], &["permission-v1"][..]),
        ScopeSyntax::V2 => (&["system/*.rs"][..], &["permission-v2"][..]),
    };
    let mut capabilities = vec!["client-confidential-asymmetric"];
    capabilities.extend_from_slice(permissions);
    axum::Json(json!({
        "issuer": state.base_url.as_str(),
        "token_endpoint": state.token_url().as_str(),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": scopes,
        "capabilities": capabilities,
    }))
    .into_response()
}

/// `POST /auth/token`: verify the client assertion and issue an access token.
pub(super) async fn token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(smart) = state.config.smart() else {
        return Issue::error("not-found", "this server does not use SMART authorization")
            .response(StatusCode::NOT_FOUND);
    };
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        );
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str);
    if field("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    if field("client_assertion_type") != Some(crate::client::smart::ASSERTION_TYPE) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "client_assertion_type must be {}",
                crate::client::smart::ASSERTION_TYPE
            ),
        );
    }
    let Some(assertion) = field("client_assertion") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_assertion is missing",
        );
    };
    let client = match verify_assertion(&state, smart, assertion) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let requested: Vec<&str> = field("scope").unwrap_or("").split_whitespace().collect();
    if requested.is_empty() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", "scope is missing");
    }
    if let Some(other) = requested.iter().find(|r| !smart.scope_syntax.accepts(r)) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!(
                "scope {other} is not in the SMART {} syntax this server accepts",
                if smart.scope_syntax == ScopeSyntax::V1 {
                    "v1"
                } else {
                    "v2"
                }
            ),
        );
    }
    let scopes = grant_scopes(&requested, &client.allowed_scopes);
    if scopes.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!(
                "none of the requested scopes ({}) is allowed for this client (allowed: {})",
                requested.join(" "),
                client.allowed_scopes.join(" ")
            ),
        );
    }
    let access_token = crate::auth::random_hex(32);
    let lifetime = smart.token_lifetime.max(Duration::from_secs(1));
    lock(&state.auth.tokens).insert(
        access_token.clone(),
        Grant {
            scopes: scopes.clone(),
            expires: Instant::now() + lifetime,
        },
    );
    lock(&state.auth.issued).push(access_token.clone());
    let mut resp = axum::Json(json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": lifetime.as_secs(),
        "scope": scopes.join(" "),
    }))
    .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Check a client assertion; the registered client it belongs to, or an OAuth error.
// The error is the HTTP response itself, built once per refused request.
#[allow(clippy::result_large_err)]
fn verify_assertion<'a>(
    state: &AppState,
    smart: &'a SmartSettings,
    assertion: &str,
) -> Result<&'a AuthClient, Response> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|e| invalid_client(format!("the client assertion is not a JWT: {e}")))?;
    let alg_name = format!("{:?}", header.alg);
    let alg = SigningAlg::parse(&alg_name).ok_or_else(|| {
        invalid_client(format!(
            "assertion alg {alg_name} is not supported (RS384 or ES384)"
        ))
    })?;
    if header.typ.as_deref() != Some("JWT") {
        return Err(invalid_client("the assertion header needs typ \"JWT\""));
    }
    let kid = header
        .kid
        .as_deref()
        .ok_or_else(|| invalid_client("the assertion header has no kid"))?;
    if header.jku.is_some() {
        return Err(invalid_client(
            "jku is not supported here: register the JWKS with the server instead",
        ));
    }
    let unverified: AssertionClaims = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
        .map_err(|e| invalid_client(format!("the assertion claims are invalid: {e}")))?;
    let iss = unverified.iss.clone();
    let candidates: Vec<(&AuthClient, &jsonwebtoken::jwk::Jwk)> = smart
        .clients
        .iter()
        .filter(|c| c.id.as_deref().is_none_or(|id| id == iss))
        .flat_map(|c| c.jwks.keys.iter().map(move |k| (c, k)))
        .filter(|(_, k)| k.common.key_id.as_deref() == Some(kid))
        .filter(|(_, k)| {
            matches!(
                (&k.algorithm, alg),
                (AlgorithmParameters::RSA(_), SigningAlg::Rs384)
                    | (AlgorithmParameters::EllipticCurve(_), SigningAlg::Es384)
            )
        })
        .collect();
    let (client, jwk) = match candidates.as_slice() {
        [one] => *one,
        [] => {
            return Err(invalid_client(format!(
                "no registered {} key with kid {kid:?} for client {iss:?}",
                alg.kty()
            )));
        }
        _ => {
            return Err(invalid_client(format!(
                "several registered keys match kid {kid:?}"
            )));
        }
    };
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|e| invalid_client(format!("the registered key {kid:?} is unusable: {e}")))?;
    let token_url = state.token_url();
    let mut validation = Validation::new(alg.jwt());
    validation.set_audience(&[token_url.as_str()]);
    validation.set_issuer(&[iss.as_str()]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    validation.leeway = LEEWAY;
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
        .map_err(|e| {
            invalid_client(match e.kind() {
                ErrorKind::InvalidSignature => {
                    format!("the assertion signature does not verify with the key {kid:?}")
                }
                ErrorKind::ExpiredSignature => "the client assertion has expired".into(),
                ErrorKind::InvalidAudience => {
                    format!("the assertion aud must be the token URL {token_url}")
                }
                ErrorKind::InvalidIssuer => "the assertion iss is wrong".into(),
                other => format!("the client assertion is invalid: {other:?}"),
            })
        })?
        .claims;
    if claims.sub != claims.iss {
        return Err(invalid_client(
            "the assertion sub must equal iss (the client id)",
        ));
    }
    let now = now_secs();
    if claims.exp > now + MAX_ASSERTION_LIFETIME + LEEWAY {
        return Err(invalid_client(
            "the assertion exp is more than five minutes in the future",
        ));
    }
    if claims.jti.is_empty() {
        return Err(invalid_client("the assertion has no jti"));
    }
    let mut jtis = lock(&state.auth.jtis);
    jtis.retain(|_, exp| *exp + LEEWAY >= now);
    let key = format!("{}\u{0}{}", claims.iss, claims.jti);
    if jtis.contains_key(&key) {
        return Err(invalid_client(
            "the assertion jti was already used (replayed assertion)",
        ));
    }
    jtis.insert(key, claims.exp);
    Ok(client)
}

/// The grant of the request's bearer token, or a `401`.
#[allow(clippy::result_large_err)]
pub(super) fn check_token(state: &AppState, headers: &HeaderMap) -> Result<Grant, Response> {
    let given = bearer(headers);
    let grant = given.and_then(|t| {
        let mut tokens = lock(&state.auth.tokens);
        let now = Instant::now();
        tokens.retain(|_, g| g.expires > now);
        tokens.get(t).cloned()
    });
    grant.ok_or_else(|| {
        let (code, text) = if given.is_some() {
            ("invalid_token", "the access token is invalid or expired")
        } else {
            ("invalid_request", "an access token is required")
        };
        let mut resp = Issue::error("login", text).response(StatusCode::UNAUTHORIZED);
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer error=\"{code}\"")) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    })
}

/// The bearer token of a request.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_intersect() {
        let allowed = vec!["system/Patient.read".to_string()];
        assert_eq!(
            grant_scopes(&["system/*.read"], &allowed),
            vec!["system/Patient.read"]
        );
        let all: Vec<String> = DEFAULT_ALLOWED_SCOPES
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            grant_scopes(&["system/*.read", "system/Group.read"], &all),
            vec!["system/*.read", "system/Group.read"]
        );
        assert_eq!(grant_scopes(&["system/*.rs"], &all), vec!["system/*.rs"]);
        assert!(grant_scopes(&["system/*.write"], &all).is_empty());
        assert!(grant_scopes(&["patient/*.read"], &all).is_empty());
        assert!(covers_read(&allowed, "Patient"));
        assert!(!covers_read(&allowed, "Observation"));
        assert!(covers_read(&["system/*.rs".into()], "Observation"));
        assert!(!covers_read(&["system/*.cu".into()], "Observation"));
        assert!(parse_scope("system/Patient.sr").is_none(), "out of order");
    }
}
