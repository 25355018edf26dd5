//! Current state as real Delta tables: `<view>_latest`, kept up to date by MERGE after each run,
//! so an engine that reads `DIR/patient_latest/` gets what `flatfhir query` gives without
//! recomputing a window over every run at every query.
//!
//! Per resource id the current version is the newest one (greatest `meta.lastUpdated`, then the
//! newest run), unless a tombstone (`_deleted`) of that run or a later one removed the resource.
//! The version is decided on the resource type's *base* view (the view named after the type, or
//! any view with `meta.lastUpdated`); every view of the type then shows the rows of that version,
//! a child view's rows of a resource (`patient_name`, …) being replaced as a whole.
//!
//! After run `e` committed its rows to the history tables, for each resource type it wrote or
//! deleted:
//!
//! 1. the base view's current table is merged: the keys whose newest version is now `e`'s get
//!    their rows replaced by `e`'s rows; keys `e` deleted are removed;
//! 2. each other view's current table is merged from the base table as it now is: for the keys
//!    `e` touched, the rows of the version the base table holds (read from the history table's
//!    partition of that run).
//!
//! Every merge carries the `txn` app id [`CURRENT_APP_ID`], so two writers updating the same
//! current table at once conflict and the loser recomputes from the winner's state — the base
//! table is read after the view's snapshot is taken, so the last writer of every table sees the
//! final versions.

use std::{collections::BTreeMap, sync::Arc};

use datafusion::{
    arrow::datatypes::{DataType, Field, Schema},
    catalog::TableProvider,
    common::ScalarValue,
    error::DataFusionError,
    prelude::{DataFrame, SessionContext, col, lit},
};
use deltalake::{
    DeltaTable, DeltaTableError,
    kernel::{Transaction, transaction::CommitProperties},
};

use super::{
    DELETED_TABLE, DatasetError, DatasetLocation, RunManifest, ViewKey,
    delta::{
        COMMIT_RUN_KEY, MAX_COMMIT_ATTEMPTS, commit_info, create_table_with, is_conflict,
        verify_commit,
    },
};

/// Suffix of the current-state tables.
pub const LATEST_SUFFIX: &str = "_latest";
/// App id of the `txn` action every current-state merge carries.
pub const CURRENT_APP_ID: &str = "flatfhir.current";
/// Column of a merge's source holding the key of a target row to delete (null on rows to insert).
const MERGE_KEY: &str = "__flatfhir_merge_key";

/// Errors of the current-state maintenance, attributed to a table.
fn df_err(table: &str) -> impl Fn(DataFusionError) -> DatasetError + '_ {
    move |e| DatasetError::Delta {
        table: table.to_string(),
        source: DeltaTableError::from(e),
    }
}

/// One resource type's views: the base view deciding versions, and the others.
#[derive(Debug, Clone)]
pub struct TypeViews {
    /// FHIR resource type.
    pub resource: String,
    /// The base view and its keys.
    pub base: (String, ViewKey),
    /// Every other view with an id column.
    pub others: Vec<(String, ViewKey)>,
}

/// Group views by resource type and choose each type's base view: the view named after the type
/// with a `meta.lastUpdated` column, else any view with one, else the first. Views without an id
/// column have no current state.
pub fn type_views(keys: &BTreeMap<String, ViewKey>) -> Vec<TypeViews> {
    let mut by_type: BTreeMap<&str, Vec<(&String, &ViewKey)>> = BTreeMap::new();
    for (view, key) in keys {
        if key.id_column.is_some() && !view.ends_with(LATEST_SUFFIX) {
            by_type.entry(&key.resource).or_default().push((view, key));
        }
    }
    let mut out = Vec::new();
    for (resource, views) in by_type {
        let name = crate::view::snake_case(resource);
        let with_lu = |v: &&(&String, &ViewKey)| v.1.last_updated_column.is_some();
        let base = views
            .iter()
            .filter(with_lu)
            .find(|v| *v.0 == name)
            .or_else(|| views.iter().find(with_lu))
            .or(views.first())
            .expect("at least one view per type");
        let base = (base.0.clone(), base.1.clone());
        let others = views
            .iter()
            .filter(|v| *v.0 != base.0)
            .map(|v| (v.0.clone(), v.1.clone()))
            .collect();
        out.push(TypeViews {
            resource: resource.to_string(),
            base,
            others,
        });
    }
    out
}

