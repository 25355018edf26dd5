//! The push decoder: lines → JSON → every view over the line's resource type → builders.

use std::{collections::HashMap, sync::Arc};

use serde_json::Value;

use super::{
    DecodeStats, FlattenError, INVALID_TYPE_BUCKET, Reject, ViewBatch,
    builders::ViewBuilders,
    lines::{Line, LineSplitter},
};
use crate::view::{
    CompiledView, Row, ViewRegistry, is_r4_resource_type, is_valid_resource_type, snake_case,
};

/// Rows per RecordBatch handed out by the decoder.
pub const DEFAULT_BATCH_SIZE: usize = 8192;
/// Longest accepted ndjson line (64 MiB); longer lines are rejected without being buffered.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

/// Configures a [`Decoder`].
#[derive(Debug, Clone)]
pub struct DecoderBuilder {
    registry: Arc<ViewRegistry>,
    file: String,
    batch_size: usize,
    max_line_bytes: usize,
    only_viewed: bool,
    first_line: u64,
    start_offset: u64,
}

impl DecoderBuilder {
    /// A decoder for one input; `file` names it in reject records.
    pub fn new(registry: Arc<ViewRegistry>, file: impl Into<String>) -> Self {
        DecoderBuilder {
            registry,
            file: file.into(),
            batch_size: DEFAULT_BATCH_SIZE,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            only_viewed: false,
            first_line: 1,
            start_offset: 0,
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
    /// in a generic base table (default `false`). Used when running one view.
    pub fn with_only_viewed_types(mut self, only: bool) -> Self {
        self.only_viewed = only;
        self
    }
    /// Rows per batch (default [`DEFAULT_BATCH_SIZE`]).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// Longest accepted line (default [`DEFAULT_MAX_LINE_BYTES`]).
    pub fn with_max_line_bytes(mut self, n: usize) -> Self {
        self.max_line_bytes = n.max(1);
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
            only_viewed: self.only_viewed,
            outputs: HashMap::new(),
            generic: HashMap::new(),
            ready: Vec::new(),
            rejects: Vec::new(),
            stats: DecodeStats::default(),
        }
    }
}

/// Push decoder from ndjson bytes to per-view RecordBatches. See the [module docs](super).
pub struct Decoder {
    lines: LineSplitter,
    registry: Arc<ViewRegistry>,
    file: String,
    batch_size: usize,
    only_viewed: bool,
    outputs: HashMap<String, ViewBuilders>,
    /// Generic base views for resource types that have no base view.
    generic: HashMap<String, Arc<CompiledView>>,
    ready: Vec<ViewBatch>,
    rejects: Vec<Reject>,
    stats: DecodeStats,
}

struct LineCx<'d> {
    registry: &'d ViewRegistry,
    file: &'d str,
    batch_size: usize,
    only_viewed: bool,
    outputs: &'d mut HashMap<String, ViewBuilders>,
    generic: &'d mut HashMap<String, Arc<CompiledView>>,
    ready: &'d mut Vec<ViewBatch>,
    rejects: &'d mut Vec<Reject>,
    stats: &'d mut DecodeStats,
}

impl Decoder {
    /// Feed a chunk of input (split anywhere). Returns the number of bytes consumed (all of them).
    pub fn decode(&mut self, buf: &[u8]) -> Result<usize, FlattenError> {
        let mut lines = std::mem::replace(&mut self.lines, LineSplitter::new(0));
        let mut cx = self.cx();
        let r = lines.push(buf, |line| cx.line(line));
        self.lines = lines;
        r.map(|_| buf.len())
    }

