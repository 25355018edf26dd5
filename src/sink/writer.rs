//! [`DatasetWriter`]: per-view Parquet files under one run's `export=` partition.

use std::collections::HashMap;

use super::{
    json_pages::{FileWriter, JsonPages},
    upload::Upload,
};
use crate::{
    dataset::{DatasetError, DatasetLocation, PARTITION_COLUMN, STAGED_SUFFIX, WrittenFile},
    flatten::ViewBatch,
    view::compile::FHIR_TYPE_METADATA,
};
use datafusion::arrow::{
    array::{Array, ArrayRef, AsArray, make_comparator},
    compute::SortOptions,
    datatypes::DataType,
    record_batch::RecordBatch,
};
use parquet::{
    basic::{Compression, ZstdLevel},
    file::properties::{EnabledStatistics, WriterProperties},
    schema::types::ColumnPath,
};

/// Rows per Parquet row group.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 65_536;
/// Rows per Parquet file before a new part file is started.
pub const DEFAULT_MAX_ROWS_PER_FILE: usize = 2_000_000;
/// Encoded bytes buffered for one row group before it is flushed early (bounds memory per view).
const MAX_IN_PROGRESS_BYTES: usize = 64 << 20;
/// Memory of all open row groups together (every view of a run has one open) before the largest
/// is flushed early: the per-view bound alone lets 40 views hold 40 × 64 MiB.
///
/// 48 MiB rather than 64 keeps a `convert` of any size under 256 MB of peak RSS on 2 cores
/// (synthea ×100: 234–238 MB against 268–270 MB at 64 MiB and 248–260 MB at 56, in the same
/// time), for ~30% more row groups and 2.8% more bytes (505 against 491 MB: smaller row groups
/// of the largest views, each with its own dictionaries and last partial pages).
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 48 << 20;
/// Measurement only (`benches/raw_column.sh`): the codec of JSON text columns, in parquet's
/// spelling (`zstd(2)`, `lz4_raw`, `snappy`, `uncompressed`), whatever the files' codec (see
/// [`props_for`] for why they keep the files' own).
pub const JSON_COMPRESSION_ENV: &str = "FLATFHIR_BENCH_JSON_COMPRESSION";
/// Measurement only (`benches/raw_column.sh`): the data page size limit of JSON text columns,
/// in bytes (parquet's default, 1 MiB, otherwise).
pub const JSON_PAGE_BYTES_ENV: &str = "FLATFHIR_BENCH_JSON_PAGE_BYTES";

/// Configures a [`DatasetWriter`].
#[derive(Debug, Clone)]
pub struct DatasetWriterBuilder {
    location: DatasetLocation,
    tag: String,
    export: String,
    compression: Compression,
    row_group_rows: usize,
    max_rows_per_file: usize,
    staged: bool,
    max_buffered_bytes: usize,
    json: JsonColumns,
}

/// How JSON text columns (the raw `resource` column) are written: see [`props_for`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct JsonColumns {
    /// Codec, when not the one [`props_for`] picks.
    compression: Option<Compression>,
    /// Data page size limit, when not parquet's default.
    page_bytes: Option<usize>,
}

impl JsonColumns {
    /// The measurement overrides ([`JSON_COMPRESSION_ENV`], [`JSON_PAGE_BYTES_ENV`]).
    fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The overrides from variables looked up with `var`; a value that does not parse is
    /// ignored with a warning.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        fn parsed<T>(
            name: &str,
            value: Option<String>,
            parse: impl FnOnce(&str) -> Option<T>,
        ) -> Option<T> {
            let v = value?;
            let parsed = parse(&v);
            if parsed.is_none() {
                tracing::warn!(value = %v, "ignoring {name}: not a valid value");
            }
            parsed
        }
        JsonColumns {
            compression: parsed(JSON_COMPRESSION_ENV, var(JSON_COMPRESSION_ENV), |v| {
                v.parse().ok()
            }),
            page_bytes: parsed(JSON_PAGE_BYTES_ENV, var(JSON_PAGE_BYTES_ENV), |v| {
                v.parse().ok().filter(|&n| n > 0)
            }),
        }
    }
}

