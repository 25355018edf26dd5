//! Unattended nightly runs: full snapshots that remove what a server deleted without saying so,
//! and current state for servers whose resources carry no `meta.lastUpdated`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use flatfhir::{
    client::ExportRequest, dataset::DatasetLocation, query::Dataset, run::export::ExportSummary,
    serve::RunningServer, view::ViewRegistry,
};
use serde_json::json;

use crate::incremental::{NEW, OLD, auto, files, observation, one, patient, start};

async fn export(
    srv: &RunningServer,
    loc: &DatasetLocation,
    request: ExportRequest,
    snapshot: bool,
) -> flatfhir::Result<ExportSummary> {
    crate::incremental::exporter(srv, loc, request)
        .with_snapshot(snapshot)
        .run()
        .await
}

fn full() -> ExportRequest {
    ExportRequest {
        since: None,
        ..auto()
    }
}

fn addr_of(srv: &RunningServer) -> SocketAddr {
    let u = srv.base_url();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
        .parse()
        .unwrap()
}

/// Every current-state table holds what the server holds, count by count.
async fn assert_current_is(ds: &Dataset, srv: &RunningServer) {
    for (t, n) in srv.counts() {
        let view = flatfhir::view::snake_case(&t);
        let got = one(ds, &format!("select count(*) from {view}_latest")).await;
        assert_eq!(got, n.to_string(), "{view}_latest matches the server's {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_removes_what_the_server_deleted_without_a_tombstone() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    // Rows from another source (a converted file) share the tables: no snapshot of the server
    // may remove them.
    let other = tmp.path().join("other.ndjson");
    std::fs::write(
        &other,
        format!("{}\n", patient("c1", "female", &["Elsewhere"], OLD)),
    )
    .unwrap();
    flatfhir::run::convert::ConvertBuilder::new(
        Arc::new(ViewRegistry::builtin().unwrap()),
        loc.clone(),
    )
    .with_files(vec![other])
    .run()
    .await
    .unwrap();

    // Night 1: everything.
    let mut day_one: Vec<_> = (1..=4)
        .map(|i| patient(&format!("p{i}"), "female", &["Old"], OLD))
        .collect();
    day_one.extend(
        (1..=6).map(|i| observation(&format!("o{i}"), &format!("p{}", 1 + i % 4), i as f64, OLD)),
    );
    let srv = start(files(&day_one), "127.0.0.1:0".parse().unwrap(), &[]).await;
    let addr = addr_of(&srv);
    export(&srv, &loc, auto(), false).await.unwrap();
    srv.shutdown().await;

    // Night 2: p2 and o2 are gone from the server, which lists no `deleted` file; p1 changed.
    let mut day_two = vec![patient("p1", "male", &["New"], NEW)];
    day_two.extend([3, 4].map(|i| patient(&format!("p{i}"), "female", &["Old"], OLD)));
    day_two.extend(
        [1, 3, 4, 5, 6]
            .map(|i| observation(&format!("o{i}"), &format!("p{}", 1 + i % 4), i as f64, OLD)),
    );
    let srv = start(files(&day_two), addr, &[]).await;
    let second = export(&srv, &loc, auto(), false).await.unwrap();
    assert_eq!(second.manifest.types["Patient"].rows, 1);
    let ds = Dataset::open(&loc).await.unwrap();
    // An incremental run cannot know: p2 stays (and c1 from the file).
    assert_eq!(
        one(&ds, "select id from patient_latest order by id").await,
        "c1\np1\np2\np3\np4"
    );

    // A snapshot asked for on top of --since is refused before any request.
    let refused = export(&srv, &loc, auto(), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("--snapshot needs a full export"),
        "{refused}"
    );
    let with_filter = ExportRequest {
        type_filters: vec!["Patient?gender=male".into()],
        ..full()
    };
    let refused = export(&srv, &loc, with_filter, true)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("--type-filter"), "{refused}");

    // Night 3: a full snapshot. p2 and o2 leave the current state; the history keeps them.
    let third = export(&srv, &loc, full(), true).await.unwrap();
    assert!(third.manifest.snapshot);
    assert_eq!(
        third.manifest.snapshot_removed,
        [("Observation".to_string(), 1), ("Patient".to_string(), 1)].into()
    );
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one(
            &ds,
            "select id, gender from patient_latest where id <> 'c1' order by id"
        )
        .await,
        "p1 | male\np3 | female\np4 | female"
    );
    assert_eq!(
        one(&ds, "select id from observation_latest order by id").await,
        "o1\no3\no4\no5\no6"
    );
    assert_eq!(
        one(
            &ds,
            "select count(*) from patient_name_latest where patient_id = 'p2'"
        )
        .await,
        "0"
    );
    assert_eq!(
        one(&ds, "select count(*) from patient_latest where id = 'c1'").await,
        "1"
    );
    assert_eq!(
        one(&ds, "select count(*) from patient where id = 'p2'").await,
        "1"
    );
    // Apart from c1 (the file's), current state is the server's.
    let current = srv.counts();
    assert_eq!(
        one(&ds, "select count(*) from patient_latest").await,
        (current["Patient"] + 1).to_string()
    );
    assert_eq!(
        one(&ds, "select count(*) from observation_latest").await,
        current["Observation"].to_string()
    );

    // The same snapshot again removes nothing more.
    let again = export(&srv, &loc, full(), true).await.unwrap();
    assert!(
        again.manifest.snapshot_removed.is_empty(),
        "{:?}",
        again.manifest.snapshot_removed
    );
    srv.shutdown().await;
}

