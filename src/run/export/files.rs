//! One manifest file: download → [driver](crate::run::Driver) → staged parts, with the retry
//! rules of the IG (an expired URL is re-fetched from the manifest once, transient failures start
//! the file over).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::AsArray;
use futures::StreamExt;
use url::Url;

use super::Shared;
use crate::{
    Error, Result,
    client::{ClientError, ManifestItem, PollOutcome},
    dataset::{FileKind, FileRecord, FileState, OUTCOMES_TABLE, WrittenFile, job::fnv1a},
    flatten::{DecodeStats, FlattenError, ViewBatch, bulk_files},
    run::{BatchSink, DriverBuilder, Input, input::BodySender},
    sink::{DatasetWriter, DatasetWriterBuilder},
};

/// Download and store one manifest item; returns its record (parts staged, not yet committed).
pub(super) async fn process_item(
    sh: &Shared,
    kind: FileKind,
    item: &ManifestItem,
    requires_token: bool,
    n: usize,
    slot: &mut DownloadSlot,
) -> Result<FileRecord> {
    let mut url = Url::parse(&item.url).map_err(|e| ClientError::Invalid(e.to_string()))?;
    let shown = crate::client::error_redact(&url);
    if let Ok(mut r) = sh.running.downloading.lock() {
        r.insert(shown.clone());
    }
    let mut attempt = 0;
    let mut short_attempts = 0;
    let mut backoff = sh.client.retry().base;
    let mut refreshed = false;
    let result = loop {
        match fetch(sh, kind, &url, requires_token, n, slot).await {
            Ok((parts, stats, _))
                if short_attempts < SHORT_FILE_RETRIES && is_short(kind, item.count, &stats) =>
            {
                // Fewer resources than the manifest's `count`: a body that ended early without
                // an error (a close-delimited body cut at a line end by a proxy or a crashed
                // backend). Download it again rather than publish part of it.
                short_attempts += 1;
                sh.client.http_stats().retry();
                crate::dataset::discard_staged(&sh.location, &parts).await;
                tracing::warn!(
                    file = %shown,
                    lines = stats.lines - stats.blank_lines,
                    count = item.count.unwrap_or_default(),
                    retry = short_attempts,
                    of = SHORT_FILE_RETRIES,
                    "the file holds fewer resources than the manifest's count; downloading it again"
                );
                backoff = sh.client.retry().next_backoff(backoff);
                tokio::time::sleep(backoff).await;
            }
            Ok((parts, stats, outcomes)) => {
                break Ok(FileRecord {
                    url: item.url.clone(),
                    kind,
                    resource_type: item.type_.clone(),
                    state: FileState::Committing,
                    parts,
                    stats,
                    count: item.count,
                    outcomes,
                    refreshed_url: refreshed.then(|| url.to_string()),
                });
            }
            Err(Error::Client(ClientError::Status {
                status: 404 | 410, ..
            })) if !refreshed => {
                // C15: the link expired; a re-fetched manifest may carry a fresh one.
                refreshed = true;
                tracing::info!(url = %crate::client::error_redact(&url), "file URL expired; re-fetching the manifest");
                url = match refreshed_url(sh, kind, item).await {
                    Ok(u) => u,
                    Err(e) => break Err(e),
                };
            }
            Err(e) if attempt < sh.client.retry().max_retries && retryable(&e) => {
                attempt += 1;
                sh.client.http_stats().retry();
                backoff = sh.client.retry().next_backoff(backoff);
                tracing::info!(retry = attempt, of = sh.client.retry().max_retries, error = %e, "file attempt failed; starting over");
                tokio::time::sleep(backoff).await;
            }
            Err(e) => break Err(e),
        }
    };
    if let Ok(mut r) = sh.running.downloading.lock() {
        r.remove(&shown);
    }
    result
}

/// Downloads of a file that came back shorter than its manifest `count` before it is kept as
/// it is (a server whose `count` is wrong would otherwise fail every export). A run that keeps
/// a short file warns, and removes nothing from the current state as a snapshot.
const SHORT_FILE_RETRIES: u32 = 2;

