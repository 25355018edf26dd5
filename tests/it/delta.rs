//! The dataset as Delta Lake tables: several processes writing one dataset at once (locally and
//! on the S3 server on loopback), time travel, compaction while a reader holds a version, the
//! races of a current-state merge with a compaction and of two first runs (each commit put in a
//! fixed order through a gated store), and the old layout refused then migrated.

use std::{path::Path, process::Command};

use flatfhir::{
    compact::{CompactOptions, compact},
    dataset::{DatasetLocation, RunManifest},
    query::{AsOf, Dataset},
};

use crate::{s3::S3Server, store::counts, support::data};

/// `flatfhir convert tests/data/sample --out <out>` with extra arguments, as a child process.
fn convert(out: &str, extra: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_flatfhir"))
        .arg("convert")
        .arg(data("sample"))
        .args(["--out", out, "-q"])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// `compact --retain 0s`.
async fn compact_and_vacuum_all(loc: &DatasetLocation) -> flatfhir::compact::CompactSummary {
    let opts = CompactOptions {
        retain: Some(std::time::Duration::ZERO),
        ..Default::default()
    };
    compact(loc, &opts).await.unwrap()
}

async fn one_number(ds: &Dataset, sql: &str) -> i64 {
    let b = ds.sql(sql).await.unwrap();
    b[0].column(0)
        .as_any()
        .downcast_ref::<flatfhir::arrow::array::Int64Array>()
        .unwrap()
        .value(0)
}

/// N processes convert the sample into `out` at once; every commit lands, every run's rows are in
/// its partition exactly once, and the current state holds each resource once.
async fn writers_at_once(out: &str, extra: &[String], loc: &DatasetLocation) {
    const N: usize = 4;
    let children: Vec<_> = (0..N)
        .map(|_| {
            let c = convert(out, extra);
            // Overlapping runs, not runs in lockstep (see the S3 test's note).
            std::thread::sleep(std::time::Duration::from_millis(150));
            c
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "a concurrent writer failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let runs = RunManifest::list(loc).await.unwrap();
    assert_eq!(runs.len(), N);
    let ds = Dataset::open(loc).await.unwrap();
    let one = &runs[0];
    for (view, rows) in &one.views {
        if *rows == 0 {
            continue;
        }
        for run in &runs {
            assert_eq!(run.views[view], *rows, "every run read the same sample");
            assert!(
                run.committed.contains_key(view),
                "{view} committed by {}",
                run.run_id
            );
            let n = one_number(
                &ds,
                &format!(
                    "select count(*) from \"{view}\" where export = '{}'",
                    run.export
                ),
            )
            .await;
            assert_eq!(
                n as u64, *rows,
                "{view}: run {}'s rows exactly once",
                run.run_id
            );
        }
    }
    // Current state: one version per resource, from one run, whatever order the merges ran in.
    let patients = one_number(&ds, "select count(distinct id) from patient").await;
    assert_eq!(
        one_number(&ds, "select count(*) from patient_latest").await,
        patients
    );
    let names = one.views["patient_name"] as i64;
    assert_eq!(
        one_number(&ds, "select count(*) from patient_name_latest").await,
        names
    );
    assert_eq!(
        one_number(
            &ds,
            "select count(*) from (select patient_id from patient_name_latest \
             group by patient_id having count(distinct export) > 1)"
        )
        .await,
        0,
        "a resource's child rows come from one version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_write_one_local_dataset_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let out = out.to_str().unwrap();
    std::fs::create_dir_all(out).unwrap();
    let loc = DatasetLocation::resolve(out, false).unwrap();
    writers_at_once(out, &[], &loc).await;
}

/// s3s-fs answers `If-None-Match: *` with 412 when the object exists — a check-then-write, not
/// atomic under a tight race, but enough to exercise the commit protocol (lost races retried).
/// A commit that such a race overwrote is found by reading it back and made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_write_one_s3_dataset_at_once() {
    let Some(s3) = S3Server::start() else {
        return;
    };
    let url = s3.url("delta/ds");
    let mut extra = Vec::new();
    for (k, v) in s3.options() {
        extra.push("--store-option".to_string());
        extra.push(format!("{k}={v}"));
    }
    let loc = DatasetLocation::resolve_with_options(&url, &s3.options(), false).unwrap();
    writers_at_once(&url, &extra, &loc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_to_a_run_and_compaction_under_a_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap().to_string();
    let loc = DatasetLocation::resolve(&out, false).unwrap();
    let registry = std::sync::Arc::new(flatfhir::view::ViewRegistry::builtin().unwrap());
    let inputs = flatfhir::run::expand_inputs(&[data("sample")]).unwrap();
    for _ in 0..2 {
        // Small files, so that OPTIMIZE has something to do.
        flatfhir::run::convert::ConvertBuilder::new(registry.clone(), loc.clone())
            .with_files(inputs.clone())
            .with_options(flatfhir::run::convert::ConvertOptions {
                max_rows_per_file: 300,
                batch_size: 100,
                ..Default::default()
            })
            .run()
            .await
            .unwrap();
    }
    let runs = RunManifest::list(&loc).await.unwrap();
    let first = Dataset::open_as_of(&loc, &AsOf::Run(runs[0].run_id.clone()))
        .await
        .unwrap();
    let per_run = runs[0].views["patient"] as i64;
    assert_eq!(
        one_number(&first, "select count(*) from patient").await,
        per_run
    );
    let now = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one_number(&now, "select count(*) from patient").await,
        2 * per_run
    );

    // A reader holding the current version keeps answering through OPTIMIZE and VACUUM.
    let before = counts(&loc).await;
    let s = compact_and_vacuum_all(&loc).await;
    assert!(s.tables.iter().any(|t| t.files_removed > 0), "{s:?}");
    assert_eq!(
        one_number(&now, "select count(*) from patient").await,
        2 * per_run
    );
    assert_eq!(
        one_number(&now, "select count(*) from observation").await,
        before["observation"]
    );
    assert_eq!(counts(&loc).await, before);
}

/// `--as-of` a point before a table's first commit leaves the table out: delta-rs loads the
/// table's version 0 for such a time instead of failing, which showed a later run's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_before_a_tables_first_commit_leaves_it_out() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), false).unwrap();
    let registry = std::sync::Arc::new(flatfhir::view::ViewRegistry::builtin().unwrap());
    // Run 1 writes Patient only, run 2 Observation only (which creates `observation`).
    for file in ["Patient.ndjson.gz", "Observation.ndjson.gz"] {
        let inputs = flatfhir::run::expand_inputs(&[data("sample").join(file)]).unwrap();
        flatfhir::run::convert::ConvertBuilder::new(registry.clone(), loc.clone())
            .with_files(inputs)
            .run()
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let runs = RunManifest::list(&loc).await.unwrap();
    assert_eq!(runs.len(), 2);

    let after_run1 = Dataset::open_as_of(&loc, &AsOf::Run(runs[0].run_id.clone()))
        .await
        .unwrap();
    let patients = runs[0].views["patient"] as i64;
    assert_eq!(
        one_number(&after_run1, "select count(*) from patient").await,
        patients
    );
    let err = after_run1
        .sql("select count(*) from observation")
        .await
        .expect_err("observation did not exist after run 1");
    assert!(err.to_string().contains("observation"), "{err}");
    let tables: Vec<String> = after_run1
        .tables()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(
        !tables.iter().any(|t| t.starts_with("observation")),
        "{tables:?}"
    );

    let before_any = "2000-01-01T00:00:00Z".parse().unwrap();
    let before_any = Dataset::open_as_of(&loc, &AsOf::Timestamp(before_any))
        .await
        .unwrap();
    assert!(before_any.tables().await.unwrap().is_empty());
    assert!(
        before_any
            .sql("select count(*) from patient_latest")
            .await
            .is_err()
    );

    let now = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one_number(&now, "select count(*) from observation").await,
        runs[1].views["observation"] as i64
    );
}

/// A dataset of the layout before Delta (plain Parquet + `_runs/`) is refused with the command
/// that converts it, and `migrate` converts it in place with the counts checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_layout_is_refused_then_migrated() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap().to_string();
    let o = convert(&out, &[]).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let loc = DatasetLocation::resolve(&out, false).unwrap();
    let want = counts(&loc).await;
    // Make it old: drop the Delta logs, the current tables and the records of the commits.
    for e in std::fs::read_dir(tmp.path()).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with("_latest") {
            std::fs::remove_dir_all(&p).unwrap();
        } else if p.join("_delta_log").is_dir() {
            std::fs::remove_dir_all(p.join("_delta_log")).unwrap();
        }
    }
    for e in std::fs::read_dir(tmp.path().join("_runs"))
        .unwrap()
        .flatten()
    {
        let mut run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        let run = run.as_object_mut().unwrap();
        for k in ["committed", "current", "published"] {
            run.remove(k);
        }
        std::fs::write(e.path(), serde_json::to_vec(&run).unwrap()).unwrap();
    }
    let err = Dataset::open(&loc)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("flatfhir migrate --data"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
        .args(["migrate", "--data", &out])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("counts checked"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(counts(&loc).await, want);
    assert!(Path::new(&out).join("patient_latest/_delta_log").is_dir());
}

/// The built-in server on the sample, and `export --patients` from it into `<tmp>/ds`, aborted
/// by the fault injection after its third table commit.
async fn export_aborted_after_three_commits() -> (
    flatfhir::serve::RunningServer,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    use flatfhir::serve::{DataSource, ServerBuilder};
    let srv = ServerBuilder::new(DataSource::Dir(data("sample")))
        .start()
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let o = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
        .args([
            "export",
            "--base-url",
            srv.base_url().as_str(),
            "--patients",
            "-q",
        ])
        .arg("--out")
        .arg(&out)
        .env(flatfhir::dataset::delta::ABORT_AFTER_COMMITS_ENV, "3")
        .output()
        .unwrap();
    assert!(!o.status.success(), "the fault should have aborted the run");
    (srv, tmp, out)
}

/// A run that crashed between two tables' commits: each table holds the run whole or not at all,
/// and `export --resume` commits the rest — exact counts, no id twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_table_commits_is_finished_by_resume() {
    let (srv, _tmp, out) = export_aborted_after_three_commits().await;
    let out_s = out.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_flatfhir");
    let loc = DatasetLocation::resolve(out_s, false).unwrap();
    let expected = srv.counts();
    let ds = Dataset::open(&loc).await.unwrap();
    // Commits go out side by side: the abort comes after the 3rd, others may have landed (or
    // just created their table) too. Each table holds the run whole or not at all.
    let mut whole = 0;
    for (t, n) in &expected {
        let table = flatfhir::view::snake_case(t);
        if ds.table_names().contains(&table) {
            let rows = one_number(&ds, &format!("select count(*) from \"{table}\"")).await;
            assert!(
                rows == 0 || rows as u64 == *n,
                "{table}: {rows} of {n} rows"
            );
        }
    }
    for t in ds.table_names() {
        let rows = one_number(&ds, &format!("select count(*) from \"{t}\"")).await;
        whole += usize::from(rows > 0);
    }
    assert!(whole >= 3, "{whole} tables hold the run");
    assert!(
        RunManifest::list(&loc).await.unwrap().is_empty(),
        "no run record yet"
    );

    let o = Command::new(bin)
        .args(["export", "--resume", out_s, "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    crate::export::assert_exact(&out, &expected).await;
    let runs = RunManifest::list(&loc).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].committed.len() > whole, "{:?}", runs[0].committed);
    srv.shutdown().await;
}

/// An export killed while it published (after its last file was committed), whose server then
/// forgot the job (restarted, or expired it): `--resume` finishes publishing from the job's
/// records without the server — it used to poll, get a 404 and abandon the job, leaving the run's
/// rows in the history tables with no run record (hunt finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_killed_while_it_published_is_finished_without_its_server() {
    let (srv, _tmp, out) = export_aborted_after_three_commits().await;
    let out_s = out.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_flatfhir");
    let expected = srv.counts();
    srv.shutdown().await;
    let o = Command::new(bin)
        .args(["export", "--resume", out_s, "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    crate::export::assert_exact(&out, &expected).await;
    let loc = DatasetLocation::resolve(out_s, false).unwrap();
    assert_eq!(RunManifest::list(&loc).await.unwrap().len(), 1);
}

/// Discarding a run keeps the files of the current-state tables: their merges carry their own
/// app id, not the run's, so the run looked uncommitted there and the files a committed merge
/// reads were deleted — every later read and run of the dataset failed (hunt finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_a_run_keeps_what_the_current_state_tables_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, loc) = sample_converted(tmp.path());
    let before = counts(&loc).await;
    let run = RunManifest::list(&loc).await.unwrap().remove(0);
    let d = flatfhir::dataset::discard_run(&loc, &run.export).await;
    assert_eq!(d.objects, 0, "{d:?}");
    assert_eq!(counts(&loc).await, before);
}

/// A convert killed between its history commits and its current-state merge (convert has no
/// `--resume`): the next run of the dataset, here a convert of one other Patient, finishes
/// publishing it first — every table holds the killed run whole, its record is written, and
/// the current-state tables hold every resource of both runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_convert_killed_while_it_published_is_finished_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let out_s = out.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_flatfhir");
    let o = Command::new(bin)
        .arg("convert")
        .arg(data("sample"))
        .args(["--out", out_s, "-q"])
        .env(flatfhir::dataset::delta::ABORT_AFTER_COMMITS_ENV, "3")
        .output()
        .unwrap();
    assert!(!o.status.success(), "the fault should have aborted the run");
    let loc = DatasetLocation::resolve(out_s, false).unwrap();
    assert!(RunManifest::list(&loc).await.unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(out.join(flatfhir::dataset::PUBLISHING_DIR))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "json")
            .count(),
        1,
        "the killed run left its record's copy"
    );

    // The sample's counts, from a convert that was not killed.
    let whole = tmp.path().join("whole");
    let o = Command::new(bin)
        .arg("convert")
        .arg(data("sample"))
        .args(["--out", whole.to_str().unwrap(), "-q"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut want = counts(&DatasetLocation::resolve(whole.to_str().unwrap(), false).unwrap()).await;

    let one = tmp.path().join("one.ndjson");
    std::fs::write(
        &one,
        "{\"resourceType\":\"Patient\",\"id\":\"one-more\",\"meta\":{\"lastUpdated\":\"2024-01-01T00:00:00Z\"}}\n",
    )
    .unwrap();
    let o = Command::new(bin)
        .arg("convert")
        .arg(&one)
        .args(["--out", out_s])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("interrupted while it published"),
        "{stderr}"
    );
    for t in ["patient", "patient_latest"] {
        *want.get_mut(t).unwrap() += 1;
    }
    assert_eq!(counts(&loc).await, want);
    assert_eq!(RunManifest::list(&loc).await.unwrap().len(), 2);
    assert!(
        !out.join(flatfhir::dataset::PUBLISHING_DIR).exists(),
        "nothing left of _publishing, not even the empty directory"
    );
}

