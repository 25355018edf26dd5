//! Politeness towards a shared EHR: a cap on the requests one client has in flight, lowered
//! when the server throttles and raised again as it recovers (AIMD, as TCP does).
//!
//! ```text
//!  request ──► Limiter::acquire (waits while in flight ≥ limit) ──► … response …
//!     429 / 503 ──► limit = max(1, limit / 2)            (multiplicative decrease)
//!     `limit` successes in a row ──► limit = min(cap, limit + 1)   (additive increase)
//!  a file download holds its permit until its body has been read
//! ```
//!
//! Why: the IG leaves a server free to answer `429` when a client pulls too hard, and hospital
//! EHRs share their Bulk Data endpoint with clinical work. A nightly job that keeps hammering a
//! throttled server at full concurrency gets its client id blocked; one that backs off keeps its
//! window. The figures (throttled responses, lowest limit reached) go into the run record.
//!
//! # Example
//!
//! ```
//! use flatfhir::client::limiter::Aimd;
//! let mut a = Aimd::new(8);
//! a.throttled();
//! assert_eq!(a.limit(), 4);
//! for _ in 0..4 {
//!     a.succeeded();
//! }
//! assert_eq!((a.limit(), a.min_limit()), (5, 4));
//! ```

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Default most requests one client has in flight at once (the export's default download
/// concurrency: a client that downloads no more files at once than before is no ruder).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 4;

/// The additive-increase / multiplicative-decrease controller: pure arithmetic, no waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aimd {
    cap: usize,
    limit: usize,
    min: usize,
    successes: usize,
}

impl Aimd {
    /// A controller starting at (and never above) `cap` (at least 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Aimd {
            cap,
            limit: cap,
            min: cap,
            successes: 0,
        }
    }

    /// The server throttled a request: halve the limit (never below 1).
    pub fn throttled(&mut self) {
        self.limit = (self.limit / 2).max(1);
        self.min = self.min.min(self.limit);
        self.successes = 0;
    }

    /// A request succeeded: after `limit` successes in a row (one round at the current limit),
    /// raise the limit by one, up to the cap.
    pub fn succeeded(&mut self) {
        if self.limit >= self.cap {
            return;
        }
        self.successes += 1;
        if self.successes >= self.limit {
            self.limit += 1;
            self.successes = 0;
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The lowest limit so far.
    pub fn min_limit(&self) -> usize {
        self.min
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

#[derive(Debug)]
struct State {
    aimd: Aimd,
    in_flight: usize,
}

/// Requests in flight, limited by an [`Aimd`] controller. Shared by a client's clones.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    freed: Notify,
}

/// A slot of the [`Limiter`], given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.lock().in_flight -= 1;
        self.limiter.freed.notify_waiters();
    }
}

impl Limiter {
    /// A limiter allowing `cap` requests at once until the server throttles.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Limiter {
            state: Mutex::new(State {
                aimd: Aimd::new(cap),
                in_flight: 0,
            }),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere while counting; the counts are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a slot freed in between is not missed.
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.in_flight < s.aimd.limit() {
                    s.in_flight += 1;
                    return Permit {
                        limiter: self.clone(),
                    };
                }
            }
            freed.await;
        }
    }

    /// The server throttled a request (`429`, `503`): halve the limit.
    pub fn throttled(&self) {
        let (before, after) = {
            let mut s = self.lock();
            let before = s.aimd.limit();
            s.aimd.throttled();
            (before, s.aimd.limit())
        };
        if after < before {
            tracing::info!(
                concurrency = after,
                was = before,
                "The server throttles; fewer requests at once."
            );
        }
    }

    /// A request succeeded: maybe raise the limit.
    pub fn succeeded(&self) {
        let raised = {
            let mut s = self.lock();
            let before = s.aimd.limit();
            s.aimd.succeeded();
            s.aimd.limit() > before
        };
        if raised {
            self.freed.notify_waiters();
        }
    }

    /// The controller's state (limit, lowest limit, cap).
    pub fn snapshot(&self) -> Aimd {
        self.lock().aimd.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn aimd_halves_and_climbs_back_one_round_at_a_time() {
        let mut a = Aimd::new(8);
        a.throttled();
        a.throttled();
        assert_eq!((a.limit(), a.min_limit()), (2, 2));
        a.succeeded();
        assert_eq!(a.limit(), 2, "one success is not a round at limit 2");
        a.succeeded();
        assert_eq!(a.limit(), 3);
        for _ in 0..3 {
            a.succeeded();
        }
        assert_eq!(a.limit(), 4);
        a.throttled();
        a.succeeded();
        assert_eq!(a.limit(), 2, "a throttle restarts the run of successes");
        for _ in 0..100 {
            a.succeeded();
        }
        assert_eq!((a.limit(), a.min_limit(), a.cap()), (8, 2, 8));
        let mut one = Aimd::new(0);
        one.throttled();
        assert_eq!((one.limit(), one.cap()), (1, 1), "never below one");
    }

    #[tokio::test]
    async fn the_limiter_holds_requests_back_until_a_slot_is_free() {
        let l = Limiter::new(2);
        let a = l.acquire().await;
        let _b = l.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(third.is_err(), "a third request waits at limit 2");
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        tokio::task::yield_now().await;
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when a slot is freed")
            .unwrap();
        l.throttled();
        assert_eq!(l.snapshot().limit(), 1);
    }
}
