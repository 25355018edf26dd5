//! Private keys (PEM or JWK/JWKS, RSA or EC P-384), their public JWKS, and client assertions.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p384::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::AuthError;

/// How far ahead a client assertion expires: under SMART's five-minute ceiling, with room for
/// clock skew between client and server.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(240);

/// RSA modulus size of generated keys.
const RSA_BITS: usize = 2048;

/// The two signing algorithms SMART Backend Services requires clients to support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum SigningAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    #[value(name = "RS384")]
    Rs384,
    /// ECDSA on P-384 with SHA-384.
    #[value(name = "ES384")]
    Es384,
}

impl SigningAlg {
    /// The JOSE name, `RS384` or `ES384`.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::Rs384 => "RS384",
            SigningAlg::Es384 => "ES384",
        }
    }
    /// The JWK `kty` of keys for this algorithm.
    pub fn kty(self) -> &'static str {
        match self {
            SigningAlg::Rs384 => "RSA",
            SigningAlg::Es384 => "EC",
        }
    }
    /// The `jsonwebtoken` algorithm.
    pub fn jwt(self) -> Algorithm {
        match self {
            SigningAlg::Rs384 => Algorithm::RS384,
            SigningAlg::Es384 => Algorithm::ES384,
        }
    }
    /// Parse a JOSE `alg` name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "RS384" => Some(SigningAlg::Rs384),
            "ES384" => Some(SigningAlg::Es384),
            _ => None,
        }
    }
}

impl std::fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The claims of a SMART client assertion (`iss` = `sub` = client id, `aud` = token URL).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssertionClaims {
    /// The client id.
    pub iss: String,
    /// The client id again.
    pub sub: String,
    /// The token endpoint URL.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// A fresh random nonce per assertion.
    pub jti: String,
}

enum Secret {
    Rsa(Box<rsa::RsaPrivateKey>),
    Ec(Box<p384::SecretKey>),
}

/// A private signing key with its algorithm and `kid`.
pub struct PrivateKey {
    alg: SigningAlg,
    kid: String,
    encoding: EncodingKey,
    public_jwk: Value,
    secret: Secret,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The RFC 7638 thumbprint of a public JWK (SHA-256 of its required members, base64url):
/// a stable `kid` for keys that come without one.
pub fn jwk_thumbprint(jwk: &Value) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    let canonical = match s("kty")? {
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e")?, s("n")?),
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            s("crv")?,
            s("x")?,
            s("y")?
        ),
        _ => return None,
    };
    Some(b64(&Sha256::digest(canonical.as_bytes())))
}

