//! End-to-end tests over real HTTP on 127.0.0.1: kick-off → poll → manifest → download.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::{DataSource, Faults, RunningServer, ServerBuilder};

const DELAY: Duration = Duration::from_millis(150);

/// 3 patients, a group of two, observations, an encounter, an organization, a line without type.
fn ndjson() -> Vec<(String, Bytes)> {
    let patients = concat!(
        r#"{"resourceType":"Patient","id":"p1","gender":"female","meta":{"lastUpdated":"2019-01-01T00:00:00Z"}}"#,
        "\n",
        r#"{"resourceType":"Patient","id":"p2","gender":"male","meta":{"lastUpdated":"2021-01-01T00:00:00Z"}}"#,
        "\n",
        r#"{"resourceType":"Patient","id":"p3","gender":"female","meta":{"lastUpdated":"2021-06-01T00:00:00Z"}}"#,
        "\n",
    );
    let mut observations = String::new();
    for (i, p) in ["p1", "p1", "p2", "p3", "p3"].iter().enumerate() {
        observations.push_str(&format!(
            r#"{{"resourceType":"Observation","id":"o{i}","status":"{}","subject":{{"reference":"Patient/{p}"}},"code":{{"coding":[{{"system":"http://loinc.org","code":"c{}"}}]}}}}"#,
            if i % 2 == 0 { "final" } else { "amended" },
            i % 2,
        ));
        observations.push('\n');
    }
    let other = concat!(
        r#"{"resourceType":"Encounter","id":"e1","subject":{"reference":"http://elsewhere/fhir/Patient/p2"}}"#,
        "\n",
        r#"{"resourceType":"Organization","id":"org1","name":"Hospital"}"#,
        "\n",
        r#"{"resourceType":"Group","id":"g1","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p1"}},{"entity":{"reference":"Patient/p2"}}]}"#,
        "\n",
        r#"{"no":"resourceType"}"#,
        "\n",
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, observations.as_bytes()).unwrap();
    vec![
        ("Patient.ndjson".into(), Bytes::from(patients)),
        (
            "Observation.ndjson.gz".into(),
            Bytes::from(gz.finish().unwrap()),
        ),
        ("other.ndjson".into(), Bytes::from(other)),
    ]
}

fn builder() -> ServerBuilder {
    ServerBuilder::new(DataSource::Files(ndjson()))
        .with_delay(DELAY)
        .with_retry_after(0)
}

async fn start(b: ServerBuilder) -> RunningServer {
    b.start().await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn kickoff_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT, HeaderValue::from_static("application/fhir+json"));
    h.insert("prefer", HeaderValue::from_static("respond-async"));
    h
}

/// GET kick-off at `path` (relative to the base) with query pairs.
async fn kickoff(server: &RunningServer, path: &str, query: &[(&str, &str)]) -> reqwest::Response {
    client()
        .get(server.base_url().join(path).unwrap())
        .headers(kickoff_headers())
        .query(query)
        .send()
        .await
        .unwrap()
}