    /// End of input: decode a last line without newline and flush every view's rows.
    pub fn finish(&mut self) -> Result<Vec<ViewBatch>, FlattenError> {
        let mut lines = std::mem::replace(&mut self.lines, LineSplitter::new(0));
        let mut cx = self.cx();
        let r = lines.finish(|line| cx.line(line));
        self.stats.bytes = lines.bytes();
        self.lines = lines;
        r?;
        let mut names: Vec<_> = self.outputs.keys().cloned().collect();
        names.sort();
        for name in names {
            if let Some(b) = self.outputs.get_mut(&name).filter(|b| b.rows > 0) {
                let batch = b.finish().map_err(|message| FlattenError::Internal {
                    view: name.clone(),
                    message,
                })?;
                self.ready.push(ViewBatch {
                    view: name.as_str().into(),
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
            only_viewed: self.only_viewed,
            outputs: &mut self.outputs,
            generic: &mut self.generic,
            ready: &mut self.ready,
            rejects: &mut self.rejects,
            stats: &mut self.stats,
        }
    }
}

impl LineCx<'_> {
    fn reject(&mut self, line: &Line<'_>, resource_type: Option<&str>, reason: String) {
        let raw = match line.bytes {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
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

    fn line(&mut self, line: Line<'_>) -> Result<(), FlattenError> {
        self.stats.lines += 1;
        let Some(bytes) = line.bytes else {
            self.stats
                .types
                .entry(INVALID_TYPE_BUCKET.into())
                .or_default()
                .lines += 1;
            let reason = format!("line is {} bytes, longer than the limit", line.len);
            self.reject(&line, None, reason);
            return Ok(());
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            self.stats.blank_lines += 1;
            return Ok(());
        }
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                self.stats
                    .types
                    .entry(INVALID_TYPE_BUCKET.into())
                    .or_default()
                    .lines += 1;
                self.reject(&line, None, format!("malformed JSON: {e}"));
                return Ok(());
            }
        };
        let rt = match value.get("resourceType") {
            Some(Value::String(s)) if is_valid_resource_type(s) => s.as_str(),
            other => {
                self.stats
                    .types
                    .entry(INVALID_TYPE_BUCKET.into())
                    .or_default()
                    .lines += 1;
                let reason = match other {
                    None if !value.is_object() => {
                        "not a FHIR resource: the line is not a JSON object".to_string()
                    }
                    None => "not a FHIR resource: no `resourceType`".to_string(),
                    Some(v) => {
                        let shown: String = v.to_string().chars().take(80).collect();
                        format!(
                            "invalid `resourceType` {shown}: must match ^[A-Z][A-Za-z0-9]{{0,63}}$"
                        )
                    }
                };
                self.reject(&line, None, reason);
                return Ok(());
            }
        };
        let registry = self.registry;
        let has_views = registry.views_for(rt).next().is_some();
        if !has_views && self.only_viewed {
            self.stats.skipped += 1;
            return Ok(());
        }
        if !has_views && !is_r4_resource_type(rt) {
            self.stats
                .types
                .entry(INVALID_TYPE_BUCKET.into())
                .or_default()
                .lines += 1;
            self.reject(
                &line,
                None,
                format!("unknown resource type {rt:?} (not FHIR R4, and no view reads it)"),
            );
            return Ok(());
        }
        self.stats.types.entry(rt.to_string()).or_default().lines += 1;
        let text = std::str::from_utf8(bytes).unwrap_or_default(); // valid: serde_json checked it
        let base_name = snake_case(rt);
        let generic = if registry.base_view(rt).is_none() {
            let v = self
                .generic
                .entry(rt.to_string())
                .or_insert_with(|| Arc::new(generic_view(rt, registry.raw())));
            Some(v.clone())
        } else {
            None
        };
        // Evaluate every view first; append only when all succeeded.
        let mut results: Vec<(&Arc<CompiledView>, Vec<Row<'_>>, bool)> = Vec::new();
        let views = registry.views_for(rt).chain(generic.as_ref());
        for view in views {
            let mut rows = Vec::new();
            match view.evaluate(&value, &mut rows) {
                Ok(included) => results.push((view, rows, included)),
                Err(e) => {
                    self.reject(&line, Some(rt), e.to_string());
                    return Ok(());
                }
            }
        }
        for (view, rows, included) in results {
            let name = view.name();
            if name == base_name {
                let t = self.stats.types.entry(rt.to_string()).or_default();
                if included {
                    t.rows += rows.len() as u64
                } else {
                    t.filtered += 1
                }
            }
            if rows.is_empty() {
                continue;
            }
            *self.stats.view_rows.entry(name.to_string()).or_default() += rows.len() as u64;
            let out = self
                .outputs
                .entry(name.to_string())
                .or_insert_with(|| ViewBuilders::new(view.clone(), self.batch_size));
            for row in &rows {
                out.append(row, text);
                if out.rows >= self.batch_size {
                    let batch = out.finish().map_err(|message| FlattenError::Internal {
                        view: name.to_string(),
                        message,
                    })?;
                    self.ready.push(ViewBatch {
                        view: name.into(),
                        batch,
                    });
                }
            }
        }
        Ok(())
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
