//! `view`: one ViewDefinition over ndjson files, rows in input order — the SQL-on-FHIR "run a
//! view" entry point. A composition of the [driver](super::Driver) with one decode thread and an
//! in-memory sink.

use std::{path::PathBuf, sync::Arc};

use datafusion::arrow::{datatypes::SchemaRef, record_batch::RecordBatch};

use super::{DriverBuilder, Input};
use crate::{
    Result,
    dataset::REJECTS_TABLE,
    flatten::DecodeStats,
    view::{CompiledView, ViewRegistry},
};

/// What a view produced.
#[derive(Debug)]
pub struct ViewOutput {
    /// The view's schema.
    pub schema: SchemaRef,
    /// Its rows, in input order.
    pub batches: Vec<RecordBatch>,
    /// Resources it could not evaluate, as `_rejects` batches (file, line, reason, raw).
    pub rejects: Vec<RecordBatch>,
    /// Counts (resources of other types are `skipped`).
    pub stats: DecodeStats,
}

/// Run `view` over `files` (resources of other types are skipped; no raw column).
pub async fn run_view(view: CompiledView, files: Vec<PathBuf>) -> Result<ViewOutput> {
    let name = view.name().to_string();
    let schema = view.schema().clone();
    let mut registry = ViewRegistry::empty().with_raw(false);
    registry.insert_compiled(view);
    let driver = DriverBuilder::new(Arc::new(registry))
        .with_only_viewed_types(true)
        .build();
    let inputs = files.into_iter().map(Input::file).collect();
    let decoded = driver.run(inputs, Vec::new()).await?;
    let (mut batches, mut rejects) = (Vec::new(), Vec::new());
    for b in decoded.sink {
        if *b.view == *name {
            batches.push(b.batch);
        } else if &*b.view == REJECTS_TABLE {
            rejects.push(b.batch);
        }
    }
    Ok(ViewOutput {
        schema,
        batches,
        rejects,
        stats: decoded.stats,
    })
}
