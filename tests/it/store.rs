//! Datasets in object storage, against a real S3-compatible server (s3s-fs on 127.0.0.1): export
//! into `s3://…` and query it back with the local run's counts, compaction in the bucket, uploads
//! that fail now and then (retried) and uploads that keep failing (the run fails and publishes
//! nothing), big parts joined in the bucket by copying their row groups, a failed convert that
//! aborts its unfinished multipart uploads. `memory://` runs the same round trip in-process.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::http::StatusCode;
use flatfhir::{
    client::{BulkClientBuilder, ExportLevel, ExportRequest, RetryConfig},
    compact::{CompactOptions, compact},
    dataset::DatasetLocation,
    query::Dataset,
    run::{
        convert::{ConvertBuilder, ConvertOptions},
        export::{ExportBuilder, ExportOptions, ExportSummary},
    },
    serve::{DataSource, RunningServer, ServerBuilder},
    view::ViewRegistry,
};

use crate::{
    s3::{FaultyProxy, S3Server},
    support::data,
};

async fn sample_server() -> RunningServer {
    ServerBuilder::new(DataSource::Dir(data("sample")))
        .with_delay(Duration::from_millis(200))
        .with_resources_per_file(400)
        .start()
        .await
        .unwrap()
}

async fn export_into(srv: &RunningServer, loc: DatasetLocation) -> flatfhir::Result<ExportSummary> {
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .with_retry(RetryConfig {
            base: Duration::from_millis(50),
            max_backoff: Duration::from_millis(400),
            ..Default::default()
        })
        .build()?;
    let request = ExportRequest {
        level: Some(ExportLevel::Patients),
        ..Default::default()
    };
    let registry = Arc::new(ViewRegistry::builtin()?);
    // One part per downloaded file, so that there is something to compact.
    let options = ExportOptions {
        coalesce: false,
        ..Default::default()
    };
    ExportBuilder::new(client, registry, loc)
        .with_request(request)
        .with_options(options)
        .run()
        .await
}

/// `count(*)` of every table and `_latest` view.
pub async fn counts(loc: &DatasetLocation) -> BTreeMap<String, i64> {
    let ds = Dataset::open(loc).await.unwrap();
    let names: Vec<String> = ds.table_names().to_vec();
    let mut out = BTreeMap::new();
    for name in names {
        let b = ds
            .sql(&format!("select count(*) as n from \"{name}\""))
            .await
            .unwrap();
        let n = b[0]
            .column(0)
            .as_any()
            .downcast_ref::<flatfhir::arrow::array::Int64Array>()
            .unwrap()
            .value(0);
        out.insert(name, n);
    }
    out
}

