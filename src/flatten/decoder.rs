//! The push decoder: lines → JSON → every view over the line's resource type → builders.

use std::{collections::HashMap, sync::Arc};

use super::{
    DecodeStats, FlattenError, INVALID_TYPE_BUCKET, Reject, TypeCounts, ViewBatch,
    builders::ViewBuilders,
    lines::{Line, LineSplitter},
};
use crate::view::{
    CompiledView, EvalBuffers, EvalScratch, RootScan, RowId, SharedColumns, ViewRegistry,
    is_r4_resource_type, is_valid_resource_type,
    json::{JsonBuffers, JsonDoc, JsonRef, member, to_json_text},
    snake_case,
};

/// Rows per RecordBatch handed out by the decoder (2048). Every view of every decode worker
/// keeps one batch under construction, so this bounds memory: on synthea-100 ×10 (41 views, 2
/// workers) peak RSS is ~300 MB at 8192 rows, ~250 MB at 2048 and ~225 MB at 1024, for +0.2%
/// and +0.8% instructions (Parquet row groups are sized separately).
pub const DEFAULT_BATCH_SIZE: usize = 2048;
/// A batch is also handed out once its raw `resource` column holds this many bytes (6 MiB), so
/// that a batch of large resources (an ExplanationOfBenefit line is ~5 KB) stays small: batches
/// wait in bounded channels and builders, so their size is what bounds memory, not their rows.
///
/// 6 MiB rather than 8: the raw column's buffer (presized an eighth above the last batch's)
/// then stays under jemalloc's 8 MiB "oversize" threshold. An oversize allocation comes from a
/// dedicated arena that hands its pages back to the OS as soon as it is freed, so every batch's
/// buffer started on fresh pages; synthea ×100 convert, 2 cores: 770k → 335k page faults,
/// system time 4.0 → 2.4 s, peak RSS within its run-to-run band (260–280 MB).
pub const DEFAULT_BATCH_BYTES: usize = 6 << 20;
/// Row ids of one line kept for the next (64 Ki); a longer list is freed after its line.
const MAX_KEPT_ROWS: usize = 1 << 16;
/// Lines longer than this (256 KiB) are followed by [`EvalScratch::trim`].
const TRIM_AFTER_BYTES: usize = 256 << 10;
/// Bytes of a rejected line kept in its reject record (64 KiB): a longer line is cut (at a
/// character boundary) and its reason says so and gives the line's length, so that the memory
/// rejects take is bounded whatever the bad lines.
pub const MAX_REJECT_RAW_BYTES: usize = 64 << 10;
/// The largest line limit that can be set (2 GiB - 1): the JSON parser's offsets are 31-bit.
pub const LARGEST_MAX_LINE_BYTES: usize = (1 << 31) - 1;
/// Longest accepted ndjson line by default (64 MiB; `--max-line-bytes`); longer lines are
/// rejected without being buffered (their reject says the limit and how to raise it). A line
/// costs a few times its size while it is decoded, per decode thread.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

/// Configures a [`Decoder`].
#[derive(Debug, Clone)]
pub struct DecoderBuilder {
    registry: Arc<ViewRegistry>,
    file: String,
    batch_size: usize,
    batch_bytes: usize,
    max_line_bytes: usize,
    only_viewed: bool,
    first_line: u64,
    start_offset: u64,
    share_cells: bool,
    share_scan: bool,
}

impl DecoderBuilder {
    /// A decoder for one input; `file` names it in reject records.
    pub fn new(registry: Arc<ViewRegistry>, file: impl Into<String>) -> Self {
        DecoderBuilder {
            registry,
            file: file.into(),
            batch_size: DEFAULT_BATCH_SIZE,
            batch_bytes: DEFAULT_BATCH_BYTES,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            only_viewed: false,
            first_line: 1,
            start_offset: 0,
            share_cells: true,
            share_scan: true,
        }
    }
    /// Where the input starts in its file (default line 1, offset 0): `line` is the 1-based
    /// number of its first line and `offset` the absolute byte offset of its first byte, so that
    /// rejects name the file's own line numbers and offsets when a file is decoded in byte
    /// ranges. The input must start at the beginning of a line. [`DecodeStats::bytes`] and
    /// `lines` count this input only.
    pub fn with_start(mut self, line: u64, offset: u64) -> Self {
        self.first_line = line.max(1);
        self.start_offset = offset;
        self
    }
    /// Skip (and count as `skipped`) resources of types no view reads, instead of landing them
    /// in a generic base table, and add no generic base table beside the views of a type that
    /// has no base view (default `false`). Used when running one view, and for an export's
    /// deleted and error files ([`super::bulk_files`]).
    pub fn with_only_viewed_types(mut self, only: bool) -> Self {
        self.only_viewed = only;
        self
    }
    /// Rows per batch (default [`DEFAULT_BATCH_SIZE`]).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// Raw `resource` bytes after which a batch is handed out before it has `batch_size` rows
    /// (default [`DEFAULT_BATCH_BYTES`]).
    pub fn with_batch_bytes(mut self, n: usize) -> Self {
        self.batch_bytes = n.max(1);
        self
    }
    /// Longest accepted line (default [`DEFAULT_MAX_LINE_BYTES`]).
    pub fn with_max_line_bytes(mut self, n: usize) -> Self {
        self.max_line_bytes = n.max(1);
        self
    }
    /// Copy the cells a view shares with its type's base view from the base view's row
    /// ([`CompiledView::shared_root_columns`]) instead of evaluating them again (default
    /// `true`). Off only to check that the output is the same either way.
    #[doc(hidden)]
    pub fn with_shared_cells(mut self, on: bool) -> Self {
        self.share_cells = on;
        self
    }
    /// Scan each resource's root object once for all the views of its type ([`RootScan`])
    /// instead of once per view (default `true`). Off only to check that the output is the
    /// same either way.
    #[doc(hidden)]
    pub fn with_shared_scan(mut self, on: bool) -> Self {
        self.share_scan = on;
        self
    }
    /// Build the decoder.
    pub fn build(self) -> Decoder {
        Decoder {
            lines: LineSplitter::starting_at(
                self.max_line_bytes,
                self.first_line,
                self.start_offset,
            ),
            registry: self.registry,
            file: self.file,
            batch_size: self.batch_size,
            batch_bytes: self.batch_bytes,
            max_line_bytes: self.max_line_bytes,
            only_viewed: self.only_viewed,
            share_cells: self.share_cells,
            share_scan: self.share_scan,
            slots: Vec::new(),
            slot_index: HashMap::new(),
            outputs: Vec::new(),
            output_index: HashMap::new(),
            ready: Vec::new(),
            rejects: Vec::new(),
            stats: DecodeStats::default(),
            json: JsonBuffers::default(),
            scratch: EvalScratch::new(),
            line_rows: Vec::new(),
            line_views: Vec::new(),
        }
    }
}

