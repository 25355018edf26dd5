//! The dataset: where a run's output lives and the protocol that makes it visible.
//!
//! Every command that reads or writes a dataset (`convert`, `export`, `compact`, `query`) goes
//! through this module and through no other command's code, so the rules of the lake are stated
//! once. Every table is a Delta Lake table ([`delta`]):
//!
//! ```text
//! DIR/
//!   <view>/_delta_log/…                                     history: every run's rows, partitioned by run
//!   <view>/export=<run id>/part-<n>-<tag>.parquet
//!   <view>_latest/_delta_log/…, <view>_latest/part-….parquet current state, kept by MERGE
//!   _rejects/, _deleted/, _outcomes/                        rejected lines, tombstones, server outcomes
//!   _runs/<run id>.json                                     run record (accounting), written last
//!   _jobs/<run id>/…                                        an export's job record (resume state)
//! ```
//!
//! * [`location`] — a folder or URL resolved once into an object store plus a prefix.
//! * [`RunIds`] — run ids that are unique even for runs started in the same millisecond on
//!   different machines; the `export=` partition value is the run id, so it orders runs and
//!   tells them apart.
//! * [`delta`] — a run's files committed, one commit per table, idempotently (`txn` = run id).
//! * [`current`] — the `<view>_latest` tables, merged after every run.
//! * [`manifest`] — run records ([`RunManifest`]); [`RunManifest::publish`] is the one way a run
//!   becomes visible: tables' commits, current state, record.
//! * [`job`] — an export's job record, a typed state machine with its resume decisions.
//! * [`staging`] — staged parts made final ([`commit_staged`]) or dropped ([`discard_staged`]).

pub mod current;
pub mod delta;
pub mod job;
pub mod location;
pub mod manifest;
pub mod migrate;
mod run_id;
pub mod staging;

pub use delta::check_views;
pub use job::{FileKind, FileRecord, FileState, JobRecord, JobState, Lease};
pub use location::DatasetLocation;
pub use manifest::{
    Backfill, InputRecord, PhaseSeconds, RunManifest, RunMetrics, ViewKey, WrittenFile,
};
pub use run_id::RunIds;
pub use staging::{Discarded, commit_staged, discard_run, discard_staged, sweep_unfinished_local};

/// Directory of run records.
pub const RUNS_DIR: &str = "_runs";
/// Directory of export job records.
pub const JOBS_DIR: &str = "_jobs";
/// Directory of the records of runs being published (see [`RunManifest::publish`]).
pub const PUBLISHING_DIR: &str = "_publishing";
/// Table of rejected lines.
pub const REJECTS_TABLE: &str = "_rejects";
/// Table of deleted resources announced by servers (tombstones).
pub const DELETED_TABLE: &str = "_deleted";
/// Table of OperationOutcome issues from the servers' error files.
pub const OUTCOMES_TABLE: &str = "_outcomes";
/// Partition column holding the run's id.
pub const PARTITION_COLUMN: &str = "export";
/// Suffix of a staged part: written completely, not yet committed.
pub const STAGED_SUFFIX: &str = ".staged";

/// Errors reading or writing a dataset.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The location is not usable.
    #[error("invalid dataset location {location}: {message}")]
    Location {
        /// What the user gave.
        location: String,
        /// Why it cannot be used.
        message: String,
    },
    /// Reading or writing the object store failed.
    #[error("accessing {path} in the object store")]
    Store {
        /// The object path.
        path: String,
        /// The cause.
        #[source]
        source: object_store::Error,
    },
    /// Encoding Parquet failed.
    #[error("writing Parquet {path}")]
    Parquet {
        /// The object path.
        path: String,
        /// The cause.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A Delta Lake operation on a table failed.
    #[error("Delta table {table}")]
    Delta {
        /// The table.
        table: String,
        /// The cause.
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },
    /// A run's columns cannot join the table's: a column changed type since the table was
    /// created (added and removed columns are fine: see `reconcile_schema`).
    #[error(
        "a column of table {table} changed type: the table has ({table_columns}), this run \
         wrote ({run_columns}); write the changed view to a new dataset or under a new name"
    )]
    SchemaChanged {
        /// The table.
        table: String,
        /// Its columns.
        table_columns: String,
        /// The run's.
        run_columns: String,
    },
    /// A view has a column that no Delta Lake type holds (an `ansi/type` `TIME` column: Delta
    /// has no time-of-day type), found before the run starts.
    #[error(
        "view `{view}`, column `{column}`: {data_type} has no Delta Lake type; remove its \
         `ansi/type` tag (the column then holds the FHIR text) or use another type"
    )]
    UnsupportedColumn {
        /// The view.
        view: String,
        /// The column.
        column: String,
        /// Its Arrow type.
        data_type: String,
    },
    /// The dataset was written by a flatfhir before Delta Lake tables.
    #[error(
        "{location} was written by an older flatfhir (plain Parquet listed by _runs/, no Delta \
         tables): convert it in place with `flatfhir migrate --data {location}`"
    )]
    OldLayout {
        /// The dataset.
        location: String,
    },
    /// A record could not be (de)serialised.
    #[error("record {path}")]
    Manifest {
        /// The object path.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Refuse a dataset of the layout before Delta Lake — run records but no Delta table — with the
/// command that converts it. Every command that reads or writes a dataset checks this first.
pub async fn check_layout(location: &DatasetLocation) -> Result<(), DatasetError> {
    use futures::StreamExt;
    let mut records = location.store.list(Some(&location.child(RUNS_DIR)));
    // The run's first request to the store: an error here (no credentials, no such bucket)
    // fails the run before it reads any input, not after its first part is written.
    let has_runs = match records.next().await {
        Some(Ok(_)) => true,
        None | Some(Err(object_store::Error::NotFound { .. })) => false,
        Some(Err(source)) => {
            return Err(DatasetError::Store {
                path: RUNS_DIR.to_string(),
                source,
            });
        }
    };
    if has_runs && !location.has_delta_tables().await? {
        let runs = RunManifest::list(location).await?;
        if runs
            .iter()
            .any(|r| !r.files.is_empty() && r.committed.is_empty())
        {
            return Err(DatasetError::OldLayout {
                location: location.url.to_string(),
            });
        }
    }
    Ok(())
}
