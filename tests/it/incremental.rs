//! Incremental runs: `--since auto`, tombstones from the server's `deleted` files, the
//! `<view>_latest` current-state tables, and `compact` (OPTIMIZE + VACUUM) keeping them right.
//!
//! The server's data changes between two runs: the second server (same address, so the same
//! FHIR base URL) serves a copy in which one patient and one observation were updated, one
//! patient was added, and one patient and one observation were deleted (left out of the data
//! and listed in the export's `deleted` file).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use flatfhir::{
    client::{BulkClientBuilder, ExportLevel, ExportRequest, RetryConfig},
    compact::{CompactOptions, compact},
    dataset::DatasetLocation,
    query::Dataset,
    run::export::{ExportBuilder, ExportSummary, resolve_since_auto},
    serve::{DataSource, Faults, RunningServer, ServerBuilder},
    view::ViewRegistry,
};
use serde_json::json;

use crate::store::counts;

pub(crate) const OLD: &str = "2020-01-01T00:00:00Z";
/// After the first run's transactionTime, whenever the test runs.
pub(crate) const NEW: &str = "2099-01-01T00:00:00Z";

pub(crate) fn patient(id: &str, gender: &str, names: &[&str], updated: &str) -> serde_json::Value {
    json!({
        "resourceType": "Patient", "id": id, "meta": {"lastUpdated": updated},
        "gender": gender,
        "name": names.iter().map(|n| json!({"family": n, "given": ["A"]})).collect::<Vec<_>>(),
    })
}

pub(crate) fn observation(id: &str, patient: &str, value: f64, updated: &str) -> serde_json::Value {
    json!({
        "resourceType": "Observation", "id": id, "meta": {"lastUpdated": updated},
        "status": "final", "code": {"text": "weight"},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": value, "unit": "kg"},
    })
}

pub(crate) fn files(resources: &[serde_json::Value]) -> DataSource {
    let mut by_type: std::collections::BTreeMap<String, String> = Default::default();
    for r in resources {
        let t = r["resourceType"].as_str().unwrap().to_string();
        let f = by_type.entry(t).or_default();
        f.push_str(&r.to_string());
        f.push('\n');
    }
    DataSource::Files(
        by_type
            .into_iter()
            .map(|(t, text)| (format!("{t}.ndjson"), bytes::Bytes::from(text)))
            .collect(),
    )
}

/// Day one: five patients (p1 with one name), ten observations.
fn day_one() -> Vec<serde_json::Value> {
    let mut v: Vec<_> = (1..=5)
        .map(|i| patient(&format!("p{i}"), "female", &["Old"], OLD))
        .collect();
    v.extend(
        (1..=10).map(|i| observation(&format!("o{i}"), &format!("p{}", 1 + i % 5), i as f64, OLD)),
    );
    v
}

/// Day two: p1 updated (male, two names), p2 deleted, p6 new, o1 updated, o2 deleted.
fn day_two() -> Vec<serde_json::Value> {
    let mut v = vec![patient("p1", "male", &["New", "Other"], NEW)];
    v.extend((3..=5).map(|i| patient(&format!("p{i}"), "female", &["Old"], OLD)));
    v.push(patient("p6", "other", &["Newcomer"], NEW));
    v.push(observation("o1", "p2", 100.0, NEW));
    v.extend(
        (3..=10).map(|i| observation(&format!("o{i}"), &format!("p{}", 1 + i % 5), i as f64, OLD)),
    );
    v
}

