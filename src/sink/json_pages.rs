//! [`FileWriter`]: one Parquet file written like parquet's `AsyncArrowWriter`, except that its
//! JSON text columns (the raw `resource` column) are paged and compressed here.
//!
//! Why: the raw column is most of a view's bytes, and parquet 59's column writer copies each of
//! its pages twice for nothing. Its plain encoder regrows the page buffer by doubling from
//! empty for every page (each regrowth a `realloc` that copies what is there); `add_data_page`
//! copies the values behind the definition levels into a fresh buffer; and the zstd codec
//! reserves its output to `compress_bound` in a buffer presized to the page, a `realloc` that
//! copies the buffer's whole capacity. With 1 MiB pages those copies were ~4% of a `convert`
//! run's CPU (perf), more under callgrind (see [`super::writer`]'s `props_for`).
//!
//! Here each JSON column keeps one page buffer per row group, presized to the page limit, with a
//! few bytes free in front: the page's definition levels (one RLE run when no value is null)
//! are written into that gap when the page closes, so the page is compressed in place, into an
//! output buffer shared by all files of a [`super::DatasetWriter`] ([`JsonPages`]) together with
//! one zstd context. Only the compressed page (~1/18 of it) is copied on, into the column
//! chunk. The chunk goes into the row group with `SerializedRowGroupWriter::append_column`
//! between the chunks of the other columns, which parquet's own Arrow column writers encode as
//! `ArrowWriter` does (statistics, dictionaries, codecs from the same [`WriterProperties`]).
//!
//! The file is what `ArrowWriter` writes: the same Parquet schema with the Arrow schema embedded
//! (`ARROW:schema`, field metadata included), and for a JSON column the same column chunk
//! metadata (PLAIN values with RLE levels in v1 data pages, zstd, no dictionary, no statistics,
//! page encoding stats) and an offset index with each page's unencoded bytes. Only where pages
//! end differs a little. parquet checks the page size limit after each mini-batch of values,
//! sized to fit one page, so its pages hold from one to two limits' worth; here a page closes
//! at the end of a batch once it holds the limit, before a value that would take it past twice
//! the limit (its buffer's size), or at the row count limit: pages of the same sizes, and files
//! of the same bytes (synthea-100: 1 MiB pages instead wrote 0.2% more).
//!
//! A column is written here only when parquet would write it this way: a top-level Utf8 field
//! with `fhir.type` = `json`, zstd, no dictionary, no statistics, no bloom filter, PLAIN (or
//! default) encoding, v1 pages. Anything else (another codec from `FLATFHIR_BENCH_JSON_COMPRESSION`,
//! say) goes through parquet's writer. Content-defined chunking and a row group byte limit are
//! not supported (flatfhir sets neither); [`FileWriter::try_new`] refuses them.

use std::mem;

use bytes::Bytes;
use datafusion::arrow::{
    array::{Array, AsArray, StringArray},
    datatypes::{DataType, SchemaRef},
    record_batch::RecordBatch,
};
use parquet::{
    arrow::{
        ArrowWriter,
        arrow_writer::{ArrowColumnWriter, ArrowRowGroupWriterFactory, compute_leaves},
        async_writer::AsyncFileWriter,
    },
    basic::{Compression, Encoding, EncodingMask, PageType},
    column::{
        page::{CompressedPage, Page, PageWriter},
        writer::ColumnCloseResult,
    },
    errors::{ParquetError, Result},
    file::{
        metadata::{ColumnChunkMetaData, OffsetIndexBuilder, PageEncodingStats, ParquetMetaData},
        properties::{EnabledStatistics, WriterProperties, WriterVersion},
        writer::{SerializedFileWriter, SerializedPageWriter, TrackedWrite},
    },
    schema::types::{ColumnDescPtr, ColumnPath},
};

use super::upload::Upload;
use crate::view::compile::FHIR_TYPE_METADATA;