async fn local_counts(srv: &RunningServer) -> BTreeMap<String, i64> {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    export_into(srv, loc.clone()).await.unwrap();
    counts(&loc).await
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_export_then_query_gives_the_local_counts() {
    let Some(s3) = S3Server::start() else { return };
    let srv = sample_server().await;
    let local = local_counts(&srv).await;
    assert_eq!(local["observation"], 1728);
    assert_eq!(local["patient_latest"], 4);

    let url = s3.url("warehouse/fhir");
    let loc = DatasetLocation::resolve_with_options(&url, &s3.options(), true).unwrap();
    let s = export_into(&srv, loc.clone()).await.unwrap();
    assert_eq!(s.manifest.types["Observation"].rows, 1728);
    assert_eq!(
        counts(&loc).await,
        local,
        "the same counts from s3:// as from a folder"
    );
    let objects = files_under(&s3.bucket_dir());
    assert!(
        objects
            .iter()
            .any(|o| o.starts_with("warehouse/fhir/_runs/") && o.ends_with(".json")),
        "{objects:?}"
    );
    assert!(
        !objects.iter().any(|o| o.ends_with(".staged")),
        "{objects:?}"
    );

    // `flatfhir query` on the same URL, options on the command line.
    let mut args = vec!["query".to_string(), "--data".into(), url.clone()];
    for (k, v) in s3.options() {
        args.push("--store-option".into());
        args.push(format!("{k}={v}"));
    }
    args.extend(["--format".into(), "csv".into()]);
    args.push("select count(*) as n from observation_latest".into());
    let o = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_flatfhir"))
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout.trim(), "n\n1728");

    // Compaction in the bucket: fewer files, the same rows. VACUUM keeps the files of the
    // version before the compaction (a reader may hold it); the next compaction's VACUUM
    // deletes them.
    // And the part of a run that died two days ago goes with the first VACUUM.
    use object_store::ObjectStoreExt as _;
    let dead = flatfhir::dataset::RunIds::at(
        chrono::Utc::now() - chrono::Duration::hours(48),
        &mut rand::rng(),
    )
    .export;
    let part = loc.child(&format!("patient/export={dead}/part-00000-x.parquet"));
    loc.store.put(&part, b"PAR1".to_vec().into()).await.unwrap();
    // Written two days ago too (s3s-fs reports a file's mtime as its last modification).
    let backing = s3.bucket_dir().join(part.as_ref());
    std::fs::File::options()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(47 * 3600))
        .unwrap();
    let opts = CompactOptions {
        retain: Some(std::time::Duration::ZERO),
        ..Default::default()
    };
    let summary = compact(&loc, &opts).await.unwrap();
    assert_eq!(summary.dead_runs.runs, vec![dead], "{summary:?}");
    assert!(
        loc.store.head(&part).await.is_err(),
        "the dead run's part stays"
    );
    let obs = summary
        .tables
        .iter()
        .find(|t| t.table == "observation")
        .expect("observation compacted");
    assert!(obs.files_added < obs.files_removed, "{summary:?}");
    assert_eq!(obs.files_deleted, 0, "{summary:?}");
    assert_eq!(
        counts(&loc).await,
        local,
        "the same counts after compaction"
    );
    let data_files = || {
        files_under(&s3.bucket_dir())
            .into_iter()
            .filter(|f| f.ends_with(".parquet") && !f.contains("_delta_log"))
            .count()
    };
    let before = data_files();
    let again = compact(&loc, &opts).await.unwrap();
    let obs2 = again
        .tables
        .iter()
        .find(|t| t.table == "observation")
        .unwrap();
    assert_eq!(obs2.files_removed, 0, "nothing left to compact: {again:?}");
    assert_eq!(obs2.files_deleted as u64, obs.files_removed, "{again:?}");
    assert_eq!(
        before - data_files(),
        again.tables.iter().map(|t| t.files_deleted).sum::<usize>(),
        "vacuumed files are gone from the bucket"
    );
    assert_eq!(counts(&loc).await, local, "the same counts after VACUUM");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_round_trip() {
    let srv = sample_server().await;
    let local = local_counts(&srv).await;
    let loc = DatasetLocation::resolve("memory://store-test/ds", true).unwrap();
    export_into(&srv, loc.clone()).await.unwrap();
    // Another resolve of the same URL sees the same in-process store.
    let again = DatasetLocation::resolve("memory://store-test/ds", false).unwrap();
    assert_eq!(counts(&again).await, local);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_uploads_failing_now_and_then_are_retried() {
    let Some(s3) = S3Server::start_with(false) else {
        return;
    };
    let srv = sample_server().await;
    let local = local_counts(&srv).await;
    // Every third upload (PUT, including the copy of a committed part) answers 500.
    let (proxy, loc) = via_proxy(
        &s3,
        "flaky",
        Arc::new(|n: usize, _: &str| (n % 3 == 1).then_some(StatusCode::INTERNAL_SERVER_ERROR)),
    )
    .await;
    export_into(&srv, loc.clone()).await.unwrap();
    assert!(proxy.failed() > 5, "{} uploads failed", proxy.failed());
    assert_eq!(counts(&loc).await, local);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_uploads_that_keep_failing_fail_the_run_and_publish_nothing() {
    let Some(s3) = S3Server::start_with(false) else {
        return;
    };
    let srv = sample_server().await;
    // After three Parquet uploads went through, every further one is refused.
    let parquet = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (proxy, loc) = via_proxy(
        &s3,
        "broken",
        Arc::new(move |_: usize, path: &str| {
            let seen = path
                .contains(".parquet")
                .then(|| parquet.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
            seen.filter(|n| *n >= 3).map(|_| StatusCode::FORBIDDEN)
        }),
    )
    .await;
    let err = export_into(&srv, loc.clone()).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("parquet") || msg.contains("Parquet"), "{msg}");
    assert!(proxy.failed() > 0);
    let objects = files_under(&s3.bucket_dir());
    assert!(
        objects
            .iter()
            .any(|o| o.ends_with(".parquet") || o.ends_with(".staged")),
        "some parts were written: {objects:?}"
    );
    assert!(
        !objects.iter().any(|o| o.contains("/_runs/")),
        "no run manifest: {objects:?}"
    );
    // Read back directly (no proxy): the half-written run is invisible.
    let direct =
        DatasetLocation::resolve_with_options(&s3.url("broken"), &s3.options(), false).unwrap();
    let ds = Dataset::open(&direct).await.unwrap();
    assert!(ds.runs().await.unwrap().is_empty());
    assert!(ds.table_names().is_empty(), "{:?}", ds.table_names());
    srv.shutdown().await;
}

/// Files of ten thousand resources leave parts whose row groups are already of a good size:
/// coalescing joins them in the bucket by copying their row groups (parts named `…-v.parquet`),
/// one part per view, and every row and value reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_export_joins_big_parts_by_copying_their_row_groups() {
    let Some(s3) = S3Server::start() else { return };
    let mut ndjson = String::new();
    for i in 0..40_000 {
        ndjson.push_str(&format!(
            r#"{{"resourceType":"Observation","id":"o{i}","status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"c{}"}}]}},"valueString":"v{i}"}}"#,
            i % 50
        ));
        ndjson.push('\n');
    }
    let srv = ServerBuilder::new(DataSource::Files(vec![(
        "Observation.ndjson".into(),
        ndjson.into(),
    )]))
    .with_delay(Duration::ZERO)
    .with_resources_per_file(10_000)
    .start()
    .await
    .unwrap();
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .build()
        .unwrap();
    let request = ExportRequest {
        level: Some(ExportLevel::System),
        ..Default::default()
    };
    let registry = Arc::new(ViewRegistry::builtin().unwrap());
    let url = s3.url("warehouse/big");
    let loc = DatasetLocation::resolve_with_options(&url, &s3.options(), true).unwrap();
    let s = ExportBuilder::new(client, registry, loc.clone())
        .with_request(request)
        .run()
        .await
        .unwrap();
    assert_eq!(s.manifest.types["Observation"].rows, 40_000);
    let objects = files_under(&s3.bucket_dir());
    for view in ["observation", "observation_coding"] {
        let parts: Vec<&String> = objects
            .iter()
            .filter(|o| o.starts_with(&format!("warehouse/big/{view}/export=")))
            .filter(|o| o.ends_with(".parquet"))
            .collect();
        assert_eq!(parts.len(), 1, "{parts:?}");
        assert!(parts[0].ends_with("-v.parquet"), "{parts:?}");
    }
    let c = counts(&loc).await;
    assert_eq!(
        (c["observation"], c["observation_coding"]),
        (40_000, 40_000)
    );
    let ds = Dataset::open(&loc).await.unwrap();
    let b = ds
        .sql(
            "select count(distinct id) as ids, \
                    sum(cast(substr(value_string, 2) as bigint)) as total, \
                    count(distinct code) as codes \
             from observation_latest",
        )
        .await
        .unwrap();
    let row = flatfhir::arrow::util::pretty::pretty_format_batches(&b)
        .unwrap()
        .to_string();
    assert!(row.contains("| 40000 | 799980000 | 50    |"), "{row}");
    srv.shutdown().await;
}

/// A convert into S3 that fails after a part's upload went multipart aborts that upload: no
/// uploaded piece of it stays in the store. An unfinished multipart upload is never listed, so
/// the failed run's clean-up could not find it, and S3 keeps (and bills) its parts until a
/// lifecycle rule removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_failed_convert_aborts_its_unfinished_uploads() {
    // Without request signing: the proxy forwards requests to another host.
    let Some(s3) = S3Server::start_with(false) else {
        return;
    };
    for writers in [1, 2] {
        failed_convert_aborts_uploads(&s3, writers).await;
    }
}

