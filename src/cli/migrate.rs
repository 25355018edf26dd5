//! `flatfhir migrate`: a dataset of the layout before Delta Lake into Delta tables, in place.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use flatfhir::dataset::{DatasetLocation, migrate::migrate};

use super::{Outcome, args::StoreArgs};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Dataset written by flatfhir before Delta Lake: a folder or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    data: String,
    #[command(flatten)]
    store: StoreArgs,
}

/// A validated migration.
pub struct MigrateConfig {
    data: String,
    location: DatasetLocation,
}

impl MigrateArgs {
    /// Resolve the dataset (no request is sent yet).
    pub fn validate(self) -> Result<MigrateConfig> {
        Ok(MigrateConfig {
            location: self.store.location(&self.data, false)?,
            data: self.data,
        })
    }
}

pub async fn run(a: MigrateConfig) -> Result<Outcome> {
    let m = migrate(&a.location).await?;
    let rows: u64 = m.rows.values().map(|r| r.1).sum();
    writeln!(
        std::io::stdout().lock(),
        "migrated {}: {} runs committed ({} already), {} files, {} tables, {rows} rows (counts checked)",
        a.data,
        m.runs,
        m.already,
        m.files,
        m.rows.len()
    )?;
    Ok(Outcome::Success)
}