/// Bytes kept free in front of a page's values for its definition levels: the 4-byte length of
/// a v1 page's levels plus one RLE run (a varint of at most 5 bytes and the level's byte).
const LEVELS_GAP: usize = 16;

/// What the JSON columns of a [`super::DatasetWriter`]'s files share: one zstd context and the
/// buffer each page is compressed into (one file writes at a time).
#[derive(Default)]
pub(super) struct JsonPages {
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
    out: Vec<u8>,
}

impl JsonPages {
    /// `input` compressed as one zstd frame at `level`, as parquet's zstd codec would.
    fn compress(&mut self, level: i32, input: &[u8]) -> Result<&[u8]> {
        if !matches!(&self.zstd, Some((l, _)) if *l == level) {
            self.zstd = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, zstd) = self.zstd.as_mut().expect("set above");
        let bound = zstd::zstd_safe::compress_bound(input.len());
        // A page far bigger than usual (one huge resource) does not keep its buffer.
        if self.out.capacity() > 4 * bound.max(1 << 20) {
            self.out = Vec::new();
        }
        self.out.clear();
        self.out.reserve(bound);
        zstd.compress_to_buffer(input, &mut self.out)?;
        Ok(&self.out)
    }
}

/// The settings a JSON column is written with here, when parquet would write it that way.
#[derive(Debug, Clone, Copy)]
struct JsonSpec {
    codec: Compression,
    level: i32,
    page_bytes: usize,
    page_rows: usize,
}

impl JsonSpec {
    fn for_field(
        props: &WriterProperties,
        field: &datafusion::arrow::datatypes::Field,
    ) -> Option<Self> {
        let json = field.metadata().get(FHIR_TYPE_METADATA).map(String::as_str) == Some("json");
        if !json || field.data_type() != &DataType::Utf8 {
            return None;
        }
        let path = ColumnPath::from(field.name().as_str());
        let codec = props.compression(&path);
        let Compression::ZSTD(level) = codec else {
            return None;
        };
        let plain = matches!(props.encoding(&path), None | Some(Encoding::PLAIN));
        let written_here = plain
            && !props.dictionary_enabled(&path)
            && props.statistics_enabled(&path) == EnabledStatistics::None
            && props.bloom_filter_properties(&path).is_none()
            && props.writer_version() == WriterVersion::PARQUET_1_0;
        written_here.then(|| JsonSpec {
            codec,
            level: level.compression_level(),
            page_bytes: props.column_data_page_size_limit(&path).max(1),
            page_rows: props.data_page_row_count_limit().max(1),
        })
    }
}

/// One row group's chunk of a JSON column: PLAIN values, RLE definition levels, v1 data pages.
struct JsonColumn {
    descr: ColumnDescPtr,
    spec: JsonSpec,
    /// The page in progress: [`LEVELS_GAP`] bytes, then the values (a u32 length and the bytes
    /// of each). Empty until the first value.
    page: Vec<u8>,
    /// Runs of the page's definition levels: (defined, count).
    runs: Vec<(bool, u32)>,
    page_rows: usize,
    page_value_bytes: i64,
    /// The chunk's pages so far (header and compressed data of each).
    chunk: TrackedWrite<Vec<u8>>,
    offsets: OffsetIndexBuilder,
    pages: i32,
    num_values: i64,
    uncompressed: i64,
    compressed: i64,
}

impl JsonColumn {
    fn new(descr: ColumnDescPtr, spec: JsonSpec) -> Self {
        JsonColumn {
            descr,
            spec,
            page: Vec::new(),
            runs: Vec::new(),
            page_rows: 0,
            page_value_bytes: 0,
            chunk: TrackedWrite::new(Vec::new()),
            offsets: OffsetIndexBuilder::new(),
            pages: 0,
            num_values: 0,
            uncompressed: 0,
            compressed: 0,
        }
    }

