//! The export client against the built-in Bulk Data server over real HTTP on 127.0.0.1: the
//! happy path and one test per injected fault, each ending with exact row counts.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use flatfhir::{
    client::{Auth, BulkClientBuilder, ExportLevel, ExportRequest, RetryConfig},
    dataset::DatasetLocation,
    query::Dataset,
    run::export::{ExportBuilder, ExportOptions, ExportSummary},
    serve::{DataSource, Faults, RunningServer, ServerBuilder},
    view::ViewRegistry,
};

use crate::support::data;

pub(crate) async fn server(
    faults: Faults,
    f: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> RunningServer {
    let b = ServerBuilder::new(DataSource::Dir(data("sample")))
        .with_delay(Duration::from_millis(300))
        .with_resources_per_file(400)
        .with_faults(faults);
    f(b).start().await.unwrap()
}

pub(crate) fn fast_retry() -> RetryConfig {
    RetryConfig {
        base: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        ..Default::default()
    }
}

pub(crate) async fn export(
    srv: &RunningServer,
    req: ExportRequest,
    out: &std::path::Path,
    auth: Auth,
) -> flatfhir::Result<ExportSummary> {
    export_with(srv, req, out, auth, ExportOptions::default()).await
}

pub(crate) async fn export_with(
    srv: &RunningServer,
    req: ExportRequest,
    out: &std::path::Path,
    auth: Auth,
    opts: ExportOptions,
) -> flatfhir::Result<ExportSummary> {
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .with_auth(auth)
        .with_retry(fast_retry())
        .build()?;
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), true)?;
    let reg = Arc::new(ViewRegistry::builtin()?);
    ExportBuilder::new(client, reg, loc)
        .with_request(req)
        .with_options(opts)
        .run()
        .await
}

pub(crate) fn patients() -> ExportRequest {
    ExportRequest {
        level: Some(ExportLevel::Patients),
        ..Default::default()
    }
}

pub(crate) fn with_fault(fault: &str) -> ExportRequest {
    ExportRequest {
        params: vec![("_flatfhirFault".into(), fault.into())],
        ..patients()
    }
}

