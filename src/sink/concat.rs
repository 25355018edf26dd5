//! Parts of one view joined into fewer files by copying their row groups, not re-encoding them.
//!
//! Coalescing exists for servers that cut an export into thousands of tiny files: their parts
//! hold row groups of a few hundred rows, and only decoding and re-encoding them makes row
//! groups a reader is glad to see. A part written from a file of ten thousand resources is
//! another matter: its row groups are already as good as a re-encoding would make them, and
//! re-encoding them decompresses and recompresses every raw `resource` document for nothing
//! (synthea ×10 over an EHR-paced export: 0.33 s of CPU after the last byte arrived, for the last
//! type's four files). Such parts ([`copies_whole`]) are concatenated instead: each column chunk
//! is copied byte for byte into the new file, with its pages, statistics and page index, as
//! parquet's `append_column` allows. The bytes a reader sees in each row group are those the
//! parts held; only the file boundaries change.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use parquet::{
    arrow::parquet_to_arrow_schema,
    bloom_filter::Sbbf,
    column::writer::ColumnCloseResult,
    file::{
        metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader},
        properties::WriterProperties,
        writer::SerializedFileWriter,
    },
};
use tokio::runtime::Handle;

use super::upload::Upload;
use crate::dataset::{DatasetError, DatasetLocation, PARTITION_COLUMN, WrittenFile};

/// A part with at least this many rows (8,192) has row groups worth keeping as they are.
pub const COPY_MIN_ROWS: u64 = 8192;
/// So has a part of at least this many bytes (1 MiB): its row groups are flushed by size.
pub const COPY_MIN_BYTES: u64 = 1 << 20;

/// Whether a part's row groups are big enough to be copied as they are rather than re-encoded:
/// it holds at least [`COPY_MIN_ROWS`] rows or [`COPY_MIN_BYTES`] bytes. A writer closes a row
/// group at its row limit (65,536 by default), when its pages outgrow the memory budget, or at
/// the end of the file, so only the last row group of such a part can be small.
pub fn copies_whole(part: &WrittenFile) -> bool {
    part.rows >= COPY_MIN_ROWS || part.bytes >= COPY_MIN_BYTES
}

/// Concatenate `parts` (files of `view` with one schema, in this order) into new parts
/// `part-<n>-<tag>.parquet` of the view's partition `export=<export>`, each holding at most
/// `max_rows` rows unless one part alone has more (a part is never split). Returns the new
/// parts. Blocking: call it on a blocking thread; `handle` runs the object store's I/O. A part
/// is read whole (coalescing only joins parts below its small-part size).
pub fn concat_parts(
    handle: &Handle,
    location: &DatasetLocation,
    export: &str,
    tag: &str,
    view: &str,
    parts: &[WrittenFile],
    max_rows: u64,
) -> Result<Vec<WrittenFile>, DatasetError> {
    let mut written = Vec::new();
    let mut out: Option<Output> = None;
    for part in parts {
        let store_err = |source| DatasetError::Store {
            path: part.path.clone(),
            source,
        };
        let bytes = handle
            .block_on(async {
                location
                    .store
                    .get(&location.child(&part.path))
                    .await?
                    .bytes()
                    .await
            })
            .map_err(store_err)?;
        let pq = |source| DatasetError::Parquet {
            path: part.path.clone(),
            source,
        };
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .parse_and_finish(&bytes)
            .map_err(pq)?;
        if let Some(o) = out.take_if(|o| o.rows > 0 && o.rows + part.rows > max_rows) {
            written.push(o.finish(view)?);
        }
        let o = match &mut out {
            Some(o) => o,
            None => {
                let path = format!(
                    "{view}/{PARTITION_COLUMN}={export}/part-{:05}-{tag}.parquet",
                    written.len()
                );
                out.insert(Output::new(handle, location, path, &meta)?)
            }
        };
        o.append(&bytes, &meta).map_err(pq)?;
    }
    if let Some(o) = out {
        written.push(o.finish(view)?);
    }
    Ok(written)
}

/// A concatenated file being written.
struct Output {
    path: String,
    writer: SerializedFileWriter<BlockingUpload>,
    rows: u64,
}