    fn level(&mut self, defined: bool) {
        match self.runs.last_mut() {
            Some((d, n)) if *d == defined && *n < u32::MAX >> 1 => *n += 1,
            _ => self.runs.push((defined, 1)),
        }
    }

    fn write(&mut self, values: &StringArray, shared: &mut JsonPages) -> Result<()> {
        let nullable = self.descr.max_def_level() > 0;
        if !nullable && values.null_count() > 0 {
            return Err(ParquetError::General(format!(
                "nulls in the non-nullable column {}",
                self.descr.path()
            )));
        }
        for i in 0..values.len() {
            if values.is_valid(i) {
                let v = values.value(i).as_bytes();
                let len = u32::try_from(v.len())
                    .map_err(|_| ParquetError::General("value over 4 GiB".into()))?;
                let room = LEVELS_GAP + 2 * self.spec.page_bytes;
                if self.page_rows > 0 && self.page.len() + 4 + v.len() > room {
                    self.add_page(shared)?;
                }
                if self.page.is_empty() {
                    // Presized once per row group (the buffer is reused from page to page).
                    self.page.reserve(room.max(LEVELS_GAP + 4 + v.len()));
                    self.page.resize(LEVELS_GAP, 0);
                }
                self.page.extend_from_slice(&len.to_le_bytes());
                self.page.extend_from_slice(v);
                self.page_value_bytes += v.len() as i64;
            }
            if nullable {
                self.level(values.is_valid(i));
            }
            self.page_rows += 1;
            if self.page_rows >= self.spec.page_rows {
                self.add_page(shared)?;
            }
        }
        if self.page.len().saturating_sub(LEVELS_GAP) >= self.spec.page_bytes {
            self.add_page(shared)?;
        }
        Ok(())
    }

    /// Compress the page in progress and add it to the chunk.
    fn add_page(&mut self, shared: &mut JsonPages) -> Result<()> {
        if self.page.is_empty() {
            // Only nulls so far.
            self.page.resize(LEVELS_GAP, 0);
        }
        let mut levels = Vec::new();
        if self.descr.max_def_level() > 0 {
            // The RLE/bit-packed hybrid, in RLE runs only (bit width 1: one byte a value),
            // behind its length as v1 data pages have it.
            let mut rle = Vec::with_capacity(6 * self.runs.len());
            for &(defined, n) in &self.runs {
                let mut header = u64::from(n) << 1;
                while header >= 0x80 {
                    rle.push(header as u8 | 0x80);
                    header >>= 7;
                }
                rle.push(header as u8);
                rle.push(u8::from(defined));
            }
            levels.extend_from_slice(&(rle.len() as u32).to_le_bytes());
            levels.extend_from_slice(&rle);
        }
        let compressed = if levels.len() <= LEVELS_GAP {
            let start = LEVELS_GAP - levels.len();
            self.page[start..LEVELS_GAP].copy_from_slice(&levels);
            let input = &self.page[start..];
            (input.len(), shared.compress(self.spec.level, input)?)
        } else {
            // Many runs (nulls here and there): the page is copied behind them.
            levels.extend_from_slice(&self.page[LEVELS_GAP..]);
            (levels.len(), shared.compress(self.spec.level, &levels)?)
        };
        let (uncompressed, compressed) = compressed;
        let page = CompressedPage::new(
            Page::DataPage {
                buf: Bytes::copy_from_slice(compressed),
                num_values: self.page_rows as u32,
                encoding: Encoding::PLAIN,
                def_level_encoding: Encoding::RLE,
                rep_level_encoding: Encoding::RLE,
                statistics: None,
            },
            uncompressed,
        );
        let spec = SerializedPageWriter::new(&mut self.chunk).write_page(page)?;
        self.offsets.append_row_count(self.page_rows as i64);
        self.offsets
            .append_unencoded_byte_array_data_bytes(Some(self.page_value_bytes));
        self.offsets
            .append_offset_and_size(spec.offset as i64, spec.compressed_size as i32);
        self.pages += 1;
        self.num_values += i64::from(spec.num_values);
        self.uncompressed += spec.uncompressed_size as i64;
        self.compressed += spec.compressed_size as i64;
        self.page.truncate(LEVELS_GAP);
        self.runs.clear();
        self.page_rows = 0;
        self.page_value_bytes = 0;
        Ok(())
    }

