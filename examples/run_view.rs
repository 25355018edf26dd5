//! Run one ViewDefinition over ndjson with the push decoder and print the rows.
//!
//!     cargo run --example run_view
use std::sync::Arc;

use flatfhir::{arrow::util::pretty::print_batches, flatten::DecoderBuilder, view::ViewRegistry};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let view = r#"{
      "name": "patient_names", "resource": "Patient",
      "select": [{"column": [{"name": "id", "path": "getResourceKey()", "type": "id"}]},
                 {"forEach": "name", "column": [
                    {"name": "family", "path": "family", "type": "string"},
                    {"name": "given", "path": "given.join(' ')", "type": "string"}]}]
    }"#;
    let mut registry = ViewRegistry::empty();
    registry.add_json(view, "example")?;
    let mut decoder = DecoderBuilder::new(Arc::new(registry), "inline")
        .with_only_viewed_types(true)
        .build();
    decoder.decode(br#"{"resourceType":"Patient","id":"p1","name":[{"family":"Chalmers","given":["Peter","James"]},{"family":"Windsor"}]}
{"resourceType":"Observation","id":"o1"}
"#)?;
    let batches: Vec<_> = decoder.finish()?.into_iter().map(|b| b.batch).collect();
    print_batches(&batches)?;
    Ok(())
}
