//! `flatfhir query`: SQL over a dataset.
//!
//! The result of the last statement is read batch by batch and never collected: csv and json
//! write each batch as it comes, so a result of any size runs in bounded memory (and `| head`
//! stops it early); the table, which aligns its columns over the rows it shows, keeps only the
//! first `--max-rows`.

use std::{
    io::{IsTerminal, Read, Write},
    path::PathBuf,
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use flatfhir::{
    dataset::DatasetLocation,
    query::{AsOf, Dataset, QueryError},
};
use futures::TryStreamExt;

use super::{Outcome, args::StoreArgs, output};

/// Rows the table format shows by default (`--max-rows`): the table is aligned over every row
/// it shows, so those rows are held in memory; csv and json stream every row.
pub const DEFAULT_TABLE_ROWS: usize = 1000;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QueryFormat {
    /// Aligned text table of the first --max-rows rows.
    Table,
    /// CSV with a header, every row; lists and structs as JSON text.
    Csv,
    /// One JSON object per line, every row.
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
    /// Output format. csv and json write the rows as they come; table holds the rows it
    /// shows, to align them.
    #[arg(long, value_enum, default_value = "table")]
    format: QueryFormat,
    /// Table format: show at most N rows, and say when there are more (0: every row, all held
    /// in memory).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TABLE_ROWS)]
    max_rows: usize,
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
    max_rows: usize,
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
            max_rows: self.max_rows,
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
    let stmts = split_statements(&c.sql);
    let Some((last, before)) = stmts.split_last() else {
        bail!("no SQL statement given (only whitespace or comments)");
    };
    for stmt in before {
        ds.sql(stmt).await?;
    }
    let mut stream = ds.sql_stream(last).await?;
    let schema = stream.schema();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match c.format {
        QueryFormat::Table => {
            let (mut shown, mut rows, mut more) = (Vec::new(), 0, false);
            let max = if c.max_rows == 0 {
                usize::MAX
            } else {
                c.max_rows
            };
            while let Some(b) = stream.try_next().await.map_err(QueryError::from)? {
                if b.num_rows() == 0 {
                    continue;
                }
                if rows == max {
                    more = true;
                    break;
                }
                let take = b.num_rows().min(max - rows);
                rows += take;
                shown.push(b.slice(0, take));
                if take < b.num_rows() {
                    more = true;
                    break;
                }
            }
            output::write_table(&mut out, &shown, more)?;
        }
        QueryFormat::Csv => {
            let mut w = output::CsvWriter::new(&mut out, &schema)?;
            while let Some(b) = stream.try_next().await.map_err(QueryError::from)? {
                w.write(&b)?;
            }
        }
        QueryFormat::Json => {
            while let Some(b) = stream.try_next().await.map_err(QueryError::from)? {
                output::write_ndjson(&mut out, &[b])?;
            }
        }
    }
    out.flush()?;
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