async fn failed_convert_aborts_uploads(s3: &S3Server, writers: usize) {
    let multipart = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = multipart.clone();
    let prefix = format!("aborted{writers}");
    // The proxy serves the run for as long as it is alive (to the end of this function).
    let (_proxy, loc) = via_proxy(
        s3,
        &prefix,
        Arc::new(move |_: usize, path: &str| {
            if path.contains("uploadId=") {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            None
        }),
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    // The observation part passes the 5 MiB upload buffer long before the run ends, so its
    // upload is a multipart one with parts already in the store...
    let big = crate::support::big_observations(tmp.path(), 25_000);
    // ...when a file cut mid-gzip, read after it, fails the run.
    let sample = flatfhir::run::expand_inputs(&[data("sample")]).unwrap();
    let whole = std::fs::read(&sample[0]).unwrap();
    let cut = tmp.path().join("cut.ndjson.gz");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let options = ConvertOptions {
        threads: 1,
        writers,
        ..big_options()
    };
    let registry = Arc::new(ViewRegistry::builtin().unwrap());
    let err = ConvertBuilder::new(registry, loc)
        .with_files(vec![big, cut])
        .with_options(options)
        .run()
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("cut.ndjson.gz"), "{err:?}");
    assert!(
        multipart.load(std::sync::atomic::Ordering::SeqCst),
        "the observation part was uploaded in parts"
    );
    let root = s3.bucket_dir().parent().unwrap().to_path_buf();
    let left: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|f| f.contains(".upload"))
        .collect();
    assert!(left.is_empty(), "unfinished uploads left behind: {left:?}");
    let objects: Vec<String> = files_under(&s3.bucket_dir().join(&prefix));
    assert!(
        !objects.iter().any(|o| o.ends_with(".parquet")),
        "{objects:?}"
    );
}

