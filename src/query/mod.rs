//! DataFusion over a written dataset: every Delta table of the dataset registered under its
//! directory's name.
//!
//! * `<view>` — the history: every row of every committed run, with the `export` partition
//!   column (the run id); a Delta table partitioned by run, so `WHERE export = '…'` reads one
//!   run's files only.
//! * `<view>_latest` — the current state, a Delta table kept up to date by MERGE after each run
//!   ([`crate::dataset::current`]): for every resource id the rows of its newest version
//!   (greatest `meta.lastUpdated`, then the newest run), resources deleted by a tombstone left
//!   out, views of one resource type agreeing on the version.
//! * `_rejects`, `_deleted`, `_outcomes` — rejected lines, tombstones, server OperationOutcomes.
//!
//! Each table is read at one snapshot (its latest version, or the version [`AsOf`] asks for):
//! only files that snapshot's commits added and did not remove are read, so a crashed run's
//! parts, and the small files `compact` replaced, are never read.
//!
//! The dataset can be local or in an object store (`s3://…`, `gs://…`, `az://…`). DataFusion's
//! JSON functions (`json_get_str(resource, 'code', 'text')`, …) are registered so that queries
//! can reach any field of the raw `resource` column.
//!
//! # Example
//! ```no_run
//! # async fn f() -> flatfhir::Result<()> {
//! use flatfhir::{dataset::DatasetLocation, query::Dataset};
//! let ds = Dataset::open(&DatasetLocation::resolve("out", false)?).await?;
//! let batches = ds.sql("select gender, count(*) from patient group by gender").await?;
//! let current = ds.sql("select count(*) from patient_latest").await?;
//! # Ok(()) }
//! ```

use datafusion::{
    arrow::record_batch::RecordBatch, error::DataFusionError, prelude::SessionContext,
};

pub use crate::dataset::current::LATEST_SUFFIX;
use crate::dataset::{DatasetError, DatasetLocation, RunManifest, current::provider};

/// Errors querying a dataset.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The dataset could not be listed or its manifests read.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// DataFusion rejected or failed the query. The message is DataFusion's innermost one (a
    /// SQL typo reads `sql parser error: Expected: …`), said once: the error is kept, not
    /// chained as a source whose text would repeat it.
    #[error("{}", datafusion_message(.0))]
    DataFusion(DataFusionError),
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        QueryError::DataFusion(e)
    }
}

/// The innermost message of a DataFusion error, without backtrace.
fn datafusion_message(e: &DataFusionError) -> String {
    match e.find_root() {
        DataFusionError::SQL(parse, _) => parse.to_string(),
        root => root.strip_backtrace(),
    }
}

/// Which version of the tables to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AsOf {
    /// The latest version of every table.
    #[default]
    Latest,
    /// The state right after run `id` was published: every table at the newest version whose
    /// commit is not later than that run's last commit.
    Run(String),
    /// The state at a point in time (RFC 3339): every table at its newest version committed
    /// before it.
    Timestamp(chrono::DateTime<chrono::Utc>),
}

/// One registered table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table name.
    pub name: String,
    /// The Delta version read.
    pub version: u64,
    /// Active files in that version.
    pub files: usize,
    /// Rows in that version (from the files' statistics).
    pub rows: u64,
}

/// A dataset opened for SQL.
pub struct Dataset {
    ctx: SessionContext,
    tables: Vec<TableInfo>,
    runs: Vec<RunManifest>,
}

/// Tables whose Delta logs are read at once when a dataset is opened.
const TABLES_LOADED_AT_ONCE: usize = 8;

impl Dataset {
    /// Open a dataset at the latest version of its tables.
    pub async fn open(location: &DatasetLocation) -> Result<Dataset, QueryError> {
        Self::open_as_of(location, &AsOf::Latest).await
    }

    /// Open a dataset at the version [`AsOf`] names.
    pub async fn open_as_of(
        location: &DatasetLocation,
        as_of: &AsOf,
    ) -> Result<Dataset, QueryError> {
        crate::dataset::check_layout(location).await?;
        let runs = RunManifest::list(location).await?;
        let names = location.delta_tables().await?;
        let cutoff = match as_of {
            AsOf::Latest => None,
            AsOf::Timestamp(t) => Some(*t),
            AsOf::Run(id) => {
                let run = runs.iter().find(|r| &r.run_id == id).ok_or_else(|| {
                    DatasetError::Location {
                        location: location.url.to_string(),
                        message: format!("no published run {id}"),
                    }
                })?;
                let published = run.published.as_deref().unwrap_or(&run.finished);
                let finished = chrono::DateTime::parse_from_rfc3339(published).map_err(|e| {
                    DatasetError::Location {
                        location: location.url.to_string(),
                        message: format!("run {id}: finish time: {e}"),
                    }
                })?;
                Some(finished.with_timezone(&chrono::Utc))
            }
        };
        let mut ctx = crate::dataset::current::session();
        datafusion_functions_json::register_all(&mut ctx)?;
        // Tables load side by side (each is a listing and a few small reads of its log).
        use futures::{StreamExt, TryStreamExt};
        let loaded: Vec<(String, Option<deltalake::DeltaTable>)> = futures::stream::iter(names)
            .map(|name| async move {
                let mut builder = location.table_builder(&name)?;
                if let Some(t) = cutoff {
                    builder = builder.with_timestamp(t);
                }
                match builder.load().await {
                    Ok(t) => Ok((name, Some(t))),
                    // Created after the cutoff: not part of that state.
                    Err(_) if cutoff.is_some() => Ok((name, None)),
                    Err(source) => Err(DatasetError::Delta {
                        table: name,
                        source: Box::new(source),
                    }),
                }
            })
            .buffered(TABLES_LOADED_AT_ONCE)
            .try_collect()
            .await?;
        let mut tables = Vec::new();
        for (name, table) in loaded {
            let Some(table) = table else { continue };
            let (files, rows) = table_size(&table);
            table
                .update_datafusion_session(&ctx.state())
                .map_err(|source| DatasetError::Delta {
                    table: name.clone(),
                    source: Box::new(source),
                })?;
            ctx.register_table(name.as_str(), provider(&table, &name).await?)?;
            tables.push(TableInfo {
                version: table.version().unwrap_or_default(),
                name,
                files,
                rows,
            });
        }
        Ok(Dataset { ctx, tables, runs })
    }

    /// The DataFusion session, for anything beyond [`sql`](Self::sql).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registered tables (history, current state and the internal tables), by name.
    pub fn tables(&self) -> &[TableInfo] {
        &self.tables
    }

    /// Registered current-state tables (`<view>_latest`).
    pub fn latest_views(&self) -> Vec<String> {
        self.tables
            .iter()
            .filter(|t| t.name.ends_with(LATEST_SUFFIX))
            .map(|t| t.name.clone())
            .collect()
    }

    /// Published runs, oldest first.
    pub fn runs(&self) -> &[RunManifest] {
        &self.runs
    }

    /// Run one SQL statement and collect its result.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        Ok(self.ctx.sql(sql).await?.collect().await?)
    }
}

/// Active files and rows (from their statistics) of a loaded table.
fn table_size(t: &deltalake::DeltaTable) -> (usize, u64) {
    let Ok(snapshot) = t.snapshot() else {
        return (0, 0);
    };
    let mut files = 0;
    let mut rows = 0u64;
    for f in snapshot.log_data() {
        files += 1;
        rows += f.num_records().unwrap_or(0) as u64;
    }
    (files, rows)
}
