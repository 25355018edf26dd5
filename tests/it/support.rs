//! Shared helpers: decode in chunks, pretty-print batches, golden files.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use flatfhir::{
    arrow::{
        compute::concat_batches, record_batch::RecordBatch, util::pretty::pretty_format_batches,
    },
    flatten::{DecodeStats, DecoderBuilder, Reject},
    view::ViewRegistry,
};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn data(rel: &str) -> PathBuf {
    repo().join("tests/data").join(rel)
}

/// Decode `input` fed in `chunk`-byte pieces; batches grouped by view (concatenated).
pub fn decode_chunked(
    reg: &Arc<ViewRegistry>,
    input: &[u8],
    chunk: usize,
    batch_size: usize,
) -> (BTreeMap<String, RecordBatch>, Vec<Reject>) {
    let (out, rejects, _) = decode_chunked_with(reg, input, chunk, batch_size, true);
    (out, rejects)
}

/// [`decode_chunked`], choosing whether views copy the cells they share with the base view
/// (`DecoderBuilder::with_shared_cells`), and with the decoder's stats.
pub fn decode_chunked_with(
    reg: &Arc<ViewRegistry>,
    input: &[u8],
    chunk: usize,
    batch_size: usize,
    shared_cells: bool,
) -> (BTreeMap<String, RecordBatch>, Vec<Reject>, DecodeStats) {
    decode_chunked_opts(reg, input, chunk, batch_size, shared_cells, true)
}

/// [`decode_chunked_with`], also choosing whether the views of a type take the members of a
/// resource's root from one scan of it (`DecoderBuilder::with_shared_scan`).
pub fn decode_chunked_opts(
    reg: &Arc<ViewRegistry>,
    input: &[u8],
    chunk: usize,
    batch_size: usize,
    shared_cells: bool,
    shared_scan: bool,
) -> (BTreeMap<String, RecordBatch>, Vec<Reject>, DecodeStats) {
    let mut d = DecoderBuilder::new(reg.clone(), "fixture.ndjson")
        .with_batch_size(batch_size)
        .with_shared_cells(shared_cells)
        .with_shared_scan(shared_scan)
        .build();
    let mut batches = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        assert_eq!(d.decode(c).unwrap(), c.len());
        batches.extend(d.take_batches());
    }
    batches.extend(d.finish().unwrap());
    let rejects = d.take_rejects();
    let stats = d.stats().clone();
    let mut by_view: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    for b in batches {
        by_view.entry(b.view.to_string()).or_default().push(b.batch);
    }
    let out = by_view
        .into_iter()
        .map(|(v, bs)| {
            let schema = bs[0].schema();
            (v, concat_batches(&schema, &bs).unwrap())
        })
        .collect();
    (out, rejects, stats)
}

/// Pretty text of batches.
pub fn pretty(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches).unwrap().to_string()
}

/// Compare `actual` with the golden file; `UPDATE_GOLDEN=1` rewrites it.
pub fn assert_golden(rel: &str, actual: &str) {
    let path = data(rel);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing golden file {} (run with UPDATE_GOLDEN=1)",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "golden mismatch for {}\n--- expected\n{expected}\n--- actual\n{actual}\n(run with UPDATE_GOLDEN=1 to accept)",
            path.display()
        );
    }
}

/// Every file under `dir`, recursively (nothing when it does not exist).
pub fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// `Observation.ndjson` in `dir`: `n` Observations of about 480 bytes each (25,000: about
/// 13 MB), each with a distinct 400-character `valueString`, so their Parquet stays big.
pub fn big_observations(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let pad = "x".repeat(400);
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            r#"{{"resourceType":"Observation","id":"o{i}","status":"final","valueString":"{pad}{i}"}}"#
        ));
        text.push('\n');
    }
    let path = dir.join("Observation.ndjson");
    std::fs::write(&path, text).unwrap();
    path
}

/// Send `signal` (`-INT`, `-TERM`, …) to the process `child`, as a user or a scheduler does.
pub fn send_signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} failed");
}
