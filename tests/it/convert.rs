//! End to end without HTTP: ndjson → convert → Parquet dataset → SQL through DataFusion.

use std::sync::Arc;

use flatfhir::{
    arrow::{array::AsArray, datatypes::Int64Type, record_batch::RecordBatch},
    datafusion::{
        datasource::{
            file_format::parquet::ParquetFormat,
            listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl},
        },
        prelude::SessionContext,
    },
    dataset::{DatasetLocation, RunManifest},
    query::Dataset,
    run::{
        self,
        convert::{ConvertBuilder, ConvertOptions},
    },
    view::ViewRegistry,
};

use crate::support::data;

async fn convert(inputs: &[std::path::PathBuf], out: &std::path::Path) -> RunManifest {
    let files = run::expand_inputs(inputs).unwrap();
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), true).unwrap();
    let reg = Arc::new(ViewRegistry::builtin().unwrap());
    let opts = ConvertOptions {
        batch_size: 100,
        ..Default::default()
    };
    ConvertBuilder::new(reg, loc)
        .with_files(files)
        .with_options(opts)
        .run()
        .await
        .unwrap()
}

fn count(batches: &[RecordBatch]) -> i64 {
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_and_bad_lines_reconcile_and_query() {
    let tmp = tempfile::tempdir().unwrap();
    let m = convert(&[data("sample"), data("bad/mixed.ndjson")], tmp.path()).await;
    // Accounting: per type, lines = rows + rejects + filtered.
    for (t, c) in &m.types {
        if t != flatfhir::flatten::INVALID_TYPE_BUCKET {
            assert_eq!(c.lines, c.rows + c.rejects + c.filtered, "{t}: {c:?}");
        }
    }
    assert_eq!(m.types["Patient"].lines, 4 + 3);
    assert_eq!(m.types["Patient"].rows, 4 + 2);
    assert_eq!(m.types["Patient"].rejects, 1);
    assert_eq!(m.types["Observation"].rows, 1728);
    assert_eq!(m.rejects, 6);
    assert_eq!(m.blank_lines, 1);
    // A published run leaves no bookkeeping behind, not even an empty `_publishing/`.
    assert!(!tmp.path().join(flatfhir::dataset::PUBLISHING_DIR).exists());
    let total_lines: u64 = m.inputs.iter().map(|i| i.lines).sum();
    let typed: u64 = m.types.values().map(|c| c.lines).sum();
    assert_eq!(total_lines, typed + m.blank_lines);

    let ds = Dataset::open(&DatasetLocation::resolve(tmp.path().to_str().unwrap(), false).unwrap())
        .await
        .unwrap();
    assert_eq!(
        count(&ds.sql("select count(*) from patient").await.unwrap()),
        6
    );
    assert_eq!(
        count(&ds.sql("select count(*) from observation").await.unwrap()),
        1728
    );
    assert_eq!(
        count(&ds.sql("select count(*) from basic").await.unwrap()),
        1
    );
    // The rejects table names file, line and reason, and keeps the raw line.
    let r = ds
        .sql("select count(*) from _rejects where file like '%mixed.ndjson' and line = 4 and reason like '%invalid `resourceType`%' and raw like '%etc/passwd%'")
        .await
        .unwrap();
    assert_eq!(count(&r), 1);
    // The raw resource column is queryable with the JSON functions.
    let r = ds
        .sql("select count(*) from patient where json_get_str(resource, 'id') = id")
        .await
        .unwrap();
    assert_eq!(count(&r), 6);
    // Typed columns: a decimal compares numerically, a DATE is a date.
    let r = ds
        .sql("select count(*) from observation where code = '4548-4' and value_quantity = 3.91 and value_quantity > 3.9 and effective_date_time > timestamp '1990-01-01T00:00:00Z'")
        .await
        .unwrap();
    assert!(count(&r) > 0);
    let r = ds.sql("select count(*) from patient where birth_date = date '1970-05-01' and birth_date_text = '1970-05'").await.unwrap();
    assert_eq!(
        count(&r),
        1,
        "a partial date starts its period and keeps its text"
    );

    // A second run lands side by side in its own partition.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let m2 = convert(&[data("sample")], tmp.path()).await;
    assert_ne!(m2.export, m.export);
    let ds = Dataset::open(&DatasetLocation::resolve(tmp.path().to_str().unwrap(), false).unwrap())
        .await
        .unwrap();
    let r = ds
        .sql("select count(distinct export) from patient")
        .await
        .unwrap();
    assert_eq!(count(&r), 2);
    assert_eq!(
        count(&ds.sql("select count(*) from patient").await.unwrap()),
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublished_files_are_not_read_and_other_readers_see_the_partition_column() {
    let tmp = tempfile::tempdir().unwrap();
    let m = convert(&[data("sample")], tmp.path()).await;
    // A crashed run: a Parquet file in a partition no manifest lists.
    let stray_dir = tmp.path().join("patient/export=20000101T000000Z");
    std::fs::create_dir_all(&stray_dir).unwrap();
    let src = tmp
        .path()
        .join(&m.files.iter().find(|f| f.view == "patient").unwrap().path);
    std::fs::copy(src, stray_dir.join("part-00000-crashed.parquet")).unwrap();
    let ds = Dataset::open(&DatasetLocation::resolve(tmp.path().to_str().unwrap(), false).unwrap())
        .await
        .unwrap();
    assert_eq!(
        count(&ds.sql("select count(*) from patient").await.unwrap()),
        4
    );

    // A plain Hive-style reader (DataFusion's listing table, as DuckDB/pyarrow would) sees the
    // partition column without any flatfhir metadata.
    let ctx = SessionContext::new();
    let url = ListingTableUrl::parse(format!("{}/patient/", tmp.path().display())).unwrap();
    let opts = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![(
            "export".into(),
            flatfhir::arrow::datatypes::DataType::Utf8,
        )]);
    let schema = opts.infer_schema(&ctx.state(), &url).await.unwrap();
    let cfg = ListingTableConfig::new(url)
        .with_listing_options(opts)
        .with_schema(schema);
    ctx.register_table("p", Arc::new(ListingTable::try_new(cfg).unwrap()))
        .unwrap();
    let sql = format!("select count(*) from p where export = '{}'", m.export);
    let b = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
    assert_eq!(count(&b), 4);
}

/// A big uncompressed file decoded in byte ranges by several workers gives exactly the result of
/// decoding it whole: counts, rows, and rejects at the same file, line and byte offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_files_convert_exactly_like_whole_files() {
    use flatfhir::arrow::util::pretty::pretty_format_batches;

    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("big.ndjson");
    let mut text = String::new();
    let mut bad = Vec::new(); // (line, byte offset)
    for n in 1..=3000u64 {
        let line = match n {
            _ if n % 997 == 0 => r#"{"resourceType":"Patient","id":"broken","#.to_string(),
            _ if n % 641 == 0 => r#"{"resourceType":"../x","id":"evil"}"#.to_string(),
            _ if n % 503 == 0 => {
                format!(r#"{{"resourceType":"Patient","id":"d{n}","birthDate":"05/06/1970"}}"#)
            }
            _ if n % 211 == 0 => String::new(),
            _ if n % 3 == 0 => format!(
                r#"{{"resourceType":"Patient","id":"p{n}","gender":"female","birthDate":"1970-05-01"}}"#
            ),
            _ => format!(
                r#"{{"resourceType":"Observation","id":"o{n}","status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"4548-4"}}]}},"subject":{{"reference":"Patient/p{}"}},"valueQuantity":{{"value":{}.5,"unit":"%"}}}}"#,
                n / 3 * 3,
                n % 11
            ),
        };
        if n % 997 == 0 || n % 641 == 0 || n % 503 == 0 {
            bad.push((n, text.len() as u64));
        }
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&input, &text).unwrap();
    let bounds = run::input::split_file(&input, 4096).unwrap();
    assert!(bounds.len() > 21, "{} ranges", bounds.len() - 1);

    let reg = Arc::new(ViewRegistry::builtin().unwrap());
    let mut results = Vec::new();
    // On one thread each range finds the counts of those before it recorded; on three, some
    // count the ranges before them themselves.
    for (split_bytes, threads) in [(0, 1), (4096, 1), (4096, 3)] {
        let out = tmp.path().join(format!("out-{split_bytes}-{threads}"));
        let loc = DatasetLocation::resolve(out.to_str().unwrap(), true).unwrap();
        let opts = ConvertOptions {
            batch_size: 100,
            threads,
            split_bytes,
            ..Default::default()
        };
        let files = run::expand_inputs(std::slice::from_ref(&input)).unwrap();
        let m = ConvertBuilder::new(reg.clone(), loc)
            .with_files(files)
            .with_options(opts)
            .run()
            .await
            .unwrap();
        for (t, c) in &m.types {
            if t != flatfhir::flatten::INVALID_TYPE_BUCKET {
                assert_eq!(c.lines, c.rows + c.rejects + c.filtered, "{t}: {c:?}");
            }
        }
        assert_eq!(m.inputs.len(), 1);
        assert_eq!(m.inputs[0].bytes, text.len() as u64);
        assert_eq!(m.inputs[0].lines, 3000);
        assert_eq!(m.inputs[0].rejects, bad.len() as u64);
        let ds = Dataset::open(&DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap())
            .await
            .unwrap();
        let rejects = ds
            .sql("select file, line, byte_offset from _rejects order by line")
            .await
            .unwrap();
        let lines = ds
            .sql("select line, byte_offset from _rejects order by line")
            .await
            .unwrap();
        let got: Vec<(u64, u64)> = {
            let b = flatfhir::arrow::compute::concat_batches(&lines[0].schema(), &lines).unwrap();
            let cast = |i: usize| {
                flatfhir::arrow::compute::cast(
                    b.column(i),
                    &flatfhir::arrow::datatypes::DataType::UInt64,
                )
                .unwrap()
            };
            let (l, o) = (cast(0), cast(1));
            let (l, o) = (
                l.as_primitive::<flatfhir::arrow::datatypes::UInt64Type>(),
                o.as_primitive::<flatfhir::arrow::datatypes::UInt64Type>(),
            );
            (0..b.num_rows())
                .map(|i| (l.value(i), o.value(i)))
                .collect()
        };
        assert_eq!(got, bad, "split {split_bytes}");
        let mut view_rows = std::collections::BTreeMap::new();
        for v in m.views.keys() {
            let n = count(&ds.sql(&format!("select count(*) from {v}")).await.unwrap());
            assert_eq!(n as u64, m.views[v], "{v}");
            view_rows.insert(v.clone(), n);
        }
        results.push((
            m.types.clone(),
            m.views.clone(),
            m.blank_lines,
            m.inputs.clone(),
            pretty_format_batches(&rejects).unwrap().to_string(),
            view_rows,
        ));
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
    assert!(results[0].1["observation"] > 1000);
}

/// Every table's rows as sorted JSON lines (the `export` column left out: each run has its own).
async fn table_rows(out: &std::path::Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let loc = DatasetLocation::resolve(out.to_str().unwrap(), false).unwrap();
    let ds = Dataset::open(&loc).await.unwrap();
    let mut tables = std::collections::BTreeMap::new();
    for name in ds.table_names().to_vec() {
        let mut rows = Vec::new();
        for b in ds.sql(&format!("select * from \"{name}\"")).await.unwrap() {
            for mut row in flatfhir::sink::rows::batch_to_json_rows(&b) {
                row.retain(|(column, _)| column != "export");
                let mut line = Vec::new();
                flatfhir::sink::rows::write_json_row(&mut line, &row).unwrap();
                rows.push(String::from_utf8(line).unwrap());
            }
        }
        rows.sort();
        tables.insert(name, rows);
    }
    tables
}

/// Several Parquet writer threads (`--writers`), each writing its share of the views, give the
/// tables one writer gives, row for row, and the run's accounting is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_writer_threads_write_what_one_writes() {
    let inputs = run::expand_inputs(&[data("sample"), data("bad/mixed.ndjson")]).unwrap();
    let mut results = Vec::new();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for (writers, dir) in [1, 3].into_iter().zip(&dirs) {
        let loc = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        let reg = Arc::new(ViewRegistry::builtin().unwrap());
        let opts = ConvertOptions {
            batch_size: 100,
            threads: 2,
            writers,
            ..Default::default()
        };
        let m = ConvertBuilder::new(reg, loc)
            .with_files(inputs.clone())
            .with_options(opts)
            .run()
            .await
            .unwrap();
        let parts: Vec<(String, u64)> = m.files.iter().map(|f| (f.view.clone(), f.rows)).collect();
        results.push((
            m.types.clone(),
            m.rejects,
            parts,
            table_rows(dir.path()).await,
        ));
    }
    let (one, three) = (&results[0], &results[1]);
    assert_eq!(one.0, three.0);
    assert_eq!(one.1, three.1);
    assert_eq!(one.2, three.2, "the same parts, of the same views and rows");
    assert!(one.3.len() > 40, "{:?}", one.3.keys());
    assert_eq!(one.3, three.3);
}
