//! Decode + flatten throughput per resource type (bundled sample, default views), the parts of it
//! (JSON parsing alone; FHIRPath evaluation of representative views over parsed resources), and
//! Parquet encoding throughput. Inputs are built outside the timed loop.
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
        EvalScratch, ViewRegistry,
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
        let compiled = registry.get(view).expect("default view exists").clone();
        let text = std::str::from_utf8(bytes).expect("UTF-8");
        let resources: Vec<JsonDoc<'_>> = text
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(|l| JsonDoc::parse(l).expect("valid JSON"))
            .collect();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        // As the decoder runs it: buffers reused from resource to resource.
        let mut scratch = EvalScratch::new();
        let mut rows = Vec::new();
        g.bench_function(view, |b| {
            b.iter(|| {
                let mut n = 0;
                for r in &resources {
                    let mut bufs = scratch.lend();
                    rows.clear();
                    compiled
                        .evaluate_with(r.root(), &mut rows, &mut bufs)
                        .expect("evaluates");
                    n += rows.len();
                    scratch.restore(bufs);
                }
                n
            })
        });
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

criterion_group!(benches, decode, parse_json, fhirpath, write_parquet);
criterion_main!(benches);