/// Bring the current tables of every resource type `run` wrote or deleted up to date. Returns the
/// current tables merged.
pub async fn update_current(
    location: &DatasetLocation,
    run: &RunManifest,
    keys: &BTreeMap<String, ViewKey>,
) -> Result<Vec<String>, DatasetError> {
    use futures::{StreamExt, TryStreamExt};
    let written: std::collections::BTreeSet<&str> =
        run.files.iter().map(|f| f.view.as_str()).collect();
    let types: Vec<TypeViews> = type_views(keys)
        .into_iter()
        .filter(|tv| written.contains(tv.base.0.as_str()) || run.deleted > 0)
        .collect();
    // Resource types are independent: their merges run side by side, one per core.
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let merged: Vec<Vec<String>> = futures::stream::iter(types)
        .map(|tv| async move { update_type_retrying(location, run, &tv).await })
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    let mut merged: Vec<String> = merged.into_iter().flatten().collect();
    merged.sort();
    Ok(merged)
}

/// [`update_type`], recomputed from the winner's state when a merge lost a race.
async fn update_type_retrying(
    location: &DatasetLocation,
    run: &RunManifest,
    tv: &TypeViews,
) -> Result<Vec<String>, DatasetError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match update_type(location, run, tv).await {
            Ok(tables) => return Ok(tables),
            Err(DatasetError::Delta { source, table })
                if is_conflict(&source) && attempt < MAX_COMMIT_ATTEMPTS =>
            {
                tracing::debug!(%table, attempt, error = %source, "current-state merge lost a race; recomputing");
            }
            Err(e) => return Err(e),
        }
    }
}

/// A session reading the dataset's Delta tables.
fn session() -> SessionContext {
    let mut config = datafusion::prelude::SessionConfig::new();
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    SessionContext::new_with_config(config)
}

/// A table's provider at its latest version, registered in `ctx` under `name`; `None` when the
/// table does not exist.
async fn register(
    ctx: &SessionContext,
    location: &DatasetLocation,
    table: &str,
    name: &str,
) -> Result<Option<DeltaTable>, DatasetError> {
    let Some(t) = location.open_table(table).await? else {
        return Ok(None);
    };
    let provider = provider(&t, table).await?;
    t.update_datafusion_session(&ctx.state())
        .map_err(|source| DatasetError::Delta {
            table: table.to_string(),
            source,
        })?;
    ctx.register_table(name, provider).map_err(df_err(table))?;
    Ok(Some(t))
}

/// DataFusion's view of a loaded Delta table.
pub async fn provider(t: &DeltaTable, table: &str) -> Result<Arc<dyn TableProvider>, DatasetError> {
    t.table_provider().await.map_err(|e| DatasetError::Delta {
        table: table.to_string(),
        source: e.into(),
    })
}

