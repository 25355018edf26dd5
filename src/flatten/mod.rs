//! Stage 2 — ndjson bytes → Arrow `RecordBatch`es, one stream per view.
//!
//! The [`Decoder`] is push-based and knows no I/O: feed it chunks split anywhere
//! ([`Decoder::decode`]), take the batches that are full ([`Decoder::take_batches`]) and the
//! rejected lines ([`Decoder::take_rejects`]), and call [`Decoder::finish`] at end of input.
//! The resource type comes from each line's `resourceType`, never from a file name, and is
//! checked before it can name a table or a path.
//!
//! Every input line ends as rows (in every view over its type) or as one [`Reject`]; a resource
//! that fails in any view is rejected whole, so views never disagree about which resources exist.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use flatfhir::{flatten::DecoderBuilder, view::ViewRegistry};
//! let reg = Arc::new(ViewRegistry::builtin().unwrap());
//! let mut d = DecoderBuilder::new(reg, "in.ndjson").build();
//! d.decode(b"{\"resourceType\":\"Patient\",\"id\":\"p1\",\"gender\":\"female\"}\nnot json\n").unwrap();
//! let batches = d.finish().unwrap();
//! let patient = batches.iter().find(|b| b.view.as_ref() == "patient").unwrap();
//! assert_eq!(patient.batch.num_rows(), 1);
//! let rejects = d.take_rejects();
//! assert_eq!((rejects.len(), rejects[0].line), (1, 2));
//! ```

mod builders;
pub mod bulk_files;
mod decoder;
pub mod lines;
mod rejects;

use std::{collections::BTreeMap, sync::Arc};

use datafusion::arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

pub use decoder::{
    DEFAULT_BATCH_BYTES, DEFAULT_BATCH_SIZE, DEFAULT_MAX_LINE_BYTES, Decoder, DecoderBuilder,
    LARGEST_MAX_LINE_BYTES, MAX_REJECT_RAW_BYTES,
};
pub use rejects::{
    MAX_REJECT_BYTES, MAX_REJECTS_PER_BATCH, RejectBuffer, rejects_batch, rejects_schema,
};

/// Errors that stop the decoding of a whole input (single bad lines become [`Reject`]s instead).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// The input could not be read (missing file, truncated gzip, …).
    #[error("cannot read {file}")]
    Read {
        /// The input file.
        file: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Building a RecordBatch failed — a bug in flatfhir.
    #[error("internal error building view `{view}` (this is a bug in flatfhir): {message}")]
    Internal {
        /// The view.
        view: String,
        /// The cause.
        message: String,
    },
}

/// A batch of rows for one view.
#[derive(Debug, Clone)]
pub struct ViewBatch {
    /// View (table) name.
    pub view: Arc<str>,
    /// The rows.
    pub batch: RecordBatch,
}

/// A line that did not become rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    /// The input file (or URL).
    pub file: String,
    /// 1-based line number.
    pub line: u64,
    /// Byte offset of the line in the (decompressed) input.
    pub byte_offset: u64,
    /// The line's `resourceType` when it had a valid one.
    pub resource_type: Option<String>,
    /// Why, naming the view and column where relevant.
    pub reason: String,
    /// The line as read (invalid UTF-8 replaced), at most its first
    /// [`MAX_REJECT_RAW_BYTES`] (the reason then says so and gives the line's length);
    /// a line over the size limit is not kept.
    pub raw: String,
}

/// Accounting bucket for lines that have no valid resource type.
pub const INVALID_TYPE_BUCKET: &str = "(invalid)";

/// Line accounting for one resource type: `lines = rows + rejects + filtered`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeCounts {
    /// Non-blank lines read.
    pub lines: u64,
    /// Rows written to the type's base view.
    pub rows: u64,
    /// Lines rejected.
    pub rejects: u64,
    /// Resources a `where` clause of the base view left out.
    pub filtered: u64,
}

impl TypeCounts {
    /// Add another count.
    pub fn add(&mut self, o: &TypeCounts) {
        self.lines += o.lines;
        self.rows += o.rows;
        self.rejects += o.rejects;
        self.filtered += o.filtered;
    }
}

/// What one decoder saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodeStats {
    /// Bytes decoded.
    pub bytes: u64,
    /// Lines read, including blank ones.
    pub lines: u64,
    /// Blank lines (skipped, not resources).
    pub blank_lines: u64,
    /// Resources of types no view reads (only with `with_only_viewed_types`).
    pub skipped: u64,
    /// Per resource type (lines with no valid type under [`INVALID_TYPE_BUCKET`]).
    pub types: BTreeMap<String, TypeCounts>,
    /// Rows per view.
    pub view_rows: BTreeMap<String, u64>,
    /// Valid values that a native column (`DECIMAL`, `TIMESTAMP`, `TIME`, `DATE`, `DOUBLE`)
    /// holds only approximately — rounded, clamped, or null when out of its range — counted
    /// once per converted value (see [`crate::view::types`]). Their rows are written, not
    /// rejected; the exact text stays in the raw `resource` column.
    #[serde(default)]
    pub inexact_cells: u64,
    /// Resources that a view other than their type's base view failed on (a user view whose
    /// path meets more values than its column holds, a value a child view cannot convert):
    /// that view has no rows of them and `_rejects` a row naming it; the resources keep their
    /// rows in every other view, so they count as rows, not as rejected lines.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub view_rejects: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DecodeStats {
    /// Merge another decoder's stats.
    pub fn merge(&mut self, o: &DecodeStats) {
        self.bytes += o.bytes;
        self.lines += o.lines;
        self.blank_lines += o.blank_lines;
        self.skipped += o.skipped;
        for (k, v) in &o.types {
            self.types.entry(k.clone()).or_default().add(v);
        }
        for (k, v) in &o.view_rows {
            *self.view_rows.entry(k.clone()).or_default() += v;
        }
        self.inexact_cells += o.inexact_cells;
        self.view_rejects += o.view_rejects;
    }

    /// Total rejects.
    pub fn rejects(&self) -> u64 {
        self.types.values().map(|t| t.rejects).sum()
    }
}