/// Push decoder from ndjson bytes to per-view RecordBatches. See the [module docs](super).
pub struct Decoder {
    lines: LineSplitter,
    registry: Arc<ViewRegistry>,
    file: String,
    batch_size: usize,
    batch_bytes: usize,
    max_line_bytes: usize,
    only_viewed: bool,
    share_cells: bool,
    share_scan: bool,
    /// One per resource type seen that is R4 or read by a view, resolved on its first line
    /// (see [`TypeSlot`]); other names get none, so their number costs no memory.
    slots: Vec<TypeSlot>,
    slot_index: HashMap<String, usize>,
    /// One per view that received rows, in first-seen order.
    outputs: Vec<Output>,
    output_index: HashMap<String, usize>,
    ready: Vec<ViewBatch>,
    rejects: Vec<Reject>,
    stats: DecodeStats,
    /// Parse buffers reused from line to line.
    json: JsonBuffers,
    /// Evaluation buffers reused from line to line.
    scratch: EvalScratch,
    /// The row ids of the line being decoded, and which views they belong to.
    line_rows: Vec<RowId>,
    line_views: Vec<ViewRows>,
}

/// The rows one view produced for the current line.
struct ViewRows {
    /// Index into [`Decoder::outputs`].
    output: usize,
    /// The view is the type's base view (its rows count as the type's rows).
    base: bool,
    /// `false` when `where` filtered the resource out.
    included: bool,
    /// Range of the line's row ids.
    rows: std::ops::Range<usize>,
    /// Cells per row.
    width: usize,
}

/// What the decoder knows about one resource type, resolved once on its first line, so that a
/// line costs no registry scan, no name formatting and no map insert: the views to evaluate
/// (with the index of their output) and the line counts since they were last folded into
/// [`DecodeStats`] (once per [`Decoder::decode`] call).
struct TypeSlot {
    resource_type: String,
    kind: SlotKind,
    /// The base view first (evaluated first, so that the others can copy its cells), then
    /// the other registry views in name order, or the generic base view when the type has none.
    views: Vec<SlotView>,
    /// The scan of a resource's root for all of `views`, when one serves them.
    root_scan: Option<RootScan>,
    counts: TypeCounts,
}

/// One view of a [`TypeSlot`].
struct SlotView {
    view: Arc<CompiledView>,
    /// Index into [`Decoder::outputs`].
    output: usize,
    /// The type's base view.
    base: bool,
    /// Columns copied from the base view's row ([`CompiledView::shared_root_columns`]).
    shared: SharedColumns,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    /// Evaluated by its views.
    Viewed,
    /// An R4 type no view reads, and `only_viewed` is set: counted as skipped.
    Skipped,
}

/// The builders of one view, created on its first row.
struct Output {
    name: Arc<str>,
    view: Arc<CompiledView>,
    builders: Option<ViewBuilders>,
    /// Rows since the counts were last folded into [`DecodeStats::view_rows`].
    rows: u64,
}

struct LineCx<'d> {
    registry: &'d ViewRegistry,
    file: &'d str,
    batch_size: usize,
    batch_bytes: usize,
    max_line_bytes: usize,
    only_viewed: bool,
    share_cells: bool,
    share_scan: bool,
    slots: &'d mut Vec<TypeSlot>,
    slot_index: &'d mut HashMap<String, usize>,
    outputs: &'d mut Vec<Output>,
    output_index: &'d mut HashMap<String, usize>,
    ready: &'d mut Vec<ViewBatch>,
    rejects: &'d mut Vec<Reject>,
    stats: &'d mut DecodeStats,
    json: &'d mut JsonBuffers,
    scratch: &'d mut EvalScratch,
    line_rows: &'d mut Vec<RowId>,
    line_views: &'d mut Vec<ViewRows>,
}

impl Decoder {
    /// Feed a chunk of input (split anywhere). Returns the number of bytes consumed (all of them).
    pub fn decode(&mut self, buf: &[u8]) -> Result<usize, FlattenError> {
        let mut lines = std::mem::replace(&mut self.lines, LineSplitter::new(0));
        let mut cx = self.cx();
        let r = lines.push(buf, |line| cx.line(line));
        self.lines = lines;
        self.fold_counts();
        r.map(|_| buf.len())
    }

