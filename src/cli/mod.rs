//! The command-line surface (binary-only: the one place that uses anyhow, prints to stdout and
//! decides exit codes).

pub mod logging;
mod output;
mod progress;

use std::{
    io::{IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use flatfhir::{
    flatten::{DecodeStats, DecoderBuilder},
    pipeline::{self, ConvertOptions, Progress},
    query::Dataset,
    sink::{DatasetLocation, RunManifest},
    view::{CompiledView, ViewRegistry},
};

/// flatfhir — FHIR Bulk Data (ndjson) → SQL-on-FHIR views → Hive-partitioned Parquet → SQL.
#[derive(Debug, Parser)]
#[command(name = "flatfhir", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output on stderr (-q errors only and no progress, -qq nothing).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert ndjson files (or folders of them) into a Parquet dataset, one table per view.
    Convert(ConvertArgs),
    /// Run SQL over a dataset; every view is a table named by its ViewDefinition `name`.
    Query(QueryArgs),
    /// Run one ViewDefinition over ndjson input and print its rows.
    View(ViewArgs),
    /// List or show the views in use.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Run the whole pipeline on the bundled sample data into ./flatfhir-demo and query it.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
struct SchemaArgs {
    /// Folder of ViewDefinition JSON files: adds views, or replaces built-in ones of the same name.
    #[arg(long, value_name = "DIR", env = "FLATFHIR_SCHEMAS")]
    schemas: Option<PathBuf>,
    /// Do not add the raw `resource` JSON column to base views.
    #[arg(long)]
    no_raw: bool,
}

impl SchemaArgs {
    fn registry(&self) -> Result<ViewRegistry> {
        let mut reg = ViewRegistry::builtin()?.with_raw(!self.no_raw);
        if let Some(dir) = &self.schemas {
            reg.add_dir(dir)?;
        }
        Ok(reg)
    }
}

#[derive(Debug, Args)]
struct ConvertArgs {
    /// Input ndjson files (.ndjson, .ndjson.gz) or folders searched recursively for them.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output dataset folder (created if missing).
    #[arg(long, short, value_name = "DIR")]
    out: String,
    #[command(flatten)]
    schema: SchemaArgs,
    /// Fail (exit code 1) when more than N lines are rejected; the run is still written.
    #[arg(long, value_name = "N")]
    max_rejects: Option<u64>,
    /// Parquet compression: zstd, zstd:LEVEL, snappy or none.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compression: parquet::basic::Compression,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = flatfhir::sink::DEFAULT_ROW_GROUP_ROWS)]
    row_group_size: usize,
    /// Rows per RecordBatch.
    #[arg(long, default_value_t = flatfhir::flatten::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// Decode threads [default: number of cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Print the run manifest as JSON on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueryFormat {
    /// Aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// Dataset folder written by `convert`.
    #[arg(long, short, value_name = "DIR")]
    data: String,
    /// SQL statement; `-` or nothing reads it from stdin.
    sql: Option<String>,
    /// Read the SQL from a file.
    #[arg(long, short, value_name = "FILE", conflicts_with = "sql")]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: QueryFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ViewFormat {
    /// One JSON object per row, keys in column order.
    Ndjson,
    /// CSV with a header.
    Csv,
    /// A Parquet file (needs --out).
    Parquet,
}

#[derive(Debug, Args)]
struct ViewArgs {
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

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// List the views: name, resource type, columns, origin.
    List(SchemaArgs),
    /// Show one view's columns.
    Show {
        /// View name.
        name: String,
        #[command(flatten)]
        schema: SchemaArgs,
    },
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Where to write the demo dataset.
    #[arg(long, default_value = "flatfhir-demo")]
    out: String,
}

fn parse_compression(s: &str) -> Result<parquet::basic::Compression, String> {
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

/// How a successful command ended.
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: the run finished, but rejects exceeded the limit.
    RejectsExceeded,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Outcome::Success => ExitCode::SUCCESS,
            Outcome::RejectsExceeded => ExitCode::from(1),
        }
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let quiet = cli.quiet > 0;
    match cli.command {
        Command::Convert(a) => rt.block_on(convert(a, quiet)),
        Command::Query(a) => rt.block_on(query(a)),
        Command::View(a) => view(a),
        Command::Schemas(SchemasCommand::List(s)) => schemas_list(&s),
        Command::Schemas(SchemasCommand::Show { name, schema }) => schemas_show(&name, &schema),
        Command::Demo(a) => rt.block_on(demo(a, quiet)),
    }
}

async fn run_convert(
    files: Vec<PathBuf>,
    registry: ViewRegistry,
    out: &str,
    opts: ConvertOptions,
    quiet: bool,
) -> Result<RunManifest> {
    if files.is_empty() {
        bail!("no input files (looked for *.ndjson, *.ndjson.gz, *.jsonl, *.jsonl.gz)");
    }
    let location = DatasetLocation::resolve(out, true)?;
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let progress = Arc::new(Progress::default());
    let display =
        progress::ProgressDisplay::start(progress.clone(), total, files.len() as u64, quiet);
    tracing::info!(files = files.len(), bytes = total, out, "converting");
    let r = pipeline::convert(files, Arc::new(registry), location, opts, progress).await;
    display.stop();
    Ok(r?)
}

async fn convert(a: ConvertArgs, quiet: bool) -> Result<Outcome> {
    let registry = a.schema.registry()?;
    let files = pipeline::expand_inputs(&a.inputs)?;
    let mut opts = ConvertOptions {
        batch_size: a.batch_size.max(1),
        compression: a.compression,
        row_group_rows: a.row_group_size.max(1),
        ..Default::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    let manifest = run_convert(files, registry, &a.out, opts, quiet).await?;
    let mut stdout = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut stdout, &manifest)?;
        writeln!(stdout)?;
    } else {
        output::write_accounting(&mut stdout, &manifest, &a.out)?;
    }
    Ok(check_rejects(&manifest, a.max_rejects))
}

