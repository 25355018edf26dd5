//! Wires the stages for `convert`: input files → decode workers (CPU, on their own threads) →
//! a bounded channel → the dataset writer (async) → the run manifest, published last.
//!
//! ```text
//!  files ─► [worker thread × N: read (+gunzip) → Decoder] ─► mpsc(bounded) ─► DatasetWriter ─► manifest
//! ```
//!
//! Memory is bounded by construction: each worker holds one chunk and its decoder's builders
//! (at most one batch per view), the channel holds a few batches, and the writer flushes row
//! groups by size.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;

use crate::{
    Error, Result,
    flatten::{DecodeStats, DecoderBuilder, FlattenError, Reject, ViewBatch},
    sink::{
        DatasetLocation, DatasetWriterBuilder, REJECTS_TABLE, RunManifest, manifest::InputRecord,
        rejects_batch,
    },
    view::ViewRegistry,
};

/// Bytes read from an input per decode call.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Rejects buffered before they are written as one `_rejects` batch.
const REJECTS_PER_BATCH: usize = 4096;

/// Options of a `convert` run.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Rows per batch (default [`crate::flatten::DEFAULT_BATCH_SIZE`]).
    pub batch_size: usize,
    /// Decode threads (default: available cores).
    pub threads: usize,
    /// Parquet compression.
    pub compression: parquet::basic::Compression,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// Rows per file.
    pub max_rows_per_file: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            batch_size: crate::flatten::DEFAULT_BATCH_SIZE,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            compression: parquet::basic::Compression::ZSTD(Default::default()),
            row_group_rows: crate::sink::DEFAULT_ROW_GROUP_ROWS,
            max_rows_per_file: crate::sink::DEFAULT_MAX_ROWS_PER_FILE,
        }
    }
}

/// Live counters, for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input bytes read (compressed size for gzip files).
    pub bytes: AtomicU64,
    /// Lines decoded.
    pub lines: AtomicU64,
    /// Files finished.
    pub files: AtomicU64,
    /// Lines rejected.
    pub rejects: AtomicU64,
}