impl DatasetWriterBuilder {
    /// A writer of partition `export=<export>` whose files are named `part-<n>-<tag>.parquet`
    /// (the tag tells apart the writers of one partition: a run's random id part, plus a hash
    /// of the downloaded file's URL for an export).
    pub fn new(
        location: DatasetLocation,
        tag: impl Into<String>,
        export: impl Into<String>,
    ) -> Self {
        DatasetWriterBuilder {
            location,
            tag: tag.into(),
            export: export.into(),
            compression: Compression::ZSTD(ZstdLevel::default()),
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            max_rows_per_file: DEFAULT_MAX_ROWS_PER_FILE,
            staged: false,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            json: JsonColumns::from_env(),
        }
    }
    /// Write files under a staged name (`<path>.staged`, invisible to readers); the caller makes
    /// them visible with [`crate::dataset::commit_staged`] once all of them are complete (default `false`).
    pub fn with_staging(mut self, staged: bool) -> Self {
        self.staged = staged;
        self
    }
    /// Compression codec (default zstd level 1).
    pub fn with_compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }
    /// Rows per row group (default [`DEFAULT_ROW_GROUP_ROWS`]).
    pub fn with_row_group_rows(mut self, n: usize) -> Self {
        self.row_group_rows = n.max(1);
        self
    }
    /// Rows per file (default [`DEFAULT_MAX_ROWS_PER_FILE`]).
    pub fn with_max_rows_per_file(mut self, n: usize) -> Self {
        self.max_rows_per_file = n.max(1);
        self
    }
    /// Memory of all open row groups together before the largest is flushed early (default
    /// [`DEFAULT_MAX_BUFFERED_BYTES`]). Writers that run side by side (an export's parallel
    /// downloads) share one budget by each taking a part of it.
    pub fn with_max_buffered_bytes(mut self, n: usize) -> Self {
        self.max_buffered_bytes = n.max(1 << 20);
        self
    }
    /// The writer budget ([`Self::with_max_buffered_bytes`]).
    pub fn max_buffered_bytes(&self) -> usize {
        self.max_buffered_bytes
    }

    /// Build.
    pub fn build(self) -> DatasetWriter {
        let props = WriterProperties::builder()
            .set_compression(self.compression)
            .set_max_row_group_row_count(Some(self.row_group_rows))
            .set_created_by(format!("flatfhir {}", env!("CARGO_PKG_VERSION")))
            .build();
        DatasetWriter {
            cfg: self,
            props,
            open: HashMap::new(),
            seq: HashMap::new(),
            written: Vec::new(),
            json_pages: JsonPages::default(),
        }
    }
}

struct OpenFile {
    writer: FileWriter,
    schema: datafusion::arrow::datatypes::SchemaRef,
    path: String,
    rows: u64,
}

impl OpenFile {
    /// Close the row group in progress (bounds the writer's memory).
    async fn flush_row_group(&mut self, json_pages: &mut JsonPages) -> Result<(), DatasetError> {
        self.writer
            .flush(json_pages)
            .await
            .map_err(|source| DatasetError::Parquet {
                path: self.path.clone(),
                source,
            })
    }
}

/// How long a failed run waits for the aborts of its unfinished uploads (30 s) before it
/// reports its error anyway: a run often fails because the store is unreachable, and each abort
/// request is retried as every request is.
const ABORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Abort the uploads of files that were never closed, side by side, waiting at most
/// [`ABORT_TIMEOUT`].
async fn abort_uploads(files: impl IntoIterator<Item = OpenFile>) {
    let aborts: Vec<_> = files
        .into_iter()
        .map(|f| async move { f.writer.into_inner().abort().await })
        .collect();
    if aborts.is_empty() {
        return;
    }
    let n = aborts.len();
    if tokio::time::timeout(ABORT_TIMEOUT, futures::future::join_all(aborts))
        .await
        .is_err()
    {
        tracing::warn!(
            uploads = n,
            "gave up aborting unfinished uploads after 30 s"
        );
    }
}

