//! SMART Backend Services between the export client and the built-in server, over real HTTP on
//! 127.0.0.1: both signing algorithms, renewal when tokens expire mid-export and on a `401`, the
//! errors a user sees for each way authorization fails, and no secret in the logs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flatfhir::{
    auth::{AssertionClaims, PrivateKey, SigningAlg},
    client::{Auth, SmartAuth, SmartConfig, smart::ASSERTION_TYPE},
    serve::{AuthClient, Faults, RunningServer, ScopeSyntax},
};

use crate::export::{assert_exact, export, patients, server, with_fault};

fn registered(id: &str, key: &PrivateKey) -> AuthClient {
    AuthClient::from_jwks_json(Some(id.into()), &key.public_jwks().to_string()).unwrap()
}

fn smart(srv: &RunningServer, client_id: &str, key: PrivateKey, scope: &str) -> Auth {
    let cfg = SmartConfig {
        scope: scope.into(),
        ..SmartConfig::new(client_id, key)
    };
    Auth::Smart(Arc::new(
        SmartAuth::new(cfg, srv.base_url().clone()).unwrap(),
    ))
}

/// A copy of `key` (same secret) that announces `kid`.
fn with_kid(key: &PrivateKey, kid: &str) -> PrivateKey {
    PrivateKey::from_pem(&key.to_pkcs8_pem().unwrap(), Some(kid.into()), "test").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs384_and_es384_exports_with_exact_counts() {
    for alg in [SigningAlg::Rs384, SigningAlg::Es384] {
        let key = PrivateKey::generate(alg).unwrap();
        let srv = server(Faults::default(), |b| {
            b.with_smart_clients(vec![registered("client-1", &key)])
        })
        .await;
        // Without credentials the server says 401.
        let tmp = tempfile::tempdir().unwrap();
        let e = export(&srv, patients(), tmp.path(), Auth::None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("401"), "{e}");

        let tmp = tempfile::tempdir().unwrap();
        let auth = smart(&srv, "client-1", key, "system/*.read");
        export(&srv, patients(), tmp.path(), auth).await.unwrap();
        assert_exact(tmp.path(), &srv.counts()).await;
        assert_eq!(
            srv.tokens_issued(),
            1,
            "{alg}: one token for a short export"
        );
        let log = srv.log();
        let fhir: Vec<_> = log
            .iter()
            .filter(|r| r.path.contains("$export"))
            .filter(|r| r.status < 400)
            .collect();
        assert!(fhir.len() > 3);
        assert!(
            fhir.iter().all(|r| r.authorization),
            "{alg}: every kick-off, status and file request carries the token"
        );
        assert!(
            log.iter()
                .any(|r| r.path == "/fhir/.well-known/smart-configuration" && r.status == 200),
            "the token endpoint was discovered"
        );
        srv.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_shorter_than_the_export_are_renewed() {
    let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
    let srv = server(Faults::default(), |b| {
        b.with_smart_clients(vec![registered("c", &key)])
            .with_token_lifetime(Duration::from_secs(1))
            .with_delay(Duration::from_millis(2600))
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    export(
        &srv,
        patients(),
        tmp.path(),
        smart(&srv, "c", key, "system/*.rs"),
    )
    .await
    .unwrap();
    assert_exact(tmp.path(), &srv.counts()).await;
    assert!(
        srv.tokens_issued() >= 3,
        "a 1 s token over a ≥2.6 s export is renewed: {} tokens",
        srv.tokens_issued()
    );
    assert!(
        srv.log().iter().all(|r| r.status != 401),
        "renewed before expiry, never refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_a_file_renews_the_token_once() {
    let key = PrivateKey::generate(SigningAlg::Rs384).unwrap();
    let srv = server(Faults::default(), |b| {
        b.with_smart_clients(vec![registered("c", &key)])
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    export(
        &srv,
        with_fault("file-401"),
        tmp.path(),
        smart(&srv, "c", key, "system/*.read"),
    )
    .await
    .unwrap();
    assert_exact(tmp.path(), &srv.counts()).await;
    // Parallel downloads that all carried the revoked token renew it once (single-flight).
    assert_eq!(srv.tokens_issued(), 2);
    let refused: Vec<_> = srv.log().into_iter().filter(|r| r.status == 401).collect();
    assert!(!refused.is_empty(), "the fault fired");
    assert!(
        refused.iter().all(|r| r.path.contains("$export-file")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_failures_name_their_cause() {
    let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
    let registered_key = with_kid(&key, "k1");
    let narrow = registered("narrow", &registered_key)
        .with_allowed_scopes(vec!["system/Patient.read".into()]);
    let srv = server(Faults::default(), |b| {
        b.with_smart_clients(vec![registered("c", &registered_key), narrow])
    })
    .await;
    let run = |auth: Auth| {
        let srv = &srv;
        async move {
            let tmp = tempfile::tempdir().unwrap();
            export(srv, patients(), tmp.path(), auth)
                .await
                .unwrap_err()
                .to_string()
        }
    };

    // A different key that claims the registered kid.
    let impostor = with_kid(&PrivateKey::generate(SigningAlg::Es384).unwrap(), "k1");
    let e = run(smart(&srv, "c", impostor, "system/*.read")).await;
    assert!(
        e.contains("invalid_client") && e.contains("signature does not verify"),
        "{e}"
    );
    // An unknown kid.
    let e = run(smart(&srv, "c", key, "system/*.read")).await;
    assert!(e.contains("no registered EC key with kid"), "{e}");
    // An unknown client.
    let e = run(smart(
        &srv,
        "nobody",
        with_kid(&registered_key, "k1"),
        "system/*.read",
    ))
    .await;
    assert!(e.contains("invalid_client"), "{e}");
    // Scopes: nothing allowed → invalid_scope at the token endpoint; too narrow → 403 kick-off.
    let e = run(smart(
        &srv,
        "narrow",
        with_kid(&registered_key, "k1"),
        "system/Observation.read",
    ))
    .await;
    assert!(e.contains("invalid_scope"), "{e}");
    let e = run(smart(
        &srv,
        "narrow",
        with_kid(&registered_key, "k1"),
        "system/*.read",
    ))
    .await;
    assert!(
        e.contains("403") && e.contains("do not allow reading"),
        "{e}"
    );
    // An algorithm the server does not list.
    srv.shutdown().await;
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_checks_every_claim() {
    let key = PrivateKey::generate(SigningAlg::Rs384).unwrap();
    let srv = server(Faults::default(), |b| {
        b.with_smart_clients(vec![registered("c", &key)])
    })
    .await;
    let token_url = srv.token_url().to_string();
    let http = reqwest::Client::new();
    let post = |assertion: String, scope: &'static str| {
        let http = http.clone();
        let url = token_url.clone();
        async move {
            let r = http
                .post(url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", assertion.as_str()),
                    ("scope", scope),
                ])
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body)
        }
    };
    let claims = |exp: u64, aud: &str, jti: &str| AssertionClaims {
        iss: "c".into(),
        sub: "c".into(),
        aud: aud.into(),
        exp,
        iat: None,
        jti: jti.into(),
    };

    let good = key
        .sign(&claims(now() + 120, &token_url, "j1"), None)
        .unwrap();
    let (status, body) = post(good.clone(), "system/*.read").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["scope"], "system/*.read");
    assert!(body["expires_in"].as_u64().unwrap() <= 300);

    let cases = [
        (good, "already used"),
        (
            key.sign(&claims(now() - 600, &token_url, "j2"), None)
                .unwrap(),
            "expired",
        ),
        (
            key.sign(&claims(now() + 120, "https://elsewhere/token", "j3"), None)
                .unwrap(),
            "aud must be the token URL",
        ),
        (
            key.sign(&claims(now() + 3600, &token_url, "j4"), None)
                .unwrap(),
            "more than five minutes",
        ),
    ];
    for (assertion, want) in cases {
        let (status, body) = post(assertion, "system/*.read").await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"], "invalid_client");
        let desc = body["error_description"].as_str().unwrap();
        assert!(desc.contains(want), "{desc} should say {want:?}");
    }
    let other = key
        .sign(
            &AssertionClaims {
                sub: "someone-else".into(),
                ..claims(now() + 60, &token_url, "j5")
            },
            None,
        )
        .unwrap();
    let (_, body) = post(other, "system/*.read").await;
    assert!(body["error_description"].as_str().unwrap().contains("sub"));
    let fresh = key
        .sign(&claims(now() + 60, &token_url, "j6"), None)
        .unwrap();
    let (status, body) = post(fresh, "system/*.write").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope"))
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exports_with_a_generated_key_and_logs_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    let bin = env!("CARGO_BIN_EXE_flatfhir");
    let out = std::process::Command::new(bin)
        .args(["keys", "generate", "--alg", "RS384", "--out"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let kid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let key_file = keys.join("private-key.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let jwks = std::fs::read_to_string(keys.join("jwks.json")).unwrap();
    assert!(
        jwks.contains(&kid) && !jwks.contains("\"d\""),
        "public only"
    );
    let again = std::process::Command::new(bin)
        .args(["keys", "generate", "--out"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(!again.status.success(), "never overwrites a key silently");

    let client = AuthClient::from_jwks_json(Some("cli".into()), &jwks).unwrap();
    let srv = server(Faults::default(), |b| {
        b.with_smart_clients(vec![client])
            .with_token_lifetime(Duration::from_secs(1))
            .with_delay(Duration::from_millis(1500))
    })
    .await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let data = tmp.path().join("out");
    let base = srv.base_url().to_string();
    let args = [
        "export",
        "--base-url",
        base.as_str(),
        "--patients",
        "--client-id",
        "cli",
        "--private-key",
        key_file.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "-vvv",
    ]
    .map(String::from);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert_exact(&data, &srv.counts()).await;
    let tokens = srv.access_tokens();
    assert!(tokens.len() >= 2, "renewed at least once: {}", tokens.len());
    for t in &tokens {
        assert!(!stderr.contains(t.as_str()), "an access token was logged");
    }
    assert!(
        !stderr.contains("eyJ"),
        "a client assertion (JWT) was logged"
    );
    let pem = std::fs::read_to_string(&key_file).unwrap();
    let body_line = pem.lines().nth(1).unwrap();
    assert!(!stderr.contains(body_line), "the private key was logged");
    #[cfg(unix)]
    assert!(
        stderr.contains("readable by other users"),
        "warns about a world-readable key"
    );
    assert!(stderr.len() > 1000, "-vvv did log: {} bytes", stderr.len());
    srv.shutdown().await;
}

/// Statuses of the token requests the server saw, in order.
fn token_statuses(srv: &RunningServer) -> Vec<u16> {
    srv.log()
        .iter()
        .filter(|r| r.path == "/auth/token")
        .map(|r| r.status)
        .collect()
}

/// A server with client `c` (`key`) whose token endpoint accepts one scope `syntax`.
async fn one_syntax_server(key: &PrivateKey, syntax: ScopeSyntax) -> RunningServer {
    server(Faults::default(), |b| {
        b.with_smart_clients(vec![registered("c", key)])
            .with_scope_syntax(syntax)
    })
    .await
}

/// SMART auth as client `c` with the token endpoint given, so nothing is discovered.
fn smart_without_discovery(srv: &RunningServer, key: PrivateKey, scope: &str) -> Auth {
    let cfg = SmartConfig {
        scope: scope.into(),
        token_url: Some(srv.token_url()),
        ..SmartConfig::new("c", key)
    };
    Auth::Smart(Arc::new(
        SmartAuth::new(cfg, srv.base_url().clone()).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_in_the_refused_syntax_is_retried_in_the_other() {
    for (syntax, asked) in [
        (ScopeSyntax::V2, "system/*.read"),
        (ScopeSyntax::V1, "system/*.rs"),
    ] {
        let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
        let srv = one_syntax_server(&key, syntax).await;
        // Token endpoint given, so nothing is discovered: the server refuses the scope
        // (`invalid_scope`) and the same scope in the other syntax gets the token.
        let auth = smart_without_discovery(&srv, with_kid(&key, key.kid()), asked);
        let tmp = tempfile::tempdir().unwrap();
        export(&srv, patients(), tmp.path(), auth).await.unwrap();
        assert_exact(tmp.path(), &srv.counts()).await;
        assert_eq!(token_statuses(&srv), [400, 200], "{syntax:?}");
        srv.shutdown().await;

        // Discovered: `smart-configuration` lists one syntax, so the first request uses it.
        let srv = one_syntax_server(&key, syntax).await;
        let tmp = tempfile::tempdir().unwrap();
        let auth = smart(&srv, "c", key, asked);
        export(&srv, patients(), tmp.path(), auth).await.unwrap();
        assert_exact(tmp.path(), &srv.counts()).await;
        assert_eq!(token_statuses(&srv), [200], "{syntax:?}");
        srv.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_without_an_equivalent_is_not_widened() {
    let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
    let srv = one_syntax_server(&key, ScopeSyntax::V1).await;
    // `system/Patient.r` has no v1 equivalent (`.read` would add search): one refusal, no retry.
    let auth = smart_without_discovery(&srv, key, "system/Patient.r");
    let tmp = tempfile::tempdir().unwrap();
    let e = export(&srv, patients(), tmp.path(), auth)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid_scope"), "{e}");
    assert_eq!(token_statuses(&srv), [400]);
    srv.shutdown().await;
}

/// The token endpoint grants fewer scopes than asked (Patient only) and the server then leaves
/// the other requested types out silently, as SMART's reference server does: a snapshot run
/// removes nothing of the types the token does not cover (it emptied `observation_latest`), and
/// its run record names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_scope_makes_no_snapshot_remove_the_types_it_left_out() {
    use flatfhir::{
        client::{BulkClientBuilder, ExportRequest},
        dataset::DatasetLocation,
        query::Dataset,
        run::export::ExportBuilder,
        view::ViewRegistry,
    };
    let key = with_kid(&PrivateKey::generate(SigningAlg::Es384).unwrap(), "k1");
    let narrow = registered("narrow", &key).with_allowed_scopes(vec!["system/Patient.read".into()]);
    let faults = Faults {
        scope_filter: true,
        ..Default::default()
    };
    let srv = server(faults, |b| {
        b.with_smart_clients(vec![registered("wide", &key), narrow])
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    let request = ExportRequest {
        types: vec!["Patient".into(), "Observation".into()],
        ..patients()
    };
    let run = |client_id: &'static str| {
        let (srv, loc, request) = (&srv, &loc, request.clone());
        let key = with_kid(&key, "k1");
        async move {
            let client = BulkClientBuilder::new(srv.base_url().clone())
                .with_auth(smart(srv, client_id, key, "system/*.read"))
                .with_retry(crate::export::fast_retry())
                .build()
                .unwrap();
            let registry = Arc::new(ViewRegistry::builtin().unwrap());
            ExportBuilder::new(client, registry, loc.clone())
                .with_request(request)
                .with_snapshot(true)
                .run()
                .await
                .unwrap()
        }
    };
    let count = |sql: &'static str| {
        let loc = loc.clone();
        async move {
            let ds = Dataset::open(&loc).await.unwrap();
            let b = ds.sql(sql).await.unwrap();
            flatfhir::arrow::array::AsArray::as_primitive::<flatfhir::arrow::datatypes::Int64Type>(
                b[0].column(0),
            )
            .value(0)
        }
    };
    let first = run("wide").await;
    assert!(first.manifest.not_granted.is_empty());
    let observations = count("select count(*) from observation_latest").await;
    let patients_n = count("select count(*) from patient_latest").await;
    assert!(observations > 0 && patients_n > 0);

    let second = run("narrow").await;
    assert_eq!(second.manifest.not_granted, vec!["Observation".to_string()]);
    assert!(
        !second.manifest.types.contains_key("Observation"),
        "the server left it out"
    );
    assert_eq!(
        count("select count(*) from observation_latest").await,
        observations
    );
    assert_eq!(
        count("select count(*) from patient_latest").await,
        patients_n
    );
    srv.shutdown().await;
}

/// A token endpoint under load answers `429` and `503` with `Retry-After`: the client waits as
/// asked and gets its token (it gave up after one 429, or three quick 5xx, and the export died
/// mid-run). An absurd `expires_in` is taken as a day (it overflowed the renewal time: exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_token_endpoint_is_waited_for() {
    use axum::{Router, http::StatusCode, response::IntoResponse, routing::post};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = Router::new().route(
        "/token",
        post(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "1")],
                        "busy",
                    )
                        .into_response(),
                    1 => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "1")],
                        "down",
                    )
                        .into_response(),
                    _ => axum::Json(serde_json::json!({
                        "access_token": "t0k3n", "token_type": "bearer",
                        "expires_in": 10_000_000_000_000_000_000u64, "scope": "system/*.read"
                    }))
                    .into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
    let cfg = SmartConfig {
        token_url: Some(format!("http://{addr}/token").parse().unwrap()),
        ..SmartConfig::new("c", key)
    };
    let base = format!("http://{addr}/fhir").parse().unwrap();
    let auth = SmartAuth::new(cfg, base).unwrap();
    let t0 = std::time::Instant::now();
    assert_eq!(&*auth.token().await.unwrap(), "t0k3n");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "Retry-After was honoured"
    );
    // Cached, not renewed at once.
    auth.token().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    serving.abort();
}
