//! [`Driver`]: inputs → decode threads → one bounded batch stream → a [`BatchSink`].

use std::{
    collections::BTreeMap,
    io::Read,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use super::{DEFAULT_CHUNK_BYTES, Input, Progress, input::RangeLines};
use crate::{
    Error, Result,
    dataset::InputRecord,
    flatten::{
        DEFAULT_BATCH_BYTES, DEFAULT_BATCH_SIZE, DEFAULT_MAX_LINE_BYTES, DecodeStats,
        DecoderBuilder, FlattenError, Reject, RejectBuffer, ViewBatch,
    },
    sink::DatasetWriter,
    view::ViewRegistry,
};

/// Where decoded batches go. The driver calls it on a blocking thread of its own (through
/// [`tokio::runtime::Handle::block_on`]), so CPU work in `write` (Parquet encoding and
/// compression) never stalls the runtime that polls servers and downloads, while the I/O the
/// sink starts (object store requests) still runs on that runtime.
#[async_trait::async_trait]
pub trait BatchSink: Send + 'static {
    /// Take one batch (of a view, or of `_rejects`).
    async fn write(&mut self, batch: ViewBatch) -> Result<()>;

    /// The run failed: abandon what is not yet written out, leaving nothing unfinished behind
    /// in the store (an object store's multipart uploads). Called once, instead of finishing
    /// the sink; the default does nothing.
    async fn abort(&mut self) {}
}

#[async_trait::async_trait]
impl BatchSink for DatasetWriter {
    async fn write(&mut self, batch: ViewBatch) -> Result<()> {
        Ok(DatasetWriter::write(self, &batch).await?)
    }

    async fn abort(&mut self) {
        DatasetWriter::abort(self).await
    }
}

#[async_trait::async_trait]
impl BatchSink for crate::sink::ShardedWriter {
    async fn write(&mut self, batch: ViewBatch) -> Result<()> {
        crate::sink::ShardedWriter::write(self, batch).await
    }

    async fn abort(&mut self) {
        crate::sink::ShardedWriter::abort(self).await
    }
}

/// Collects every batch in memory (the `view` command, tests).
#[async_trait::async_trait]
impl BatchSink for Vec<ViewBatch> {
    async fn write(&mut self, batch: ViewBatch) -> Result<()> {
        self.push(batch);
        Ok(())
    }
}

/// Configures a [`Driver`].
#[derive(Debug, Clone)]
pub struct DriverBuilder {
    registry: Arc<ViewRegistry>,
    progress: Arc<Progress>,
    threads: usize,
    batch_size: usize,
    batch_bytes: usize,
    max_line_bytes: usize,
    only_viewed: bool,
    cancel: Arc<AtomicBool>,
    wind_down: Arc<WindDown>,
}

impl DriverBuilder {
    /// A driver that decodes with `registry`'s views.
    pub fn new(registry: Arc<ViewRegistry>) -> Self {
        DriverBuilder {
            registry,
            progress: Arc::new(Progress::default()),
            threads: 1,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_bytes: DEFAULT_BATCH_BYTES,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            only_viewed: false,
            cancel: Arc::new(AtomicBool::new(false)),
            wind_down: Arc::default(),
        }
    }
    /// Counters to update (default: fresh ones).
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = progress;
        self
    }
    /// Decode threads (default 1).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }
    /// Rows per batch (default [`DEFAULT_BATCH_SIZE`]).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// Raw bytes per batch (default [`DEFAULT_BATCH_BYTES`]).
    pub fn with_batch_bytes(mut self, n: usize) -> Self {
        self.batch_bytes = n.max(1);
        self
    }
    /// Longest accepted line (default [`DEFAULT_MAX_LINE_BYTES`]; see
    /// [`DecoderBuilder::with_max_line_bytes`]).
    pub fn with_max_line_bytes(mut self, n: usize) -> Self {
        self.max_line_bytes = n.max(1);
        self
    }
    /// Decode only the registry's resource types and add no generic tables (default `false`;
    /// see [`DecoderBuilder::with_only_viewed_types`]).
    pub fn with_only_viewed_types(mut self, only: bool) -> Self {
        self.only_viewed = only;
        self
    }
    /// A flag that stops the run when set (checked once per chunk; default: never set).
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Self {
        self.cancel = cancel;
        self
    }
    /// Where the run's sink thread registers while it works (default: a fresh one), so that a
    /// caller that drops [`Driver::run`] futures (Ctrl-C) can wait for them to let go of their
    /// files before it cleans up.
    pub fn with_wind_down(mut self, wind_down: Arc<WindDown>) -> Self {
        self.wind_down = wind_down;
        self
    }
    /// Build.
    pub fn build(self) -> Driver {
        Driver {
            cfg: Arc::new(self),
        }
    }
}