/// Expand inputs: files as given, directories searched recursively for `*.ndjson`,
/// `*.ndjson.gz`, `*.jsonl`, `*.jsonl.gz`. Sorted, deduplicated.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_lowercase())
                    .unwrap_or_default();
                if [".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz"]
                    .iter()
                    .any(|s| name.ends_with(s))
                {
                    out.push(p);
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for i in inputs {
        let read_err = |source| {
            Error::Flatten(FlattenError::Read {
                file: i.display().to_string(),
                source,
            })
        };
        let meta = std::fs::metadata(i).map_err(read_err)?;
        if meta.is_dir() {
            walk(i, &mut out).map_err(read_err)?;
        } else {
            out.push(i.clone());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Identifiers of a new run: `(run_id, export stamp, started RFC 3339)`.
pub fn new_run_ids() -> (String, String, String) {
    let now = chrono::Utc::now();
    let export = now.format("%Y%m%dT%H%M%SZ").to_string();
    let run_id = format!("{export}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    (
        run_id,
        export,
        now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

enum Msg {
    Batches(Vec<ViewBatch>),
    Rejects(Vec<Reject>),
    Done(InputRecord, Box<DecodeStats>),
    Failed(FlattenError),
}

/// Convert ndjson files into a dataset; returns the published run manifest.
pub async fn convert(
    files: Vec<PathBuf>,
    registry: Arc<ViewRegistry>,
    location: DatasetLocation,
    opts: ConvertOptions,
    progress: Arc<Progress>,
) -> Result<RunManifest> {
    let (run_id, export, started) = new_run_ids();
    let threads = opts.threads.max(1).min(files.len().max(1));
    // Largest files first, so one big file does not start last.
    let mut queue: Vec<PathBuf> = files;
    queue.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    queue.reverse(); // popped from the end
    let queue = Arc::new(Mutex::new(queue));
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<Msg>(threads * 4);
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (queue, cancel, tx, registry, progress) = (
            queue.clone(),
            cancel.clone(),
            tx.clone(),
            registry.clone(),
            progress.clone(),
        );
        let batch_size = opts.batch_size;
        handles.push(std::thread::spawn(move || {
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some(file) = next else { return };
                let msg = match decode_file(&file, &registry, batch_size, &tx, &progress) {
                    Ok((input, stats)) => Msg::Done(input, Box::new(stats)),
                    Err(e) => Msg::Failed(e),
                };
                if tx.blocking_send(msg).is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);

    let mut writer = DatasetWriterBuilder::new(location.clone(), &run_id, &export)
        .with_compression(opts.compression)
        .with_row_group_rows(opts.row_group_rows)
        .with_max_rows_per_file(opts.max_rows_per_file)
        .build();
    let mut stats = DecodeStats::default();
    let mut inputs = Vec::new();
    let mut pending_rejects: Vec<Reject> = Vec::new();
    let mut failure: Option<Error> = None;
    while let Some(msg) = rx.recv().await {
        let r: Result<()> = async {
            match msg {
                Msg::Batches(bs) => {
                    for b in &bs {
                        writer.write(b).await?;
                    }
                }
                Msg::Rejects(rs) => {
                    progress
                        .rejects
                        .fetch_add(rs.len() as u64, Ordering::Relaxed);
                    pending_rejects.extend(rs);
                    if pending_rejects.len() >= REJECTS_PER_BATCH {
                        writer
                            .write_batch(REJECTS_TABLE, &rejects_batch(&pending_rejects))
                            .await?;
                        pending_rejects.clear();
                    }
                }
                Msg::Done(input, s) => {
                    stats.merge(&s);
                    inputs.push(input);
                }
                Msg::Failed(e) => return Err(e.into()),
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            cancel.store(true, Ordering::Relaxed);
            failure = Some(e);
            break;
        }
    }
    drop(rx); // unblocks workers waiting to send
    for h in handles {
        if h.join().is_err() {
            failure.get_or_insert(Error::Internal("a decode thread panicked".into()));
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if !pending_rejects.is_empty() {
        writer
            .write_batch(REJECTS_TABLE, &rejects_batch(&pending_rejects))
            .await?;
    }
    let files = writer.finish().await?;
    inputs.sort_by(|a, b| a.source.cmp(&b.source));
    let manifest = RunManifest {
        run_id,
        export,
        started,
        finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        kind: "convert".into(),
        flatfhir_version: env!("CARGO_PKG_VERSION").into(),
        inputs,
        rejects: stats.rejects(),
        types: stats.types,
        views: stats.view_rows,
        blank_lines: stats.blank_lines,
        files,
        ..Default::default()
    };
    manifest.publish(&location).await?;
    Ok(manifest)
}

/// Counts bytes read through it (the compressed size for gzip input).
struct Counting<'p, R> {
    inner: R,
    progress: &'p Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Open a file, transparently gunzipping it when it starts with the gzip magic bytes.
pub fn open_input<'p>(
    path: &Path,
    progress: &'p Progress,
) -> std::io::Result<Box<dyn Read + Send + 'p>> {
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))?;
    let counted = Counting {
        inner: std::io::BufReader::with_capacity(1 << 16, f),
        progress,
    };
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(counted))
    } else {
        Box::new(counted)
    })
}

fn decode_file(
    path: &Path,
    registry: &Arc<ViewRegistry>,
    batch_size: usize,
    tx: &mpsc::Sender<Msg>,
    progress: &Progress,
) -> Result<(InputRecord, DecodeStats), FlattenError> {
    let name = path.display().to_string();
    let read_err = |source| FlattenError::Read {
        file: name.clone(),
        source,
    };
    let mut input = open_input(path, progress).map_err(read_err)?;
    let mut decoder = DecoderBuilder::new(registry.clone(), name.clone())
        .with_batch_size(batch_size)
        .build();
    let mut buf = vec![0u8; DEFAULT_CHUNK_BYTES];
    let mut lines_before = 0;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        decoder.decode(&buf[..n])?;
        let lines = decoder.stats().lines;
        progress
            .lines
            .fetch_add(lines - lines_before, Ordering::Relaxed);
        lines_before = lines;
        let batches = decoder.take_batches();
        let rejects = decoder.take_rejects();
        let sent = (batches.is_empty() || tx.blocking_send(Msg::Batches(batches)).is_ok())
            && (rejects.is_empty() || tx.blocking_send(Msg::Rejects(rejects)).is_ok());
        if !sent {
            break; // the writer stopped; its error is reported there
        }
    }
    let batches = decoder.finish()?;
    let rejects = decoder.take_rejects();
    progress
        .lines
        .fetch_add(decoder.stats().lines - lines_before, Ordering::Relaxed);
    progress.files.fetch_add(1, Ordering::Relaxed);
    if !batches.is_empty() {
        let _ = tx.blocking_send(Msg::Batches(batches));
    }
    if !rejects.is_empty() {
        let _ = tx.blocking_send(Msg::Rejects(rejects));
    }
    let stats = decoder.stats().clone();
    let input = InputRecord {
        source: name,
        bytes: stats.bytes,
        lines: stats.lines,
        rejects: stats.rejects(),
    };
    Ok((input, stats))
}
