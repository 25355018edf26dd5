//! SQL-on-FHIR v2 conformance: every case of a directory of official-format test files, run
//! through the same code path as `flatfhir view` and compared as the reference runner does.
//!
//! ```text
//! test file ─┬─ resources ──→ ndjson bytes ──→ Decoder (only viewed types) ──→ view batches
//!            └─ view ───────→ CompiledView + ViewRegistry ─────┘                   │
//!                                            batch_to_json_rows ←──────────────────┘
//!                                                     │
//!                      compare (multiset of rows, numbers by value, arrays in order)
//!                                                     │
//!                        $CARGO_TARGET_DIR/sof-report/<suite>.json (official report format)
//! ```
//!
//! `own_cases` always runs the project's representative cases in `tests/data/sof/`; the
//! official suite (`../shared/sof-tests/`) and the newer upstream copy
//! (`../shared/sof-tests/upstream-sql-on-fhir.js/`) run when present. `cli_matches_runner`
//! replays both suites through the binary.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use flatfhir::{
    flatten::DecoderBuilder,
    sink::rows::{JsonRow, batch_to_json_rows},
    view::{CompiledView, ViewRegistry},
};
use serde_json::{Map, Value, json};

use crate::support::{data, repo};

/// Cases in the official suite copy (`sql-on-fhir-v2@49fc1ad`).
const OFFICIAL_CASES: usize = 134;
/// Cases in the newer upstream copy (`FHIR/sql-on-fhir.js`).
const UPSTREAM_CASES: usize = 144;

/// Cases of the older official copy that contradict the newer upstream copy on identical input,
/// as `(file, title)`. Both have a Patient without `name` and the column `name.given.join()`:
/// `fhirpath.json` (v2@49fc1ad) expects `""`, upstream `fn_join.json` expects `null`. flatfhir
/// follows upstream and the FHIRPath spec (`join` on an empty input is empty), so these two must
/// fail — and only these; if one starts passing, the list is out of date.
const KNOWN_CONFLICTS: &[(&str, &str)] = &[
    ("fhirpath.json", "string join"),
    ("fhirpath.json", "string join: default separator"),
];

fn known_conflict(case: &Case, suite: &str) -> bool {
    suite == "official"
        && KNOWN_CONFLICTS
            .iter()
            .any(|(f, t)| *f == case.file && *t == case.title)
}

/// What a case expects.
#[derive(Debug, Clone)]
enum Expect {
    Rows(Vec<Value>),
    Error,
    Count(usize),
}

/// One test case of a suite file.
#[derive(Debug, Clone)]
struct Case {
    file: String,
    title: String,
    experimental: bool,
    resources: Arc<Vec<Value>>,
    view: Value,
    expect: Expect,
    expect_columns: Option<Vec<String>>,
}

/// The result of one case.
#[derive(Debug, Clone)]
struct CaseResult {
    case: Case,
    error: Option<String>,
}

/// Load every case of every test file in `dir`, files in name order. Files that are not test
/// files (the schemas, `implementations.json`) are skipped.
fn load_suite(dir: &Path) -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let doc: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let Some(tests) = doc.get("tests").and_then(Value::as_array) else {
            continue;
        };
        if doc.get("resources").is_none() {
            continue;
        }
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        let resources = Arc::new(doc["resources"].as_array().cloned().unwrap_or_default());
        for t in tests {
            let title = t["title"].as_str().unwrap_or_default().to_string();
            let tags: Vec<&str> = t
                .get("tags")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let expect = if let Some(rows) = t.get("expect").and_then(Value::as_array) {
                Expect::Rows(rows.clone())
            } else if t.get("expectError").and_then(Value::as_bool) == Some(true) {
                Expect::Error
            } else if let Some(n) = t.get("expectCount").and_then(Value::as_u64) {
                Expect::Count(n as usize)
            } else {
                panic!("{file} › {title}: no expect, expectError or expectCount");
            };
            let expect_columns = t.get("expectColumns").and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            });
            cases.push(Case {
                file: file.clone(),
                title,
                experimental: tags.contains(&"experimental"),
                resources: resources.clone(),
                view: t["view"].clone(),
                expect,
                expect_columns,
            });
        }
    }
    cases
}

