//! A real S3-compatible server for the object-store tests: `s3s-fs` (crates.io), started on
//! 127.0.0.1 with a temporary root directory, plus a loopback proxy that fails chosen uploads.
//!
//! The binary is looked up in `FLATFHIR_S3S_FS`, then `~/.cache/flatfhir/s3s/bin/s3s-fs` (where
//! `.ci/run` installs it), then `PATH`. When it is missing the S3 tests print why and pass,
//! unless `FLATFHIR_REQUIRE_S3=1` (set by `.ci/run`): then a missing binary fails them.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};

/// Access key of the test server.
pub const ACCESS_KEY: &str = "flatfhir-test";
/// Secret key of the test server.
pub const SECRET_KEY: &str = "flatfhir-test-secret";
/// The bucket every server starts with.
pub const BUCKET: &str = "lake";

fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLATFHIR_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let cached = home.join(".cache/flatfhir/s3s/bin/s3s-fs");
    if cached.is_file() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    })
}

/// A running `s3s-fs`; killed on drop.
pub struct S3Server {
    child: Child,
    _root: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    auth: bool,
}

impl S3Server {
    /// Start a server with credentials, or `None` (test skipped) when the binary is missing.
    pub fn start() -> Option<S3Server> {
        Self::start_with(true)
    }

    /// Start a server; `auth: false` accepts unsigned requests only (for the proxy tests, where
    /// a signature over the proxy's Host header would not verify).
    pub fn start_with(auth: bool) -> Option<S3Server> {
        let Some(bin) = binary() else {
            if std::env::var("FLATFHIR_REQUIRE_S3").is_ok_and(|v| v == "1") {
                panic!(
                    "FLATFHIR_REQUIRE_S3=1 but s3s-fs was not found (FLATFHIR_S3S_FS, \
                     ~/.cache/flatfhir/s3s/bin, PATH); install it with \
                     `cargo install s3s-fs --version 0.14.1 --features binary --root ~/.cache/flatfhir/s3s`"
                );
            }
            eprintln!(
                "skipping: s3s-fs not found (install: cargo install s3s-fs --version 0.14.1 \
                 --features binary --root ~/.cache/flatfhir/s3s)"
            );
            return None;
        };
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
        if auth {
            cmd.args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY]);
        }
        let child = cmd
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let server = S3Server {
            child,
            _root: root,
            endpoint: format!("http://127.0.0.1:{port}"),
            auth,
        };
        wait_for(([127, 0, 0, 1], port).into());
        Some(server)
    }

    /// `s3://lake/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The directory holding a bucket's objects (s3s-fs keeps them as plain files).
    pub fn bucket_dir(&self) -> PathBuf {
        self._root.path().join(BUCKET)
    }

    /// Store options reaching this server (or `endpoint`, e.g. a proxy in front of it).
    pub fn options_via(&self, endpoint: &str) -> Vec<(String, String)> {
        let mut o = vec![
            ("aws_endpoint".to_string(), endpoint.to_string()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_region".into(), "us-east-1".into()),
        ];
        if self.auth {
            o.push(("aws_access_key_id".into(), ACCESS_KEY.into()));
            o.push(("aws_secret_access_key".into(), SECRET_KEY.into()));
        } else {
            o.push(("aws_skip_signature".into(), "true".into()));
        }
        o
    }

    /// Store options for this server.
    pub fn options(&self) -> Vec<(String, String)> {
        self.options_via(&self.endpoint)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(addr: SocketAddr) {
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "s3s-fs did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Decides, per upload request (PUT/POST) seen so far, whether to fail it: `(n, path) ->
/// Some(status)` fails the n-th upload (0-based) with that status and an S3 error body. `path`
/// includes the query (`?partNumber=…&uploadId=…` for a part of a multipart upload).
pub type FailRule = Arc<dyn Fn(usize, &str) -> Option<StatusCode> + Send + Sync>;

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    uploads: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    rule: FailRule,
}

/// A loopback HTTP proxy in front of an S3 server that fails the uploads `rule` picks.
pub struct FaultyProxy {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyProxy {
    /// Start a proxy to `upstream`.
    pub async fn start(upstream: &str, rule: FailRule) -> FaultyProxy {
        let state = ProxyState {
            upstream: upstream.to_string(),
            client: reqwest::Client::new(),
            uploads: Arc::default(),
            failed: Arc::default(),
            rule,
        };
        let failed = state.failed.clone();
        let app = axum::Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultyProxy {
            endpoint,
            failed,
            task,
        }
    }

    /// Uploads failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(s): State<ProxyState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if parts.method == Method::PUT || parts.method == Method::POST {
        let n = s.uploads.fetch_add(1, Ordering::SeqCst);
        if let Some(status) = (s.rule)(n, &path) {
            s.failed.fetch_add(1, Ordering::SeqCst);
            let code = if status.is_server_error() {
                "InternalError"
            } else {
                "AccessDenied"
            };
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
                 <Message>injected by the test proxy</Message><Resource>{path}</Resource></Error>"
            );
            return (status, [("content-type", "application/xml")], xml).into_response();
        }
    }
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let url = format!(
        "{}{}",
        s.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut up = s.client.request(parts.method.clone(), url).body(body);
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" && k != "transfer-encoding" {
            up = up.header(k, v);
        }
    }
    match up.send().await {
        Ok(r) => {
            let mut b = Response::builder().status(r.status());
            for (k, v) in r.headers() {
                if k != "transfer-encoding" && k != "connection" {
                    b = b.header(k, v);
                }
            }
            let bytes = r.bytes().await.unwrap_or_default();
            b.body(Body::from(bytes)).unwrap()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
