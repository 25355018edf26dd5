//! `--since auto`: continue from the `transactionTime` of the last published run of the same
//! export.
//!
//! A run covered the changes up to its `transactionTime`, unless it was bounded by `_until`:
//! then it covered only the changes before `until`, and the changes between `until` and its
//! `transactionTime` are still to be fetched. So such a run counts as reaching
//! `min(until, transactionTime)`, one millisecond earlier when `until` is the bound (`_until`
//! takes changes *before* the instant and `_since` those *after* it, so a change at exactly
//! `until` would fall between two runs; fetching a millisecond twice costs nothing, as the
//! current state keeps the newest version of each resource once).

use std::collections::BTreeSet;

use crate::{
    client::ExportRequest,
    dataset::{DatasetError, DatasetLocation, RunManifest},
};

/// `--since auto`: continue from the last published run of the same export.
pub const SINCE_AUTO: &str = "auto";

/// Replace `since: "auto"` ([`SINCE_AUTO`]) by the point the published export runs in
/// `location` from the same server (`base_url`) with the same level, group, `_type` set,
/// `_typeFilter` set, `_elements` set and `patient` set reached: the newest `transactionTime`, or
/// for a run bounded by `_until` the earlier of the two (see this module's docs); with no
/// such run `since` is cleared and the export is a full one. Any other request is returned
/// unchanged.
pub async fn resolve_since_auto(
    location: &DatasetLocation,
    base_url: &str,
    mut request: ExportRequest,
) -> Result<ExportRequest, DatasetError> {
    if request.since.as_deref() != Some(SINCE_AUTO) {
        return Ok(request);
    }
    let runs = RunManifest::list(location).await?;
    match covered_until(&runs, base_url, &request) {
        Some(t) => {
            tracing::info!(
                since = %t,
                "--since auto: continuing from where the last run of this export ended"
            );
            request.since = Some(t);
        }
        None => {
            tracing::info!(
                "--since auto: no earlier run of this export in the dataset; full export"
            );
            request.since = None;
        }
    }
    Ok(request)
}

/// The furthest point that the export runs of the same population from `base_url` reached:
/// the greatest of their `transactionTime`s, each one taken as `until` minus a millisecond when
/// the run was bounded by an earlier `_until`. The instant is returned as the run recorded it
/// when it is a `transactionTime`.
fn covered_until(runs: &[RunManifest], base_url: &str, request: &ExportRequest) -> Option<String> {
    let base = base_url.trim_end_matches('/');
    runs.iter()
        .filter(|r| r.kind == "export")
        .filter(|r| r.source.as_deref().map(|s| s.trim_end_matches('/')) == Some(base))
        .filter(|r| {
            r.request
                .as_ref()
                .is_some_and(|q| same_population(q, request))
        })
        .filter_map(reached_at)
        .max_by_key(|(at, _)| *at)
        .map(|(_, t)| t)
}

/// Where `--since auto` starts after export run `run` (see [`resolve_since_auto`]): its
/// `transactionTime`, or `until` minus a millisecond when the run was bounded by an earlier
/// `_until`; `None` when it has no readable `transactionTime` (or `until`: such a run proves
/// nothing).
pub fn reached(run: &RunManifest) -> Option<String> {
    reached_at(run).map(|(_, t)| t)
}

fn reached_at(r: &RunManifest) -> Option<(chrono::DateTime<chrono::FixedOffset>, String)> {
    let t = r.transaction_time.as_deref()?;
    let at = chrono::DateTime::parse_from_rfc3339(t).ok()?;
    match r.request.as_ref().and_then(|q| q.until.as_deref()) {
        None => Some((at, t.to_string())),
        Some(u) => {
            let until = chrono::DateTime::parse_from_rfc3339(u).ok()?;
            if until > at {
                Some((at, t.to_string()))
            } else {
                let before = until - chrono::Duration::milliseconds(1);
                let text = before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                Some((before, text))
            }
        }
    }
}

/// Same server-side population: level (and group), `_type`, `_typeFilter`, `_elements` (a run
/// with other `_elements` holds other, partial resources) and `patient`, as sets.
fn same_population(a: &ExportRequest, b: &ExportRequest) -> bool {
    fn set(v: &[String]) -> BTreeSet<&str> {
        v.iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
    a.level() == b.level()
        && set(&a.types) == set(&b.types)
        && set(&a.type_filters) == set(&b.type_filters)
        && set(&a.elements) == set(&b.elements)
        && set(&a.patients) == set(&b.patients)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ExportLevel;

    fn run(base: &str, req: ExportRequest, tt: &str) -> RunManifest {
        RunManifest {
            kind: "export".into(),
            source: Some(base.into()),
            request: Some(req),
            transaction_time: Some(tt.into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_newest_run_of_the_same_population_wins() {
        let group = |g: &str, types: &[&str]| ExportRequest {
            level: Some(ExportLevel::Group(g.into())),
            types: types.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        let runs = [
            run(
                "http://h/fhir",
                group("a", &["Patient", "Observation"]),
                "2026-01-01T00:00:00Z",
            ),
            run(
                "http://h/fhir/",
                group("a", &["Observation", "Patient"]),
                "2026-02-01T00:00:00+01:00",
            ),
            run(
                "http://h/fhir",
                group("b", &["Patient", "Observation"]),
                "2026-03-01T00:00:00Z",
            ),
            run(
                "http://other/fhir",
                group("a", &["Patient", "Observation"]),
                "2026-04-01T00:00:00Z",
            ),
        ];
        let want = group("a", &["Patient", "Observation"]);
        assert_eq!(
            covered_until(&runs, "http://h/fhir", &want).as_deref(),
            Some("2026-02-01T00:00:00+01:00")
        );
        assert_eq!(
            covered_until(&runs, "http://h/fhir", &group("a", &["Patient"])),
            None
        );
    }

    #[test]
    fn until_bounds_a_run_and_elements_make_another_population() {
        let all = ExportRequest::default();
        let until = |u: &str| ExportRequest {
            until: Some(u.into()),
            ..Default::default()
        };
        let full = run("http://h/fhir", all.clone(), "2024-01-01T00:00:00Z");
        // A later run bounded by `_until`: it reached its `until` only (a millisecond before).
        let runs = [
            full.clone(),
            run(
                "http://h/fhir",
                until("2025-01-01T00:00:00Z"),
                "2026-01-01T00:00:00Z",
            ),
        ];
        assert_eq!(
            covered_until(&runs, "http://h/fhir", &all).as_deref(),
            Some("2024-12-31T23:59:59.999Z")
        );
        // An `until` before the full run's transactionTime adds nothing.
        let runs = [
            full.clone(),
            run(
                "http://h/fhir",
                until("2020-01-01T00:00:00Z"),
                "2026-01-01T00:00:00Z",
            ),
        ];
        assert_eq!(
            covered_until(&runs, "http://h/fhir", &all).as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        // An `until` after the transactionTime bounds nothing.
        let runs = [run(
            "http://h/fhir",
            until("2030-01-01T00:00:00Z"),
            "2026-01-01T00:00:00Z",
        )];
        assert_eq!(
            covered_until(&runs, "http://h/fhir", &all).as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        // A subsetted run (`_elements`) is another population, both ways.
        let ids = ExportRequest {
            elements: vec!["id".into()],
            ..Default::default()
        };
        let runs = [
            full,
            run("http://h/fhir", ids.clone(), "2026-01-01T00:00:00Z"),
        ];
        assert_eq!(
            covered_until(&runs, "http://h/fhir", &all).as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        assert_eq!(
            covered_until(&runs, "http://h/fhir", &ids).as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
    }
}
