//! The one run driver, as every command uses it: bounded rejects and their progress during an
//! export, distinct runs for converts started together, errors printed once.

use std::{process::Command, sync::Arc, time::Duration};

use flatfhir::{
    client::{BulkClientBuilder, ExportLevel, ExportRequest},
    dataset::DatasetLocation,
    flatten::MAX_REJECTS_PER_BATCH,
    query::Dataset,
    run::{
        Progress,
        convert::ConvertBuilder,
        export::{ExportBuilder, ExportOptions},
    },
    serve::{DataSource, ServerBuilder},
    view::ViewRegistry,
};

use crate::{
    export::fast_retry,
    support::{data, repo, walk},
};

async fn one(ds: &Dataset, sql: &str) -> String {
    let b = ds.sql(sql).await.unwrap();
    flatfhir::arrow::util::pretty::pretty_format_batches(&b)
        .unwrap()
        .to_string()
        .lines()
        .nth(3)
        .unwrap_or_default()
        .trim_matches(|c| c == '|' || c == ' ')
        .to_string()
}

/// 50,000 resources the server serves but whose `birthDate` fits no date: one exported file of
/// 50,000 rejects. Its rejects leave the decoder in bounded batches (before, an export held all
/// of a file's rejects, raw lines included, until the file ended), and progress counts them
/// during the export (before, always 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_file_of_bad_lines_keeps_rejects_bounded_and_counted() {
    const BAD: usize = 50_000;
    let mut text = String::new();
    for i in 0..BAD {
        // ~200 bytes a line, so a 1 MiB read holds ~5,000 of them.
        text.push_str(&format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"birthDate\":\"not a date\",\"text\":{{\"status\":\"generated\",\"div\":\"{}\"}}}}\n",
            "x".repeat(100)
        ));
    }
    text.push_str("{\"resourceType\":\"Patient\",\"id\":\"good\",\"birthDate\":\"2000-01-01\"}\n");
    let srv = ServerBuilder::new(DataSource::Files(vec![(
        "Patient.ndjson".into(),
        text.into(),
    )]))
    .with_delay(Duration::from_millis(0))
    .with_resources_per_file(100_000)
    .start()
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .with_retry(fast_retry())
        .build()
        .unwrap();
    let progress = Arc::new(Progress::default());
    let summary = ExportBuilder::new(
        client,
        Arc::new(ViewRegistry::builtin().unwrap()),
        loc.clone(),
    )
    .with_request(ExportRequest {
        level: Some(ExportLevel::System),
        ..Default::default()
    })
    .with_progress(progress.clone())
    .run()
    .await
    .unwrap();
    assert_eq!(summary.manifest.rejects, BAD as u64);
    assert_eq!(summary.manifest.types["Patient"].rows, 1);
    assert_eq!(Progress::get(&progress.rejects), BAD as u64);
    let largest = Progress::get(&progress.largest_reject_batch);
    assert!(
        largest > 0 && largest <= MAX_REJECTS_PER_BATCH as u64,
        "largest reject batch {largest}"
    );
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one(&ds, "select count(*) from _rejects").await,
        BAD.to_string()
    );
    srv.shutdown().await;
}

/// Two converts started at once into one dataset are two runs that `query` and outside readers
/// tell apart (before, runs started in the same second shared one `export=` value, and the
/// current state doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converts_started_together_are_distinct_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    let reg = Arc::new(ViewRegistry::builtin().unwrap());
    let files = flatfhir::run::expand_inputs(&[data("sample")]).unwrap();
    let run = || {
        ConvertBuilder::new(reg.clone(), loc.clone())
            .with_files(files.clone())
            .run()
    };
    let (a, b) = tokio::join!(run(), run());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.export, b.export);
    assert_ne!(a.run_id, b.run_id);
    let patients = a.types["Patient"].rows;
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(
        one(&ds, "select count(distinct export) from patient").await,
        "2"
    );
    assert_eq!(
        one(&ds, "select count(*) from patient").await,
        (2 * patients).to_string()
    );
    assert_eq!(
        one(&ds, "select count(*) from patient_latest").await,
        patients.to_string()
    );
    assert_eq!(
        one(&ds, "select count(distinct id) from patient_latest").await,
        patients.to_string()
    );
    // An outside reader sees two partitions, one per run (beside the Delta log).
    let dirs: Vec<_> = std::fs::read_dir(tmp.path().join("patient"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|d| d != "_delta_log")
        .collect();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
}

