//! The run driver: the one read → decode → write loop that every command composes.
//!
//! ```text
//!  Input (file │ file range │ HTTP body over a bounded channel)
//!    └─► decode thread × N (blocking pool): sniff gzip, inflate in 1 MiB pieces, Decoder,
//!        rejects into bounded `_rejects` batches, progress counters
//!          └─► mpsc<ViewBatch>(bounded) ─► BatchSink on a blocking thread (Parquet encoding
//!                                           off the I/O runtime; the store's I/O stays on it)
//! ```
//!
//! * [`Driver`] — runs inputs through decoders into a [`BatchSink`], with cancellation and the
//!   per-input accounting (lines = rows + rejects, per type).
//! * [`input`] — the inputs, gzip sniffing, file splitting.
//! * [`convert`], [`export`], [`view`] — the commands, each a short composition of the driver,
//!   the client and the dataset protocol.
//! * [`metrics`] — the run summary in the Prometheus text format (`--metrics-file`).
//!
//! Before, each command had its own copy of this loop, and the copies had drifted: an export
//! kept every reject of a file in memory until the file ended, and its progress never counted
//! rejects. Now there is one loop, and one bound for all.

pub mod convert;
mod driver;
pub mod export;
pub mod input;
pub mod metrics;
pub mod view;

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

pub use driver::{BatchSink, Decoded, Driver, DriverBuilder, WindDown};
pub use input::{DEFAULT_CHUNK_BYTES, DEFAULT_SPLIT_BYTES, Input, expand_inputs};

/// A stop request from outside: Ctrl-C (SIGINT), or SIGTERM, what schedulers and container
/// runtimes (cron's killers, systemd, Kubernetes evicting a pod) send before they kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// Ctrl-C.
    Interrupt,
    /// SIGTERM.
    Terminate,
}

/// The first Ctrl-C or SIGTERM. Both handlers are installed at the first poll, and from then on,
/// for the life of the process, neither signal stops it by itself. An error installing one leaves
/// that signal to its default action (stop the process).
pub async fn stop_signal() -> StopSignal {
    let interrupt = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => StopSignal::Interrupt,
            Err(_) => std::future::pending().await,
        }
    };
    let terminate = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                term.recv().await;
                return StopSignal::Terminate;
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        s = interrupt => s,
        s = terminate => s,
    }
}

/// Live counters of a run, for progress display (updated once per chunk or file, never per
/// line).
#[derive(Debug, Default)]
pub struct Progress {
    /// Input bytes read (compressed size for gzip input).
    pub bytes: AtomicU64,
    /// Lines decoded.
    pub lines: AtomicU64,
    /// Inputs (files) finished.
    pub files: AtomicU64,
    /// Lines rejected.
    pub rejects: AtomicU64,
    /// The most rejected lines one decoder held before handing them out as a batch: what bounds
    /// the memory of a file of bad lines.
    pub largest_reject_batch: AtomicU64,
    /// The largest piece of (inflated) input handed to a decoder at once.
    pub largest_chunk: AtomicU64,
    /// Files announced so far (exports: from the manifest; 0 when unknown).
    pub files_total: AtomicU64,
    /// A short state line (exports: "kicked off", the server's X-Progress, "downloading").
    pub state: Mutex<String>,
    /// Rows of finished files per resource type (updated once per file).
    pub rows_by_type: Mutex<BTreeMap<String, u64>>,
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

    /// Count from zero again (an export that abandoned its job and starts a new one): what the
    /// abandoned job read is no longer part of the run. The largest reject batch and chunk,
    /// which bound memory rather than count the run, stay.
    pub fn start_over(&self) {
        for c in [
            &self.bytes,
            &self.lines,
            &self.files,
            &self.rejects,
            &self.files_total,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        if let Ok(mut g) = self.rows_by_type.lock() {
            g.clear();
        }
    }

    /// The value of a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_over_forgets_the_counts_not_the_bounds() {
        let p = Progress::default();
        for c in [&p.bytes, &p.lines, &p.files, &p.rejects, &p.files_total] {
            c.store(7, Ordering::Relaxed);
        }
        p.largest_chunk.store(1 << 20, Ordering::Relaxed);
        p.add_rows("Patient", 3);
        p.start_over();
        assert_eq!(Progress::get(&p.lines) + Progress::get(&p.bytes), 0);
        assert_eq!(Progress::get(&p.files) + Progress::get(&p.files_total), 0);
        assert_eq!(Progress::get(&p.rejects), 0);
        assert_eq!(p.rows_summary(5), "");
        assert_eq!(Progress::get(&p.largest_chunk), 1 << 20);
    }
}