/// Runs inputs through decoders into a sink. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct Driver {
    cfg: Arc<DriverBuilder>,
}

/// The sink threads of [`Driver::run`]s still at work. A `run` future dropped before it ends
/// (its task aborted, a `select!` that took Ctrl-C) cannot stop the threads it started: its
/// decoders stop at their next chunk and its sink thread aborts the sink
/// ([`BatchSink::abort`]) instead of handing it back, but both finish on their own time.
/// Whoever deletes what the dropped run wrote waits for [`WindDown::idle`] first, or a part
/// the sink was still writing would appear after the clean-up.
#[derive(Debug, Default)]
pub struct WindDown {
    live: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl WindDown {
    /// Wait until no sink thread registered here is at work, for at most `limit`; `false` when
    /// some still are.
    pub async fn idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.live.load(Ordering::SeqCst) == 0;
            }
        }
    }

    fn enter(self: &Arc<Self>) -> Working {
        self.live.fetch_add(1, Ordering::SeqCst);
        Working(self.clone())
    }
}

/// One sink thread at work (see [`WindDown`]).
struct Working(Arc<WindDown>);

impl Drop for Working {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// Held while a [`Driver::run`] future lives; its drop before the run ended stops the run's
/// decoders and tells the sink thread to abort.
struct Abandoned {
    stop: Arc<AtomicBool>,
    tell: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Abandoned {
    /// The run ended: nothing to tell.
    fn disarm(&mut self) {
        self.tell = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(tell) = self.tell.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = tell.send(());
        }
    }
}

/// What a [`Driver::run`] decoded.
#[derive(Debug)]
pub struct Decoded<S> {
    /// The sink, for the caller to finish (close files, commit).
    pub sink: S,
    /// One record per input file (the ranges of a split file summed), sorted by source.
    pub inputs: Vec<InputRecord>,
    /// Counts of all inputs.
    pub stats: DecodeStats,
}

/// The outcome of one input on a decode thread.
type InputOutcome = (String, DecodeStats);

impl Driver {
    /// The counters this driver updates.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.cfg.progress
    }

