//! `--since auto`: continue from the `transactionTime` of the last published run of the same
//! export.

use std::collections::BTreeSet;

use crate::{
    client::ExportRequest,
    dataset::{DatasetError, DatasetLocation, RunManifest},
};

/// `--since auto`: continue from the last published run of the same export.
pub const SINCE_AUTO: &str = "auto";

/// Replace `since: "auto"` ([`SINCE_AUTO`]) by the `transactionTime` of the newest published
/// export run in `location` from the same server (`base_url`) with the same level, group, `_type`
/// set, `_typeFilter` set and `patient` set; with no such run `since` is cleared and the export is
/// a full one. Any other request is returned unchanged.
pub async fn resolve_since_auto(
    location: &DatasetLocation,
    base_url: &str,
    mut request: ExportRequest,
) -> Result<ExportRequest, DatasetError> {
    if request.since.as_deref() != Some(SINCE_AUTO) {
        return Ok(request);
    }
    let runs = RunManifest::list(location).await?;
    match newest_transaction_time(&runs, base_url, &request) {
        Some(t) => {
            tracing::info!(
                since = t,
                "--since auto: continuing from the last run's transactionTime"
            );
            request.since = Some(t.to_string());
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

/// The greatest `transactionTime` of the export runs of the same population from `base_url`.
fn newest_transaction_time<'r>(
    runs: &'r [RunManifest],
    base_url: &str,
    request: &ExportRequest,
) -> Option<&'r str> {
    let base = base_url.trim_end_matches('/');
    runs.iter()
        .filter(|r| r.kind == "export")
        .filter(|r| r.source.as_deref().map(|s| s.trim_end_matches('/')) == Some(base))
        .filter(|r| {
            r.request
                .as_ref()
                .is_some_and(|q| same_population(q, request))
        })
        .filter_map(|r| {
            let t = r.transaction_time.as_deref()?;
            Some((chrono::DateTime::parse_from_rfc3339(t).ok()?, t))
        })
        .max_by_key(|(at, _)| *at)
        .map(|(_, t)| t)
}

/// Same server-side population: level (and group), `_type`, `_typeFilter` and `patient`, as sets.
fn same_population(a: &ExportRequest, b: &ExportRequest) -> bool {
    fn set(v: &[String]) -> BTreeSet<&str> {
        v.iter().map(String::as_str).collect()
    }
    a.level() == b.level()
        && set(&a.types) == set(&b.types)
        && set(&a.type_filters) == set(&b.type_filters)
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
            newest_transaction_time(&runs, "http://h/fhir", &want),
            Some("2026-02-01T00:00:00+01:00")
        );
        assert_eq!(
            newest_transaction_time(&runs, "http://h/fhir", &group("a", &["Patient"])),
            None
        );
    }
}
