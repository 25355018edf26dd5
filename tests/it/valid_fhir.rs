//! Valid FHIR never costs a row: values at the edges of what FHIR R4's datatype regexes admit
//! (decimals with 25 fraction digits or 41 integer digits, leap seconds, year 0001, `+14:00`,
//! twelve fraction digits of a second, `2021-02-30`), a UTF-8 byte-order mark at the start of
//! a file, and `urn:uuid:` references.
//!
//! The fixtures in `tests/data/valid_fhir/` are decoded with the default views plus the test
//! views in `tests/data/valid_fhir/views/`, which put each value in every native column type
//! next to its text. Every line must be a row — no rejects in any view — whatever the chunk
//! and batch sizes; the test views' rows and the inexact-cell count are compared with the
//! golden files in `tests/data/valid_fhir/expected/` (`UPDATE_GOLDEN=1` rewrites them).

use std::{collections::BTreeMap, sync::Arc};

use flatfhir::{
    arrow::{
        array::{Array, StringArray},
        compute::concat_batches,
        record_batch::RecordBatch,
    },
    flatten::{DEFAULT_BATCH_SIZE, DecodeStats, DecoderBuilder, Reject},
    view::ViewRegistry,
};

use crate::support::{assert_golden, data, pretty};

/// The default views (no raw column) plus the test views.
fn registry() -> Arc<ViewRegistry> {
    let mut reg = ViewRegistry::builtin().unwrap().with_raw(false);
    reg.add_dir(&data("valid_fhir/views")).unwrap();
    Arc::new(reg)
}

/// Decode `input` in `chunk`-byte pieces: rows by view, rejects and stats.
fn decode(
    reg: &Arc<ViewRegistry>,
    input: &[u8],
    chunk: usize,
    batch_size: usize,
) -> (BTreeMap<String, RecordBatch>, Vec<Reject>, DecodeStats) {
    let mut d = DecoderBuilder::new(reg.clone(), "valid.ndjson")
        .with_batch_size(batch_size)
        .build();
    let mut batches = Vec::new();
    for c in input.chunks(chunk) {
        d.decode(c).unwrap();
        batches.extend(d.take_batches());
    }
    batches.extend(d.finish().unwrap());
    let mut by_view: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    for b in batches {
        by_view.entry(b.view.to_string()).or_default().push(b.batch);
    }
    let views = by_view
        .into_iter()
        .map(|(v, bs)| (v, concat_batches(&bs[0].schema(), &bs).unwrap()))
        .collect();
    (views, d.take_rejects(), d.stats().clone())
}

/// Every line of each fixture is a row of its type's base view (and of the test view), with
/// no rejects; the test views' rows and the inexact cells match the golden files.
#[test]
fn valid_fhir_values_are_rows_never_rejects() {
    let reg = registry();
    for (fixture, shown) in [
        ("Observation", &["valid_fhir_observation"][..]),
        ("Patient", &["valid_fhir_patient"]),
        ("DiagnosticReport", &["diagnostic_report_result"]),
    ] {
        let input = std::fs::read(data(&format!("valid_fhir/{fixture}.ndjson"))).unwrap();
        let lines = input
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
        let (reference, rejects, stats) = decode(&reg, &input, input.len(), DEFAULT_BATCH_SIZE);
        assert_eq!(rejects, vec![], "{fixture}: valid FHIR was rejected");
        assert_eq!(stats.rejects(), 0);
        assert_eq!(stats.types[fixture].lines, lines, "{fixture}");
        assert_eq!(
            stats.types[fixture].rows, lines,
            "{fixture}: one base row per line"
        );
        let mut text = String::new();
        for view in shown {
            text.push_str(&format!(
                "## {view}\n{}\n",
                pretty(&[reference[*view].clone()])
            ));
        }
        text.push_str(&format!("## inexact cells: {}\n", stats.inexact_cells));
        assert_golden(&format!("valid_fhir/expected/{fixture}.txt"), &text);
        for chunk in [1, 2, 3, 7] {
            for batch_size in [1, 3, DEFAULT_BATCH_SIZE] {
                let (got, got_rejects, got_stats) = decode(&reg, &input, chunk, batch_size);
                assert_eq!(
                    got, reference,
                    "{fixture}: chunk {chunk}, batch {batch_size}"
                );
                assert!(got_rejects.is_empty(), "{fixture}: chunk {chunk}");
                assert_eq!(got_stats.inexact_cells, stats.inexact_cells);
            }
        }
    }
}

