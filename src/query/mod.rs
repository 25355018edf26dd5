//! DataFusion over a written dataset: every Delta table of the dataset under its directory's
//! name, its log read when a query first names it (opening a dataset lists names only, so a
//! query of one table costs one table's log however many tables and runs there are).
//!
//! * `<view>` — the history: every row of every committed run, with the `export` partition
//!   column (the run id); a Delta table partitioned by run, so `WHERE export = '…'` reads one
//!   run's files only.
//! * `<view>_latest` — the current state, a Delta table kept up to date after each run
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

use std::{collections::HashMap, sync::Arc};

use datafusion::{
    arrow::record_batch::RecordBatch,
    catalog::{SchemaProvider, TableProvider},
    error::DataFusionError,
    prelude::SessionContext,
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
    schema: Arc<LazyTables>,
}

/// Tables whose Delta logs are read at once by [`Dataset::tables`].
const TABLES_LOADED_AT_ONCE: usize = 8;

impl Dataset {
    /// Open a dataset at the latest version of its tables.
    pub async fn open(location: &DatasetLocation) -> Result<Dataset, QueryError> {
        Self::open_as_of(location, &AsOf::Latest).await
    }

    /// Open a dataset at the version [`AsOf`] names. Only the table names are listed here; a
    /// table's Delta log is read when a query first names it, so a query of one table costs
    /// one table's log, however many tables and runs the dataset holds.
    pub async fn open_as_of(
        location: &DatasetLocation,
        as_of: &AsOf,
    ) -> Result<Dataset, QueryError> {
        crate::dataset::check_layout(location).await?;
        let names = location.delta_tables().await?;
        let cutoff = match as_of {
            AsOf::Latest => None,
            AsOf::Timestamp(t) => Some(*t),
            AsOf::Run(id) => {
                let no_run = || DatasetError::Location {
                    location: location.url.to_string(),
                    message: format!("no published run {id}"),
                };
                // A run id names an object: refuse one that would name another path.
                if id.is_empty() || id.contains(['/', '\\']) || id.starts_with('.') {
                    return Err(no_run().into());
                }
                let run: RunManifest = location
                    .get_json_opt(&RunManifest::path(id))
                    .await?
                    .ok_or_else(no_run)?;
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
        let schema = Arc::new(LazyTables {
            location: location.clone(),
            names,
            cutoff,
            runtime: ctx.runtime_env(),
            loaded: tokio::sync::Mutex::new(HashMap::new()),
            extra: Default::default(),
        });
        let catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| DataFusionError::Internal("no default catalog".into()))?;
        catalog.register_schema("public", schema.clone())?;
        Ok(Dataset { ctx, schema })
    }

    /// The DataFusion session, for anything beyond [`sql`](Self::sql).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The dataset's table names (history, current state and the internal tables), sorted.
    pub fn table_names(&self) -> &[String] {
        &self.schema.names
    }

    /// Every table with its version, files and rows (reads every table's log; a table created
    /// after the [`AsOf`] point is left out).
    pub async fn tables(&self) -> Result<Vec<TableInfo>, QueryError> {
        use futures::{StreamExt, TryStreamExt};
        let infos: Vec<Option<TableInfo>> = futures::stream::iter(self.schema.names.clone())
            .map(|name| async move {
                let loaded = self.schema.load(&name).await?;
                Ok::<_, QueryError>(loaded.map(|(info, _)| info))
            })
            .buffered(TABLES_LOADED_AT_ONCE)
            .try_collect()
            .await?;
        Ok(infos.into_iter().flatten().collect())
    }

    /// The current-state tables (`<view>_latest`).
    pub fn latest_views(&self) -> Vec<String> {
        self.schema
            .names
            .iter()
            .filter(|t| t.ends_with(LATEST_SUFFIX))
            .cloned()
            .collect()
    }

    /// Published runs, oldest first (every run record is read: opening the dataset reads
    /// none, so that it costs the same after 10 runs or 10,000).
    pub async fn runs(&self) -> Result<Vec<RunManifest>, QueryError> {
        Ok(RunManifest::list(&self.schema.location).await?)
    }

    /// Run one SQL statement and collect its result.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        Ok(self.ctx.sql(sql).await?.collect().await?)
    }

    /// Run one SQL statement and stream its result, batch by batch: memory stays bounded
    /// however many rows it has. An error while streaming is a [`DataFusionError`]; it
    /// converts into a [`QueryError`] (`?`), whose message is the innermost one.
    pub async fn sql_stream(
        &self,
        sql: &str,
    ) -> Result<datafusion::execution::SendableRecordBatchStream, QueryError> {
        Ok(self.ctx.sql(sql).await?.execute_stream().await?)
    }
}