/// The sample converted once into `<dir>/ds`: its path and location.
fn sample_converted(dir: &Path) -> (String, DatasetLocation) {
    let out_s = dir.join("ds").to_str().unwrap().to_string();
    let first = convert(&out_s, &[]).wait_with_output().unwrap();
    assert!(first.status.success());
    let loc = DatasetLocation::resolve(&out_s, false).unwrap();
    (out_s, loc)
}

/// The default patient view changed by `change`, written to `<dir>/views/patient.json`; returns
/// the `--schemas` arguments that use it.
fn changed_patient_view(
    dir: &Path,
    change: impl FnOnce(&mut Vec<serde_json::Value>),
) -> Vec<String> {
    let views = dir.join("views");
    std::fs::create_dir_all(&views).unwrap();
    let mut patient: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::support::repo().join("schemas/patient.json")).unwrap(),
    )
    .unwrap();
    change(patient["select"][0]["column"].as_array_mut().unwrap());
    std::fs::write(views.join("patient.json"), patient.to_string()).unwrap();
    vec!["--schemas".into(), views.to_str().unwrap().to_string()]
}

/// A view that gained a column since its tables were created (a dataset lives for years, its
/// views change): the next run adds the column to the history and current tables, earlier rows
/// reading null; a column the view lost stays in its tables, null in the rows written since.
/// Both read back through Delta (`flatfhir query`; CI reads every table with other engines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_gains_or_loses_a_column_evolves_its_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let (out_s, loc) = sample_converted(tmp.path());
    let ds = Dataset::open(&loc).await.unwrap();
    let patients = one_number(&ds, "select count(*) from patient").await;
    let genders = one_number(&ds, "select count(gender) from patient").await;
    assert!(patients > 0 && genders > 0);

    let args = changed_patient_view(tmp.path(), |columns| {
        columns.retain(|c| c["name"] != "gender");
        columns.push(serde_json::json!({"name": "extra_gender", "path": "gender", "type": "code"}));
    });
    let second = convert(&out_s, &args).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");

    let ds = Dataset::open(&loc).await.unwrap();
    let n = |sql: &'static str| one_number(&ds, sql);
    assert_eq!(n("select count(*) from patient").await, 2 * patients);
    // The new column: the second run's rows only; the lost one: the first run's only.
    assert_eq!(n("select count(extra_gender) from patient").await, genders);
    assert_eq!(n("select count(gender) from patient").await, genders);
    assert_eq!(
        n("select count(*) from patient where extra_gender is not null and gender is not null")
            .await,
        0
    );
    // The current state is the second run's version of every patient.
    assert_eq!(n("select count(*) from patient_latest").await, patients);
    assert_eq!(
        n("select count(extra_gender) from patient_latest").await,
        genders
    );
    assert_eq!(n("select count(gender) from patient_latest").await, 0);
    // A third run with the default view again: the table keeps both columns.
    let third = convert(&out_s, &[]).wait_with_output().unwrap();
    assert!(
        third.status.success(),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one_number(&ds, "select count(gender) from patient_latest").await,
        genders
    );
    assert_eq!(
        one_number(&ds, "select count(extra_gender) from patient").await,
        genders
    );
}

