//! The binary as a user runs it: exit codes, output formats, errors that name the file.

use std::process::{Command, Output};

use crate::support::{data, repo};

fn flatfhir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatfhir"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn convert_then_query_in_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let o = flatfhir(&[
        "convert",
        data("sample").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("Observation") && s.contains("1728") && !s.contains("MISMATCH"),
        "{s}"
    );

    let d = out.to_str().unwrap();
    let o = flatfhir(&[
        "query",
        "--data",
        d,
        "select gender, count(*) as n from patient group by gender order by gender",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("| gender |") && s.contains("female") && s.contains("(2 rows)"),
        "{s}"
    );

    let o = flatfhir(&[
        "query",
        "--data",
        d,
        "--format",
        "csv",
        "select count(*) as n from observation",
    ]);
    assert_eq!(stdout(&o), "n\n1728\n");
    let o = flatfhir(&[
        "query",
        "--data",
        d,
        "--format",
        "json",
        "select id, gender from patient order by id limit 1",
    ]);
    let line = stdout(&o);
    let _: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert!(
        line.starts_with("{\"id\":") && line.contains(",\"gender\":"),
        "{line}"
    );

    // SQL from a file (the quality-measure example), and from stdin.
    let sql = repo().join("examples/quality_measure.sql");
    let o = flatfhir(&["query", "--data", d, "--file", sql.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("fabfe789-b8b6-45ae-ad04-f43bb2d5c342"),
        "{}",
        stdout(&o)
    );

    // Bad SQL: exit 2 with DataFusion's message.
    let o = flatfhir(&["query", "--data", d, "select nope from patient"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
}

#[test]
fn rejects_limit_sets_exit_code_1() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let bad = data("bad/mixed.ndjson");
    let o = flatfhir(&[
        "convert",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-rejects",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("more than --max-rejects 1"));
    let o = flatfhir(&[
        "convert",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-rejects",
        "6",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn unreadable_input_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let o = flatfhir(&[
        "convert",
        "/nonexistent/x.ndjson",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/x.ndjson"),
        "{}",
        stderr(&o)
    );
    // A truncated gzip file.
    let gz = std::fs::read(data("sample/Patient.ndjson.gz")).unwrap();
    let cut = tmp.path().join("cut.ndjson.gz");
    std::fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    let o = flatfhir(&[
        "convert",
        cut.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cut.ndjson.gz"), "{}", stderr(&o));
}

#[test]
fn invalid_view_names_file_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tmp.path().join("v.json");
    std::fs::write(&v, r#"{"resource":"Patient","select":[{"column":[{"name":"x","path":"id"},{"name":"x","path":"gender"}]}]}"#).unwrap();
    let o = flatfhir(&[
        "view",
        "--view",
        v.to_str().unwrap(),
        data("sample").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("v.json") && e.contains("`x`"), "{e}");
}

#[test]
fn view_prints_rows_in_column_order() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tmp.path().join("v.json");
    std::fs::write(
        &v,
        r#"{"name":"names","resource":"Patient","select":[{"column":[{"name":"id","path":"id"},
            {"name":"given","path":"name.first().given","collection":true},
            {"name":"n","path":"name.count()","type":"integer"}]}]}"#,
    )
    .unwrap();
    let o = flatfhir(&[
        "view",
        "--view",
        v.to_str().unwrap(),
        data("sample").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 4);
    for line in out.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let (i, g, n) = (
            line.find("\"id\":"),
            line.find("\"given\":"),
            line.find("\"n\":"),
        );
        assert!(i < g && g < n, "columns out of order: {line}");
        assert!(r["given"].is_array() && r["n"].is_number(), "{line}");
    }
}

#[test]
fn schemas_list_and_show() {
    let o = flatfhir(&["schemas", "list"]);
    assert!(o.status.success());
    let s = stdout(&o);
    for v in [
        "patient",
        "observation",
        "medication_request",
        "explanation_of_benefit",
        "observation_component",
    ] {
        assert!(
            s.lines().any(|l| l.starts_with(&format!("{v} "))),
            "{v} missing:\n{s}"
        );
    }
    let o = flatfhir(&["schemas", "show", "observation"]);
    let s = stdout(&o);
    for c in [
        "patient_id",
        "encounter_id",
        "code_system",
        "effective_date_time",
        "value_quantity",
        "value_unit",
    ] {
        assert!(s.contains(c), "{c} missing:\n{s}");
    }
    let o = flatfhir(&["schemas", "show", "nope"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Ctrl-C (or SIGTERM, as a scheduler sends) stops a convert the way a failure does: the run is
/// cancelled and what it had written — here a part still being written, `part-….parquet#1` on a
/// local disk — is removed; no run record, no table.
#[test]
fn ctrl_c_stops_a_convert_and_leaves_nothing() {
    for (signal, said) in [("-INT", "interrupted"), ("-TERM", "terminated")] {
        let tmp = tempfile::tempdir().unwrap();
        let input = crate::support::big_observations(tmp.path(), 100_000);
        let out = tmp.path().join("ds");
        // Small uncompressed row groups: the part's upload starts at once, long before the end.
        let mut child = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
            .arg("convert")
            .arg(&input)
            .arg("--out")
            .arg(&out)
            .args(["--row-group-size", "1000", "--compression", "none"])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while crate::support::walk(&out)
            .iter()
            .all(|f| !f.contains("export="))
        {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the convert ended before writing"
            );
            assert!(std::time::Instant::now() < deadline, "nothing written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        crate::support::send_signal(&child, signal);
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{signal}: {err}");
        assert!(err.contains(said) && err.contains("cancelled"), "{err}");
        assert_eq!(crate::support::walk(&out), Vec::<String>::new());
    }
}

/// Wait for `child` at most `secs` seconds (killing it and failing after that).
fn wait_at_most(mut child: std::process::Child, secs: u64) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!(
                "still running after {secs} s: {:?}",
                child.wait_with_output()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The rows and rejects of a `convert --json` manifest.
fn rows_and_rejects(o: &Output) -> (u64, u64) {
    assert!(o.status.success(), "{}", stderr(o));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = m["types"]["Patient"]["rows"].as_u64().unwrap_or(0);
    (rows, m["rejects"].as_u64().unwrap())
}

/// A pipe is read once, through one handle, from its first byte, plain or gzip (regression:
/// hunt finding 4: `cat f | convert /dev/stdin` and `<(…)` lost their first two bytes to the
/// gzip sniff, and a named FIFO hung on being opened again).
#[cfg(unix)]
#[test]
fn pipes_and_fifos_are_read_whole() {
    use std::io::Write;
    let two = "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), Default::default());
    gz.write_all(two.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (n, body) in [two.as_bytes(), &gz].into_iter().enumerate() {
        // Standard input, a pipe.
        let out = tmp.path().join(format!("stdin{n}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
            .args(["convert", "/dev/stdin", "--json", "--out"])
            .arg(&out)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feed = body.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&feed));
        let o = wait_at_most(child, 60);
        writer.join().unwrap().unwrap();
        assert_eq!(rows_and_rejects(&o), (2, 0), "stdin {n}: {}", stderr(&o));

        // A named FIFO, written by another process once the convert opens it.
        let fifo = tmp.path().join(format!("f{n}.ndjson"));
        assert!(
            Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let feed = (fifo.clone(), body.to_vec());
        let writer = std::thread::spawn(move || std::fs::write(feed.0, feed.1));
        let out = tmp.path().join(format!("fifo{n}"));
        let child = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
            .args(["convert", "--json", "--out"])
            .arg(&out)
            .arg(&fifo)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let o = wait_at_most(child, 60);
        writer.join().unwrap().unwrap();
        assert_eq!(rows_and_rejects(&o), (2, 0), "fifo {n}: {}", stderr(&o));
    }
}

/// `--max-line-bytes` sets the longest accepted line, and is checked before any I/O
/// (regression: hunt finding 5: the 64 MiB limit could not be raised).
#[test]
fn the_line_limit_is_an_option() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("p.ndjson");
    std::fs::write(&input, "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n").unwrap();
    for (limit, rows, rejects) in [("30", 0, 1), ("1KiB", 1, 0)] {
        let out = tmp.path().join(format!("out{limit}"));
        let o = flatfhir(&[
            "convert",
            input.to_str().unwrap(),
            "--json",
            "--max-line-bytes",
            limit,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(rows_and_rejects(&o), (rows, rejects), "{limit}");
    }
    let o = flatfhir(&[
        "convert",
        input.to_str().unwrap(),
        "--max-line-bytes",
        "0",
        "--out",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("out of range"), "{}", stderr(&o));
}

/// `flatfhir demo` run twice into one folder prints the same answers: its queries read the
/// current state (they read the history tables, which hold one copy per run: 3/1 then 6/2).
#[test]
fn the_demo_run_twice_gives_the_same_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = || {
        let o = flatfhir(&["demo", "--out", out.to_str().unwrap(), "-q"]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let answers = |s: &str| -> String {
        // The queries' tables, without the accounting above them (run ids differ).
        s[s.find("Patients by gender").expect("the demo queries")..].to_string()
    };
    let first = run();
    assert!(
        first.contains("female") || first.contains("male"),
        "{first}"
    );
    assert_eq!(answers(&run()), answers(&first));
}

/// A dataset of two AllergyIntolerance resources (`category`, a `List(Utf8)` column of the
/// built-in view: two items for `a1`, none for `a2`).
fn allergy_dataset(tmp: &std::path::Path) -> String {
    let input = tmp.join("ai.ndjson");
    std::fs::write(
        &input,
        concat!(
            r#"{"resourceType":"AllergyIntolerance","id":"a1","category":["food","medication"],"code":{"text":"peanut"}}"#,
            "\n",
            r#"{"resourceType":"AllergyIntolerance","id":"a2","code":{"text":"dust"}}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = tmp.join("ds");
    let o = flatfhir(&[
        "convert",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    out.to_str().unwrap().to_string()
}

/// `flatfhir query --data DATA --format FORMAT SQL`.
fn query_as(data: &str, format: &str, sql: &str) -> std::process::Output {
    flatfhir(&["query", "--data", data, "--format", format, sql])
}

/// `query --format csv` writes a list, struct or json_get() cell as its JSON text (it failed
/// half-way, after the header), a null cell empty, and the header of a result without rows.
#[test]
fn query_csv_writes_nested_cells_as_json_text() {
    let tmp = tempfile::tempdir().unwrap();
    let d = allergy_dataset(tmp.path());
    let o = query_as(
        &d,
        "csv",
        "select id, category, arrow_cast(NULL, 'List(Int64)') as nl, \
         json_get(resource, 'code') as code, named_struct('a', 1) as s \
         from allergy_intolerance order by id",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "id,category,nl,code,s\n\
         a1,\"[\"\"food\"\",\"\"medication\"\"]\",,\"{\"\"text\"\":\"\"peanut\"\"}\",\"{\"\"a\"\":1}\"\n\
         a2,[],,\"{\"\"text\"\":\"\"dust\"\"}\",\"{\"\"a\"\":1}\"\n"
    );
    let o = query_as(
        &d,
        "csv",
        "select id, category from allergy_intolerance where id = 'none'",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "id,category\n");
}

/// `query --format json`: a NULL list is `null` (an empty one `[]`), json_get() and struct
/// results are JSON, not display strings.
#[test]
fn query_json_keeps_null_lists_null_and_writes_json() {
    let tmp = tempfile::tempdir().unwrap();
    let d = allergy_dataset(tmp.path());
    let o = query_as(
        &d,
        "json",
        "select id, category, arrow_cast(NULL, 'List(Int64)') as nl, \
         json_get(resource, 'code') as code, json_get(resource, 'id') as jid, \
         named_struct('a', 1, 'b', [1, 2]) as s from allergy_intolerance order by id",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "{\"id\":\"a1\",\"category\":[\"food\",\"medication\"],\"nl\":null,\"code\":{\"text\":\"peanut\"},\"jid\":\"a1\",\"s\":{\"a\":1,\"b\":[1,2]}}\n\
         {\"id\":\"a2\",\"category\":[],\"nl\":null,\"code\":{\"text\":\"dust\"},\"jid\":\"a2\",\"s\":{\"a\":1,\"b\":[1,2]}}\n"
    );
}

/// csv and json write each batch as it comes (rows of the first batches are out before a later
/// batch fails; the whole result was collected first, with nothing written), and the table
/// shows at most --max-rows rows and says there are more.
#[test]
fn query_streams_csv_and_json_and_bounds_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    // Batches of 8192 rows, in one partition (so in order): the second fails (division by
    // zero at 10,000).
    let failing = "set datafusion.execution.target_partitions = 1; \
                   select value / (case when value = 10000 then 0 else 1 end) as v \
                   from generate_series(1, 20000)";
    for (format, first) in [("csv", "v\n1\n2\n"), ("json", "{\"v\":1}\n{\"v\":2}\n")] {
        let o = flatfhir(&["query", "-q", "--data", d, "--format", format, failing]);
        assert_eq!(o.status.code(), Some(2), "{format}: {}", stderr(&o));
        assert!(stderr(&o).contains("zero"), "{}", stderr(&o));
        assert!(stdout(&o).starts_with(first), "{format}: {}", stdout(&o));
        assert_eq!(
            stdout(&o).lines().count(),
            8192 + (format == "csv") as usize
        );
    }

    let series = "select value from generate_series(1, 1001)";
    let o = flatfhir(&["query", "-q", "--data", d, series]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("| 1000  |") && !s.contains("| 1001  |"), "{s}");
    assert!(s.contains("(the first 1000 rows; there are more"), "{s}");
    let o = flatfhir(&["query", "-q", "--data", d, "--max-rows", "0", series]);
    assert!(stdout(&o).contains("| 1001  |\n") && stdout(&o).ends_with("(1001 rows)\n"));
    let o = flatfhir(&["query", "-q", "--data", d, "--max-rows", "1001", series]);
    assert!(stdout(&o).ends_with("(1001 rows)\n"), "{}", stdout(&o));
}

/// `query --format csv | head -1` exits 0 without a word, as json and table do (the CSV
/// encoder's error hid the broken pipe: `error: Csv error: Broken pipe`, exit 2).
#[cfg(unix)]
#[test]
fn query_csv_into_a_closed_pipe_exits_quietly() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    // The table shows every row (after computing their widths) only with --max-rows 0.
    for format in ["csv", "json", "table --max-rows 0"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flatfhir"))
            .args([
                "query",
                "-q",
                "--data",
                tmp.path().to_str().unwrap(),
                "--format",
            ])
            .args(format.split(' '))
            .arg("select value from generate_series(1, 300000)")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
        let o = wait_at_most(child, 60);
        assert_eq!(o.status.code(), Some(0), "{format}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{format}");
    }
}

/// A script of only comments (or nothing) is an error, not an empty result.
#[test]
fn query_without_a_statement_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    for sql in ["", "-- each patient's gender;\n/* ; */"] {
        let o = flatfhir(&[
            "query",
            "-q",
            "--data",
            tmp.path().to_str().unwrap(),
            "--",
            sql,
        ]);
        assert_eq!(o.status.code(), Some(2), "{sql:?}: {}", stdout(&o));
        assert!(stderr(&o).contains("no SQL statement"), "{}", stderr(&o));
    }
}

/// `compact` of a location that holds no dataset (an empty folder, or a mistyped object-store
/// prefix, which lists as empty) says so and exits 2, instead of "nothing to compact".
#[test]
fn compact_of_a_location_without_a_dataset_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let o = flatfhir(&["compact", "--data", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stderr(&o).contains("no flatfhir dataset"), "{}", stderr(&o));
}