/// Whether an output file held fewer resources (non-blank lines) than its manifest's `count`.
pub(super) fn is_short(kind: FileKind, count: Option<u64>, stats: &DecodeStats) -> bool {
    kind == FileKind::Output && count.is_some_and(|c| stats.lines - stats.blank_lines < c)
}

fn retryable(e: &Error) -> bool {
    match e {
        Error::Client(c) => c.is_retryable(),
        Error::Flatten(FlattenError::Read { .. }) => true,
        _ => false,
    }
}

/// One attempt at a file: its parts (staged), what was read, and outcome issues by severity.
async fn fetch(
    sh: &Shared,
    kind: FileKind,
    url: &Url,
    requires_token: bool,
    n: usize,
    slot: &mut DownloadSlot,
) -> Result<(Vec<WrittenFile>, DecodeStats, BTreeMap<String, u64>)> {
    slot.take().await;
    let label = crate::client::error_redact(url);
    let registry = match kind {
        FileKind::Output => sh.registry.clone(),
        FileKind::Deleted => bulk_files::deleted_registry(),
        FileKind::Error => bulk_files::outcomes_registry(),
    };
    let archive = sh.opts.keep_ndjson.as_ref().map(|dir| {
        let name: String = url
            .path_segments()
            .and_then(|mut s| s.next_back())
            .unwrap_or("file")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        dir.join(format!("{n:04}-{name}"))
    });
    let (input, body) = Input::body(label, archive);
    // The decoders of parallel downloads share what two `convert` workers would hold.
    let concurrency = sh.opts.concurrency.max(1);
    let batch_bytes = (2 * crate::flatten::DEFAULT_BATCH_BYTES / concurrency)
        .min(crate::flatten::DEFAULT_BATCH_BYTES);
    let driver = DriverBuilder::new(registry)
        .with_batch_size(sh.opts.batch_size)
        .with_batch_bytes(batch_bytes)
        .with_max_line_bytes(sh.opts.max_line_bytes)
        .with_only_viewed_types(kind != FileKind::Output)
        .with_progress(sh.progress.clone())
        .with_wind_down(sh.running.writers.clone())
        .build();
    let sink = Tally {
        writer: sh.writer(url),
        severities: BTreeMap::new(),
    };
    let (downloaded, decoded) = tokio::join!(
        pump(sh, url, requires_token, body, slot),
        driver.run(vec![input], sink)
    );
    // A download error comes first: the decoder only saw its input end early.
    downloaded?;
    let decoded = decoded?;
    let parts = decoded.sink.writer.finish().await?;
    Ok((parts, decoded.stats, decoded.sink.severities))
}

/// A file's turn to download: one of `--concurrency` slots, taken for each attempt and given
/// back as soon as the body's last byte is in. Holding it until the file's parts were written
/// kept a slot idle for the last chunks' decoding and the closing of every view's part
/// (synthea ×10 at 2 MB/s per file: ~16 ms per file, ~0.2 s of the export's wall time). How
/// many files may be past their download but not yet written is bounded by the caller.
pub(super) struct DownloadSlot {
    slots: Arc<tokio::sync::Semaphore>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl DownloadSlot {
    /// A file's turn among `slots`, not taken yet.
    pub(super) fn new(slots: Arc<tokio::sync::Semaphore>) -> Self {
        DownloadSlot { slots, held: None }
    }

    /// Wait for a slot unless one is held.
    async fn take(&mut self) {
        if self.held.is_none() {
            // The semaphore is never closed.
            self.held = self.slots.clone().acquire_owned().await.ok();
        }
    }

    fn give_back(&mut self) {
        self.held = None;
    }
}

/// Feed the body of `url` into `body` through the client's resumable download (redirects
/// followed, a cut or stalled identity body resumed with `Range`). A failure is also sent into
/// `body`, so the decoder never takes a cut body for a whole one.
async fn pump(
    sh: &Shared,
    url: &Url,
    requires_token: bool,
    body: BodySender,
    slot: &mut DownloadSlot,
) -> Result<()> {
    let r: Result<()> = async {
        let mut download = sh.client.download(url, requires_token).await?;
        while let Some(chunk) = download.next().await {
            if body.send(Ok(chunk?)).await.is_err() {
                return Ok(()); // the decoder stopped; its error is reported there
            }
        }
        // The whole body is in (all but the decoder's bounded channel of it decoded): the next
        // file may start downloading while this one's last lines and parts are written.
        slot.give_back();
        Ok(())
    }
    .await;
    if let Err(e) = &r {
        let _ = body
            .send(Err(std::io::Error::other(format!("download failed: {e}"))))
            .await;
    }
    r
}

/// The dataset writer of one file, counting the severities of `_outcomes` rows on the way.
struct Tally {
    writer: DatasetWriter,
    severities: BTreeMap<String, u64>,
}

#[async_trait::async_trait]
impl BatchSink for Tally {
    async fn write(&mut self, batch: ViewBatch) -> Result<()> {
        if &*batch.view == OUTCOMES_TABLE
            && let Some(sev) = batch.batch.column_by_name("severity")
            && let Some(sev) = sev.as_string_opt::<i32>()
        {
            for s in sev.iter() {
                *self
                    .severities
                    .entry(s.unwrap_or("unknown").to_string())
                    .or_default() += 1;
            }
        }
        Ok(self.writer.write(&batch).await?)
    }

