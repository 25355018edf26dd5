//! The run record of a finished export.

use std::collections::BTreeMap;

use url::Url;

use crate::{
    dataset::{FileKind, FileState, InputRecord, JobRecord, RunIds, RunManifest, WrittenFile},
    flatten::DecodeStats,
    view::ViewRegistry,
};

/// Why an output file may not hold every resource the server listed in it, if it may not:
/// fewer resources than its manifest `count`, rejected lines (a resource that could not be read
/// is not a resource the server deleted), or resources of another type than the manifest's (an
/// OperationOutcome or an error page answered in place of the file). A snapshot run that holds
/// such a file removes nothing.
fn unsure(rec: &crate::dataset::FileRecord) -> Option<String> {
    if super::files::is_short(rec.kind, rec.count, &rec.stats) {
        return Some(format!(
            "{} of the manifest's {} resources",
            rec.stats.lines - rec.stats.blank_lines,
            rec.count.unwrap_or_default()
        ));
    }
    let rejects = rec.stats.rejects();
    if rejects > 0 {
        return Some(format!("{rejects} rejected lines"));
    }
    let other: Vec<&str> = rec
        .stats
        .types
        .iter()
        .filter(|(t, c)| c.lines > 0 && rec.resource_type.as_deref().is_some_and(|r| r != *t))
        .map(|(t, _)| t.as_str())
        .collect();
    (!other.is_empty()).then(|| {
        format!(
            "{} resources in a {} file",
            other.join(", "),
            rec.resource_type.as_deref().unwrap_or_default()
        )
    })
}

/// The run record of a job whose files are all committed (its parts: `files`), and whether the
/// server reported fatal or error issues.
pub(super) fn run_record(
    job: &JobRecord,
    registry: &ViewRegistry,
    mut files: Vec<WrittenFile>,
) -> (RunManifest, bool) {
    let mut stats = DecodeStats::default();
    let mut inputs = Vec::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut deleted = 0;
    let mut warnings = Vec::new();
    let mut short = Vec::new();
    for (url, rec) in &job.files {
        debug_assert_eq!(rec.state, FileState::Committed);
        let shown = Url::parse(url)
            .map(|u| crate::client::error_redact(&u))
            .unwrap_or_else(|_| url.clone());
        match rec.kind {
            FileKind::Output => {
                stats.merge(&rec.stats);
                let lines = rec.stats.lines - rec.stats.blank_lines;
                if let Some(c) = rec.count.filter(|c| *c != lines) {
                    let w = format!("{shown}: manifest count {c} but {lines} lines read");
                    tracing::warn!("{w}");
                    warnings.push(w);
                }
                if let Some(why) = unsure(rec) {
                    short.push(format!("{shown} ({why})"));
                }
                inputs.push(InputRecord {
                    source: shown,
                    bytes: rec.stats.bytes,
                    lines: rec.stats.lines,
                    rejects: rec.stats.rejects(),
                });
            }
            FileKind::Deleted => {
                deleted += rec
                    .stats
                    .view_rows
                    .get(crate::dataset::DELETED_TABLE)
                    .copied()
                    .unwrap_or(0);
            }
            FileKind::Error => {
                for (k, v) in &rec.outcomes {
                    *outcomes.entry(k.clone()).or_default() += v;
                }
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    // A resource missing from a file that was not read whole is not gone from the server: a
    // snapshot that holds one removes nothing.
    let snapshot = job.snapshot && short.is_empty();
    if job.snapshot && !snapshot {
        let w = format!(
            "snapshot: nothing removed from the current state, since {} may not hold every \
             resource the server has: {}",
            if short.len() == 1 { "a file" } else { "files" },
            short.join("; ")
        );
        tracing::warn!("{w}");
        warnings.push(w);
    }
    let server_errors = outcomes.get("fatal").is_some_and(|n| *n > 0)
        || outcomes.get("error").is_some_and(|n| *n > 0);
    let ids = RunIds {
        run_id: job.run_id.clone(),
        export: job.export.clone(),
        started: job.started.clone(),
    };
    let manifest = RunManifest {
        source: Some(job.base_url.clone()),
        transaction_time: job.transaction_time.clone(),
        outcomes,
        deleted,
        warnings,
        request: Some(job.request.clone()),
        snapshot,
        backfill: job.backfill.clone(),
        ..RunManifest::finished("export", ids, stats, inputs, files)
    }
    .with_view_keys(registry);
    (manifest, server_errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dataset::FileRecord, flatten::TypeCounts};

    fn file(count: Option<u64>, types: &[(&str, u64, u64)]) -> FileRecord {
        let mut stats = DecodeStats::default();
        for (t, lines, rejects) in types {
            stats.lines += lines;
            stats.types.insert(
                t.to_string(),
                TypeCounts {
                    lines: *lines,
                    rows: lines - rejects,
                    rejects: *rejects,
                    filtered: 0,
                },
            );
        }
        FileRecord {
            url: "http://h/1.ndjson".into(),
            kind: FileKind::Output,
            resource_type: Some("Patient".into()),
            state: FileState::Committed,
            parts: Vec::new(),
            stats,
            count,
            outcomes: BTreeMap::new(),
            refreshed_url: None,
        }
    }

    /// A file read whole, of its manifest type, with no reject, is sure; every other one says why
    /// it is not (a snapshot run holding it removes nothing).
    #[test]
    fn files_that_may_miss_resources_are_unsure() {
        assert_eq!(unsure(&file(Some(3), &[("Patient", 3, 0)])), None);
        assert_eq!(unsure(&file(None, &[("Patient", 3, 0)])), None);
        let why = |f: FileRecord| unsure(&f).unwrap_or_default();
        assert_eq!(
            why(file(Some(3), &[("Patient", 2, 0)])),
            "2 of the manifest's 3 resources"
        );
        assert_eq!(why(file(None, &[("Patient", 3, 1)])), "1 rejected lines");
        assert_eq!(
            why(file(None, &[("OperationOutcome", 1, 0)])),
            "OperationOutcome resources in a Patient file"
        );
    }
}