/// Resources without `meta.lastUpdated` (Synthea's, some EHRs'): the newest run wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_last_updated_the_newest_run_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    let bare = |id: &str, gender: &str, family: &str| json!({"resourceType": "Patient", "id": id, "gender": gender, "name": [{"family": family}]});
    let srv = start(
        files(&[bare("p1", "female", "First"), bare("p2", "female", "Two")]),
        "127.0.0.1:0".parse().unwrap(),
        &[],
    )
    .await;
    let addr = addr_of(&srv);
    export(&srv, &loc, full(), false).await.unwrap();
    srv.shutdown().await;
    let srv = start(
        files(&[bare("p1", "male", "Second"), bare("p2", "female", "Two")]),
        addr,
        &[],
    )
    .await;
    export(&srv, &loc, full(), false).await.unwrap();
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one(&ds, "select id, gender from patient_latest order by id").await,
        "p1 | male\np2 | female"
    );
    assert_eq!(
        one(
            &ds,
            "select patient_id, family from patient_name_latest order by patient_id"
        )
        .await,
        "p1 | Second\np2 | Two"
    );
    assert_current_is(&ds, &srv).await;
    srv.shutdown().await;
}

fn group(members: &[&str], updated: &str) -> serde_json::Value {
    json!({
        "resourceType": "Group", "id": "cohort", "type": "person", "actual": true,
        "meta": {"lastUpdated": updated},
        "member": members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect::<Vec<_>>(),
    })
}

fn cohort() -> ExportRequest {
    ExportRequest {
        level: Some(flatfhir::client::ExportLevel::Group("cohort".into())),
        ..auto()
    }
}