    /// Add the per-type and per-view counts gathered since the last call to the stats.
    fn fold_counts(&mut self) {
        for slot in &mut self.slots {
            let c = std::mem::take(&mut slot.counts);
            if c != TypeCounts::default() {
                self.stats
                    .types
                    .entry(slot.resource_type.clone())
                    .or_default()
                    .add(&c);
            }
        }
        for o in &mut self.outputs {
            if o.rows > 0 {
                *self.stats.view_rows.entry(o.name.to_string()).or_default() += o.rows;
                o.rows = 0;
            }
        }
    }

    /// End of input: decode a last line without newline and flush every view's rows.
    pub fn finish(&mut self) -> Result<Vec<ViewBatch>, FlattenError> {
        let mut lines = std::mem::replace(&mut self.lines, LineSplitter::new(0));
        let mut cx = self.cx();
        let r = lines.finish(|line| cx.line(line));
        self.stats.bytes = lines.bytes();
        self.lines = lines;
        self.fold_counts();
        r?;
        let mut order: Vec<usize> = (0..self.outputs.len()).collect();
        order.sort_by(|a, b| self.outputs[*a].name.cmp(&self.outputs[*b].name));
        for i in order {
            let o = &mut self.outputs[i];
            if let Some(b) = o.builders.as_mut().filter(|b| b.rows > 0) {
                let batch = b.finish().map_err(|message| FlattenError::Internal {
                    view: o.name.to_string(),
                    message,
                })?;
                self.ready.push(ViewBatch {
                    view: o.name.clone(),
                    batch,
                });
            }
        }
        Ok(std::mem::take(&mut self.ready))
    }

    /// Batches that reached the batch size so far.
    pub fn take_batches(&mut self) -> Vec<ViewBatch> {
        std::mem::take(&mut self.ready)
    }

    /// Lines rejected so far.
    pub fn take_rejects(&mut self) -> Vec<Reject> {
        std::mem::take(&mut self.rejects)
    }

    /// Counts so far.
    pub fn stats(&self) -> &DecodeStats {
        &self.stats
    }

    fn cx(&mut self) -> LineCx<'_> {
        LineCx {
            registry: &self.registry,
            file: &self.file,
            batch_size: self.batch_size,
            batch_bytes: self.batch_bytes,
            max_line_bytes: self.max_line_bytes,
            only_viewed: self.only_viewed,
            share_cells: self.share_cells,
            share_scan: self.share_scan,
            slots: &mut self.slots,
            slot_index: &mut self.slot_index,
            outputs: &mut self.outputs,
            output_index: &mut self.output_index,
            ready: &mut self.ready,
            rejects: &mut self.rejects,
            stats: &mut self.stats,
            json: &mut self.json,
            scratch: &mut self.scratch,
            line_rows: &mut self.line_rows,
            line_views: &mut self.line_views,
        }
    }
}

/// A rejected line's bytes as text for the `raw` column: as they are when they are UTF-8;
/// otherwise each byte that is not part of a UTF-8 character as `\xNN` (a Windows-1252
/// `M\xfcller`), and the reason says so — the bytes stay recoverable, where U+FFFD lost them.
fn raw_text(b: &[u8], reason: &mut String) -> String {
    if let Ok(s) = std::str::from_utf8(b) {
        return s.to_string();
    }
    let mut out = String::with_capacity(b.len() + 16);
    for chunk in b.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    reason.push_str(" (raw: bytes that are not UTF-8 shown as \\xNN)");
    out
}

