//! Shaped for a scheduler, against the built-in server over real HTTP on 127.0.0.1: JSON logs
//! that parse line by line and hold no secret, the run summary in the run record, the
//! Prometheus metrics file after a success and after a failure, and downloads that the server
//! throttles with `429` + `Retry-After` (seconds and HTTP-date) completing with exact rows while
//! the client slows down.

use std::{collections::BTreeMap, path::Path, process::Output, time::Duration};

use serde_json::Value;

use flatfhir::{
    auth::{PrivateKey, SigningAlg},
    client::{Auth, BulkClientBuilder, ExportRequest},
    dataset::{DatasetLocation, RunManifest},
    run::export::{ExportBuilder, ExportOptions, ExportSummary},
    serve::{AuthClient, Faults, RunningServer},
    view::ViewRegistry,
};

use crate::export::{assert_exact, fast_retry, patients, server};

/// Run the CLI off the runtime (the server answers on it meanwhile).
async fn flatfhir(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_flatfhir"))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("FLATFHIR_LOG_FORMAT")
            .env_remove("FLATFHIR_METRICS_FILE")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The dataset's published runs.
async fn runs(out: &Path) -> Vec<RunManifest> {
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap();
    RunManifest::list(&loc).await.unwrap()
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict reading of the Prometheus text format (0.0.4) as flatfhir writes it: `# HELP` and
/// `# TYPE gauge` once per family and before its samples, then `name{label="value",…} number`
/// lines whose label values are escaped (`\\`, `\"`, `\n`). Panics on anything else.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    assert!(text.ends_with('\n'), "the file ends with a newline");
    let mut typed: BTreeMap<String, bool> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect(line);
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(valid_name(name) && kind == "gauge", "{line}");
            assert!(
                typed.insert(name.into(), true).is_none(),
                "{name} typed twice"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let brace = line.find('{').expect(line);
        let name = &line[..brace];
        assert!(typed.contains_key(name), "{name}: sample before its # TYPE");
        let mut labels = BTreeMap::new();
        let mut chars = line[brace + 1..].chars();
        loop {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            assert!(valid_name(&key), "label name {key:?} in {line}");
            assert_eq!(chars.next(), Some('"'), "{line}");
            let mut value = String::new();
            loop {
                match chars.next().expect(line) {
                    '\\' => match chars.next().expect(line) {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => panic!("bad escape \\{c} in {line}"),
                    },
                    '"' => break,
                    '\n' => panic!("raw newline in {line}"),
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.next() {
                Some(',') => continue,
                Some('}') => break,
                other => panic!("{other:?} after a label value in {line}"),
            }
        }
        let rest: String = chars.collect();
        let value = rest.strip_prefix(' ').expect(line);
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("value {v:?} in {line}")),
        };
        samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    samples
}

/// The value of the sample `name` whose own label (besides `command` and `dataset`) is `label`.
fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && match label {
                    Some((k, v)) => s.labels.get(k).map(String::as_str) == Some(v),
                    None => s.labels.len() == 2,
                }
        })
        .map(|s| s.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_carry_the_run_id_and_hold_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
    let pem = key.to_pkcs8_pem().unwrap();
    let key_file = tmp.path().join("key.pem");
    std::fs::write(&key_file, &pem).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let client =
        AuthClient::from_jwks_json(Some("nightly".into()), &key.public_jwks().to_string()).unwrap();
    let srv = server(Faults::default(), |b| {
        b.with_smart_clients(vec![client])
            .with_token_lifetime(Duration::from_secs(1))
            .with_delay(Duration::from_millis(1200))
    })
    .await;
    let data = tmp.path().join("out");
    let out = flatfhir(strings(&[
        "export",
        "--base-url",
        srv.base_url().as_str(),
        "--patients",
        "--client-id",
        "nightly",
        "--private-key",
        key_file.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--log-format",
        "json",
        "-vv",
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert_exact(&data, &srv.counts()).await;
    let run_id = runs(&data).await.pop().unwrap().run_id;

    let mut with_run = 0;
    let mut levels = std::collections::BTreeSet::new();
    for line in stderr.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let time = v["time"]
            .as_str()
            .unwrap_or_else(|| panic!("no time: {line}"));
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{line}");
        levels.insert(v["level"].as_str().expect(line).to_string());
        assert!(v["message"].is_string(), "{line}");
        assert!(v.get("fields").is_none_or(Value::is_object), "{line}");
        if let Some(r) = v.get("run_id") {
            assert_eq!(r.as_str(), Some(run_id.as_str()), "{line}");
            with_run += 1;
        }
    }
    assert!(stderr.lines().count() > 50, "-vv logs: {stderr}");
    assert!(
        levels.contains("DEBUG") && levels.contains("INFO"),
        "{levels:?}"
    );
    assert!(with_run > 5, "the run's events carry its id: {with_run}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("\"run_id\"") && l.contains("\"fields\"")),
        "events with fields inside the run"
    );

    // No secret anywhere: access tokens (renewed at least once), client assertions (JWTs), the
    // private key.
    let tokens = srv.access_tokens();
    assert!(tokens.len() >= 2, "renewed: {}", tokens.len());
    for t in &tokens {
        assert!(!stderr.contains(t.as_str()), "an access token was logged");
    }
    assert!(!stderr.contains("eyJ"), "a client assertion was logged");
    for body_line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!stderr.contains(body_line), "the private key was logged");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_record_and_the_metrics_file_hold_the_run_summary() {
    let srv = server(Faults::default(), |b| b).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lake");
    let prom = tmp.path().join("flatfhir.prom");
    let base = srv.base_url().to_string();
    let export = |extra: &[&str]| {
        let mut a = strings(&[
            "export",
            "--base-url",
            &base,
            "--patients",
            "--out",
            data.to_str().unwrap(),
            "--metrics-file",
            prom.to_str().unwrap(),
            "-q",
        ]);
        a.extend(strings(extra));
        a
    };
    let out = flatfhir(export(&[])).await;
    assert!(out.status.success(), "{out:?}");

    // The run record: counts, phases, HTTP figures.
    let m = runs(&data).await.pop().unwrap();
    let rows: BTreeMap<String, u64> = m.types.iter().map(|(t, c)| (t.clone(), c.rows)).collect();
    assert_eq!(rows, srv.counts());
    let x = &m.metrics;
    assert!(x.duration_seconds > 0.0 && x.phases.poll > 0.0 && x.phases.decode > 0.0);
    assert!(
        x.phases.commit > 0.0 && x.phases.current_state > 0.0,
        "{x:?}"
    );
    assert!(x.bytes_read > 0 && x.http.bytes_received > 0, "{x:?}");
    assert!(x.http.status[&202] >= 1, "the kick-off's 202: {x:?}");
    assert!(x.http.status[&200] >= m.inputs.len() as u64, "{x:?}");
    assert_eq!(x.http.requests, x.http.status.values().sum::<u64>());
    assert_eq!((x.http.throttled, x.http.retries), (0, 0));
    assert_eq!(x.http.max_concurrency, x.http.min_concurrency);

    // The metrics file: the same figures, labelled.
    let text = std::fs::read_to_string(&prom).unwrap();
    let s = parse_prometheus(&text);
    assert!(
        s.iter()
            .all(|s| s.labels["command"] == "export"
                && s.labels["dataset"] == data.to_str().unwrap()),
        "every sample carries command and dataset"
    );
    assert_eq!(value(&s, "flatfhir_run_success", None), Some(1.0));
    assert_eq!(value(&s, "flatfhir_run_exit_code", None), Some(0.0));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let at = value(&s, "flatfhir_last_run_timestamp_seconds", None).unwrap();
    assert!(at <= now && at > now - 600.0, "{at}");
    for (t, n) in srv.counts() {
        assert_eq!(
            value(&s, "flatfhir_run_rows", Some(("type", &t))),
            Some(n as f64),
            "{t}"
        );
    }
    assert_eq!(
        value(&s, "flatfhir_run_http_responses", Some(("code", "200"))),
        Some(x.http.status[&200] as f64)
    );
    assert!(
        value(
            &s,
            "flatfhir_run_phase_duration_seconds",
            Some(("phase", "poll"))
        )
        .unwrap()
            > 0.0
    );

    // A failed run replaces the file: success 0, exit code 2.
    let out = flatfhir(export(&[
        "--param",
        "_flatfhirFault=kickoff-500",
        "--max-retries",
        "0",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let s = parse_prometheus(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(value(&s, "flatfhir_run_success", None), Some(0.0));
    assert_eq!(value(&s, "flatfhir_run_exit_code", None), Some(2.0));
    assert_eq!(
        value(&s, "flatfhir_run_http_responses", Some(("code", "500"))),
        Some(1.0)
    );
    assert!(value(&s, "flatfhir_run_rows", Some(("type", "Patient"))).is_none());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    srv.shutdown().await;
}

async fn throttled_export(srv: &RunningServer, req: ExportRequest, out: &Path) -> ExportSummary {
    let client = BulkClientBuilder::new(srv.base_url().clone())
        .with_auth(Auth::None)
        .with_retry(fast_retry())
        .with_max_concurrent_requests(4)
        .build()
        .unwrap();
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), true).unwrap();
    ExportBuilder::new(
        client,
        std::sync::Arc::new(ViewRegistry::builtin().unwrap()),
        loc,
    )
    .with_request(req)
    .with_options(ExportOptions {
        concurrency: 4,
        ..Default::default()
    })
    .run()
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_downloads_honour_retry_after_slow_down_and_complete_exactly() {
    // Every file's first request answers 429 + Retry-After: 1 (seconds, then an HTTP-date).
    for fault in ["file-429", "file-429,retry-after-date"] {
        let srv = server(Faults::default(), |b| {
            b.with_retry_after(1).with_resources_per_file(100)
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let req = ExportRequest {
            types: vec!["Patient".into(), "Condition".into(), "Encounter".into()],
            params: vec![("_flatfhirFault".into(), fault.into())],
            ..patients()
        };
        let s = throttled_export(&srv, req, tmp.path()).await;
        let expected: BTreeMap<String, u64> = srv
            .counts()
            .into_iter()
            .filter(|(t, _)| ["Patient", "Condition", "Encounter"].contains(&t.as_str()))
            .collect();
        assert_exact(tmp.path(), &expected).await;
        let files = s.manifest.inputs.len() as u64;
        assert!(files >= 3, "{files} files");

        let h = &s.manifest.metrics.http;
        let log = srv.log();
        let served_429 = log.iter().filter(|r| r.status == 429).count() as u64;
        assert_eq!(served_429, files, "{fault}: one 429 per file");
        assert_eq!(
            (h.throttled, h.status[&429]),
            (files, files),
            "{fault}: {h:?}"
        );
        assert!(h.retries >= files, "{fault}: {h:?}");
        // Every throttled file waited its Retry-After (a date rounds up: at least as long).
        assert!(
            h.throttle_wait_seconds >= files as f64 * 0.99,
            "{fault}: waited {} s for {files} files",
            h.throttle_wait_seconds
        );
        assert_eq!(h.max_concurrency, 4);
        assert!(h.min_concurrency < 4, "{fault}: the limit went down: {h:?}");
        assert!(h.min_concurrency >= 1);

        // The published record says the same.
        let stored = runs(tmp.path()).await.pop().unwrap();
        assert_eq!(stored.metrics.http, *h);
        srv.shutdown().await;
    }
}

#[test]
fn the_metrics_parser_refuses_what_the_format_forbids() {
    let ok = "# HELP a_b help\n# TYPE a_b gauge\na_b{x=\"q\\\"\\\\\\n\"} 1.5\n";
    let s = parse_prometheus(ok);
    assert_eq!(s[0].labels["x"], "q\"\\\n");
    assert_eq!(s[0].value, 1.5);
    for bad in [
        "a_b{x=\"1\"} 1\n",                                    // no TYPE
        "# TYPE a_b gauge\na_b{x=1} 1\n",                      // unquoted
        "# TYPE a_b gauge\na_b{x=\"\\t\"} 1\n",                // bad escape
        "# TYPE a_b gauge\n# TYPE a_b gauge\na_b{x=\"\"} 1\n", // typed twice
        "# TYPE a_b gauge\na_b{x=\"\"} one\n",                 // not a number
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}