/// A view that gains a `TIMESTAMP` (without time zone) column: Delta's `timestamp_ntz`, which
/// a table may hold only with the `timestampNtz` feature. The run that adds it upgrades the
/// table's protocol in the same commit, so the table stays readable (the commit without it
/// made every later read and run of the table fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_gains_a_timestamp_without_zone_keeps_its_table_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let (out_s, loc) = sample_converted(tmp.path());
    let ds = Dataset::open(&loc).await.unwrap();
    let births = one_number(&ds, "select count(birth_date) from patient").await;
    assert!(births > 0);
    let args = changed_patient_view(tmp.path(), |columns| {
        columns.push(serde_json::json!({"name": "born_at", "path": "birthDate",
            "tag": [{"name": "ansi/type", "value": "TIMESTAMP"}]}));
    });
    for round in 0..2 {
        let run = convert(&out_s, &args).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "round {round}: {stderr}");
    }
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one_number(&ds, "select count(born_at) from patient").await,
        2 * births
    );
    assert_eq!(
        one_number(&ds, "select count(born_at) from patient_latest").await,
        births
    );
    let t = loc.open_table("patient").await.unwrap().unwrap();
    let protocol = serde_json::to_value(t.snapshot().unwrap().protocol()).unwrap();
    for key in ["readerFeatures", "writerFeatures"] {
        assert!(
            protocol[key]
                .as_array()
                .unwrap()
                .contains(&"timestampNtz".into()),
            "{protocol}"
        );
    }
    // And a run with the default views again.
    let run = convert(&out_s, &[]).wait_with_output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// A view with a column no Delta type holds (`ansi/type` `TIME`) is refused before the run
