//! `flatfhir export --profile`: a run from a profile of a config file equals the same run given
//! by flags, and the command line and the environment override a profile. The binary against
//! the built-in server with SMART Backend Services, over real HTTP on 127.0.0.1.

use std::{path::Path, process::Output};

use flatfhir::{
    auth::{PrivateKey, SigningAlg},
    dataset::DatasetLocation,
    serve::{AuthClient, Faults, RequestRecord},
};

use crate::{export::server, store::counts};

fn location(out: &Path) -> DatasetLocation {
    DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap()
}

/// Run the binary off the runtime (the server answers on it meanwhile), with no `FLATFHIR_*`
/// setting of the environment running the tests, plus `env`.
async fn flatfhir(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flatfhir"));
        for (k, _) in std::env::vars() {
            if k.starts_with("FLATFHIR_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .envs(env)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The run manifest `--json` printed.
fn manifest(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The kick-off requests in `log` (not status polls, file downloads or the token endpoint).
fn kickoffs(log: &[RequestRecord]) -> Vec<&RequestRecord> {
    log.iter()
        .filter(|r| r.path.contains("/$export") && !r.path.contains("$export-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_run_equals_the_same_run_given_by_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate(SigningAlg::Es384).unwrap();
    std::fs::create_dir(tmp.path().join("keys")).unwrap();
    let key_file = tmp.path().join("keys/key.pem");
    std::fs::write(&key_file, key.to_pkcs8_pem().unwrap()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let client =
        AuthClient::from_jwks_json(Some("nightly".into()), &key.public_jwks().to_string()).unwrap();
    let srv = server(Faults::default(), |b| b.with_smart_clients(vec![client])).await;
    let base = srv.base_url().to_string();

    // Relative paths (the key, the dataset) are relative to the config file, wherever the
    // command runs. `stale` points at a closed port: only an override can make it work.
    let config = tmp.path().join("flatfhir.toml");
    let profile = |name: &str, base: &str| {
        format!(
            r#"
[profiles.{name}]
base_url = "{base}"
group = "demo-cohort"
type = ["Patient", "Condition", "Observation"]
post = true
client_id = "nightly"
private_key = "keys/key.pem"
out = "ds-profile"
header = {{ X-Tenant = "north" }}
concurrency = 2
max_retries = 3
timeout = "10m"
"#
        )
    };
    let text = profile("nightly", &base) + &profile("stale", "http://127.0.0.1:9/fhir");
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap().to_string();

    // A: the profile.
    let a = flatfhir(
        &[
            "export",
            "--config",
            &config,
            "--profile",
            "nightly",
            "--json",
            "-q",
        ],
        &[],
    )
    .await;
    let a = manifest(&a);
    let log_a = srv.log();

    // B: the same by flags.
    let out_b = tmp.path().join("ds-flags");
    let b = flatfhir(
        &[
            "export",
            "--base-url",
            &base,
            "--group",
            "demo-cohort",
            "--type",
            "Patient,Condition,Observation",
            "--post",
            "--client-id",
            "nightly",
            "--private-key",
            key_file.to_str().unwrap(),
            "--out",
            out_b.to_str().unwrap(),
            "--header",
            "X-Tenant: north",
            "--concurrency",
            "2",
            "--max-retries",
            "3",
            "--timeout",
            "10m",
            "--json",
            "-q",
        ],
        &[],
    )
    .await;
    let b = manifest(&b);
    let log_b = srv.log()[log_a.len()..].to_vec();

    // The same request, the same rows per type and view, the same tables.
    for field in ["request", "types", "views", "source", "rejects"] {
        assert_eq!(a[field], b[field], "{field}");
    }
    assert_eq!(a["request"]["types"].as_array().unwrap().len(), 3);
    assert!(a["types"]["Observation"]["rows"].as_u64().unwrap() > 0);
    let rows_a = counts(&location(&tmp.path().join("ds-profile"))).await;
    assert_eq!(
        rows_a,
        counts(&location(&out_b)).await,
        "every table and view"
    );
    assert_eq!(rows_a["patient"], 4, "{rows_a:?}");

    // The same kick-off, with the token and the header, and every FHIR request authorized.
    let (ka, kb) = (kickoffs(&log_a), kickoffs(&log_b));
    assert_eq!(ka.len(), 1, "{log_a:?}");
    assert_eq!(
        ka.iter().map(|r| (&r.method, &r.path)).collect::<Vec<_>>(),
        kb.iter().map(|r| (&r.method, &r.path)).collect::<Vec<_>>()
    );
    assert_eq!(ka[0].method, "POST");
    for log in [&log_a, &log_b[..]] {
        let fhir: Vec<_> = log.iter().filter(|r| r.path.contains("$export")).collect();
        assert!(fhir.iter().all(|r| r.authorization), "{fhir:?}");
        assert!(
            fhir.iter()
                .all(|r| r.header_names.iter().any(|h| h == "x-tenant")),
            "{fhir:?}"
        );
    }

    // C: the profile chosen by FLATFHIR_PROFILE, its base URL overridden by FLATFHIR_BASE_URL
    // (environment > profile), its types and output by flags (command line > profile).
    let out_c = tmp.path().join("ds-override");
    let c = flatfhir(
        &[
            "export",
            "--config",
            &config,
            "--type",
            "Patient",
            "--out",
            out_c.to_str().unwrap(),
            "--json",
            "-q",
        ],
        &[("FLATFHIR_PROFILE", "stale"), ("FLATFHIR_BASE_URL", &base)],
    )
    .await;
    let c = manifest(&c);
    assert_eq!(c["source"], a["source"]);
    assert_eq!(c["request"]["types"], serde_json::json!(["Patient"]));
    assert_eq!(
        c["types"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["Patient"]
    );
    assert_eq!(
        c["request"]["level"], a["request"]["level"],
        "from the profile"
    );
    assert_eq!(counts(&location(&out_c)).await["patient"], 4);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_with_an_inline_secret_stops_before_any_request() {
    let srv = server(Faults::default(), |b| {
        b.with_bearer_token(Some("s3cr3t-tok".into()))
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("flatfhir.toml");
    std::fs::write(
        &config,
        format!(
            "[profiles.p]\nbase_url = \"{}\"\npatients = true\nout = \"ds\"\nbearer_token = \"s3cr3t-tok\"\n",
            srv.base_url()
        ),
    )
    .unwrap();
    let path = config.to_str().unwrap();
    let args = |profile| ["export", "--config", path, "--profile", profile];
    let o = flatfhir(&args("p"), &[]).await;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{path}:5:")) && stderr.contains("bearer_token_env"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cr3t"),
        "the secret was printed: {stderr}"
    );

    // By reference it works; an unknown profile names the ones there are.
    std::fs::write(
        &config,
        format!(
            "[profiles.p]\nbase_url = \"{}\"\npatients = true\nout = \"ds\"\nbearer_token_env = \"EHR_TOKEN\"\n",
            srv.base_url()
        ),
    )
    .unwrap();
    let o = flatfhir(&args("q"), &[]).await;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        stderr.contains("no profile \"q\" (profiles: p)"),
        "{stderr}"
    );
    assert!(
        srv.log().is_empty(),
        "nothing was sent before the config was valid"
    );
    let o = flatfhir(&args("p"), &[("EHR_TOKEN", "s3cr3t-tok")]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        tmp.path().join("ds").is_dir(),
        "out is relative to the config file"
    );
    assert!(srv.log().iter().all(|r| r.status != 401));
    srv.shutdown().await;
}