/// The dataset's tables as DataFusion's default schema, each loaded on first use (at the
/// [`AsOf`] point) and kept.
#[derive(Debug)]
struct LazyTables {
    location: DatasetLocation,
    names: Vec<String>,
    cutoff: Option<chrono::DateTime<chrono::Utc>>,
    /// The session's runtime, where each table's object store is registered for its scans.
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    #[allow(clippy::type_complexity)]
    loaded: tokio::sync::Mutex<HashMap<String, Option<(TableInfo, Arc<dyn TableProvider>)>>>,
    /// Tables and views the session registers (`CREATE VIEW …` in a query script).
    extra: std::sync::Mutex<HashMap<String, Arc<dyn TableProvider>>>,
}

impl LazyTables {
    /// Load table `name` (once); `None` when it did not exist at the cutoff.
    async fn load(
        &self,
        name: &str,
    ) -> Result<Option<(TableInfo, Arc<dyn TableProvider>)>, QueryError> {
        if let Some(hit) = self.loaded.lock().await.get(name) {
            return Ok(hit.clone());
        }
        let mut builder = self.location.table_builder(name)?;
        if let Some(t) = self.cutoff {
            builder = builder.with_timestamp(t);
        }
        let delta_error = |source| DatasetError::Delta {
            table: name.to_string(),
            source: Box::new(source),
        };
        let table = match builder.load().await {
            Ok(t) => match self.cutoff {
                Some(cutoff) => existed_at(t, cutoff).await.map_err(delta_error)?,
                None => Some(t),
            },
            // Created after the cutoff: not part of that state.
            Err(_) if self.cutoff.is_some() => None,
            Err(source) => return Err(delta_error(source).into()),
        };
        let loaded = match table {
            None => None,
            Some(table) => {
                let state = datafusion::execution::SessionStateBuilder::new()
                    .with_runtime_env(self.runtime.clone())
                    .build();
                table
                    .update_datafusion_session(&state)
                    .map_err(|source| DatasetError::Delta {
                        table: name.to_string(),
                        source: Box::new(source),
                    })?;
                let (files, rows) = table_size(&table);
                let info = TableInfo {
                    name: name.to_string(),
                    version: table.version().unwrap_or_default(),
                    files,
                    rows,
                };
                Some((info, provider(&table, name).await?))
            }
        };
        self.loaded
            .lock()
            .await
            .insert(name.to_string(), loaded.clone());
        Ok(loaded)
    }
}

#[async_trait::async_trait]
impl SchemaProvider for LazyTables {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.names.clone();
        names.extend(self.extra().keys().cloned());
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if let Some(t) = self.extra().get(name) {
            return Ok(Some(t.clone()));
        }
        if !self.is_delta_table(name) {
            return Ok(None);
        }
        match self.load(name).await {
            Ok(loaded) => Ok(loaded.map(|(_, p)| p)),
            Err(QueryError::DataFusion(e)) => Err(e),
            Err(e) => Err(DataFusionError::External(Box::new(e))),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.is_delta_table(name) || self.extra().contains_key(name)
    }

    fn register_table(
        &self,
        name: String,
        table: Arc<dyn TableProvider>,
    ) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if self.is_delta_table(&name) {
            return Err(DataFusionError::Plan(format!(
                "{name} is a table of the dataset; choose another name"
            )));
        }
        Ok(self.extra().insert(name, table))
    }

    fn deregister_table(
        &self,
        name: &str,
    ) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self.extra().remove(name))
    }
}

impl LazyTables {
    fn is_delta_table(&self, name: &str) -> bool {
        self.names
            .binary_search_by(|n| n.as_str().cmp(name))
            .is_ok()
    }

    fn extra(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<dyn TableProvider>>> {
        self.extra.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A table loaded at `cutoff`, or `None` when it was created after it. delta-rs does not fail
/// for a time before a table's first commit: it loads the oldest version it has. So the
/// version loaded is checked against the cutoff (by its commit file's time, as delta-rs picks
/// versions), and a later one means the table did not exist yet, or (not version 0) that the
/// log of that time has been cleaned up, which is an error rather than a wrong answer.
async fn existed_at(
    table: deltalake::DeltaTable,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<Option<deltalake::DeltaTable>, deltalake::DeltaTableError> {
    use object_store::ObjectStoreExt;
    let Some(version) = table.version() else {
        return Ok(None);
    };
    let committed = match table.snapshot()?.version_timestamp(version) {
        Some(ms) => ms,
        None => {
            let commit = deltalake::logstore::commit_uri_from_version(Some(version));
            table
                .object_store()
                .head(&commit)
                .await?
                .last_modified
                .timestamp_millis()
        }
    };
    if committed <= cutoff.timestamp_millis() {
        Ok(Some(table))
    } else if version == 0 {
        Ok(None)
    } else {
        Err(deltalake::DeltaTableError::Generic(format!(
            "the log before version {version} has been cleaned up, so the table as of {cutoff} \
             cannot be read"
        )))
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