/// does any I/O: nothing is written, and the message names the view and the column.
#[test]
fn a_view_no_delta_table_can_hold_is_refused_before_any_io() {
    let tmp = tempfile::tempdir().unwrap();
    let args = changed_patient_view(tmp.path(), |columns| {
        columns.push(serde_json::json!({"name": "at_time", "path": "birthDate",
            "tag": [{"name": "ansi/type", "value": "TIME"}]}));
    });
    let out = tmp.path().join("ds");
    let run = convert(out.to_str().unwrap(), &args)
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("view `patient`, column `at_time`")
            && stderr.contains("no Delta Lake type"),
        "{stderr}"
    );
    assert!(
        crate::support::walk(&out).is_empty(),
        "{:?}",
        crate::support::walk(&out)
    );
}

/// A run in which a column changed type (a view changed with `--schemas`) is refused before
/// any table commits it: every table keeps its rows, and the message names the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_that_changed_type_refuses_the_run_before_any_table_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let (out_s, loc) = sample_converted(tmp.path());
    let before = counts(&loc).await;

    // The patient view (it sorts after most tables the run writes) with `birth_date` as text.
    let args = changed_patient_view(tmp.path(), |columns| {
        for c in columns.iter_mut().filter(|c| c["name"] == "birth_date") {
            c["type"] = "string".into();
            c.as_object_mut().unwrap().remove("tag");
        }
    });
    let second = convert(&out_s, &args).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains("changed type") && stderr.contains("birth_date date"),
        "{stderr}"
    );
    assert!(!stderr.contains("had committed it"), "{stderr}");
    assert_eq!(counts(&loc).await, before, "no table holds the refused run");
}

