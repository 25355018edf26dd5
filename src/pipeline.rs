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
//!
//! Work is spread over cores across files *and* within one big file: an uncompressed file larger
//! than [`ConvertOptions::split_bytes`] is cut into byte ranges of about that size, each ending
//! just after a `\n` ([`split_file`]), and every range is a work item of its own. A range's
//! decoder is told the line number and byte offset it starts at
//! ([`DecoderBuilder::with_start`]), so rejects stay exact; the ranges' counts are summed back
//! into one [`InputRecord`] per file. gzip files are decoded whole (a gzip stream cannot be
//! entered in the middle).

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
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
/// Uncompressed input files larger than this are decoded in ranges of about this size by
/// several workers at once (64 MiB): large enough that the per-range overhead (a seek, a
/// partial last batch per view) is noise, small enough that a multi-GB file feeds every core.
pub const DEFAULT_SPLIT_BYTES: usize = 64 << 20;
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
    /// Split uncompressed files larger than this into byte ranges decoded in parallel (default
    /// [`DEFAULT_SPLIT_BYTES`]; `0` disables splitting).
    pub split_bytes: usize,
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
            split_bytes: DEFAULT_SPLIT_BYTES,
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
    /// Files announced so far (exports: from the manifest; 0 when unknown).
    pub files_total: AtomicU64,
    /// A short state line (exports: "kicked off", the server's X-Progress, "downloading").
    pub state: std::sync::Mutex<String>,
    /// Rows of finished files per resource type (exports; updated once per file).
    pub rows_by_type: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Progress {
    /// Set the state line.
    pub fn set_state(&self, s: impl Into<String>) {
        if let Ok(mut g) = self.state.lock() {
            *g = s.into();
        }
    }

    /// The state line.
    pub fn state(&self) -> String {
        self.state.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Count `rows` more of resource type `ty`.
    pub fn add_rows(&self, ty: &str, rows: u64) {
        if let Ok(mut g) = self.rows_by_type.lock() {
            *g.entry(ty.to_string()).or_default() += rows;
        }
    }

    /// `Type n, …` for the types with the most rows (at most `max`), for progress lines.
    pub fn rows_summary(&self, max: usize) -> String {
        let Ok(g) = self.rows_by_type.lock() else {
            return String::new();
        };
        let mut v: Vec<(&String, &u64)> = g.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut s: Vec<String> = v
            .iter()
            .take(max)
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        if v.len() > max {
            s.push(format!("+{} types", v.len() - max));
        }
        s.join(", ")
    }
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
    // Planning reads big files once (to count lines before each range): off the async runtime.
    let (split, plan_threads) = (opts.split_bytes, opts.threads.max(1));
    let mut queue = tokio::task::spawn_blocking(move || plan_work(files, split, plan_threads))
        .await
        .map_err(|e| Error::Internal(format!("the planning thread failed: {e}")))??;
    let threads = opts.threads.max(1).min(queue.len().max(1));
    // Largest items first, so one big file does not start last.
    queue.sort_by_key(|w| std::cmp::Reverse(w.bytes));
    queue.reverse(); // popped from the end
    let queue = Arc::new(Mutex::new(queue));
    let cancel = Arc::new(AtomicBool::new(false));
    // Two messages per worker: a batch message carries up to one batch per view (each at most
    // `DEFAULT_BATCH_BYTES` of raw JSON), so the queue, not its count, is what costs memory.
    let (tx, mut rx) = mpsc::channel::<Msg>(threads * 2);
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
                let Some(work) = next else { return };
                let msg = match decode_work(&work, &registry, batch_size, &tx, &progress) {
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
    // One record per input file, summed over its ranges.
    let mut inputs: BTreeMap<String, InputRecord> = BTreeMap::new();
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
                    let rec = inputs
                        .entry(input.source.clone())
                        .or_insert_with(|| InputRecord {
                            source: input.source.clone(),
                            ..Default::default()
                        });
                    rec.bytes += input.bytes;
                    rec.lines += input.lines;
                    rec.rejects += input.rejects;
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
    let inputs: Vec<InputRecord> = inputs.into_values().collect(); // sorted by source
    let manifest =
        RunManifest::finished("convert", (run_id, export, started), stats, inputs, files)
            .with_view_keys(&registry);
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

/// A byte range of an input file that starts at the beginning of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRange {
    /// Absolute offset of the first byte.
    pub start: u64,
    /// Offset just past the last byte (just after a `\n`, or the end of the file).
    pub end: u64,
    /// 1-based number of the range's first line in the file.
    pub first_line: u64,
}

/// One item of the decode queue: a whole file, or one range of it.
#[derive(Debug)]
struct Work {
    path: PathBuf,
    /// `None`: the whole file, gunzipped if needed.
    range: Option<FileRange>,
    /// Size on disk, for ordering.
    bytes: u64,
    /// Items of this file not finished yet; the last one counts the file as done.
    parts_left: Arc<AtomicUsize>,
}

/// The offset just after the first `\n` at or after `cut`, or `None` when there is none.
/// Reads forward from `cut` in small blocks, so a long line costs time but no memory.
pub fn find_line_boundary<R: Read + Seek>(r: &mut R, cut: u64) -> std::io::Result<Option<u64>> {
    r.seek(SeekFrom::Start(cut))?;
    let mut buf = [0u8; 64 << 10];
    let mut pos = cut;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(i) = memchr::memchr(b'\n', &buf[..n]) {
            return Ok(Some(pos + i as u64 + 1));
        }
        pos += n as u64;
    }
}

/// Cut `len` bytes of uncompressed ndjson read from `r` into ranges of at least `split_bytes`
/// (the last may be shorter), each ending just after a `\n`, with the line number each starts
/// at. One range when `split_bytes` is 0 or at least `len`.
///
/// The first line number of a range is exact: the newlines before it are counted in a
/// sequential pre-pass over every range but the last. That pass is a `memchr` scan in
/// [`DEFAULT_CHUNK_BYTES`] blocks; it runs at memory (or disk) bandwidth, two orders of magnitude
/// faster than JSON decoding, so it costs a few percent of one file's decode time and lets
/// every range decoder number its lines and rejects as in the whole file from the start,
/// without buffering rejects until earlier ranges finish.
pub fn split_ranges<R: Read + Seek>(
    r: &mut R,
    len: u64,
    split_bytes: usize,
) -> std::io::Result<Vec<FileRange>> {
    let mut bounds = vec![0u64];
    if split_bytes > 0 {
        let mut start = 0u64;
        loop {
            let cut = start.saturating_add(split_bytes as u64);
            if cut >= len {
                break;
            }
            match find_line_boundary(r, cut)? {
                Some(b) if b < len => {
                    bounds.push(b);
                    start = b;
                }
                _ => break,
            }
        }
    }
    bounds.push(len);
    let mut ranges = Vec::with_capacity(bounds.len() - 1);
    let mut first_line = 1u64;
    let mut buf = vec![0u8; DEFAULT_CHUNK_BYTES];
    r.seek(SeekFrom::Start(0))?;
    for (i, w) in bounds.windows(2).enumerate() {
        ranges.push(FileRange {
            start: w[0],
            end: w[1],
            first_line,
        });
        if i + 2 == bounds.len() {
            break; // the last range: nothing after it needs its count
        }
        let mut left = w[1] - w[0];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match r.read(&mut buf[..want]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            first_line += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
            left -= n as u64;
        }
    }
    Ok(ranges)
}

/// The ranges [`convert`] decodes `path` in: one whole-file range for gzip input and for files
/// up to `split_bytes`, else as [`split_ranges`].
pub fn split_file(path: &Path, split_bytes: usize) -> std::io::Result<Vec<FileRange>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut magic = [0u8; 2];
    let gzip = f.read(&mut magic)? == 2 && magic == [0x1f, 0x8b];
    if gzip || split_bytes == 0 || len <= split_bytes as u64 {
        return Ok(vec![FileRange {
            start: 0,
            end: len,
            first_line: 1,
        }]);
    }
    split_ranges(&mut f, len, split_bytes)
}

