//! File downloads against the built-in server over real HTTP on 127.0.0.1: redirects (to another
//! origin without credentials, on the same origin with them, too many), stalls caught by the idle
//! timeout, the gzip bomb, and kick-offs that must not follow redirects. Exports end with exact
//! row counts; direct [`Download`] streams are checked line by line.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use url::Url;

use flatfhir::{
    client::{
        Auth, BulkClient, BulkClientBuilder, ClientError, Download, ExportRequest, Manifest,
        PollOutcome,
    },
    dataset::DatasetLocation,
    run::export::{ExportBuilder, ExportSummary},
    serve::{Faults, RunningServer},
    view::ViewRegistry,
};

use crate::export::{assert_exact, fast_retry, patients, server, with_fault};

const TOKEN: &str = "s3cr3t-token";
/// A user `--header`, which must not reach another origin either.
const CUSTOM: (&str, &str) = ("x-flatfhir-test", "private-value");
/// The idle timeout of the stall tests.
const IDLE: Duration = Duration::from_millis(300);

fn client(
    srv: &RunningServer,
    auth: Auth,
    f: impl FnOnce(BulkClientBuilder) -> BulkClientBuilder,
) -> BulkClient {
    let b = BulkClientBuilder::new(srv.base_url().clone())
        .with_auth(auth)
        .with_headers(vec![(CUSTOM.0.into(), CUSTOM.1.into())])
        .with_retry(fast_retry());
    f(b).build().unwrap()
}

async fn export_by(
    client: BulkClient,
    req: ExportRequest,
    out: &std::path::Path,
) -> flatfhir::Result<ExportSummary> {
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), true)?;
    ExportBuilder::new(client, Arc::new(ViewRegistry::builtin()?), loc)
        .with_request(req)
        .run()
        .await
}

/// Kick off `req` and poll until the (single-page) manifest is complete.
async fn manifest(client: &BulkClient, req: &ExportRequest) -> Manifest {
    let status = client.kick_off(req).await.unwrap();
    loop {
        match client.poll(&status).await.unwrap() {
            PollOutcome::Complete(m) => return m,
            PollOutcome::InProgress { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The whole body of a download, inflated when gzip-encoded.
async fn read_all(download: &mut Download) -> Result<Vec<u8>, ClientError> {
    let mut raw = Vec::new();
    while let Some(chunk) = download.try_next().await? {
        raw.extend_from_slice(&chunk);
    }
    if !download.gzip() {
        return Ok(raw);
    }
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&raw[..]), &mut plain)
        .unwrap();
    Ok(plain)
}

/// Every line is a JSON resource of `type_`, and there are `count` of them.
fn assert_lines(body: &[u8], type_: &str, count: u64) {
    let mut n = 0;
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(line)));
        assert_eq!(v["resourceType"], type_);
        n += 1;
    }
    assert_eq!(n, count, "{type_}: lines");
}