/// A failed convert leaves nothing behind: no run record, no parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_convert_leaves_no_parts() {
    for writers in [1, 3] {
        failed_convert_leaves_no_parts(writers).await;
    }
}

/// [`a_failed_convert_leaves_no_parts`] with `writers` Parquet writer threads.
async fn failed_convert_leaves_no_parts(writers: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
    let reg = Arc::new(ViewRegistry::builtin().unwrap());
    // A good file, then one that is cut mid-gzip: the run fails after writing parts.
    let mut files = flatfhir::run::expand_inputs(&[data("sample")]).unwrap();
    let bad = tmp.path().join("cut.ndjson.gz");
    let whole = std::fs::read(&files[0]).unwrap();
    std::fs::write(&bad, &whole[..whole.len() / 2]).unwrap();
    files.push(bad);
    let options = flatfhir::run::convert::ConvertOptions {
        writers,
        ..Default::default()
    };
    let err = ConvertBuilder::new(reg, loc.clone())
        .with_files(files)
        .with_options(options)
        .run()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("cut.ndjson.gz"), "{text}");
    // The message says which output and how much the run had written before it was deleted.
    assert!(
        text.contains(tmp.path().to_str().unwrap()) && text.contains("parts ("),
        "{text}"
    );
    let parquet: Vec<_> = walk(tmp.path())
        .into_iter()
        .filter(|p| !p.ends_with("cut.ndjson.gz"))
        .collect();
    assert!(parquet.is_empty(), "left behind: {parquet:?}");
}

/// An export killed after some types' parts were coalesced during the downloads (and maybe in
/// the middle of one) resumes with exact rows, redoes those types under the same part names,
/// and leaves no part behind that the run does not list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_export_redoes_early_coalescing_and_leaves_no_stray_part() {
    let srv = ServerBuilder::new(DataSource::Dir(data("sample")))
        .with_resources_per_file(10)
        .start()
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let bin = env!("CARGO_BIN_EXE_flatfhir");
    let mut child = crate::export::slow_export(&srv, &out, 5).spawn().unwrap();
    // Files come in manifest order, one at a time: once a type's last file is committed its
    // parts are coalesced (`part-…-<run>-<type>-c.parquet`). Kill when the first such part is
    // on disk, likely while later types are still downloading or coalescing.
    crate::export::kill_when(&mut child, "coalesced type", || {
        out.exists()
            && walk(&out)
                .iter()
                .any(|p| coalesced_part(p) && !p.contains("_latest/"))
    })
    .await;
    let o = Command::new(bin)
        .args(["export", "--resume", out.to_str().unwrap(), "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    crate::export::assert_exact(&out, &srv.counts()).await;
    let ds = Dataset::open(&DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap())
        .await
        .unwrap();
    let runs = ds.runs().await.unwrap();
    let listed: std::collections::BTreeSet<String> = runs
        .iter()
        .flat_map(|r| {
            r.files
                .iter()
                .map(|f| out.join(&f.path).display().to_string())
        })
        .collect();
    assert!(listed.iter().any(|p| coalesced_part(p)), "{listed:?}");
    let on_disk: std::collections::BTreeSet<String> = walk(&out)
        .into_iter()
        .filter(|p| p.ends_with(".parquet") || p.ends_with(".staged"))
        .filter(|p| !p.contains("_latest/"))
        .collect();
    assert_eq!(on_disk, listed);
    srv.shutdown().await;
}

/// A part written by coalescing: `part-<n>-<tag>-c.parquet` or `…-c<k>.parquet`.
fn coalesced_part(path: &str) -> bool {
    path.strip_suffix(".parquet")
        .and_then(|p| p.rsplit_once("-c"))
        .is_some_and(|(_, k)| k.bytes().all(|b| b.is_ascii_digit()))
}

/// Every error is printed once: no cause repeated, on a few failing commands.
#[test]
fn errors_print_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let sample = data("sample");
    let cases: Vec<Vec<String>> = vec![
        vec![
            "convert".into(),
            "/nonexistent/in.ndjson".into(),
            "--out".into(),
            out.display().to_string(),
        ],
        vec![
            "query".into(),
            "--data".into(),
            repo().display().to_string(),
            "selec 1".into(),
        ],
        vec![
            "query".into(),
            "--data".into(),
            repo().display().to_string(),
            "select * from no_such_table".into(),
        ],
        vec![
            "convert".into(),
            sample.display().to_string(),
            "--out".into(),
            repo().join("Cargo.toml").display().to_string(),
        ],
        vec![
            "view".into(),
            "--view".into(),
            "/nonexistent/view.json".into(),
            sample.display().to_string(),
        ],
    ];
    for args in cases {
        let o = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        let parts: Vec<&str> = lines[0].trim_start_matches("error: ").split(": ").collect();
        for (i, p) in parts.iter().enumerate() {
            for q in &parts[i + 1..] {
                assert!(
                    p.len() < 12 || !q.contains(p),
                    "{args:?}: {p:?} repeated in {:?}",
                    lines[0]
                );
            }
        }
    }
}

