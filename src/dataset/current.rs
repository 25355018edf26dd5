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
//! Every merge is a Delta `MERGE` that read the whole table and carries the `txn` app id
//! [`CURRENT_APP_ID`], so it conflicts with any commit that changed the table's files since its
//! snapshot — another writer's merge, or a compaction (`flatfhir compact`) — and the loser
//! recomputes from the winner's state. The base table is read after the view's snapshot is
//! taken, so the last writer of every table sees the final versions. A current table is created
//! by the first run of its type as version 0 or not at all (the loser recomputes as well).

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use datafusion::{
    arrow::{
        array::{AsArray, BooleanArray},
        compute,
        datatypes::{DataType, Int64Type},
        record_batch::RecordBatch,
    },
    catalog::TableProvider,
    error::DataFusionError,
    prelude::SessionContext,
};
use deltalake::{
    DeltaTable, DeltaTableError,
    kernel::{
        Action, Transaction,
        transaction::{CommitBuilder, CommitProperties},
    },
    protocol::DeltaOperation,
};

use futures::StreamExt;

use crate::sink::Upload;

use super::{
    DELETED_TABLE, DatasetError, DatasetLocation, RunIds, RunManifest, ViewKey,
    delta::{
        COMMIT_RUN_KEY, Created, MAX_COMMIT_ATTEMPTS, NewTables, commit_holds, commit_info,
        create_table_holding, create_table_with, evolve_to, is_conflict, reconcile_schema,
        verify_commit,
    },
};

/// Suffix of the current-state tables.
pub const LATEST_SUFFIX: &str = "_latest";
/// App id of the `txn` action every current-state merge carries.
pub const CURRENT_APP_ID: &str = "flatfhir.current";

/// Errors of the current-state maintenance, attributed to a table.
fn df_err(table: &str) -> impl Fn(DataFusionError) -> DatasetError + '_ {
    move |e| DatasetError::Delta {
        table: table.to_string(),
        source: Box::new(DeltaTableError::from(e)),
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

/// What a snapshot run (`export --snapshot`) removes from the current state: keys of `types`
/// whose current version came from one of `runs` (earlier runs of the same export, by `export`
/// value) and that the snapshot did not bring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotScope {
    /// `export` values of the earlier runs of the same export.
    pub runs: Vec<String>,
    /// Resource types the snapshot covers.
    pub types: std::collections::BTreeSet<String>,
}

/// Removed keys up to which a merge skips the current files whose id range holds none of them.
const RANGE_PRUNE_KEYS: usize = 100_000;

/// Resource types whose current tables are merged at once (at least; more on more cores).
const TYPES_IN_FLIGHT: usize = 8;

/// Keys (rows of a type's base view in the run) the merges in flight may hold between them. A
/// merge's memory grows with the keys its run brought (their versions, the sets of keys won
/// and touched: ~100–300 bytes each), so small types merge side by side while a type with more
/// than this merges alone: re-converting synthea ×100 (3.8 M resources) into a dataset that
/// holds it peaked at 1.2 GB with eight types at once.
const KEYS_IN_FLIGHT: u64 = 1_000_000;

/// Bring the current tables of every resource type `run` wrote or deleted (or, for a snapshot,
/// covers) up to date. Returns the current tables merged and, per type, the keys a snapshot
/// removed. `created` are the history tables that the run's commits created (the run's files
/// are all they hold, known without loading them).
pub async fn update_current(
    location: &DatasetLocation,
    run: &RunManifest,
    keys: &BTreeMap<String, ViewKey>,
    snapshot: Option<&SnapshotScope>,
    created: &NewTables,
) -> Result<(Vec<String>, BTreeMap<String, u64>), DatasetError> {
    use futures::{StreamExt, TryStreamExt};
    let written: std::collections::BTreeSet<&str> =
        run.files.iter().map(|f| f.view.as_str()).collect();
    let covered = |tv: &TypeViews| snapshot.is_some_and(|s| s.types.contains(&tv.resource));
    let types: Vec<TypeViews> = type_views(keys)
        .into_iter()
        .filter(|tv| written.contains(tv.base.0.as_str()) || run.deleted > 0 || covered(tv))
        .collect();
    // Resource types are independent: their merges run side by side. Much of a merge is
    // waiting on the store (a table's log, its files, the commit), so more run at once than
    // there are cores.
    let parallel = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(TYPES_IN_FLIGHT);
    let budget = tokio::sync::Semaphore::new(KEYS_IN_FLIGHT as usize);
    let budget = &budget;
    let merged: Vec<(Vec<String>, String, u64)> = futures::stream::iter(types)
        .map(|tv| async move {
            let keys: u64 = run
                .files
                .iter()
                .filter(|f| f.view == tv.base.0)
                .map(|f| f.rows)
                .sum();
            // A weight of at least one, and at most the whole budget (a type bigger than it
            // waits for the others to finish, then runs alone).
            let weight = keys.clamp(1, KEYS_IN_FLIGHT) as u32;
            let _held = budget
                .acquire_many(weight)
                .await
                .expect("the merge budget is never closed");
            let scope = snapshot.filter(|_| covered(&tv));
            let (tables, removed) =
                update_type_retrying(location, run, &tv, scope, created).await?;
            Ok::<_, DatasetError>((tables, tv.resource.clone(), removed))
        })
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    let mut tables = Vec::new();
    let mut removed = BTreeMap::new();
    for (t, resource, n) in merged {
        tables.extend(t);
        if n > 0 {
            removed.insert(resource, n);
        }
    }
    tables.sort();
    Ok((tables, removed))
}

