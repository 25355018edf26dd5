//! Decode + flatten throughput per resource type (bundled sample, default views), and Parquet
//! encoding throughput. Inputs are built outside the timed loop.
//!
//!     cargo bench --bench flatten
// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]
use std::{io::Read, sync::Arc};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flatfhir::{flatten::DecoderBuilder, view::ViewRegistry};
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

criterion_group!(benches, decode, write_parquet);
criterion_main!(benches);