pub(crate) async fn start(data: DataSource, addr: SocketAddr, deleted: &[&str]) -> RunningServer {
    ServerBuilder::new(data)
        .with_addr(addr)
        .with_delay(Duration::from_millis(100))
        .with_resources_per_file(3)
        .with_faults(Faults {
            deleted: deleted.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .start()
        .await
        .unwrap()
}

pub(crate) fn auto() -> ExportRequest {
    ExportRequest {
        level: Some(ExportLevel::System),
        since: Some("auto".into()),
        ..Default::default()
    }
}

/// An export of `request` from `srv` into `loc` with the default views and fast retries.
pub(crate) fn exporter(
    srv: &RunningServer,
    loc: &DatasetLocation,
    request: ExportRequest,
) -> ExportBuilder {
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .with_retry(RetryConfig {
            base: Duration::from_millis(50),
            ..Default::default()
        })
        .build()
        .unwrap();
    let registry = Arc::new(ViewRegistry::builtin().unwrap());
    ExportBuilder::new(client, registry, loc.clone()).with_request(request)
}

async fn run(srv: &RunningServer, loc: &DatasetLocation, request: ExportRequest) -> ExportSummary {
    exporter(srv, loc, request).run().await.unwrap()
}

pub(crate) async fn one(ds: &Dataset, sql: &str) -> String {
    let b = ds.sql(sql).await.unwrap();
    let s = flatfhir::arrow::util::pretty::pretty_format_batches(&b)
        .unwrap()
        .to_string();
    s.lines()
        .filter(|l| l.starts_with('|'))
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            cells.join(" | ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_auto_tombstones_and_latest_views_match_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();

    // Run 1: `auto` with no earlier run is a full export.
    let srv = start(files(&day_one()), "127.0.0.1:0".parse().unwrap(), &[]).await;
    let addr: SocketAddr = format!(
        "{}:{}",
        srv.base_url().host_str().unwrap(),
        srv.base_url().port().unwrap()
    )
    .parse()
    .unwrap();
    let base = srv.base_url().to_string();
    let first = run(&srv, &loc, auto()).await;
    assert_eq!(first.manifest.request.as_ref().unwrap().since, None);
    assert_eq!(first.manifest.types["Patient"].rows, 5);
    assert_eq!(first.manifest.types["Observation"].rows, 10);
    srv.shutdown().await;
    // A different population does not continue from this run.
    let only_patients = ExportRequest {
        types: vec!["Patient".into()],
        ..auto()
    };
    let r = resolve_since_auto(&loc, &base, only_patients)
        .await
        .unwrap();
    assert_eq!(r.since, None);
    let r = resolve_since_auto(&loc, "http://elsewhere/fhir/", auto())
        .await
        .unwrap();
    assert_eq!(r.since, None);

    // Run 2: the data changed; the same base URL; `auto` continues from run 1.
    let srv = start(files(&day_two()), addr, &["Patient/p2", "Observation/o2"]).await;
    assert_eq!(srv.base_url().to_string(), base);
    let second = run(&srv, &loc, auto()).await;
    assert_eq!(
        second.manifest.request.as_ref().unwrap().since,
        first.manifest.transaction_time
    );
    // Only what changed came over.
    assert_eq!(second.manifest.types["Patient"].rows, 2);
    assert_eq!(second.manifest.types["Observation"].rows, 1);
    assert_eq!(second.manifest.deleted, 2);
    let current = srv.counts();
    srv.shutdown().await;

    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(one(&ds, "select count(*) from patient").await, "7");
    assert_eq!(one(&ds, "select count(*) from observation").await, "11");
    for (t, n) in &current {
        let view = flatfhir::view::snake_case(t);
        let got = one(&ds, &format!("select count(*) from {view}_latest")).await;
        assert_eq!(
            got,
            n.to_string(),
            "{view}_latest matches the server's {t} count"
        );
    }
    assert_eq!(
        one(&ds, "select id, gender from patient_latest order by id").await,
        "p1 | male\np3 | female\np4 | female\np5 | female\np6 | other"
    );
    assert_eq!(
        one(&ds, "select patient_id, family from patient_name_latest where patient_id in ('p1', 'p2') order by family").await,
        "p1 | New\np1 | Other"
    );
    assert_eq!(
        one(
            &ds,
            "select cast(value_quantity as int) from observation_latest where id = 'o1'"
        )
        .await,
        "100"
    );
    let before = counts(&loc).await;

    // OPTIMIZE keeps every table's rows in fewer files; VACUUM then deletes the replaced ones.
    let s = compact(
        &loc,
        &CompactOptions {
            retain: Some(Duration::ZERO),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let removed: u64 = s.tables.iter().map(|t| t.files_removed).sum();
    let added: u64 = s.tables.iter().map(|t| t.files_added).sum();
    assert!(added < removed, "{s:?}");
    // Files the merges replaced before the compaction are vacuumed; those it replaced stay for
    // readers of the version before it.
    assert!(
        s.tables.iter().map(|t| t.files_deleted).sum::<usize>() > 0,
        "{s:?}"
    );
    assert_eq!(counts(&loc).await, before);
}

/// `--since auto` after a run bounded by `--until`: that run covered the changes before its
/// `until` only, so the next run starts there, not at its `transactionTime` (which would skip
/// the changes in between for good). A run with `--elements` is another export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_auto_after_until_starts_at_the_until() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    const MID: &str = "2023-06-01T00:00:00Z";
    let data = files(&[
        patient("p1", "female", &["Old"], OLD),
        patient("p2", "female", &["Old"], OLD),
        patient("p3", "male", &["Mid"], MID),
        patient("p4", "male", &["Mid"], MID),
    ]);
    let srv = start(data, "127.0.0.1:0".parse().unwrap(), &[]).await;
    let bounded = ExportRequest {
        level: Some(ExportLevel::System),
        until: Some("2021-01-01T00:00:00Z".into()),
        ..Default::default()
    };
    let first = run(&srv, &loc, bounded).await;
    assert_eq!(first.manifest.types["Patient"].rows, 2);

    // Another population (`_elements`): no earlier run of it.
    let base = srv.base_url().to_string();
    let ids = ExportRequest {
        elements: vec!["id".into()],
        ..auto()
    };
    let r = resolve_since_auto(&loc, &base, ids).await.unwrap();
    assert_eq!(r.since, None);

    let second = run(&srv, &loc, auto()).await;
    assert_eq!(
        second.manifest.request.as_ref().unwrap().since.as_deref(),
        Some("2020-12-31T23:59:59.999Z")
    );
    assert_eq!(
        second.manifest.types.get("Patient").map(|t| t.rows),
        Some(2),
        "the changes between the first run's until and its transactionTime"
    );
    srv.shutdown().await;
}
