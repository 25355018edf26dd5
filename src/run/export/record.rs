//! The run record of a finished export.

use std::collections::BTreeMap;

use url::Url;

use crate::{
    dataset::{FileKind, FileState, InputRecord, JobRecord, RunIds, RunManifest, WrittenFile},
    flatten::DecodeStats,
    view::ViewRegistry,
};

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
                if super::files::is_short(rec.kind, rec.count, &rec.stats) {
                    short.push(shown.clone());
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
    // A resource missing from a short file is not gone from the server: a snapshot that holds
    // one removes nothing.
    let snapshot = job.snapshot && short.is_empty();
    if job.snapshot && !snapshot {
        let w = format!(
            "snapshot: nothing removed from the current state, since {} held fewer resources \
             than the manifest's count: {}",
            if short.len() == 1 { "a file" } else { "files" },
            short.join(", ")
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