/// [`update_type`], recomputed from the winner's state when a merge lost a race.
async fn update_type_retrying(
    location: &DatasetLocation,
    run: &RunManifest,
    tv: &TypeViews,
    snapshot: Option<&SnapshotScope>,
    created: &NewTables,
) -> Result<(Vec<String>, u64), DatasetError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match update_type(location, run, tv, snapshot, created).await {
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

/// The ids of `resource` that the runs `exports` brought (from the type's base history table);
/// `None` when `keys` name no base view of the type (those runs wrote none).
pub async fn resource_ids(
    location: &DatasetLocation,
    keys: &BTreeMap<String, ViewKey>,
    resource: &str,
    exports: &[String],
) -> Result<Option<HashSet<String>>, DatasetError> {
    let Some(tv) = type_views(keys)
        .into_iter()
        .find(|tv| tv.resource == resource)
    else {
        return Ok(None);
    };
    let (view, key) = &tv.base;
    let ctx = session();
    if register(&ctx, location, view, "hist").await?.is_none() || exports.is_empty() {
        return Ok(Some(HashSet::new()));
    }
    let id = quote(
        key.id_column
            .as_deref()
            .expect("views with an id column only"),
    );
    let runs: Vec<String> = exports.iter().map(|x| string_lit(x)).collect();
    let sql = format!(
        "SELECT DISTINCT {id} FROM hist WHERE {id} IS NOT NULL AND export IN ({})",
        runs.join(", ")
    );
    let err = df_err(view);
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(&err)?
        .collect()
        .await
        .map_err(&err)?;
    Ok(Some(key_set(&batches)))
}

/// A session reading the dataset's Delta tables: strings are read as written (Utf8, not
/// Utf8View), as other engines read them.
pub fn session() -> SessionContext {
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
    register_loaded(ctx, &t, table, name).await?;
    Ok(Some(t))
}

/// [`register`] for a table already loaded.
async fn register_loaded(
    ctx: &SessionContext,
    t: &DeltaTable,
    table: &str,
    name: &str,
) -> Result<(), DatasetError> {
    let provider = provider(t, table).await?;
    t.update_datafusion_session(&ctx.state())
        .map_err(|source| DatasetError::Delta {
            table: table.to_string(),
            source: Box::new(source),
        })?;
    ctx.register_table(name, provider).map_err(df_err(table))?;
    Ok(())
}

/// DataFusion's view of a loaded Delta table.
pub async fn provider(t: &DeltaTable, table: &str) -> Result<Arc<dyn TableProvider>, DatasetError> {
    t.table_provider().await.map_err(|e| DatasetError::Delta {
        table: table.to_string(),
        source: Box::new(e.into()),
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
    snapshot: Option<&SnapshotScope>,
    created: &NewTables,
) -> Result<(Vec<String>, u64), DatasetError> {
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
    // A history table the run created is loaded only if the merge needs more than its files.
    let hist_b = match created.contains_key(base.as_str()) {
        true => None,
        false => match location.open_table(base).await? {
            Some(t) => Some(t),
            None => return Ok((Vec::new(), 0)),
        },
    };
    let has_tombs = location.has_table(DELETED_TABLE).await?;
    let latest_b = format!("{base}{LATEST_SUFFIX}");
    let cur_b = location.open_table(&latest_b).await?;
    // The first run of a type (no current rows, no tombstones): it wins every key, so every
    // view's current table is its files, copied — nothing to compute.
    let empty = match &cur_b {
        Some(t) => live_files(t, &latest_b)?.is_empty(),
        None => true,
    };
    if !has_tombs && empty {
        return Ok((
            first_run(location, run, tv, created, hist_b, cur_b).await?,
            0,
        ));
    }
    let hist_b = match hist_b {
        Some(t) => t,
        None => load_history(location, base).await?,
    };
    register_loaded(&ctx, &hist_b, base, "hist_b").await?;
    if has_tombs {
        register(&ctx, location, DELETED_TABLE, "tomb").await?;
    }
    let cur_b = match cur_b {
        Some(t) => t,
        None => create_latest(location, base, &latest_b).await?,
    };
    register_loaded(&ctx, &cur_b, &latest_b, "cur_b").await?;
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
    // Every per-key aggregate below is over the keys this run brought or deleted, not over the
    // whole current table or every tombstone ever written: a nightly run of a thousand changes
    // into a table of millions of resources holds a thousand groups, not millions (it held
    // ~450 MB for 1,000 Observations into synthea ×100).
    let run_ids =
        format!("SELECT DISTINCT {id} FROM hist_b WHERE export = {e} AND {id} IS NOT NULL");
    let run_tomb_ids =
        format!("SELECT DISTINCT id FROM tomb WHERE export = {e} AND resource_type = {resource}");
    // Tombstones per key of the run: the newest run that deleted it.
    let tombs = if has_tombs {
        format!(
            "SELECT id, max(export) AS d FROM tomb WHERE resource_type = {resource} \
             AND id IN ({run_ids}) GROUP BY id"
        )
    } else {
        "SELECT CAST(NULL AS VARCHAR) AS id, CAST(NULL AS VARCHAR) AS d WHERE false".into()
    };
    let cur_lu = lu_col
        .clone()
        .unwrap_or_else(|| "CAST(NULL AS VARCHAR)".into());
    // The current version of the keys `keys` (a query of one column) selects, or of all.
    let cur = |keys: Option<&str>| {
        if ctx.table_exist("cur_b").unwrap_or(false) {
            let only = keys
                .map(|q| format!(" WHERE {id} IN ({q})"))
                .unwrap_or_default();
            format!(
                "SELECT {id} AS k, max({cur_lu}) AS lu, max(export) AS export FROM cur_b{only} \
                 GROUP BY {id}"
            )
        } else {
            "SELECT CAST(NULL AS VARCHAR) AS k, CAST(NULL AS VARCHAR) AS lu, CAST(NULL AS VARCHAR) AS export WHERE false".into()
        }
    };
    // Keys whose newest version is now this run's.
    let wins = format!(
        "SELECT r.k FROM (SELECT {id} AS k, max({lu}) AS lu FROM hist_b \
         WHERE export = {e} AND {id} IS NOT NULL GROUP BY {id}) r \
         LEFT JOIN ({}) c ON c.k = r.k LEFT JOIN ({tombs}) t ON t.id = r.k \
         WHERE (t.d IS NULL OR t.d < {e}) AND (c.k IS NULL \
           OR (r.lu IS NOT NULL AND (c.lu IS NULL OR r.lu > c.lu)) \
           OR ((r.lu = c.lu OR (r.lu IS NULL AND c.lu IS NULL)) AND {e} > c.export))",
        cur(Some(&run_ids))
    );
    // Keys this run deleted whose current version is not newer than the tombstone.
    let deletes = if has_tombs {
        format!(
            "SELECT c.k FROM ({}) c WHERE c.export <= {e}",
            cur(Some(&run_tomb_ids))
        )
    } else {
        "SELECT CAST(NULL AS VARCHAR) AS k WHERE false".into()
    };
    // A snapshot: keys whose current version an earlier run of the same export brought and
    // that this run did not.
    let absent = match snapshot.filter(|s| !s.runs.is_empty()) {
        Some(s) => {
            let runs: Vec<String> = s.runs.iter().map(|r| string_lit(r)).collect();
            // A snapshot is a full export: its aggregate is the size of the run anyway.
            format!(
                "SELECT c.k FROM ({}) c LEFT JOIN (SELECT DISTINCT {id} AS k FROM hist_b \
                 WHERE export = {e}) r ON r.k = c.k WHERE r.k IS NULL AND c.export IN ({})",
                cur(None),
                runs.join(", ")
            )
        }
        None => "SELECT CAST(NULL AS VARCHAR) AS k WHERE false".into(),
    };
    let deletes = format!("{deletes} UNION {absent}");
    let n_absent = ctx
        .sql(&format!("SELECT count(*) FROM ({absent})"))
        .await
        .map_err(&err)?
        .collect()
        .await
        .map_err(&err)?;
    let n_absent = count_of(&n_absent);
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
        return Ok((Vec::new(), 0));
    }
    let run_keys = ctx
        .sql(&format!(
            "SELECT count(DISTINCT {id}) FROM hist_b WHERE export = {e} AND {id} IS NOT NULL"
        ))
        .await
        .map_err(&err)?
        .collect()
        .await
        .map_err(&err)?;
    let run_keys = count_of(&run_keys) as usize;
    // The keys held once: those the run won or deleted (`touched`), and the won ones apart only
    // when the run did not win all of its keys (their rows are then picked one by one).
    let all = n_wins == run_keys;
    let (touched, won) = {
        let won = key_set(&wins);
        drop(wins);
        let won_apart = (!all).then(|| won.clone());
        let mut touched = won;
        touched.extend(key_set(&deletes));
        (touched, won_apart)
    };
    drop(deletes);
    let mut merged = Vec::new();

    // 1. The base view: this run's rows of the keys it won (all of its files when it won every
    //    key); out go the rows of those keys and of the keys it deleted.
    let inserts = vec![(run.export.clone(), won)];
    let id_name = base_key.id_column.as_deref().expect("checked");
    apply(
        location, cur_b, &latest_b, id_name, &hist_b, base, &touched, &inserts, run,
    )
    .await?;
    drop(inserts);
    merged.push(latest_b.clone());

    // 2. The other views, from the base table as it now is.
    for (view, key) in &tv.others {
        let latest_v = format!("{view}{LATEST_SUFFIX}");
        let Some(hist_v) = location.open_table(view).await? else {
            continue;
        };
        let cur_v = match location.open_table(&latest_v).await? {
            Some(t) => t,
            None => create_latest(location, view, &latest_v).await?,
        };
        // Read after the view's snapshot was taken (see the module docs).
        let by_export = current_versions(location, &latest_b, id_name, &touched).await?;
        let inserts: Vec<(String, Option<HashSet<String>>)> = by_export
            .into_iter()
            .map(|(x, keys)| {
                let whole = x == run.export && keys.len() == run_keys;
                (x, (!whole).then_some(keys))
            })
            .collect();
        let vid = key
            .id_column
            .as_deref()
            .expect("views with an id column only");
        apply(
            location, cur_v, &latest_v, vid, &hist_v, view, &touched, &inserts, run,
        )
        .await?;
        merged.push(latest_v);
    }
    Ok((merged, n_absent))
}

/// The single count of a `SELECT count(*)`.
fn count_of(batches: &[RecordBatch]) -> u64 {
    batches
        .first()
        .filter(|b| b.num_rows() > 0)
        .and_then(|b| {
            b.column(0)
                .as_primitive_opt::<Int64Type>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0) as u64
}

/// [`update_type`] for a type whose current tables are empty: every view's current table gets the
/// run's history files, copied whole (a view whose current table is not empty after all — a
/// race with another writer — is left to a recomputation, as a conflict).
async fn first_run(
    location: &DatasetLocation,
    run: &RunManifest,
    tv: &TypeViews,
    created: &NewTables,
    hist_b: Option<DeltaTable>,
    cur_b: Option<DeltaTable>,
) -> Result<Vec<String>, DatasetError> {
    let none = HashSet::new();
    let whole = vec![(run.export.clone(), None)];
    let mut merged = Vec::new();
    let mut targets = vec![(tv.base.0.clone(), tv.base.1.clone(), Some((hist_b, cur_b)))];
    targets.extend(tv.others.iter().map(|(v, k)| (v.clone(), k.clone(), None)));
    for (view, key, loaded) in targets {
        let latest = format!("{view}{LATEST_SUFFIX}");
        let new = created.get(&view);
        let (hist, target) = match loaded {
            Some(pair) => pair,
            None => {
                let hist = match new {
                    Some(_) => None,
                    None => match location.open_table(&view).await? {
                        Some(t) => Some(t),
                        None => continue,
                    },
                };
                (hist, location.open_table(&latest).await?)
            }
        };
        let Some(target) = target else {
            // No current table yet: created holding the run's files, in one commit.
            let (schema, files) = match (&hist, new) {
                (Some(hist), _) => (
                    hist.snapshot()
                        .map_err(|source| DatasetError::Delta {
                            table: view.clone(),
                            source: Box::new(source),
                        })?
                        .schema()
                        .as_ref()
                        .clone(),
                    run_files(hist, &view, run)?,
                ),
                (None, Some(new)) => (new.schema.clone(), new.adds.clone()),
                (None, None) => unreachable!("a created table is not loaded"),
            };
            create_latest_holding(location, schema, files, &view, &latest, run).await?;
            merged.push(latest);
            continue;
        };
        if !live_files(&target, &latest)?.is_empty() {
            return Err(DatasetError::Delta {
                table: latest,
                source: Box::new(DeltaTableError::VersionAlreadyExists(
                    target.version().unwrap_or_default(),
                )),
            });
        }
        let id = key
            .id_column
            .as_deref()
            .expect("views with an id column only");
        let hist = match hist {
            Some(t) => t,
            None => load_history(location, &view).await?,
        };
        apply(
            location, target, &latest, id, &hist, &view, &none, &whole, run,
        )
        .await?;
        merged.push(latest);
    }
    Ok(merged)
}

/// The strings of the first column of `batches`.
fn key_set(batches: &[RecordBatch]) -> HashSet<String> {
    let mut out = HashSet::new();
    for b in batches {
        let Ok(c) = compute::cast(b.column(0), &DataType::Utf8) else {
            continue;
        };
        out.extend(c.as_string::<i32>().iter().flatten().map(str::to_string));
    }
    out
}

/// The keys of `keys`, by the run (`export`) whose version the current table `table` holds.
async fn current_versions(
    location: &DatasetLocation,
    table: &str,
    id: &str,
    keys: &HashSet<String>,
) -> Result<BTreeMap<String, HashSet<String>>, DatasetError> {
    let Some(t) = location.open_table(table).await? else {
        return Ok(BTreeMap::new());
    };
    let mut out: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for f in live_files(&t, table)? {
        let Some(export) = f.export.clone() else {
            continue;
        };
        let of_export = out.entry(export).or_default();
        for_each_value(location, table, &f.path, id, |k| {
            if keys.contains(k) {
                of_export.insert(k.to_string());
            }
        })
        .await?;
    }
    out.retain(|_, keys| !keys.is_empty());
    Ok(out)
}

/// An active file of a table.
struct LiveFile {
    /// Path relative to the table.
    path: String,
    /// Its `export` partition value.
    export: Option<String>,
    remove: deltalake::kernel::Remove,
    add: deltalake::kernel::Add,
}

/// The active files of a loaded table.
fn live_files(t: &DeltaTable, table: &str) -> Result<Vec<LiveFile>, DatasetError> {
    let snapshot = t.snapshot().map_err(|source| DatasetError::Delta {
        table: table.to_string(),
        source: Box::new(source),
    })?;
    let mut out = Vec::new();
    for f in snapshot.log_data() {
        #[allow(deprecated)]
        let add = f.add_action();
        out.push(LiveFile {
            path: f.path().to_string(),
            export: f
                .partition_values_map()
                .remove(super::PARTITION_COLUMN)
                .flatten(),
            remove: f.remove_action(true),
            add,
        });
    }
    Ok(out)
}

/// The `export` partitions that hold an active file of a loaded table.
pub(crate) fn live_partitions(
    t: &DeltaTable,
    table: &str,
) -> Result<HashSet<String>, DatasetError> {
    Ok(live_files(t, table)?
        .into_iter()
        .filter_map(|f| f.export)
        .collect())
}

/// The id range of a file from its stats, for `id`.
fn with_id_range(f: &LiveFile, id: &str) -> Option<(String, String)> {
    let s: serde_json::Value = serde_json::from_str(f.add.stats.as_deref()?).ok()?;
    let lo = s["minValues"][id].as_str()?.to_string();
    let hi = s["maxValues"][id].as_str()?.to_string();
    Some((lo, hi))
}

/// Call `f` with each non-null value of column `column` of a table's file, as a string, batch by
/// batch: a file of a million ids is never held as a million strings.
async fn for_each_value(
    location: &DatasetLocation,
    table: &str,
    path: &str,
    column: &str,
    mut f: impl FnMut(&str),
) -> Result<(), DatasetError> {
    let mut stream = open_file(location, table, path, Some(column)).await?;
    while let Some(b) = stream.next().await {
        let b = b.map_err(|source| DatasetError::Parquet {
            path: format!("{table}/{path}"),
            source,
        })?;
        let Ok(c) = compute::cast(b.column(0), &DataType::Utf8) else {
            continue;
        };
        c.as_string::<i32>().iter().flatten().for_each(&mut f);
    }
    Ok(())
}

/// A stream of a table file's record batches (all columns, or one).
#[allow(deprecated)] // ParquetObjectReader: its replacement is not in this parquet release yet
async fn open_file(
    location: &DatasetLocation,
    table: &str,
    path: &str,
    column: Option<&str>,
) -> Result<
    parquet::arrow::async_reader::ParquetRecordBatchStream<
        parquet::arrow::async_reader::ParquetObjectReader,
    >,
    DatasetError,
> {
    let full = format!("{table}/{path}");
    let pq = |source| DatasetError::Parquet {
        path: full.clone(),
        source,
    };
    #[allow(deprecated)]
    let reader = parquet::arrow::async_reader::ParquetObjectReader::new(
        location.store.clone(),
        location.child(&full),
    );
    let mut builder = parquet::arrow::ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(pq)?
        .with_batch_size(8192);
    if let Some(c) = column {
        let Some(i) = builder.schema().fields().iter().position(|f| f.name() == c) else {
            return Err(pq(parquet::errors::ParquetError::General(format!(
                "no column {c}"
            ))));
        };
        let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), [i]);
        builder = builder.with_projection(mask);
    }
    builder.build().map_err(pq)
}

/// Bring current table `table` (loaded as `target`) to its new state in one commit: the rows
/// whose `id` is in `remove` go (files holding none stay untouched, files holding only such
/// rows are dropped, others rewritten without them); `inserts` come from the history table
/// `hist_name` (loaded as `hist`): per run partition, the rows of some keys, or all of its files,
/// copied as they are. The commit carries [`CURRENT_APP_ID`] and reads the whole table: any
/// commit to the table since `target` (another merge, a compaction) makes it fail as a conflict.
#[allow(clippy::too_many_arguments)]
async fn apply(
    location: &DatasetLocation,
    target: DeltaTable,
    table: &str,
    id: &str,
    hist: &DeltaTable,
    hist_name: &str,
    remove: &HashSet<String>,
    inserts: &[(String, Option<HashSet<String>>)],
    run: &RunManifest,
) -> Result<(), DatasetError> {
    let derr = |source| DatasetError::Delta {
        table: table.to_string(),
        source: Box::new(source),
    };
    // The removed keys in order, to skip the files whose id range holds none of them: worth it
    // for the few keys of a nightly run, not for millions (every file's range then holds some,
    // and the ordered copy would cost ~40 bytes a key).
    let sorted: Option<std::collections::BTreeSet<&str>> =
        (remove.len() <= RANGE_PRUNE_KEYS).then(|| remove.iter().map(String::as_str).collect());
    let tag = format!("{}-{}", RunIds::new().tag(), run.export.len());
    let mut actions = Vec::new();
    let mut seq = 0usize;
    let live = live_files(&target, table)?;
    let active: HashSet<&str> = live.iter().map(|f| f.path.as_str()).collect();
    // Out: rows of removed keys.
    for f in &live {
        if let (Some(sorted), Some((lo, hi))) = (&sorted, with_id_range(f, id))
            && sorted.range(lo.as_str()..=hi.as_str()).next().is_none()
        {
            continue; // no removed key can be in this file
        }
        let (mut hits, mut rows) = (0usize, 0usize);
        for_each_value(location, table, &f.path, id, |k| {
            rows += 1;
            hits += usize::from(remove.contains(k));
        })
        .await?;
        if hits == 0 {
            continue;
        }
        actions.push(Action::Remove(f.remove.clone()));
        if hits < rows {
            let keep = |k: &str| !remove.contains(k);
            if let Some(add) = rewrite(
                location, table, table, &f.path, &f.export, id, &keep, &tag, &mut seq,
            )
            .await?
            {
                actions.push(Action::Add(add));
            }
        }
    }
    // In: this run's (or the winning runs') rows.
    for (export, keys) in inserts {
        for f in live_files(hist, hist_name)?
            .into_iter()
            .filter(|f| f.export.as_deref() == Some(export.as_str()))
        {
            match keys {
                // Already there (a recomputed update): the file stays, neither removed nor copied.
                None if active.contains(f.path.as_str()) => {
                    actions.retain(|a| !matches!(a, Action::Remove(r) if r.path == f.path))
                }
                None => actions.push(Action::Add(copy(location, hist_name, table, &f.add).await?)),
                Some(keys) => {
                    let keep = |k: &str| keys.contains(k);
                    if let Some(add) = rewrite(
                        location, hist_name, table, &f.path, &f.export, id, &keep, &tag, &mut seq,
                    )
                    .await?
                    {
                        actions.push(Action::Add(add));
                    }
                }
            }
        }
    }
    if actions.is_empty() {
        return Ok(());
    }
    let version = target.version().map_or(0, |v| v as i64 + 1);
    let props = CommitProperties::default()
        .with_metadata(commit_info(run))
        .with_application_transaction(Transaction::new(CURRENT_APP_ID, version));
    // A MERGE without a predicate: to delta-rs's conflict checker, a commit that read the whole
    // table, so it loses to any commit since its snapshot that added files or removed some —
    // another merge (which the common `txn` app id catches too), and OPTIMIZE, which nothing
    // else catches: it carries no `txn`, and its removes have `dataChange: false`, which
    // delta-rs skips when it looks for files removed twice or removed after being read (only
    // its added files, against a whole-table read, conflict). Committed as a blind write
    // (`Write`, no read set), a merge prepared before a compaction removed files the compaction
    // had already replaced and left the compacted file, with the old versions of its keys, live
    // beside the new ones.
    let op = DeltaOperation::Merge {
        predicate: None,
        merge_predicate: None,
        matched_predicates: Vec::new(),
        not_matched_predicates: Vec::new(),
        not_matched_by_source_predicates: Vec::new(),
    };
    let snapshot = target.snapshot().map_err(derr)?;
    // The history table gained columns (its view did): the current table gains them too.
    let hist_schema = hist.snapshot().map_err(derr)?.schema();
    if let Some(schema) = reconcile_schema(table, &hist_schema, &snapshot.schema())? {
        actions.extend(evolve_to(table, snapshot.snapshot(), &schema)?);
    }
    let done = CommitBuilder::from(props)
        .with_actions(actions)
        .build(Some(snapshot), target.log_store(), op)
        .await
        .map_err(derr)?;
    let needle = format!("\"{COMMIT_RUN_KEY}\":{}", serde_json::json!(run.run_id));
    if !verify_commit(location, table, done.version(), &needle).await? {
        // Recomputed from the winner's state, like a lost race.
        return Err(derr(DeltaTableError::VersionAlreadyExists(done.version())));
    }
    Ok(())
}

/// Copy a history file (its `add` action) into current table `table`, byte for byte (same
/// partition, same stats).
async fn copy(
    location: &DatasetLocation,
    hist_name: &str,
    table: &str,
    f: &deltalake::kernel::Add,
) -> Result<deltalake::kernel::Add, DatasetError> {
    use object_store::ObjectStoreExt;
    let from = location.child(&format!("{hist_name}/{}", f.path));
    let to_rel = f.path.clone();
    let to = location.child(&format!("{table}/{to_rel}"));
    location
        .store
        .copy(&from, &to)
        .await
        .map_err(|source| DatasetError::Store {
            path: format!("{table}/{to_rel}"),
            source,
        })?;
    let mut add = f.clone();
    add.path = to_rel;
    add.modification_time = chrono::Utc::now().timestamp_millis();
    add.data_change = true;
    Ok(add)
}

/// Write the rows of file `path` of table `from` whose `id` passes `keep` into a new file of
/// table `to` (same partition); `None` when no row passes.
#[allow(clippy::too_many_arguments)]
async fn rewrite(
    location: &DatasetLocation,
    from: &str,
    to: &str,
    path: &str,
    export: &Option<String>,
    id: &str,
    keep: &dyn Fn(&str) -> bool,
    tag: &str,
    seq: &mut usize,
) -> Result<Option<deltalake::kernel::Add>, DatasetError> {
    let dir = export
        .as_ref()
        .map(|x| format!("{}={x}/", super::PARTITION_COLUMN))
        .unwrap_or_default();
    let rel = format!("{dir}part-{:05}-{tag}.parquet", *seq);
    *seq += 1;
    let full = format!("{to}/{rel}");
    let pq = |source| DatasetError::Parquet {
        path: full.clone(),
        source,
    };
    let mut stream = open_file(location, from, path, None).await?;
    let schema = stream.schema().clone();
    let Some(idx) = schema.fields().iter().position(|f| f.name() == id) else {
        return Ok(None);
    };
    // Row groups of the size `convert` writes: parquet's default (a million rows) would hold a
    // big file's kept rows in memory, encoded, until the end.
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(crate::sink::DEFAULT_ROW_GROUP_ROWS))
        .set_created_by(format!("flatfhir {}", env!("CARGO_PKG_VERSION")))
        .build();
    // Opened at the first kept row, so that a file with none writes nothing.
    let mut writer: Option<parquet::arrow::AsyncArrowWriter<Upload>> = None;
    let mut rows = 0usize;
    let filtered = async {
        while let Some(b) = stream.next().await {
            let b = b.map_err(pq)?;
            let ids = compute::cast(b.column(idx), &DataType::Utf8).map_err(|e| pq(e.into()))?;
            let mask: BooleanArray = ids
                .as_string::<i32>()
                .iter()
                .map(|k| Some(k.is_some_and(keep)))
                .collect();
            let kept = compute::filter_record_batch(&b, &mask).map_err(|e| pq(e.into()))?;
            if kept.num_rows() > 0 {
                rows += kept.num_rows();
                if writer.is_none() {
                    let sink = Upload::new(location, &full);
                    writer = Some(
                        parquet::arrow::AsyncArrowWriter::try_new(
                            sink,
                            schema.clone(),
                            Some(props.clone()),
                        )
                        .map_err(pq)?,
                    );
                }
                if let Some(w) = writer.as_mut() {
                    w.write(&kept).await.map_err(pq)?;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = filtered {
        // Nothing half-uploaded stays behind (see `DatasetWriter::abort`).
        if let Some(w) = writer {
            w.into_inner().abort().await;
        }
        return Err(e);
    }
    let Some(mut writer) = writer.filter(|_| rows > 0) else {
        return Ok(None);
    };
    let meta = match writer.finish().await {
        Ok(meta) => meta,
        Err(e) => {
            writer.into_inner().abort().await;
            return Err(pq(e));
        }
    };
    let size = writer.bytes_written() as i64;
    Ok(Some(deltalake::kernel::Add {
        path: rel,
        partition_values: export
            .iter()
            .map(|x| (super::PARTITION_COLUMN.to_string(), Some(x.clone())))
            .collect(),
        size,
        modification_time: chrono::Utc::now().timestamp_millis(),
        data_change: true,
        stats: Some(super::delta::file_stats(&meta, &schema)),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }))
}

/// The history files of `run` in a loaded history table (`add` actions).
fn run_files(
    hist: &DeltaTable,
    view: &str,
    run: &RunManifest,
) -> Result<Vec<deltalake::kernel::Add>, DatasetError> {
    Ok(live_files(hist, view)?
        .into_iter()
        .filter(|f| f.export.as_deref() == Some(run.export.as_str()))
        .map(|f| f.add)
        .collect())
}

/// A history table that must exist (its run's commit created it).
async fn load_history(location: &DatasetLocation, view: &str) -> Result<DeltaTable, DatasetError> {
    location
        .open_table(view)
        .await?
        .ok_or_else(|| DatasetError::Location {
            location: location.table_url(view).to_string(),
            message: "the history table is missing".into(),
        })
}

/// Create the current table of `view` (see [`create_latest`]) with the history table's `schema`
/// holding `files`, the history files of `run`, copied whole, in its first commit. Another
/// writer that created it first wins: this one then fails as a conflict, and the type is
/// recomputed from the winner's state.
async fn create_latest_holding(
    location: &DatasetLocation,
    schema: deltalake::kernel::StructType,
    files: Vec<deltalake::kernel::Add>,
    view: &str,
    latest: &str,
    run: &RunManifest,
) -> Result<(), DatasetError> {
    let derr = |source| DatasetError::Delta {
        table: latest.to_string(),
        source: Box::new(source),
    };
    let mut actions = Vec::new();
    for f in &files {
        actions.push(Action::Add(copy(location, view, latest, f).await?));
    }
    let props = CommitProperties::default()
        .with_metadata(commit_info(run))
        .with_application_transaction(Transaction::new(CURRENT_APP_ID, 0));
    let created =
        create_table_holding(location, latest, &schema, true, actions, Some(props)).await?;
    let needle = format!("\"{COMMIT_RUN_KEY}\":{}", serde_json::json!(run.run_id));
    // Another writer's table (or an overwritten commit, see `verify_commit`): a lost race.
    if matches!(created, Created::Existing(_))
        || !commit_holds(location, latest, 0, &needle).await?
    {
        tracing::debug!(
            table = latest,
            "another writer created the current table first"
        );
        return Err(derr(DeltaTableError::VersionAlreadyExists(0)));
    }
    Ok(())
}

/// Create the current table of `view` with the history table's schema (`export` a plain column).
async fn create_latest(
    location: &DatasetLocation,
    view: &str,
    latest: &str,
) -> Result<DeltaTable, DatasetError> {
    let hist = load_history(location, view).await?;
    let snapshot = hist.snapshot().map_err(|source| DatasetError::Delta {
        table: view.to_string(),
        source: Box::new(source),
    })?;
    create_table_with(location, latest, &snapshot.schema(), true).await
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