fn file_requests(srv: &RunningServer) -> Vec<flatfhir::serve::RequestRecord> {
    srv.log()
        .into_iter()
        .filter(|r| r.path.contains("$export-file") || r.storage)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_another_origin_carry_no_token_and_no_headers() {
    // requiresAccessToken=true: the FHIR origin's file URL gets the token and answers 307 to the
    // storage origin, which must get neither the token nor the user's header.
    let srv = server(Faults::default(), |b| {
        b.with_bearer_token(Some(TOKEN.into()))
            .with_requires_access_token(true)
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let c = client(&srv, Auth::Bearer(TOKEN.into()), |b| b);
    let s = export_by(c, with_fault("redirect-file"), tmp.path())
        .await
        .unwrap();
    assert_exact(tmp.path(), &srv.counts()).await;
    assert_eq!(s.manifest.rejects, 0);

    let files = file_requests(&srv);
    let (redirects, stored): (Vec<_>, Vec<_>) = files.iter().partition(|r| !r.storage);
    assert!(
        !stored.is_empty() && redirects.len() == stored.len(),
        "{files:?}"
    );
    assert!(
        redirects.iter().all(|r| r.status == 307
            && r.authorization
            && r.header_names.contains(&CUSTOM.0.into())),
        "the FHIR origin gets the token and the headers: {redirects:?}"
    );
    assert!(stored.iter().all(|r| r.status == 200), "{stored:?}");
    assert_eq!(srv.storage_requests(), stored.len() as u64);
    assert_eq!(
        srv.storage_authorized(),
        0,
        "the token leaked to the storage origin"
    );
    assert!(
        stored
            .iter()
            .all(|r| !r.header_names.iter().any(|h| h == CUSTOM.0)),
        "a user header leaked to the storage origin: {stored:?}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_origin_redirects_keep_the_token() {
    // Three hops (307, 302, 307, relative Locations) that stay on the FHIR origin, which wants
    // the token on every one of them.
    let srv = server(Faults::default(), |b| {
        b.with_bearer_token(Some(TOKEN.into()))
            .with_requires_access_token(true)
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let c = client(&srv, Auth::Bearer(TOKEN.into()), |b| b);
    export_by(c, with_fault("redirect-file:3:same"), tmp.path())
        .await
        .unwrap();
    assert_exact(tmp.path(), &srv.counts()).await;
    let files = file_requests(&srv);
    let bodies = files.iter().filter(|r| r.status == 200).count();
    assert!(bodies > 0);
    assert_eq!(files.len(), bodies * 4, "3 hops per file: {files:?}");
    assert_eq!(files.iter().filter(|r| r.status == 302).count(), bodies);
    assert!(
        files.iter().all(|r| r.authorization && !r.storage),
        "{files:?}"
    );
    assert_eq!(srv.storage_requests(), 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_stream_reports_the_url_it_read() {
    // requiresAccessToken=false: capability URLs, redirected through 2 hops to storage.
    let srv = server(Faults::default(), |b| b).await;
    let c = client(&srv, Auth::Bearer(TOKEN.into()), |b| b);
    let m = manifest(&c, &with_fault("redirect-file:2")).await;
    assert!(!m.requires_access_token);
    let item = &m.output[0];
    let url = Url::parse(&item.url).unwrap();
    let mut d = c.download(&url, m.requires_access_token).await.unwrap();
    assert_eq!(d.url().origin(), srv.storage_base_url().origin());
    assert!(d.url().path().starts_with("/storage/"), "{}", d.url());
    let body = read_all(&mut d).await.unwrap();
    assert_lines(&body, item.type_.as_deref().unwrap(), item.count.unwrap());
    assert_eq!(d.resumes(), 0);
    assert_eq!(srv.storage_authorized(), 0);
    // Nothing but the FHIR origin saw a token: requiresAccessToken is false.
    assert!(file_requests(&srv).iter().all(|r| !r.authorization));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_redirects_are_refused() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let e = export_by(
        client(&srv, Auth::None, |b| b),
        with_fault("redirect-file:6"),
        tmp.path(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("more than 5 redirects"), "{e}");
    assert_eq!(srv.storage_requests(), 0);
    // Six hops are fine for a client that allows them; zero refuses the first.
    let tmp = tempfile::tempdir().unwrap();
    let c = client(&srv, Auth::None, |b| b.with_max_redirects(6));
    export_by(c, with_fault("redirect-file:6"), tmp.path())
        .await
        .unwrap();
    assert_exact(tmp.path(), &srv.counts()).await;
    let c = client(&srv, Auth::None, |b| b.with_max_redirects(0));
    let m = manifest(&c, &with_fault("redirect-file")).await;
    let e = c
        .download(&Url::parse(&m.output[0].url).unwrap(), false)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Protocol { .. }) && !e.is_retryable(),
        "{e}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_identity_body_is_resumed_with_range() {
    let srv = server(Faults::default(), |b| b).await;
    let c = client(&srv, Auth::None, |b| b.with_idle_timeout(IDLE));
    let m = manifest(&c, &with_fault("stall-file,no-gzip")).await;
    for (i, item) in m.output.iter().enumerate() {
        let started = Instant::now();
        let mut d = c
            .download(&Url::parse(&item.url).unwrap(), false)
            .await
            .unwrap();
        assert!(!d.gzip());
        let body = read_all(&mut d).await.unwrap();
        let took = started.elapsed();
        assert_lines(&body, item.type_.as_deref().unwrap(), item.count.unwrap());
        assert_eq!(d.resumes(), 1, "file {i}");
        assert!(
            took >= IDLE && took < IDLE + Duration::from_secs(3),
            "file {i}: {took:?}"
        );
        eprintln!(
            "file {i}: stall detected and resumed, whole download in {:.3} s (idle timeout {:.3} s)",
            took.as_secs_f64(),
            IDLE.as_secs_f64()
        );
    }
    let files = file_requests(&srv);
    let ranged: Vec<_> = files.iter().filter(|r| r.range.is_some()).collect();
    assert_eq!(ranged.len(), m.output.len(), "{files:?}");
    assert!(ranged.iter().all(|r| r.status == 206), "{ranged:?}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_gzip_body_ends_with_a_retryable_error() {
    let srv = server(Faults::default(), |b| b).await;
    let c = client(&srv, Auth::None, |b| b.with_idle_timeout(IDLE));
    let m = manifest(&c, &with_fault("stall-file")).await;
    let url = Url::parse(&m.output[0].url).unwrap();
    let started = Instant::now();
    let mut d = c.download(&url, false).await.unwrap();
    assert!(d.gzip());
    let e = read_all(&mut d).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(e, ClientError::Stalled { .. }) && e.is_retryable(),
        "{e}"
    );
    assert!(e.to_string().contains("idle timeout"), "{e}");
    assert!(
        took >= IDLE && took < IDLE + Duration::from_secs(3),
        "{took:?}"
    );
    eprintln!(
        "gzip body: stall detected after {:.3} s",
        took.as_secs_f64()
    );
    // Starting over works: the stall was the first download only.
    let body = read_all(&mut c.download(&url, false).await.unwrap())
        .await
        .unwrap();
    assert_lines(
        &body,
        m.output[0].type_.as_deref().unwrap(),
        m.output[0].count.unwrap(),
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_exports_complete_with_exact_rows() {
    for fault in ["stall-file", "stall-file,no-gzip"] {
        let srv = server(Faults::default(), |b| b).await;
        let tmp = tempfile::tempdir().unwrap();
        let c = client(&srv, Auth::None, |b| b.with_idle_timeout(IDLE));
        let started = Instant::now();
        let s = export_by(c, with_fault(fault), tmp.path())
            .await
            .unwrap_or_else(|e| panic!("{fault}: {e:#}"));
        eprintln!(
            "{fault}: export with every file stalled once took {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert_exact(tmp.path(), &srv.counts()).await;
        assert_eq!(s.manifest.rejects, 0);
        srv.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gzip_bomb_is_small_on_the_wire() {
    let srv = server(Faults::default(), |b| b).await;
    let c = client(&srv, Auth::None, |b| b);
    let req = ExportRequest {
        types: vec!["Patient".into()],
        ..with_fault("gzip-bomb:16")
    };
    let m = manifest(&c, &req).await;
    let bomb = m.output.last().unwrap();
    let lines = bomb.count.unwrap();
    let mut d = c
        .download(&Url::parse(&bomb.url).unwrap(), false)
        .await
        .unwrap();
    assert!(d.gzip());
    // Inflate while streaming, as the export driver does, counting lines.
    let mut wire = 0u64;
    let mut inflated = 0u64;
    let mut newlines = 0u64;
    let mut gz = flate2::write::MultiGzDecoder::new(Vec::new());
    while let Some(chunk) = d.try_next().await.unwrap() {
        wire += chunk.len() as u64;
        std::io::Write::write_all(&mut gz, &chunk).unwrap();
        let out = std::mem::take(gz.get_mut());
        inflated += out.len() as u64;
        newlines += memchr::memchr_iter(b'\n', &out).count() as u64;
    }
    let out = gz.finish().unwrap();
    inflated += out.len() as u64;
    newlines += memchr::memchr_iter(b'\n', &out).count() as u64;
    eprintln!("gzip bomb: {wire} bytes on the wire, {inflated} inflated, {lines} lines");
    assert_eq!(newlines, lines);
    assert!((15 << 20..=16 << 20).contains(&inflated), "{inflated}");
    assert!(wire * 200 < inflated, "{wire} on the wire");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kickoff_and_status_never_follow_redirects() {
    use axum::{Router, http::StatusCode, response::IntoResponse, routing::any};
    // A server whose every FHIR endpoint redirects; the target counts what reaches it.
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/elsewhere",
            any(move || {
                h.fetch_add(1, Ordering::Relaxed);
                async { StatusCode::ACCEPTED }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, "/elsewhere")],
            )
                .into_response()
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = Url::parse(&format!("http://{}/fhir/", listener.local_addr().unwrap())).unwrap();
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    let c = BulkClientBuilder::new(base.clone())
        .with_auth(Auth::Bearer(TOKEN.into()))
        .with_retry(fast_retry())
        .build()
        .unwrap();
    for post in [false, true] {
        let req = ExportRequest { post, ..patients() };
        let e = c.kick_off(&req).await.unwrap_err().to_string();
        assert!(e.contains("307"), "{e}");
    }
    let e = c
        .poll(&base.join("$export-status/1").unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("307"), "{e}");
    assert_eq!(hits.load(Ordering::Relaxed), 0, "a redirect was followed");
    serving.abort();
}

/// A one-file server whose first `cuts` responses are cut halfway through what they send, that
/// advertises `Accept-Ranges: bytes`, and that honours `Range` unless `ignore_range`.
async fn flaky_file_server(
    body: bytes::Bytes,
    cuts: u64,
    ignore_range: bool,
) -> (Url, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    use axum::{
        Router,
        body::Body,
        http::{HeaderMap, StatusCode, header},
        response::Response,
        routing::get,
    };
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    let app = Router::new().route(
        "/f.ndjson",
        get(move |headers: HeaderMap| {
            let (body, count) = (body.clone(), count.clone());
            async move {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                let start = headers
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
                    .filter(|_| !ignore_range)
                    .unwrap_or(0usize);
                let data = body.slice(start..);
                let mut resp = Response::builder()
                    .header(header::ACCEPT_RANGES, "bytes")
                    .header(header::CONTENT_LENGTH, data.len());
                if start > 0 {
                    resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
                        header::CONTENT_RANGE,
                        format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
                    );
                }
                if n > cuts {
                    return resp.body(Body::from(data)).unwrap();
                }
                let half = data.slice(..data.len() / 2);
                let stream = futures::stream::iter([Ok(half), Err(std::io::Error::other("cut"))])
                    .then(|item| async move {
                        if item.is_err() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        item
                    });
                resp.body(Body::from_stream(stream)).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!(
        "http://{}/f.ndjson",
        listener.local_addr().unwrap()
    ))
    .unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, served, task)
}

fn lines(n: usize) -> bytes::Bytes {
    (0..n)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"p{i}\"}}\n"))
        .collect::<String>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_are_bounded_and_an_ignored_range_is_a_protocol_error() {
    let body = lines(2000);
    let base = |url: &Url| url.join("/fhir/").unwrap();
    // Cut three times: three resumes, and every byte exactly once.
    let (url, served, task) = flaky_file_server(body.clone(), 3, false).await;
    let c = BulkClientBuilder::new(base(&url))
        .with_retry(fast_retry())
        .build()
        .unwrap();
    let mut d = c.download(&url, false).await.unwrap();
    assert_eq!(read_all(&mut d).await.unwrap(), body);
    assert_eq!((d.resumes(), served.load(Ordering::Relaxed)), (3, 4));
    task.abort();
    // Cut on every request: max_retries resumes, then the (retryable) cut is the error.
    let (url, served, task) = flaky_file_server(body.clone(), u64::MAX, false).await;
    let retry = flatfhir::client::RetryConfig {
        max_retries: 2,
        ..fast_retry()
    };
    let c = BulkClientBuilder::new(base(&url))
        .with_retry(retry)
        .build()
        .unwrap();
    let mut d = c.download(&url, false).await.unwrap();
    let e = read_all(&mut d).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Network { .. }) && e.is_retryable(),
        "{e}"
    );
    assert_eq!((d.resumes(), served.load(Ordering::Relaxed)), (2, 3));
    task.abort();
    // A server that answers the Range request with the whole file again.
    let (url, _, task) = flaky_file_server(body, 1, true).await;
    let c = BulkClientBuilder::new(base(&url))
        .with_retry(fast_retry())
        .build()
        .unwrap();
    let mut d = c.download(&url, false).await.unwrap();
    let e = read_all(&mut d).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Protocol { .. }) && !e.is_retryable(),
        "{e}"
    );
    assert!(e.to_string().contains("ignored the Range request"), "{e}");
    task.abort();
}

/// A user's `--header`s (an `Authorization: Basic`, an API key) are secrets as much as the token:
/// a status URL (`Content-Location`), a manifest `link` or a DELETE on another origin gets
/// neither. A second loopback listener (another port is another origin) records what reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_never_go_to_another_origin() {
    use axum::{
        Router,
        extract::Request,
        http::{StatusCode, header},
        response::IntoResponse,
    };
    type Seen = Arc<std::sync::Mutex<Vec<(String, String, Vec<String>)>>>;
    fn record(seen: &Seen, req: &Request) {
        let names = req.headers().keys().map(|k| k.to_string()).collect();
        let what = (
            req.method().to_string(),
            req.uri().path().to_string(),
            names,
        );
        seen.lock().unwrap().push(what);
    }
    let listen = || async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
        (l, url)
    };
    let (fhir_listener, fhir) = listen().await;
    let (other_listener, other) = listen().await;
    let (fhir_seen, other_seen) = (Seen::default(), Seen::default());

    // The FHIR server: a kick-off whose status URL is on the other origin.
    let (seen, status) = (fhir_seen.clone(), other.join("status").unwrap());
    let fhir_app = Router::new().fallback(move |req: Request| {
        record(&seen, &req);
        let status = status.to_string();
        async move { (StatusCode::ACCEPTED, [(header::CONTENT_LOCATION, status)]).into_response() }
    });
    // The other origin: the status URL, whose manifest links to a second page there.
    let (seen, page2) = (other_seen.clone(), other.join("page2").unwrap());
    let other_app = Router::new().fallback(move |req: Request| {
        record(&seen, &req);
        let link = (req.uri().path() == "/status")
            .then(|| serde_json::json!([{"relation": "next", "url": page2.as_str()}]));
        let method = req.method().clone();
        async move {
            if method == axum::http::Method::DELETE {
                return StatusCode::ACCEPTED.into_response();
            }
            let mut m = serde_json::json!({
                "transactionTime": "2026-01-01T00:00:00Z",
                "request": "x",
                "requiresAccessToken": true,
                "output": [],
                "error": [],
            });
            if let Some(link) = link {
                m["link"] = link;
            }
            axum::Json(m).into_response()
        }
    });
    let a = tokio::spawn(async move { axum::serve(fhir_listener, fhir_app).await });
    let b = tokio::spawn(async move { axum::serve(other_listener, other_app).await });

    let c = BulkClientBuilder::new(fhir.join("fhir/").unwrap())
        .with_auth(Auth::Bearer(TOKEN.into()))
        .with_headers(vec![
            ("Authorization".into(), "Basic dXNlcjpzM2NyM3Q=".into()),
            ("X-Api-Key".into(), "s3cret-key".into()),
        ])
        .with_retry(fast_retry())
        .build()
        .unwrap();
    let status = c.kick_off(&patients()).await.unwrap();
    assert_eq!(status.origin(), other.origin());
    let PollOutcome::Complete(m) = c.poll(&status).await.unwrap() else {
        panic!("the manifest was complete");
    };
    let next = Url::parse(m.next_page().unwrap()).unwrap();
    assert!(matches!(
        c.fetch_page(&next).await.unwrap(),
        PollOutcome::Complete(_)
    ));
    c.delete(&status).await.unwrap();

    // The FHIR origin got the headers; the other origin got GET /status, GET /page2 and DELETE
    // /status, none with them.
    let fhir_seen = fhir_seen.lock().unwrap().clone();
    assert!(
        fhir_seen[0].2.iter().any(|h| h == "x-api-key")
            && fhir_seen[0].2.iter().any(|h| h == "authorization"),
        "{fhir_seen:?}"
    );
    let other_seen = other_seen.lock().unwrap().clone();
    let calls: Vec<_> = other_seen
        .iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    assert_eq!(calls, ["GET /status", "GET /page2", "DELETE /status"]);
    for (method, path, names) in &other_seen {
        assert!(
            !names
                .iter()
                .any(|h| h == "x-api-key" || h == "authorization"),
            "{method} {path} carried a secret header: {names:?}"
        );
    }
    a.abort();
    b.abort();
}

/// A file that answers `200 text/html` (an SSO sign-in page, a proxy's error page) is a failed
/// download of that file, naming its URL and the type, and the run fails, rather than its lines
/// becoming rejects in a run that succeeds (and, with `--snapshot`, empties the type's current
/// state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_instead_of_a_file_fails_the_run() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let c = client(&srv, Auth::None, |b| b);
    let e = export_by(c, with_fault("file-html"), tmp.path())
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("text/html") && e.contains("$export-file") && e.contains("/0.ndjson"),
        "{e}"
    );
    srv.shutdown().await;
}