/// Writes view batches into Parquet files; [`finish`](Self::finish) closes them. Publishing the
/// run (the manifest) is the caller's separate, last step.
pub struct DatasetWriter {
    cfg: DatasetWriterBuilder,
    props: WriterProperties,
    open: HashMap<String, OpenFile>,
    seq: HashMap<String, usize>,
    written: Vec<WrittenFile>,
    /// What the open files' JSON columns share (see [`super::json_pages`]).
    json_pages: JsonPages,
}

impl DatasetWriter {
    /// Relative directory of a view's partition for this run.
    pub fn partition_dir(&self, view: &str) -> String {
        format!("{view}/{PARTITION_COLUMN}={}", self.cfg.export)
    }

    /// Write one batch.
    pub async fn write(&mut self, vb: &ViewBatch) -> Result<(), DatasetError> {
        self.write_batch(&vb.view, &vb.batch).await
    }

    /// Write one batch of a view.
    pub async fn write_batch(
        &mut self,
        view: &str,
        batch: &RecordBatch,
    ) -> Result<(), DatasetError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if !self.open.contains_key(view) {
            let f = self.open_file(view, batch)?;
            self.open.insert(view.to_string(), f);
        }
        let f = self.open.get_mut(view).expect("inserted above");
        let pq = |source| DatasetError::Parquet {
            path: f.path.clone(),
            source,
        };
        f.writer
            .write(batch, &mut self.json_pages)
            .await
            .map_err(pq)?;
        f.rows += batch.num_rows() as u64;
        if f.writer.in_progress_size() > MAX_IN_PROGRESS_BYTES {
            f.flush_row_group(&mut self.json_pages).await?;
        }
        if f.rows >= self.cfg.max_rows_per_file as u64 {
            let f = self.open.remove(view).expect("present");
            self.close(view, f).await?;
        }
        self.bound_memory().await
    }

    /// Flush the largest open row group while all of them together use more than
    /// [`DatasetWriterBuilder::with_max_buffered_bytes`].
    async fn bound_memory(&mut self) -> Result<(), DatasetError> {
        loop {
            let total: usize = self.open.values().map(|f| f.writer.memory_size()).sum();
            if total <= self.cfg.max_buffered_bytes {
                return Ok(());
            }
            let Some(f) = self
                .open
                .values_mut()
                .filter(|f| f.writer.in_progress_rows() > 0)
                .max_by_key(|f| f.writer.memory_size())
            else {
                return Ok(());
            };
            f.flush_row_group(&mut self.json_pages).await?;
        }
    }

    /// Open the next file of `view`, its encodings tuned on its `first` batch.
    fn open_file(&mut self, view: &str, first: &RecordBatch) -> Result<OpenFile, DatasetError> {
        let dir = self.partition_dir(view);
        let seq = self.seq.entry(view.to_string()).or_default();
        let path = format!("{dir}/part-{:05}-{}.parquet", *seq, self.cfg.tag);
        *seq += 1;
        let target = if self.cfg.staged {
            format!("{path}{STAGED_SUFFIX}")
        } else {
            path.clone()
        };
        let obj = Upload::new(&self.cfg.location, &target);
        let props = props_for(&self.props, self.cfg.json, first);
        let writer = FileWriter::try_new(obj, first.schema(), props).map_err(|source| {
            DatasetError::Parquet {
                path: path.clone(),
                source,
            }
        })?;
        Ok(OpenFile {
            writer,
            schema: first.schema(),
            path,
            rows: 0,
        })
    }

    async fn close(&mut self, view: &str, f: OpenFile) -> Result<(), DatasetError> {
        let OpenFile {
            writer,
            schema,
            path,
            rows,
        } = f;
        let mut writer = writer;
        let meta = match writer.finish(&mut self.json_pages).await {
            Ok(meta) => meta,
            Err(source) => {
                // Failed before completing began (writing the last row group or the footer):
                // nothing of the upload stays behind either.
                writer.into_inner().abort().await;
                return Err(DatasetError::Parquet { path, source });
            }
        };
        let bytes = writer.bytes_written() as u64;
        self.written.push(WrittenFile {
            view: view.to_string(),
            path,
            rows,
            bytes,
            stats: Some(crate::dataset::delta::file_stats(&meta, &schema)),
        });
        Ok(())
    }

    /// Close every open file; returns everything written, sorted by path. On an error the
    /// files not yet closed are aborted ([`Self::abort`]).
    pub async fn finish(mut self) -> Result<Vec<WrittenFile>, DatasetError> {
        let mut open: Vec<_> = std::mem::take(&mut self.open).into_iter().collect();
        open.sort_by(|a, b| a.0.cmp(&b.0));
        let mut open = open.into_iter();
        while let Some((view, f)) = open.next() {
            if let Err(e) = self.close(&view, f).await {
                abort_uploads(open.map(|(_, f)| f)).await;
                return Err(e);
            }
        }
        self.written.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(self.written)
    }

    /// Abandon the files still open (the run failed): their uploads are aborted. An object
    /// store never lists an unfinished multipart upload, so the failed run's clean-up cannot
    /// find it, yet S3 keeps (and bills) its uploaded parts until a lifecycle rule removes
    /// them; aborted, nothing of it stays. Files already closed are left to that clean-up.
    pub async fn abort(&mut self) {
        abort_uploads(std::mem::take(&mut self.open).into_values()).await;
    }

    /// Files written so far (closed ones).
    pub fn written(&self) -> &[WrittenFile] {
        &self.written
    }
}