impl LineCx<'_> {
    fn reject(&mut self, line: &Line<'_>, resource_type: Option<&str>, mut reason: String) {
        let raw = match line.bytes {
            Some(b) if b.len() > MAX_REJECT_RAW_BYTES => {
                // Rejects wait in bounded queues by count, so a whole 60 MiB line per reject
                // made peak memory GBs; a prefix is enough to see what the line was.
                let mut cut = MAX_REJECT_RAW_BYTES;
                while cut > 0 && (b[cut] & 0xC0) == 0x80 {
                    cut -= 1; // not inside a UTF-8 character
                }
                reason.push_str(&format!(
                    " (raw: the first {cut} of the line's {} bytes)",
                    b.len()
                ));
                raw_text(&b[..cut], &mut reason)
            }
            Some(b) => raw_text(b, &mut reason),
            None => "(line longer than the limit; not kept)".to_string(),
        };
        let bucket = resource_type.unwrap_or(INVALID_TYPE_BUCKET);
        self.stats
            .types
            .entry(bucket.to_string())
            .or_default()
            .rejects += 1;
        self.rejects.push(Reject {
            file: self.file.to_string(),
            line: line.number,
            byte_offset: line.offset,
            resource_type: resource_type.map(str::to_string),
            reason,
            raw,
        });
    }

    /// Record that one view failed on a resource whose other views keep their rows: a row of
    /// `_rejects` naming the view, counted apart from rejected lines (see
    /// [`DecodeStats::view_rejects`]).
    fn reject_view_rows(&mut self, line: &Line<'_>, resource_type: &str, reason: String) {
        self.reject(line, Some(resource_type), reason);
        // `reject` counted a rejected line: this one is not (its resource has its rows).
        if let Some(t) = self.stats.types.get_mut(resource_type) {
            t.rejects -= 1;
        }
        self.stats.view_rejects += 1;
    }

    /// Reject a line whose resource type is unknown (counted in the invalid-type bucket).
    fn reject_untyped(&mut self, line: &Line<'_>, reason: String) {
        self.stats
            .types
            .entry(INVALID_TYPE_BUCKET.into())
            .or_default()
            .lines += 1;
        self.reject(line, None, reason);
    }

    fn line(&mut self, line: Line<'_>) -> Result<(), FlattenError> {
        self.stats.lines += 1;
        let Some(bytes) = line.bytes else {
            let reason = format!(
                "line is {} bytes, longer than the limit of {} (raise it with --max-line-bytes); \
                 not decoded, and not kept",
                line.len,
                bytes_text(self.max_line_bytes)
            );
            self.reject_untyped(&line, reason);
            return Ok(());
        };
        // A byte-order mark at the start of a line other than the file's first (which the
        // splitter drops): files written with one, joined by `cat`. It is no part of the
        // resource, so it costs neither the row nor the raw column.
        let bytes = bytes.strip_prefix(super::lines::BOM).unwrap_or(bytes);
        if bytes.iter().all(u8::is_ascii_whitespace) {
            self.stats.blank_lines += 1;
            return Ok(());
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let at = e.valid_up_to() + 1;
                self.reject_untyped(
                    &line,
                    format!(
                        "malformed JSON: invalid UTF-8 at column {at}{}",
                        encoding_hint(bytes)
                    ),
                );
                return Ok(());
            }
        };
        let doc = match JsonDoc::parse_with(text, std::mem::take(self.json)) {
            Ok(d) => d,
            Err(e) => {
                let reason = if e.is_too_deep() {
                    // Not malformed: deeper than the parser goes.
                    format!("JSON {e} (the parser's limit, far beyond real FHIR)")
                } else {
                    format!("malformed JSON: {e}{}", encoding_hint(bytes))
                };
                self.reject_untyped(&line, reason);
                return Ok(());
            }
        };
        let value = doc.root();
        let rt = match member(value, "resourceType").map(|v| v.kind()) {
            Some(JsonRef::String(s)) if is_valid_resource_type(s) => s,
            other => {
                let reason = match other {
                    None if !matches!(value.kind(), JsonRef::Object(_)) => {
                        "not a FHIR resource: the line is not a JSON object".to_string()
                    }
                    None => "not a FHIR resource: no `resourceType`".to_string(),
                    Some(v) => {
                        let text = match v {
                            JsonRef::Number(n) => to_json_text(n),
                            JsonRef::String(s) => format!("{s:?}"),
                            JsonRef::Bool(b) => b.to_string(),
                            JsonRef::Null => "null".to_string(),
                            JsonRef::Array(_) => "[...]".to_string(),
                            JsonRef::Object(_) => "{...}".to_string(),
                        };
                        let shown: String = text.chars().take(80).collect();
                        format!(
                            "invalid `resourceType` {shown}: must match ^[A-Z][A-Za-z0-9]{{0,63}}$"
                        )
                    }
                };
                self.reject_untyped(&line, reason);
                return Ok(());
            }
        };
        let Some(slot) = self.slot(rt) else {
            // Not R4 and no view reads it: nothing to keep for it (a slot per name would let
            // a file of distinct made-up names grow memory without bound).
            if self.only_viewed {
                self.stats.skipped += 1;
            } else {
                let reason =
                    format!("unknown resource type {rt:?} (not FHIR R4, and no view reads it)");
                self.reject_untyped(&line, reason);
            }
            *self.json = doc.into_buffers();
            return Ok(());
        };
        if self.slots[slot].kind == SlotKind::Skipped {
            self.stats.skipped += 1;
            *self.json = doc.into_buffers();
            return Ok(());
        }
        self.slots[slot].counts.lines += 1;
        // Evaluate every view first; append only when all succeeded. The rows of all views
        // live in one arena (`bufs`); `ids` holds each view's row ids, `results` their ranges.
        let views = &self.slots[slot].views;
        let mut bufs = self.scratch.lend();
        let root = self.slots[slot]
            .root_scan
            .as_ref()
            .and_then(|r| bufs.scan_root(r, value));
        let (ids, results) = (&mut *self.line_rows, &mut *self.line_views);
        ids.clear();
        results.clear();
        // Failures of views other than the base view: those views lose the resource's rows,
        // the others keep them (a user view's mistake does not cost the resource its row).
        let mut failed: Vec<String> = Vec::new();
        // The base view's row, whose cells the other views may copy.
        let mut base_row = None;
        for (
            k,
            SlotView {
                view,
                output,
                base,
                shared,
            },
        ) in views.iter().enumerate()
        {
            let start = ids.len();
            let given = match base_row {
                Some(row) if self.share_cells && !shared.is_empty() => Some(shared.given(row)),
                _ => None,
            };
            let sites = root.map(|r| r.view(k));
            match view.evaluate_given(value, ids, &mut bufs, given, sites) {
                Ok(included) => {
                    if *base && ids.len() == start + 1 {
                        base_row = Some(ids[start]);
                    }
                    results.push(ViewRows {
                        output: *output,
                        base: *base,
                        included,
                        rows: start..ids.len(),
                        width: view.columns().len(),
                    })
                }
                Err(e) if !*base => {
                    ids.truncate(start);
                    failed.push(format!("view `{}`: {e}", view.name()));
                }
                Err(e) => {
                    self.scratch.restore(bufs);
                    self.trim_after(text.len());
                    self.reject(&line, Some(rt), e.to_string());
                    *self.json = doc.into_buffers();
                    return Ok(());
                }
            }
        }
        // The base view succeeded, so the resource's rows are written: count its inexact cells.
        self.stats.inexact_cells += bufs.inexact_cells();
        for reason in failed {
            self.reject_view_rows(&line, rt, reason);
        }
        let r = self.append_rows(slot, &bufs, text);
        self.scratch.restore(bufs);
        self.trim_after(text.len());
        *self.json = doc.into_buffers();
        r
    }

    /// After a line of `len` bytes: free the buffers a huge resource grew, so that it does not
    /// hold their memory for the rest of the run.
    fn trim_after(&mut self, len: usize) {
        if len > TRIM_AFTER_BYTES {
            self.scratch.trim();
        }
        if self.line_rows.capacity() > MAX_KEPT_ROWS {
            *self.line_rows = Vec::new();
        }
    }

    /// Append the rows of one line, evaluated into `bufs`, to the builders of their views.
    fn append_rows(
        &mut self,
        slot: usize,
        bufs: &EvalBuffers<'_>,
        text: &str,
    ) -> Result<(), FlattenError> {
        for v in self.line_views.iter() {
            let rows = &self.line_rows[v.rows.clone()];
            if v.base {
                let t = &mut self.slots[slot].counts;
                if v.included {
                    t.rows += rows.len() as u64
                } else {
                    t.filtered += 1
                }
            }
            if rows.is_empty() {
                continue;
            }
            let o = &mut self.outputs[v.output];
            o.rows += rows.len() as u64;
            let (batch_size, batch_bytes) = (self.batch_size, self.batch_bytes);
            let out = o
                .builders
                .get_or_insert_with(|| ViewBuilders::new(o.view.clone(), batch_size, batch_bytes));
            for &row in rows {
                out.append(bufs.row(row, v.width), text);
                if out.rows >= batch_size || out.raw_bytes() >= self.batch_bytes {
                    let batch = out.finish().map_err(|message| FlattenError::Internal {
                        view: o.name.to_string(),
                        message,
                    })?;
                    self.ready.push(ViewBatch {
                        view: o.name.clone(),
                        batch,
                    });
                }
            }
        }
        Ok(())
    }

    /// The slot of `rt`, resolved from the registry on the type's first line; `None` for a
    /// type that is not R4 and that no view reads (skipped or rejected, and given no slot:
    /// their names are unbounded, the R4 types and the views are not).
    fn slot(&mut self, rt: &str) -> Option<usize> {
        if let Some(&i) = self.slot_index.get(rt) {
            return Some(i);
        }
        let registry = self.registry;
        let has_views = registry.views_for(rt).next().is_some();
        if !has_views && !is_r4_resource_type(rt) {
            return None;
        }
        let kind = if has_views || !self.only_viewed {
            SlotKind::Viewed
        } else {
            SlotKind::Skipped
        };
        let base_name = snake_case(rt);
        let mut views: Vec<Arc<CompiledView>> = Vec::new();
        if kind == SlotKind::Viewed {
            views.extend(registry.views_for(rt).cloned());
            if registry.base_view(rt).is_none() && !self.only_viewed {
                views.push(Arc::new(generic_view(rt, registry.raw())));
            }
        }
        let views = views
            .into_iter()
            .map(|v| {
                let output = match self.output_index.get(v.name()) {
                    Some(&o) => o,
                    None => {
                        self.outputs.push(Output {
                            name: v.name().into(),
                            view: v.clone(),
                            builders: None,
                            rows: 0,
                        });
                        self.output_index
                            .insert(v.name().to_string(), self.outputs.len() - 1);
                        self.outputs.len() - 1
                    }
                };
                let base = v.name() == base_name;
                (v, output, base)
            })
            .collect::<Vec<_>>();
        let base_view = views.iter().find(|(_, _, b)| *b).map(|(v, ..)| v.clone());
        let mut views: Vec<SlotView> = views
            .into_iter()
            .map(|(view, output, base)| SlotView {
                shared: match &base_view {
                    Some(b) if !base => view.shared_root_columns(b),
                    _ => SharedColumns::default(),
                },
                view,
                output,
                base,
            })
            .collect();
        views.sort_by_key(|v| !v.base);
        let root_scan = if self.share_scan {
            RootScan::new(views.iter().map(|v| &*v.view))
        } else {
            None
        };
        self.slots.push(TypeSlot {
            resource_type: rt.to_string(),
            kind,
            views,
            root_scan,
            counts: TypeCounts::default(),
        });
        self.slot_index.insert(rt.to_string(), self.slots.len() - 1);
        Some(self.slots.len() - 1)
    }
}