/// The resources of a case as ndjson bytes.
fn ndjson(resources: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in resources {
        serde_json::to_writer(&mut out, r).unwrap();
        out.push(b'\n');
    }
    out
}

/// Run a view the way `flatfhir view` does: compile, register without the raw column, decode
/// with only the viewed types, collect the view's batches. A compile error or any rejected
/// resource is an error. Returns the column names and the rows.
fn run_view(resources: &[Value], view: &Value) -> Result<(Vec<String>, Vec<JsonRow>), String> {
    let text = view.to_string();
    let origin = "view.json";
    let compiled = CompiledView::from_json(&text, origin).map_err(|e| e.to_string())?;
    let name = compiled.name().to_string();
    let columns = compiled
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut reg = ViewRegistry::empty().with_raw(false);
    reg.add_json(&text, origin).map_err(|e| e.to_string())?;
    let mut d = DecoderBuilder::new(Arc::new(reg), "resources.ndjson")
        .with_only_viewed_types(true)
        .build();
    d.decode(&ndjson(resources)).map_err(|e| e.to_string())?;
    let mut batches = d.take_batches();
    batches.extend(d.finish().map_err(|e| e.to_string())?);
    let rejects = d.take_rejects();
    if !rejects.is_empty() {
        let reasons: Vec<String> = rejects
            .iter()
            .map(|r| format!("line {}: {}", r.line, r.reason))
            .collect();
        return Err(reasons.join("; "));
    }
    let rows = batches
        .iter()
        .filter(|b| *b.view == *name)
        .flat_map(|b| batch_to_json_rows(&b.batch))
        .collect();
    Ok((columns, rows))
}

/// JSON equality as the reference runner sees it: strict about JSON types, numbers by value,
/// arrays in order, objects by key set.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_str() == y.as_str()
                || matches!((x.as_f64(), y.as_f64()), (Some(p), Some(q)) if p == q)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn row_object(row: &JsonRow) -> Value {
    Value::Object(row.iter().cloned().collect::<Map<String, Value>>())
}

/// Compare rows as a multiset (order free). `Err` says what differs.
fn compare_rows(expected: &[Value], actual: &[JsonRow]) -> Result<(), String> {
    let actual: Vec<Value> = actual.iter().map(row_object).collect();
    let mut used = vec![false; actual.len()];
    let mut missing = Vec::new();
    for e in expected {
        match (0..actual.len()).find(|&i| !used[i] && json_eq(e, &actual[i])) {
            Some(i) => used[i] = true,
            None => missing.push(e),
        }
    }
    let extra: Vec<&Value> = actual
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(a, _)| a)
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let show = |v: &[&Value]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(format!(
        "expected {} rows, got {}; missing [{}]; unexpected [{}]",
        expected.len(),
        actual.len(),
        show(&missing),
        show(&extra)
    ))
}