    /// Decode `inputs` (largest first on up to `threads` threads; in the order given on one)
    /// into `sink`. The first error
    /// — reading an input, or the sink — stops every thread and is returned; the sink is then
    /// aborted ([`BatchSink::abort`]), for the caller to clean up after.
    pub async fn run<S: BatchSink>(&self, mut inputs: Vec<Input>, sink: S) -> Result<Decoded<S>> {
        let threads = self.cfg.threads.min(inputs.len()).max(1);
        if threads > 1 {
            // Largest first, so one big file does not start last (popped from the end); the
            // ranges of a split file in file order, so that a range's first line number is
            // mostly a sum of the counts of ranges already decoded ([`input::RangeLines`]).
            inputs.sort_by_key(Input::order);
        } else {
            // One thread reads the inputs in the order given (the `view` command's row order).
            inputs.reverse();
        }
        let queue = Arc::new(Mutex::new(inputs));
        // Two messages per thread: a batch carries at most `batch_bytes` of raw JSON, so the
        // queue's size, not its count, is what costs memory.
        let (tx, rx) = mpsc::channel::<ViewBatch>(threads * 2);
        let stop = Arc::new(AtomicBool::new(false));
        let (tell, dropped) = tokio::sync::oneshot::channel();
        let mut abandoned = Abandoned {
            stop: stop.clone(),
            tell: Some(tell),
        };
        let writer = spawn_sink(sink, rx, dropped, self.cfg.wind_down.enter());
        let mut decoders = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (cfg, queue, tx, stop) =
                (self.cfg.clone(), queue.clone(), tx.clone(), stop.clone());
            // The caller's span (the run id) on the thread's events too.
            let span = tracing::Span::current();
            decoders.push(tokio::task::spawn_blocking(
                move || -> Result<Vec<InputOutcome>, FlattenError> {
                    let _span = span.enter();
                    let mut done = Vec::new();
                    // One read buffer per thread, not per input: a run of thousands of small
                    // files would zero a fresh MiB for each.
                    let mut buf = vec![0u8; DEFAULT_CHUNK_BYTES];
                    loop {
                        if stop.load(Ordering::Relaxed) || cfg.cancel.load(Ordering::Relaxed) {
                            return Ok(done);
                        }
                        let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                        let Some(input) = next else { return Ok(done) };
                        match decode_input(&cfg, input, &mut buf, &tx, &stop) {
                            Ok(Some(outcome)) => done.push(outcome),
                            Ok(None) => return Ok(done), // the sink stopped
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                },
            ));
        }
        drop(tx);
        let mut failure: Option<Error> = None;
        let mut by_source: BTreeMap<String, InputRecord> = BTreeMap::new();
        let mut stats = DecodeStats::default();
        for d in decoders {
            match d.await {
                Ok(Ok(outcomes)) => {
                    for (source, s) in outcomes {
                        let rec = by_source
                            .entry(source.clone())
                            .or_insert_with(|| InputRecord {
                                source,
                                ..Default::default()
                            });
                        rec.bytes += s.bytes;
                        rec.lines += s.lines;
                        rec.rejects += s.rejects();
                        stats.merge(&s);
                    }
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e.into());
                }
                Err(e) => {
                    failure.get_or_insert(Error::Internal(format!("a decode thread failed: {e}")));
                }
            }
        }
        let writer = writer.await;
        abandoned.disarm();
        let mut sink = match writer {
            Ok(Ok(sink)) => sink,
            // The sink's error comes first: decoders stop when it does.
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(Error::Internal(format!("the writer thread failed: {e}")));
            }
        };
        let failure = match failure {
            Some(e) => Some(e),
            None if self.cfg.cancel.load(Ordering::Relaxed) => Some(Error::Cancelled),
            None => None,
        };
        if let Some(e) = failure {
            sink.abort().await;
            return Err(e);
        }
        Ok(Decoded {
            sink,
            inputs: by_source.into_values().collect(),
            stats,
        })
    }
}

/// Drive `sink` with the batches of `rx` on a blocking thread; returns the sink at the end of
/// the stream. When the run is dropped (`dropped` fires), the sink is aborted at once instead
/// (nobody is left to finish it), without waiting for the decoders. `working` is held until
/// then.
fn spawn_sink<S: BatchSink>(
    mut sink: S,
    mut rx: mpsc::Receiver<ViewBatch>,
    mut dropped: tokio::sync::oneshot::Receiver<()>,
    working: Working,
) -> tokio::task::JoinHandle<Result<S>> {
    let handle = tokio::runtime::Handle::current();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        let _working = working;
        handle.block_on(async move {
            let mut watching = true;
            loop {
                let batch = tokio::select! {
                    biased;
                    told = &mut dropped, if watching => {
                        if told.is_ok() {
                            drop(rx);
                            sink.abort().await;
                            return Err(Error::Cancelled);
                        }
                        watching = false; // the run ended; nothing will be told
                        continue;
                    }
                    b = rx.recv() => b,
                };
                let Some(batch) = batch else { break };
                if let Err(e) = sink.write(batch).await {
                    sink.abort().await;
                    return Err(e);
                }
            }
            Ok(sink)
        })
    })
}