/// `n` bytes for people: `64 MiB`, else `1000 bytes`.
fn bytes_text(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// What a malformed line's bytes suggest about its file, for the reject's reason: a file saved
/// as UTF-16 (Windows tools, PowerShell's `>`: a `FF FE`/`FE FF` byte-order mark, or a NUL
/// byte beside every ASCII character), or one whose lines end with a lone CR (old Mac line
/// endings: the whole file is one "line"). Such files give a reject per line, or one for the
/// file, whose plain "malformed JSON" says nothing of what to fix.
fn encoding_hint(bytes: &[u8]) -> &'static str {
    let utf16_bom = bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF");
    let nuls = bytes.iter().take(256).filter(|b| **b == 0).count();
    if utf16_bom || nuls * 4 >= bytes.len().min(256) {
        " (the file looks UTF-16 encoded; ndjson is UTF-8: convert it, e.g. with \
         `iconv -f UTF-16 -t UTF-8`)"
    } else if memchr::memchr(b'\r', bytes).is_some_and(|i| i + 1 < bytes.len()) {
        " (the line holds a carriage return (CR) before its end: lines that end with a lone CR \
         are not ndjson lines, which end with LF or CRLF)"
    } else {
        ""
    }
}

/// The base view of a resource type that has none: `id`, `resource_type`, `last_updated` (+ raw).
pub fn generic_view(resource_type: &str, raw: bool) -> CompiledView {
    let def = serde_json::json!({
        "name": snake_case(resource_type),
        "resource": resource_type,
        "description": format!("Generic base table for {resource_type}: no view defines it"),
        "constant": [{"name": "rt", "valueString": resource_type}],
        "select": [{"column": [
            {"name": "id", "path": "id", "type": "id"},
            {"name": "resource_type", "path": "%rt", "type": "string"},
            {"name": "last_updated", "path": "meta.lastUpdated", "type": "instant",
             "tag": [{"name": "ansi/type", "value": "TIMESTAMP WITH TIME ZONE"}]}
        ]}]
    });
    let mut v = CompiledView::from_json(&def.to_string(), "<generic>")
        .unwrap_or_else(|e| unreachable!("the generic view is valid: {e}"));
    v.set_raw_column(raw);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::json::{JsonDoc, MAX_DEPTH, to_json_text};

    /// Scanning each resource's root once for all the views of its type gives the same
    /// batches, rejects and counts as every view scanning on its own, on the fixtures (the
    /// hostile ones too).
    #[test]
    fn one_root_scan_per_resource_equals_one_per_view() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut files = 0;
        for dir in ["ndjson", "bad", "valid_fhir", "dispatch"] {
            for e in std::fs::read_dir(data.join(dir)).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_none_or(|x| x != "ndjson") {
                    continue;
                }
                let input = std::fs::read(&p).unwrap();
                let run = |shared: bool| {
                    let mut d = DecoderBuilder::new(reg.clone(), "f")
                        .with_shared_scan(shared)
                        .with_batch_size(7)
                        .build();
                    d.decode(&input).unwrap();
                    let mut batches = d.take_batches();
                    batches.extend(d.finish().unwrap());
                    let batches: Vec<_> = batches
                        .into_iter()
                        .map(|b| (b.view.to_string(), b.batch))
                        .collect();
                    let scans = d.slots.iter().filter(|s| s.root_scan.is_some()).count();
                    let rejects = format!("{:?}", d.take_rejects());
                    (batches, rejects, format!("{:?}", d.stats()), scans)
                };
                let (shared, alone) = (run(true), run(false));
                assert_eq!(shared.0, alone.0, "{}", p.display());
                assert_eq!(shared.1, alone.1, "{}", p.display());
                assert_eq!(shared.2, alone.2, "{}", p.display());
                assert_eq!(alone.3, 0);
                if p.ends_with("ndjson/Observation.ndjson") {
                    assert_eq!(shared.3, 1, "the Observation views share a scan");
                }
                files += 1;
            }
        }
        assert!(files > 20, "{files}");
    }

    /// Distinct made-up resource type names keep no state each (regression: hunt finding 7:
    /// 2 M names grew memory by ~400 MB); they are still rejected and counted as invalid.
    #[test]
    fn unknown_types_keep_no_state() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        for only_viewed in [false, true] {
            let mut d = DecoderBuilder::new(reg.clone(), "f")
                .with_only_viewed_types(only_viewed)
                .build();
            let mut input = String::new();
            for i in 0..1000 {
                input.push_str(&format!("{{\"resourceType\":\"Zz{i}Made\"}}\n"));
            }
            input.push_str("{\"resourceType\":\"Patient\",\"id\":\"p\"}\n");
            d.decode(input.as_bytes()).unwrap();
            d.finish().unwrap();
            assert_eq!(d.slots.len(), 1, "only Patient has a slot");
            assert_eq!(d.slot_index.len(), 1);
            let stats = d.stats().clone();
            if only_viewed {
                assert_eq!(stats.skipped, 1000);
            } else {
                let bucket = &stats.types[INVALID_TYPE_BUCKET];
                assert_eq!((bucket.lines, bucket.rejects), (1000, 1000));
                let r = d.take_rejects();
                assert_eq!(r.len(), 1000);
                assert!(r[7].reason.contains("unknown resource type \"Zz7Made\""));
            }
            assert_eq!(stats.types["Patient"].rows, 1);
        }
    }

    /// A rejected line keeps at most [`MAX_REJECT_RAW_BYTES`] of itself, and its reason says
    /// so (regression: hunt finding 9: whole 60 MiB lines per reject made peak memory GBs).
    #[test]
    fn rejects_keep_a_bounded_prefix_of_long_lines() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let mut d = DecoderBuilder::new(reg, "f").build();
        // Malformed after 1 MB of two-byte characters, so the cut falls inside one.
        let long = format!(
            "{{\"resourceType\":\"Patient\",\"x\":\"{}\n",
            "é".repeat(500_000)
        );
        d.decode(long.as_bytes()).unwrap();
        d.decode(b"not json\n").unwrap();
        d.finish().unwrap();
        let r = d.take_rejects();
        assert_eq!(r.len(), 2);
        assert!(r[0].raw.len() <= MAX_REJECT_RAW_BYTES, "{}", r[0].raw.len());
        assert!(r[0].raw.len() > MAX_REJECT_RAW_BYTES - 4);
        assert!(long.starts_with(&r[0].raw), "cut on a character boundary");
        let len = long.len() - 1;
        assert!(
            r[0].reason.ends_with(&format!(
                " (raw: the first {} of the line's {len} bytes)",
                r[0].raw.len()
            )),
            "{}",
            r[0].reason
        );
        assert_eq!(r[1].raw, "not json");
        assert!(!r[1].reason.contains("raw:"), "{}", r[1].reason);
    }

    /// A line over the limit is rejected with a reason that gives the limit and the option
    /// that raises it, and the limit is configurable (regression: hunt finding 5).
    #[test]
    fn the_line_limit_is_named_and_configurable() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let line = format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"{}\"}}\n",
            "p".repeat(64)
        );
        for (limit, rows) in [(64, 0), (1 << 10, 1)] {
            let mut d = DecoderBuilder::new(reg.clone(), "f")
                .with_max_line_bytes(limit)
                .build();
            d.decode(line.as_bytes()).unwrap();
            d.finish().unwrap();
            assert_eq!(d.stats().types.get("Patient").map_or(0, |t| t.rows), rows);
            let r = d.take_rejects();
            if rows == 0 {
                assert_eq!(
                    r[0].reason,
                    format!(
                        "line is {} bytes, longer than the limit of 64 bytes (raise it with \
                         --max-line-bytes); not decoded, and not kept",
                        line.len() - 1
                    )
                );
            } else {
                assert!(r.is_empty(), "{r:?}");
            }
        }
        assert_eq!(bytes_text(DEFAULT_MAX_LINE_BYTES), "64 MiB");
    }

    /// `levels` nested JSON containers (the root object counted), as FHIR nests them: a Patient
    /// with extensions in extensions (two levels each), or a QuestionnaireResponse with items
    /// in items, ending in an empty array.
    fn deep_resource(resource_type: &str, key: &str, levels: usize) -> String {
        assert!(levels >= 2 && levels.is_multiple_of(2));
        let pairs = (levels - 2) / 2;
        let mut s = format!("{{\"resourceType\":\"{resource_type}\",\"id\":\"deep\",\"{key}\":");
        for i in 0..pairs {
            s.push_str(&format!(
                "[{{\"url\":\"u{i}\",\"linkId\":\"l{i}\",\"{key}\":"
            ));
        }
        s.push_str("[]");
        s.push_str(&"}]".repeat(pairs));
        s.push('}');
        s
    }

    /// Decode `lines` through the built-in views, and evaluate FHIRPath that walks the whole
    /// depth (`descendants()`, `repeat()`, equality and text of nested nodes) on each, on a
    /// thread with the default 2 MiB stack of spawned and tokio blocking threads.
    fn decode_deep_on_a_default_stack(lines: Vec<String>) -> (DecodeStats, Vec<Reject>) {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                use crate::view::fhirpath::{Constants, Env, Expression, Item};
                let reg = Arc::new(ViewRegistry::builtin().unwrap());
                let mut d = DecoderBuilder::new(reg, "deep").build();
                for l in &lines {
                    d.decode(l.as_bytes()).unwrap();
                    d.decode(b"\n").unwrap();
                    let Ok(doc) = JsonDoc::parse(l) else { continue };
                    let root = doc.root();
                    assert_eq!(to_json_text(root), *l);
                    let env = Env {
                        resource: root,
                        row_index: 0,
                    };
                    for src in [
                        "descendants().count()",
                        "repeat(extension | item).count()",
                        "(extension | item) = (extension | item)",
                        "descendants().where($this = %resource.descendants().last()).count()",
                    ] {
                        let e = Expression::compile(src, &Constants::new()).unwrap();
                        let out = e.evaluate(&[Item::json(root)], &env).unwrap();
                        assert_eq!(out.len(), 1, "{src}");
                    }
                }
                d.finish().unwrap();
                (d.stats().clone(), d.take_rejects())
            })
            .unwrap()
            .join()
            .unwrap()
    }

    /// Valid FHIR nests deeper than 128 JSON levels (64 nested extensions, a questionnaire 70
    /// items deep): every level up to [`MAX_DEPTH`] decodes, on a default-sized thread stack,
    /// and one more is rejected (regression: hunt finding 6).
    #[test]
    fn deep_resources_decode_up_to_the_nesting_limit() {
        // FLATFHIR_DEPTH_PROBE=N (with MAX_DEPTH raised) measures where the stack overflows.
        let depth: usize = std::env::var("FLATFHIR_DEPTH_PROBE")
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(MAX_DEPTH);
        let (stats, rejects) = decode_deep_on_a_default_stack(vec![
            deep_resource("Patient", "extension", 130),
            deep_resource("QuestionnaireResponse", "item", 142),
            deep_resource("Patient", "extension", depth),
            deep_resource("QuestionnaireResponse", "item", depth),
        ]);
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(stats.types["Patient"].rows, 2);
        assert_eq!(stats.types["QuestionnaireResponse"].rows, 2);
        if std::env::var("FLATFHIR_DEPTH_PROBE").is_err() {
            // One level more than the limit, in the innermost array.
            let over = deep_resource("Patient", "extension", MAX_DEPTH).replace("[]", "[[]]");
            let (_, rejects) = decode_deep_on_a_default_stack(vec![over]);
            assert_eq!(rejects.len(), 1);
            let reason = &rejects[0].reason;
            assert!(
                reason.contains(&format!("nesting deeper than {MAX_DEPTH} levels"))
                    && !reason.contains("malformed"),
                "{reason}"
            );
        }
    }

    /// A UTF-16 file and a file with lone-CR line endings are rejected with a reason that says
    /// what is wrong with the file, not only "malformed JSON".
    #[test]
    fn rejects_of_utf16_and_cr_files_say_what_is_wrong() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let reasons = |input: &[u8]| {
            let mut d = DecoderBuilder::new(reg.clone(), "f").build();
            d.decode(input).unwrap();
            d.finish().unwrap();
            d.take_rejects()
                .into_iter()
                .map(|r| r.reason)
                .collect::<Vec<_>>()
        };
        let text = "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n{\"resourceType\":\"Patient\",\"id\":\"b\"}\n";
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        let r = reasons(&utf16);
        assert!(!r.is_empty());
        assert!(r.iter().all(|r| r.contains("UTF-16")), "{r:?}");
        let r = reasons(text.replace('\n', "\r").as_bytes());
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].contains("carriage return"), "{r:?}");
        // A plain malformed line gets no hint.
        let r = reasons(b"{\"resourceType\":\n");
        assert!(
            !r[0].contains("UTF-16") && !r[0].contains("carriage"),
            "{r:?}"
        );
    }

    /// A view other than the base view failing on a valid resource (a user view whose
    /// single-valued column meets two names) costs that view its rows only: the resource keeps
    /// its `patient` row, `_rejects` names the view, and the line is not a rejected line. A
    /// failure of the base view still rejects the line.
    #[test]
    fn a_view_that_fails_costs_only_its_own_rows() {
        let mut reg = ViewRegistry::builtin().unwrap();
        reg.add_json(
            r#"{"resourceType":"ViewDefinition","name":"patient_family","resource":"Patient",
                "select":[{"column":[{"name":"family","path":"name.family"}]}]}"#,
            "t",
        )
        .unwrap();
        let mut d = DecoderBuilder::new(Arc::new(reg), "f").build();
        d.decode(
            concat!(
                r#"{"resourceType":"Patient","id":"two","name":[{"family":"A"},{"family":"B"}]}"#,
                "
",
                r#"{"resourceType":"Patient","id":"one","name":[{"family":"C"}]}"#,
                "
",
                r#"{"resourceType":"Patient","id":"bad","birthDate":"05/06/1970"}"#,
                "
"
            )
            .as_bytes(),
        )
        .unwrap();
        let batches = d.finish().unwrap();
        let rows = |view: &str| -> usize {
            batches
                .iter()
                .filter(|b| &*b.view == view)
                .map(|b| b.batch.num_rows())
                .sum()
        };
        assert_eq!(rows("patient"), 2, "`two` keeps its row; `bad` is rejected");
        assert_eq!(rows("patient_family"), 1);
        let rejects = d.take_rejects();
        assert_eq!(rejects.len(), 2, "{rejects:?}");
        assert!(
            rejects[0].reason.starts_with("view `patient_family`:"),
            "{rejects:?}"
        );
        let stats = d.stats();
        assert_eq!(stats.view_rejects, 1);
        assert_eq!(stats.types["Patient"].rejects, 1);
        assert_eq!(stats.types["Patient"].rows, 2);
    }

    /// A Windows-1252 line is rejected with its bytes recoverable from `raw` (`\xfc` for the
    /// byte 0xFC), not replaced by U+FFFD.
    #[test]
    fn rejects_of_non_utf8_lines_keep_their_bytes() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let mut d = DecoderBuilder::new(reg, "f").build();
        d.decode(b"{\"resourceType\":\"Patient\",\"id\":\"M\xfcller\"}\n")
            .unwrap();
        d.finish().unwrap();
        let r = d.take_rejects();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].raw, r#"{"resourceType":"Patient","id":"M\xfcller"}"#);
        assert!(r[0].reason.contains("shown as \\xNN"), "{}", r[0].reason);
    }

    /// Files that start with a byte-order mark, joined by `cat`: the marks in the middle cost
    /// no row, and the raw column holds the resource without them.
    #[test]
    fn byte_order_marks_at_the_start_of_any_line_are_dropped() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let mut d = DecoderBuilder::new(reg, "f").build();
        let bom = "\u{FEFF}";
        let input = format!(
            "{bom}{{\"resourceType\":\"Patient\",\"id\":\"a\"}}\n\
             {bom}{{\"resourceType\":\"Patient\",\"id\":\"b\"}}\r\n{bom}\n"
        );
        d.decode(input.as_bytes()).unwrap();
        let batches = d.finish().unwrap();
        assert!(d.take_rejects().is_empty());
        let patient = batches.iter().find(|b| &*b.view == "patient").unwrap();
        assert_eq!(patient.batch.num_rows(), 2);
        let raw = patient.batch.column_by_name("resource").unwrap();
        let raw = datafusion::arrow::array::AsArray::as_string::<i32>(raw);
        assert_eq!(raw.value(1), r#"{"resourceType":"Patient","id":"b"}"#);
    }

    #[test]
    fn with_start_locates_rejects_in_the_whole_file() {
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let input = concat!(
            r#"{"resourceType":"Patient","id":"p1"}"#,
            "\n",
            "not json\n",
            "\n",
            r#"{"resourceType":"../x","id":"e"}"#,
            "\n",
        );
        let decode = |b: DecoderBuilder| {
            let mut d = b.build();
            for c in input.as_bytes().chunks(5) {
                d.decode(c).unwrap();
            }
            d.finish().unwrap();
            let r: Vec<_> = d
                .take_rejects()
                .into_iter()
                .map(|r| (r.line, r.byte_offset))
                .collect();
            (r, d.stats().clone())
        };
        let (r, stats) = decode(DecoderBuilder::new(reg.clone(), "f"));
        assert_eq!(r, vec![(2, 37), (4, 47)]);
        assert_eq!((stats.bytes, stats.lines), (input.len() as u64, 4));
        let (r, stats) = decode(DecoderBuilder::new(reg, "f").with_start(101, 5000));
        assert_eq!(r, vec![(102, 5037), (104, 5047)]);
        assert_eq!((stats.bytes, stats.lines), (input.len() as u64, 4));
        assert_eq!(stats.types["Patient"].rows, 1);
        assert_eq!(stats.rejects(), 2);
    }
}