/// A patient who joins the Group after a run arrives with their whole history, not only what
/// changed since (the IG's "Group membership" pattern).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_member_arrives_with_their_whole_history() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    // Everything old: p3 exists on the server but is not in the Group yet.
    let mut data: Vec<_> = (1..=3)
        .map(|i| patient(&format!("p{i}"), "female", &["Old"], OLD))
        .collect();
    data.extend(
        (1..=6).map(|i| observation(&format!("o{i}"), &format!("p{}", 1 + i % 3), i as f64, OLD)),
    );
    let mut night_one = data.clone();
    night_one.push(group(&["p1", "p2"], OLD));
    let srv = start(files(&night_one), "127.0.0.1:0".parse().unwrap(), &[]).await;
    let addr = addr_of(&srv);
    let first = export(&srv, &loc, cohort(), false).await.unwrap();
    assert_eq!(first.manifest.types["Patient"].rows, 2);
    assert_eq!(first.manifest.backfill, None);
    srv.shutdown().await;

    // p3 joins (their old resources unchanged); p1 changes.
    let mut night_two = data.clone();
    night_two[0] = patient("p1", "male", &["New"], NEW);
    night_two.push(group(&["p1", "p2", "p3"], NEW));
    let srv = start(files(&night_two), addr, &[]).await;
    let second = export(&srv, &loc, cohort(), false).await.unwrap();
    let backfill = second
        .manifest
        .backfill
        .clone()
        .expect("new members were looked for");
    assert_eq!(
        (backfill.members, backfill.new_members, backfill.runs.len()),
        (3, 1, 1)
    );
    // The _since run itself brought only what changed.
    assert_eq!(second.manifest.types["Patient"].rows, 1);
    assert!(
        srv.log()
            .iter()
            .any(|r| r.method == "POST" && r.path.contains("Group/cohort/$export")),
        "the backfill is a POST with patient parameters"
    );
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one(&ds, "select id, gender from patient_latest order by id").await,
        "p1 | male\np2 | female\np3 | female"
    );
    // p3's observations from before the first run are there; the current state is the Group's.
    assert_eq!(
        one(
            &ds,
            "select id, patient_id from observation_latest order by id"
        )
        .await,
        "o1 | p2\no2 | p3\no3 | p1\no4 | p2\no5 | p3\no6 | p1"
    );
    // The next night: nobody new, and --since auto continues from the _since run, not from
    // the backfill run.
    let third = export(&srv, &loc, cohort(), false).await.unwrap();
    let b = third.manifest.backfill.clone().unwrap();
    assert_eq!((b.members, b.new_members, b.runs.len()), (3, 0, 0));
    assert_eq!(
        third.manifest.request.as_ref().unwrap().since,
        second.manifest.transaction_time
    );
    srv.shutdown().await;
}

/// An overlapping cron run of the same export leaves the running one alone (exit code 3, nothing
/// written); a run whose process was killed is continued at once by the same command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlapping_run_of_the_same_export_steps_aside() {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let srv = flatfhir::serve::ServerBuilder::new(files(&[
        patient("p1", "female", &["A"], OLD),
        patient("p2", "male", &["B"], OLD),
    ]))
    .with_addr("127.0.0.1:0".parse().unwrap())
    .with_delay(Duration::from_secs(4))
    .start()
    .await
    .unwrap();
    let cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flatfhir"));
        c.args(["export", "--system", "--since", "auto", "-q", "--base-url"])
            .arg(srv.base_url().as_str())
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let jobs = out.join("_jobs");
    let wait_for_lease = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let leased = std::fs::read_dir(&jobs).ok().is_some_and(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".lease"))
            });
            if leased {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no lease written");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // A runs (polling for 4 s); B, the same command, steps aside.
    let a = cmd().spawn().unwrap();
    wait_for_lease();
    let metrics = tmp.path().join("b.prom");
    let b = cmd().arg("--metrics-file").arg(&metrics).output().unwrap();
    let stderr = String::from_utf8_lossy(&b.stderr);
    assert_eq!(b.status.code(), Some(3), "{stderr}");
    // The running export writes the metrics when it ends; B's "failure" would fire the alert.
    assert!(
        !metrics.exists(),
        "a busy run leaves the metrics file alone"
    );
    assert!(
        stderr.contains("being run by another flatfhir process"),
        "{stderr}"
    );
    let a = a.wait_with_output().unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap();
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(one(&ds, "select count(*) from patient").await, "2");
    // The finished job holds no lease.
    wait_for_lease_gone(&jobs);

    // A is killed while polling; the same command continues its job at once.
    let mut a = cmd().spawn().unwrap();
    wait_for_lease();
    a.kill().unwrap();
    a.wait().unwrap();
    let c = cmd().output().unwrap();
    let stderr = String::from_utf8_lossy(&c.stderr);
    assert!(c.status.success(), "{stderr}");
    assert!(
        stderr.contains("continuing the unfinished export job"),
        "{stderr}"
    );
    let ds = Dataset::open(&loc).await.unwrap();
    // Run 2 (--since auto, nothing changed) added no rows; every run is whole.
    assert_eq!(one(&ds, "select count(*) from patient").await, "2");
    assert_eq!(one(&ds, "select count(*) from patient_latest").await, "2");
    srv.shutdown().await;
}