/// Shift `rejects` numbered from 1 within a range of a split file to the file's own line
/// numbers: `shift` is learned from `range` at the first reject, then kept.
fn renumber(
    mut rejects: Vec<Reject>,
    range: &Option<RangeLines>,
    shift: &mut Option<u64>,
    label: &str,
) -> Result<Vec<Reject>, FlattenError> {
    if rejects.is_empty() {
        return Ok(rejects);
    }
    let by = match *shift {
        Some(by) => by,
        None => {
            let first = range
                .as_ref()
                .map_or(Ok(1), RangeLines::first_line)
                .map_err(|source| FlattenError::Read {
                    file: label.to_string(),
                    source,
                })?;
            *shift = Some(first - 1);
            first - 1
        }
    };
    if by > 0 {
        for r in &mut rejects {
            r.line += by;
        }
    }
    Ok(rejects)
}

/// Decode one input on the calling (blocking) thread, sending its batches and bounded reject
/// batches to `tx`. `Ok(None)`: the receiver is gone (the sink failed; its error is reported
/// there).
fn decode_input(
    cfg: &DriverBuilder,
    input: Input,
    buf: &mut [u8],
    tx: &mpsc::Sender<ViewBatch>,
    stop: &AtomicBool,
) -> Result<Option<InputOutcome>, FlattenError> {
    let progress = &cfg.progress;
    let label = input.label.clone();
    let (offset, range) = input.start();
    let parts_left = input.parts_left.clone();
    let mut reader = input.open(progress.clone())?;
    // A range of a split file numbers its lines from 1 until a reject needs the file's own
    // numbers: then its first line is learned once and every reject is shifted by it.
    let mut shift = if range.is_none() { Some(0) } else { None };
    let mut decoder = DecoderBuilder::new(cfg.registry.clone(), label.clone())
        .with_batch_size(cfg.batch_size)
        .with_batch_bytes(cfg.batch_bytes)
        .with_max_line_bytes(cfg.max_line_bytes)
        .with_only_viewed_types(cfg.only_viewed)
        .with_start(1, offset)
        .build();
    let mut rejects = RejectBuffer::default();
    let (mut lines, mut rejected) = (0, 0);
    let send = |b: ViewBatch| tx.blocking_send(b).is_ok();
    loop {
        if stop.load(Ordering::Relaxed) || cfg.cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(FlattenError::Read {
                    file: label,
                    source,
                });
            }
        };
        progress
            .largest_chunk
            .fetch_max(n as u64, Ordering::Relaxed);
        decoder.decode(&buf[..n])?;
        count(progress, decoder.stats(), &mut lines, &mut rejected);
        for b in decoder.take_batches() {
            if !send(b) {
                return Ok(None);
            }
        }
        for b in rejects.push(renumber(
            decoder.take_rejects(),
            &range,
            &mut shift,
            &label,
        )?) {
            if !send(b) {
                return Ok(None);
            }
        }
    }
    let batches = decoder.finish()?;
    count(progress, decoder.stats(), &mut lines, &mut rejected);
    let last_rejects = rejects.push(renumber(
        decoder.take_rejects(),
        &range,
        &mut shift,
        &label,
    )?);
    if let Some(r) = &range {
        r.record(decoder.stats().lines);
    }
    for b in batches
        .into_iter()
        .chain(last_rejects)
        .chain(rejects.flush())
    {
        if !send(b) {
            return Ok(None);
        }
    }
    progress
        .largest_reject_batch
        .fetch_max(rejects.largest_batch() as u64, Ordering::Relaxed);
    if parts_left.fetch_sub(1, Ordering::AcqRel) == 1 {
        progress.files.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Some((label, decoder.stats().clone())))
}