impl PrivateKey {
    fn from_secret(secret: Secret, kid: Option<String>, what: &str) -> Result<Self, AuthError> {
        let key_err = |message: String| AuthError::Key {
            what: what.to_string(),
            message,
        };
        let (alg, encoding, mut public_jwk) = match &secret {
            Secret::Rsa(k) => {
                if k.size() * 8 < RSA_BITS {
                    return Err(key_err(format!(
                        "an RSA key of {} bits is too small (at least {RSA_BITS})",
                        k.size() * 8
                    )));
                }
                let der = k.to_pkcs1_der().map_err(|e| key_err(e.to_string()))?;
                let jwk = json!({
                    "kty": "RSA",
                    "n": b64(&k.n().to_bytes_be()),
                    "e": b64(&k.e().to_bytes_be()),
                });
                (
                    SigningAlg::Rs384,
                    EncodingKey::from_rsa_der(der.as_bytes()),
                    jwk,
                )
            }
            Secret::Ec(k) => {
                let der = k.to_pkcs8_der().map_err(|e| key_err(e.to_string()))?;
                let point = k.public_key().to_encoded_point(false);
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    return Err(key_err("the EC public key is the identity point".into()));
                };
                let jwk = json!({ "kty": "EC", "crv": "P-384", "x": b64(x), "y": b64(y) });
                (
                    SigningAlg::Es384,
                    EncodingKey::from_ec_der(der.as_bytes()),
                    jwk,
                )
            }
        };
        let kid = match kid {
            Some(k) => k,
            None => jwk_thumbprint(&public_jwk).ok_or_else(|| key_err("no thumbprint".into()))?,
        };
        let obj = public_jwk.as_object_mut().expect("built as an object");
        obj.insert("kid".into(), Value::String(kid.clone()));
        obj.insert("alg".into(), Value::String(alg.as_str().into()));
        obj.insert("use".into(), Value::String("sig".into()));
        obj.insert("key_ops".into(), json!(["verify"]));
        Ok(PrivateKey {
            alg,
            kid,
            encoding,
            public_jwk,
            secret,
        })
    }

    /// Read a key file: PEM (PKCS#8, PKCS#1 RSA or SEC1 EC) or JSON (one private JWK, or a
    /// JWKS from which the key with `kid` — or the only private key — is taken). `kid`
    /// overrides the key's own; a PEM key without one gets its JWK thumbprint.
    pub fn load(path: &Path, kid: Option<&str>) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let what = path.display().to_string();
        if text.trim_start().starts_with('{') {
            Self::from_jwk_text(&text, kid, &what)
        } else {
            Self::from_pem(&text, kid.map(str::to_string), &what)
        }
    }

    /// A key from PEM text.
    pub fn from_pem(pem: &str, kid: Option<String>, what: &str) -> Result<Self, AuthError> {
        let key_err = |message: &str| AuthError::Key {
            what: what.to_string(),
            message: message.to_string(),
        };
        let secret = if pem.contains("BEGIN RSA PRIVATE KEY") {
            Secret::Rsa(Box::new(
                rsa::RsaPrivateKey::from_pkcs1_pem(pem)
                    .map_err(|_| key_err("not a valid PKCS#1 RSA private key"))?,
            ))
        } else if pem.contains("BEGIN EC PRIVATE KEY") {
            Secret::Ec(Box::new(p384::SecretKey::from_sec1_pem(pem).map_err(
                |_| key_err("not a valid P-384 EC private key (ES384 needs curve P-384)"),
            )?))
        } else if pem.contains("BEGIN PRIVATE KEY") {
            if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(pem) {
                Secret::Rsa(Box::new(k))
            } else if let Ok(k) = p384::SecretKey::from_pkcs8_pem(pem) {
                Secret::Ec(Box::new(k))
            } else {
                return Err(key_err(
                    "a PKCS#8 key that is neither RSA nor EC P-384 (SMART needs RS384 or ES384)",
                ));
            }
        } else if pem.contains("ENCRYPTED PRIVATE KEY") {
            return Err(key_err(
                "encrypted keys are not supported; decrypt it (openssl pkcs8 -nocrypt)",
            ));
        } else {
            return Err(key_err(
                "no PEM private key found (expected BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or \
                 BEGIN EC PRIVATE KEY)",
            ));
        };
        Self::from_secret(secret, kid, what)
    }

    /// A key from JWK or JWKS JSON text.
    pub fn from_jwk_text(text: &str, kid: Option<&str>, what: &str) -> Result<Self, AuthError> {
        let key_err = |message: String| AuthError::Key {
            what: what.to_string(),
            message,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| key_err(format!("bad JSON: {e}")))?;
        let candidates: Vec<&Value> = match v.get("keys").and_then(Value::as_array) {
            Some(keys) => keys.iter().collect(),
            None => vec![&v],
        };
        let private: Vec<&Value> = candidates
            .into_iter()
            .filter(|k| k.get("d").is_some())
            .filter(|k| kid.is_none_or(|want| k.get("kid").and_then(Value::as_str) == Some(want)))
            .collect();
        let jwk = match (private.as_slice(), kid) {
            ([one], _) => *one,
            ([], Some(k)) => return Err(key_err(format!("no private key with kid {k:?}"))),
            ([], None) => return Err(key_err("no private key (a JWK with \"d\")".into())),
            (_, _) => {
                return Err(key_err(
                    "several private keys; choose one with --kid".into(),
                ));
            }
        };
        let own_kid = jwk.get("kid").and_then(Value::as_str).map(str::to_string);
        let field = |name: &str| -> Result<Vec<u8>, AuthError> {
            let s = jwk
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| key_err(format!("the JWK has no {name:?}")))?;
            URL_SAFE_NO_PAD
                .decode(s.trim_end_matches('='))
                .map_err(|_| key_err(format!("the JWK's {name:?} is not base64url")))
        };
        let secret = match jwk.get("kty").and_then(Value::as_str) {
            Some("RSA") => {
                let big = |n: &str| field(n).map(|b| rsa::BigUint::from_bytes_be(&b));
                let k = rsa::RsaPrivateKey::from_components(
                    big("n")?,
                    big("e")?,
                    big("d")?,
                    vec![big("p")?, big("q")?],
                )
                .map_err(|e| key_err(format!("invalid RSA JWK: {e}")))?;
                Secret::Rsa(Box::new(k))
            }
            Some("EC") => {
                if jwk.get("crv").and_then(Value::as_str) != Some("P-384") {
                    return Err(key_err("ES384 needs an EC key on curve P-384".into()));
                }
                let k = p384::SecretKey::from_slice(&field("d")?)
                    .map_err(|_| key_err("invalid EC private key".into()))?;
                Secret::Ec(Box::new(k))
            }
            other => {
                return Err(key_err(format!(
                    "unsupported key type {other:?} (RSA or EC P-384)"
                )));
            }
        };
        Self::from_secret(secret, kid.map(str::to_string).or(own_kid), what)
    }

    /// A new random key: RSA 2048 for RS384, P-384 for ES384.
    pub fn generate(alg: SigningAlg) -> Result<Self, AuthError> {
        let mut rng = rand_core::OsRng;
        let secret = match alg {
            SigningAlg::Rs384 => Secret::Rsa(Box::new(
                rsa::RsaPrivateKey::new(&mut rng, RSA_BITS)
                    .map_err(|e| AuthError::Sign(format!("RSA key generation failed: {e}")))?,
            )),
            SigningAlg::Es384 => Secret::Ec(Box::new(p384::SecretKey::random(&mut rng))),
        };
        Self::from_secret(secret, None, "generated key")
    }

    /// The signing algorithm.
    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// The key id sent in the assertion header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half as a JWK (`kty`, `kid`, `alg`, `use`, and `n`/`e` or `crv`/`x`/`y`).
    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// The public JWKS to register with the server.
    pub fn public_jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk.clone()] })
    }

    /// The private key as PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> Result<String, AuthError> {
        let err = |e: String| AuthError::Key {
            what: self.kid.clone(),
            message: e,
        };
        let pem = match &self.secret {
            Secret::Rsa(k) => k.to_pkcs8_pem(LineEnding::LF),
            Secret::Ec(k) => k.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(|e| err(e.to_string()))?;
        Ok(pem.as_str().to_string())
    }

    /// A signed client assertion for the token endpoint `aud`, valid for
    /// [`ASSERTION_LIFETIME`], with a fresh random `jti`.
    pub fn assertion(
        &self,
        client_id: &str,
        aud: &str,
        jku: Option<&str>,
    ) -> Result<String, AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = AssertionClaims {
            iss: client_id.to_string(),
            sub: client_id.to_string(),
            aud: aud.to_string(),
            exp: now + ASSERTION_LIFETIME.as_secs(),
            iat: Some(now),
            jti: random_hex(16),
        };
        self.sign(&claims, jku)
    }

    /// Sign arbitrary assertion claims (tests use this to build bad assertions).
    pub fn sign(&self, claims: &AssertionClaims, jku: Option<&str>) -> Result<String, AuthError> {
        let mut header = Header::new(self.alg.jwt());
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid.clone());
        header.jku = jku.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Sign(e.to_string()))
    }
}

