//! What a client's requests did, counted as they happen: responses by status, transport
//! errors, retries, throttling and the time it cost, body bytes received. Atomics shared by a
//! client's clones, updated once per response or body chunk (never per line), read once at the
//! end into an [`HttpSummary`] for the run record and the metrics file.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use flatfhir::client::stats::HttpStats;
//! let s = HttpStats::default();
//! s.response(200);
//! s.response(429);
//! s.waited_throttled(Duration::from_millis(1500));
//! let summary = s.summary();
//! assert_eq!((summary.requests, summary.throttled), (2, 1));
//! assert_eq!(summary.status[&429], 1);
//! assert_eq!(summary.throttle_wait_seconds, 1.5);
//! ```

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Status codes counted one by one (100–599); anything else counts as 0.
const CODES: usize = 600;

/// Live counters of one client (see the [module docs](self)).
#[derive(Debug)]
pub struct HttpStats {
    by_status: Box<[AtomicU64]>,
    errors: AtomicU64,
    retries: AtomicU64,
    throttled: AtomicU64,
    throttle_wait_us: AtomicU64,
    bytes: AtomicU64,
}

impl Default for HttpStats {
    fn default() -> Self {
        HttpStats {
            by_status: (0..CODES).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            throttle_wait_us: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }
}

/// Whether a status means "slow down": `429 Too Many Requests` or `503 Service Unavailable`.
pub fn is_throttle(status: u16) -> bool {
    status == 429 || status == 503
}

impl HttpStats {
    /// A response arrived with `status` (throttling statuses are counted as such too).
    pub fn response(&self, status: u16) {
        let i = if (status as usize) < CODES {
            status as usize
        } else {
            0
        };
        self.by_status[i].fetch_add(1, Relaxed);
        if is_throttle(status) {
            self.throttled.fetch_add(1, Relaxed);
        }
    }

    /// A request got no response (connection refused or reset, timeout).
    pub fn transport_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// A request (or a whole file) is being tried again.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// Time spent waiting before a retry because the server throttled.
    pub fn waited_throttled(&self, d: Duration) {
        self.throttle_wait_us
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Body bytes received (as sent: gzip-encoded bytes when the body was).
    pub fn received(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// The figures so far.
    pub fn summary(&self) -> HttpSummary {
        let status: BTreeMap<u16, u64> = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(code, n)| {
                let n = n.load(Relaxed);
                (n > 0).then_some((code as u16, n))
            })
            .collect();
        HttpSummary {
            requests: status.values().sum::<u64>() + self.errors.load(Relaxed),
            status,
            transport_errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
            throttle_wait_seconds: self.throttle_wait_us.load(Relaxed) as f64 / 1e6,
            bytes_received: self.bytes.load(Relaxed),
            ..Default::default()
        }
    }
}

/// What a run's HTTP requests did (part of the run record; all zero for `convert`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpSummary {
    /// Requests sent (responses plus transport errors; each redirect hop counts).
    pub requests: u64,
    /// Responses by HTTP status.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<u16, u64>,
    /// Requests that got no response (refused, reset, timed out).
    pub transport_errors: u64,
    /// Requests and whole files tried again.
    pub retries: u64,
    /// Responses that asked the client to slow down (`429`, `503`).
    pub throttled: u64,
    /// Seconds spent waiting before retries because the server throttled (`Retry-After`
    /// honoured, else backoff).
    pub throttle_wait_seconds: f64,
    /// Body bytes received, as sent (gzip-encoded where the body was).
    pub bytes_received: u64,
    /// The cap on requests in flight (`--max-concurrent-requests`).
    pub max_concurrency: u64,
    /// The lowest the adaptive limit went (equal to the cap when the server never throttled).
    pub min_concurrency: u64,
}
