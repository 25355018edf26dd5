//! Rejected lines as `_rejects` batches, buffered within a bound.
//!
//! A decoder hands out rejected lines as they come; [`RejectBuffer`] turns them into batches of
//! the `_rejects` table as soon as [`MAX_REJECTS_PER_BATCH`] lines or [`MAX_REJECT_BYTES`] of raw
//! text are pending, so a file of millions of bad (or huge) lines holds at most one such batch
//! (plus the rejects of one input chunk) per decoder in memory, whatever the command.

use std::sync::{Arc, OnceLock};

use datafusion::arrow::{
    array::{ArrayRef, StringBuilder, UInt64Builder},
    datatypes::{DataType, Field, Schema, SchemaRef},
    record_batch::RecordBatch,
};

use super::{Reject, ViewBatch};
use crate::dataset::REJECTS_TABLE;

/// Rejected lines buffered before they are handed out as one `_rejects` batch.
pub const MAX_REJECTS_PER_BATCH: usize = 4096;
/// Raw bytes of rejected lines buffered before they are handed out (8 MiB).
pub const MAX_REJECT_BYTES: usize = 8 << 20;

/// Schema of the `_rejects` table.
pub fn rejects_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("file", DataType::Utf8, false),
                Field::new("line", DataType::UInt64, false),
                Field::new("byte_offset", DataType::UInt64, false),
                Field::new("resource_type", DataType::Utf8, true),
                Field::new("reason", DataType::Utf8, false),
                Field::new("raw", DataType::Utf8, false),
            ]))
        })
        .clone()
}

/// Reject records as a `_rejects` batch.
pub fn rejects_batch(rejects: &[Reject]) -> RecordBatch {
    let mut file = StringBuilder::new();
    let mut line = UInt64Builder::with_capacity(rejects.len());
    let mut off = UInt64Builder::with_capacity(rejects.len());
    let mut rt = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut raw = StringBuilder::new();
    for r in rejects {
        file.append_value(&r.file);
        line.append_value(r.line);
        off.append_value(r.byte_offset);
        rt.append_option(r.resource_type.as_deref());
        reason.append_value(&r.reason);
        raw.append_value(&r.raw);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(file.finish()),
        Arc::new(line.finish()),
        Arc::new(off.finish()),
        Arc::new(rt.finish()),
        Arc::new(reason.finish()),
        Arc::new(raw.finish()),
    ];
    RecordBatch::try_new(rejects_schema(), cols).expect("columns match the rejects schema")
}

/// Buffers rejected lines and hands them out as `_rejects` batches within the bounds above.
#[derive(Debug, Default)]
pub struct RejectBuffer {
    pending: Vec<Reject>,
    bytes: usize,
    largest: usize,
}

impl RejectBuffer {
    /// Add rejects; returns the batches that filled up (none most of the time).
    pub fn push(&mut self, rejects: Vec<Reject>) -> Vec<ViewBatch> {
        let mut full = Vec::new();
        for r in rejects {
            self.bytes += r.raw.len() + r.reason.len();
            self.pending.push(r);
            if self.pending.len() >= MAX_REJECTS_PER_BATCH || self.bytes >= MAX_REJECT_BYTES {
                full.extend(self.flush());
            }
        }
        full
    }

    /// Hand out what is pending, if anything.
    pub fn flush(&mut self) -> Option<ViewBatch> {
        if self.pending.is_empty() {
            return None;
        }
        let batch = rejects_batch(&self.pending);
        self.largest = self.largest.max(self.pending.len());
        self.pending.clear();
        self.bytes = 0;
        // A huge line's buffer is not kept for the rest of the input.
        if self.pending.capacity() > MAX_REJECTS_PER_BATCH {
            self.pending.shrink_to(MAX_REJECTS_PER_BATCH);
        }
        Some(ViewBatch {
            view: Arc::from(REJECTS_TABLE),
            batch,
        })
    }

    /// The most rejects ever held at once (what bounds this buffer's memory).
    pub fn largest_batch(&self) -> usize {
        self.largest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(n: u64, raw: usize) -> Reject {
        Reject {
            file: "f".into(),
            line: n,
            byte_offset: 0,
            resource_type: None,
            reason: "bad".into(),
            raw: "x".repeat(raw),
        }
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut buf = RejectBuffer::default();
        let mut out = Vec::new();
        for chunk in 0..30u64 {
            out.extend(buf.push((0..3000).map(|i| reject(chunk * 3000 + i, 1)).collect()));
        }
        out.extend(buf.flush());
        assert_eq!(
            out.iter().map(|b| b.batch.num_rows()).sum::<usize>(),
            90_000
        );
        assert!(
            out.iter()
                .all(|b| b.batch.num_rows() <= MAX_REJECTS_PER_BATCH)
        );
        assert_eq!(buf.largest_batch(), MAX_REJECTS_PER_BATCH);
        // Big lines flush by bytes long before the count.
        let mut buf = RejectBuffer::default();
        let full = buf.push(vec![reject(1, 5 << 20), reject(2, 5 << 20), reject(3, 1)]);
        assert_eq!(
            full.iter().map(|b| b.batch.num_rows()).collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(buf.flush().map(|b| b.batch.num_rows()), Some(1));
    }
}