/// The writer properties for one file: `base`, plus
///
/// - for JSON text columns (the raw `resource` column of base views, `fhir.type` = `json`), no
///   dictionary and no statistics. Every value of such a column is a distinct multi-kilobyte
///   document, so a dictionary is built only to be abandoned, and min/max statistics cost a
///   string comparison per value but prune nothing. Together they were ~4% of a `convert`
///   run's CPU.
///
///   They keep the files' codec (zstd level 1 by default) and parquet's page size (1 MiB),
///   chosen by `benches/raw_column.sh` on synthea-100 (49.2 MB of ndjson; instructions of the
///   whole `convert --threads 1` under callgrind, bytes of the Parquet files it wrote; runs of
///   one binary differ by ~0.2%):
///
///   | raw column             | instructions | Parquet |
///   |------------------------|--------------|---------|
///   | zstd(1), 1 MiB pages   | 4.98 G       | 7.56 MB |
///   | zstd(2)                | +0.1%        | +0.9%   |
///   | zstd(3)                | +2.6%        | +3.0%   |
///   | LZ4_RAW                | −1.5%        | +35%    |
///   | Snappy                 | −1.4%        | +61%    |
///   | uncompressed           | −4.7%        | +617%   |
///   | zstd(1), 256 KiB pages | +0.0%        | +2.1%   |
///   | zstd(1), 2 MiB pages   | −1.2%        | −0.3%   |
///   | zstd(1), 4 MiB pages   | −1.6%        | −0.5%   |
///
///   Level 1 is zstd's fastest level that parquet accepts (`ZstdLevel` takes 1 to 22, no
///   negative levels), and the raw JSON compresses ~18× at it. LZ4_RAW or Snappy would save
///   1.5% of the instructions for a third to three fifths more bytes, stored for years; higher
///   levels cost more and, on these pages, write more. Bigger pages look cheaper only to
///   callgrind: all of their saving is in copies (the page buffer regrowing, the compressor's
///   output buffer growing to its bound), and callgrind counts a glibc copy of 16 KiB to ~2 MiB
///   (`rep movsb`) at one instruction per byte, ten times a bigger copy's count, though the
///   CPU copies both about as fast. The zstd work itself is the same, and every open base view
///   would buffer twice the page against [`DEFAULT_MAX_BUFFERED_BYTES`], so runs with many
///   views would flush smaller row groups.
///
///   Since then these pages are written by [`super::json_pages`] rather than by parquet's
///   column writer, which copied each of them twice on the way to zstd (the plain encoder's
///   buffer regrowing from empty every page, and `add_data_page` moving the values behind the
///   levels into a buffer that zstd then regrew to its bound). Same files (synthea-100: every
///   table reads back the same in pyarrow, 7,563,930 → 7,554,102 bytes of Parquet); the whole
///   `convert --threads 1` went from 3.646 G to 3.583 G instructions (74.1 → 72.8 per byte:
///   glibc `memcpy` 257 → 135 M, jemalloc `large_ralloc` 129 → 50 M, the rest of which is
///   other columns' and the file buffer's). Measured again after that (`raw_column.sh`, f3dc57c:
///   3.483 G by default), zstd(1) is now also the cheapest option: LZ4_RAW +1.5% instructions
///   (+36% bytes: its pages still take parquet's copies), zstd(3) +3.5% (+3.2% bytes).
/// - for text columns whose values are mostly distinct in the file's first batch (the `id`
///   of a base view, the parent key of a child view such as `observation_coding`'s
///   `observation_id`, one-to-one references such as `explanation_of_benefit`'s `claim_id`),
///   no dictionary: hashing every value into a dictionary that only grows until parquet
///   abandons it at its page limit costs CPU (~1% for `id` alone), and plain encoding plus
///   zstd writes smaller files (synthea-100: −2%). Columns that repeat (`patient_id`, codes,
///   statuses) keep theirs. They stay plain: `DELTA_LENGTH_BYTE_ARRAY` (lengths first, then
///   the bytes) was measured (21cd9ab, reverted): it cuts zstd's work on random-hex ids by a
///   third (parquet's zstd 355 → 234 M, the run −3.7% instructions, files −1.7%), but
///   parquet 59's encoder for it reserves a 1 MiB bit buffer per column writer, and with ~100
///   such columns open at once peak RSS rose 35–40 MB (×10 180 → 222 MB, ×100 204 → 239 MB).
/// - when the codec is zstd, Snappy for flat columns that are mostly null or hold at most
///   [`FEW_DISTINCT`] values in the first batch (two thirds of the default views' ~880
///   columns: `value_boolean` of an Observation, statuses, code systems, …). parquet 59 gives
///   every column writer of an open row group its own zstd compression and decompression
///   contexts (~85 KB together), and every view has a row group open all run long, so these
///   columns held ~30 MB of a large run's peak memory (synthea ×100: 288 → 252–264 MB) while
///   their pages are a fraction of a percent of its bytes (synthea ×20: 558 columns, 0.3 MB
///   more as Snappy of 97.6 MB); Snappy's state is a few KB and its pages of null levels and
///   dictionary indices are about as small. A column that turns out otherwise later stays
///   readable by every engine and is only compressed less.
///
/// The first batch is a sample, so all of this only tunes the encoding: any choice reads back
/// the same.
fn props_for(
    base: &WriterProperties,
    json_cols: JsonColumns,
    first: &RecordBatch,
) -> WriterProperties {
    let schema = first.schema();
    let mut b = base.clone().into_builder();
    let zstd = matches!(
        base.compression(&ColumnPath::from("")),
        Compression::ZSTD(_)
    );
    for (f, col) in schema.fields().iter().zip(first.columns()) {
        let path = ColumnPath::from(f.name().as_str());
        let json = f.metadata().get(FHIR_TYPE_METADATA).map(String::as_str) == Some("json");
        if zstd && !json && !f.data_type().is_nested() && (mostly_null(col) || few_distinct(col)) {
            b = b.set_column_compression(path.clone(), Compression::SNAPPY);
        }
        if f.data_type() != &DataType::Utf8 {
            continue;
        }
        if json {
            if let Some(c) = json_cols.compression {
                b = b.set_column_compression(path.clone(), c);
            }
            if let Some(n) = json_cols.page_bytes {
                b = b.set_column_data_page_size_limit(path.clone(), n);
            }
            b = b
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        } else if mostly_distinct(col).unwrap_or(f.name() == "id") {
            b = b.set_column_dictionary_enabled(path, false);
        }
    }
    b.build()
}

