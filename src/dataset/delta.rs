//! Every table of a dataset is a Delta Lake table: the commit protocol that Spark, Databricks,
//! Trino, Athena, DuckDB, polars and pyarrow honour, instead of rules only flatfhir knows.
//!
//! * A run's parts are written by our own streaming Parquet writer (bounded memory) and become
//!   visible in **one commit per table** ([`commit_run`]): `add` actions with statistics
//!   (`numRecords`, min/max, null counts — computed from the Parquet footer the writer already
//!   built, so engines can skip files), a `txn` action whose app id is the run id (so a retried
//!   or resumed commit never adds the same rows twice), and `commitInfo` naming the run, the
//!   server, the request and the export's `transactionTime`.
//! * Parts that no commit names are invisible to every reader; a failed run's parts are deleted
//!   ([`super::discard_run`]).
//! * Commits are conditional puts of `_delta_log/<version>.json` (delta-rs retries a lost race
//!   after checking the winner for conflicts), so several flatfhir processes can write one
//!   dataset at once, locally or on an object store with conditional put. A table's creating
//!   commit is not retried: it is version 0 or nothing ([`create_table_holding`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Once},
};

use datafusion::arrow::{
    array::{Array, ArrayRef, AsArray},
    compute,
    datatypes::{
        DataType, Date32Type, Decimal128Type, Field, Int64Type, Schema, SchemaRef, TimeUnit,
        TimestampMicrosecondType,
    },
};
use deltalake::{
    DeltaTable, DeltaTableBuilder, DeltaTableError,
    kernel::{
        Action, Add, StructType, Transaction,
        engine::arrow_conversion::TryIntoKernel,
        transaction::{CommitBuilder, CommitProperties},
    },
    operations::create::CreateBuilder,
    protocol::{DeltaOperation, SaveMode},
};
use parquet::{
    arrow::arrow_reader::statistics::StatisticsConverter, file::metadata::ParquetMetaData,
};
use serde_json::{Map, Value, json};
use url::Url;

use super::{DatasetError, DatasetLocation, PARTITION_COLUMN, RunManifest, WrittenFile};

/// Key of the `commitInfo` entry that names the run (and of the `txn` app ids).
pub const COMMIT_RUN_KEY: &str = "flatfhir.run";
/// Commits between two checkpoints of a table (`delta.checkpointInterval`). Opening a table
/// reads its newest checkpoint and the commits after it, and `query` opens every table: with
/// one commit per run, a checkpoint every 10 runs keeps opening a dataset flat as runs
/// accumulate (Delta's default, 100, let it grow ~10× over the first 100 runs).
pub const CHECKPOINT_INTERVAL: u64 = 10;
/// Tables whose commits of one run are in flight at once.
const COMMIT_CONCURRENCY: usize = 8;
/// Fault injection (tests): the process aborts after this many of a run's table commits.
pub const ABORT_AFTER_COMMITS_ENV: &str = "FLATFHIR_FAULT_ABORT_AFTER_COMMITS";
/// Attempts at a commit that lost a race to a conflicting one before the run fails.
pub const MAX_COMMIT_ATTEMPTS: usize = 8;

/// Register delta-rs's object stores and log stores for `s3://`, `gs://` and `az://` (once).
pub fn register_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(feature = "cloud")]
        {
            deltalake::aws::register_handlers(None);
            deltalake::gcp::register_handlers(None);
            deltalake::azure::register_handlers(None);
        }
    });
}

impl DatasetLocation {
    /// URL of a table's directory (ends in `/`).
    pub fn table_url(&self, table: &str) -> Url {
        self.url
            .join(&format!("{table}/"))
            .expect("a table name is a valid relative URL")
    }

    /// A handle on table `table` (not loaded).
    pub fn table_builder(&self, table: &str) -> Result<DeltaTableBuilder, DatasetError> {
        register_handlers();
        let url = self.table_url(table);
        let builder =
            DeltaTableBuilder::from_url(url.clone()).map_err(|source| DatasetError::Delta {
                table: table.to_string(),
                source: Box::new(source),
            })?;
        Ok(match url.scheme() {
            // delta-rs builds its own local store (rooted at `/`, with atomic create-if-absent).
            "file" => builder,
            // Our store is rooted at the bucket (or the in-process store's root).
            _ => builder.with_storage_backend(self.store.clone(), url),
        })
    }

