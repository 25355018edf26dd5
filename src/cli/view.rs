//! `flatfhir view`: one ViewDefinition over ndjson input, rows printed.

use std::{io::Write, path::PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use flatfhir::{
    arrow::{array::AsArray, datatypes::UInt64Type, record_batch::RecordBatch},
    run::{expand_inputs, view::run_view},
    view::CompiledView,
};

use super::{Outcome, output};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ViewFormat {
    /// One JSON object per row, keys in column order.
    Ndjson,
    /// CSV with a header.
    Csv,
    /// A Parquet file (needs --out).
    Parquet,
}

#[derive(Debug, Args)]
pub struct ViewArgs {
    /// The ViewDefinition JSON file.
    #[arg(long, value_name = "FILE")]
    view: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "ndjson")]
    format: ViewFormat,
    /// Write to this file instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Input ndjson files or folders.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
}

/// A validated `view`: the view compiled, the inputs found.
pub struct ViewConfig {
    view: CompiledView,
    files: Vec<PathBuf>,
    format: ViewFormat,
    out: Option<PathBuf>,
}

impl ViewArgs {
    /// Compile the view and find the inputs.
    pub fn validate(self) -> Result<ViewConfig> {
        let text = std::fs::read_to_string(&self.view)
            .with_context(|| format!("reading {}", self.view.display()))?;
        let view = CompiledView::from_json(&text, &self.view.display().to_string())?;
        if matches!(self.format, ViewFormat::Parquet) && self.out.is_none() {
            bail!("--format parquet needs --out FILE");
        }
        Ok(ViewConfig {
            view,
            files: expand_inputs(&self.inputs)?,
            format: self.format,
            out: self.out,
        })
    }
}

pub async fn run(c: ViewConfig) -> Result<Outcome> {
    let out = run_view(c.view, c.files).await?;
    let create =
        |p: &PathBuf| std::fs::File::create(p).with_context(|| format!("creating {}", p.display()));
    match (c.format, &c.out) {
        (ViewFormat::Parquet, Some(p)) => {
            output::write_parquet(create(p)?, out.schema.clone(), &out.batches)?
        }
        (format, path) => {
            let mut w: Box<dyn Write> = match path {
                Some(p) => Box::new(std::io::BufWriter::new(create(p)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            match format {
                ViewFormat::Ndjson => output::write_view_ndjson(&mut w, &out.batches)?,
                ViewFormat::Csv => output::write_csv(&mut w, &out.schema, &out.batches)?,
                ViewFormat::Parquet => unreachable!("checked in validate"),
            }
            w.flush()?;
        }
    }
    let resources = out.stats.lines - out.stats.blank_lines;
    report_rejects(&out.rejects, resources)
}

/// Print each rejected resource as `file:line: reason`; exit code 1 when there are any.
fn report_rejects(rejects: &[RecordBatch], resources: u64) -> Result<Outcome> {
    let mut n = 0;
    for b in rejects {
        let file = b.column(0).as_string::<i32>();
        let line = b.column(1).as_primitive::<UInt64Type>();
        let reason = b.column(4).as_string::<i32>();
        for i in 0..b.num_rows() {
            eprintln!("{}:{}: {}", file.value(i), line.value(i), reason.value(i));
            n += 1;
        }
    }
    if n == 0 {
        Ok(Outcome::Success)
    } else {
        eprintln!("error: {n} of {resources} resources rejected");
        Ok(Outcome::RejectsExceeded)
    }
}
