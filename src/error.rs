//! The crate-level error: one variant per stage, each keeping its cause.

use crate::{
    client::ClientError, flatten::FlattenError, query::QueryError, sink::SinkError, view::ViewError,
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
    /// Writing the dataset failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Querying the dataset failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A broken invariant: this is a bug in flatfhir, please report it.
    #[error("internal error (this is a bug in flatfhir): {0}")]
    Internal(String),
}

/// Result alias using the crate [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