    /// Whether table `table` has a Delta log: one HEAD of its first commit, else (a log whose
    /// first commits were cleaned up) one listing request. A listing alone would cost a stat of
    /// every log file on a local store, which grows with the number of runs.
    pub async fn has_table(&self, table: &str) -> Result<bool, DatasetError> {
        use futures::StreamExt;
        use object_store::ObjectStoreExt;
        let first = self.child(&format!("{table}/_delta_log/{:020}.json", 0));
        if self.store.head(&first).await.is_ok() {
            return Ok(true);
        }
        let log = self.child(&format!("{table}/_delta_log/"));
        match self.store.list(Some(&log)).next().await {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(object_store::Error::NotFound { .. })) => Ok(false),
            Some(Err(source)) => Err(DatasetError::Store {
                path: format!("{table}/_delta_log/"),
                source,
            }),
        }
    }

    /// Load table `table` at its latest version; `None` when it has no Delta log yet.
    pub async fn open_table(&self, table: &str) -> Result<Option<DeltaTable>, DatasetError> {
        if !self.has_table(table).await? {
            return Ok(None);
        }
        match self.table_builder(table)?.load().await {
            Ok(t) => Ok(Some(t)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(source) => Err(DatasetError::Delta {
                table: table.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Names of the Delta tables in the dataset (directories with a `_delta_log/`), sorted.
    pub async fn delta_tables(&self) -> Result<Vec<String>, DatasetError> {
        let mut out = self.table_dirs(usize::MAX).await?;
        out.sort();
        Ok(out)
    }

    /// Whether the dataset holds at least one Delta table (stops at the first found).
    pub async fn has_delta_tables(&self) -> Result<bool, DatasetError> {
        Ok(!self.table_dirs(1).await?.is_empty())
    }

    /// Up to `limit` of the top-level directories that hold a Delta table, probed
    /// [`TABLES_PROBED_AT_ONCE`] at a time.
    async fn table_dirs(&self, limit: usize) -> Result<Vec<String>, DatasetError> {
        use futures::{StreamExt, TryStreamExt};
        let top = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|source| DatasetError::Store {
                path: self.url.to_string(),
                source,
            })?;
        let names: Vec<String> = top
            .common_prefixes
            .iter()
            .filter_map(|dir| dir.filename().map(str::to_string))
            .collect();
        futures::stream::iter(names)
            .map(|name| async move {
                Ok::<_, DatasetError>(self.has_table(&name).await?.then_some(name))
            })
            .buffered(TABLES_PROBED_AT_ONCE)
            .try_filter_map(|found| async move { Ok(found) })
            .take(limit)
            .try_collect()
            .await
    }
}

/// Table directories probed for a Delta log at once when a dataset is listed (16: local stat
/// calls and object-store HEAD requests both overlap well).
const TABLES_PROBED_AT_ONCE: usize = 16;

/// A Delta error on one table.
fn delta_err(table: &str) -> impl Fn(DeltaTableError) -> DatasetError + '_ {
    move |source| DatasetError::Delta {
        table: table.to_string(),
        source: Box::new(source),
    }
}

/// Whether a commit failed because another writer won the race with a conflicting commit (worth
/// retrying from a fresh snapshot).
pub fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::VersionAlreadyExists(_) | DeltaTableError::Transaction { .. }
    )
}

/// The Delta `stats` of a Parquet file (`numRecords`, and per top-level primitive column its
/// min/max and null count) from the statistics the Parquet writer put in its footer. Bounds that
/// Parquet truncated (long strings) are left out rather than written inexactly; timestamps are
/// widened to the millisecond (Delta's stats precision), so skipping stays correct.
pub fn file_stats(meta: &ParquetMetaData, schema: &Schema) -> String {
    let rgs = meta.row_groups();
    let parquet_schema = meta.file_metadata().schema_descr();
    let (mut mins, mut maxs, mut nulls) = (Map::new(), Map::new(), Map::new());
    for field in schema.fields() {
        if field.data_type().is_nested() {
            continue;
        }
        let Ok(conv) = StatisticsConverter::try_new(field.name(), schema, parquet_schema) else {
            continue;
        };
        let Ok(null_counts) = conv.row_group_null_counts(rgs) else {
            continue;
        };
        if null_counts.null_count() > 0 {
            continue; // a row group without a null count: unknown
        }
        nulls.insert(
            field.name().clone(),
            json!(null_counts.values().iter().sum::<u64>()),
        );
        let exact = |a: Result<datafusion::arrow::array::BooleanArray, _>| {
            a.is_ok_and(|a| a.null_count() == 0 && a.values().count_set_bits() == a.len())
        };
        if !exact(conv.row_group_is_min_value_exact(rgs))
            || !exact(conv.row_group_is_max_value_exact(rgs))
        {
            continue;
        }
        let (Ok(lo), Ok(hi)) = (conv.row_group_mins(rgs), conv.row_group_maxes(rgs)) else {
            continue;
        };
        // A row group without a bound is unknown unless all its values are null.
        let rows = |i: usize| rgs[i].num_rows() as u64;
        let unknown = (0..lo.len())
            .any(|i| (lo.is_null(i) || hi.is_null(i)) && null_counts.value(i) != rows(i));
        if unknown {
            continue;
        }
        if let Some((l, h)) = bounds(&lo, &hi) {
            mins.insert(field.name().clone(), l);
            maxs.insert(field.name().clone(), h);
        }
    }
    json!({
        "numRecords": meta.file_metadata().num_rows(),
        "minValues": mins,
        "maxValues": maxs,
        "nullCount": nulls,
    })
    .to_string()
}

/// The smallest of `lo` and the greatest of `hi`, as Delta stats JSON values.
fn bounds(lo: &ArrayRef, hi: &ArrayRef) -> Option<(Value, Value)> {
    match lo.data_type() {
        DataType::Utf8 => Some((
            json!(compute::min_string(lo.as_string::<i32>())?),
            json!(compute::max_string(hi.as_string::<i32>())?),
        )),
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let lo = compute::cast(lo, &DataType::Int64).ok()?;
            let hi = compute::cast(hi, &DataType::Int64).ok()?;
            Some((
                json!(compute::min(lo.as_primitive::<Int64Type>())?),
                json!(compute::max(hi.as_primitive::<Int64Type>())?),
            ))
        }
        DataType::Date32 => {
            let day = |d: i32| {
                chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?
                    .checked_add_signed(chrono::TimeDelta::days(d.into()))
                    .map(|d| json!(d.format("%Y-%m-%d").to_string()))
            };
            Some((
                day(compute::min(lo.as_primitive::<Date32Type>())?)?,
                day(compute::max(hi.as_primitive::<Date32Type>())?)?,
            ))
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let utc = tz.is_some();
            let text = |us: i64| {
                let t = chrono::DateTime::from_timestamp_micros(us)?;
                let s = t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string();
                Some(json!(if utc { format!("{s}Z") } else { s }))
            };
            let l = compute::min(lo.as_primitive::<TimestampMicrosecondType>())?;
            let h = compute::max(hi.as_primitive::<TimestampMicrosecondType>())?;
            Some((
                text(l.div_euclid(1000) * 1000)?,
                text(h.div_euclid(1000) * 1000 + if h.rem_euclid(1000) > 0 { 1000 } else { 0 })?,
            ))
        }
        DataType::Decimal128(_, scale) => {
            let text = |v: i128| {
                use datafusion::arrow::datatypes::DecimalType;
                let s = Decimal128Type::format_decimal(v, 38, *scale);
                serde_json::from_str::<Value>(&s).ok()
            };
            Some((
                text(compute::min(lo.as_primitive::<Decimal128Type>())?)?,
                text(compute::max(hi.as_primitive::<Decimal128Type>())?)?,
            ))
        }
        // Floats (NaN ordering) and booleans: null counts only.
        _ => None,
    }
}

