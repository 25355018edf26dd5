//! The crate-level error: one variant per stage, each keeping its cause.
//!
//! Messages never repeat their cause: a variant either says what failed and leaves the cause to
//! [`std::error::Error::source`], or is `transparent`. The binary prints the chain once
//! (`error: cannot read x.ndjson: No such file or directory (os error 2)`).

use crate::{
    client::ClientError, dataset::DatasetError, flatten::FlattenError, query::QueryError,
    run::export::ExportError, view::ViewError,
};

/// Any error flatfhir's library can return.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ViewDefinition could not be loaded or compiled.
    #[error(transparent)]
    View(#[from] ViewError),
    /// The Bulk Data server or the network failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Input could not be read or decoded (a whole file, not a single bad line).
    #[error(transparent)]
    Flatten(#[from] FlattenError),
    /// Reading or writing the dataset failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Querying the dataset failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// An export run failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A run failed before it was published; the parts it had written were deleted (those of
    /// tables that had committed it already stay, and the message names them).
    #[error(
        "run {run} into {output} failed after writing {parts} parts ({bytes} bytes), which were deleted{}: {source}",
        if committed.is_empty() {
            String::new()
        } else {
            format!(
                "; tables {} had committed it before the failure and hold its rows",
                committed.join(", ")
            )
        }
    )]
    RunFailed {
        /// The run id.
        run: String,
        /// The dataset.
        output: String,
        /// Parts it had written (deleted).
        parts: usize,
        /// Their bytes.
        bytes: u64,
        /// Tables that hold the run (committed before the failure).
        committed: Vec<String>,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// The run was cancelled (Ctrl-C, or a caller's cancel flag).
    #[error("cancelled")]
    Cancelled,
    /// A broken invariant: this is a bug in flatfhir, please report it.
    #[error("internal error (this is a bug in flatfhir): {0}")]
    Internal(String),
}

impl From<crate::dataset::job::InvalidTransition> for Error {
    fn from(e: crate::dataset::job::InvalidTransition) -> Self {
        Error::Internal(e.to_string())
    }
}

/// Result alias using the crate [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
