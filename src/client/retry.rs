//! Retry policy as data: bounded attempts, decorrelated-jitter backoff, `Retry-After` parsing.

use std::time::{Duration, SystemTime};

/// Default attempts for one request (kick-off, poll, file) before giving up.
pub const DEFAULT_MAX_RETRIES: u32 = 6;
/// Default first backoff.
pub const DEFAULT_BASE_BACKOFF: Duration = Duration::from_secs(1);
/// Default longest backoff between retries.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(120);
/// Default longest wait between two status polls, whatever `Retry-After` says.
pub const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_secs(300);
/// Default shortest wait a server's `Retry-After` can ask for (`Retry-After: 0` or a date in the
/// past would otherwise make the client poll as fast as it can): the IG's recommended floor.
pub const DEFAULT_MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How requests are retried and polls spaced.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Retries of one request (default [`DEFAULT_MAX_RETRIES`]).
    pub max_retries: u32,
    /// First backoff (default [`DEFAULT_BASE_BACKOFF`]).
    pub base: Duration,
    /// Longest backoff (default [`DEFAULT_MAX_BACKOFF`]).
    pub max_backoff: Duration,
    /// Longest poll interval (default [`DEFAULT_MAX_POLL_INTERVAL`]).
    pub max_poll_interval: Duration,
    /// Shortest wait a `Retry-After` can ask for (default [`DEFAULT_MIN_POLL_INTERVAL`]).
    pub min_poll_interval: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: DEFAULT_MAX_RETRIES,
            base: DEFAULT_BASE_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_poll_interval: DEFAULT_MAX_POLL_INTERVAL,
            min_poll_interval: DEFAULT_MIN_POLL_INTERVAL,
        }
    }
}

impl RetryConfig {
    /// Decorrelated jitter: next = random(base, prev * 3), capped.
    pub fn next_backoff(&self, prev: Duration) -> Duration {
        let lo = self.base.as_secs_f64();
        let hi = (prev.as_secs_f64() * 3.0).max(lo * 1.5);
        let pick = lo + rand::random::<f64>() * (hi - lo);
        Duration::from_secs_f64(pick.min(self.max_backoff.as_secs_f64()))
    }

    /// Clamp a server-requested wait to `[min_poll_interval, max_poll_interval]`.
    pub fn clamp_poll(&self, d: Duration) -> Duration {
        d.min(self.max_poll_interval).max(self.min_poll_interval)
    }
}

/// Parse `Retry-After`: delta-seconds or an HTTP-date. Garbage and absurd values (such as an
/// epoch timestamp sent as seconds) give `None`, so the caller falls back to backoff.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = v.parse().ok()?;
        // More than 30 days is not a delay but a mistake (e.g. an absolute epoch).
        return (secs <= 30 * 86_400).then(|| Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("1700000000", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_is_bounded() {
        let c = RetryConfig {
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            ..Default::default()
        };
        let mut d = c.base;
        for _ in 0..50 {
            d = c.next_backoff(d);
            assert!(d >= c.base && d <= c.max_backoff, "{d:?}");
        }
        assert_eq!(
            c.clamp_poll(Duration::from_secs(10_000)),
            c.max_poll_interval
        );
        // `Retry-After: 0` waits a second, not `base / 10`.
        assert_eq!(c.clamp_poll(Duration::ZERO), Duration::from_secs(1));
    }
}
