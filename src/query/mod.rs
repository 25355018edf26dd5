//! DataFusion over a written dataset: one table per view, named by the view's `name`.
//!
//! Only files of runs that published a manifest are read: each table is a listing table over
//! `<view>/` with the `export` partition column, restricted to the partitions of finished runs
//! (partition pruning makes that free). DataFusion's JSON functions (`json_get_str(resource,
//! 'code', 'text')`, …) are registered so that queries can reach any field of the raw
//! `resource` column.
//!
//! # Example
//! ```no_run
//! # async fn f() -> flatfhir::Result<()> {
//! use flatfhir::{query::Dataset, sink::DatasetLocation};
//! let ds = Dataset::open(&DatasetLocation::resolve("out", false)?).await?;
//! let batches = ds.sql("select gender, count(*) from patient group by gender").await?;
//! # Ok(()) }
//! ```

use std::{collections::BTreeMap, sync::Arc};

use datafusion::{
    arrow::{datatypes::DataType, record_batch::RecordBatch},
    datasource::{
        file_format::parquet::ParquetFormat,
        listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl},
    },
    error::DataFusionError,
    prelude::{SessionContext, col, lit},
};

use crate::sink::{DatasetLocation, PARTITION_COLUMN, RunManifest, SinkError};

/// Errors querying a dataset.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The dataset could not be listed or its manifests read.
    #[error(transparent)]
    Dataset(#[from] SinkError),
    /// DataFusion rejected or failed the query.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
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
    runs: Vec<RunManifest>,
}

impl Dataset {
    /// Open a dataset: read its run manifests and register one table per view.
    pub async fn open(location: &DatasetLocation) -> Result<Dataset, QueryError> {
        let runs = RunManifest::list(location).await?;
        let mut ctx = SessionContext::new();
        datafusion_functions_json::register_all(&mut ctx)?;
        let mut per_view: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
        for run in &runs {
            for f in &run.files {
                let e = per_view.entry(f.view.clone()).or_default();
                if !e.0.contains(&run.export) {
                    e.0.push(run.export.clone());
                }
                e.1 += f.rows;
            }
        }
        let mut tables = Vec::new();
        for (view, (exports, rows)) in per_view {
            let url = location
                .url
                .join(&format!("{view}/"))
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            let table_url = ListingTableUrl::parse(url.as_str())?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
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
            let df = df.filter(filter)?;
            ctx.register_table(view.as_str(), df.into_view())?;
            tables.push(TableInfo {
                name: view,
                exports,
                rows,
            });
        }
        Ok(Dataset { ctx, tables, runs })
    }

    /// The DataFusion session, for anything beyond [`sql`](Self::sql).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registered tables.
    pub fn tables(&self) -> &[TableInfo] {
        &self.tables
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