/// VACUUM (`compact --retain`) also removes the partitions of runs that died before committing
/// — parts no commit names, and on a local disk their half-written `#<n>` files — once they
/// started longer ago than the retention and a day; a young run (it may still be writing), an
/// unfinished export job (`--resume` may finish it) and a current-state table keep theirs, and
/// no row changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_removes_what_dead_runs_left_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, loc) = sample_converted(tmp.path());
    let out = Path::new(&out);
    let run = RunManifest::list(&loc).await.unwrap()[0].export.clone();
    let part = crate::support::walk(&out.join(format!("patient/export={run}")))
        .into_iter()
        .find(|p| p.ends_with(".parquet"))
        .unwrap();
    let ago = |hours: i64| {
        flatfhir::dataset::RunIds::at(
            chrono::Utc::now() - chrono::Duration::hours(hours),
            &mut rand::rng(),
        )
    };
    // A job that `--resume` could still finish, started three days ago.
    let job = flatfhir::dataset::JobRecord::new(ago(72), "http://h/fhir", Default::default());
    job.save(&loc).await.unwrap();
    let (dead, young, resumable) = (ago(48).export, ago(1).export, job.export.clone());
    // Started two days ago too, but one of its files was written an hour ago: still at work.
    let writing = ago(48).export;
    // Files written `hours` ago.
    let plant = |run: &str, table: &str, hours: u64| {
        let dir = out.join(format!("{table}/export={run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let parquet = dir.join("part-00000-x.parquet");
        let staged = dir.join("part-00001-x.parquet.staged#1");
        std::fs::copy(&part, &parquet).unwrap();
        std::fs::write(&staged, b"PAR1").unwrap();
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(hours * 3600);
        for f in [parquet, staged] {
            let f = std::fs::File::options().write(true).open(f).unwrap();
            f.set_modified(then).unwrap();
        }
        dir
    };
    let planted = [
        plant(&dead, "patient", 47),
        plant(&dead, "no_table_yet", 47),
        plant(&dead, "_rejects", 47),
        plant(&young, "patient", 1),
        plant(&resumable, "patient", 70),
        // Merges write current-state files into earlier runs' partitions: never swept.
        plant(&dead, "patient_latest", 47),
        plant(&writing, "patient", 47),
        plant(&writing, "_rejects", 1),
    ];
    let before = counts(&loc).await;

    let s = compact_and_vacuum_all(&loc).await;
    assert_eq!(s.dead_runs.runs, vec![dead.clone()], "{:?}", s.dead_runs);
    assert_eq!(s.dead_runs.files, 6, "{:?}", s.dead_runs);
    assert!(!planted[0].exists() && !planted[1].exists() && !planted[2].exists());
    assert!(
        planted[3].join("part-00000-x.parquet").exists(),
        "a young run's part went"
    );
    assert!(
        planted[4].join("part-00000-x.parquet").exists(),
        "a resumable job's part went"
    );
    assert!(
        planted[5].join("part-00000-x.parquet").exists(),
        "a current table's part went"
    );
    assert!(
        planted[6].join("part-00000-x.parquet").exists()
            && planted[7].join("part-00000-x.parquet").exists(),
        "the part of a run still writing went"
    );
    assert!(out.join(format!("patient/export={run}")).exists());
    assert_eq!(counts(&loc).await, before);
}

/// A store that, once, runs `before` just before the first put whose path ends with `suffix`
/// goes through: another writer's commit lands, in a fixed order, between the moment a commit
/// was prepared (its snapshot read) and its conditional put.
struct Gate {
    inner: std::sync::Arc<dyn object_store::ObjectStore>,
    suffix: String,
    before: std::sync::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
}

impl Gate {
    /// `location` with its store gated; the location itself stays ungated (the other writer's).
    fn around(
        location: &DatasetLocation,
        suffix: &str,
        before: futures::future::BoxFuture<'static, ()>,
    ) -> (DatasetLocation, std::sync::Arc<Gate>) {
        let gate = std::sync::Arc::new(Gate {
            inner: location.store.clone(),
            suffix: suffix.to_string(),
            before: std::sync::Mutex::new(Some(before)),
        });
        let mut gated = location.clone();
        gated.store = gate.clone();
        (gated, gate)
    }

    fn fired(&self) -> bool {
        self.before.lock().unwrap().is_none()
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("suffix", &self.suffix)
            .finish()
    }
}

impl std::fmt::Display for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({})", self.inner)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Gate {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if location.as_ref().ends_with(&self.suffix) {
            let before = self.before.lock().unwrap().take();
            if let Some(before) = before {
                before.await;
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// `Patient.ndjson` in `dir`: six patients, last updated `updated`, of gender `gender`.
fn six_patients(dir: &Path, gender: &str, updated: &str) -> Vec<std::path::PathBuf> {
    let text: String = (1..=6)
        .map(|i| {
            crate::incremental::patient(&format!("p{i}"), gender, &["Name"], updated).to_string()
                + "\n"
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Patient.ndjson"), text).unwrap();
    flatfhir::run::expand_inputs(&[dir.to_path_buf()]).unwrap()
}

/// Convert `inputs` into `loc`, one row per file (so that OPTIMIZE has files to merge).
async fn convert_small_files(
    loc: &DatasetLocation,
    inputs: Vec<std::path::PathBuf>,
) -> RunManifest {
    let registry = std::sync::Arc::new(flatfhir::view::ViewRegistry::builtin().unwrap());
    flatfhir::run::convert::ConvertBuilder::new(registry, loc.clone())
        .with_files(inputs)
        .with_options(flatfhir::run::convert::ConvertOptions {
            max_rows_per_file: 1,
            batch_size: 1,
            ..Default::default()
        })
        .run()
        .await
        .unwrap()
}

/// [`convert_small_files`] on a runtime of its own (a run's future is not `Send`), as the other
/// writer behind a [`Gate`].
fn convert_elsewhere(
    loc: DatasetLocation,
    inputs: Vec<std::path::PathBuf>,
) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(convert_small_files(&loc, inputs));
        })
        .await
        .unwrap();
    })
}

