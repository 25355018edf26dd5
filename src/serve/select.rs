//! Building a job's files: population → `_type` → `_typeFilter` → `_since`/`_until` →
//! `_elements`, the IG's processing model, then one type per file split every N resources.
//!
//! CPU-bound (filters and `_elements` parse lines): runs in `spawn_blocking`.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::bomb::GzipBomb;
use super::data::{Dataset, Resource};
use super::faults::Faults;
use super::job::{ExportFile, FileKind, JobOutput};
use super::outcome::Issue;
use super::request::{ExportRequest, TypeFilter};

/// The tag `_elements` adds to subsetted resources.
const SUBSETTED: &str = r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED","display":"subsetted"}"#;

/// Build the files of a job.
pub(super) fn build(
    data: &Dataset,
    req: &ExportRequest,
    faults: &Faults,
    resources_per_file: usize,
) -> JobOutput {
    let per_file = resources_per_file.max(1);
    let deleted: HashSet<&str> = faults.deleted.iter().map(String::as_str).collect();
    let mut files = Vec::new();
    for (resource_type, indices) in &data.by_type {
        if req
            .types
            .as_ref()
            .is_some_and(|t| !t.contains(&**resource_type))
        {
            continue;
        }
        let filters = req.type_filters.get(&**resource_type);
        let keep = elements_for(req, resource_type);
        let mut lines = Vec::new();
        for r in indices.iter().map(|&i| &data.resources[i]) {
            if !in_population(r, req)
                || !in_time_window(r, req)
                || r.id
                    .as_ref()
                    .is_some_and(|id| deleted.contains(format!("{resource_type}/{id}").as_str()))
            {
                continue;
            }
            // Loaded lines are JSON objects; one that is not is kept untouched.
            let parsed = (filters.is_some() || keep.is_some())
                .then(|| serde_json::from_slice::<Map<String, Value>>(&r.raw).ok())
                .flatten();
            if let (Some(filters), Some(map)) = (filters, &parsed)
                && !filters.iter().any(|f| matches_filter(map, f))
            {
                continue;
            }
            lines.push(match (keep.as_ref(), parsed) {
                (Some(keep), Some(map)) => subset(map, keep),
                _ => r.raw.clone(),
            });
        }
        for chunk in lines.chunks(per_file) {
            files.push(ExportFile::new(
                FileKind::Output,
                resource_type.to_string(),
                chunk.to_vec(),
            ));
        }
    }
    if let Some(plain_bytes) = faults.gzip_bomb
        && req.types.as_ref().is_none_or(|t| t.contains("Patient"))
    {
        let bomb = Arc::new(GzipBomb::new(plain_bytes));
        for _ in 0..faults.gzip_bombs.max(1) {
            files.push(ExportFile {
                bomb: Some(bomb.clone()),
                ..ExportFile::new(FileKind::Output, "Patient".into(), Vec::new())
            });
        }
    }

    let mut issues = req.notes.clone();
    if faults.outcome_warning {
        issues.push(Issue {
            severity: "warning",
            code: "informational",
            diagnostics: "injected warning (fault outcome-warning)".into(),
        });
    }
    if faults.outcome_fatal {
        issues.push(Issue {
            severity: "fatal",
            code: "exception",
            diagnostics: "injected fatal error (fault outcome-fatal)".into(),
        });
    }
    if !issues.is_empty() {
        files.push(ExportFile::new(
            FileKind::Error,
            "OperationOutcome".into(),
            issues.iter().map(|i| json_line(&i.to_outcome())).collect(),
        ));
    }
    if !faults.deleted.is_empty() {
        let lines = faults.deleted.iter().map(|reference| {
            json_line(&json!({
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{ "request": { "method": "DELETE", "url": reference } }],
            }))
        });
        files.push(ExportFile::new(
            FileKind::Deleted,
            "Bundle".into(),
            lines.collect(),
        ));
    }
    JobOutput { files }
}

fn json_line(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// In the compartment of an exported patient, or in no patient compartment at all.
fn in_population(r: &Resource, req: &ExportRequest) -> bool {
    match &req.population {
        None => true,
        Some(patients) => {
            r.patients.is_empty() || r.patients.iter().any(|p| patients.contains(p.as_ref()))
        }
    }
}

/// `_since < lastUpdated < _until`; resources without `lastUpdated` always pass.
fn in_time_window(r: &Resource, req: &ExportRequest) -> bool {
    let Some(t) = r.last_updated else {
        return true;
    };
    req.since.is_none_or(|s| t > s) && req.until.is_none_or(|u| t < u)
}

/// The elements to keep for a type, or `None` when `_elements` says nothing about it.
fn elements_for(req: &ExportRequest, resource_type: &str) -> Option<HashSet<String>> {
    let keep: HashSet<String> = req
        .elements
        .iter()
        .filter(|e| {
            e.resource_type
                .as_deref()
                .is_none_or(|t| t == resource_type)
        })
        .map(|e| e.element.clone())
        .collect();
    (!keep.is_empty()).then_some(keep)
}

/// Keep `resourceType`, `id`, `meta` and the listed elements; tag `meta` SUBSETTED.
fn subset(mut map: Map<String, Value>, keep: &HashSet<String>) -> Bytes {
    map.retain(|k, _| matches!(k.as_str(), "resourceType" | "id" | "meta") || keep.contains(k));
    let meta = map
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        let tag = serde_json::from_str(SUBSETTED).unwrap_or(Value::Null);
        match meta
            .entry("tag")
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            Value::Array(tags) => tags.push(tag),
            other => *other = Value::Array(vec![tag]),
        }
    }
    json_line(&Value::Object(map))
}

