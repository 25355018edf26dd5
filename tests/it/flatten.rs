//! Golden tests of the default views on hand-written fixtures, fed in chunks of 1, 3 and 7 bytes
//! and with batch sizes 1, 3 and the default: the output must not depend on either.

use std::sync::Arc;

use flatfhir::{flatten::DEFAULT_BATCH_SIZE, view::ViewRegistry};

use crate::support::{assert_golden, data, decode_chunked, pretty};

fn registry() -> Arc<ViewRegistry> {
    Arc::new(ViewRegistry::builtin().unwrap().with_raw(false))
}

#[test]
fn default_views_golden_across_chunk_and_batch_sizes() {
    let reg = registry();
    let mut fixtures: Vec<_> = std::fs::read_dir(data("ndjson"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
        .collect();
    fixtures.sort();
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let input = std::fs::read(&f).unwrap();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let (reference, rejects) = decode_chunked(&reg, &input, input.len(), DEFAULT_BATCH_SIZE);
        let mut text = String::new();
        for (view, batch) in &reference {
            text.push_str(&format!(
                "## {view}\n{}\n",
                pretty(std::slice::from_ref(batch))
            ));
        }
        for r in &rejects {
            text.push_str(&format!(
                "## reject line {} @{}: {}\n",
                r.line, r.byte_offset, r.reason
            ));
        }
        assert_golden(&format!("expected/{stem}.txt"), &text);
        for chunk in [1, 3, 7] {
            for batch_size in [1, 3, DEFAULT_BATCH_SIZE] {
                let (got, got_rejects) = decode_chunked(&reg, &input, chunk, batch_size);
                assert_eq!(
                    got, reference,
                    "{stem}: chunk {chunk}, batch size {batch_size}"
                );
                assert_eq!(got_rejects, rejects, "{stem}: chunk {chunk}");
            }
        }
    }
}

#[test]
fn every_line_is_a_row_or_a_reject() {
    let reg = Arc::new(ViewRegistry::builtin().unwrap());
    let input = std::fs::read(data("bad/mixed.ndjson")).unwrap();
    let (views, rejects) = decode_chunked(&reg, &input, 5, 2);
    let patients = views.get("patient").map_or(0, |b| b.num_rows());
    let lines = input
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    let other_rows: usize = views
        .iter()
        .filter(|(v, _)| ["observation", "encounter", "basic"].contains(&v.as_str()))
        .map(|(_, b)| b.num_rows())
        .sum();
    assert_eq!(
        patients + other_rows + rejects.len(),
        lines,
        "rejects: {rejects:#?}"
    );
    let reasons: Vec<_> = rejects
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    let has = |line: u64, needle: &str| {
        reasons
            .iter()
            .any(|(l, r)| *l == line && r.contains(needle))
    };
    assert!(has(2, "malformed JSON"), "{reasons:#?}");
    assert!(has(3, "no `resourceType`"), "{reasons:#?}");
    assert!(has(4, "invalid `resourceType`"), "{reasons:#?}");
    assert!(has(5, "unknown resource type"), "{reasons:#?}");
    assert!(has(6, "birth_date"), "{reasons:#?}");
    assert!(has(7, "not a JSON object"), "{reasons:#?}");
    // The raw line is kept, and the byte offset points at it.
    for r in &rejects {
        let at = r.byte_offset as usize;
        assert_eq!(&input[at..at + r.raw.len()], r.raw.as_bytes());
    }
}

/// Finding every member a trie node reads in one scan of the object gives the same tables and
/// rejects as navigating member by member, on every fixture (hostile ones included), the
/// bundled sample and, when `../shared` is there, synthea-100.
#[test]
fn one_scan_per_object_equals_member_by_member_navigation() {
    let scan = Arc::new(ViewRegistry::builtin().unwrap());
    let navigate = Arc::new(ViewRegistry::builtin().unwrap().with_member_dispatch(false));
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    for dir in ["ndjson", "bad", "valid_fhir", "dispatch"] {
        for e in std::fs::read_dir(data(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "ndjson") {
                inputs.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    for (name, gz) in flatfhir::sample::files() {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(*gz), &mut text).unwrap();
        inputs.push((name.to_string(), text));
    }
    let synthea =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea-100");
    if let Ok(dir) = std::fs::read_dir(&synthea) {
        for e in dir {
            let p = e.unwrap().path();
            inputs.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    assert!(inputs.len() > 40);
    for (name, input) in &inputs {
        let (want, want_rejects) = decode_chunked(&navigate, input, 1 << 20, DEFAULT_BATCH_SIZE);
        let (got, got_rejects) = decode_chunked(&scan, input, 1 << 20, DEFAULT_BATCH_SIZE);
        assert_eq!(got, want, "{name}");
        assert_eq!(got_rejects, want_rejects, "{name}");
    }
}