/// Judge an outcome (`columns`, `rows`, or an error message) against a case.
fn judge(case: &Case, outcome: Result<(Vec<String>, Vec<JsonRow>), String>) -> Option<String> {
    match (&case.expect, outcome) {
        (Expect::Error, Err(_)) => None,
        (Expect::Error, Ok((_, rows))) => Some(format!(
            "expected an error, got {} rows: {}",
            rows.len(),
            rows.iter()
                .map(|r| row_object(r).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (_, Err(e)) => Some(format!("unexpected error: {e}")),
        (Expect::Count(n), Ok((_, rows))) => {
            (rows.len() != *n).then(|| format!("expected {n} rows, got {}", rows.len()))
        }
        (Expect::Rows(expected), Ok((columns, rows))) => {
            if let Some(want) = &case.expect_columns
                && want != &columns
            {
                return Some(format!("expected columns {want:?}, got {columns:?}"));
            }
            compare_rows(expected, &rows).err()
        }
    }
}

fn run_case(case: &Case) -> CaseResult {
    let outcome = std::panic::catch_unwind(|| run_view(&case.resources, &case.view))
        .unwrap_or_else(|_| Err("panicked".to_string()));
    let mut error = judge(case, outcome);
    if matches!(&error, Some(e) if e == "unexpected error: panicked") {
        error = Some("the runner panicked".into());
    }
    CaseResult {
        case: case.clone(),
        error,
    }
}

/// Where reports go: `$CARGO_TARGET_DIR/sof-report`, else the target dir holding the binary.
fn report_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/<profile>/flatfhir → target
            let bin = PathBuf::from(env!("CARGO_BIN_EXE_flatfhir"));
            bin.ancestors()
                .nth(2)
                .map(Path::to_path_buf)
                .unwrap_or_else(|| repo().join("target"))
        });
    target.join("sof-report")
}

/// Write the report in the official test-report format; returns its path.
fn write_report(suite: &str, results: &[CaseResult]) -> PathBuf {
    let mut by_file: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for r in results {
        let mut result = json!({ "passed": r.error.is_none() });
        if let Some(e) = &r.error {
            result["error"] = json!(e);
        }
        if known_conflict(&r.case, suite) {
            result["details"] = json!({
                "knownConflict": "contradicts upstream fn_join.json on identical input; \
                                  flatfhir follows upstream (join of empty is empty)"
            });
        }
        by_file
            .entry(&r.case.file)
            .or_default()
            .push(json!({ "name": r.case.title, "result": result }));
    }
    let report: Map<String, Value> = by_file
        .into_iter()
        .map(|(f, tests)| (f.to_string(), json!({ "tests": tests })))
        .collect();
    let dir = report_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{suite}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(report)).unwrap() + "\n",
    )
    .unwrap();
    path
}

/// Pass counts: `(shareable passed, shareable total, experimental passed, experimental total)`.
fn counts(results: &[CaseResult]) -> (usize, usize, usize, usize) {
    let mut c = (0, 0, 0, 0);
    for r in results {
        let ok = r.error.is_none() as usize;
        if r.case.experimental {
            c.2 += ok;
            c.3 += 1;
        } else {
            c.0 += ok;
            c.1 += 1;
        }
    }
    c
}

/// Run every case of a suite directory, write the report, print the counts, and panic listing
/// every failure.
fn run_suite(suite: &str, dir: &Path, expected_cases: Option<usize>) -> Vec<CaseResult> {
    let cases = load_suite(dir);
    let results: Vec<CaseResult> = cases.iter().map(run_case).collect();
    let path = write_report(suite, &results);
    let (sp, st, ep, et) = counts(&results);
    println!(
        "SQL-on-FHIR {suite} ({}): shareable {sp}/{st}, experimental {ep}/{et}; report {}",
        dir.display(),
        path.display()
    );
    let mut failures = String::new();
    for r in &results {
        match (&r.error, known_conflict(&r.case, suite)) {
            (Some(e), false) => {
                let _ = writeln!(failures, "  {} › {}: {e}", r.case.file, r.case.title);
            }
            (None, true) => {
                let _ = writeln!(
                    failures,
                    "  {} › {}: listed in KNOWN_CONFLICTS but passes",
                    r.case.file, r.case.title
                );
            }
            (Some(e), true) => println!("  known conflict {} › {}: {e}", r.case.file, r.case.title),
            (None, false) => {}
        }
    }
    assert!(failures.is_empty(), "{suite}: failing cases:\n{failures}");
    if let Some(n) = expected_cases {
        assert_eq!(cases.len(), n, "{suite}: number of cases");
    }
    results
}

