//! Decode + flatten throughput per resource type (bundled sample, default views), the parts of it
//! (JSON parsing alone; FHIRPath evaluation of representative views, and of every view of a type
//! as the decoder runs them — `extract/<Type>` — and of each view alone — `extract_view/<view>` —
//! over parsed resources), and
//! Parquet encoding throughput: a view's columns per codec, and the raw `resource` column (the
//! largest column of every run) per codec, with the size each codec writes printed beside its
//! time. Inputs are built outside the timed loop.
//!
//!     cargo bench --bench flatten
//!     cargo bench --bench flatten -- fhirpath     # one group
// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]
use std::{io::Read, sync::Arc};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flatfhir::{
    flatten::DecoderBuilder,
    view::{
        CompiledView, EvalScratch, ViewRegistry,
        json::{JsonBuffers, JsonDoc, JsonRef},
    },
};
use parquet::{arrow::ArrowWriter, basic::Compression, file::properties::WriterProperties};

fn sample() -> Vec<(String, Vec<u8>)> {
    flatfhir::sample::files()
        .iter()
        .map(|(name, gz)| {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(*gz)
                .read_to_end(&mut out)
                .expect("sample is valid gzip");
            (name.trim_end_matches(".ndjson.gz").to_string(), out)
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let registry = Arc::new(ViewRegistry::builtin().expect("default views compile"));
    let mut g = c.benchmark_group("decode");
    for (ty, bytes) in sample().into_iter().filter(|(_, b)| b.len() > 100_000) {
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(&ty), &bytes, |b, bytes| {
            b.iter(|| {
                let mut d = DecoderBuilder::new(registry.clone(), "bench").build();
                d.decode(bytes).expect("decodes");
                d.finish().expect("finishes").len()
            })
        });
    }
    g.finish();
}

/// The document alone: flatfhir's tape ([`JsonDoc`], buffers reused) beside a
/// `serde_json::Value` tree, what a design built on serde_json would pay before evaluating.
fn parse_json(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_json");
    for (ty, bytes) in sample().into_iter().filter(|(_, b)| b.len() > 100_000) {
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let text = std::str::from_utf8(&bytes).expect("UTF-8").to_string();
        g.bench_with_input(BenchmarkId::new("tape", &ty), &text, |b, text| {
            b.iter(|| {
                let mut buffers = JsonBuffers::default();
                let mut members = 0;
                for l in text.split('\n').filter(|l| !l.is_empty()) {
                    let doc = JsonDoc::parse_with(l, buffers).expect("valid JSON");
                    if let JsonRef::Object(o) = doc.root().kind() {
                        members += o.len();
                    }
                    buffers = doc.into_buffers();
                }
                members
            })
        });
        g.bench_with_input(BenchmarkId::new("serde_json", &ty), &bytes, |b, bytes| {
            b.iter(|| {
                bytes
                    .split(|c| *c == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let v: serde_json::Value = serde_json::from_slice(l).expect("valid JSON");
                        v.as_object().map_or(0, |o| o.len())
                    })
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

/// The resources of an ndjson file, parsed.
fn parsed(bytes: &[u8]) -> Vec<JsonDoc<'_>> {
    std::str::from_utf8(bytes)
        .expect("UTF-8")
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| JsonDoc::parse(l).expect("valid JSON"))
        .collect()
}

/// Evaluate `views` over every resource as the decoder does (buffers reused from resource to
/// resource); returns the number of rows.
fn evaluate(
    views: &[Arc<CompiledView>],
    resources: &[JsonDoc<'_>],
    scratch: &mut EvalScratch,
) -> usize {
    let mut rows = Vec::new();
    let mut n = 0;
    for r in resources {
        let mut bufs = scratch.lend();
        rows.clear();
        for v in views {
            v.evaluate_with(r.root(), &mut rows, &mut bufs)
                .expect("evaluates");
        }
        n += rows.len();
        scratch.restore(bufs);
    }
    n
}

/// FHIRPath evaluation of representative views (flat columns; a `forEach` child table; nested
/// `forEach` with `%rowIndex`) over resources parsed outside the timed loop.
fn fhirpath(c: &mut Criterion) {
    let registry = ViewRegistry::builtin().expect("default views compile");
    let files = sample();
    let mut g = c.benchmark_group("fhirpath");
    for (view, ty) in [
        ("observation", "Observation"),
        ("patient_name", "Patient"),
        ("encounter", "Encounter"),
        (
            "explanation_of_benefit_item_adjudication",
            "ExplanationOfBenefit",
        ),
    ] {
        let Some((_, bytes)) = files.iter().find(|(t, _)| t == ty) else {
            continue;
        };
        let compiled = [registry.get(view).expect("default view exists").clone()];
        let resources = parsed(bytes);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut scratch = EvalScratch::new();
        g.bench_function(view, |b| {
            b.iter(|| evaluate(&compiled, &resources, &mut scratch))
        });
    }
    g.finish();
}

/// Every view of a type over its resources (parsed outside the timed loop), as the decoder
/// evaluates them per line: the extraction work per type, apart from parsing and encoding. Each
/// type twice: members found with one scan per object (`scan`, the default) and member by
/// member (`navigate`).
fn extract(c: &mut Criterion) {
    let files = sample();
    let mut g = c.benchmark_group("extract");
    for dispatch in [true, false] {
        let registry = ViewRegistry::builtin()
            .expect("default views compile")
            .with_member_dispatch(dispatch);
        for (ty, bytes) in files.iter().filter(|(_, b)| b.len() > 100_000) {
            let views: Vec<_> = registry.views_for(ty).cloned().collect();
            let resources = parsed(bytes);
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            let mut scratch = EvalScratch::new();
            let mode = if dispatch { "scan" } else { "navigate" };
            g.bench_function(BenchmarkId::new(ty.as_str(), mode), |b| {
                b.iter(|| evaluate(&views, &resources, &mut scratch))
            });
        }
    }
    g.finish();
}

/// Each default view alone over its type's resources (parsed outside the timed loop): which
/// views the time of `extract/<Type>` goes to. Throughput is the type's input bytes, so the
/// figures of one type's views add up to about its `extract` figure.
fn extract_view(c: &mut Criterion) {
    let registry = ViewRegistry::builtin().expect("default views compile");
    let files = sample();
    let mut g = c.benchmark_group("extract_view");
    for (ty, bytes) in files.iter().filter(|(_, b)| b.len() > 100_000) {
        let resources = parsed(bytes);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        for view in registry.views_for(ty) {
            let one = [view.clone()];
            let mut scratch = EvalScratch::new();
            g.bench_function(view.name(), |b| {
                b.iter(|| evaluate(&one, &resources, &mut scratch))
            });
        }
    }
    g.finish();
}

fn write_parquet(c: &mut Criterion) {
    let registry = Arc::new(ViewRegistry::builtin().expect("default views compile"));
    let (_, obs) = sample()
        .into_iter()
        .find(|(t, _)| t == "Observation")
        .expect("sample has observations");
    let mut d = DecoderBuilder::new(registry, "bench").build();
    d.decode(&obs).expect("decodes");
    let batches: Vec<_> = d
        .finish()
        .expect("finishes")
        .into_iter()
        .filter(|b| &*b.view == "observation")
        .collect();
    let bytes: usize = batches
        .iter()
        .map(|b| b.batch.get_array_memory_size())
        .sum();
    let mut g = c.benchmark_group("parquet_write");
    g.throughput(Throughput::Bytes(bytes as u64));
    for (name, codec) in [
        ("zstd1", Compression::ZSTD(Default::default())),
        ("snappy", Compression::SNAPPY),
        ("none", Compression::UNCOMPRESSED),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let props = WriterProperties::builder().set_compression(codec).build();
                let mut w =
                    ArrowWriter::try_new(Vec::new(), batches[0].batch.schema(), Some(props))
                        .expect("writer");
                for vb in &batches {
                    w.write(&vb.batch).expect("write");
                }
                w.into_inner().expect("close").len()
            })
        });
    }
    g.finish();
}

/// The raw `resource` column alone (every base view's, bundled sample), encoded as the writer
/// encodes it (plain, no dictionary, no statistics) with each candidate codec. Prints each
/// codec's output size against the raw bytes: the choice is CPU (criterion's time) against
/// bytes at rest and read back.
fn raw_column(c: &mut Criterion) {
    use parquet::basic::{Encoding, ZstdLevel};
    use parquet::file::properties::EnabledStatistics;
    let registry = Arc::new(ViewRegistry::builtin().expect("default views compile"));
    let mut d = DecoderBuilder::new(registry, "bench").build();
    for (_, bytes) in sample() {
        d.decode(&bytes).expect("decodes");
    }
    let columns: Vec<_> = d
        .finish()
        .expect("finishes")
        .into_iter()
        .filter_map(|vb| {
            let col = vb.batch.column_by_name("resource")?.clone();
            datafusion::arrow::record_batch::RecordBatch::try_from_iter([("resource", col)]).ok()
        })
        .collect();
    let raw: usize = columns
        .iter()
        .map(|b| {
            let a = b.column(0).as_any();
            a.downcast_ref::<datafusion::arrow::array::StringArray>()
                .map_or(0, |s| s.value_data().len())
        })
        .sum();
    let mut g = c.benchmark_group("raw_column");
    g.throughput(Throughput::Bytes(raw as u64));
    let zstd = |l| Compression::ZSTD(ZstdLevel::try_new(l).expect("valid level"));
    for (name, codec) in [
        ("zstd1", zstd(1)),
        ("zstd3", zstd(3)),
        ("lz4_raw", Compression::LZ4_RAW),
        ("snappy", Compression::SNAPPY),
        ("none", Compression::UNCOMPRESSED),
    ] {
        let write = || {
            let props = WriterProperties::builder()
                .set_compression(codec)
                .set_dictionary_enabled(false)
                .set_encoding(Encoding::PLAIN)
                .set_statistics_enabled(EnabledStatistics::None)
                .build();
            let mut w =
                ArrowWriter::try_new(Vec::new(), columns[0].schema(), Some(props)).expect("writer");
            for b in &columns {
                w.write(b).expect("write");
            }
            w.into_inner().expect("close").len()
        };
        let size = write();
        eprintln!(
            "raw_column/{name}: {raw} raw bytes -> {size} bytes ({:.2}x)",
            raw as f64 / size as f64
        );
        g.bench_function(name, |b| b.iter(write));
    }
    g.finish();
}

criterion_group!(
    benches,
    decode,
    parse_json,
    fhirpath,
    extract,
    extract_view,
    write_parquet,
    raw_column
);
criterion_main!(benches);