fn check_rejects(manifest: &RunManifest, max: Option<u64>) -> Outcome {
    match max {
        Some(max) if manifest.rejects > max => {
            eprintln!(
                "error: {} lines rejected, more than --max-rejects {max}",
                manifest.rejects
            );
            Outcome::RejectsExceeded
        }
        _ => Outcome::Success,
    }
}

async fn query(a: QueryArgs) -> Result<Outcome> {
    let sql = match (&a.sql, &a.file) {
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
    let location = DatasetLocation::resolve(&a.data, false)?;
    let ds = Dataset::open(&location).await?;
    if ds.tables().is_empty() {
        tracing::warn!(
            data = a.data,
            "the dataset has no finished runs; no tables are registered"
        );
    }
    let mut last = Vec::new();
    for stmt in split_statements(&sql) {
        last = ds.sql(stmt).await?;
    }
    let mut stdout = std::io::stdout().lock();
    match a.format {
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

fn view(a: ViewArgs) -> Result<Outcome> {
    let text = std::fs::read_to_string(&a.view)
        .with_context(|| format!("reading {}", a.view.display()))?;
    let view = CompiledView::from_json(&text, &a.view.display().to_string())?;
    let name = view.name().to_string();
    let schema = view.schema().clone();
    let mut reg = ViewRegistry::empty().with_raw(false);
    reg.add_json(&text, &a.view.display().to_string())?;
    let reg = Arc::new(reg);
    let files = pipeline::expand_inputs(&a.inputs)?;
    let progress = Progress::default();
    let mut batches = Vec::new();
    let mut rejects = Vec::new();
    let mut stats = DecodeStats::default();
    for f in &files {
        let label = f.display().to_string();
        let mut input =
            pipeline::open_input(f, &progress).with_context(|| format!("reading {label}"))?;
        let mut d = DecoderBuilder::new(reg.clone(), label.clone())
            .with_only_viewed_types(true)
            .build();
        let mut buf = vec![0u8; pipeline::DEFAULT_CHUNK_BYTES];
        loop {
            let n = input
                .read(&mut buf)
                .with_context(|| format!("reading {label}"))?;
            if n == 0 {
                break;
            }
            d.decode(&buf[..n])?;
            batches.extend(d.take_batches());
        }
        batches.extend(d.finish()?);
        rejects.extend(d.take_rejects());
        stats.merge(d.stats());
    }
    let batches: Vec<_> = batches
        .into_iter()
        .filter(|b| *b.view == *name)
        .map(|b| b.batch)
        .collect();
    if let ViewFormat::Parquet = a.format {
        let Some(p) = &a.out else {
            bail!("--format parquet needs --out FILE")
        };
        let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        output::write_parquet(f, schema, &batches)?;
        return report_view_rejects(&rejects, &stats);
    }
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    match a.format {
        ViewFormat::Ndjson => output::write_view_ndjson(&mut out, &batches)?,
        ViewFormat::Csv => output::write_csv(&mut out, &batches)?,
        ViewFormat::Parquet => unreachable!("handled above"),
    }
    out.flush()?;
    report_view_rejects(&rejects, &stats)
}

fn report_view_rejects(
    rejects: &[flatfhir::flatten::Reject],
    stats: &DecodeStats,
) -> Result<Outcome> {
    for r in rejects {
        eprintln!("{}:{}: {}", r.file, r.line, r.reason);
    }
    if rejects.is_empty() {
        Ok(Outcome::Success)
    } else {
        eprintln!(
            "error: {} of {} resources rejected",
            rejects.len(),
            stats.lines - stats.blank_lines
        );
        Ok(Outcome::RejectsExceeded)
    }
}

fn schemas_list(s: &SchemaArgs) -> Result<Outcome> {
    let reg = s.registry()?;
    let mut out = std::io::stdout().lock();
    let rows: Vec<Vec<String>> = reg
        .views()
        .map(|v| {
            vec![
                v.name().to_string(),
                v.resource().to_string(),
                v.schema().fields().len().to_string(),
                reg.origin(v.name()).unwrap_or_default().to_string(),
            ]
        })
        .collect();
    output::write_text_table(&mut out, &["view", "resource", "columns", "origin"], &rows)?;
    Ok(Outcome::Success)
}

fn schemas_show(name: &str, s: &SchemaArgs) -> Result<Outcome> {
    let reg = s.registry()?;
    let Some(v) = reg.get(name) else {
        bail!("no view named {name:?}; `flatfhir schemas list` shows them");
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} — resource {} ({})",
        v.name(),
        v.resource(),
        reg.origin(name).unwrap_or_default()
    )?;
    if let Some(d) = v.description() {
        writeln!(out, "{d}")?;
    }
    let mut rows: Vec<Vec<String>> = v
        .columns()
        .iter()
        .zip(v.schema().fields())
        .map(|(c, f)| {
            vec![
                c.name.clone(),
                f.data_type().to_string(),
                c.fhir_type.clone(),
                c.path.clone(),
            ]
        })
        .collect();
    if v.raw_column() {
        rows.push(vec![
            "resource".into(),
            "Utf8".into(),
            "json".into(),
            "(the raw resource)".into(),
        ]);
    }
    output::write_text_table(
        &mut out,
        &["column", "arrow type", "fhir type", "path"],
        &rows,
    )?;
    Ok(Outcome::Success)
}

async fn demo(a: DemoArgs, quiet: bool) -> Result<Outcome> {
    let dir = tempfile_dir()?;
    let files = flatfhir::sample::write_sample(&dir)?;
    eprintln!(
        "flatfhir demo: converting the bundled sample ({} files) into {}/",
        files.len(),
        a.out
    );
    let manifest = run_convert(
        files,
        ViewRegistry::builtin()?,
        &a.out,
        ConvertOptions::default(),
        quiet,
    )
    .await?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut stdout = std::io::stdout().lock();
    output::write_accounting(&mut stdout, &manifest, &a.out)?;
    let ds = Dataset::open(&DatasetLocation::resolve(&a.out, false)?).await?;
    for (title, sql) in flatfhir::sample::DEMO_QUERIES {
        writeln!(stdout, "\n{title}\n  {sql}")?;
        output::write_table(&mut stdout, &ds.sql(sql).await?)?;
    }
    Ok(Outcome::Success)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("flatfhir-demo-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
