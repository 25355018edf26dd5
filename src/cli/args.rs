//! Arguments several commands share, and the value parsers of clap.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use flatfhir::{
    dataset::DatasetLocation,
    run::metrics::{RunResult, prometheus_text, write_atomically},
    view::ViewRegistry,
};

/// The views in use: built-in defaults plus `--schemas DIR`.
#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Folder of ViewDefinition JSON files: adds views, or replaces built-in ones of the same name.
    #[arg(long, value_name = "DIR", env = "FLATFHIR_SCHEMAS")]
    pub schemas: Option<PathBuf>,
    /// Do not add the raw `resource` JSON column to base views.
    #[arg(long)]
    pub no_raw: bool,
}

impl SchemaArgs {
    /// Load and compile the views (a bad ViewDefinition fails here, before any I/O of a run).
    pub fn registry(&self) -> Result<ViewRegistry> {
        let mut reg = ViewRegistry::builtin()?.with_raw(!self.no_raw);
        if let Some(dir) = &self.schemas {
            reg.add_dir(dir)?;
        }
        Ok(reg)
    }
}

/// Object store options of a dataset location.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Object store option KEY=VALUE, e.g. aws_endpoint=http://127.0.0.1:9000 (repeatable;
    /// credentials and endpoints also come from the cloud's standard environment variables).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub store_options: Vec<(String, String)>,
}

impl StoreArgs {
    /// Resolve a dataset location (no request is sent; a local folder is created when
    /// `create`).
    pub fn location(&self, location: &str, create: bool) -> Result<DatasetLocation> {
        Ok(DatasetLocation::resolve_with_options(
            location,
            &self.store_options,
            create,
        )?)
    }
}

/// `--metrics-file`: the run summary in the Prometheus text format.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Write the run summary in the Prometheus text format to FILE at the end of the run,
    /// success or failure (replaced atomically; for a node-exporter textfile collector). A run
    /// that exits 3 (the same export already running elsewhere) leaves the file as it is.
    #[arg(long, value_name = "FILE", env = "FLATFHIR_METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,
}

impl MetricsArgs {
    /// Write the metrics file, if one was asked for. A failure to write it is a warning: the
    /// run's own outcome stands, and the file's stale timestamp is what an alert sees.
    pub fn write(&self, command: &str, dataset: &str, result: &RunResult<'_>, exit_code: u8) {
        let Some(path) = &self.metrics_file else {
            return;
        };
        let dataset = match url::Url::parse(dataset) {
            Ok(u) if dataset.contains("://") => flatfhir::client::error_redact(&u),
            _ => dataset.to_string(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let text = prometheus_text(command, &dataset, result, exit_code, now);
        if let Err(e) = write_atomically(path, &text) {
            // Said, not logged: the scheduler's alert depends on this file.
            super::logging::say(
                tracing::Level::WARN,
                &format!("could not write the metrics file {}: {e}", path.display()),
            );
        }
    }
}

impl MetricsArgs {
    /// After a run: the metrics file from its record, or — failed — from its duration and what
    /// its HTTP requests did (`http`); then the run's own result.
    pub fn report(
        &self,
        command: &str,
        dataset: &str,
        started: std::time::Instant,
        result: Result<(super::Outcome, flatfhir::dataset::RunManifest)>,
        http: impl FnOnce() -> flatfhir::client::HttpSummary,
    ) -> Result<super::Outcome> {
        match result {
            Ok((outcome, manifest)) => {
                let published = RunResult::Published(&manifest);
                self.write(command, dataset, &published, outcome.code());
                Ok(outcome)
            }
            Err(e) => {
                let code = super::exit_code_of(&e);
                // Exit 3: the same export is running in another process, which writes the file
                // when it ends; a "failed" run now would fire the alert for nothing.
                if code != 3 {
                    let failed = RunResult::Failed {
                        duration_seconds: started.elapsed().as_secs_f64(),
                        http: http(),
                    };
                    self.write(command, dataset, &failed, code);
                }
                Err(e)
            }
        }
    }

    /// A run that failed before it started (flags, inputs, keys): the metrics file says so too.
    pub fn failed_early(&self, command: &str, dataset: &str, e: anyhow::Error) -> anyhow::Error {
        let failed = RunResult::Failed {
            duration_seconds: 0.0,
            http: Default::default(),
        };
        self.write(command, dataset, &failed, super::exit_code_of(&e));
        e
    }
}

/// `NAME=VALUE`.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

/// `NAME:VALUE`.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected NAME:VALUE, got {s:?}"))
}
/// `90s`, `30m`, `12h`, `7d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 90s, 30m, 12h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h, d)")),
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// A byte count: `500k`, `2MB`, `1.5M`, `1GiB`, or plain bytes (k/M/G are powers of 1,000,
/// Ki/Mi/Gi of 1,024; a trailing `B` or `/s` is allowed).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let (num, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?} (e.g. 500k, 2MB, 1GiB)"))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    let scale: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("bad size unit in {s:?} (k, M, G, Ki, Mi, Gi)")),
    };
    Ok((n * scale).round() as u64)
}

/// `--max-line-bytes`: a size ([`parse_bytes`]) from 1 byte up to the JSON parser's limit.
pub fn parse_max_line_bytes(s: &str) -> Result<usize, String> {
    let n = parse_bytes(s)?;
    let most = flatfhir::flatten::LARGEST_MAX_LINE_BYTES;
    if n == 0 || n > most as u64 {
        return Err(format!(
            "{s:?} is out of range: a line limit is 1 byte to {most} bytes (2 GiB - 1)"
        ));
    }
    Ok(n as usize)
}

pub fn parse_compression(s: &str) -> Result<parquet::basic::Compression, String> {
    use parquet::basic::{Compression, ZstdLevel};
    match s.split_once(':') {
        None if s == "zstd" => Ok(Compression::ZSTD(ZstdLevel::default())),
        None if s == "snappy" => Ok(Compression::SNAPPY),
        None if s == "none" || s == "uncompressed" => Ok(Compression::UNCOMPRESSED),
        Some(("zstd", l)) => {
            let level: i32 = l.parse().map_err(|_| format!("bad zstd level {l:?}"))?;
            ZstdLevel::try_new(level)
                .map(Compression::ZSTD)
                .map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "unknown compression {s:?} (zstd, zstd:LEVEL, snappy, none)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        assert_eq!(parse_bytes("500k"), Ok(500_000));
        assert_eq!(parse_bytes("1.5M/s"), Ok(1_500_000));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("2 parsecs").is_err());
        assert!(parse_bytes("MB").is_err());
    }
}