/// `(rows, distinct ids, rows of gender `gender`)` of `patient_latest`.
async fn latest_patients(loc: &DatasetLocation, gender: &str) -> (i64, i64, i64) {
    let ds = Dataset::open(loc).await.unwrap();
    let n = |sql: String| {
        let ds = &ds;
        async move { one_number(ds, &sql).await }
    };
    (
        n("select count(*) from patient_latest".into()).await,
        n("select count(distinct id) from patient_latest".into()).await,
        n(format!(
            "select count(*) from patient_latest where gender = '{gender}'"
        ))
        .await,
    )
}

/// The commit file of `version` of `table`.
fn commit_path(table: &str, version: u64) -> String {
    format!("/{table}/_delta_log/{version:020}.json")
}

/// The `commitInfo.operation` of every commit of `table`, oldest first.
async fn operations(loc: &DatasetLocation, table: &str) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let mut commits: Vec<_> = loc
        .store
        .list(Some(&loc.child(&format!("{table}/_delta_log/"))))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    commits.retain(|p| p.as_ref().ends_with(".json"));
    commits.sort();
    let mut ops = Vec::new();
    for p in commits {
        let body = loc.store.get(&p).await.unwrap().bytes().await.unwrap();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let action: serde_json::Value = serde_json::from_slice(line).unwrap();
            if let Some(op) = action["commitInfo"]["operation"].as_str() {
                ops.push(op.to_string());
            }
        }
    }
    ops
}

