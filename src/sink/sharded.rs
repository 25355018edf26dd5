//! [`ShardedWriter`]: the views of one run written by several [`DatasetWriter`]s at once.
//!
//! Encoding and compressing Parquet is about a third of a `convert`'s CPU (zstd of the raw
//! `resource` column above all), and one writer is one thread: with more than a few cores the
//! decoders outrun it and the run waits on that one thread. Each view is written by one shard
//! for the whole run, so a view's files are named and rolled exactly as one writer would (the
//! names depend on the view and its file count, not on the shard), and the shards split the
//! writer budget ([`DatasetWriterBuilder::with_max_buffered_bytes`]) between them.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::{sync::mpsc, task::JoinHandle};

use super::{DatasetWriter, DatasetWriterBuilder, WrittenFile};
use crate::{Error, Result, flatten::ViewBatch};

/// One writer inline, or several on threads of their own.
pub struct ShardedWriter {
    /// `None` once finished.
    inner: Option<Inner>,
}

enum Inner {
    One(Box<DatasetWriter>),
    Many {
        shards: Vec<Shard>,
        /// The shard of each view seen so far.
        route: HashMap<Arc<str>, usize>,
    },
}

enum Msg {
    Batch(ViewBatch),
    /// Close the open files and return what was written.
    Finish,
    /// Abort the open files' uploads ([`DatasetWriter::abort`]).
    Abort,
}

struct Shard {
    tx: mpsc::Sender<Msg>,
    /// `None` once awaited (a shard that stopped early is awaited for its error).
    join: Option<JoinHandle<Result<Vec<WrittenFile>>>>,
    /// Bytes of the batches sent to it (a new view goes to the least loaded shard).
    load: usize,
}

/// Batches queued for one shard.
const SHARD_QUEUE: usize = 2;

impl ShardedWriter {
    /// `shards` writers as `builder` configures them, each with its share of the writer budget
    /// (one writer, called inline, when `shards` ≤ 1). Must be called within a Tokio runtime.
    pub fn new(builder: DatasetWriterBuilder, shards: usize) -> ShardedWriter {
        if shards <= 1 {
            return ShardedWriter {
                inner: Some(Inner::One(Box::new(builder.build()))),
            };
        }
        let budget = (builder.max_buffered_bytes() / shards).max(1);
        let handle = tokio::runtime::Handle::current();
        let shards = (0..shards)
            .map(|_| {
                let mut writer = builder.clone().with_max_buffered_bytes(budget).build();
                let (tx, mut rx) = mpsc::channel::<Msg>(SHARD_QUEUE);
                let (handle, span) = (handle.clone(), tracing::Span::current());
                let join = tokio::task::spawn_blocking(move || {
                    let _span = span.enter();
                    handle.block_on(async move {
                        while let Some(msg) = rx.recv().await {
                            match msg {
                                Msg::Batch(vb) => {
                                    if let Err(e) = writer.write(&vb).await {
                                        writer.abort().await;
                                        return Err(e.into());
                                    }
                                }
                                Msg::Finish => return Ok(writer.finish().await?),
                                Msg::Abort => {
                                    writer.abort().await;
                                    return Ok(Vec::new());
                                }
                            }
                        }
                        // Dropped unfinished: the open files are abandoned, as one writer's
                        // would be (no upload is aborted: `Drop` waits for this thread
                        // without driving the runtime an abort's requests need).
                        Ok(Vec::new())
                    })
                });
                Shard {
                    tx,
                    join: Some(join),
                    load: 0,
                }
            })
            .collect();
        ShardedWriter {
            inner: Some(Inner::Many {
                shards,
                route: HashMap::new(),
            }),
        }
    }

    /// Write one batch (through its view's shard).
    pub async fn write(&mut self, vb: ViewBatch) -> Result<()> {
        let (shards, route) = match &mut self.inner {
            Some(Inner::One(w)) => return Ok(w.write(&vb).await?),
            Some(Inner::Many { shards, route }) => (shards, route),
            None => return Err(Error::Internal("write after finish".into())),
        };
        let k = match route.get(&vb.view) {
            Some(k) => *k,
            None => {
                let k = (0..shards.len())
                    .min_by_key(|k| shards[*k].load)
                    .unwrap_or(0);
                route.insert(vb.view.clone(), k);
                k
            }
        };
        let shard = &mut shards[k];
        shard.load += vb.batch.get_array_memory_size();
        if shard.tx.send(Msg::Batch(vb)).await.is_err() {
            // The shard stopped on an error, which its thread returns.
            return Err(match shard.join.take() {
                Some(join) => match join.await {
                    Ok(Err(e)) => e,
                    Ok(Ok(_)) => Error::Internal("a writer shard stopped early".into()),
                    Err(e) => Error::Internal(format!("a writer shard failed: {e}")),
                },
                None => Error::Internal("a writer shard stopped early".into()),
            });
        }
        Ok(())
    }

    /// Close every open file of every shard; returns everything written, sorted by path.
    pub async fn finish(mut self) -> Result<Vec<WrittenFile>> {
        let shards = match self.inner.take() {
            Some(Inner::One(w)) => return Ok(w.finish().await?),
            Some(Inner::Many { shards, .. }) => shards,
            None => return Ok(Vec::new()),
        };
        // Every shard closes its files at once, each on its own thread.
        let mut joins = Vec::new();
        for Shard { tx, join, .. } in shards {
            // A shard that stopped on an error returns it below.
            let _ = tx.send(Msg::Finish).await;
            joins.extend(join);
        }
        let mut written = Vec::new();
        let mut failure = None;
        for join in joins {
            match join.await {
                Ok(Ok(files)) => written.extend(files),
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(e) => {
                    failure.get_or_insert(Error::Internal(format!("a writer shard failed: {e}")));
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        written.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(written)
    }
}

impl ShardedWriter {
    /// Abandon the run's open files (the run failed): every shard aborts their uploads
    /// ([`DatasetWriter::abort`]) and lets go of them; files already closed are left to the
    /// run's clean-up.
    pub async fn abort(&mut self) {
        match self.inner.take() {
            Some(Inner::One(mut w)) => w.abort().await,
            Some(Inner::Many { shards, .. }) => {
                let mut joins = Vec::new();
                for Shard { tx, join, .. } in shards {
                    // A shard that stopped on an error has aborted its files itself.
                    let _ = tx.send(Msg::Abort).await;
                    joins.extend(join);
                }
                for join in joins {
                    let _ = join.await;
                }
            }
            None => {}
        }
    }
}

impl Drop for ShardedWriter {
    /// A writer dropped unfinished (the run failed) waits for its shards to let go of their
    /// files, so that the failed run's clean-up, which comes next, sees everything they wrote.
    fn drop(&mut self) {
        if let Some(Inner::Many { shards, .. }) = self.inner.take() {
            for Shard { tx, join, .. } in shards {
                drop(tx);
                if let Some(join) = join {
                    let _ = futures::executor::block_on(join);
                }
            }
        }
    }
}