    /// The chunk's bytes and what parquet's column writer would report on closing it.
    fn close(mut self, shared: &mut JsonPages) -> Result<(Bytes, ColumnCloseResult)> {
        if self.page_rows > 0 {
            self.add_page(shared)?;
        }
        // Every value is a row of a top-level column.
        let rows = self.num_values as u64;
        let metadata = ColumnChunkMetaData::builder(self.descr.clone())
            .set_compression(self.spec.codec)
            .set_encodings_mask(EncodingMask::new_from_encodings(
                [Encoding::PLAIN, Encoding::RLE].iter(),
            ))
            .set_page_encoding_stats(vec![PageEncodingStats {
                page_type: PageType::DATA_PAGE,
                encoding: Encoding::PLAIN,
                count: self.pages,
            }])
            .set_total_compressed_size(self.compressed)
            .set_total_uncompressed_size(self.uncompressed)
            .set_num_values(self.num_values)
            .set_data_page_offset(0)
            .build()?;
        let bytes = Bytes::from(self.chunk.into_inner()?);
        let close = ColumnCloseResult {
            bytes_written: bytes.len() as u64,
            rows_written: rows,
            metadata,
            bloom_filter: None,
            column_index: None,
            offset_index: Some(self.offsets.build()),
        };
        Ok((bytes, close))
    }

    /// Bytes held: the page's values and the chunk so far (as parquet counts its encoder's).
    fn memory_size(&self) -> usize {
        self.page.len() + self.chunk.bytes_written()
    }

    /// Encoded bytes so far, the page in progress counted uncompressed (as parquet does).
    fn estimated_total_bytes(&self) -> usize {
        self.page.len().saturating_sub(LEVELS_GAP) + self.chunk.bytes_written()
    }
}

/// The writer(s) of one Arrow field in a row group.
enum FieldWriter {
    /// parquet's, one per leaf.
    Arrow(Vec<ArrowColumnWriter>),
    Json(Box<JsonColumn>),
}

struct RowGroup {
    fields: Vec<FieldWriter>,
    rows: usize,
}

impl RowGroup {
    fn memory_size(&self) -> usize {
        self.fields
            .iter()
            .map(|f| match f {
                FieldWriter::Arrow(w) => w.iter().map(ArrowColumnWriter::memory_size).sum(),
                FieldWriter::Json(c) => c.memory_size(),
            })
            .sum()
    }

    fn estimated_total_bytes(&self) -> usize {
        self.fields
            .iter()
            .map(|f| match f {
                FieldWriter::Arrow(w) => w
                    .iter()
                    .map(ArrowColumnWriter::get_estimated_total_bytes)
                    .sum(),
                FieldWriter::Json(c) => c.estimated_total_bytes(),
            })
            .sum()
    }
}

/// One Parquet file, streamed to an [`Upload`] a row group at a time, as `AsyncArrowWriter`
/// does (same methods); its JSON columns are paged here (see the module docs).
pub(super) struct FileWriter {
    file: SerializedFileWriter<Vec<u8>>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// Per field of `schema`: how it is written here, when it is.
    json: Vec<Option<JsonSpec>>,
    /// Per field: its leaves' indices among the file's columns.
    leaves: Vec<Vec<usize>>,
    max_rows: usize,
    in_progress: Option<RowGroup>,
    upload: Upload,
}