fn wait_for_lease_gone(jobs: &std::path::Path) {
    let leased = || {
        std::fs::read_dir(jobs).ok().is_some_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".lease"))
        })
    };
    assert!(!leased(), "a finished job's lease is deleted");
}

/// A file whose body ends early without an error (a proxy cutting a close-delimited body at a
/// line end) holds fewer resources than its manifest `count`: it is downloaded again, so the run
/// publishes all of it. A file that stays short is kept, with a warning, and a snapshot run
/// then removes nothing (those resources are not gone from the server, only from the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_file_is_fetched_again_and_one_that_stays_short_removes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    let mut data: Vec<_> = (1..=6)
        .map(|i| patient(&format!("p{i}"), "female", &["Old"], OLD))
        .collect();
    data.extend((1..=4).map(|i| observation(&format!("o{i}"), "p1", i as f64, OLD)));
    let srv = start(files(&data), "127.0.0.1:0".parse().unwrap(), &[]).await;
    export(&srv, &loc, full(), false).await.unwrap();
    let faulty = |fault: &str| ExportRequest {
        params: vec![("_flatfhirFault".into(), fault.into())],
        ..full()
    };
    let downloads = |srv: &RunningServer| {
        srv.log()
            .iter()
            .filter(|r| r.path.ends_with(".ndjson") && r.status == 200)
            .count()
    };

    // The first download of each file is short: each is fetched again, and the snapshot holds
    // everything.
    let before = downloads(&srv);
    let s = export(&srv, &loc, faulty("short-file"), true)
        .await
        .unwrap();
    let files = s.manifest.inputs.len();
    assert_eq!(downloads(&srv) - before, 2 * files, "each file twice");
    assert_eq!(s.manifest.types["Patient"].rows, 6);
    assert!(s.manifest.warnings.is_empty(), "{:?}", s.manifest.warnings);
    let ds = Dataset::open(&loc).await.unwrap();
    assert_current_is(&ds, &srv).await;

    // Every download is short: kept after the retries, with warnings, and nothing removed.
    let s = export(&srv, &loc, faulty("short-file:99"), true)
        .await
        .unwrap();
    assert!(s.manifest.types["Patient"].rows < 6);
    let warnings = s.manifest.warnings.join("\n");
    assert!(
        warnings.contains("manifest count") && warnings.contains("snapshot: nothing removed"),
        "{warnings}"
    );
    assert!(!s.manifest.snapshot);
    let ds = Dataset::open(&loc).await.unwrap();
    assert_current_is(&ds, &srv).await;

    // A file answered with an OperationOutcome instead of its resources: nothing removed either.
    let s = export(&srv, &loc, faulty("file-outcome:0"), true)
        .await
        .unwrap();
    let warnings = s.manifest.warnings.join("\n");
    assert!(warnings.contains("snapshot: nothing removed"), "{warnings}");
    let ds = Dataset::open(&loc).await.unwrap();
    assert_current_is(&ds, &srv).await;
}