/// A run's current-state merge prepared on the version before a compaction of the table and
/// committed after it (report finding 2): the merge must not remove the small files OPTIMIZE
/// already replaced while OPTIMIZE's file, with the old versions, stays — it loses the race and
/// is recomputed from the compacted table, so every patient is there once, in its new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_prepared_before_a_compaction_is_recomputed_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve("memory://race-merge-after-optimize/ds", false).unwrap();
    convert_small_files(
        &loc,
        six_patients(&tmp.path().join("one"), "female", crate::incremental::OLD),
    )
    .await;
    let latest = loc.open_table("patient_latest").await.unwrap().unwrap();
    let next = latest.version().unwrap() + 1;

    // The second run's merge of patient_latest is about to commit `next`: compaction takes it.
    let compacted = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (ungated, done) = (loc.clone(), compacted.clone());
    let (gated, gate) = Gate::around(
        &loc,
        &commit_path("patient_latest", next),
        Box::pin(async move {
            let opts = CompactOptions {
                views: vec!["patient_latest".into()],
                ..Default::default()
            };
            *done.lock().unwrap() = Some(compact(&ungated, &opts).await.unwrap());
        }),
    );
    convert_small_files(
        &gated,
        six_patients(&tmp.path().join("two"), "male", crate::incremental::NEW),
    )
    .await;
    assert!(gate.fired());
    let s = compacted.lock().unwrap().take().unwrap();
    assert_eq!(s.tables[0].version, Some(next), "{s:?}");
    assert!(s.tables[0].files_removed > 1, "{s:?}");

    assert_eq!(latest_patients(&loc, "male").await, (6, 6, 6));
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one_number(&ds, "select count(*) from patient_name_latest").await,
        6
    );
}

/// The other order: a compaction of a current-state table prepared before a run's merge and
/// committed after it. OPTIMIZE's commit conflicts with the merge (it would bring back the rows
/// the merge removed); compaction starts over from the merged table and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_prepared_before_a_merge_is_redone_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve("memory://race-optimize-after-merge/ds", false).unwrap();
    convert_small_files(
        &loc,
        six_patients(&tmp.path().join("one"), "female", crate::incremental::OLD),
    )
    .await;
    let next = loc
        .open_table("patient_latest")
        .await
        .unwrap()
        .unwrap()
        .version()
        .unwrap()
        + 1;

    // OPTIMIZE is about to commit `next`: the second run's merge takes it.
    let inputs = six_patients(&tmp.path().join("two"), "male", crate::incremental::NEW);
    let (gated, gate) = Gate::around(
        &loc,
        &commit_path("patient_latest", next),
        convert_elsewhere(loc.clone(), inputs),
    );
    let opts = CompactOptions {
        views: vec!["patient_latest".into()],
        ..Default::default()
    };
    let s = compact(&gated, &opts).await.unwrap();
    assert!(gate.fired());
    assert!(s.tables[0].version > Some(next), "{s:?}");

    assert_eq!(latest_patients(&loc, "male").await, (6, 6, 6));
    assert_eq!(
        operations(&loc, "patient_latest").await,
        ["CREATE TABLE", "MERGE", "OPTIMIZE"]
    );
}