    async fn abort(&mut self) {
        self.writer.abort().await
    }
}

impl Shared {
    /// The writer for one downloaded file. Its part names carry a hash of the file's URL, so
    /// a resumed run writes a file's parts under the same names and can never overwrite the
    /// committed parts of another file.
    fn writer(&self, url: &Url) -> DatasetWriter {
        DatasetWriterBuilder::new(
            self.location.clone(),
            format!("{}-{:016x}", self.tag, fnv1a(url.as_str().as_bytes())),
            &self.export,
        )
        .with_compression(self.opts.compression)
        .with_staging(true)
        // Up to `concurrency` files are written at once, each by its own writer: they share
        // the one budget a `convert` writer has, so memory does not grow with --concurrency.
        .with_max_buffered_bytes(
            crate::sink::DEFAULT_MAX_BUFFERED_BYTES / self.opts.concurrency.max(1),
        )
        .build()
    }
}

/// The URL of `item` in a freshly fetched manifest (all pages): the entry with the same URL
/// path, else the only entry of the same kind, type and count.
async fn refreshed_url(sh: &Shared, kind: FileKind, item: &ManifestItem) -> Result<Url> {
    let _one_at_a_time = sh.refresh.lock().await;
    let gone = || ClientError::Protocol {
        url: crate::client::error_redact(&sh.status),
        message: format!(
            "the file {} expired and the re-fetched manifest has no replacement for it",
            Url::parse(&item.url)
                .map(|u| crate::client::error_redact(&u))
                .unwrap_or_default()
        ),
    };
    let mut items = Vec::new();
    let mut page = Some(sh.status.clone());
    while let Some(p) = page.take() {
        match sh.client.poll(&p).await? {
            PollOutcome::Complete(m) => {
                items.extend(super::items_of(&m));
                page = m
                    .next_page()
                    .map(|n| Url::parse(n).map_err(|e| ClientError::Invalid(e.to_string())))
                    .transpose()?;
            }
            PollOutcome::InProgress { .. } => return Err(gone().into()),
        }
    }
    let path = |u: &str| {
        Url::parse(u)
            .ok()
            .map(|u| (u.origin(), u.path().to_string()))
    };
    let same_path: Vec<&ManifestItem> = items
        .iter()
        .filter(|(k, i)| *k == kind && i.url != item.url && path(&i.url) == path(&item.url))
        .map(|(_, i)| i)
        .collect();
    let candidates = if same_path.is_empty() {
        items
            .iter()
            .filter(|(k, i)| {
                *k == kind && i.type_ == item.type_ && i.count == item.count && i.url != item.url
            })
            .map(|(_, i)| i)
            .collect()
    } else {
        same_path
    };
    match candidates.as_slice() {
        [one] => Ok(Url::parse(&one.url).map_err(|e| ClientError::Invalid(e.to_string()))?),
        _ => Err(gone().into()),
    }
}
