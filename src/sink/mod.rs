//! Stage 3 — RecordBatches → a Hive-partitioned Parquet dataset.
//!
//! ```text
//! DIR/
//!   patient/export=20261126T071825Z/part-00000-<run>.parquet
//!   observation/export=20261126T071825Z/part-00000-<run>.parquet
//!   _rejects/export=20261126T071825Z/part-00000-<run>.parquet   (file, line, reason, raw)
//!   _runs/<run>.json                                             (written last)
//! ```
//!
//! One directory per view, one `export=` partition per run, so repeated loads land side by side
//! and DataFusion, DuckDB, pyarrow or Spark read the tree directly with the partition column.
//! Writing files ([`DatasetWriter`]) is kept apart from publishing the run
//! ([`manifest::RunManifest::publish`]): every Parquet file appears atomically (object_store's
//! staged upload, renamed on completion), and the manifest that lists them is written last;
//! `query` reads only runs that have one.

pub mod manifest;
pub mod rows;
pub mod store;
mod writer;

pub use manifest::RunManifest;
pub use store::DatasetLocation;
pub use writer::{
    DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_ROWS_PER_FILE, DEFAULT_ROW_GROUP_ROWS, DatasetWriter,
    DatasetWriterBuilder, STAGED_SUFFIX, WrittenFile, commit_staged, discard_staged, rejects_batch,
    rejects_schema,
};

/// Directory of run manifests.
pub const RUNS_DIR: &str = "_runs";
/// Table of rejected lines.
pub const REJECTS_TABLE: &str = "_rejects";
/// Partition column holding the run's UTC stamp.
pub const PARTITION_COLUMN: &str = "export";

/// Errors writing a dataset.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The output location is not usable.
    #[error("invalid output location {location}: {message}")]
    Location {
        /// What the user gave.
        location: String,
        /// Why it cannot be used.
        message: String,
    },
    /// Writing to the object store failed.
    #[error("writing {path}: {source}")]
    Store {
        /// The object path.
        path: String,
        /// The cause.
        source: object_store::Error,
    },
    /// Encoding Parquet failed.
    #[error("writing Parquet {path}: {source}")]
    Parquet {
        /// The object path.
        path: String,
        /// The cause.
        source: parquet::errors::ParquetError,
    },
    /// A manifest could not be (de)serialised.
    #[error("run manifest {path}: {source}")]
    Manifest {
        /// The object path.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
}