/// Two first runs into a new dataset (report finding 3), in a fixed order: the first run's
/// create of `table` (with its rows) is about to commit version 0 when the second run, started
/// later, creates every table first. The first run's create must not land as a second CREATE
/// TABLE at version 1: a current-state table would hold both runs' rows, and a history table
/// would be created again (another table id, the first run's schema). The first run then commits
/// as a later writer does.
async fn first_runs_at_once(memory: &str, table: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(&format!("memory://{memory}/ds"), false).unwrap();
    let inputs = six_patients(tmp.path(), "female", crate::incremental::OLD);
    let (gated, gate) = Gate::around(
        &loc,
        &commit_path(table, 0),
        convert_elsewhere(loc.clone(), inputs.clone()),
    );
    convert_small_files(&gated, inputs).await;
    assert!(gate.fired());

    assert_eq!(RunManifest::list(&loc).await.unwrap().len(), 2);
    assert_eq!(latest_patients(&loc, "female").await, (6, 6, 6));
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(one_number(&ds, "select count(*) from patient").await, 12);
    assert_eq!(
        one_number(&ds, "select count(*) from patient_name_latest").await,
        6
    );
    for t in loc.delta_tables().await.unwrap() {
        let ops = operations(&loc, &t).await;
        assert_eq!(ops[0], "CREATE TABLE", "{t}: {ops:?}");
        assert!(
            !ops[1..].contains(&"CREATE TABLE".to_string()),
            "{t}: {ops:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_that_loses_the_create_of_a_current_table_adds_no_rows() {
    first_runs_at_once("race-create-latest", "patient_latest").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_that_loses_the_create_of_a_history_table_appends_to_the_winners() {
    first_runs_at_once("race-create-history", "patient").await;
}

/// Current state across runs that bring versions out of order: a later run's older version of
/// a key loses, its newer version of another key wins, a key only it brings is added, and keys
/// it does not bring keep theirs — in the base view and in a child view (`patient_name`). The
/// merge computes its per-key aggregates over the run's keys only, not the whole current table
/// (so that a small nightly run into a large dataset holds little): this pins what that
/// restriction must keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_state_keeps_the_newest_version_whatever_the_run_order() {
    use crate::incremental::patient;
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().join("ds").to_str().unwrap(), true).unwrap();
    let write = |name: &str, resources: &[serde_json::Value]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let text: String = resources.iter().map(|r| r.to_string() + "\n").collect();
        std::fs::write(dir.join("Patient.ndjson"), text).unwrap();
        flatfhir::run::expand_inputs(&[dir]).unwrap()
    };
    let t1 = "2024-01-01T00:00:00Z";
    let t2 = "2024-02-01T00:00:00Z";
    let t3 = "2024-03-01T00:00:00Z";
    // Run A: p1 at t2, p2 at t1, p4 at t1.
    convert_small_files(
        &loc,
        write(
            "a",
            &[
                patient("p1", "female", &["A1"], t2),
                patient("p2", "female", &["A2"], t1),
                patient("p4", "female", &["A4"], t1),
            ],
        ),
    )
    .await;
    // Run B: p1 at t1 (older: loses), p2 at t3 (newer: wins), p3 (new); not p4.
    convert_small_files(
        &loc,
        write(
            "b",
            &[
                patient("p1", "male", &["B1", "B1b"], t1),
                patient("p2", "male", &["B2", "B2b"], t3),
                patient("p3", "male", &["B3"], t1),
            ],
        ),
    )
    .await;
    let ds = Dataset::open(&loc).await.unwrap();
    let rows = |sql: &str| {
        let ds = &ds;
        let sql = sql.to_string();
        async move {
            let batches = ds.sql(&sql).await.unwrap();
            batches
                .iter()
                .flat_map(flatfhir::sink::rows::batch_to_json_rows)
                .map(|r| {
                    r.iter()
                        .map(|(_, v)| v.as_str().unwrap_or_default().to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        rows("select id, gender from patient_latest order by id").await,
        ["p1 female", "p2 male", "p3 male", "p4 female"]
    );
    assert_eq!(
        rows("select patient_id, family from patient_name_latest order by patient_id, family")
            .await,
        ["p1 A1", "p2 B2", "p2 B2b", "p3 B3", "p4 A4"]
    );
}
