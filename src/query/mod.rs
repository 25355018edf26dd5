//! DataFusion over a written dataset: one table per view, named by the view's `name`, plus a
//! `<name>_latest` view of the current state.
//!
//! * `<view>` — every row of every published run, with the `export` partition column. It is a
//!   listing table over `<view>/` restricted to the `export=` partitions of published runs
//!   (partition pruning makes that free) and to their live files ([`live::LiveFiles`]: a crashed
//!   run's parts, staged files and files replaced by `flatfhir compact` are never read).
//! * `<view>_latest` — for every resource id, the rows of its newest version: the run whose row
//!   in the resource type's base view has the greatest `meta.lastUpdated`, then the newest run
//!   (`export`); resources deleted in that run or a later one (the `_deleted` table of tombstones
//!   that exports record from the server's `deleted` files) are left out. Views of the same
//!   resource type (`patient`, `patient_name`, …) agree on the version they show.
//!
//! The dataset can be local or in an object store (`s3://…`, `gs://…`, `az://…`): the store is
//! registered with DataFusion under [`DATASET_URL`]. DataFusion's JSON functions
//! (`json_get_str(resource, 'code', 'text')`, …) are registered so that queries can reach any
//! field of the raw `resource` column.
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

pub mod live;

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use datafusion::{
    arrow::{datatypes::DataType, record_batch::RecordBatch},
    catalog::TableProvider,
    datasource::{
        file_format::parquet::ParquetFormat,
        listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl},
    },
    error::DataFusionError,
    prelude::{SessionContext, col, lit},
};
use object_store::{ObjectStore, path::Path, prefix::PrefixStore};

use crate::dataset::{
    CompactionManifest, DELETED_TABLE, DatasetError, DatasetLocation, PARTITION_COLUMN,
    RunManifest, ViewKey, live_files,
};

/// Where the dataset's store is registered in the session (`<view>/` tables live below it).
pub const DATASET_URL: &str = "flatfhir://dataset/";
/// Suffix of the current-state views.
pub const LATEST_SUFFIX: &str = "_latest";

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

/// One registered table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table name.
    pub name: String,
    /// Finished exports (partition values) it covers.
    pub exports: Vec<String>,
    /// Rows according to the run manifests.
    pub rows: u64,
}

/// A dataset opened for SQL.
pub struct Dataset {
    ctx: SessionContext,
    tables: Vec<TableInfo>,
    latest: Vec<String>,
    runs: Vec<RunManifest>,
    compactions: Vec<CompactionManifest>,
}

impl Dataset {
    /// Open a dataset: read its run manifests and register one table per view, plus the
    /// `<view>_latest` views.
    pub async fn open(location: &DatasetLocation) -> Result<Dataset, QueryError> {
        let runs = RunManifest::list(location).await?;
        let compactions = CompactionManifest::list(location).await?;
        let live = live_files(&runs, &compactions);
        // Strings are read as written (Utf8, not Utf8View), so files that `compact` rewrites from
        // query results keep the schema of the files beside them.
        let mut config = datafusion::prelude::SessionConfig::new();
        config
            .options_mut()
            .execution
            .parquet
            .schema_force_view_types = false;
        let mut ctx = SessionContext::new_with_config(config);
        datafusion_functions_json::register_all(&mut ctx)?;
        let root: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(
            location.store.clone(),
            location.prefix.clone(),
        ));
        let live_paths: HashSet<Path> = live.keys().map(|p| Path::from(p.as_str())).collect();
        let dataset_url = url::Url::parse(DATASET_URL).expect("a valid constant URL");
        ctx.register_object_store(
            &dataset_url,
            Arc::new(live::LiveFiles::new(root, live_paths)),
        );

        let mut per_view: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
        for f in live.values() {
            let Some(export) = f
                .path
                .split('/')
                .find_map(|s| s.strip_prefix(&format!("{PARTITION_COLUMN}=")))
            else {
                continue;
            };
            let e = per_view.entry(f.view.clone()).or_default();
            if !e.0.iter().any(|x| x == export) {
                e.0.push(export.to_string());
            }
            e.1 += f.rows;
        }
        let mut tables = Vec::new();
        let mut providers: BTreeMap<String, Arc<dyn TableProvider>> = BTreeMap::new();
        for (view, (mut exports, rows)) in per_view {
            exports.sort();
            let table_url = ListingTableUrl::parse(format!("{DATASET_URL}{view}/"))?;
            let format = ParquetFormat::default().with_force_view_types(false);
            let options = ListingOptions::new(Arc::new(format))
                .with_file_extension(".parquet")
                .with_table_partition_cols(vec![(PARTITION_COLUMN.to_string(), DataType::Utf8)]);
            let schema = options.infer_schema(&ctx.state(), &table_url).await?;
            let config = ListingTableConfig::new(table_url)
                .with_listing_options(options)
                .with_schema(schema);
            let table = Arc::new(ListingTable::try_new(config)?);
            let df = ctx.read_table(table)?;
            let filter = col(PARTITION_COLUMN)
                .in_list(exports.iter().map(|e| lit(e.as_str())).collect(), false);
            let provider = df.filter(filter)?.into_view();
            ctx.register_table(view.as_str(), provider.clone())?;
            providers.insert(view.clone(), provider);
            tables.push(TableInfo {
                name: view,
                exports,
                rows,
            });
        }
        let mut keys: BTreeMap<String, ViewKey> = BTreeMap::new();
        for run in &runs {
            keys.extend(run.view_keys.clone()); // oldest first: the newest description wins
        }
        let mut latest = Vec::new();
        for (name, provider) in latest_views(&providers, &keys).await? {
            if providers.contains_key(&name) {
                tracing::warn!(view = %name, "a view has the name of a _latest view; not shadowed");
                continue;
            }
            ctx.register_table(name.as_str(), provider)?;
            latest.push(name);
        }
        Ok(Dataset {
            ctx,
            tables,
            latest,
            runs,
            compactions,
        })
    }

    /// The DataFusion session, for anything beyond [`sql`](Self::sql).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registered tables.
    pub fn tables(&self) -> &[TableInfo] {
        &self.tables
    }

    /// Registered `<view>_latest` views.
    pub fn latest_views(&self) -> &[String] {
        &self.latest
    }

    /// Published runs, oldest first.
    pub fn runs(&self) -> &[RunManifest] {
        &self.runs
    }

    /// Published compactions, oldest first.
    pub fn compactions(&self) -> &[CompactionManifest] {
        &self.compactions
    }

    /// Run one SQL statement and collect its result.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        Ok(self.ctx.sql(sql).await?.collect().await?)
    }
}

