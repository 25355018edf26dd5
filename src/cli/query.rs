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

/// Split a script on `;` outside quoted strings (`'…'`), quoted identifiers (`"…"`) and
/// comments (`-- …` to the end of the line, `/* … */`): an apostrophe in a comment does not
/// open a string. Statements of only whitespace and comments are dropped.
fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let (mut out, mut start, mut i, mut code) = (Vec::new(), 0, 0, false);
    // Every delimiter is ASCII, so each index where one is found is a char boundary.
    let skip_to = |from: usize, end: &[u8]| {
        b[from..]
            .windows(end.len())
            .position(|w| w == end)
            .map_or(b.len(), |p| from + p + end.len())
    };
    while i < b.len() {
        match b[i] {
            // A doubled quote inside ('it''s') closes and reopens: the same split.
            q @ (b'\'' | b'"') => {
                i = skip_to(i + 1, &[q]);
                code = true;
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = skip_to(i + 2, b"\n");
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = skip_to(i + 2, b"*/");
                continue;
            }
            b';' => {
                if code {
                    out.push(&sql[start..i]);
                }
                (start, code) = (i + 1, false);
            }
            c if c.is_ascii_whitespace() => {}
            _ => code = true,
        }
        i += 1;
    }
    if code {
        out.push(&sql[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_statements_skips_comments_and_quotes() {
        let script = "-- each patient's gender\n\
                      create view g as select gender from patient; /* don't; */\n\
                      select 'a;b', \"x;\"\"y\" from g where n = 'it''s;' -- it's; done";
        let stmts: Vec<&str> = split_statements(script).iter().map(|s| s.trim()).collect();
        assert_eq!(
            stmts,
            [
                "-- each patient's gender\ncreate view g as select gender from patient",
                "/* don't; */\nselect 'a;b', \"x;\"\"y\" from g where n = 'it''s;' -- it's; done",
            ]
        );
        assert!(split_statements(" ;\n-- only a comment; really\n/* ; */ ;").is_empty());
        assert_eq!(split_statements("select 1;"), ["select 1"]);
        assert_eq!(
            split_statements("select 1 -- no newline"),
            ["select 1 -- no newline"]
        );
    }
}