fn shared_suite(rel: &str) -> Option<PathBuf> {
    let dir = repo().join("..").join("shared").join(rel);
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipped: {} not found (a fresh clone has no ../shared)",
            dir.display()
        );
        None
    }
}

#[test]
fn own_cases() {
    let results = run_suite("own", &data("sof"), None);
    assert!(results.len() >= 40, "only {} own cases", results.len());
}

#[test]
fn official_suite() {
    if let Some(dir) = shared_suite("sof-tests") {
        run_suite("official", &dir, Some(OFFICIAL_CASES));
    }
}

#[test]
fn upstream_suite() {
    if let Some(dir) = shared_suite("sof-tests/upstream-sql-on-fhir.js") {
        run_suite("upstream", &dir, Some(UPSTREAM_CASES));
    }
}

/// One ndjson output line as `(key, value)` pairs in the printed order.
struct OrderedRow(JsonRow);

impl<'de> serde::Deserialize<'de> for OrderedRow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedRow;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<OrderedRow, A::Error> {
                let mut row = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    row.push((k, v));
                }
                Ok(OrderedRow(row))
            }
        }
        d.deserialize_map(V)
    }
}

/// Run a case through the binary: `flatfhir view --view v.json --format ndjson in.ndjson`.
fn run_cli(case: &Case, dir: &Path) -> Result<(Vec<String>, Vec<JsonRow>), String> {
    let input = dir.join("in.ndjson");
    let view = dir.join("v.json");
    std::fs::write(&input, ndjson(&case.resources)).unwrap();
    std::fs::write(&view, case.view.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
        .args(["view", "--view"])
        .arg(&view)
        .args(["--format", "ndjson"])
        .arg(&input)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if !o.status.success() {
        if stderr.is_empty() {
            return Err(format!("exit {} WITHOUT a message on stderr", o.status));
        }
        return Err(stderr);
    }
    let stdout = String::from_utf8(o.stdout).map_err(|e| e.to_string())?;
    let rows: Vec<JsonRow> = stdout
        .lines()
        .map(|l| serde_json::from_str::<OrderedRow>(l).map(|r| r.0))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("stdout is not ndjson rows: {e}\n{stdout}"))?;
    // The printed key order is the column order (checked when a case has `expectColumns`).
    let columns = rows
        .first()
        .map(|r| r.iter().map(|(k, _)| k.clone()).collect())
        .or_else(|| case.expect_columns.clone())
        .unwrap_or_default();
    Ok((columns, rows))
}

#[test]
fn cli_matches_runner() {
    let suites: Vec<(&str, PathBuf)> = [
        ("official", "sof-tests"),
        ("upstream", "sof-tests/upstream-sql-on-fhir.js"),
    ]
    .into_iter()
    .filter_map(|(suite, rel)| shared_suite(rel).map(|d| (suite, d)))
    .collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = String::new();
    let mut n = 0;
    for (suite, dir) in &suites {
        for case in load_suite(dir) {
            n += 1;
            let outcome = run_cli(&case, tmp.path());
            if matches!(case.expect, Expect::Error)
                && let Err(e) = &outcome
                && e.contains("WITHOUT a message")
            {
                let _ = writeln!(failures, "  {} › {}: {e}", case.file, case.title);
                continue;
            }
            let error = judge(&case, outcome);
            if known_conflict(&case, suite) {
                if error.is_none() {
                    let _ = writeln!(
                        failures,
                        "  {} › {}: known conflict passes",
                        case.file, case.title
                    );
                }
                continue;
            }
            if let Some(e) = error {
                let _ = writeln!(
                    failures,
                    "  {} ({}) › {}: {e}",
                    case.file,
                    dir.display(),
                    case.title
                );
            }
        }
    }
    println!("cli_matches_runner: {n} cases through the binary");
    assert!(failures.is_empty(), "CLI failures:\n{failures}");
}