impl FileWriter {
    /// A file of `schema` written with `props` (as `AsyncArrowWriter::try_new`).
    pub(super) fn try_new(
        upload: Upload,
        schema: SchemaRef,
        props: WriterProperties,
    ) -> Result<Self> {
        if props.content_defined_chunking().is_some() || props.max_row_group_bytes().is_some() {
            return Err(ParquetError::NYI(
                "content-defined chunking or a row group byte limit".into(),
            ));
        }
        let json: Vec<_> = schema
            .fields()
            .iter()
            .map(|f| JsonSpec::for_field(&props, f))
            .collect();
        let max_rows = props.max_row_group_row_count().unwrap_or(usize::MAX).max(1);
        // ArrowWriter builds the Parquet schema and embeds the Arrow one, as for every file.
        let (file, factory) = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?
            .into_serialized_writer()?;
        let descr = file.schema_descr();
        let mut leaves = vec![Vec::new(); schema.fields().len()];
        for leaf in 0..descr.num_columns() {
            leaves[descr.get_column_root_idx(leaf)].push(leaf);
        }
        Ok(FileWriter {
            file,
            factory,
            schema,
            json,
            leaves,
            max_rows,
            in_progress: None,
            upload,
        })
    }

    fn row_group(&self) -> Result<RowGroup> {
        let index = self.file.flushed_row_groups().len();
        let mut writers = self.factory.create_column_writers(index)?.into_iter();
        let mut fields = Vec::with_capacity(self.leaves.len());
        for (leaves, json) in self.leaves.iter().zip(&self.json) {
            let mine: Vec<_> = writers.by_ref().take(leaves.len()).collect();
            fields.push(match json {
                Some(spec) => FieldWriter::Json(Box::new(JsonColumn::new(
                    self.file.schema_descr().column(leaves[0]),
                    *spec,
                ))),
                None => FieldWriter::Arrow(mine),
            });
        }
        Ok(RowGroup { fields, rows: 0 })
    }

    /// Encode `batch`, uploading the row groups it completes.
    pub(super) async fn write(
        &mut self,
        batch: &RecordBatch,
        shared: &mut JsonPages,
    ) -> Result<()> {
        let before = self.file.flushed_row_groups().len();
        self.write_sync(batch, shared)?;
        if before != self.file.flushed_row_groups().len() {
            self.upload_buffer().await?;
        }
        Ok(())
    }