/// `"name"` with quotes doubled.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with quotes doubled.
fn string_lit(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Build the `<view>_latest` views. The plans are built in a scratch session in which the tables
/// have plain names (`t0`, `t1`, `tombstones`), so view names need no quoting rules; the
/// resulting views hold their tables, not names, and are registered in the real session.
async fn latest_views(
    providers: &BTreeMap<String, Arc<dyn TableProvider>>,
    keys: &BTreeMap<String, ViewKey>,
) -> Result<Vec<(String, Arc<dyn TableProvider>)>, QueryError> {
    let scratch = SessionContext::new();
    let has_column = |view: &str, c: &Option<String>| {
        c.as_ref().is_some_and(|c| {
            providers
                .get(view)
                .is_some_and(|p| p.schema().column_with_name(c).is_some())
        })
    };
    // Views with a usable id column, by resource type.
    let mut by_resource: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (view, key) in keys {
        if has_column(view.as_str(), &key.id_column) {
            by_resource
                .entry(key.resource.as_str())
                .or_default()
                .push(view.as_str());
        }
    }
    let tombstones = providers.get(DELETED_TABLE).filter(|p| {
        ["resource_type", "id"]
            .iter()
            .all(|c| p.schema().column_with_name(c).is_some())
    });
    if let Some(t) = tombstones {
        scratch.register_table("tombstones", t.clone())?;
    }
    let mut out = Vec::new();
    let mut n = 0;
    for (resource, views) in by_resource {
        // The view whose rows decide the version: the base view (named after the resource
        // type, with lastUpdated), else any view with lastUpdated, else the first one.
        let base_name = crate::view::snake_case(resource);
        let with_lu: Vec<&str> = views
            .iter()
            .copied()
            .filter(|v| has_column(v, &keys[*v].last_updated_column))
            .collect();
        let base = with_lu
            .iter()
            .find(|v| **v == base_name)
            .or(with_lu.first())
            .or(views.first())
            .copied()
            .expect("at least one view per resource type");
        let base_key = &keys[base];
        let base_table = format!("t{n}");
        n += 1;
        scratch.register_table(base_table.as_str(), providers[base].clone())?;
        let id = quote(base_key.id_column.as_deref().expect("checked"));
        let order = match base_key
            .last_updated_column
            .as_deref()
            .filter(|_| has_column(base, &base_key.last_updated_column))
        {
            Some(lu) => format!("{} DESC NULLS LAST, export DESC", quote(lu)),
            None => "export DESC".to_string(),
        };
        // A tombstone hides the versions of its own run and of earlier runs.
        let deleted = if tombstones.is_some() {
            format!(
                "LEFT JOIN (SELECT id, max(export) AS deleted_in FROM tombstones \
                 WHERE resource_type = {} GROUP BY id) d ON d.id = w.key \
                 WHERE w.rn = 1 AND (d.deleted_in IS NULL OR d.deleted_in < w.export)",
                string_lit(resource)
            )
        } else {
            "WHERE w.rn = 1".to_string()
        };
        let winners = format!(
            "SELECT w.key, w.export FROM (SELECT {id} AS key, export, row_number() OVER \
             (PARTITION BY {id} ORDER BY {order}) AS rn FROM {base_table} WHERE {id} IS NOT NULL) w \
             {deleted}"
        );
        for view in views {
            let table = format!("t{n}");
            n += 1;
            scratch.register_table(table.as_str(), providers[view].clone())?;
            let vid = quote(keys[view].id_column.as_deref().expect("checked"));
            let sql = format!(
                "SELECT v.* FROM {table} v JOIN ({winners}) cur \
                 ON v.{vid} = cur.key AND v.export = cur.export"
            );
            let df = scratch.sql(&sql).await?;
            out.push((format!("{view}{LATEST_SUFFIX}"), df.into_view()));
        }
    }
    Ok(out)
}
