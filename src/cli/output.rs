//! Output formats for the CLI: aligned tables, CSV, ndjson, Parquet, and the run accounting.

use std::io::Write;

use anyhow::Result;
use flatfhir::{
    arrow::{datatypes::SchemaRef, record_batch::RecordBatch, util::pretty::pretty_format_batches},
    dataset::RunManifest,
    sink::rows::{batch_to_json_rows, cell_json, decimal_text, write_json_row},
};

/// Aligned text table (DataFusion style). Decimals are shown without trailing zeros
/// (`3.91`, not `3.910000000000000000`). `more`: the result has rows beyond these, which the
/// footer says (with how to see them).
pub fn write_table(out: &mut impl Write, batches: &[RecordBatch], more: bool) -> Result<()> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if batches.is_empty() {
        writeln!(out, "(0 rows)")?;
        return Ok(());
    }
    let shown = batches
        .iter()
        .map(trim_decimals)
        .collect::<Result<Vec<_>>>()?;
    writeln!(out, "{}", pretty_format_batches(&shown)?)?;
    let s = if rows == 1 { "" } else { "s" };
    if more {
        writeln!(
            out,
            "(the first {rows} row{s}; there are more: --max-rows 0 shows all, --format csv or \
             json writes all without holding them)"
        )?;
    } else {
        writeln!(out, "({rows} row{s})")?;
    }
    Ok(())
}

fn trim_decimals(batch: &RecordBatch) -> Result<RecordBatch> {
    use flatfhir::arrow::{
        array::{Array, Decimal128Array, StringArray},
        datatypes::DataType,
    };
    as_text_where(batch, |f, c| {
        let (DataType::Decimal128(_, s), Some(d)) =
            (f.data_type(), c.as_any().downcast_ref::<Decimal128Array>())
        else {
            return None;
        };
        Some(
            (0..d.len())
                .map(|i| d.is_valid(i).then(|| decimal_text(d.value(i), *s)))
                .collect::<StringArray>(),
        )
    })
}

/// `batch` with the columns for which `text` gives a text rendering replaced by it (Utf8,
/// nullable); the batch itself when it gives none.
fn as_text_where(
    batch: &RecordBatch,
    text: impl Fn(
        &flatfhir::arrow::datatypes::Field,
        &flatfhir::arrow::array::ArrayRef,
    ) -> Option<flatfhir::arrow::array::StringArray>,
) -> Result<RecordBatch> {
    use flatfhir::arrow::{
        array::ArrayRef,
        datatypes::{DataType, Field, Schema},
    };
    let schema = batch.schema();
    let mut changed = false;
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        match text(f, c) {
            Some(t) => {
                changed = true;
                fields.push(Field::new(f.name(), DataType::Utf8, true));
                cols.push(std::sync::Arc::new(t));
            }
            None => {
                fields.push(f.as_ref().clone());
                cols.push(c.clone());
            }
        }
    }
    if !changed {
        return Ok(batch.clone());
    }
    Ok(RecordBatch::try_new(
        std::sync::Arc::new(Schema::new(fields)),
        cols,
    )?)
}

/// CSV with a header, written batch by batch.
pub fn write_csv(out: &mut impl Write, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<()> {
    let mut w = CsvWriter::new(out, schema)?;
    for b in batches {
        w.write(b)?;
    }
    Ok(())
}

/// CSV written batch by batch, the header first (also when no row follows). A list, struct or
/// union cell is its JSON text (`["food","medication"]`); a null cell is empty; decimals are
/// shown without trailing zeros. Each batch is encoded into a buffer and then written, so that
/// a closed pipe is an I/O error (the CSV encoder's own errors keep only the text).
pub struct CsvWriter<'w, W: Write> {
    out: &'w mut W,
    buf: Vec<u8>,
}

impl<'w, W: Write> CsvWriter<'w, W> {
    /// Write the header of `schema`.
    pub fn new(out: &'w mut W, schema: &SchemaRef) -> Result<Self> {
        let mut w = CsvWriter {
            out,
            buf: Vec::new(),
        };
        w.encode(&RecordBatch::new_empty(schema.clone()), true)?;
        Ok(w)
    }

    /// Write the rows of `batch`.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.encode(batch, false)
    }

    fn encode(&mut self, batch: &RecordBatch, header: bool) -> Result<()> {
        self.buf.clear();
        let batch = trim_decimals(&nested_as_json_text(batch)?)?;
        flatfhir::arrow::csv::WriterBuilder::new()
            .with_header(header)
            .build(&mut self.buf)
            .write(&batch)?;
        self.out.write_all(&self.buf)?;
        Ok(())
    }
}