/// Turn input files into decode work items, splitting big uncompressed files. Files are planned
/// on up to `threads` threads, so the pre-passes of several big files run in parallel.
fn plan_work(files: Vec<PathBuf>, split_bytes: usize, threads: usize) -> Result<Vec<Work>> {
    let next = AtomicUsize::new(0);
    let planned: Vec<Mutex<Option<std::io::Result<Vec<FileRange>>>>> =
        files.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(files.len()).max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = files.get(i) else { return };
                    let r = split_file(path, split_bytes);
                    if let Ok(mut slot) = planned[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    let mut work = Vec::new();
    for (path, slot) in files.into_iter().zip(planned) {
        let planned = slot
            .into_inner()
            .ok()
            .flatten()
            .ok_or_else(|| Error::Internal("a planning thread panicked".into()))?;
        let ranges = planned.map_err(|source| {
            Error::Flatten(FlattenError::Read {
                file: path.display().to_string(),
                source,
            })
        })?;
        let parts_left = Arc::new(AtomicUsize::new(ranges.len()));
        if let [whole] = ranges.as_slice() {
            work.push(Work {
                bytes: whole.end,
                path,
                range: None,
                parts_left,
            });
            continue;
        }
        for r in ranges {
            work.push(Work {
                path: path.clone(),
                range: Some(r),
                bytes: r.end - r.start,
                parts_left: parts_left.clone(),
            });
        }
    }
    Ok(work)
}

fn decode_work(
    work: &Work,
    registry: &Arc<ViewRegistry>,
    batch_size: usize,
    tx: &mpsc::Sender<Msg>,
    progress: &Progress,
) -> Result<(InputRecord, DecodeStats), FlattenError> {
    let name = work.path.display().to_string();
    let read_err = |source| FlattenError::Read {
        file: name.clone(),
        source,
    };
    let mut builder =
        DecoderBuilder::new(registry.clone(), name.clone()).with_batch_size(batch_size);
    let mut input: Box<dyn Read + Send + '_> = match work.range {
        None => open_input(&work.path, progress).map_err(read_err)?,
        Some(r) => {
            builder = builder.with_start(r.first_line, r.start);
            let mut f = std::fs::File::open(&work.path).map_err(read_err)?;
            f.seek(SeekFrom::Start(r.start)).map_err(read_err)?;
            // Reads go straight into the decoder's 1 MiB buffer: no BufReader needed.
            Box::new(Counting {
                inner: f.take(r.end - r.start),
                progress,
            })
        }
    };
    let mut decoder = builder.build();
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
    if work.parts_left.fetch_sub(1, Ordering::AcqRel) == 1 {
        progress.files.fetch_add(1, Ordering::Relaxed);
    }
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

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn line_boundary_is_just_after_the_next_newline() {
        let mut c = Cursor::new(b"ab\ncd\r\n\nlast".to_vec());
        assert_eq!(find_line_boundary(&mut c, 0).unwrap(), Some(3));
        assert_eq!(find_line_boundary(&mut c, 2).unwrap(), Some(3));
        assert_eq!(find_line_boundary(&mut c, 3).unwrap(), Some(7));
        assert_eq!(find_line_boundary(&mut c, 7).unwrap(), Some(8));
        assert_eq!(find_line_boundary(&mut c, 8).unwrap(), None);
        assert_eq!(find_line_boundary(&mut c, 100).unwrap(), None);
        // A newline far past the first read block.
        let mut long = vec![b'x'; 200_000];
        long.push(b'\n');
        long.extend_from_slice(b"y");
        assert_eq!(
            find_line_boundary(&mut Cursor::new(long), 5).unwrap(),
            Some(200_001)
        );
    }

    #[test]
    fn ranges_cover_the_file_on_line_starts_with_exact_line_numbers() {
        let mut data = Vec::new();
        for i in 0..500 {
            data.extend_from_slice(format!("line {i} {}\n", "x".repeat(i % 37)).as_bytes());
            if i == 300 {
                data.extend_from_slice(&[b'L'; 3000]); // a line longer than a range
                data.push(b'\n');
            }
        }
        data.extend_from_slice(b"no trailing newline");
        let len = data.len() as u64;
        for split in [1, 7, 100, 1000, 4096] {
            let ranges = split_ranges(&mut Cursor::new(&data), len, split).unwrap();
            assert!(ranges.len() > 1, "split {split}");
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges.last().unwrap().end, len);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(data[w[0].end as usize - 1], b'\n');
                assert!(w[0].end - w[0].start >= split as u64);
            }
            for r in &ranges {
                let before = memchr::memchr_iter(b'\n', &data[..r.start as usize]).count();
                assert_eq!(r.first_line, before as u64 + 1, "split {split}: {r:?}");
            }
        }
        let one = split_ranges(&mut Cursor::new(&data), len, 0).unwrap();
        assert_eq!(
            one,
            vec![FileRange {
                start: 0,
                end: len,
                first_line: 1
            }]
        );
        assert_eq!(
            split_ranges(&mut Cursor::new(&data), len, len as usize).unwrap(),
            one
        );
    }

    #[test]
    fn gzip_files_are_not_split() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.ndjson");
        let text = "{\"resourceType\":\"Basic\"}\n".repeat(100);
        std::fs::write(&plain, &text).unwrap();
        assert!(split_file(&plain, 64).unwrap().len() > 1);
        let gz = dir.path().join("a.ndjson.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        std::io::Write::write_all(&mut e, text.as_bytes()).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        assert_eq!(split_file(&gz, 1).unwrap().len(), 1);
    }
}