/// Add what the decoder counted since the last call to the progress counters.
fn count(progress: &Progress, stats: &DecodeStats, lines: &mut u64, rejected: &mut u64) {
    let (l, r) = (stats.lines, stats.rejects());
    progress.lines.fetch_add(l - *lines, Ordering::Relaxed);
    progress.rejects.fetch_add(r - *rejected, Ordering::Relaxed);
    (*lines, *rejected) = (l, r);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Arc<ViewRegistry> {
        Arc::new(ViewRegistry::builtin().unwrap())
    }

    fn file(dir: &std::path::Path, name: &str, text: &str) -> Input {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        Input::file(p)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_and_bodies_decode_alike_with_bounded_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let good = "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n";
        let bad = "not json\n".repeat(10_000);
        let driver = DriverBuilder::new(registry()).with_threads(2).build();
        let (body, tx) = Input::body("http://h/1.ndjson", None);
        let body_text = format!("{good}{bad}");
        let feeder = tokio::spawn(async move {
            for chunk in body_text.as_bytes().chunks(777) {
                tx.send(Ok(bytes::Bytes::copy_from_slice(chunk)))
                    .await
                    .unwrap();
            }
        });
        let inputs = vec![file(dir.path(), "a.ndjson", &format!("{good}{bad}")), body];
        let out = driver.run(inputs, Vec::new()).await.unwrap();
        feeder.await.unwrap();
        assert_eq!(out.inputs.len(), 2);
        for i in &out.inputs {
            assert_eq!((i.lines, i.rejects), (10_001, 10_000), "{i:?}");
        }
        let rows = |view: &str| -> usize {
            out.sink
                .iter()
                .filter(|b| &*b.view == view)
                .map(|b| b.batch.num_rows())
                .sum()
        };
        assert_eq!(rows("patient"), 2);
        assert_eq!(rows(crate::dataset::REJECTS_TABLE), 20_000);
        let p = driver.progress();
        assert_eq!(Progress::get(&p.rejects), 20_000);
        assert_eq!(Progress::get(&p.lines), 20_002);
        assert_eq!(Progress::get(&p.files), 2);
        // Rejects leave in batches, never all at once.
        assert_eq!(
            Progress::get(&p.largest_reject_batch),
            crate::flatten::MAX_REJECTS_PER_BATCH as u64
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_file_fails_the_run_and_cancel_stops_it() {
        let driver = DriverBuilder::new(registry()).build();
        let err = driver
            .run(vec![Input::file("/nonexistent/x.ndjson")], Vec::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.ndjson"), "{err}");
        let cancel = Arc::new(AtomicBool::new(true));
        let driver = DriverBuilder::new(registry()).with_cancel(cancel).build();
        let dir = tempfile::tempdir().unwrap();
        let input = file(dir.path(), "a.ndjson", "{\"resourceType\":\"Patient\"}\n");
        assert!(matches!(
            driver.run(vec![input], Vec::new()).await,
            Err(Error::Cancelled)
        ));
    }

    /// Records what a run does to its sink.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<&'static str>>>);

    #[async_trait::async_trait]
    impl BatchSink for Recorder {
        async fn write(&mut self, _: ViewBatch) -> Result<()> {
            self.0.lock().unwrap().push("write");
            Ok(())
        }
        async fn abort(&mut self) {
            self.0.lock().unwrap().push("abort");
        }
    }

    /// A run whose future is dropped (its task aborted, as Ctrl-C does to an export's files)
    /// aborts its sink on the sink's thread and lets the wind-down know, without waiting for a
    /// decoder that is still waiting for its input.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_run_aborts_its_sink_and_winds_down() {
        let wind_down = Arc::new(WindDown::default());
        let driver = DriverBuilder::new(registry())
            .with_batch_size(1)
            .with_wind_down(wind_down.clone())
            .build();
        let (body, tx) = Input::body("http://h/1.ndjson", None);
        let sink = Recorder::default();
        let events = sink.0.clone();
        let run = tokio::spawn(async move { driver.run(vec![body], sink).await.map(|_| ()) });
        let lines = "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n".repeat(3);
        tx.send(Ok(bytes::Bytes::from(lines))).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !events.lock().unwrap().contains(&"write") {
            assert!(std::time::Instant::now() < deadline, "no batch written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !wind_down.idle(Duration::from_millis(1)).await,
            "the sink is at work"
        );
        run.abort();
        assert!(run.await.unwrap_err().is_cancelled());
        // The body stays open (its sender is held here): the decoder waits for more.
        assert!(
            wind_down.idle(Duration::from_secs(20)).await,
            "the sink thread lives on"
        );
        assert_eq!(events.lock().unwrap().last(), Some(&"abort"));
        drop(tx);
    }
}