/// Every criterion holds.
fn matches_filter(resource: &Map<String, Value>, filter: &TypeFilter) -> bool {
    filter.criteria.iter().all(|(element, wanted)| {
        resource
            .get(element)
            .is_some_and(|v| wanted.iter().any(|w| matches_value(v, w)))
    })
}

/// A search value against an element: strings, numbers and booleans as text; CodeableConcept
/// and Coding by `code` or `system|code`; Reference by `reference` (or its trailing id).
fn matches_value(value: &Value, wanted: &str) -> bool {
    match value {
        Value::String(s) => s == wanted,
        Value::Number(n) => n.to_string() == wanted,
        Value::Bool(b) => b.to_string() == wanted,
        Value::Array(items) => items.iter().any(|v| matches_value(v, wanted)),
        Value::Object(o) => {
            if let Some(coding) = o.get("coding") {
                matches_value(coding, wanted)
            } else if o.contains_key("code") {
                let field = |k| o.get(k).and_then(Value::as_str);
                match wanted.split_once('|') {
                    None => field("code") == Some(wanted),
                    Some(("", code)) => field("system").is_none() && field("code") == Some(code),
                    Some((system, "")) => field("system") == Some(system),
                    Some((system, code)) => {
                        field("system") == Some(system) && field("code") == Some(code)
                    }
                }
            } else if let Some(Value::String(r)) = o.get("reference") {
                r == wanted || r.rsplit('/').next() == Some(wanted)
            } else {
                false
            }
        }
        Value::Null => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::DataSource;
    use crate::serve::request::{ElementSpec, Level};

    fn data() -> Dataset {
        let text = concat!(
            r#"{"resourceType":"Patient","id":"p1","gender":"female","name":[{"family":"A"}]}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"p2","gender":"male","meta":{"lastUpdated":"2020-06-01T00:00:00Z"}}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"},"code":{"coding":[{"system":"http://loinc.org","code":"1"}]}}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/p2"},"code":{"coding":[{"system":"http://loinc.org","code":"2"}]}}"#,
            "\n",
            r#"{"resourceType":"Organization","id":"org"}"#,
        );
        Dataset::load(DataSource::Files(vec![(
            "x".into(),
            Bytes::from_static(text.as_bytes()),
        )]))
        .unwrap()
    }

    fn counts(out: &JobOutput) -> Vec<(String, usize)> {
        out.files
            .iter()
            .map(|f| (f.resource_type.clone(), f.lines.len()))
            .collect()
    }

    fn req(pairs: &[(&str, &str)], level: Level, d: &Dataset) -> ExportRequest {
        let params: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        ExportRequest::parse(&level, &params, true, false, false, d).unwrap()
    }

    #[test]
    fn population_types_filters_and_split() {
        let d = data();
        let all = build(&d, &req(&[], Level::System, &d), &Faults::default(), 1);
        assert_eq!(all.files.len(), 5);
        let p1 = build(
            &d,
            &req(&[("patient", "Patient/p1")], Level::Patient, &d),
            &Faults::default(),
            10,
        );
        assert_eq!(
            counts(&p1),
            [
                ("Observation".into(), 1),
                ("Organization".into(), 1),
                ("Patient".into(), 1)
            ]
        );
        let filtered = build(
            &d,
            &req(
                &[
                    ("_type", "Observation"),
                    ("_typeFilter", "Observation?code=http://loinc.org|2"),
                ],
                Level::System,
                &d,
            ),
            &Faults::default(),
            10,
        );
        assert_eq!(counts(&filtered), [("Observation".into(), 1)]);
        assert!(
            filtered.files[0].lines[0].starts_with(br#"{"resourceType":"Observation","id":"o2""#)
        );
        let since = build(
            &d,
            &req(
                &[("_type", "Patient"), ("_since", "2020-01-01T00:00:00Z")],
                Level::System,
                &d,
            ),
            &Faults::default(),
            10,
        );
        // p1 has no lastUpdated, so it always passes.
        assert_eq!(counts(&since), [("Patient".into(), 2)]);
    }

    #[test]
    fn elements_subset_and_tag() {
        let d = data();
        let mut r = req(&[("_type", "Patient")], Level::System, &d);
        r.elements.push(ElementSpec {
            resource_type: Some("Patient".into()),
            element: "gender".into(),
        });
        let out = build(&d, &r, &Faults::default(), 10);
        let first: Value = serde_json::from_slice(&out.files[0].lines[0]).unwrap();
        assert_eq!(first["gender"], "female");
        assert!(first.get("name").is_none());
        assert_eq!(first["meta"]["tag"][0]["code"], "SUBSETTED");
    }

    #[test]
    fn fault_files() {
        let d = data();
        let faults = Faults {
            deleted: vec!["Patient/p1".into(), "Patient/gone".into()],
            outcome_warning: true,
            ..Faults::default()
        };
        let out = build(
            &d,
            &req(&[("_type", "Patient")], Level::System, &d),
            &faults,
            10,
        );
        assert_eq!(
            counts(&out),
            [
                ("Patient".into(), 1),
                ("OperationOutcome".into(), 1),
                ("Bundle".into(), 2)
            ]
        );
    }

    #[test]
    fn value_matching() {
        let coding = json!({"coding":[{"system":"s","code":"c"}]});
        assert!(matches_value(&coding, "c") && matches_value(&coding, "s|c"));
        assert!(matches_value(&coding, "s|") && !matches_value(&coding, "|c"));
        assert!(matches_value(&json!({"reference":"Patient/1"}), "1"));
        assert!(matches_value(&json!([true]), "true"));
        assert!(!matches_value(&json!("a"), "b"));
    }
}
