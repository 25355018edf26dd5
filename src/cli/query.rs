//! `flatfhir query`: SQL over a dataset.

use std::{
    io::{IsTerminal, Read, Write},
    path::PathBuf,
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use flatfhir::{
    dataset::DatasetLocation,
    query::{AsOf, Dataset},
};

use super::{Outcome, args::StoreArgs, output};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QueryFormat {
    /// Aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Dataset written by `convert` or `export`: a folder or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    data: String,
    #[command(flatten)]
    store: StoreArgs,
    /// SQL statement; `-` or nothing reads it from stdin.
    sql: Option<String>,
    /// Read the SQL from a file.
    #[arg(long, short, value_name = "FILE", conflicts_with = "sql")]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: QueryFormat,
    /// Read the tables as they were right after a run (its id, as in `_runs/` and the `export`
    /// column) or at a time (RFC 3339, e.g. 2026-12-01T00:00:00Z): Delta time travel.
    #[arg(long, value_name = "RUN|TIME", value_parser = parse_as_of)]
    as_of: Option<AsOf>,
}

/// A run id, or an RFC 3339 time.
fn parse_as_of(s: &str) -> Result<AsOf, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(AsOf::Timestamp(t.with_timezone(&chrono::Utc)));
    }
    if s.len() >= 20 && s.as_bytes()[8] == b'T' && s.is_ascii() {
        return Ok(AsOf::Run(s.to_string()));
    }
    Err(format!(
        "{s:?} is neither a run id (e.g. 20261204T201010.123Z-0123456789ab) nor an RFC 3339 time"
    ))
}

/// A validated query: the SQL read, the dataset resolved.
pub struct QueryConfig {
    sql: String,
    data: String,
    location: DatasetLocation,
    format: QueryFormat,
    as_of: AsOf,
}

impl QueryArgs {
    /// Read the SQL and resolve the dataset (no request is sent yet).
    pub fn validate(self) -> Result<QueryConfig> {
        let sql = match (&self.sql, &self.file) {
            (_, Some(f)) => {
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
            }
            (Some(s), None) if s != "-" => s.clone(),
            _ => {
                if std::io::stdin().is_terminal() {
                    bail!("no SQL given: pass it as an argument, with --file, or on stdin");
                }
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            }
        };
        let location = self.store.location(&self.data, false)?;
        Ok(QueryConfig {
            sql,
            data: self.data,
            location,
            format: self.format,
            as_of: self.as_of.unwrap_or_default(),
        })
    }
}

pub async fn run(c: QueryConfig) -> Result<Outcome> {
    let ds = Dataset::open_as_of(&c.location, &c.as_of).await?;
    if ds.table_names().is_empty() {
        tracing::warn!(
            data = c.data,
            "the dataset has no committed tables; no tables are registered"
        );
    }
    let mut last = Vec::new();
    for stmt in split_statements(&c.sql) {
        last = ds.sql(stmt).await?;
    }
    let mut stdout = std::io::stdout().lock();
    match c.format {
        QueryFormat::Table => output::write_table(&mut stdout, &last)?,
        QueryFormat::Csv => output::write_csv(&mut stdout, &last)?,
        QueryFormat::Json => output::write_ndjson(&mut stdout, &last)?,
    }
    stdout.flush()?;
    Ok(Outcome::Success)
}
/// Split a script on `;` outside quotes; empty statements dropped.
fn split_statements(sql: &str) -> Vec<&str> {
    let (mut out, mut start, mut quote) = (Vec::new(), 0, None::<char>);
    for (i, c) in sql.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ';') => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.into_iter()
        .filter(|s| {
            !s.trim().is_empty()
                && !s
                    .lines()
                    .all(|l| l.trim().is_empty() || l.trim().starts_with("--"))
        })
        .collect()
}
