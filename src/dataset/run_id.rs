//! Run ids. The `export=` partition value of a run is its id, so the id must be unique across
//! every run that will ever share the dataset — two `convert`s started in the same second, or
//! workers on several machines — and sort by start time, because current-state views break
//! ties between versions by it.

use rand::Rng;

/// Random hex digits after the time stamp: 48 bits, so two runs started in the same
/// millisecond collide with a probability of about 2⁻⁴⁸.
const RANDOM_HEX_DIGITS: usize = 12;

/// The identifiers of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIds {
    /// `<UTC stamp with milliseconds>-<12 hex digits>`, e.g. `20261204T173000.123Z-3fa9c1d20b7e`.
    pub run_id: String,
    /// The `export=` partition value: the run id.
    pub export: String,
    /// RFC 3339 start time (milliseconds).
    pub started: String,
}

impl RunIds {
    /// Ids for a run starting now.
    pub fn new() -> Self {
        Self::at(chrono::Utc::now(), &mut rand::rng())
    }

    /// Ids for a run starting at `now`, with the random part from `rng`.
    pub fn at(now: chrono::DateTime<chrono::Utc>, rng: &mut impl Rng) -> Self {
        let random: u64 = rng.random::<u64>() >> (64 - 4 * RANDOM_HEX_DIGITS);
        let run_id = format!(
            "{}-{random:0width$x}",
            now.format("%Y%m%dT%H%M%S%.3fZ"),
            width = RANDOM_HEX_DIGITS
        );
        RunIds {
            export: run_id.clone(),
            run_id,
            started: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }
}

impl RunIds {
    /// The random part of the run id: what part file names carry (the partition directory
    /// already names the run, and object keys stay short).
    pub fn tag(&self) -> &str {
        Self::tag_of(&self.run_id)
    }

    /// The random part of a run id.
    pub fn tag_of(run_id: &str) -> &str {
        run_id.rsplit_once('-').map_or(run_id, |(_, r)| r)
    }
}

impl Default for RunIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn runs_started_at_once_get_distinct_ids_that_sort_by_time() {
        let now = chrono::Utc::now();
        let ids: HashSet<String> = (0..10_000)
            .map(|_| RunIds::at(now, &mut rand::rng()).export)
            .collect();
        assert_eq!(ids.len(), 10_000);
        let a = RunIds::at(now, &mut rand::rng());
        let b = RunIds::at(now + chrono::Duration::milliseconds(1), &mut rand::rng());
        assert!(a.export < b.export, "{} < {}", a.export, b.export);
        assert_eq!(a.run_id, a.export);
        assert_eq!(a.tag().len(), RANDOM_HEX_DIGITS);
        assert!(a.run_id.ends_with(a.tag()));
        assert_eq!(
            a.run_id.len(),
            "20261204T173000.123Z-".len() + RANDOM_HEX_DIGITS
        );
        // Safe as a Hive partition value and a file name.
        assert!(
            a.run_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        );
    }
}
