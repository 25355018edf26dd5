//! SQL over a dataset written by `flatfhir convert` (or the convert_folder example).
//!
//!     cargo run --example query_dataset -- DATASET_DIR "select count(*) from patient"
use flatfhir::{arrow::util::pretty::print_batches, dataset::DatasetLocation, query::Dataset};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "flatfhir-example-dataset".into());
    let sql = args
        .next()
        .unwrap_or_else(|| "select gender, count(*) from patient group by gender".into());
    let ds = Dataset::open(&DatasetLocation::resolve(&dir, false)?).await?;
    for t in ds.tables().await? {
        println!("table {:32} {:8} rows", t.name, t.rows);
    }
    print_batches(&ds.sql(&sql).await?)?;
    Ok(())
}