/// Inexact cells are counted only for written rows: a resource that another view rejects
/// adds none, and `merge` sums them.
#[test]
fn inexact_cells_count_only_written_rows_and_merge() {
    let reg = registry();
    let rounded = br#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"t"},"valueQuantity":{"value":0.1234567890123456789012345}}"#;
    // The same value in a resource that is rejected for another reason (`issued` is no
    // instant).
    let rejected = br#"{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"t"},"valueQuantity":{"value":0.1234567890123456789012345},"issued":"yesterday"}"#;
    let mut input = rounded.to_vec();
    input.push(b'\n');
    input.extend_from_slice(rejected);
    input.push(b'\n');
    let (_, rejects, stats) = decode(&reg, &input, 5, 2);
    assert_eq!(rejects.len(), 1, "{rejects:#?}");
    assert_eq!(rejects[0].line, 2);
    // o1: the DECIMAL(38,18) cells of `observation.value_quantity` and of the test view's
    // `value_decimal` are rounded; its DOUBLE and text cells are not counted.
    assert_eq!(stats.inexact_cells, 2);
    let mut merged = stats.clone();
    merged.merge(&stats);
    assert_eq!(merged.inexact_cells, 4);
}

/// A UTF-8 byte-order mark at the start of a file is skipped: the first resource is a row, and
/// the offsets of later rejects still point at their bytes in the file.
#[test]
fn a_byte_order_mark_at_the_start_of_a_file_is_not_data() {
    let reg = registry();
    let input = std::fs::read(data("valid_fhir/bom.ndjson")).unwrap();
    assert_eq!(&input[..3], b"\xEF\xBB\xBF");
    for chunk in [1, 2, 3, 4, 1 << 20] {
        let (views, rejects, stats) = decode(&reg, &input, chunk, 2);
        let ids = views["valid_fhir_patient"]
            .column_by_name("id")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        let ids: Vec<_> = (0..ids.len()).map(|i| ids.value(i).to_string()).collect();
        assert_eq!(ids, ["after-bom", "last"], "chunk {chunk}");
        assert_eq!(rejects.len(), 1, "chunk {chunk}: {rejects:#?}");
        let r = &rejects[0];
        assert_eq!(r.line, 2);
        assert!(r.reason.starts_with("malformed JSON"), "{}", r.reason);
        let at = r.byte_offset as usize;
        assert_eq!(&input[at..at + r.raw.len()], r.raw.as_bytes());
        // The mark is input, not a line.
        assert_eq!((stats.bytes, stats.lines), (input.len() as u64, 3));
    }
    // Decoded from the second line on (a byte range of the file), there is no mark to skip.
    let second = input.iter().position(|b| *b == b'\n').unwrap() + 1;
    let mut d = DecoderBuilder::new(reg.clone(), "valid.ndjson")
        .with_start(2, second as u64)
        .build();
    d.decode(&input[second..]).unwrap();
    d.finish().unwrap();
    let rejects = d.take_rejects();
    assert_eq!(
        (rejects[0].line, rejects[0].byte_offset),
        (2, second as u64)
    );
}

/// `urn:uuid:` references give their uuid as the key, so `diagnostic_report_result` joins
/// to `observation` for Synthea-style bundles.
#[test]
fn urn_uuid_results_have_observation_keys() {
    let reg = registry();
    let input = std::fs::read(data("valid_fhir/DiagnosticReport.ndjson")).unwrap();
    let (views, _, _) = decode(&reg, &input, 3, 2);
    let results = &views["diagnostic_report_result"];
    let col = |name: &str| -> Vec<Option<String>> {
        let a = results
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        (0..a.len())
            .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
            .collect()
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        col("observation_id"),
        [
            some("6f1c2b3a-0000-4000-8000-0000000000a1"),
            some("obs-literal"),
            None,
            None,
            some("obs-1"),
            some("6F1C2B3A-0000-4000-8000-0000000000A2"),
        ]
    );
    assert_eq!(
        col("patient_id")[0],
        some("6f1c2b3a-0000-4000-8000-000000000001")
    );
}
