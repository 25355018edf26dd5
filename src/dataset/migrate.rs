//! Convert a dataset written before Delta Lake (plain Parquet, visibility by `_runs/` records and
//! `_compactions/` swaps) into Delta tables in place: every published run's live files are
//! committed as that run (oldest first, so current state is rebuilt in order), and the rows each
//! table then holds are checked against the files' row counts. No data file is rewritten or moved.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{DatasetError, DatasetLocation, PARTITION_COLUMN, RunManifest, WrittenFile};

/// Directory of the old layout's compaction records.
const COMPACTIONS_DIR: &str = "_compactions";

/// What [`migrate`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Migrated {
    /// Runs committed to Delta tables.
    pub runs: usize,
    /// Runs that were already committed (a migration resumed, or a new-layout dataset).
    pub already: usize,
    /// Files committed.
    pub files: usize,
    /// Rows per table, as the old files count them and as the Delta tables now hold them.
    pub rows: BTreeMap<String, (u64, u64)>,
}

#[derive(Deserialize)]
struct OldCompaction {
    #[serde(default)]
    finished: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    partitions: Vec<OldPartition>,
}

#[derive(Deserialize)]
struct OldPartition {
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    added: Vec<WrittenFile>,
}

/// Convert the dataset at `location` in place (see the module docs). Safe to run again: runs
/// already committed are skipped.
pub async fn migrate(location: &DatasetLocation) -> Result<Migrated, DatasetError> {
    let runs = RunManifest::list(location).await?;
    let mut compactions: Vec<OldCompaction> = location.list_json(COMPACTIONS_DIR).await?;
    compactions.sort_by(|a, b| (&a.finished, &a.id).cmp(&(&b.finished, &b.id)));
    // The files the old reader read: the runs' files, minus those compactions replaced, plus theirs.
    let mut live: BTreeMap<String, WrittenFile> = runs
        .iter()
        .flat_map(|r| r.files.iter())
        .map(|f| (f.path.clone(), f.clone()))
        .collect();
    for c in &compactions {
        for p in &c.partitions {
            for r in &p.removed {
                live.remove(r);
            }
            for a in &p.added {
                live.insert(a.path.clone(), a.clone());
            }
        }
    }
    let mut by_run: BTreeMap<String, Vec<WrittenFile>> = BTreeMap::new();
    let mut out = Migrated::default();
    for f in live.into_values() {
        let export = f
            .path
            .split('/')
            .find_map(|s| s.strip_prefix(&format!("{PARTITION_COLUMN}=")))
            .unwrap_or_default()
            .to_string();
        out.rows.entry(f.view.clone()).or_default().0 += f.rows;
        by_run.entry(export).or_default().push(f);
    }
    for mut run in runs {
        if !run.committed.is_empty() {
            out.already += 1;
            continue;
        }
        run.files = by_run.remove(&run.export).unwrap_or_default();
        out.files += run.files.len();
        run.publish(location).await?;
        out.runs += 1;
    }
    for (table, rows) in out.rows.iter_mut() {
        if let Some(t) = location.open_table(table).await? {
            let snapshot = t.snapshot().map_err(|source| DatasetError::Delta {
                table: table.clone(),
                source: Box::new(source),
            })?;
            rows.1 = snapshot
                .log_data()
                .into_iter()
                .map(|f| f.num_records().unwrap_or(0) as u64)
                .sum();
        }
    }
    if let Some((table, (old, new))) = out.rows.iter().find(|(_, (a, b))| a != b) {
        return Err(DatasetError::Location {
            location: location.url.to_string(),
            message: format!(
                "after migrating, table {table} holds {new} rows where the old files held {old}"
            ),
        });
    }
    Ok(out)
}
