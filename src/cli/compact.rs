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
    args::{StoreArgs, parse_compression, parse_duration},
};

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Dataset: a folder or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    data: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Only this table (repeatable, or comma-separated); default all.
    #[arg(long = "view", value_name = "NAME", value_delimiter = ',')]
    views: Vec<String>,
    /// Size of the files written, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = flatfhir::compact::DEFAULT_TARGET_SIZE >> 20)]
    target_size: u64,
    /// Then VACUUM: delete the files that versions committed within this retention no longer
    /// need (e.g. 7d, 12h, 0s), and the parts of runs that died before committing and started
    /// longer ago than the retention and 24 hours (never those of an export --resume can
    /// finish). Without it nothing is deleted and time travel reaches every version. A unit is
    /// required (a bare `7` would be seven seconds of history).
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    retain: Option<std::time::Duration>,
    /// Parquet compression: zstd, zstd:LEVEL, snappy or none.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compression: parquet::basic::Compression,
    /// Print what was done as JSON on stdout.
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
                views: self.views,
                target_size: self.target_size.max(1) << 20,
                retain: self.retain,
                compression: self.compression,
            },
            json: self.json,
        })
    }
}

/// `--retain`: a duration with its unit. A bare number other than 0 is refused: `--retain 7`
/// meant as days would keep seven seconds of time travel and VACUUM the rest.
fn parse_retention(s: &str) -> std::result::Result<std::time::Duration, String> {
    let t = s.trim();
    if !t.is_empty()
        && t.chars().all(|c| c.is_ascii_digit() || c == '.')
        && t.parse::<f64>() != Ok(0.0)
    {
        return Err(format!(
            "give --retain a unit ({t}d, {t}h, {t}m or {t}s): a bare number would be seconds"
        ));
    }
    parse_duration(t)
}

pub async fn run(a: CompactConfig) -> Result<Outcome> {
    let s = compact(&a.location, &a.opts).await?;
    // A mistyped object-store prefix is an empty listing, not an error: say so rather than
    // "nothing to compact" (a local folder that does not exist fails earlier).
    if s.tables.is_empty()
        && a.opts.views.is_empty()
        && flatfhir::dataset::RunManifest::list(&a.location)
            .await?
            .is_empty()
    {
        anyhow::bail!(
            "no flatfhir dataset at {}: no Delta tables and no run records (is the path right?)",
            a.data
        );
    }
    let mut stdout = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut stdout, &s)?;
        writeln!(stdout)?;
        return Ok(Outcome::Success);
    }
    let optimized: Vec<_> = s.tables.iter().filter(|t| t.version.is_some()).collect();
    let removed: u64 = optimized.iter().map(|t| t.files_removed).sum();
    let added: u64 = optimized.iter().map(|t| t.files_added).sum();
    let deleted: usize = s.tables.iter().map(|t| t.files_deleted).sum();
    if optimized.is_empty() {
        writeln!(
            stdout,
            "nothing to compact in {} ({} tables)",
            a.data,
            s.tables.len()
        )?;
    } else {
        writeln!(
            stdout,
            "compacted {} of {} tables of {}: {removed} files → {added}",
            optimized.len(),
            s.tables.len(),
            a.data
        )?;
    }
    if a.opts.retain.is_some() {
        writeln!(
            stdout,
            "vacuum deleted {deleted} files no retained version needs"
        )?;
        let d = &s.dead_runs;
        if !d.runs.is_empty() {
            writeln!(
                stdout,
                "removed {} files ({:.1} MB) of {} runs that died before committing: {}",
                d.files,
                d.bytes as f64 / 1e6,
                d.runs.len(),
                d.runs.join(", ")
            )?;
        }
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_retention_needs_its_unit() {
        let e = super::parse_retention("7").unwrap_err();
        assert!(e.contains("7d"), "{e}");
        assert_eq!(
            super::parse_retention("7d").unwrap(),
            std::time::Duration::from_secs(7 * 86_400)
        );
        assert!(super::parse_retention("0").unwrap().is_zero());
        assert!(super::parse_retention("0s").unwrap().is_zero());
    }
}