/// POST kick-off with a Parameters body built from (name, value[x] object) pairs.
async fn kickoff_post(server: &RunningServer, path: &str, params: Vec<Value>) -> reqwest::Response {
    let body = json!({ "resourceType": "Parameters", "parameter": params });
    client()
        .post(server.base_url().join(path).unwrap())
        .headers(kickoff_headers())
        .header(CONTENT_TYPE, "application/fhir+json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap()
}

fn status_url(resp: &reqwest::Response) -> String {
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "kick-off not accepted");
    resp.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Poll (with an optional bearer token) until the answer is not `202`; checks the `202`s.
async fn poll_until_done(url: &str, token: Option<&str>) -> reqwest::Response {
    for _ in 0..200 {
        let mut request = client().get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let resp = request.send().await.unwrap();
        if resp.status() != StatusCode::ACCEPTED {
            return resp;
        }
        let progress = resp.headers()["x-progress"].to_str().unwrap();
        assert!(progress.ends_with("% complete"), "{progress}");
        assert!(resp.headers().contains_key("retry-after"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("export never finished");
}

/// Poll until 200; returns the manifest. Panics on anything but 202/200.
async fn poll_with(url: &str, token: Option<&str>) -> Value {
    let resp = poll_until_done(url, token).await;
    match resp.status() {
        StatusCode::OK => {
            assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
            assert!(resp.headers().contains_key("expires"));
            resp.json().await.unwrap()
        }
        other => panic!("status {other}: {}", resp.text().await.unwrap()),
    }
}

async fn poll(url: &str) -> Value {
    poll_with(url, None).await
}

async fn download(url: &str) -> String {
    let resp = client().get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/fhir+ndjson");
    resp.text().await.unwrap()
}

/// Lines per resource type over every output file, checking `count` and `type` per file.
async fn output_counts(manifest: &Value) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for item in manifest["output"].as_array().unwrap() {
        let text = download(item["url"].as_str().unwrap()).await;
        let t = item["type"].as_str().unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(item["count"], lines.len() as u64);
        assert!(lines.iter().all(|r| r["resourceType"] == t));
        *counts.entry(t.to_string()).or_default() += lines.len() as u64;
    }
    counts
}

async fn export(server: &RunningServer, path: &str, query: &[(&str, &str)]) -> Value {
    let resp = kickoff(server, path, query).await;
    poll(&status_url(&resp)).await
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

async fn error_lines(manifest: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for item in manifest["error"].as_array().unwrap() {
        assert_eq!(item["type"], "OperationOutcome");
        let text = download(item["url"].as_str().unwrap()).await;
        out.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    out
}

#[tokio::test]
async fn system_export_returns_every_loaded_resource_split_per_file() {
    let server = start(builder().with_resources_per_file(2)).await;
    assert_eq!(
        server.counts(),
        map(&[
            ("Encounter", 1),
            ("Group", 1),
            ("Observation", 5),
            ("Organization", 1),
            ("Patient", 3)
        ])
    );
    let resp = kickoff(&server, "$export", &[]).await;
    let url = status_url(&resp);
    assert!(
        url.starts_with(server.base_url().as_str()),
        "absolute Content-Location"
    );
    // Still working right after kick-off.
    let early = client().get(&url).send().await.unwrap();
    assert_eq!(early.status(), StatusCode::ACCEPTED);
    assert_eq!(early.headers()["retry-after"], "0");
    let manifest = poll(&url).await;
    assert_eq!(output_counts(&manifest).await, server.counts());
    // 5 observations at 2 per file = 3 files, 3 patients = 2.
    assert_eq!(
        manifest["output"].as_array().unwrap().len(),
        1 + 1 + 3 + 1 + 2
    );
    assert_eq!(manifest["requiresAccessToken"], false);
    assert_eq!(manifest["error"], json!([]));
    assert!(
        manifest["request"]
            .as_str()
            .unwrap()
            .ends_with("/fhir/$export")
    );
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert!(manifest.get("link").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn patient_and_group_levels() {
    let server = start(builder()).await;
    let all = export(&server, "Patient/$export", &[]).await;
    assert_eq!(output_counts(&all).await, server.counts());

    let group = export(&server, "Group/g1/$export", &[]).await;
    // Members p1, p2: their patients, observations, the encounter (absolute reference), the
    // group itself, and the organization that references no patient.
    assert_eq!(
        output_counts(&group).await,
        map(&[
            ("Encounter", 1),
            ("Group", 1),
            ("Observation", 3),
            ("Organization", 1),
            ("Patient", 2)
        ])
    );

    let unknown = kickoff(&server, "Group/nope/$export", &[]).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.headers()[CONTENT_TYPE], "application/fhir+json");
    let oo: Value = unknown.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    server.shutdown().await;
}

#[tokio::test]
async fn post_with_parameters_patient_and_type() {
    let server = start(builder()).await;
    let resp = kickoff_post(
        &server,
        "Group/g1/$export",
        vec![
            json!({"name": "patient", "valueReference": {"reference": "Patient/p2"}}),
            json!({"name": "_type", "valueString": "Patient"}),
            json!({"name": "_type", "valueString": "Observation"}),
            json!({"name": "_outputFormat", "valueString": "application/fhir+ndjson"}),
            json!({"name": "includeAssociatedData", "valueCode": "LatestProvenanceResources"}),
        ],
    )
    .await;
    let manifest = poll(&status_url(&resp)).await;
    assert_eq!(
        output_counts(&manifest).await,
        map(&[("Observation", 1), ("Patient", 1)])
    );
    assert!(!manifest["request"].as_str().unwrap().contains("patient"));
    // includeAssociatedData is accepted, ignored and reported.
    let notes = error_lines(&manifest).await;
    assert_eq!(notes[0]["issue"][0]["severity"], "information");

    let bad = kickoff_post(
        &server,
        "Patient/$export",
        vec![json!({"name": "patient", "valueReference": {"reference": "Patient/nobody"}})],
    )
    .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let not_member = kickoff_post(
        &server,
        "Group/g1/$export",
        vec![json!({"name": "patient", "valueReference": {"reference": "Patient/p3"}})],
    )
    .await;
    assert_eq!(not_member.status(), StatusCode::BAD_REQUEST);
    server.shutdown().await;
}

#[tokio::test]
async fn since_type_filter_and_elements() {
    let server = start(builder()).await;
    let since = export(
        &server,
        "$export",
        &[
            ("_type", "Patient"),
            ("_since", "2020-01-01T00:00:00+00:00"),
        ],
    )
    .await;
    assert_eq!(output_counts(&since).await, map(&[("Patient", 2)]));
    let until = export(
        &server,
        "$export",
        &[("_type", "Patient"), ("_until", "2021-03-01")],
    )
    .await;
    assert_eq!(output_counts(&until).await, map(&[("Patient", 2)]));

    let filtered = export(
        &server,
        "$export",
        &[
            ("_type", "Observation,Patient"),
            ("_typeFilter", "Observation?code=http://loinc.org|c1"),
            ("_typeFilter", "Patient?gender=female"),
        ],
    )
    .await;
    assert_eq!(
        output_counts(&filtered).await,
        map(&[("Observation", 2), ("Patient", 2)])
    );

    let elements = export(
        &server,
        "$export",
        &[("_type", "Observation"), ("_elements", "status")],
    )
    .await;
    let text = download(elements["output"][0]["url"].as_str().unwrap()).await;
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["status"], "final");
    assert!(first.get("code").is_none() && first.get("subject").is_none());
    assert_eq!(first["meta"]["tag"][0]["code"], "SUBSETTED");
    server.shutdown().await;
}

#[tokio::test]
async fn kickoff_validation_strict_and_lenient() {
    let server = start(builder()).await;
    let no_accept = client()
        .get(server.base_url().join("$export").unwrap())
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(no_accept.status(), StatusCode::BAD_REQUEST);
    let oo: Value = no_accept.json().await.unwrap();
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("Accept")
    );
    let no_prefer = client()
        .get(server.base_url().join("$export").unwrap())
        .header(ACCEPT, "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(no_prefer.status(), StatusCode::BAD_REQUEST);

    let strict = kickoff(&server, "$export", &[("_foo", "1")]).await;
    assert_eq!(strict.status(), StatusCode::BAD_REQUEST);
    let bad_filter = kickoff(
        &server,
        "$export",
        &[("_typeFilter", "Observation?date=gt2020")],
    )
    .await;
    assert_eq!(bad_filter.status(), StatusCode::BAD_REQUEST);
    let bad_format = kickoff(&server, "$export", &[("_outputFormat", "text/csv")]).await;
    assert_eq!(bad_format.status(), StatusCode::BAD_REQUEST);

    let lenient = client()
        .get(server.base_url().join("$export").unwrap())
        .headers(kickoff_headers())
        .header("prefer", "handling=lenient")
        .query(&[
            ("_foo", "1"),
            ("_typeFilter", "Observation?date=gt2020"),
            ("organizeOutputBy", "Patient"),
        ])
        .send()
        .await
        .unwrap();
    let manifest = poll(&status_url(&lenient)).await;
    let notes = error_lines(&manifest).await;
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert!(notes.iter().all(|n| n["issue"][0]["severity"] == "warning"));
    // The ignored _typeFilter leaves Observation unfiltered.
    assert_eq!(output_counts(&manifest).await, server.counts());
    server.shutdown().await;
}

#[tokio::test]
async fn gzip_range_and_delete() {
    let server = start(builder()).await;
    let resp = kickoff(&server, "$export", &[("_type", "Observation")]).await;
    let url = status_url(&resp);
    let manifest = poll(&url).await;
    let file = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let plain = download(&file).await;

    let gz = client()
        .get(&file)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gz.headers()["content-encoding"], "gzip");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz.bytes().await.unwrap()[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, plain);

    let partial = client()
        .get(&file)
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(partial.headers()["accept-ranges"], "bytes");
    assert_eq!(
        partial.headers()["content-range"].to_str().unwrap(),
        format!("bytes 10-{}/{}", plain.len() - 1, plain.len())
    );
    assert_eq!(partial.text().await.unwrap(), plain[10..]);

    let deleted = client().delete(&url).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let after = client().get(&url).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::NOT_FOUND);
    let oo: Value = after.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(
        client().get(&file).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let unknown = client()
        .get(server.base_url().join("$export-status/nope").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn bearer_token_and_capability_urls() {
    let server = start(
        builder()
            .with_bearer_token(Some("secret".into()))
            .with_requires_access_token(false)
            .with_files_on_separate_origin(true),
    )
    .await;
    let anonymous = kickoff(&server, "$export", &[]).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let oo: Value = anonymous.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    let metadata = client()
        .get(server.base_url().join("metadata").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(metadata.status(), StatusCode::OK);

    let resp = client()
        .get(server.base_url().join("$export").unwrap())
        .headers(kickoff_headers())
        .bearer_auth("secret")
        .send()
        .await
        .unwrap();
    let url = status_url(&resp);
    assert_eq!(
        client().get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let manifest = poll_with(&url, Some("secret")).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let file = manifest["output"][0]["url"].as_str().unwrap();
    assert!(file.starts_with(server.files_base_url().as_str()));
    assert_ne!(server.files_base_url().port(), server.base_url().port());
    // A capability URL: works without the token, and the log shows none was sent.
    download(file).await;
    let log = server.log();
    let get = log
        .iter()
        .rfind(|r| r.path.contains("$export-file"))
        .unwrap();
    assert!(!get.authorization && get.status == 200);
    assert!(
        log.iter()
            .any(|r| r.authorization && r.path.ends_with("/$export"))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn files_need_the_token_when_required() {
    let server = start(builder().with_bearer_token(Some("secret".into()))).await;
    let resp = client()
        .get(server.base_url().join("$export").unwrap())
        .headers(kickoff_headers())
        .header(AUTHORIZATION, "Bearer secret")
        .send()
        .await
        .unwrap();
    let url = status_url(&resp);
    let manifest = poll_with(&url, Some("secret")).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let file = manifest["output"][0]["url"].as_str().unwrap();
    assert_eq!(
        client().get(file).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let with = client()
        .get(file)
        .bearer_auth("secret")
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn kickoff_faults() {
    let server = start(builder().with_retry_after(3)).await;
    let q = [("_type", "Patient"), ("_flatfhirFault", "kickoff-429")];
    let throttled = kickoff(&server, "$export", &q).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.headers()["retry-after"], "3");
    // Fires once for this request; the retry is accepted.
    status_url(&kickoff(&server, "$export", &q).await);

    let failed = kickoff(&server, "$export", &[("_flatfhirFault", "kickoff-500")]).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let oo: Value = failed.json().await.unwrap();
    assert_eq!(oo["issue"][0]["code"], "processing");

    let missing = kickoff(
        &server,
        "$export",
        &[("_flatfhirFault", "missing-content-location")],
    )
    .await;
    assert_eq!(missing.status(), StatusCode::ACCEPTED);
    assert!(!missing.headers().contains_key("content-location"));

    let unknown = kickoff(&server, "$export", &[("_flatfhirFault", "nonsense")]).await;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    server.shutdown().await;

    // Server-wide: the first two kick-offs are refused, whatever they ask.
    let server = start(builder().with_faults(Faults {
        kickoff_429: 2,
        ..Faults::default()
    }))
    .await;
    for expected in [429, 429, 202] {
        assert_eq!(
            kickoff(&server, "$export", &[]).await.status().as_u16(),
            expected
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn status_faults() {
    let server = start(builder()).await;
    let resp = kickoff(
        &server,
        "$export",
        &[(
            "_flatfhirFault",
            "status-429,status-transient:2,retry-after-date",
        )],
    )
    .await;
    let url = status_url(&resp);
    let first = client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    let date = first.headers()["retry-after"].to_str().unwrap();
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    for _ in 0..2 {
        let transient = client().get(&url).send().await.unwrap();
        assert_eq!(transient.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let oo: Value = transient.json().await.unwrap();
        assert_eq!(oo["issue"][0]["code"], "transient");
    }
    let manifest = poll(&url).await;
    assert_eq!(output_counts(&manifest).await, server.counts());

    let fatal = kickoff(&server, "$export", &[("_flatfhirFault", "status-fatal")]).await;
    let url = status_url(&fatal);
    let failed = poll_until_done(&url, None).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let oo: Value = failed.json().await.unwrap();
    assert_eq!(oo["issue"][0]["code"], "processing");
    server.shutdown().await;
}

#[tokio::test]
async fn cut_file_then_resume_with_range() {
    let server = start(builder().with_faults(Faults {
        cut_file_once: true,
        ..Faults::default()
    }))
    .await;
    let manifest = export(&server, "$export", &[("_type", "Observation")]).await;
    let file = manifest["output"][0]["url"].as_str().unwrap();
    let resp = client().get(file).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let total: usize = resp.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut got = Vec::new();
    let mut stream = resp;
    let err = loop {
        match stream.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            Ok(None) => panic!("the body was not cut"),
            Err(e) => break e,
        }
    };
    assert!(got.len() < total, "{err}");
    let rest = client()
        .get(file)
        .header("range", format!("bytes={}-", got.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), StatusCode::PARTIAL_CONTENT);
    got.extend_from_slice(&rest.bytes().await.unwrap());
    assert_eq!(got.len(), total);
    assert_eq!(String::from_utf8(got).unwrap().lines().count(), 5);
    // The second whole download is not cut.
    assert_eq!(download(file).await.lines().count(), 5);
    server.shutdown().await;
}

#[tokio::test]
async fn file_gone_then_fresh_url() {
    let server = start(builder()).await;
    let resp = kickoff(&server, "$export", &[("_flatfhirFault", "file-gone:1")]).await;
    let url = status_url(&resp);
    let manifest = poll(&url).await;
    let gone = manifest["output"][1]["url"].as_str().unwrap();
    let resp = client().get(gone).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::GONE);
    let refreshed = poll(&url).await;
    let fresh = refreshed["output"][1]["url"].as_str().unwrap();
    assert_ne!(fresh, gone);
    assert_eq!(
        client().get(gone).send().await.unwrap().status(),
        StatusCode::GONE
    );
    assert_eq!(download(fresh).await.lines().count(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn slow_chunks() {
    let server = start(builder().with_resources_per_file(1000)).await;
    let manifest = export(
        &server,
        "$export",
        &[("_type", "Observation"), ("_flatfhirFault", "slow:30")],
    )
    .await;
    let file = manifest["output"][0]["url"].as_str().unwrap();
    // Smaller than one chunk: no delay, whole body.
    assert_eq!(download(file).await.lines().count(), 5);
    server.shutdown().await;

    // A body of several 8 KiB chunks takes at least (chunks - 1) delays.
    let (big, elapsed) = timed_download(400, |b| {
        b.with_faults(Faults {
            slow_chunk: Some(Duration::from_millis(40)),
            ..Faults::default()
        })
    })
    .await;
    let chunks = big.div_ceil(8192) as u32;
    assert!(elapsed >= Duration::from_millis(40) * (chunks - 1));
}

/// Serve one file of `lines` Basic resources (~100 bytes each) from a server configured by
/// `configure`, download it whole (identity encoding) and check it: its length and the time
/// the download took.
async fn timed_download(
    lines: usize,
    configure: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> (usize, Duration) {
    let big: String = (0..lines)
        .map(|i| {
            format!(
                r#"{{"resourceType":"Basic","id":"b{i}","note":"{}"}}{}"#,
                "x".repeat(60),
                "\n"
            )
        })
        .collect();
    let builder = ServerBuilder::new(DataSource::Files(vec![(
        "b".into(),
        Bytes::from(big.clone()),
    )]))
    .with_delay(Duration::ZERO);
    let server = start(configure(builder)).await;
    let manifest = export(&server, "$export", &[]).await;
    let started = std::time::Instant::now();
    let text = download(manifest["output"][0]["url"].as_str().unwrap()).await;
    let elapsed = started.elapsed();
    assert_eq!(text, big);
    server.shutdown().await;
    (big.len(), elapsed)
}

#[tokio::test]
async fn a_file_rate_paces_every_download() {
    // ~300 KB of identity bytes at 1 MB/s: the body arrives whole, in no less than ~0.3 s
    // (the rate is a floor on the time, never a ceiling: a slow machine only takes longer).
    let (len, elapsed) = timed_download(3000, |b| b.with_file_rate(Some(1_000_000))).await;
    // The last 64 KiB chunk is due at (len - 64 KiB) / rate.
    assert!(elapsed >= Duration::from_secs_f64((len - 64 * 1024) as f64 / 1e6));
}

#[tokio::test]
async fn deleted_outcomes_and_paged_manifest() {
    let server = start(builder()).await;
    let resp = kickoff(
        &server,
        "$export",
        &[
            ("_flatfhirFault", "deleted:Patient/p1,deleted:Patient/zz"),
            ("_flatfhirFault", "outcome-warning,outcome-fatal,paged:2"),
        ],
    )
    .await;
    let url = status_url(&resp);
    let mut page = poll(&url).await;
    let mut counts = BTreeMap::new();
    let mut pages = 1;
    let deleted = page["deleted"].clone();
    let errors = error_lines(&page).await;
    loop {
        for (t, n) in output_counts(&page).await {
            *counts.entry(t).or_insert(0) += n;
        }
        let Some(next) = page["link"][0]["url"].as_str() else {
            break;
        };
        assert_eq!(page["link"][0]["relation"], "next");
        page = poll(next).await;
        pages += 1;
    }
    assert_eq!(pages, 3, "5 output files at 2 per page");
    let mut expected = server.counts();
    *expected.get_mut("Patient").unwrap() -= 1; // Patient/p1 is reported deleted instead
    assert_eq!(counts, expected);

    assert_eq!(deleted[0]["type"], "Bundle");
    assert_eq!(deleted[0]["count"], 2);
    let bundle: Value = serde_json::from_str(
        download(deleted[0]["url"].as_str().unwrap())
            .await
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(bundle["type"], "transaction");
    assert_eq!(bundle["entry"][0]["request"]["method"], "DELETE");
    assert_eq!(bundle["entry"][0]["request"]["url"], "Patient/p1");

    let severities: Vec<&str> = errors
        .iter()
        .map(|e| e["issue"][0]["severity"].as_str().unwrap())
        .collect();
    assert_eq!(severities, ["warning", "fatal"]);
    server.shutdown().await;
}

#[tokio::test]
async fn request_log_records_without_secrets() {
    let server = start(builder().with_bearer_token(Some("s3cret".into()))).await;
    let _ = client()
        .get(server.base_url().join("$export").unwrap())
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    let log = server.log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].path, "/fhir/$export");
    assert!(log[0].authorization);
    assert_eq!(log[0].status, 400, "no Accept/Prefer");
    assert!(!format!("{log:?}").contains("s3cret"));
    server.shutdown().await;
}

#[tokio::test]
async fn loads_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in ndjson() {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    std::fs::write(dir.path().join("export-manifest.json"), "{}").unwrap();
    let server = start(ServerBuilder::new(DataSource::Dir(dir.path().into()))).await;
    assert_eq!(server.counts().values().sum::<u64>(), 11);
    server.shutdown().await;
    let missing = ServerBuilder::new(DataSource::Dir(dir.path().join("nope")))
        .start()
        .await;
    assert!(matches!(missing, Err(super::ServeError::Data { .. })));
}

#[tokio::test]
async fn zero_delay_answers_the_first_poll_with_the_manifest() {
    // Enough resources that building the files takes longer than a request round trip.
    let many: String = (0..100_000)
        .map(|i| format!("{{\"resourceType\":\"Basic\",\"id\":\"b{i}\"}}\n"))
        .collect();
    let server = start(
        ServerBuilder::new(DataSource::Files(vec![("b".into(), Bytes::from(many))]))
            .with_delay(Duration::ZERO)
            .with_retry_after(1),
    )
    .await;
    for _ in 0..3 {
        let url = status_url(&kickoff(&server, "$export", &[]).await);
        // At once, however fast: no `202` and `Retry-After` second for a job without delay.
        let resp = client().get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let manifest: Value = resp.json().await.unwrap();
        assert_eq!(output_counts(&manifest).await, server.counts());
    }
    server.shutdown().await;
}