/// No compression, row groups of 1,000 rows: the part of 25,000
/// [`crate::support::big_observations`] goes multipart after ~5,000 of them.
fn big_options() -> ConvertOptions {
    ConvertOptions {
        compression: flatfhir::parquet::basic::Compression::UNCOMPRESSED,
        row_group_rows: 1000,
        ..Default::default()
    }
}

/// A convert with two writer threads into S3 whose uploads fail while it writes reports
/// the store's error (naming the part), not a panic: the writer thread that stopped on the error
/// is awaited once for it, and not again when the writer is aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_convert_whose_uploads_keep_failing_reports_the_store_error() {
    let Some(s3) = S3Server::start_with(false) else {
        return;
    };
    // Starting a multipart upload is refused (retrying does not help a 403): the writer learns
    // it while writing, when the observation part outgrows the upload buffer.
    let (proxy, loc) = via_proxy(
        &s3,
        "refused",
        Arc::new(|_: usize, path: &str| path.contains("?uploads").then_some(StatusCode::FORBIDDEN)),
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let options = ConvertOptions {
        writers: 2,
        ..big_options()
    };
    let err = ConvertBuilder::new(Arc::new(ViewRegistry::builtin().unwrap()), loc)
        .with_files(vec![crate::support::big_observations(tmp.path(), 25_000)])
        .with_options(options)
        .run()
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(proxy.failed() > 0);
    assert!(msg.contains(".parquet") && !msg.contains("panic"), "{msg}");
}

/// A loopback proxy in front of `s3` failing the uploads `rule` picks, and a new dataset under
/// `prefix` written through it.
async fn via_proxy(
    s3: &S3Server,
    prefix: &str,
    rule: crate::s3::FailRule,
) -> (FaultyProxy, DatasetLocation) {
    let proxy = FaultyProxy::start(&s3.endpoint, rule).await;
    let loc = DatasetLocation::resolve_with_options(
        &s3.url(prefix),
        &s3.options_via(&proxy.endpoint),
        true,
    )
    .unwrap();
    (proxy, loc)
}
