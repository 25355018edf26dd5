//! Small parts into parts of a sensible size, before the run is published.
//!
//! An export commits every downloaded file on its own, so each file leaves its own part in each
//! view it fed. Servers that cut exports into thousands of tiny files (Oracle Health/Cerner:
//! 20,000 files for one export is reported) would leave tens of thousands of tiny parts, which
//! every reader then opens. Once every file is committed and before the run record is
//! published, the small parts of each view are rewritten into as few parts as the row limit
//! allows; the run record lists the new parts, and the small ones are deleted after it is
//! published. Nothing a reader sees changes in between: `query` reads only published runs.
//! A run killed during this step redoes it on `--resume` (the small parts are still there, the
//! new parts get the same names).

use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::{
    Result,
    dataset::{DatasetError, DatasetLocation, WrittenFile},
    sink::DatasetWriterBuilder,
};

/// Parts smaller than this (16 MiB) are small: rewritten together with the view's other small
/// parts.
pub const SMALL_PART_BYTES: u64 = 16 << 20;
/// A view's small parts are coalesced once it has at least this many.
pub const MIN_SMALL_PARTS: usize = 4;

/// What coalescing did.
#[derive(Debug, Default)]
pub struct Coalesced {
    /// The run's parts after coalescing.
    pub parts: Vec<WrittenFile>,
    /// The small parts they replace, to delete once the run record is published.
    pub replaced: Vec<WrittenFile>,
}

/// Rewrite the small parts of each view of one run (`export`) into new parts tagged `tag`.
pub async fn coalesce(
    location: &DatasetLocation,
    export: &str,
    tag: &str,
    compression: parquet::basic::Compression,
    parts: Vec<WrittenFile>,
) -> Result<Coalesced> {
    let mut by_view: std::collections::BTreeMap<String, Vec<WrittenFile>> = Default::default();
    let mut out = Coalesced::default();
    for p in parts {
        if p.bytes < SMALL_PART_BYTES {
            by_view.entry(p.view.clone()).or_default().push(p);
        } else {
            out.parts.push(p);
        }
    }
    let mut groups = Vec::new();
    for (view, mut small) in by_view {
        if small.len() < MIN_SMALL_PARTS {
            out.parts.extend(small);
        } else {
            small.sort_by(|a, b| a.path.cmp(&b.path)); // the same input order on a retry
            groups.push((view, small));
        }
    }
    if groups.is_empty() {
        return Ok(out);
    }
    // Decoding and encoding Parquet is CPU work: off the I/O runtime, like the driver's sink.
    let handle = tokio::runtime::Handle::current();
    let (location, export, tag) = (location.clone(), export.to_string(), tag.to_string());
    let span = tracing::Span::current();
    let rewritten = tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        handle.block_on(async move {
            let mut writer =
                DatasetWriterBuilder::new(location.clone(), format!("{tag}-c"), export)
                    .with_compression(compression)
                    .build();
            let mut replaced = Vec::new();
            for (view, small) in groups {
                let before: u64 = small.iter().map(|p| p.rows).sum();
                let mut rows = 0;
                for part in &small {
                    let path = location.child(&part.path);
                    let pq = |source| DatasetError::Parquet {
                        path: part.path.clone(),
                        source,
                    };
                    // A small part is read whole (at most SMALL_PART_BYTES at a time).
                    let store_err = |source| DatasetError::Store {
                        path: part.path.clone(),
                        source,
                    };
                    let bytes = location
                        .store
                        .get(&path)
                        .await
                        .map_err(store_err)?
                        .bytes()
                        .await
                        .map_err(store_err)?;
                    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                        .map_err(pq)?
                        .build()
                        .map_err(pq)?;
                    for batch in reader {
                        let batch = batch.map_err(|e| pq(e.into()))?;
                        rows += batch.num_rows() as u64;
                        writer.write_batch(&view, &batch).await?;
                    }
                }
                if rows != before {
                    return Err(crate::Error::Internal(format!(
                        "coalescing {view}: read {rows} rows, the parts list {before}"
                    )));
                }
                tracing::debug!(view = %view, parts = small.len(), rows, "small parts coalesced");
                replaced.extend(small);
            }
            Ok::<_, crate::Error>((writer.finish().await?, replaced))
        })
    })
    .await
    .map_err(|e| crate::Error::Internal(format!("the coalescing thread failed: {e}")))??;
    out.parts.extend(rewritten.0);
    out.replaced = rewritten.1;
    out.parts.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::{
        array::{Int64Array, RecordBatch},
        datatypes::{DataType, Field, Schema},
    };

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_parts_become_one_and_big_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let loc = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let mut parts = Vec::new();
        for i in 0..10i64 {
            let mut w = DatasetWriterBuilder::new(loc.clone(), format!("f{i}"), "e1").build();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![i, i + 100]))],
            )
            .unwrap();
            w.write_batch("v", &batch).await.unwrap();
            w.write_batch("few", &batch).await.unwrap();
            for p in w.finish().await.unwrap() {
                // Three parts of `few` only: below the threshold, left alone.
                if p.view == "v" || i < 3 {
                    parts.push(p);
                }
            }
        }
        let compression = parquet::basic::Compression::UNCOMPRESSED;
        let c = coalesce(&loc, "e1", "run", compression, parts)
            .await
            .unwrap();
        let views: Vec<(&str, u64)> = c.parts.iter().map(|p| (p.view.as_str(), p.rows)).collect();
        assert_eq!(views, [("few", 2), ("few", 2), ("few", 2), ("v", 20)]);
        assert_eq!(c.replaced.len(), 10);
        assert!(c.parts.iter().any(|p| p.path.ends_with("-run-c.parquet")));
        // Again (a resumed run): the same names.
        let again = coalesce(&loc, "e1", "run", compression, c.replaced.clone())
            .await
            .unwrap();
        assert_eq!(
            again.parts.last().unwrap().path,
            c.parts.last().unwrap().path
        );
    }
}