/// `'text'` with quotes doubled.
fn string_lit(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `"name"` with quotes doubled.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Update the current tables of one resource type for `run` (see the module docs).
async fn update_type(
    location: &DatasetLocation,
    run: &RunManifest,
    tv: &TypeViews,
) -> Result<Vec<String>, DatasetError> {
    let e = string_lit(&run.export);
    let (base, base_key) = (&tv.base.0, &tv.base.1);
    let id = quote(
        base_key
            .id_column
            .as_deref()
            .expect("views with an id column only"),
    );
    let ctx = session();
    let err = df_err(base);
    if register(&ctx, location, base, "hist_b").await?.is_none() {
        return Ok(Vec::new());
    }
    let has_tombs = register(&ctx, location, DELETED_TABLE, "tomb")
        .await?
        .is_some();
    let latest_b = format!("{base}{LATEST_SUFFIX}");
    let cur_b = match register(&ctx, location, &latest_b, "cur_b").await? {
        Some(t) => t,
        None => create_latest(location, base, &latest_b).await?,
    };
    let hist_schema = ctx.table_provider("hist_b").await.map_err(&err)?.schema();
    let lu_col = base_key
        .last_updated_column
        .as_deref()
        .filter(|c| hist_schema.column_with_name(c).is_some())
        .map(quote);
    let lu = lu_col
        .clone()
        .unwrap_or_else(|| "CAST(NULL AS VARCHAR)".into());
    let resource = string_lit(&tv.resource);
    // Tombstones per key: the newest run that deleted it.
    let tombs = if has_tombs {
        format!(
            "SELECT id, max(export) AS d FROM tomb WHERE resource_type = {resource} GROUP BY id"
        )
    } else {
        "SELECT CAST(NULL AS VARCHAR) AS id, CAST(NULL AS VARCHAR) AS d WHERE false".into()
    };
    let cur_lu = lu_col
        .clone()
        .unwrap_or_else(|| "CAST(NULL AS VARCHAR)".into());
    let cur = if ctx.table_exist("cur_b").unwrap_or(false) {
        format!(
            "SELECT {id} AS k, max({cur_lu}) AS lu, max(export) AS export FROM cur_b GROUP BY {id}"
        )
    } else {
        "SELECT CAST(NULL AS VARCHAR) AS k, CAST(NULL AS VARCHAR) AS lu, CAST(NULL AS VARCHAR) AS export WHERE false".into()
    };
    // Keys whose newest version is now this run's.
    let wins = format!(
        "SELECT r.k FROM (SELECT {id} AS k, max({lu}) AS lu FROM hist_b \
         WHERE export = {e} AND {id} IS NOT NULL GROUP BY {id}) r \
         LEFT JOIN ({cur}) c ON c.k = r.k LEFT JOIN ({tombs}) t ON t.id = r.k \
         WHERE (t.d IS NULL OR t.d < {e}) AND (c.k IS NULL \
           OR (r.lu IS NOT NULL AND (c.lu IS NULL OR r.lu > c.lu)) \
           OR ((r.lu = c.lu OR (r.lu IS NULL AND c.lu IS NULL)) AND {e} >= c.export))"
    );
    // Keys this run deleted whose current version is not newer than the tombstone.
    let deletes = if has_tombs {
        format!(
            "SELECT c.k FROM ({cur}) c JOIN (SELECT DISTINCT id FROM tomb WHERE export = {e} \
             AND resource_type = {resource}) t ON t.id = c.k WHERE c.export <= {e}"
        )
    } else {
        "SELECT CAST(NULL AS VARCHAR) AS k WHERE false".into()
    };
    let wins = ctx
        .sql(&wins)
        .await
        .map_err(&err)?
        .collect()
        .await
        .map_err(&err)?;
    let deletes = ctx
        .sql(&deletes)
        .await
        .map_err(&err)?
        .collect()
        .await
        .map_err(&err)?;
    let n_wins: usize = wins.iter().map(|b| b.num_rows()).sum();
    let n_deletes: usize = deletes.iter().map(|b| b.num_rows()).sum();
    if n_wins + n_deletes == 0 {
        return Ok(Vec::new());
    }
    ctx.register_batch("wins", concat(&wins).map_err(&err)?)
        .map_err(&err)?;
    ctx.register_batch("dels", concat(&deletes).map_err(&err)?)
        .map_err(&err)?;
    let mut merged = Vec::new();

    // 1. The base view.
    let inserts = ctx
        .sql(&format!(
            "SELECT h.* FROM hist_b h JOIN wins w ON h.{id} = w.k WHERE h.export = {e}"
        ))
        .await
        .map_err(&err)?;
    let keys = ctx
        .sql("SELECT k FROM wins UNION ALL SELECT k FROM dels")
        .await
        .map_err(&err)?;
    let id_name = base_key.id_column.clone().expect("checked");
    merge_into(
        location, &ctx, cur_b, &latest_b, &id_name, inserts, keys, run,
    )
    .await?;
    merged.push(latest_b.clone());

    // 2. The other views, from the base table as it now is.
    for (view, key) in &tv.others {
        let latest_v = format!("{view}{LATEST_SUFFIX}");
        let vctx = session();
        let verr = df_err(view);
        if register(&vctx, location, view, "hist_v").await?.is_none() {
            continue;
        }
        let cur_v = match register(&vctx, location, &latest_v, "cur_v").await? {
            Some(t) => t,
            None => create_latest(location, view, &latest_v).await?,
        };
        // Read after the view's snapshot was taken (see the module docs).
        register(&vctx, location, &latest_b, "cur_b").await?;
        vctx.register_batch("wins", concat(&wins).map_err(&verr)?)
            .map_err(&verr)?;
        vctx.register_batch("dels", concat(&deletes).map_err(&verr)?)
            .map_err(&verr)?;
        let touched = "SELECT k FROM wins UNION SELECT k FROM dels";
        let versions = vctx
            .sql(&format!(
                "SELECT c.{id} AS k, max(c.export) AS export FROM cur_b c \
                 JOIN ({touched}) t ON t.k = c.{id} GROUP BY c.{id}"
            ))
            .await
            .map_err(&verr)?
            .collect()
            .await
            .map_err(&verr)?;
        let exports: std::collections::BTreeSet<String> = versions
            .iter()
            .flat_map(|b| {
                let a = b
                    .column_by_name("export")
                    .map(|c| datafusion::arrow::compute::cast(c, &DataType::Utf8))
                    .and_then(Result::ok);
                a.map(|a| {
                    use datafusion::arrow::array::AsArray;
                    a.as_string::<i32>()
                        .iter()
                        .flatten()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .collect();
        vctx.register_batch("versions", concat(&versions).map_err(&verr)?)
            .map_err(&verr)?;
        let vid = quote(
            key.id_column
                .as_deref()
                .expect("views with an id column only"),
        );
        let in_list = if exports.is_empty() {
            "false".to_string()
        } else {
            format!(
                "h.export IN ({})",
                exports
                    .iter()
                    .map(|x| string_lit(x))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let inserts = vctx
            .sql(&format!(
                "SELECT h.* FROM hist_v h JOIN versions v ON h.{vid} = v.k AND h.export = v.export \
                 WHERE {in_list}"
            ))
            .await
            .map_err(&verr)?;
        let keys = vctx.sql(touched).await.map_err(&verr)?;
        let vid_name = key.id_column.clone().expect("checked");
        merge_into(
            location, &vctx, cur_v, &latest_v, &vid_name, inserts, keys, run,
        )
        .await?;
        merged.push(latest_v);
    }
    Ok(merged)
}

/// One record batch of `batches` (an empty one of a one-column key schema when there are none).
fn concat(
    batches: &[datafusion::arrow::record_batch::RecordBatch],
) -> Result<datafusion::arrow::record_batch::RecordBatch, DataFusionError> {
    match batches.first() {
        Some(b) => Ok(datafusion::arrow::compute::concat_batches(
            &b.schema(),
            batches,
        )?),
        None => Ok(datafusion::arrow::record_batch::RecordBatch::new_empty(
            Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, true)])),
        )),
    }
}

/// Create the current table of `view` with the history table's schema (`export` a plain column).
async fn create_latest(
    location: &DatasetLocation,
    view: &str,
    latest: &str,
) -> Result<DeltaTable, DatasetError> {
    let hist = location
        .open_table(view)
        .await?
        .ok_or_else(|| DatasetError::Location {
            location: location.table_url(view).to_string(),
            message: "the history table is missing".into(),
        })?;
    let snapshot = hist.snapshot().map_err(|source| DatasetError::Delta {
        table: view.to_string(),
        source,
    })?;
    create_table_with(location, latest, &snapshot.schema(), false).await
}

/// MERGE into `target` (table `table`): delete every row whose `id` is one of `keys`, then insert
/// `inserts` — in one commit carrying [`CURRENT_APP_ID`]. The source is the union of the rows to
/// insert (merge key null: never matched) and the keys to delete (every other column null).
#[allow(clippy::too_many_arguments)]
async fn merge_into(
    location: &DatasetLocation,
    ctx: &SessionContext,
    target: DeltaTable,
    table: &str,
    id: &str,
    inserts: DataFrame,
    keys: DataFrame,
    run: &RunManifest,
) -> Result<(), DatasetError> {
    let err = df_err(table);
    let schema = inserts.schema().as_arrow().clone();
    let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let inserts = inserts
        .with_column(MERGE_KEY, lit(ScalarValue::Utf8(None)))
        .map_err(&err)?;
    let mut null_row = Vec::with_capacity(columns.len() + 1);
    for f in schema.fields() {
        let null = ScalarValue::try_from(f.data_type()).map_err(&err)?;
        null_row.push(lit(null).alias(f.name()));
    }
    null_row
        .push(datafusion::functions::expr_fn::arrow_cast(col("k"), lit("Utf8")).alias(MERGE_KEY));
    let deletes = keys.select(null_row).map_err(&err)?;
    let source = inserts.union(deletes).map_err(&err)?;
    let version = target.version().map_or(0, |v| v as i64 + 1);
    let props = CommitProperties::default()
        .with_metadata(commit_info(run))
        .with_application_transaction(Transaction::new(CURRENT_APP_ID, version));
    let predicate = datafusion::prelude::Expr::Column(datafusion::common::Column::new(
        Some("target"),
        id,
    ))
    .eq(datafusion::prelude::Expr::Column(
        datafusion::common::Column::new(Some("source"), MERGE_KEY),
    ));
    target
        .update_datafusion_session(&ctx.state())
        .map_err(|source| DatasetError::Delta {
            table: table.to_string(),
            source,
        })?;
    let merge = target
        .merge(source, predicate)
        .with_session_state(Arc::new(ctx.state()))
        .with_source_alias("source")
        .with_target_alias("target")
        .with_commit_properties(props)
        .when_matched_delete(|d| d)
        .map_err(|source| DatasetError::Delta {
            table: table.to_string(),
            source,
        })?
        .when_not_matched_insert(|mut i| {
            i = i.predicate(
                datafusion::prelude::Expr::Column(datafusion::common::Column::new(
                    Some("source"),
                    MERGE_KEY,
                ))
                .is_null(),
            );
            for c in &columns {
                i = i.set(
                    c.as_str(),
                    datafusion::prelude::Expr::Column(datafusion::common::Column::new(
                        Some("source"),
                        c.as_str(),
                    )),
                );
            }
            i
        })
        .map_err(|source| DatasetError::Delta {
            table: table.to_string(),
            source,
        })?;
    let t0 = std::time::Instant::now();
    let (merged, metrics) = merge.await.map_err(|source| DatasetError::Delta {
        table: table.to_string(),
        source,
    })?;
    tracing::debug!(
        table,
        seconds = t0.elapsed().as_secs_f32(),
        inserted = metrics.num_target_rows_inserted,
        deleted = metrics.num_target_rows_deleted,
        copied = metrics.num_target_rows_copied,
        "merged"
    );
    if let Some(v) = merged.version() {
        let needle = format!("\"{COMMIT_RUN_KEY}\":{}", serde_json::json!(run.run_id));
        if !verify_commit(location, table, v, &needle).await? {
            // Recomputed from the winner's state, like a lost race.
            return Err(DatasetError::Delta {
                table: table.to_string(),
                source: DeltaTableError::VersionAlreadyExists(v),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(resource: &str, id: &str, lu: Option<&str>) -> ViewKey {
        ViewKey {
            resource: resource.into(),
            id_column: Some(id.into()),
            last_updated_column: lu.map(Into::into),
        }
    }

    #[test]
    fn the_base_view_is_the_one_named_after_the_type() {
        let keys = BTreeMap::from([
            (
                "patient".to_string(),
                key("Patient", "id", Some("last_updated")),
            ),
            (
                "patient_name".to_string(),
                key("Patient", "patient_id", None),
            ),
            ("odd".to_string(), key("Observation", "oid", None)),
            ("obs_lu".to_string(), key("Observation", "id", Some("lu"))),
        ]);
        let tv = type_views(&keys);
        assert_eq!(tv.len(), 2);
        assert_eq!(tv[0].resource, "Observation");
        assert_eq!(tv[0].base.0, "obs_lu");
        assert_eq!(tv[1].base.0, "patient");
        assert_eq!(tv[1].others[0].0, "patient_name");
    }
}
