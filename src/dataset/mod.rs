//! The dataset: where a run's output lives and the protocol that makes it visible.
//!
//! Every command that reads or writes a dataset (`convert`, `export`, `compact`, `query`) goes
//! through this module and through no other command's code, so the rules of the lake are stated
//! once:
//!
//! ```text
//! DIR/
//!   <view>/export=<run id>/part-<n>-<run id>[-<input>].parquet   one table per view, a partition per run
//!   _rejects/export=<run id>/…                                   rejected lines (file, line, reason, raw)
//!   _deleted/export=<run id>/…, _outcomes/export=<run id>/…      an export's deleted and error files
//!   _runs/<run id>.json                                          run record, written last (the commit point)
//!   _jobs/<run id>.json                                          an export's job record (resume state)
//!   _compactions/<id>.json                                       compaction records (swap files atomically)
//! ```
//!
//! * [`location`] — a folder or URL resolved once into an object store plus a prefix.
//! * [`RunIds`] — run ids that are unique even for runs started in the same millisecond on
//!   different machines; the `export=` partition value is the run id, so it orders runs and
//!   tells them apart.
//! * [`manifest`] — run records ([`RunManifest`]), compaction records and [`live_files`]: the
//!   files a reader should read.
//! * [`job`] — an export's job record, a typed state machine with its resume decisions.
//! * [`staging`] — staged parts made visible ([`commit_staged`]) or dropped ([`discard_staged`]).

pub mod job;
pub mod location;
pub mod manifest;
mod run_id;
pub mod staging;

pub use job::{FileKind, FileRecord, FileState, JobRecord, JobState};
pub use location::DatasetLocation;
pub use manifest::{
    CompactedPartition, CompactionManifest, InputRecord, RunManifest, ViewKey, WrittenFile,
    live_files,
};
pub use run_id::RunIds;
pub use staging::{Discarded, commit_staged, discard_run, discard_staged};

/// Directory of run records.
pub const RUNS_DIR: &str = "_runs";
/// Directory of export job records.
pub const JOBS_DIR: &str = "_jobs";
/// Directory of compaction records.
pub const COMPACTIONS_DIR: &str = "_compactions";
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