/// Nested columns (lists, structs, unions, maps) as Utf8 columns of their cells' JSON text.
fn nested_as_json_text(batch: &RecordBatch) -> Result<RecordBatch> {
    use flatfhir::arrow::array::StringArray;
    as_text_where(batch, |f, c| {
        f.data_type().is_nested().then(|| {
            (0..c.len())
                .map(|r| match cell_json(f, c.as_ref(), r) {
                    serde_json::Value::Null => None,
                    v => Some(v.to_string()),
                })
                .collect::<StringArray>()
        })
    })
}

/// One JSON object per row.
pub fn write_ndjson(out: &mut impl Write, batches: &[RecordBatch]) -> Result<()> {
    write_view_ndjson(out, batches)
}

/// One JSON object per row, keys in column order, lists as arrays, decimals as numbers.
pub fn write_view_ndjson(out: &mut impl Write, batches: &[RecordBatch]) -> Result<()> {
    for b in batches {
        for row in batch_to_json_rows(b) {
            write_json_row(out, &row)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// A Parquet file.
pub fn write_parquet(
    out: impl Write + Send,
    schema: SchemaRef,
    batches: &[RecordBatch],
) -> Result<()> {
    let mut w = parquet::arrow::ArrowWriter::try_new(out, schema, None)?;
    for b in batches {
        w.write(b)?;
    }
    w.close()?;
    Ok(())
}

/// A plain aligned table of strings.
pub fn write_text_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            let numeric = !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit());
            if i > 0 {
                s.push_str("  ");
            }
            if numeric && i > 0 {
                s.push_str(&format!("{c:>w$}"));
            } else {
                s.push_str(&format!("{c:<w$}"));
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    writeln!(
        out,
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    )?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// The accounting of a run: per type, lines = rows + rejects (+ filtered).
pub fn write_accounting(out: &mut impl Write, m: &RunManifest, location: &str) -> Result<()> {
    let mut rows = Vec::new();
    let mut total = flatfhir::flatten::TypeCounts::default();
    for (t, c) in &m.types {
        total.add(c);
        let ok = c.lines == c.rows + c.rejects + c.filtered
            || t == flatfhir::flatten::INVALID_TYPE_BUCKET;
        rows.push(vec![
            t.clone(),
            c.lines.to_string(),
            c.rows.to_string(),
            c.rejects.to_string(),
            c.filtered.to_string(),
            if ok { "ok" } else { "MISMATCH" }.to_string(),
        ]);
    }
    rows.push(vec![
        "total".into(),
        total.lines.to_string(),
        total.rows.to_string(),
        total.rejects.to_string(),
        total.filtered.to_string(),
        String::new(),
    ]);
    writeln!(out, "run {} (export={}) → {location}", m.run_id, m.export)?;
    write_text_table(
        out,
        &[
            "resource type",
            "lines",
            "rows",
            "rejects",
            "filtered",
            "check",
        ],
        &rows,
    )?;
    let bytes: u64 = m.inputs.iter().map(|i| i.bytes).sum();
    let files = m.files.len();
    writeln!(
        out,
        "{} input file{}, {:.1} MB, {} blank line{}; {} view{}, {files} Parquet file{} written",
        m.inputs.len(),
        plural(m.inputs.len()),
        bytes as f64 / 1e6,
        m.blank_lines,
        plural(m.blank_lines as usize),
        m.views.len(),
        plural(m.views.len()),
        plural(files)
    )?;
    if m.inexact_cells > 0 {
        writeln!(
            out,
            "{} cells held inexactly by their typed column (rounded, or null out of range; the exact text is in `resource` or the `_text` column)",
            m.inexact_cells
        )?;
    }
    if m.rejects > 0 {
        writeln!(
            out,
            "{} lines rejected: see table `_rejects` (flatfhir query --data {location} \"select file, line, reason from _rejects\")",
            m.rejects
        )?;
    }
    if m.view_rejects > 0 {
        writeln!(
            out,
            "{} resources lost their rows in one view that failed on them (their other views have them): see table `_rejects`, reasons starting \"view `…`\"",
            m.view_rejects
        )?;
    }
    Ok(())
}

/// `"s"` unless there is exactly one.
fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