/// The footer of a Parquet file: two ranged reads (the 8-byte tail, then the metadata).
async fn read_footer(
    location: &DatasetLocation,
    path: &str,
) -> Result<ParquetMetaData, DatasetError> {
    use object_store::ObjectStoreExt;
    let object = location.child(path);
    let store_err = |source| DatasetError::Store {
        path: path.to_string(),
        source,
    };
    let pq_err = |source| DatasetError::Parquet {
        path: path.to_string(),
        source,
    };
    let size = location.store.head(&object).await.map_err(store_err)?.size;
    let short = || {
        pq_err(parquet::errors::ParquetError::General(
            "file too short for a Parquet footer".into(),
        ))
    };
    let tail_start = size.checked_sub(8).ok_or_else(short)?;
    let tail = location
        .store
        .get_range(&object, tail_start..size)
        .await
        .map_err(store_err)?;
    let len = u64::from(u32::from_le_bytes(tail[..4].try_into().expect("8 bytes")));
    let start = tail_start.checked_sub(len).ok_or_else(short)?;
    let footer = location
        .store
        .get_range(&object, start..tail_start)
        .await
        .map_err(store_err)?;
    parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&footer).map_err(pq_err)
}

/// The Arrow schema of a Parquet file (as written: the writer embeds it in the footer).
pub async fn file_schema(
    location: &DatasetLocation,
    path: &str,
) -> Result<SchemaRef, DatasetError> {
    let meta = read_footer(location, path).await?;
    arrow_schema(&meta, path).map(Arc::new)
}

fn arrow_schema(meta: &ParquetMetaData, path: &str) -> Result<Schema, DatasetError> {
    parquet::arrow::parquet_to_arrow_schema(
        meta.file_metadata().schema_descr(),
        meta.file_metadata().key_value_metadata(),
    )
    .map_err(|source| DatasetError::Parquet {
        path: path.to_string(),
        source,
    })
}

/// The Delta schema of a table whose files have `schema`: the files' columns, then the
/// partition column `export` when the table is partitioned by run.
fn delta_schema(schema: &Schema, partitioned: bool) -> Result<StructType, DeltaTableError> {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    if partitioned && schema.field_with_name(PARTITION_COLUMN).is_err() {
        fields.push(Field::new(PARTITION_COLUMN, DataType::Utf8, true));
    }
    let schema = Schema::new(fields);
    let kernel: StructType = (&schema).try_into_kernel()?;
    Ok(kernel)
}