    fn write_sync(&mut self, batch: &RecordBatch, shared: &mut JsonPages) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if batch.num_columns() != self.schema.fields().len() {
            return Err(ParquetError::ArrowError(
                "record batch columns do not match the file's schema".into(),
            ));
        }
        if self.in_progress.is_none() {
            self.in_progress = Some(self.row_group()?);
        }
        let rg = self.in_progress.as_mut().expect("set above");
        if rg.rows + batch.num_rows() > self.max_rows {
            let first = self.max_rows - rg.rows;
            self.write_sync(&batch.slice(0, first), shared)?;
            return self.write_sync(&batch.slice(first, batch.num_rows() - first), shared);
        }
        for ((writer, field), column) in rg
            .fields
            .iter_mut()
            .zip(self.schema.fields())
            .zip(batch.columns())
        {
            match writer {
                FieldWriter::Arrow(writers) => {
                    for (w, leaf) in writers.iter_mut().zip(compute_leaves(field, column)?) {
                        w.write(&leaf)?;
                    }
                }
                FieldWriter::Json(c) => {
                    let values = column.as_string_opt::<i32>().ok_or_else(|| {
                        ParquetError::ArrowError(format!("{} is not Utf8", field.name()))
                    })?;
                    c.write(values, shared)?
                }
            }
        }
        rg.rows += batch.num_rows();
        if rg.rows >= self.max_rows {
            self.flush_sync(shared)?;
        }
        Ok(())
    }

    /// Close the row group in progress into the file's buffer.
    fn flush_sync(&mut self, shared: &mut JsonPages) -> Result<()> {
        let Some(rg) = self.in_progress.take() else {
            return Ok(());
        };
        let mut out = self.file.next_row_group()?;
        for field in rg.fields {
            match field {
                FieldWriter::Arrow(writers) => {
                    for w in writers {
                        w.close()?.append_to_row_group(&mut out)?;
                    }
                }
                FieldWriter::Json(c) => {
                    let (bytes, close) = c.close(shared)?;
                    out.append_column(&bytes, close)?;
                }
            }
        }
        out.close()?;
        Ok(())
    }

    async fn upload_buffer(&mut self) -> Result<()> {
        let buffer = mem::take(self.file.inner_mut());
        AsyncFileWriter::write(&mut self.upload, Bytes::from(buffer)).await
    }

    /// Close the row group in progress and upload it.
    pub(super) async fn flush(&mut self, shared: &mut JsonPages) -> Result<()> {
        self.flush_sync(shared)?;
        self.upload_buffer().await
    }

    /// Write the last row group and the footer, and complete the upload.
    pub(super) async fn finish(&mut self, shared: &mut JsonPages) -> Result<ParquetMetaData> {
        self.flush_sync(shared)?;
        let metadata = self.file.finish()?;
        self.upload_buffer().await?;
        AsyncFileWriter::complete(&mut self.upload).await?;
        Ok(metadata)
    }

    /// The upload (to abort it).
    pub(super) fn into_inner(self) -> Upload {
        self.upload
    }

    /// Bytes buffered by the row group in progress.
    pub(super) fn memory_size(&self) -> usize {
        self.in_progress.as_ref().map_or(0, RowGroup::memory_size)
    }

    /// Anticipated encoded size of the row group in progress.
    pub(super) fn in_progress_size(&self) -> usize {
        self.in_progress
            .as_ref()
            .map_or(0, RowGroup::estimated_total_bytes)
    }

    /// Rows of the row group in progress.
    pub(super) fn in_progress_rows(&self) -> usize {
        self.in_progress.as_ref().map_or(0, |rg| rg.rows)
    }

    /// Bytes written to the file so far.
    pub(super) fn bytes_written(&self) -> usize {
        self.file.bytes_written()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use datafusion::arrow::{
        array::{ArrayRef, Int64Array},
        datatypes::{Field, Schema},
    };
    use parquet::{
        arrow::arrow_reader::ParquetRecordBatchReaderBuilder,
        basic::ZstdLevel,
        file::{
            page_index::offset_index::OffsetIndexMetaData,
            reader::{FileReader, SerializedFileReader},
            serialized_reader::ReadOptionsBuilder,
        },
    };

    use super::*;
    use crate::dataset::DatasetLocation;

    /// A view's batches: `id`, a number, and a raw `resource` of ~0.3–3 KB of JSON-ish text
    /// (every `null_every`-th one null, when set).
    fn batches(rows: usize, null_every: Option<usize>) -> Vec<RecordBatch> {
        let json = HashMap::from([(FHIR_TYPE_METADATA.to_string(), "json".to_string())]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("resource", DataType::Utf8, true).with_metadata(json),
        ]));
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let all: Vec<Option<String>> = (0..rows)
            .map(|i| {
                if null_every.is_some_and(|k| i % k == 3) {
                    return None;
                }
                let fields = 10 + next() % 100;
                let body: Vec<String> = (0..fields)
                    .map(|f| {
                        format!(
                            "\"k{f}\":\"{:x}{}\"",
                            next(),
                            "abc".repeat(next() as usize % 5)
                        )
                    })
                    .collect();
                Some(format!("{{\"id\":\"r{i}\",{}}}", body.join(",")))
            })
            .collect();
        all.chunks(1000)
            .enumerate()
            .map(|(c, chunk)| {
                let ids = (0..chunk.len()).map(|i| Some(format!("r{}", c * 1000 + i)));
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(ids.collect::<StringArray>()),
                    Arc::new(Int64Array::from_iter_values(0..chunk.len() as i64)),
                    Arc::new(chunk.iter().cloned().collect::<StringArray>()),
                ];
                RecordBatch::try_new(schema.clone(), columns).unwrap()
            })
            .collect()
    }

    /// The properties `props_for` gives a view with a raw column (zstd, row groups of `rg_rows`).
    fn props(rg_rows: usize) -> WriterProperties {
        let path = ColumnPath::from("resource");
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(rg_rows))
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_statistics_enabled(path, EnabledStatistics::None)
            .build()
    }

    fn arrow_writer(batches: &[RecordBatch], props: WriterProperties) -> Bytes {
        let mut w = ArrowWriter::try_new(Vec::new(), batches[0].schema(), Some(props)).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        Bytes::from(w.into_inner().unwrap())
    }

    async fn file_writer(batches: &[RecordBatch], props: WriterProperties) -> Bytes {
        let dir = tempfile::tempdir().unwrap();
        let location = DatasetLocation::resolve(dir.path().to_str().unwrap(), true).unwrap();
        let upload = Upload::new(&location, "f.parquet");
        let mut w = FileWriter::try_new(upload, batches[0].schema(), props).unwrap();
        assert!(w.json[2].is_some() && w.json[0].is_none());
        let mut shared = JsonPages::default();
        for b in batches {
            w.write(b, &mut shared).await.unwrap();
        }
        w.finish(&mut shared).await.unwrap();
        Bytes::from(std::fs::read(dir.path().join("f.parquet")).unwrap())
    }

    fn read(file: &Bytes) -> Vec<RecordBatch> {
        ParquetRecordBatchReaderBuilder::try_new(file.clone())
            .unwrap()
            .build()
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap()
    }

    /// Per row group of column `col`: each page's (num_values, encoding, def level encoding,
    /// uncompressed bytes), the offset index, and the chunk metadata.
    #[allow(clippy::type_complexity)]
    fn pages(
        file: &Bytes,
        col: usize,
    ) -> Vec<(
        Vec<(u32, Encoding, Encoding, usize)>,
        OffsetIndexMetaData,
        ColumnChunkMetaData,
    )> {
        let options = ReadOptionsBuilder::new().with_page_index().build();
        let reader = SerializedFileReader::new_with_options(file.clone(), options).unwrap();
        let offsets = reader.metadata().offset_index().unwrap().clone();
        (0..reader.num_row_groups())
            .map(|rg| {
                let mut pages = Vec::new();
                let mut pr = reader
                    .get_row_group(rg)
                    .unwrap()
                    .get_column_page_reader(col)
                    .unwrap();
                while let Some(page) = pr.get_next_page().unwrap() {
                    if matches!(page, Page::DictionaryPage { .. }) {
                        continue;
                    }
                    let Page::DataPage {
                        buf,
                        num_values,
                        encoding,
                        def_level_encoding,
                        statistics,
                        ..
                    } = page
                    else {
                        panic!("not a v1 data page");
                    };
                    assert!(col != 2 || statistics.is_none());
                    pages.push((num_values, encoding, def_level_encoding, buf.len()));
                }
                let meta = reader.metadata().row_group(rg).column(col).clone();
                (pages, offsets[rg][col].clone(), meta)
            })
            .collect()
    }

    /// Written here, a raw column reads back as parquet's `ArrowWriter` writes it: same
    /// values and schema (field metadata included), same chunk metadata but for sizes and
    /// offsets, v1 PLAIN pages of about the page limit with an offset index.
    async fn same_as_arrow_writer(rows: usize, null_every: Option<usize>) {
        let batches = batches(rows, null_every);
        let theirs_file = arrow_writer(&batches, props(2500));
        let ours_file = file_writer(&batches, props(2500)).await;
        let (a, b) = (read(&theirs_file), read(&ours_file));
        assert_eq!(a, b);
        assert_eq!(a[0].schema(), batches[0].schema());
        assert_eq!(
            a.iter().map(RecordBatch::num_rows).sum::<usize>(),
            rows,
            "all rows read back"
        );
        let (theirs, ours) = (pages(&theirs_file, 2), pages(&ours_file, 2));
        assert_eq!(theirs.len(), ours.len(), "row groups");
        for ((tp, to, tm), (op, oo, om)) in theirs.iter().zip(&ours) {
            // Page limits cut a little differently, but not by much.
            assert!(
                op.len().abs_diff(tp.len()) <= 1 + tp.len() / 8,
                "{tp:?} {op:?}"
            );
            for &(n, enc, def, bytes) in op {
                assert!(n > 0);
                assert_eq!((enc, def), (Encoding::PLAIN, Encoding::RLE));
                assert!(bytes > 0);
            }
            let total = |p: &[(u32, Encoding, Encoding, usize)]| p.iter().map(|p| p.0).sum::<u32>();
            assert_eq!(total(tp), total(op));
            assert_eq!(oo.page_locations.len(), op.len());
            assert_eq!(
                oo.page_locations[0].offset,
                om.data_page_offset(),
                "offset index points into the file"
            );
            let firsts: Vec<i64> = op
                .iter()
                .scan(0i64, |row, p| {
                    let first = *row;
                    *row += i64::from(p.0);
                    Some(first)
                })
                .collect();
            assert_eq!(
                oo.page_locations
                    .iter()
                    .map(|l| l.first_row_index)
                    .collect::<Vec<_>>(),
                firsts
            );
            let unencoded = |o: &OffsetIndexMetaData| -> i64 {
                o.unencoded_byte_array_data_bytes
                    .as_ref()
                    .unwrap()
                    .iter()
                    .sum()
            };
            assert_eq!(unencoded(to), unencoded(oo));
            assert_eq!(
                oo.unencoded_byte_array_data_bytes.as_ref().unwrap().len(),
                op.len()
            );
            assert_eq!(tm.compression(), om.compression());
            assert_eq!(tm.encodings_mask(), om.encodings_mask());
            assert_eq!(tm.num_values(), om.num_values());
            assert_eq!(tm.statistics(), om.statistics());
            assert_eq!(tm.dictionary_page_offset(), om.dictionary_page_offset());
            assert_eq!(
                tm.page_encoding_stats().map(|s| s
                    .iter()
                    .map(|s| (s.page_type, s.encoding))
                    .collect::<Vec<_>>()),
                om.page_encoding_stats().map(|s| s
                    .iter()
                    .map(|s| (s.page_type, s.encoding))
                    .collect::<Vec<_>>()),
            );
            assert_eq!(
                tm.unencoded_byte_array_data_bytes(),
                om.unencoded_byte_array_data_bytes()
            );
            assert!(
                tm.definition_level_histogram().is_none()
                    && om.definition_level_histogram().is_none()
            );
            // zstd level 1 on the same kind of pages: within a few percent.
            let (t, o) = (tm.compressed_size() as f64, om.compressed_size() as f64);
            assert!((o / t - 1.0).abs() < 0.05, "{t} {o}");
            eprintln!(
                "pages {} vs {}; compressed {t} vs {o}; uncompressed {} vs {}",
                tp.len(),
                op.len(),
                tm.uncompressed_size(),
                om.uncompressed_size()
            );
        }
        // The other columns are parquet's own.
        for col in 0..2 {
            let (theirs, ours) = (pages(&theirs_file, col), pages(&ours_file, col));
            for ((tp, _, tm), (op, _, om)) in theirs.iter().zip(&ours) {
                assert_eq!(tp, op);
                assert_eq!(tm.compressed_size(), om.compressed_size());
                assert_eq!(tm.statistics(), om.statistics());
            }
        }
    }

    #[tokio::test]
    async fn json_column_reads_back_as_arrow_writer_writes_it() {
        same_as_arrow_writer(6000, None).await;
    }

    #[tokio::test]
    async fn json_column_with_nulls() {
        same_as_arrow_writer(6000, Some(5)).await;
        same_as_arrow_writer(3000, Some(1)).await;
    }
}