async fn export_sample(
    request: ExportRequest,
    out: &std::path::Path,
    options: ExportOptions,
    client: impl FnOnce(BulkClientBuilder) -> BulkClientBuilder,
    progress: Arc<Progress>,
) -> (
    flatfhir::Result<flatfhir::run::export::ExportSummary>,
    flatfhir::serve::RunningServer,
) {
    let srv = crate::export::server(Default::default(), |b| b).await;
    let client = client(BulkClientBuilder::new(srv.base_url().clone()).with_retry(fast_retry()))
        .build()
        .unwrap();
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), true).unwrap();
    let r = ExportBuilder::new(client, Arc::new(ViewRegistry::builtin().unwrap()), loc)
        .with_request(request)
        .with_options(options)
        .with_progress(progress)
        .run()
        .await;
    (r, srv)
}

/// Four gzip bombs at once (32 MiB of ndjson each, ~290:1 on the wire): every piece of inflated
/// input the decoders get is at most one read buffer, whatever the ratio (before, a body was
/// inflated chunk by chunk into one buffer that grew with the ratio).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bombs_reach_the_decoder_in_bounded_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let progress = Arc::new(Progress::default());
    let (r, srv) = export_sample(
        crate::export::with_fault("gzip-bomb:32:4"),
        tmp.path(),
        ExportOptions {
            concurrency: 4,
            ..Default::default()
        },
        |c| c,
        progress.clone(),
    )
    .await;
    let s = r.unwrap();
    assert_eq!(s.manifest.rejects, 0);
    let patients = s.manifest.types["Patient"];
    assert!(patients.rows > 4 * 100_000, "{patients:?}");
    let inflated: u64 = s.manifest.inputs.iter().map(|i| i.bytes).sum();
    assert!(inflated > 4 * (32 << 20), "{inflated}");
    let largest = Progress::get(&progress.largest_chunk);
    eprintln!("{inflated} bytes inflated; largest piece handed to a decoder: {largest} bytes");
    assert!(
        largest > 0 && largest <= flatfhir::run::DEFAULT_CHUNK_BYTES as u64,
        "largest piece handed to a decoder: {largest} bytes"
    );
    srv.shutdown().await;
}

