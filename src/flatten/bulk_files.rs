//! An export's `deleted` and `error` files, decoded like any other input: each is a
//! ViewDefinition of flatfhir's own over the resources those files hold, run by the same
//! [`Decoder`](super::Decoder).
//!
//! * `deleted` files hold `Bundle`s whose entries' `request.url` (`Patient/123`) name resources
//!   the server deleted since `_since` → table `_deleted` (`resource_type`, `id`, `url`,
//!   `last_updated`: the Bundle's `meta.lastUpdated`), the tombstones current state honours.
//! * `error` files hold `OperationOutcome`s → table `_outcomes`, one row per issue
//!   (`severity`, `code`, `diagnostics`: the issue's `diagnostics`, else `details.text`).
//!
//! Lines of another type are skipped and counted (`DecodeStats::skipped`); bad lines are rejects
//! like everywhere else.

use std::sync::Arc;

use crate::{
    dataset::{DELETED_TABLE, OUTCOMES_TABLE},
    view::{CompiledView, ViewRegistry},
};

const DELETED_VIEW: &str = r#"{
  "resourceType": "ViewDefinition", "name": "deleted", "resource": "Bundle", "status": "active",
  "select": [
    {"forEach": "entry", "column": [
      {"name": "resource_type", "path": "request.url.split('/').where($this != '').first()", "type": "string"},
      {"name": "id", "path": "request.url.split('/').where($this != '').skip(1).first()", "type": "string"},
      {"name": "url", "path": "request.url", "type": "string"}
    ]},
    {"column": [{"name": "last_updated", "path": "meta.lastUpdated.toString()", "type": "string"}]}
  ]
}"#;

const OUTCOMES_VIEW: &str = r#"{
  "resourceType": "ViewDefinition", "name": "outcomes", "resource": "OperationOutcome", "status": "active",
  "select": [
    {"forEach": "issue", "column": [
      {"name": "severity", "path": "severity", "type": "code"},
      {"name": "code", "path": "code", "type": "code"},
      {"name": "diagnostics", "path": "iif(diagnostics.exists(), diagnostics, details.text)", "type": "string"}
    ]}
  ]
}"#;

fn internal(text: &str, table: &str) -> Arc<ViewRegistry> {
    let mut view = CompiledView::from_json(text, "<flatfhir>")
        .unwrap_or_else(|e| unreachable!("flatfhir's own view {table} is valid: {e}"));
    view.set_table_name(table);
    Arc::new(ViewRegistry::internal(vec![view]))
}

/// The views of a `deleted` file: `Bundle` → `_deleted`.
pub fn deleted_registry() -> Arc<ViewRegistry> {
    internal(DELETED_VIEW, DELETED_TABLE)
}

/// The views of an `error` file: `OperationOutcome` → `_outcomes`.
pub fn outcomes_registry() -> Arc<ViewRegistry> {
    internal(OUTCOMES_VIEW, OUTCOMES_TABLE)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::{array::AsArray, record_batch::RecordBatch};

    use super::*;
    use crate::flatten::DecoderBuilder;

    fn decode(reg: Arc<ViewRegistry>, input: &str) -> (RecordBatch, crate::flatten::DecodeStats) {
        let mut d = DecoderBuilder::new(reg, "f.ndjson")
            .with_only_viewed_types(true)
            .build();
        d.decode(input.as_bytes()).unwrap();
        let mut batches = d.finish().unwrap();
        assert_eq!(batches.len(), 1, "{batches:?}");
        (batches.remove(0).batch, d.stats().clone())
    }

    fn texts(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
        b.column_by_name(col)
            .unwrap()
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    #[test]
    fn deleted_bundles_become_tombstones() {
        let input = concat!(
            r#"{"resourceType":"Bundle","type":"transaction","meta":{"lastUpdated":"2026-01-02T03:04:05Z"},"entry":[{"request":{"method":"DELETE","url":"Patient/p1"}},{"request":{"method":"DELETE","url":"/Observation/o9/_history/2"}}]}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"not-a-bundle"}"#,
            "\n"
        );
        let (b, stats) = decode(deleted_registry(), input);
        assert_eq!(
            b.schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            ["resource_type", "id", "url", "last_updated"]
        );
        assert_eq!(
            texts(&b, "resource_type"),
            [Some("Patient".into()), Some("Observation".into())]
        );
        assert_eq!(texts(&b, "id"), [Some("p1".into()), Some("o9".into())]);
        assert_eq!(
            texts(&b, "last_updated")[0].as_deref(),
            Some("2026-01-02T03:04:05Z")
        );
        assert_eq!((stats.skipped, stats.view_rows[DELETED_TABLE]), (1, 2));
    }

    #[test]
    fn outcome_issues_become_rows() {
        let input = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"exception","diagnostics":"boom"},{"severity":"warning","code":"processing","details":{"text":"careful"}}]}"#;
        let (b, _) = decode(outcomes_registry(), input);
        assert_eq!(
            texts(&b, "severity"),
            [Some("fatal".into()), Some("warning".into())]
        );
        assert_eq!(
            texts(&b, "diagnostics"),
            [Some("boom".into()), Some("careful".into())]
        );
    }
}