/// Rows per resource type read back with SQL must equal the server's data, with no duplicate ids.
pub(crate) async fn assert_exact(out: &std::path::Path, expected: &BTreeMap<String, u64>) {
    let ds = Dataset::open(&DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap())
        .await
        .unwrap();
    for (t, n) in expected {
        let table = flatfhir::view::snake_case(t);
        let sql = format!("select count(*) as n, count(distinct id) as d from \"{table}\"");
        let b = ds.sql(&sql).await.unwrap();
        let col = |i: usize| {
            b[0].column(i)
                .as_any()
                .downcast_ref::<flatfhir::arrow::array::Int64Array>()
                .unwrap()
                .value(0) as u64
        };
        assert_eq!((col(0), col(1)), (*n, *n), "{t}: rows and distinct ids");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_export_equals_the_data() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("raw");
    let opts = ExportOptions {
        keep_ndjson: Some(keep.clone()),
        ..Default::default()
    };
    let s = export_with(&srv, patients(), &tmp.path().join("ds"), Auth::None, opts)
        .await
        .unwrap();
    let expected = srv.counts();
    // --keep-ndjson archived every output file as received (gzip here): same line total.
    let mut archived = 0;
    for e in std::fs::read_dir(&keep).unwrap() {
        let p = e.unwrap().path();
        let raw = std::fs::read(&p).unwrap();
        let mut text = String::new();
        if p.extension().is_some_and(|x| x == "gz") {
            std::io::Read::read_to_string(
                &mut flate2::read::MultiGzDecoder::new(&raw[..]),
                &mut text,
            )
            .unwrap();
        } else {
            text = String::from_utf8(raw).unwrap();
        }
        archived += text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    }
    assert_eq!(archived, expected.values().sum::<u64>());
    for (t, n) in &expected {
        assert_eq!(s.manifest.types[t].rows, *n, "{t}");
    }
    assert_exact(&tmp.path().join("ds"), &expected).await;
    assert!(s.manifest.transaction_time.is_some());
    // The finished job keeps its record but leaves no per-file records, nor their directory.
    let jobs: Vec<_> = std::fs::read_dir(tmp.path().join("ds/_jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(jobs.iter().all(|p| p.is_file()), "{jobs:?}");
    assert!(
        !tmp.path()
            .join("ds")
            .join(flatfhir::dataset::PUBLISHING_DIR)
            .exists()
    );
    // The finished job was deleted on the server (best effort) and the status URL is gone.
    let log = srv.log();
    assert!(log.iter().any(|r| r.method == "DELETE"));
    // Files were asked for with gzip.
    assert!(
        log.iter()
            .filter(|r| r.path.contains("$export-file"))
            .all(|r| r
                .accept_encoding
                .as_deref()
                .is_some_and(|a| a.contains("gzip")))
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_export_and_post_parameters() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let req = ExportRequest {
        level: Some(ExportLevel::Group("demo-cohort".into())),
        types: vec!["Patient".into(), "Condition".into()],
        post: true,
        ..Default::default()
    };
    let s = export(&srv, req, tmp.path(), Auth::None).await.unwrap();
    assert_eq!(
        s.manifest.types.keys().collect::<Vec<_>>(),
        ["Condition", "Patient"]
    );
    assert_eq!(s.manifest.types["Patient"].rows, 4);
    assert!(
        srv.log()
            .iter()
            .any(|r| r.method == "POST" && r.path.contains("Group/demo-cohort/$export"))
    );
    srv.shutdown().await;
}

/// `--type A,B` against a server that binds only the first `_type` parameter (HAPI FHIR): sent
/// as one comma-joined `_type`, GET and POST alike, every type asked for comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_are_one_comma_joined_parameter() {
    let srv = server(
        Faults {
            first_value_only: true,
            ..Faults::default()
        },
        |b| b,
    )
    .await;
    for post in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let req = ExportRequest {
            types: vec!["Patient".into(), "Condition".into()],
            post,
            ..patients()
        };
        let s = export(&srv, req, tmp.path(), Auth::None).await.unwrap();
        assert_eq!(
            s.manifest.types.keys().collect::<Vec<_>>(),
            ["Condition", "Patient"],
            "post: {post}"
        );
    }
    assert!(srv.log().iter().any(|r| r.method == "GET"
        && r.path.contains("$export?")
        && r.path.contains("_type=Patient%2CCondition")));
    srv.shutdown().await;
}

async fn fault_case(fault: &str) -> (tempfile::TempDir, ExportSummary, RunningServer) {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = export(&srv, with_fault(fault), tmp.path(), Auth::None)
        .await
        .unwrap_or_else(|e| panic!("fault {fault}: {e:#}"));
    assert_exact(tmp.path(), &srv.counts()).await;
    (tmp, s, srv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_status_errors_are_retried() {
    let (_t, _s, srv) = fault_case("status-transient:2").await;
    assert!(
        srv.log()
            .iter()
            .filter(|r| r.path.contains("$export-status") && r.status == 500)
            .count()
            >= 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_429_and_http_date_retry_after() {
    fault_case("status-429:2").await;
    fault_case("retry-after-date").await;
}

/// A `429` on a status poll means "poll more slowly", not a failure: it is waited out however
/// often it comes (here more often than `max_retries`), and `Retry-After: 0` still waits the
/// one-second floor between polls (the slowed-down floor is capped at 1.5 s here, so four
/// 429s cost 6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_429s_are_waited_out_not_counted_as_retries() {
    let srv = server(Faults::default(), |b| b.with_retry_after(0)).await;
    let tmp = tempfile::tempdir().unwrap();
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .with_retry(RetryConfig {
            max_retries: 1,
            max_poll_interval: Duration::from_millis(1500),
            ..fast_retry()
        })
        .build()
        .unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    let started = std::time::Instant::now();
    let s = ExportBuilder::new(client, Arc::new(ViewRegistry::builtin().unwrap()), loc)
        .with_request(with_fault("status-429:4"))
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let throttled = srv
        .log()
        .iter()
        .filter(|r| r.path.contains("$export-status") && r.status == 429)
        .count();
    assert_eq!(throttled, 4);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(s.manifest.transaction_time.is_some());
    assert_exact(tmp.path(), &srv.counts()).await;
    srv.shutdown().await;
}

/// After a `429` on a status poll the client polls more slowly for the rest of the job (the IG's
/// robustness advice: slow down for good), not at the pace the server's `202`s suggest again:
/// here one 429 at the first poll, then `Retry-After: 1` on every `202` of an 8-second job.
/// Polling at the server's pace takes ~9 status requests; at the doubled floor (2 s) ~5. The
/// 429 does not lower the downloads' concurrency limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_429_slows_polling_for_the_rest_of_the_job() {
    let srv = server(Faults::default(), |b| {
        b.with_retry_after(1).with_delay(Duration::from_secs(8))
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .with_retry(fast_retry())
        .build()
        .unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    ExportBuilder::new(
        client.clone(),
        Arc::new(ViewRegistry::builtin().unwrap()),
        loc,
    )
    .with_request(with_fault("status-429:1"))
    .run()
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let polls: Vec<u16> = srv
        .log()
        .iter()
        .filter(|r| r.path.contains("$export-status") && r.method == "GET")
        .map(|r| r.status)
        .collect();
    assert_eq!(polls.first(), Some(&429), "{polls:?}");
    assert!(polls.len() <= 6, "polled at the server's pace: {polls:?}");
    assert_eq!(client.poll_floor(), Duration::from_secs(2));
    // A rate, not a load: the downloads' concurrency limit stays where it was.
    let h = client.http_summary();
    assert_eq!(
        (h.throttled, h.min_concurrency),
        (1, h.max_concurrency),
        "{h:?}"
    );
    assert_exact(tmp.path(), &srv.counts()).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kickoff_429_is_retried() {
    let (_t, _s, srv) = fault_case("kickoff-429:1").await;
    assert!(
        srv.log()
            .iter()
            .any(|r| r.path.contains("$export") && r.status == 429)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_downloads_are_restarted_without_duplicates() {
    let (_t, s, _srv) = fault_case("cut-file").await;
    assert_eq!(s.manifest.rejects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_file_urls_are_refreshed_from_the_manifest() {
    // C15: file 0 answers 410; the client re-fetches the manifest and reads the fresh URL.
    let (_t, s, srv) = fault_case("file-gone:0").await;
    assert_eq!(s.manifest.rejects, 0);
    let log = srv.log();
    assert!(log.iter().any(|r| r.status == 410), "{log:?}");
    assert!(
        log.iter()
            .any(|r| r.path.contains("fresh") && r.status == 200),
        "the fresh URL was downloaded"
    );
}

/// A file the server keeps answering `404` while its job lives on (lost from storage, maybe for
/// a moment) fails the run, but the job is not abandoned: it stays resumable with the files it
/// committed, since the file may come back. Both when the re-fetched manifest lists the same
/// URL and when it lists a fresh one that is lost too (`410`, then `404` at the fresh URL: the
/// status URL is asked whether the job still exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_file_of_a_live_job_leaves_the_job_resumable() {
    for fault in ["file-lost:1", "file-gone:1,file-lost:1"] {
        lost_file_case(fault).await;
    }
}

async fn lost_file_case(fault: &str) {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let e = export(&srv, with_fault(fault), tmp.path(), Auth::None)
        .await
        .expect_err("a lost file fails the run");
    let text = format!("{e:#}");
    assert!(
        text.contains("1.ndjson") && !text.contains("no longer has"),
        "{text}"
    );
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), false).unwrap();
    let job = flatfhir::run::export::find_unfinished(&loc, None)
        .await
        .unwrap()
        .expect("the job is still unfinished");
    assert!(job.files.len() > 1, "the other files stay committed");
    assert!(
        !crate::support::walk(tmp.path())
            .iter()
            .filter(|p| p.ends_with(".parquet"))
            .collect::<Vec<_>>()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_export_status_is_followed() {
    // STU3: every poll answers 200; the job status travels in X-Export-Status.
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let req = ExportRequest {
        separate_export_status: true,
        ..patients()
    };
    export(&srv, req.clone(), tmp.path(), Auth::None)
        .await
        .unwrap();
    assert_exact(tmp.path(), &srv.counts()).await;
    let polls: Vec<_> = srv
        .log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("$export-status"))
        .collect();
    assert!(polls.len() >= 2, "{polls:?}");
    assert!(polls.iter().all(|r| r.status == 200), "{polls:?}");
    // A failed job is still a failure when the poll itself is 200.
    let tmp = tempfile::tempdir().unwrap();
    let failing = ExportRequest {
        params: vec![("_flatfhirFault".into(), "status-fatal".into())],
        ..req
    };
    let e = export(&srv, failing, tmp.path(), Auth::None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("status-fatal"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_manifests_start_downloads_early() {
    // STU3 allowPartialManifests: a 202 poll lists half the files; the client downloads them
    // before the job completes and does not read them again from the final manifest.
    let srv = server(Faults::default(), |b| {
        b.with_delay(Duration::from_millis(1600))
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let req = ExportRequest {
        allow_partial_manifests: true,
        ..patients()
    };
    export(&srv, req, tmp.path(), Auth::None).await.unwrap();
    assert_exact(tmp.path(), &srv.counts()).await;
    let log = srv.log();
    let first_file = log
        .iter()
        .position(|r| r.path.contains("$export-file"))
        .unwrap();
    let complete = log
        .iter()
        .position(|r| r.method == "GET" && r.path.contains("$export-status") && r.status == 200)
        .unwrap();
    assert!(
        first_file < complete,
        "a file was read before the job completed: {log:?}"
    );
    let files: Vec<&str> = log
        .iter()
        .filter(|r| r.path.contains("$export-file"))
        .map(|r| r.path.as_str())
        .collect();
    let unique: std::collections::HashSet<&&str> = files.iter().collect();
    assert_eq!(unique.len(), files.len(), "each file read once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_manifests_and_slow_bytes() {
    fault_case("paged:2").await;
    fault_case("slow:5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_entries_land_in_the_deleted_table() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = export(
        &srv,
        with_fault("deleted:Patient/gone-1"),
        tmp.path(),
        Auth::None,
    )
    .await
    .unwrap();
    assert_eq!(s.manifest.deleted, 1);
    let ds = Dataset::open(&DatasetLocation::resolve(tmp.path().to_str().unwrap(), false).unwrap())
        .await
        .unwrap();
    let b = ds
        .sql("select resource_type, id from _deleted")
        .await
        .unwrap();
    let text = flatfhir::arrow::util::pretty::pretty_format_batches(&b)
        .unwrap()
        .to_string();
    assert!(
        text.contains("Patient") && text.contains("gone-1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_outcomes_are_stored_and_reported() {
    let (tmp, s, _srv) = fault_case("outcome-fatal").await;
    assert!(s.server_errors);
    assert!(s.manifest.outcomes.get("fatal").is_some_and(|n| *n > 0));
    let ds = Dataset::open(&DatasetLocation::resolve(tmp.path().to_str().unwrap(), false).unwrap())
        .await
        .unwrap();
    assert!(
        !ds.sql("select * from _outcomes where severity = 'fatal'")
            .await
            .unwrap()
            .is_empty()
    );
    let (_t, s, _srv) = fault_case("outcome-warning").await;
    assert!(!s.server_errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kickoff_errors_show_the_operation_outcome() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let e = export(&srv, with_fault("kickoff-500"), tmp.path(), Auth::None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 500") && e.contains("processing"), "{e}");
    let e = export(
        &srv,
        with_fault("missing-content-location"),
        tmp.path(),
        Auth::None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("Content-Location"), "{e}");
    let bad = ExportRequest {
        types: vec!["Patient".into()],
        params: vec![("_bogus".into(), "1".into())],
        ..patients()
    };
    let e = export(&srv, bad, tmp.path(), Auth::None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 400") && e.contains("_bogus"), "{e}");
    let e = export(&srv, with_fault("status-fatal"), tmp.path(), Auth::None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("export failed") || e.contains("HTTP 500"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_goes_only_where_the_ig_says() {
    // requiresAccessToken=false and files on another origin: the token must not be sent there.
    let srv = server(Faults::default(), |b| {
        b.with_bearer_token(Some("s3cr3t".into()))
            .with_files_on_separate_origin(true)
            .with_requires_access_token(false)
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let e = export(&srv, patients(), tmp.path(), Auth::None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("401"), "{e}");
    export(&srv, patients(), tmp.path(), Auth::Bearer("s3cr3t".into()))
        .await
        .unwrap();
    let log = srv.log();
    assert!(
        log.iter()
            .filter(|r| r.path.contains("$export-status"))
            .all(|r| r.authorization)
    );
    let files: Vec<_> = log
        .iter()
        .filter(|r| r.path.contains("$export-file"))
        .collect();
    assert!(
        !files.is_empty() && files.iter().all(|r| !r.authorization),
        "token leaked to a file URL"
    );
    srv.shutdown().await;

    // requiresAccessToken=true but files on another origin: the token is withheld (the download
    // fails with the server's 401) unless that host is allowed.
    let srv = server(Faults::default(), |b| {
        b.with_bearer_token(Some("s3cr3t".into()))
            .with_files_on_separate_origin(true)
            .with_requires_access_token(true)
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let e = export(&srv, patients(), tmp.path(), Auth::Bearer("s3cr3t".into()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("$export-file"), "{e}");
    assert!(
        srv.log()
            .iter()
            .filter(|r| r.path.contains("$export-file"))
            .all(|r| !r.authorization)
    );
    srv.shutdown().await;

    // requiresAccessToken=true on the same origin: files get the token.
    let srv = server(Faults::default(), |b| {
        b.with_bearer_token(Some("s3cr3t".into()))
            .with_requires_access_token(true)
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    export(&srv, patients(), tmp.path(), Auth::Bearer("s3cr3t".into()))
        .await
        .unwrap();
    assert!(
        srv.log()
            .iter()
            .filter(|r| r.path.contains("$export-file"))
            .all(|r| r.authorization)
    );
    assert_exact(tmp.path(), &srv.counts()).await;
}

/// `flatfhir export --patients` of `srv` into `out` (quiet), one file at a time, each body
/// chunk delayed by `slow_ms`: an export slow enough to be killed part way when spawned.
pub(crate) fn slow_export(
    srv: &flatfhir::serve::RunningServer,
    out: &std::path::Path,
    slow_ms: u64,
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_flatfhir"));
    c.args([
        "export",
        "--base-url",
        srv.base_url().as_str(),
        "--patients",
        "--out",
    ])
    .arg(out)
    .args(["--concurrency", "1", "--param"])
    .arg(format!("_flatfhirFault=slow:{slow_ms}"))
    .arg("-q");
    c
}

/// The bundled sample served 100 resources per file, each status poll 200 ms late.
async fn slow_sample_server() -> RunningServer {
    ServerBuilder::new(DataSource::Dir(data("sample")))
        .with_delay(Duration::from_millis(200))
        .with_resources_per_file(100)
        .start()
        .await
        .unwrap()
}

/// Check `ready` every 20 ms (for at most two minutes) while `child` runs, then kill it with
/// SIGKILL. Fails when `child` ends first.
pub(crate) async fn kill_when(
    child: &mut std::process::Child,
    what: &str,
    ready: impl FnMut() -> bool,
) {
    wait_until(child, what, ready).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Check `ready` every 20 ms (for at most two minutes) while `child` runs. Fails when `child`
/// ends first.
async fn wait_until(child: &mut std::process::Child, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "no {what} in time");
        assert!(
            child.try_wait().unwrap().is_none(),
            "export finished before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the export into `out` has committed at least two files.
fn two_committed_files(out: &std::path::Path) -> bool {
    // The job record and its per-file records (`_jobs/<run>/`).
    std::fs::read_dir(out.join("_jobs"))
        .into_iter()
        .flatten()
        .flat_map(|e| {
            let p = e.unwrap().path();
            match std::fs::read_dir(&p) {
                Ok(d) => d.map(|e| e.unwrap().path()).collect(),
                Err(_) => vec![p],
            }
        })
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.matches("\"committed\"").count())
        .sum::<usize>()
        >= 2
}

/// The path of the (first) job record in `out`, and the record.
fn job_record(out: &std::path::Path) -> (std::path::PathBuf, serde_json::Value) {
    let path = std::fs::read_dir(out.join("_jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a job record");
    let record = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (path, record)
}

/// Every file under `out` whose path holds `export=<export>` (the parts of one run).
fn files_of_run(out: &std::path::Path, export: &str) -> Vec<String> {
    let needle = format!("export={export}");
    crate::support::walk(out)
        .into_iter()
        .filter(|p| p.contains(&needle))
        .collect()
}

/// A job the server has forgotten (deleted, expired, or lost in a restart) cannot be resumed.
/// `--resume` says so and abandons it; the same command run again — what a nightly schedule
/// does — abandons it and starts a new export instead of failing every night. Either way the
/// forgotten job's committed parts are removed (nothing left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_server_forgot_is_abandoned_and_the_same_command_starts_again() {
    let srv = slow_sample_server().await;
    let bin = env!("CARGO_BIN_EXE_flatfhir");
    let kick_offs = || {
        srv.log()
            .iter()
            .filter(|r| r.path.contains("/$export?") || r.path.ends_with("/$export"))
            .count()
    };
    for explicit_resume in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ds");
        let mut child = slow_export(&srv, &out, 60).spawn().unwrap();
        kill_when(&mut child, "a committed file", || two_committed_files(&out)).await;
        let (record, job) = job_record(&out);
        let export = job["export"].as_str().unwrap().to_string();
        assert!(
            !files_of_run(&out, &export).is_empty(),
            "no part was written"
        );
        // The server forgets the job.
        let status = job["status_url"].as_str().unwrap();
        let r = reqwest::Client::new().delete(status).send().await.unwrap();
        assert!(r.status().is_success(), "DELETE: {}", r.status());
        let before = kick_offs();

        let again = if explicit_resume {
            std::process::Command::new(bin)
                .args(["export", "--resume", out.to_str().unwrap(), "-q"])
                .output()
                .unwrap()
        } else {
            slow_export(&srv, &out, 60).output().unwrap()
        };
        let stderr = String::from_utf8_lossy(&again.stderr);
        let job: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
        assert_eq!(job["state"], "failed", "the forgotten job is abandoned");
        assert!(
            files_of_run(&out, &export).is_empty(),
            "the forgotten job's parts stay: {:?}",
            files_of_run(&out, &export)
        );
        if explicit_resume {
            assert!(!again.status.success());
            assert!(
                stderr.contains("no longer has export job")
                    && stderr.contains("HTTP 404")
                    && stderr.contains("without --resume"),
                "{stderr}"
            );
            assert_eq!(kick_offs(), before, "--resume kicked off a new export");
            // And the command run again then starts afresh: the job is no longer unfinished.
            let o = slow_export(&srv, &out, 60).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        } else {
            assert!(again.status.success(), "{stderr}");
            assert_eq!(kick_offs(), before + 1, "one new kick-off");
        }
        assert_exact(&out, &srv.counts()).await;
    }
    srv.shutdown().await;
}

/// A job deleted on the server while its files download (an administrator, a server's own
/// clean-up) fails the run at its next file — `404` even after re-fetching the manifest — and
/// is abandoned: marked failed, its parts removed, nothing published. The same command then
/// starts a new export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_deleted_on_the_server_while_downloading_leaves_nothing_behind() {
    let srv = slow_sample_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let mut child = slow_export(&srv, &out, 60)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "a committed file", || two_committed_files(&out)).await;
    let (record, job) = job_record(&out);
    let export = job["export"].as_str().unwrap().to_string();
    let status = job["status_url"].as_str().unwrap();
    let r = reqwest::Client::new().delete(status).send().await.unwrap();
    assert!(r.status().is_success(), "DELETE: {}", r.status());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("no longer has export job") && stderr.contains("HTTP 404"),
        "{stderr}"
    );
    let job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(job["state"], "failed");
    assert_eq!(files_of_run(&out, &export), Vec::<String>::new());
    assert!(!out.join("_runs").exists() || crate::support::walk(&out.join("_runs")).is_empty());
    let o = slow_export(&srv, &out, 0).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_exact(&out, &srv.counts()).await;
    srv.shutdown().await;
}

/// Ctrl-C (SIGINT) in the middle of the downloads: by default the server's job is cancelled
/// with DELETE and the job abandoned, nothing of it left in the dataset; with `--keep-job` the
/// job stays, and `--resume` finishes it with exact counts. SIGTERM (a scheduler stopping the
/// job) keeps it too, without `--keep-job`: the next run continues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_job_and_leaves_nothing_or_keeps_it_for_resume() {
    let srv = slow_sample_server().await;
    for (signal, keep_job) in [("-INT", false), ("-INT", true), ("-TERM", false)] {
        let keep = keep_job || signal == "-TERM";
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ds");
        let mut cmd = slow_export(&srv, &out, 60);
        if keep_job {
            cmd.arg("--keep-job");
        }
        let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
        wait_until(&mut child, "a committed file", || two_committed_files(&out)).await;
        let (record, job) = job_record(&out);
        let export = job["export"].as_str().unwrap().to_string();
        crate::support::send_signal(&child, signal);
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.code() == Some(2) && stderr.contains("interrupted"),
            "{signal}: {stderr}"
        );
        let job: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
        let deleted = srv.log().iter().any(|r| {
            r.method == "DELETE"
                && r.path.contains(
                    job["status_url"]
                        .as_str()
                        .unwrap()
                        .rsplit('/')
                        .next()
                        .unwrap(),
                )
        });
        if keep {
            assert!(stderr.contains("--resume"), "{stderr}");
            assert_ne!(job["state"], "failed");
            assert!(!deleted, "{signal}: the server's job was cancelled");
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_flatfhir"))
                .args(["export", "--resume", out.to_str().unwrap(), "-q"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_exact(&out, &srv.counts()).await;
        } else {
            assert!(stderr.contains("cancelled on the server"), "{stderr}");
            assert_eq!(job["state"], "failed");
            assert!(deleted, "the server's job was not cancelled");
            // Give a writer thread that outlived the run time to leave something behind.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(files_of_run(&out, &export), Vec::<String>::new());
        }
    }
    srv.shutdown().await;
}

/// A second Ctrl-C while the first one cleans up (here: cancelling the job on a server that
/// takes 20 s to answer the DELETE) stops at once, without cleaning up: the job stays
/// unfinished, so `--resume` can continue it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_stops_without_waiting_for_the_clean_up() {
    let srv = slow_sample_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let mut child = slow_export(&srv, &out, 60)
        .args(["--param", "_flatfhirFault=slow-delete:20000"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "a committed file", || two_committed_files(&out)).await;
    let (record, _) = job_record(&out);
    crate::support::send_signal(&child, "-INT");
    // Time for the first one's wind-down and DELETE to begin.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    crate::support::send_signal(&child, "-INT");
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("interrupted twice"),
        "{stderr}"
    );
    assert!(
        !srv.log().iter().any(|r| r.method == "DELETE"),
        "the process waited for the DELETE's answer"
    );
    let job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_ne!(job["state"], "failed", "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_export_resumes_with_exact_counts() {
    let srv = slow_sample_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let bin = env!("CARGO_BIN_EXE_flatfhir");
    let mut child = slow_export(&srv, &out, 60).spawn().unwrap();
    // Wait until some files are committed, then kill -9.
    kill_when(&mut child, "a committed file", || two_committed_files(&out)).await;
    // No run was published, so nothing is visible yet: no record, no Delta commit.
    assert!(
        !out.join("_runs").exists() || std::fs::read_dir(out.join("_runs")).unwrap().count() == 0
    );
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap();
    assert!(
        loc.delta_tables().await.unwrap().is_empty(),
        "a table was committed"
    );
    // What a kill during a part's write leaves on a local disk (object_store writes
    // `<path>#<n>` and renames it when complete), whether or not this kill hit one.
    let (_, job) = job_record(&out);
    let export = job["export"].as_str().unwrap();
    let half = out.join(format!(
        "observation/export={export}/part-00099-x.parquet.staged#1"
    ));
    std::fs::create_dir_all(half.parent().unwrap()).unwrap();
    std::fs::write(&half, b"PAR1").unwrap();

    let o = std::process::Command::new(bin)
        .args(["export", "--resume", out.to_str().unwrap(), "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_exact(&out, &srv.counts()).await;
    let debris: Vec<_> = crate::support::walk(&out)
        .into_iter()
        .filter(|p| p.rsplit_once('#').is_some())
        .collect();
    assert!(debris.is_empty(), "half-written files stay: {debris:?}");
    // Only one kick-off happened: the resumed run polled the saved status URL.
    assert_eq!(
        srv.log()
            .iter()
            .filter(|r| r.path.contains("/$export?") || r.path.ends_with("/$export"))
            .count(),
        1
    );
    srv.shutdown().await;
}

/// A kick-off whose connection breaks after the request was sent (the server read it, started
/// a job, and closed without answering) is not sent again: a second kick-off would start a
/// second job, and a server that runs one export per client refuses the next kick-off while
/// the orphan runs. The error says so. A connection never made is retried as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_off_lost_after_it_was_sent_is_not_sent_again() {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            // Read the request head, count it, close without a response.
            let mut reader = BufReader::new(&conn);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    for post in [false, true] {
        received.store(0, std::sync::atomic::Ordering::SeqCst);
        let client = BulkClientBuilder::new(format!("http://{addr}/fhir/").parse().unwrap())
            .with_retry(RetryConfig {
                max_retries: 3,
                ..fast_retry()
            })
            .build()
            .unwrap();
        let req = ExportRequest { post, ..patients() };
        let e = client.kick_off(&req).await.unwrap_err().to_string();
        assert!(
            e.contains("may have started an export job") && e.contains("not sent again"),
            "{e}"
        );
        assert_eq!(
            received.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "post={post}"
        );
    }
}

/// Two runs of the same export started at the same moment (one cron line on two hosts): both
/// found no unfinished job and both kicked off. Exactly one runs now; the other stops as busy
/// (exit 3 in the CLI) before any request. Once the first is done, the export runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_export_started_twice_at_once_runs_once() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = tokio::join!(
        export(&srv, patients(), tmp.path(), Auth::None),
        export(&srv, patients(), tmp.path(), Auth::None)
    );
    let busy = |r: &flatfhir::Result<ExportSummary>| {
        matches!(
            r,
            Err(flatfhir::Error::Export(
                flatfhir::run::export::ExportError::Busy { .. }
            ))
        )
    };
    assert!(
        (a.is_ok() && busy(&b)) || (b.is_ok() && busy(&a)),
        "one run, one busy: {:?} / {:?}",
        a.as_ref().err().map(ToString::to_string),
        b.as_ref().err().map(ToString::to_string)
    );
    let kickoffs = srv
        .log()
        .into_iter()
        .filter(|r| {
            r.path.contains("$export") && !r.path.contains("status") && r.method != "DELETE"
        })
        .filter(|r| r.path.ends_with("$export"))
        .count();
    assert_eq!(kickoffs, 1);
    export(&srv, patients(), tmp.path(), Auth::None)
        .await
        .unwrap();
    srv.shutdown().await;
}