/// `--timeout` bounds the whole job, downloads included, and says what was still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_timeout_covers_downloads_and_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (r, srv) = export_sample(
        crate::export::with_fault("stall-file"),
        tmp.path(),
        ExportOptions {
            timeout: Duration::from_millis(1500),
            ..Default::default()
        },
        // A stalled body would be retried only after a minute: the job's limit comes first.
        |c| c.with_idle_timeout(Duration::from_secs(60)),
        Arc::new(Progress::default()),
    )
    .await;
    let err = r.unwrap_err();
    assert!(
        matches!(
            &err,
            flatfhir::Error::Export(flatfhir::run::export::ExportError::Timeout { .. })
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("downloading") && text.contains(".ndjson"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    srv.shutdown().await;
}

/// A resource type no default view reads (`Task`) lands in its generic table and gets current
/// state like every other table: `task_latest`, one row per id, the newest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_without_a_view_get_current_state_too() {
    let tmp = tempfile::tempdir().unwrap();
    let loc = DatasetLocation::resolve(tmp.path().join("ds").to_str().unwrap(), true).unwrap();
    let reg = Arc::new(ViewRegistry::builtin().unwrap());
    let task = |v: &str, status: &str| {
        format!(
            "{{\"resourceType\":\"Task\",\"id\":\"t1\",\"meta\":{{\"lastUpdated\":\"{v}\"}},\"status\":\"{status}\",\"intent\":\"order\"}}\n"
        )
    };
    for (name, text) in [
        ("a.ndjson", task("2026-01-01T00:00:00Z", "requested")),
        ("b.ndjson", task("2026-02-01T00:00:00Z", "completed")),
    ] {
        let f = tmp.path().join(name);
        std::fs::write(&f, text).unwrap();
        ConvertBuilder::new(reg.clone(), loc.clone())
            .with_files(vec![f])
            .run()
            .await
            .unwrap();
    }
    let ds = Dataset::open(&loc).await.unwrap();
    assert_eq!(one(&ds, "select count(*) from task").await, "2");
    assert_eq!(one(&ds, "select count(*) from task_latest").await, "1");
    assert_eq!(
        one(
            &ds,
            "select json_get_str(resource, 'status') from task_latest"
        )
        .await,
        "completed"
    );
}

/// Many tiny files (the sample cut into files of 10 resources: ~280 files) end as a few parts
/// per view, not one part per file and view, with exact rows; the small parts are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tiny_files_are_coalesced_into_few_parts() {
    let srv = crate::export::server(Default::default(), |b| b.with_resources_per_file(10)).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = crate::export::export(
        &srv,
        crate::export::patients(),
        tmp.path(),
        flatfhir::client::Auth::None,
    )
    .await
    .unwrap();
    let files = s.manifest.inputs.len();
    assert!(files > 200, "{files} files");
    let mut per_view: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &s.manifest.files {
        *per_view.entry(f.view.as_str()).or_default() += 1;
    }
    // A view keeps at most a few small parts (fewer than the coalescing threshold), whatever
    // the number of files.
    let most = flatfhir::run::export::coalesce::MIN_SMALL_PARTS;
    assert!(per_view.values().all(|n| *n < most), "{per_view:?}");
    assert!(s.manifest.files.len() < 2 * per_view.len(), "{per_view:?}");
    // Each type's parts were rewritten as soon as its last file was committed (their names
    // carry the type), not all after the last download.
    let observation = s
        .manifest
        .files
        .iter()
        .find(|f| f.view == "observation")
        .unwrap();
    assert!(
        observation.path.contains("-observation-c"),
        "{}",
        observation.path
    );
    crate::export::assert_exact(tmp.path(), &srv.counts()).await;
    // On disk: only the parts the run lists (the coalesced small parts were deleted), beside
    // the current-state tables' files.
    let parquet: Vec<String> = walk(tmp.path())
        .into_iter()
        .filter(|p| p.ends_with(".parquet") || p.ends_with(".staged"))
        .filter(|p| !p.contains("_latest/"))
        .collect();
    assert_eq!(parquet.len(), s.manifest.files.len(), "{parquet:?}");
    srv.shutdown().await;
}