impl Output {
    /// A file with the schema and key-value metadata (the Arrow schema) of the part `first`.
    fn new(
        handle: &Handle,
        location: &DatasetLocation,
        path: String,
        first: &ParquetMetaData,
    ) -> Result<Output, DatasetError> {
        let upload = BlockingUpload {
            handle: handle.clone(),
            inner: Upload::new(location, &path),
            buf: Vec::new(),
        };
        let file = first.file_metadata();
        let props = WriterProperties::builder()
            .set_created_by(format!("flatfhir {}", env!("CARGO_PKG_VERSION")))
            .build();
        let pq = |source| DatasetError::Parquet {
            path: path.clone(),
            source,
        };
        let mut writer = SerializedFileWriter::new(
            upload,
            file.schema_descr().root_schema_ptr(),
            Arc::new(props),
        )
        .map_err(pq)?;
        for kv in file.key_value_metadata().into_iter().flatten() {
            writer.append_key_value_metadata(kv.clone());
        }
        Ok(Output {
            path,
            writer,
            rows: 0,
        })
    }

    /// Copy every row group of the part `bytes` (whose footer is `meta`).
    fn append(
        &mut self,
        bytes: &Bytes,
        meta: &ParquetMetaData,
    ) -> Result<(), parquet::errors::ParquetError> {
        let ours = self.writer.schema_descr().root_schema();
        if meta.file_metadata().schema_descr().root_schema() != ours {
            return Err(parquet::errors::ParquetError::General(
                "the parts to concatenate have different schemas".into(),
            ));
        }
        for (i, rg) in meta.row_groups().iter().enumerate() {
            let column_index = meta.column_index().and_then(|c| c.get(i));
            let offset_index = meta.offset_index().and_then(|o| o.get(i));
            let mut out = self.writer.next_row_group()?;
            for (j, column) in rg.columns().iter().enumerate() {
                let close = ColumnCloseResult {
                    bytes_written: column.compressed_size() as u64,
                    rows_written: rg.num_rows() as u64,
                    metadata: column.clone(),
                    bloom_filter: Sbbf::read_from_column_chunk(column, bytes)?,
                    column_index: column_index.and_then(|c| c.get(j)).cloned(),
                    offset_index: offset_index.and_then(|o| o.get(j)).cloned(),
                };
                out.append_column(bytes, close)?;
            }
            out.close()?;
            self.rows += rg.num_rows() as u64;
        }
        Ok(())
    }

    /// Write the footer and complete the upload.
    fn finish(self, view: &str) -> Result<WrittenFile, DatasetError> {
        let Output {
            path,
            mut writer,
            rows,
        } = self;
        let pq = |source| DatasetError::Parquet {
            path: path.clone(),
            source,
        };
        let meta = writer.finish().map_err(pq)?;
        writer
            .inner_mut()
            .complete()
            .map_err(|e| pq(parquet::errors::ParquetError::External(Box::new(e))))?;
        let file = meta.file_metadata();
        let schema =
            parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata()).map_err(pq)?;
        Ok(WrittenFile {
            view: view.to_string(),
            rows,
            bytes: writer.bytes_written() as u64,
            stats: Some(crate::dataset::delta::file_stats(&meta, &schema)),
            path,
        })
    }
}

/// [`std::io::Write`] over an object store upload, for parquet's synchronous file writer on a
/// blocking thread: bytes are gathered into 1 MiB pieces, each handed to the upload on `handle`.
struct BlockingUpload {
    handle: Handle,
    inner: Upload,
    buf: Vec<u8>,
}

/// Bytes [`BlockingUpload`] gathers before handing them to the upload.
const PIECE_BYTES: usize = 1 << 20;

impl BlockingUpload {
    fn push(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.handle
                .block_on(self.inner.write(&self.buf))
                .map_err(std::io::Error::other)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl BlockingUpload {
    /// Hand over what is left and complete the upload.
    fn complete(&mut self) -> std::io::Result<()> {
        self.push()?;
        self.handle
            .block_on(self.inner.finish())
            .map_err(std::io::Error::other)
    }
}

impl Drop for BlockingUpload {
    /// An upload dropped before it was completed (the coalescing failed) is aborted, so that no
    /// unfinished multipart upload of it stays behind in the store (see
    /// [`super::DatasetWriter::abort`]); one completed (or whose completion failed) is closed,
    /// and aborting it does nothing.
    fn drop(&mut self) {
        self.handle.block_on(self.inner.abort());
    }
}

impl Write for BlockingUpload {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= PIECE_BYTES {
            self.push()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push()
    }
}
