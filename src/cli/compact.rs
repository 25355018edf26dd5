//! `flatfhir compact`: fewer, larger files.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use flatfhir::{
    compact::{CompactOptions, compact},
    dataset::DatasetLocation,
};

use super::{
    Outcome,
    args::{StoreArgs, parse_compression},
};

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Dataset: a folder or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    data: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Rewrite a partition (one view, one run) when it has at least this many files.
    #[arg(long, default_value_t = flatfhir::compact::DEFAULT_MIN_FILES)]
    min_files: usize,
    /// Only this view (repeatable, or comma-separated); default all.
    #[arg(long = "view", value_name = "NAME", value_delimiter = ',')]
    views: Vec<String>,
    /// Keep only the rows of `<view>_latest` (drops older versions and deleted resources).
    #[arg(long)]
    latest_only: bool,
    /// Parquet compression: zstd, zstd:LEVEL, snappy or none.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compression: parquet::basic::Compression,
    /// Print the compaction record as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// A validated compaction.
pub struct CompactConfig {
    data: String,
    location: DatasetLocation,
    opts: CompactOptions,
    json: bool,
}

impl CompactArgs {
    /// Resolve the dataset and the options (no request is sent yet).
    pub fn validate(self) -> Result<CompactConfig> {
        Ok(CompactConfig {
            location: self.store.location(&self.data, false)?,
            data: self.data,
            opts: CompactOptions {
                min_files: self.min_files.max(1),
                views: self.views,
                latest_only: self.latest_only,
                compression: self.compression,
                ..Default::default()
            },
            json: self.json,
        })
    }
}

pub async fn run(a: CompactConfig) -> Result<Outcome> {
    let opts = &a.opts;
    let s = compact(&a.location, opts).await?;
    let mut stdout = std::io::stdout().lock();
    match (&s.manifest, a.json) {
        (Some(m), true) => {
            serde_json::to_writer_pretty(&mut stdout, m)?;
            writeln!(stdout)?;
        }
        (Some(m), false) => writeln!(
            stdout,
            "compacted {} partitions of {}: {} files → {} ({} rows → {}); record _compactions/{}.json",
            m.partitions.len(),
            a.data,
            s.files_before,
            s.files_after,
            s.rows.0,
            s.rows.1,
            m.id
        )?,
        (None, _) => writeln!(
            stdout,
            "nothing to compact in {} ({} files; no partition has {} or more)",
            a.data, s.files_before, opts.min_files
        )?,
    }
    if s.not_deleted > 0 {
        eprintln!(
            "warning: {} replaced files could not be deleted (not read any more; the next compact retries)",
            s.not_deleted
        );
    }
    Ok(Outcome::Success)
}
