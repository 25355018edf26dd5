//! Convert a folder of ndjson (default: the bundled sample) into a Parquet dataset.
//!
//!     cargo run --example convert_folder -- [INPUT_DIR] [OUT_DIR]
use std::sync::Arc;

use flatfhir::{
    dataset::DatasetLocation,
    run::{convert::ConvertBuilder, expand_inputs},
    view::ViewRegistry,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = match args.next() {
        Some(dir) => dir.into(),
        None => {
            let dir = std::env::temp_dir().join("flatfhir-example-sample");
            flatfhir::sample::write_sample(&dir)?;
            dir
        }
    };
    let out = args
        .next()
        .unwrap_or_else(|| "flatfhir-example-dataset".into());
    let files = expand_inputs(&[input])?;
    let registry = Arc::new(ViewRegistry::builtin()?);
    let location = DatasetLocation::resolve(&out, true)?;
    let run = ConvertBuilder::new(registry, location)
        .with_files(files)
        .run()
        .await?;
    for (t, c) in &run.types {
        println!(
            "{t:24} {:6} lines -> {:6} rows, {} rejects",
            c.lines, c.rows, c.rejects
        );
    }
    println!("wrote {} files into {out}", run.files.len());
    Ok(())
}
