//! Golden tests of the default views on hand-written fixtures, fed in chunks of 1, 3 and 7 bytes
//! and with batch sizes 1, 3 and the default: the output must not depend on either.

use std::sync::Arc;

use flatfhir::{flatten::DEFAULT_BATCH_SIZE, view::ViewRegistry};

use crate::support::{
    assert_golden, data, decode_chunked, decode_chunked_opts, decode_chunked_with, pretty,
};

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

/// Every fixture (hostile ones included), the bundled sample and, when `../shared` is there,
/// synthea-100: `(name, bytes)`.
fn every_input() -> Vec<(String, Vec<u8>)> {
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
    inputs
}

/// Views copying the cells they share with their type's base view (`getResourceKey()`,
/// `subject.getReferenceKey(Patient)`, …) from its row, and taking the members of the
/// resource's root from one scan of it for all of them, give the same tables, rejects and
/// counts as evaluating every view on its own, on every input and with user views that share
/// some columns, fail on others, or meet a base view whose `where` leaves the resource out.
#[test]
fn copying_shared_cells_equals_evaluating_every_view_alone() {
    let mut with_user_views = ViewRegistry::builtin().unwrap();
    for v in [
        // Shares `id`-like and reference columns, fails (two names) on some Patients.
        r#"{"resourceType":"ViewDefinition","name":"patient_user","resource":"Patient",
            "select":[{"column":[{"name":"pid","path":"getResourceKey()"},
              {"name":"g","path":"gender"},{"name":"family","path":"name.family"},
              {"name":"org","path":"managingOrganization.getReferenceKey(Organization)"}]},
              {"forEachOrNull":"telecom","column":[{"name":"v","path":"value"}]}]}"#,
        // A base view that leaves some resources out: its children evaluate them alone.
        r#"{"resourceType":"ViewDefinition","name":"condition","resource":"Condition",
            "where":[{"path":"clinicalStatus.exists()"}],
            "select":[{"column":[{"name":"id","path":"getResourceKey()"},
              {"name":"patient_id","path":"subject.getReferenceKey(Patient)"}]}]}"#,
        r#"{"resourceType":"ViewDefinition","name":"condition_user","resource":"Condition",
            "select":[{"column":[{"name":"cid","path":"getResourceKey()"},
              {"name":"patient_id","path":"subject.getReferenceKey(Patient)"}]},
              {"forEach":"code.coding","column":[{"name":"code","path":"code"}]}]}"#,
    ] {
        with_user_views.add_json(v, "test").unwrap();
    }
    let registries = [
        Arc::new(ViewRegistry::builtin().unwrap()),
        Arc::new(with_user_views),
    ];
    let inputs = every_input();
    assert!(inputs.len() > 40);
    for (i, reg) in registries.iter().enumerate() {
        // synthea-100 (49 MB) once, with the defaults.
        for (name, input) in inputs
            .iter()
            .filter(|(n, _)| i == 0 || !n.contains("synthea"))
        {
            let alone = decode_chunked_with(reg, input, 1 << 20, DEFAULT_BATCH_SIZE, false);
            let shared = decode_chunked_with(reg, input, 1 << 20, DEFAULT_BATCH_SIZE, true);
            assert_eq!(shared.0, alone.0, "{name}");
            assert_eq!(shared.1, alone.1, "{name}");
            assert_eq!(shared.2, alone.2, "{name}");
            let no_scan = decode_chunked_opts(reg, input, 1 << 20, DEFAULT_BATCH_SIZE, true, false);
            assert_eq!(no_scan.0, alone.0, "{name}");
            assert_eq!(no_scan.1, alone.1, "{name}");
            assert_eq!(no_scan.2, alone.2, "{name}");
        }
    }
    // The defaults do share: every child view of a Patient copies its key.
    let reg = &registries[0];
    let patient = reg.base_view("Patient").unwrap();
    let name = reg
        .views_for("Patient")
        .find(|v| v.name() == "patient_name")
        .unwrap();
    assert!(!name.shared_root_columns(patient).is_empty());
}

/// Finding every member a trie node reads in one scan of the object gives the same tables and
/// rejects as navigating member by member, on every fixture (hostile ones included), the
/// bundled sample and, when `../shared` is there, synthea-100.
#[test]
fn one_scan_per_object_equals_member_by_member_navigation() {
    let scan = Arc::new(ViewRegistry::builtin().unwrap());
    let navigate = Arc::new(ViewRegistry::builtin().unwrap().with_member_dispatch(false));
    let inputs = every_input();
    assert!(inputs.len() > 40);
    for (name, input) in &inputs {
        let (want, want_rejects) = decode_chunked(&navigate, input, 1 << 20, DEFAULT_BATCH_SIZE);
        let (got, got_rejects) = decode_chunked(&scan, input, 1 << 20, DEFAULT_BATCH_SIZE);
        assert_eq!(got, want, "{name}");
        assert_eq!(got_rejects, want_rejects, "{name}");
    }
}