/// Check that every column of every view has a Delta Lake type, so that a view no table can
/// hold is refused before a run does any I/O, rather than when its commit fails half-way
/// through its tables.
pub fn check_views(registry: &crate::view::ViewRegistry) -> Result<(), DatasetError> {
    for view in registry.views() {
        for field in view.schema().fields() {
            let one = Schema::new(vec![field.as_ref().clone()]);
            if delta_schema(&one, false).is_err() {
                return Err(DatasetError::UnsupportedColumn {
                    view: view.name().to_string(),
                    column: field.name().clone(),
                    data_type: field.data_type().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Create table `table` with `schema` unless it exists (another writer may create it at the same
/// time: whoever loses the race loads the winner's table).
pub async fn create_table(
    location: &DatasetLocation,
    table: &str,
    schema: &Schema,
    partitioned: bool,
) -> Result<DeltaTable, DatasetError> {
    let fields = delta_schema(schema, partitioned).map_err(delta_err(table))?;
    create_table_with(location, table, &fields, partitioned).await
}

/// [`create_table`] from a Delta schema.
pub async fn create_table_with(
    location: &DatasetLocation,
    table: &str,
    schema: &StructType,
    partitioned: bool,
) -> Result<DeltaTable, DatasetError> {
    if let Some(t) = location.open_table(table).await? {
        return Ok(t);
    }
    match create_table_holding(location, table, schema, partitioned, Vec::new(), None).await? {
        Created::Existing(t) => Ok(t),
        Created::New => location
            .open_table(table)
            .await?
            .ok_or_else(|| DatasetError::Location {
                location: location.table_url(table).to_string(),
                message: "the table just created has no Delta log".into(),
            }),
    }
}

/// What [`create_table_holding`] found.
pub enum Created {
    /// This call committed version 0 (not loaded: the caller knows what it holds, and reads the
    /// commit back where it must be sure, see [`verify_commit`]).
    New,
    /// Another writer created the table first: its table, loaded at its latest version.
    Existing(DeltaTable),
}

/// Create table `table` whose first commit (version 0) also holds `actions` (a run's files and
/// its `txn`): one commit instead of two for a table's first run. When the table exists already
/// (another writer created it first), the winner's table is returned without `actions`: the
/// caller checks whether it holds its run.
///
/// The create lands as version 0 or not at all. delta-rs retries a commit that lost the race for
/// its version at the next free one, and a create whose version 0 was taken has nothing to check
/// the winner against (its snapshot is loaded at the winner's version): retried, it would land
/// as a second `CREATE TABLE` — a new table id and schema over the winner's, and `actions`
/// (rows a current-state table must not hold twice) committed behind the caller's back. So the
/// create is made with no retries.
///
/// The commit is the one delta-rs's `CreateBuilder` makes (the same protocol, metadata and
/// `commitInfo`; a test compares them), but the new table is not loaded: `CreateBuilder` loads
/// it twice (after the commit, then at the version committed), which replays its log and lists
/// its files each time, and a run creates two tables per view on a new dataset. Schemas whose
/// columns carry Delta invariants or generation expressions (which no view makes) still go
/// through `CreateBuilder`.
pub async fn create_table_holding(
    location: &DatasetLocation,
    table: &str,
    schema: &StructType,
    partitioned: bool,
    actions: Vec<Action>,
    props: Option<CommitProperties>,
) -> Result<Created, DatasetError> {
    let err = delta_err(table);
    let log_store = location
        .table_builder(table)?
        .build_storage()
        .map_err(&err)?;
    let props = props.unwrap_or_default().with_max_retries(0);
    let Some((protocol, metadata)) = first_commit(table, schema, partitioned).map_err(&err)? else {
        return create_with_builder(
            location,
            table,
            log_store,
            schema,
            partitioned,
            actions,
            props,
        )
        .await;
    };
    let op = DeltaOperation::Create {
        mode: SaveMode::Ignore,
        location: deltalake::table::normalize_table_url(log_store.root_url()),
        protocol: protocol.clone(),
        metadata: metadata.clone(),
    };
    let mut all = vec![Action::Protocol(protocol), Action::Metadata(metadata)];
    all.extend(actions);
    // Awaited up to the commit only: its post-commit step (which, for a table's first commit,
    // does nothing but load the table) is left out.
    let committed = async {
        CommitBuilder::from(props)
            .with_actions(all)
            .build(None, log_store.clone(), op)
            .into_prepared_commit_future()
            .await?
            .await
    }
    .await;
    match committed {
        Ok(_) => Ok(Created::New),
        Err(e) if is_conflict(&e) => match location.open_table(table).await? {
            Some(t) => Ok(Created::Existing(t)),
            None => Err(err(e)),
        },
        Err(e) => Err(err(e)),
    }
}

/// [`create_table_holding`] through delta-rs's `CreateBuilder` (for schemas whose first commit
/// [`first_commit`] does not make).
async fn create_with_builder(
    location: &DatasetLocation,
    table: &str,
    log_store: deltalake::logstore::LogStoreRef,
    schema: &StructType,
    partitioned: bool,
    actions: Vec<Action>,
    props: CommitProperties,
) -> Result<Created, DatasetError> {
    let err = delta_err(table);
    let mut create = CreateBuilder::new()
        .with_log_store(log_store)
        .with_table_name(table)
        .with_save_mode(SaveMode::ErrorIfExists)
        .with_configuration_property(
            deltalake::TableProperty::CheckpointInterval,
            Some(CHECKPOINT_INTERVAL.to_string()),
        )
        .with_columns(schema.fields().cloned())
        .with_commit_properties(props);
    if partitioned {
        create = create.with_partition_columns([PARTITION_COLUMN]);
    }
    if !actions.is_empty() {
        create = create.with_actions(actions);
    }
    match create.await {
        Ok(_) => Ok(Created::New),
        // Another writer's table (the create found it, or lost the race for version 0).
        Err(e) => match location.open_table(table).await? {
            Some(t) => Ok(Created::Existing(t)),
            None => Err(err(e)),
        },
    }
}

/// The protocol and metadata of a new table's first commit, as delta-rs's `CreateBuilder`
/// makes them for our tables (protocol 1/2, or 3/7 with the `timestampNtz` feature for a
/// `TIMESTAMP` column; the checkpoint interval; partitioned by `export`); `None` for a schema
/// that needs more (Delta invariants or generated columns, set in column metadata).
fn first_commit(
    table: &str,
    schema: &StructType,
    partitioned: bool,
) -> Result<Option<(deltalake::kernel::Protocol, deltalake::kernel::Metadata)>, DeltaTableError> {
    use deltalake::kernel::StructTypeExt;
    if !schema.get_invariants()?.is_empty() || !schema.get_generated_columns()?.is_empty() {
        return Ok(None);
    }
    let mut protocol: deltalake::kernel::Protocol =
        serde_json::from_value(json!({"minReaderVersion": 1, "minWriterVersion": 2}))?;
    if deltalake::kernel::contains_timestampntz(schema.fields())
        && let Some(p) =
            with_feature(&protocol, TIMESTAMP_NTZ_FEATURE).map_err(DeltaTableError::Generic)?
    {
        protocol = p;
    }
    let partitions: &[&str] = if partitioned {
        &[PARTITION_COLUMN]
    } else {
        &[]
    };
    let checkpoints = deltalake::TableProperty::CheckpointInterval.as_ref();
    // As `new_metadata(…).with_name(…)` makes it, without the round trip of the schema through
    // its JSON text that `with_name` makes.
    let metadata = serde_json::from_value(json!({
        "id": table_id(rand::random()),
        "name": table,
        "description": None::<String>,
        "format": { "provider": "parquet", "options": {} },
        "schemaString": serde_json::to_string(schema)?,
        "partitionColumns": partitions,
        "configuration": { checkpoints: CHECKPOINT_INTERVAL.to_string() },
        "createdTime": chrono::Utc::now().timestamp_millis(),
    }))?;
    Ok(Some((protocol, metadata)))
}

/// A table id: a random (version 4) UUID from 128 random bits, as text.
fn table_id(bits: u128) -> String {
    let mut b = bits.to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// What a run committed, per table: the table version that holds its rows.
pub type Committed = BTreeMap<String, u64>;

/// A table that a run's commit created: version 0 holds the run's files and nothing else. What
/// the current-state merge needs of it (its schema, the run's files), known without loading it.
#[derive(Debug, Clone)]
pub struct NewTable {
    /// The table's schema.
    pub schema: StructType,
    /// The `add` actions of the run's files.
    pub adds: Vec<Add>,
}

/// The tables a run's commit created, by name.
pub type NewTables = BTreeMap<String, NewTable>;

/// Commit a run's files: one commit per table (created on first use), each carrying the run's
/// `txn` (app id = run id), so a table that already holds the run is skipped. Returns the version
/// of each table that holds the run, and the tables the commits created.
pub async fn commit_run(
    location: &DatasetLocation,
    run: &RunManifest,
) -> Result<(Committed, NewTables), DatasetError> {
    let mut by_table: BTreeMap<&str, Vec<&WrittenFile>> = BTreeMap::new();
    for f in &run.files {
        by_table.entry(f.view.as_str()).or_default().push(f);
    }
    // Fault injection for the tests of crashes between two tables' commits.
    let abort_after: Option<usize> = std::env::var(ABORT_AFTER_COMMITS_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    // Tables are independent: their commits go out side by side. Every table's schema is
    // checked first, so a run refused by one table commits to none.
    use futures::{StreamExt, TryStreamExt};
    let checked: Vec<(&str, Vec<&WrittenFile>, Option<DeltaTable>)> =
        futures::stream::iter(by_table)
            .map(|(table, files)| async move {
                let loaded = preflight(location, table, &files).await?;
                Ok::<_, DatasetError>((table, files, loaded))
            })
            .buffer_unordered(COMMIT_CONCURRENCY)
            .try_collect()
            .await?;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut created = NewTables::new();
    let committed: Committed = futures::stream::iter(checked)
        .map(|(table, files, loaded)| {
            let done = &done;
            async move {
                let (version, new) = commit_files(location, table, run, &files, loaded).await?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if abort_after == Some(n) {
                    eprintln!("{ABORT_AFTER_COMMITS_ENV}: aborting after {n} commits");
                    std::process::abort();
                }
                Ok::<_, DatasetError>((table.to_string(), version, new))
            }
        })
        .buffer_unordered(COMMIT_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|(table, version, new)| {
            if let Some(n) = new {
                created.insert(table.clone(), n);
            }
            (table, version)
        })
        .collect();
    Ok((committed, created))
}

/// The `commitInfo` entries of a run's commits.
pub fn commit_info(run: &RunManifest) -> HashMap<String, Value> {
    let mut info = HashMap::from([
        (COMMIT_RUN_KEY.to_string(), json!(run.run_id)),
        ("flatfhir.kind".to_string(), json!(run.kind)),
        ("flatfhir.version".to_string(), json!(run.flatfhir_version)),
    ]);
    if let Some(s) = &run.source {
        info.insert("flatfhir.server".into(), json!(s));
    }
    if let Some(t) = &run.transaction_time {
        info.insert("flatfhir.transactionTime".into(), json!(t));
    }
    if let Some(r) = &run.request {
        info.insert(
            "flatfhir.request".into(),
            serde_json::to_value(r).unwrap_or(Value::Null),
        );
    }
    info
}

/// Commit `files` of run `run` to `table` (see [`commit_run`]).
/// Load `table` (if it exists) and check that the run's files have its columns.
async fn preflight(
    location: &DatasetLocation,
    table: &str,
    files: &[&WrittenFile],
) -> Result<Option<DeltaTable>, DatasetError> {
    let Some(first) = files.first() else {
        return Ok(None);
    };
    let Some(t) = location.open_table(table).await? else {
        return Ok(None);
    };
    let ours = delta_schema(&*file_schema(location, &first.path).await?, true)
        .map_err(delta_err(table))?;
    let theirs = t.snapshot().map_err(delta_err(table))?.schema();
    reconcile_schema(table, &ours, &theirs)?;
    Ok(Some(t))
}

/// How a run's columns (`ours`) fit the table's (`theirs`): `Ok(None)` when the table's schema
/// holds them already, `Ok(Some(schema))` when the run adds columns (the table's schema evolves
/// to `schema`: its columns, then the new ones), an error when a column changed type.
///
/// Views change over the years a dataset lives: a column added to a view is added to its tables
/// (Delta schema evolution: the files written before it read as null in that column, by every
/// reader, since Delta matches columns by name); a column removed from a view stays in its
/// tables, null from then on. Only a column whose type changed (say `integer` → `decimal`)
/// cannot be reconciled: old and new files would disagree on what the column holds.
pub(crate) fn reconcile_schema(
    table: &str,
    ours: &StructType,
    theirs: &StructType,
) -> Result<Option<StructType>, DatasetError> {
    let refused = || DatasetError::SchemaChanged {
        table: table.to_string(),
        table_columns: column_list(theirs),
        run_columns: column_list(ours),
    };
    let mut added = Vec::new();
    for f in ours.fields() {
        match theirs.field(f.name()) {
            Some(t) if t.data_type() == f.data_type() => {}
            Some(_) => return Err(refused()),
            // Files written before it lack the column: it must be able to read as null.
            None if f.is_nullable() => added.push(f.clone()),
            None => return Err(refused()),
        }
    }
    if added.is_empty() {
        return Ok(None);
    }
    let fields = theirs.fields().cloned().chain(added);
    StructType::try_new(fields)
        .map(Some)
        .map_err(|e| delta_err(table)(DeltaTableError::from(e)))
}

/// The actions that evolve `snapshot`'s table to `schema` (see [`reconcile_schema`]): its
/// metadata, and a protocol upgrade when a new column needs a table feature the table lacks.
///
/// A `TIMESTAMP` (without time zone) column is Delta's `timestamp_ntz`, which readers may only
/// read from a table that declares the `timestampNtz` feature (reader version 3, writer
/// version 7). A table created with such a column gets it from delta-rs; a table that gains one
/// later must get it in the same commit, or the commit makes the table unreadable for every
/// reader, flatfhir included.
pub(crate) fn evolve_to(
    table: &str,
    snapshot: &deltalake::kernel::EagerSnapshot,
    schema: &StructType,
) -> Result<Vec<Action>, DatasetError> {
    use deltalake::kernel::MetadataExt;
    tracing::info!(
        table,
        columns = %schema
            .fields()
            .filter(|f| snapshot.schema().field(f.name()).is_none())
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", "),
        "the view gained columns: adding them to the table (earlier rows read as null)"
    );
    let err = |e: DeltaTableError| delta_err(table)(e);
    let metadata = snapshot
        .metadata()
        .clone()
        .with_schema(schema)
        .map(Action::Metadata)
        .map_err(|e| err(DeltaTableError::from(e)))?;
    let mut actions = vec![metadata];
    if deltalake::kernel::contains_timestampntz(schema.fields())
        && let Some(protocol) = with_feature(snapshot.protocol(), TIMESTAMP_NTZ_FEATURE)
            .map_err(|e| err(DeltaTableError::Generic(e)))?
    {
        actions.push(Action::Protocol(protocol));
    }
    Ok(actions)
}

/// The Delta table feature of `timestamp_ntz` columns.
const TIMESTAMP_NTZ_FEATURE: &str = "timestampNtz";

/// `protocol` with reader and writer feature `feature` added (reader version 3, writer version
/// 7, the versions that list features), or `None` when it has the feature already.
fn with_feature(
    protocol: &deltalake::kernel::Protocol,
    feature: &str,
) -> Result<Option<deltalake::kernel::Protocol>, String> {
    let mut p = serde_json::to_value(protocol).map_err(|e| e.to_string())?;
    let has = |p: &Value, key: &str| {
        p[key]
            .as_array()
            .is_some_and(|a| a.iter().any(|f| f == feature))
    };
    if has(&p, "readerFeatures") && has(&p, "writerFeatures") {
        return Ok(None);
    }
    for (version, at_least, key) in [
        ("minReaderVersion", 3, "readerFeatures"),
        ("minWriterVersion", 7, "writerFeatures"),
    ] {
        if p[version].as_i64().unwrap_or_default() < at_least {
            p[version] = json!(at_least);
        }
        if !has(&p, key) {
            match p[key].as_array_mut() {
                Some(a) => a.push(json!(feature)),
                None => p[key] = json!([feature]),
            }
        }
    }
    serde_json::from_value(p)
        .map(Some)
        .map_err(|e| format!("cannot add table feature {feature}: {e}"))
}

async fn commit_files(
    location: &DatasetLocation,
    table: &str,
    run: &RunManifest,
    files: &[&WrittenFile],
    mut loaded: Option<DeltaTable>,
) -> Result<(u64, Option<NewTable>), DatasetError> {
    let err = delta_err(table);
    let Some(first) = files.first() else {
        return Ok((0, None));
    };
    let ours = delta_schema(&*file_schema(location, &first.path).await?, true).map_err(&err)?;
    let mut adds = Vec::with_capacity(files.len());
    for f in files {
        adds.push(Action::Add(add_action(location, table, run, f).await?));
    }
    let props = || {
        CommitProperties::default()
            .with_metadata(commit_info(run))
            .with_application_transaction(Transaction::new(&run.run_id, 0))
    };
    let needle = format!("\"appId\":{}", json!(run.run_id));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let opened = match loaded.take() {
            Some(t) => Some(t),
            None => location.open_table(table).await?,
        };
        let t = match opened {
            Some(t) => t,
            None => {
                // The table's first run: created with the run's files in one commit.
                let created =
                    create_table_holding(location, table, &ours, true, adds.clone(), Some(props()))
                        .await;
                match created {
                    // Ours only if its first commit says so (read back, see `verify_commit`).
                    Ok(Created::New) => {
                        if verify_commit(location, table, 0, &needle).await? {
                            let adds = adds
                                .into_iter()
                                .filter_map(|a| match a {
                                    Action::Add(a) => Some(a),
                                    _ => None,
                                })
                                .collect();
                            return Ok((0, Some(NewTable { schema: ours, adds })));
                        }
                        if attempt >= MAX_COMMIT_ATTEMPTS {
                            return Err(err(DeltaTableError::VersionAlreadyExists(0)));
                        }
                        continue;
                    }
                    Ok(Created::Existing(t)) => t,
                    Err(DatasetError::Delta { source, .. })
                        if is_conflict(&source) && attempt < MAX_COMMIT_ATTEMPTS =>
                    {
                        tracing::debug!(table, attempt, error = %source, "create lost a race; retrying");
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        // The run was committed before (a resumed run).
        if holds_run(&t, &run.run_id).await.map_err(&err)? {
            return Ok((t.version().unwrap_or_default(), None));
        }
        let snapshot = t.snapshot().map_err(&err)?.clone();
        // Again: another writer may have created or evolved the table meanwhile.
        let mut actions = adds.clone();
        if let Some(schema) = reconcile_schema(table, &ours, &snapshot.schema())? {
            actions.extend(evolve_to(table, snapshot.snapshot(), &schema)?);
        }
        let op = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: Some(vec![PARTITION_COLUMN.to_string()]),
            predicate: None,
        };
        let result = CommitBuilder::from(props())
            .with_actions(actions)
            .build(Some(&snapshot), t.log_store(), op)
            .await;
        match result {
            Ok(done) => {
                if verify_commit(location, table, done.version(), &needle).await? {
                    return Ok((done.version(), None));
                }
                if attempt >= MAX_COMMIT_ATTEMPTS {
                    return Err(err(DeltaTableError::VersionAlreadyExists(done.version())));
                }
            }
            Err(e) if is_conflict(&e) && attempt < MAX_COMMIT_ATTEMPTS => {
                tracing::debug!(table, attempt, error = %e, "commit lost a race; retrying");
            }
            Err(e) => return Err(err(e)),
        }
    }
}

/// Read back commit `version` of `table` and check that it is ours (holds `needle`): a store
/// whose conditional put is not atomic (a check, then a write) lets a racing writer overwrite a
/// commit that was acknowledged, and some S3-compatible stores ignore `If-None-Match` outright.
/// A commit found overwritten is made again. One small GET per commit.
pub async fn verify_commit(
    location: &DatasetLocation,
    table: &str,
    version: u64,
    needle: &str,
) -> Result<bool, DatasetError> {
    let ours = commit_holds(location, table, version, needle).await?;
    if !ours {
        tracing::warn!(
            table,
            version,
            "commit was overwritten by another writer (the store's conditional put is not atomic); committing again"
        );
    }
    Ok(ours)
}

/// Whether commit `version` of `table` contains `needle` (one GET).
pub async fn commit_holds(
    location: &DatasetLocation,
    table: &str,
    version: u64,
    needle: &str,
) -> Result<bool, DatasetError> {
    use object_store::ObjectStoreExt;
    let path = format!("{table}/_delta_log/{version:020}.json");
    let body = location
        .store
        .get(&location.child(&path))
        .await
        .map_err(|source| DatasetError::Store {
            path: path.clone(),
            source,
        })?
        .bytes()
        .await
        .map_err(|source| DatasetError::Store {
            path: path.clone(),
            source,
        })?;
    Ok(memchr::memmem::find(&body, needle.as_bytes()).is_some())
}

/// Whether table `t` holds run `run` (a commit with its `txn`).
pub async fn holds_run(t: &DeltaTable, run: &str) -> Result<bool, DeltaTableError> {
    let snapshot = t.snapshot()?;
    Ok(snapshot
        .transaction_version(t.log_store().as_ref(), run)
        .await?
        .is_some())
}

/// The `add` action of a written file: path relative to the table, the run's partition value,
/// size, and statistics (from the writer, or read from the file's footer).
async fn add_action(
    location: &DatasetLocation,
    table: &str,
    run: &RunManifest,
    f: &WrittenFile,
) -> Result<Add, DatasetError> {
    let rel = f
        .path
        .strip_prefix(&format!("{table}/"))
        .ok_or_else(|| DatasetError::Location {
            location: f.path.clone(),
            message: format!("a file of table {table} outside its directory"),
        })?;
    let stats = match &f.stats {
        Some(s) => s.clone(),
        None => footer_stats(location, &f.path).await?,
    };
    Ok(Add {
        path: rel.to_string(),
        partition_values: HashMap::from([(PARTITION_COLUMN.to_string(), Some(run.export.clone()))]),
        size: f.bytes as i64,
        modification_time: chrono::Utc::now().timestamp_millis(),
        data_change: true,
        stats: Some(stats),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    })
}

/// Statistics of a file read from its footer (files written before statistics were recorded).
async fn footer_stats(location: &DatasetLocation, path: &str) -> Result<String, DatasetError> {
    let meta = read_footer(location, path).await?;
    Ok(file_stats(&meta, &arrow_schema(&meta, path)?))
}

/// `name type, …` of a Delta schema, for messages.
fn column_list(s: &StructType) -> String {
    s.fields()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::{
        array::{Date32Array, Int32Array, StringArray, TimestampMicrosecondArray},
        record_batch::RecordBatch,
    };
    use parquet::arrow::ArrowWriter;

    use super::*;

    #[test]
    fn stats_hold_bounds_and_null_counts_of_primitive_columns() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Int32, true),
            Field::new("d", DataType::Date32, true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("long", DataType::Utf8, true),
        ]));
        let long = "x".repeat(200);
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![Some("b"), None, Some("a")])),
                Arc::new(Int32Array::from(vec![3, -1, 7])),
                Arc::new(Date32Array::from(vec![0, 365, 1])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![1_500, 2_000_001, 0]).with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec![long.as_str(), "a", "b"])),
            ],
        )
        .unwrap();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), None).unwrap();
        w.write(&batch).unwrap();
        let meta = w.close().unwrap();
        let stats: Value = serde_json::from_str(&file_stats(&meta, &schema)).unwrap();
        assert_eq!(stats["numRecords"], json!(3));
        assert_eq!(stats["minValues"]["id"], json!("a"));
        assert_eq!(stats["maxValues"]["id"], json!("b"));
        assert_eq!(stats["nullCount"]["id"], json!(1));
        assert_eq!(stats["minValues"]["n"], json!(-1));
        assert_eq!(stats["maxValues"]["n"], json!(7));
        assert_eq!(stats["minValues"]["d"], json!("1970-01-01"));
        assert_eq!(stats["maxValues"]["d"], json!("1971-01-01"));
        assert_eq!(stats["minValues"]["t"], json!("1970-01-01T00:00:00.000Z"));
        // 2.000001 s widened up to the next millisecond: still an upper bound.
        assert_eq!(stats["maxValues"]["t"], json!("1970-01-01T00:00:02.001Z"));
        // A truncated bound is left out, its null count kept.
        assert!(stats["maxValues"].get("long").is_none());
        assert_eq!(stats["nullCount"]["long"], json!(0));
    }

    /// Our first commit of a table is the one delta-rs's `CreateBuilder` makes: the same
    /// protocol (with `timestampNtz` for a `TIMESTAMP` column), metadata and `commitInfo`
    /// operation, all but the table id and the times.
    #[tokio::test]
    async fn a_created_table_has_the_first_commit_create_builder_makes() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
        let ntz = DataType::Timestamp(TimeUnit::Microsecond, None);
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        for (i, columns) in [vec![("id", DataType::Utf8), ("t", utc)], vec![("t", ntz)]]
            .into_iter()
            .enumerate()
        {
            let fields: Vec<Field> = columns
                .into_iter()
                .map(|(n, t)| Field::new(n, t, true))
                .collect();
            let schema = delta_schema(&Schema::new(fields), true).unwrap();
            let (ours, theirs) = (format!("ours{i}"), format!("theirs{i}"));
            let created = create_table_holding(&loc, &ours, &schema, true, Vec::new(), None)
                .await
                .unwrap();
            assert!(matches!(created, Created::New));
            let id = table_id(0);
            assert_eq!(id, "00000000-0000-4000-8000-000000000000");
            let id = table_id(u128::MAX);
            assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
            // A second create finds the first.
            let again = create_table_holding(&loc, &ours, &schema, true, Vec::new(), None)
                .await
                .unwrap();
            assert!(matches!(again, Created::Existing(t) if t.version() == Some(0)));
            // As flatfhir created tables before (and still does those `first_commit` refuses).
            CreateBuilder::new()
                .with_log_store(loc.table_builder(&theirs).unwrap().build_storage().unwrap())
                .with_table_name(&theirs)
                .with_save_mode(SaveMode::Ignore)
                .with_configuration_property(
                    deltalake::TableProperty::CheckpointInterval,
                    Some(CHECKPOINT_INTERVAL.to_string()),
                )
                .with_columns(schema.fields().cloned())
                .with_partition_columns([PARTITION_COLUMN])
                .with_commit_properties(CommitProperties::default().with_max_retries(0))
                .await
                .unwrap();
            let first = |table: &str| -> Vec<Value> {
                let log = tmp
                    .path()
                    .join(table)
                    .join("_delta_log/00000000000000000000.json");
                std::fs::read_to_string(log)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        let mut v: Value = serde_json::from_str(l).unwrap();
                        for (action, keys) in [
                            ("metaData", &["id", "createdTime", "name"][..]),
                            ("commitInfo", &["timestamp"][..]),
                        ] {
                            if let Some(a) = v.get_mut(action).and_then(Value::as_object_mut) {
                                for k in keys {
                                    assert!(a.remove(*k).is_some(), "{action}.{k}");
                                }
                            }
                        }
                        // The table's own metadata (id, time, name) and location.
                        if let Some(p) = v.pointer_mut("/commitInfo/operationParameters") {
                            let p = p.as_object_mut().unwrap();
                            assert!(
                                p.remove("metadata").is_some() && p.remove("location").is_some()
                            );
                        }
                        v
                    })
                    .collect()
            };
            assert_eq!(first(&ours), first(&theirs));
            let t = loc.open_table(&ours).await.unwrap().unwrap();
            let snapshot = t.snapshot().unwrap();
            assert_eq!(snapshot.metadata().name(), Some(ours.as_str()));
            let id = snapshot.metadata().id();
            assert!(id.len() == 36 && id.as_bytes()[14] == b'4', "{id}");
            assert_eq!(snapshot.metadata().partition_columns(), &[PARTITION_COLUMN]);
            assert_eq!(
                snapshot.protocol().min_reader_version() == 3,
                i == 1,
                "timestampNtz only with a TIMESTAMP column"
            );
        }
    }

    #[test]
    fn added_columns_evolve_the_schema_removed_ones_stay_and_changed_types_are_refused() {
        use deltalake::kernel::{DataType as D, StructField};
        let schema = |fields: &[(&str, D, bool)]| {
            StructType::try_new(
                fields
                    .iter()
                    .map(|(n, t, null)| StructField::new(*n, t.clone(), *null)),
            )
            .unwrap()
        };
        let table = schema(&[("id", D::STRING, true), ("n", D::INTEGER, true)]);
        let names = |s: &StructType| s.fields().map(|f| f.name().clone()).collect::<Vec<_>>();
        // Same columns (in any order), or fewer: nothing to change.
        assert!(reconcile_schema("t", &table, &table).unwrap().is_none());
        let fewer = schema(&[("n", D::INTEGER, true)]);
        assert!(reconcile_schema("t", &fewer, &table).unwrap().is_none());
        // A new column goes after the table's, whatever its place in the run.
        let more = schema(&[("x", D::STRING, true), ("id", D::STRING, true)]);
        let evolved = reconcile_schema("t", &more, &table).unwrap().unwrap();
        assert_eq!(names(&evolved), ["id", "n", "x"]);
        // A column of another type, or a new one that cannot be null in the older files.
        let retyped = schema(&[("id", D::STRING, true), ("n", D::LONG, true)]);
        let e = reconcile_schema("t", &retyped, &table)
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed type") && e.contains("n integer"), "{e}");
        let required = schema(&[("y", D::STRING, false)]);
        assert!(reconcile_schema("t", &required, &table).is_err());
    }
}
