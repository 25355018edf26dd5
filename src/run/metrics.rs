//! The run summary in the Prometheus text exposition format (version 0.0.4), for a
//! node-exporter textfile collector: `--metrics-file PATH` on `export` and `convert`.
//!
//! Why a file and not an endpoint: a nightly job lives for minutes, so nothing could scrape it;
//! the textfile collector reads `*.prom` files from a folder at every scrape instead. The file is
//! replaced atomically ([`write_atomically`]: a temporary file beside it, then a rename), so the
//! collector never reads half of one, and it is written whether the run succeeded or failed —
//! `flatfhir_run_success` and `flatfhir_last_run_timestamp_seconds` are what alerts look at
//! ("failed", or "has not run since yesterday").
//!
//! Every series is a gauge describing the last run, and carries `command` and `dataset` labels
//! so several jobs' files can sit in one collector folder without clashing.
//!
//! # Example
//!
//! ```
//! use flatfhir::run::metrics::{RunResult, prometheus_text};
//! let failed = RunResult::Failed { duration_seconds: 2.5, http: Default::default() };
//! let text = prometheus_text("export", "/data/lake", &failed, 2, 1_700_000_000.0);
//! assert!(text.contains("flatfhir_run_success{command=\"export\",dataset=\"/data/lake\"} 0\n"));
//! assert!(text.contains("# TYPE flatfhir_last_run_timestamp_seconds gauge\n"));
//! ```

use std::{fmt::Write as _, io::Write as _, path::Path};

use crate::{client::HttpSummary, dataset::RunManifest};

/// What the metrics file says about a run.
#[derive(Debug)]
pub enum RunResult<'a> {
    /// The run was published: its record holds every figure.
    Published(&'a RunManifest),
    /// The run failed: what is known without a record.
    Failed {
        /// Seconds from the start of the command to the failure.
        duration_seconds: f64,
        /// What the HTTP requests did (exports).
        http: HttpSummary,
    },
}

/// Escape a label value: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value as the format spells it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Writes metric families with the common labels on every sample.
struct Families {
    out: String,
    common: String,
}

impl Families {
    /// A gauge family: `# HELP`, `# TYPE`, then one line per sample (`label` is the sample's
    /// own label, if any). Nothing when there is no sample.
    fn gauge<'a>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Option<(&'a str, &'a str)>, f64)>,
    ) {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return;
        }
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} gauge");
        for (label, v) in samples {
            let own = label
                .map(|(k, v)| format!(",{k}=\"{}\"", escape_label(v)))
                .unwrap_or_default();
            let _ = writeln!(self.out, "{name}{{{}{own}}} {}", self.common, number(v));
        }
    }

    fn one(&mut self, name: &str, help: &str, v: f64) {
        self.gauge(name, help, [(None, v)]);
    }
}