/// Whether more than nine in ten of a first batch's values are null.
fn mostly_null(col: &ArrayRef) -> bool {
    col.logical_null_count() * 10 > col.len() * 9
}

/// At most this many distinct values in a first batch make a column's pages small whatever
/// the codec (see [`props_for`]).
const FEW_DISTINCT: usize = 8;

/// Whether the first (up to 256, at least 64) non-null values among the first 1024 rows of a
/// flat column hold at most [`FEW_DISTINCT`] distinct values.
///
/// Each value is compared with the distinct ones found so far, and the search stops at the
/// first value past [`FEW_DISTINCT`]: most columns stop within a few dozen values. (Converting
/// the 1024 rows to arrow's row format and sorting the sample, as before, cost ~3 million
/// instructions per file: 3.4% of a `convert` of synthea-100, whose 41 files are small.)
fn few_distinct(col: &ArrayRef) -> bool {
    let col = col.slice(0, col.len().min(1024));
    if col.len() - col.null_count() < DISTINCT_SAMPLE.0 {
        return false;
    }
    let Ok(cmp) = make_comparator(&col, &col, SortOptions::default()) else {
        return false;
    };
    // Rows of the distinct values so far; `last`, the one the previous value equalled, is
    // tried first (such columns mostly repeat their value).
    let mut distinct: Vec<usize> = Vec::with_capacity(FEW_DISTINCT);
    let mut last = usize::MAX;
    for i in (0..col.len())
        .filter(|&i| col.is_valid(i))
        .take(DISTINCT_SAMPLE.1)
    {
        if last != usize::MAX && cmp(i, last).is_eq() {
            continue;
        }
        match distinct.iter().find(|&&j| cmp(i, j).is_eq()) {
            Some(&j) => last = j,
            None if distinct.len() == FEW_DISTINCT => return false,
            None => {
                distinct.push(i);
                last = i;
            }
        }
    }
    true
}

