//! Stage 3 — view batches → Parquet parts in a dataset.
//!
//! [`DatasetWriter`] keeps one open Parquet file per view under the run's `export=` partition and
//! rolls files by rows, flushing row groups early when the open files together hold more than a
//! memory budget. Writing files is kept apart from publishing them: the writer returns what it
//! wrote ([`WrittenFile`]s) and the run driver ([`crate::run`]) commits them through the dataset
//! protocol ([`crate::dataset`]).
//!
//! [`rows`] turns batches back into JSON rows (the `view` command, conformance tests).

mod concat;
mod json_pages;
pub mod rows;
mod sharded;
mod upload;
mod writer;

pub use crate::dataset::WrittenFile;
pub use concat::{COPY_MIN_BYTES, COPY_MIN_ROWS, concat_parts, copies_whole};
pub use sharded::ShardedWriter;
pub(crate) use upload::Upload;
pub use writer::{
    DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_ROWS_PER_FILE, DEFAULT_ROW_GROUP_ROWS, DatasetWriter,
    DatasetWriterBuilder,
};