/// `n` random bytes as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Write a new key pair into `dir`: `private-key.pem` (PKCS#8, mode 0600 on Unix) and
/// `jwks.json` (the public JWKS to register). Refuses to overwrite unless `force`.
pub fn generate_key_files(
    alg: SigningAlg,
    dir: &Path,
    force: bool,
) -> Result<(PrivateKey, PathBuf, PathBuf), AuthError> {
    let io = |path: &Path, source: std::io::Error| AuthError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let key_path = dir.join("private-key.pem");
    let jwks_path = dir.join("jwks.json");
    if !force {
        for p in [&key_path, &jwks_path] {
            if p.exists() {
                return Err(AuthError::Key {
                    what: p.display().to_string(),
                    message: "already exists (use --force to replace it)".into(),
                });
            }
        }
    }
    let key = PrivateKey::generate(alg)?;
    let pem = key.to_pkcs8_pem()?;
    write_private(&key_path, pem.as_bytes()).map_err(|e| io(&key_path, e))?;
    let jwks = serde_json::to_string_pretty(&key.public_jwks()).expect("JSON value");
    std::fs::write(&jwks_path, jwks + "\n").map_err(|e| io(&jwks_path, e))?;
    Ok((key, key_path, jwks_path))
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Log a warning when a private key file can be read by group or others.
pub fn warn_if_key_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "The private key file is readable by other users; chmod 600 it."
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem_and_sign() {
        for alg in [SigningAlg::Es384, SigningAlg::Rs384] {
            let key = PrivateKey::generate(alg).unwrap();
            let pem = key.to_pkcs8_pem().unwrap();
            let again = PrivateKey::from_pem(&pem, None, "test").unwrap();
            assert_eq!(again.kid(), key.kid(), "kid is the thumbprint, stable");
            assert_eq!(again.alg(), alg);
            let jwt = again
                .assertion("client-1", "https://x/token", None)
                .unwrap();
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(key.public_jwk().clone()).unwrap();
            let dk = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg.jwt());
            v.set_audience(&["https://x/token"]);
            let data = jsonwebtoken::decode::<AssertionClaims>(&jwt, &dk, &v).unwrap();
            assert_eq!(data.claims.iss, "client-1");
            assert_eq!(data.claims.sub, "client-1");
            assert_eq!(data.header.typ.as_deref(), Some("JWT"));
            assert_eq!(data.header.kid.as_deref(), Some(key.kid()));
            assert_eq!(data.claims.jti.len(), 32);
            let other = again
                .assertion("client-1", "https://x/token", None)
                .unwrap();
            let c2 = jsonwebtoken::decode::<AssertionClaims>(&other, &dk, &v).unwrap();
            assert_ne!(c2.claims.jti, data.claims.jti, "fresh jti each time");
            assert!(!format!("{key:?}").contains(&pem[40..80]));
        }
    }

    #[test]
    fn private_jwk_and_jwks_are_accepted_and_chosen_by_kid() {
        let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
        let Secret::Ec(secret) = &key.secret else {
            unreachable!()
        };
        let mut private = key.public_jwk().clone();
        private["d"] = Value::String(b64(&secret.to_bytes()));
        let jwks = json!({ "keys": [
            { "kty": "EC", "crv": "P-384", "kid": "public-only", "x": private["x"], "y": private["y"] },
            private,
        ]});
        let text = jwks.to_string();
        let k = PrivateKey::from_jwk_text(&text, None, "jwks").unwrap();
        assert_eq!(k.kid(), key.kid());
        assert!(PrivateKey::from_jwk_text(&text, Some("nope"), "jwks").is_err());
        let err = PrivateKey::from_pem("hello", None, "k.pem").unwrap_err();
        assert!(err.to_string().contains("k.pem"), "{err}");
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 §3.1.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            jwk_thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }
}