/// Values of a first batch [`mostly_distinct`] looks at: at least the first, at most the second.
const DISTINCT_SAMPLE: (usize, usize) = (64, 256);

/// Whether more than half of the first (up to 256) non-null values of a text column are
/// distinct (`None` when there are too few values to tell).
fn mostly_distinct(col: &ArrayRef) -> Option<bool> {
    let mut sample: Vec<&str> = col
        .as_string_opt::<i32>()?
        .iter()
        .flatten()
        .take(DISTINCT_SAMPLE.1)
        .collect();
    let n = sample.len();
    if n < DISTINCT_SAMPLE.0 {
        return None;
    }
    sample.sort_unstable();
    sample.dedup();
    Some(sample.len() * 2 > n)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::{
        array::{Int64Array, StringArray},
        datatypes::{DataType, Field, Schema},
    };
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    /// Row groups of a view written in 8 batches of ~1 MiB of incompressible-ish text (a raw
    /// JSON column when `json`).
    async fn row_groups(budget: Option<usize>, json: bool) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let location = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        let mut b = DatasetWriterBuilder::new(location, "r1", "e1");
        if let Some(n) = budget {
            b = b.with_max_buffered_bytes(n);
        }
        let mut w = b.build();
        let mut field = Field::new("v", DataType::Utf8, true);
        if json {
            field = field.with_metadata(HashMap::from([(
                FHIR_TYPE_METADATA.to_string(),
                "json".to_string(),
            )]));
        }
        let schema = Arc::new(Schema::new(vec![field]));
        let mut seed = 1u64;
        for _ in 0..8 {
            let values: Vec<String> = (0..256)
                .map(|_| {
                    (0..4096)
                        .map(|_| {
                            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                            char::from(b'a' + (seed >> 59) as u8)
                        })
                        .collect()
                })
                .collect();
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(values))])
                    .unwrap();
            w.write_batch("v", &batch).await.unwrap();
        }
        let files = w.finish().await.unwrap();
        assert_eq!(files.len(), 1);
        let file = std::fs::File::open(dir.path().join(&files[0].path)).unwrap();
        SerializedFileReader::new(file)
            .unwrap()
            .metadata()
            .num_row_groups()
    }

    fn col(name: &str) -> ColumnPath {
        ColumnPath::from(name)
    }

    /// The default codec, and writer properties that use it.
    fn zstd_base() -> (Compression, WriterProperties) {
        let zstd = Compression::ZSTD(ZstdLevel::default());
        (
            zstd,
            WriterProperties::builder().set_compression(zstd).build(),
        )
    }

    #[test]
    fn no_dictionary_for_distinct_text_and_json() {
        let json = HashMap::from([(FHIR_TYPE_METADATA.to_string(), "json".to_string())]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("code", DataType::Utf8, true),
            Field::new("parent_id", DataType::Utf8, true),
            Field::new("resource", DataType::Utf8, true).with_metadata(json),
        ]));
        let batch = |rows: usize| {
            let text = |f: &dyn Fn(usize) -> String| -> ArrayRef {
                Arc::new((0..rows).map(|i| Some(f(i))).collect::<StringArray>())
            };
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    text(&|i| format!("id-{i}")),
                    text(&|i| format!("code-{}", i % 7)),
                    text(&|i| format!("parent-{}", i * 2 / 3)),
                    text(&|i| format!("{{\"id\":\"id-{i}\"}}")),
                ],
            )
            .unwrap()
        };
        let base = WriterProperties::builder().build();
        let p = props_for(&base, JsonColumns::default(), &batch(1000));
        assert!(!p.dictionary_enabled(&col("id")));
        assert!(p.dictionary_enabled(&col("code")));
        assert!(!p.dictionary_enabled(&col("parent_id")));
        assert!(!p.dictionary_enabled(&col("resource")));
        assert_eq!(
            p.statistics_enabled(&col("resource")),
            EnabledStatistics::None
        );
        assert_ne!(p.statistics_enabled(&col("id")), EnabledStatistics::None);
        // Too few rows to judge: only `id` goes without.
        let p = props_for(&base, JsonColumns::default(), &batch(3));
        assert!(!p.dictionary_enabled(&col("id")));
        assert!(p.dictionary_enabled(&col("parent_id")));
    }

    #[test]
    fn mostly_null_and_few_valued_columns_are_snappy_under_zstd() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("dense", DataType::Utf8, true),
            Field::new("sparse", DataType::Utf8, true),
            Field::new("empty", DataType::Int64, true),
            Field::new("half", DataType::Int64, true),
            Field::new("status", DataType::Utf8, true),
        ]));
        let rows = 100;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(
                    (0..rows)
                        .map(|i| Some(format!("v{i}")))
                        .collect::<StringArray>(),
                ),
                Arc::new(
                    (0..rows)
                        .map(|i| (i % 20 == 0).then(|| format!("v{i}")))
                        .collect::<StringArray>(),
                ),
                Arc::new(Int64Array::from(vec![None; rows])),
                Arc::new(
                    (0..rows)
                        .map(|i| (i % 2 == 0).then_some(i as i64))
                        .collect::<Int64Array>(),
                ),
                Arc::new(
                    (0..rows)
                        .map(|i| Some(["final", "amended", "preliminary"][i % 3]))
                        .collect::<StringArray>(),
                ),
            ],
        )
        .unwrap();
        let (zstd, base) = zstd_base();
        let p = props_for(&base, JsonColumns::default(), &batch);
        assert_eq!(p.compression(&col("dense")), zstd);
        assert_eq!(p.compression(&col("sparse")), Compression::SNAPPY);
        assert_eq!(p.compression(&col("empty")), Compression::SNAPPY);
        assert_eq!(p.compression(&col("half")), zstd);
        assert_eq!(p.compression(&col("status")), Compression::SNAPPY);
        // Another codec is the user's choice for every column.
        let base = WriterProperties::builder()
            .set_compression(Compression::UNCOMPRESSED)
            .build();
        let p = props_for(&base, JsonColumns::default(), &batch);
        assert_eq!(p.compression(&col("sparse")), Compression::UNCOMPRESSED);
    }

    #[test]
    fn few_distinct_is_at_most_eight_values_in_the_sample() {
        // `k` distinct values, cycled or in runs, with nulls between.
        let col = |k: usize, runs: bool| -> ArrayRef {
            Arc::new(
                (0..400)
                    .map(|i| {
                        let v = if runs { i / 20 % k } else { i % k };
                        (i % 7 != 0).then_some(v as i64)
                    })
                    .collect::<Int64Array>(),
            )
        };
        for runs in [false, true] {
            assert!(few_distinct(&col(1, runs)));
            assert!(few_distinct(&col(8, runs)), "8 values, runs: {runs}");
            assert!(!few_distinct(&col(9, runs)), "9 values, runs: {runs}");
        }
        let text: ArrayRef = Arc::new(
            (0..300)
                .map(|i| Some(["a", "b", "c", "d", "e", "f", "g", "h", "i"][i % 9]))
                .collect::<StringArray>(),
        );
        assert!(!few_distinct(&text));
        let eight: ArrayRef = Arc::new(
            (0..300)
                .map(|i| Some(["a", "b", "c", "d", "e", "f", "g", "h"][i * 7 % 8]))
                .collect::<StringArray>(),
        );
        assert!(few_distinct(&eight));
        // Fewer than 64 values say nothing.
        assert!(!few_distinct(&col(1, false).slice(0, 70)));
    }

    #[test]
    fn json_columns_keep_the_file_codec_and_page_size() {
        let json = HashMap::from([(FHIR_TYPE_METADATA.to_string(), "json".to_string())]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("status", DataType::Utf8, true),
            Field::new("resource", DataType::Utf8, true).with_metadata(json),
        ]));
        let status = StringArray::from_iter_values((0..100).map(|i| ["final", "amended"][i % 2]));
        // Mostly null in the first batch, yet not Snappy.
        let resource: StringArray = (0..100).map(|i| (i == 0).then_some("{}")).collect();
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(status), Arc::new(resource)]).unwrap();
        let (zstd, base) = zstd_base();
        let p = props_for(&base, JsonColumns::default(), &batch);
        assert_eq!(p.compression(&col("resource")), zstd);
        assert_eq!(
            p.column_data_page_size_limit(&col("resource")),
            parquet::file::properties::DEFAULT_PAGE_SIZE
        );
        assert!(!p.dictionary_enabled(&col("resource")));
        assert_eq!(
            p.statistics_enabled(&col("resource")),
            EnabledStatistics::None
        );
        assert_eq!(p.compression(&col("status")), Compression::SNAPPY);
        // The measurement overrides reach the JSON columns only.
        let vars = HashMap::from([
            (JSON_COMPRESSION_ENV, "lz4_raw"),
            (JSON_PAGE_BYTES_ENV, "4194304"),
        ]);
        let over = JsonColumns::from_vars(|n| vars.get(n).map(|v| v.to_string()));
        assert_eq!(
            over,
            JsonColumns {
                compression: Some(Compression::LZ4_RAW),
                page_bytes: Some(4 << 20),
            }
        );
        let p = props_for(&base, over, &batch);
        assert_eq!(p.compression(&col("resource")), Compression::LZ4_RAW);
        assert_eq!(p.column_data_page_size_limit(&col("resource")), 4 << 20);
        assert_eq!(p.compression(&col("status")), Compression::SNAPPY);
        assert_eq!(
            p.column_data_page_size_limit(&col("status")),
            parquet::file::properties::DEFAULT_PAGE_SIZE
        );
        // Values that do not parse (negative zstd levels among them) are ignored.
        let vars = HashMap::from([
            (JSON_COMPRESSION_ENV, "zstd(-1)"),
            (JSON_PAGE_BYTES_ENV, "0"),
        ]);
        let none = JsonColumns::from_vars(|n| vars.get(n).map(|v| v.to_string()));
        assert_eq!(none, JsonColumns::default());
        assert_eq!(JsonColumns::from_vars(|_| None), JsonColumns::default());
    }

    /// The shared budget flushes row groups early; the default one holds all 8 MiB. Raw JSON
    /// pages (written by `json_pages`) count against it as parquet's do.
    #[tokio::test]
    async fn buffered_bytes_bound_row_groups() {
        for json in [false, true] {
            assert_eq!(row_groups(None, json).await, 1);
            assert!(row_groups(Some(1 << 20), json).await >= 4);
        }
    }
}