/// The Prometheus text of a run of `command` into `dataset` that ended at `now_unix` (seconds
/// since the epoch) with `exit_code`.
pub fn prometheus_text(
    command: &str,
    dataset: &str,
    result: &RunResult<'_>,
    exit_code: u8,
    now_unix: f64,
) -> String {
    let mut f = Families {
        out: String::new(),
        common: format!(
            "command=\"{}\",dataset=\"{}\"",
            escape_label(command),
            escape_label(dataset)
        ),
    };
    let published = matches!(result, RunResult::Published(_));
    f.one(
        "flatfhir_run_success",
        "1 if the last run completed and was published, 0 if it failed.",
        if published { 1.0 } else { 0.0 },
    );
    f.one(
        "flatfhir_run_exit_code",
        "Exit code of the last run (0 ok, 1 completed with too many rejects or server errors, 2 failed).",
        exit_code as f64,
    );
    f.one(
        "flatfhir_last_run_timestamp_seconds",
        "When the last run ended, in seconds since the Unix epoch.",
        now_unix,
    );
    let (duration, http) = match result {
        RunResult::Published(m) => (m.metrics.duration_seconds, &m.metrics.http),
        RunResult::Failed {
            duration_seconds,
            http,
        } => (*duration_seconds, http),
    };
    f.one(
        "flatfhir_run_duration_seconds",
        "Duration of the last run.",
        duration,
    );
    if let RunResult::Published(m) = result {
        f.gauge(
            "flatfhir_run_phase_duration_seconds",
            "Wall-clock seconds of the last run per phase (phases may overlap).",
            m.metrics
                .phases
                .named()
                .into_iter()
                .map(|(p, s)| (Some(("phase", p)), s)),
        );
        type Pick = fn(&crate::flatten::TypeCounts) -> u64;
        let per_type: [(&str, &str, Pick); 4] = [
            (
                "flatfhir_run_lines",
                "ndjson lines read per resource type.",
                |c| c.lines,
            ),
            (
                "flatfhir_run_rows",
                "Resources written per resource type.",
                |c| c.rows,
            ),
            (
                "flatfhir_run_rejects",
                "Lines rejected per resource type (table _rejects).",
                |c| c.rejects,
            ),
            (
                "flatfhir_run_filtered",
                "Lines left out by a view's where clause per resource type.",
                |c| c.filtered,
            ),
        ];
        for (name, help, pick) in per_type {
            let samples = m
                .types
                .iter()
                .map(|(t, c)| (Some(("type", t.as_str())), pick(c) as f64));
            f.gauge(name, help, samples);
        }
        f.gauge(
            "flatfhir_run_view_rows",
            "Rows written per view (table).",
            m.views
                .iter()
                .map(|(v, n)| (Some(("view", v.as_str())), *n as f64)),
        );
        f.one(
            "flatfhir_run_rejected_lines",
            "Lines rejected in all.",
            m.rejects as f64,
        );
        f.one(
            "flatfhir_run_blank_lines",
            "Blank lines skipped.",
            m.blank_lines as f64,
        );
        f.one(
            "flatfhir_run_inexact_cells",
            "Cells a typed column holds inexactly (the exact text is kept).",
            m.inexact_cells as f64,
        );
        f.one(
            "flatfhir_run_files_written",
            "Parquet files written.",
            m.files.len() as f64,
        );
        f.one(
            "flatfhir_run_bytes_read",
            "Bytes of ndjson read (decompressed).",
            m.metrics.bytes_read as f64,
        );
        if m.kind == "export" {
            f.one(
                "flatfhir_run_deleted_resources",
                "Deleted resources the server listed.",
                m.deleted as f64,
            );
            f.gauge(
                "flatfhir_run_server_issues",
                "OperationOutcome issues in the server's error files per severity.",
                m.outcomes
                    .iter()
                    .map(|(s, n)| (Some(("severity", s.as_str())), *n as f64)),
            );
        }
    }
    if http.requests > 0 {
        f.one(
            "flatfhir_run_http_requests",
            "HTTP requests sent (each redirect hop counts).",
            http.requests as f64,
        );
        let codes: Vec<(String, f64)> = http
            .status
            .iter()
            .map(|(c, n)| (c.to_string(), *n as f64))
            .collect();
        f.gauge(
            "flatfhir_run_http_responses",
            "HTTP responses per status code.",
            codes.iter().map(|(c, n)| (Some(("code", c.as_str())), *n)),
        );
        f.one(
            "flatfhir_run_http_transport_errors",
            "HTTP requests that got no response (refused, reset, timed out).",
            http.transport_errors as f64,
        );
        f.one(
            "flatfhir_run_http_retries",
            "Requests and whole files tried again.",
            http.retries as f64,
        );
        f.one(
            "flatfhir_run_http_throttled",
            "Responses asking to slow down (429, 503).",
            http.throttled as f64,
        );
        f.one(
            "flatfhir_run_http_throttle_wait_seconds",
            "Seconds waited before retries because the server throttled.",
            http.throttle_wait_seconds,
        );
        f.one(
            "flatfhir_run_http_bytes_received",
            "Body bytes received, as sent (gzip-encoded where they were).",
            http.bytes_received as f64,
        );
        f.one(
            "flatfhir_run_http_max_concurrency",
            "The cap on requests in flight (--max-concurrent-requests).",
            http.max_concurrency as f64,
        );
        f.one(
            "flatfhir_run_http_min_concurrency",
            "The lowest the adaptive request limit went.",
            http.min_concurrency as f64,
        );
    }
    f.out
}

/// Replace `path` with `text` atomically: write a temporary file in the same folder (a name the
/// textfile collector ignores: it does not end in `.prom`), flush it to disk, rename it over
/// `path`.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} is not a file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flatten::TypeCounts;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("two\nlines"), "two\\nlines");
        assert_eq!(escape_label("s3://bucket/päth"), "s3://bucket/päth");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
    }

    #[test]
    fn a_published_run_has_one_family_per_name_and_a_sample_per_type() {
        let mut m = RunManifest {
            kind: "export".into(),
            ..Default::default()
        };
        m.types.insert(
            "Patient".into(),
            TypeCounts {
                lines: 3,
                rows: 2,
                rejects: 1,
                ..Default::default()
            },
        );
        m.types.insert("Observation".into(), TypeCounts::default());
        m.metrics.http.requests = 5;
        m.metrics.http.status.insert(200, 4);
        m.metrics.http.status.insert(429, 1);
        let text = prometheus_text(
            "export",
            "C:\\lake \"nightly\"",
            &RunResult::Published(&m),
            0,
            1.5,
        );
        let common = r#"command="export",dataset="C:\\lake \"nightly\"""#;
        assert!(
            text.contains(&format!(
                "flatfhir_run_rows{{{common},type=\"Patient\"}} 2\n"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "flatfhir_run_http_responses{{{common},code=\"429\"}} 1\n"
        )));
        assert!(text.contains(&format!("flatfhir_run_success{{{common}}} 1\n")));
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(seen.insert(name.to_string()), "{name} twice");
            } else if !line.starts_with('#') {
                let name = line.split('{').next().unwrap();
                assert!(seen.contains(name), "{name}: sample before its TYPE");
            }
        }
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flatfhir.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        assert!(write_atomically(&dir.path().join("missing/x.prom"), "").is_err());
    }
}
