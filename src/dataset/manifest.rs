//! The run record (`_runs/<run id>.json`): what a run read, wrote and rejected, and which Delta
//! commits hold it. Written last, after the tables' commits ([`RunManifest::publish`]); the
//! commits, not the record, are what make rows visible.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{DatasetError, DatasetLocation, PUBLISHING_DIR, RUNS_DIR, RunIds};
use crate::{
    client::{ExportRequest, HttpSummary},
    flatten::TypeCounts,
    view::ViewRegistry,
};

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A file written by a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    /// View (table) name.
    pub view: String,
    /// Path relative to the dataset root.
    pub path: String,
    /// Rows.
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
    /// Delta statistics (`numRecords`, min/max, null counts) from the file's footer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
}

/// What `<view>_latest` needs to know about a view: the resource type it reads, the column
/// holding the resource id and the column holding `meta.lastUpdated`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ViewKey {
    /// FHIR resource type.
    pub resource: String,
    /// Column with the resource id (`getResourceKey()`), if the view has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_column: Option<String>,
    /// Column with `meta.lastUpdated`, if the view has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_column: Option<String>,
}

/// New Group members found by a Group export with `_since` (the IG's "Group membership"
/// pattern): their whole history was fetched by `runs` (runs of their own, `patient` = the new
/// members, no `_since`) before the run that holds this record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Backfill {
    /// Members the Group has now.
    pub members: u64,
    /// Members no earlier run of the same Group export brought.
    pub new_members: u64,
    /// Run ids of the backfill runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<String>,
}

/// One input of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InputRecord {
    /// Path or URL.
    pub source: String,
    /// Bytes read (decompressed).
    pub bytes: u64,
    /// Lines read.
    pub lines: u64,
    /// Lines rejected.
    pub rejects: u64,
}

/// Wall-clock seconds a run spent in each phase. Phases can overlap: with partial manifests,
/// downloads start while the server's job is still polled.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PhaseSeconds {
    /// Exports: the kick-off request, retries included (0 for a resumed job).
    pub kick_off: f64,
    /// Exports: polling the status URL until the manifest was complete.
    pub poll: f64,
    /// Downloading and decoding into staged parts (exports: from the complete manifest until
    /// the last file is staged; `convert`: reading and decoding the files).
    pub decode: f64,
    /// Exports: rewriting the small parts of many small files into larger ones.
    pub coalesce: f64,
    /// The Delta commits to the history tables.
    pub commit: f64,
    /// Merging the run into the current-state tables.
    pub current_state: f64,
}

impl PhaseSeconds {
    /// Every phase with its name (as in the JSON record), in pipeline order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("kick_off", self.kick_off),
            ("poll", self.poll),
            ("decode", self.decode),
            ("coalesce", self.coalesce),
            ("commit", self.commit),
            ("current_state", self.current_state),
        ]
    }
}

/// How a run went, for schedulers and dashboards: durations, bytes and what its HTTP requests
/// did. (All zero in records written before flatfhir kept these figures.)
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RunMetrics {
    /// Seconds from the run's start to its record (a resumed export counts from its first
    /// start).
    pub duration_seconds: f64,
    /// Seconds per phase.
    pub phases: PhaseSeconds,
    /// Bytes of ndjson read (decompressed).
    pub bytes_read: u64,
    /// Exports: requests, responses by status, retries, throttling, bytes received.
    pub http: HttpSummary,
}

/// Everything about one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunManifest {
    /// Unique run id.
    pub run_id: String,
    /// Value of the `export` partition column.
    pub export: String,
    /// RFC 3339 start time.
    pub started: String,
    /// RFC 3339 end time.
    pub finished: String,
    /// `convert` or `export`.
    pub kind: String,
    /// flatfhir version.
    pub flatfhir_version: String,
    /// Inputs read.
    pub inputs: Vec<InputRecord>,
    /// Per resource type: lines = rows + rejects + filtered.
    pub types: BTreeMap<String, TypeCounts>,
    /// Rows per view.
    pub views: BTreeMap<String, u64>,
    /// Blank lines skipped.
    pub blank_lines: u64,
    /// Total rejected lines.
    pub rejects: u64,
    /// Resources that one view (not their type's base view) failed on: that view has no rows
    /// of them, every other view has; a `_rejects` row names the view.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub view_rejects: u64,
    /// Cells whose valid FHIR value a typed column holds inexactly (a decimal rounded to the
    /// column's scale, a timestamp to the microsecond; null when out of range): the rows are
    /// written, and the exact text stays in the raw `resource` column or a `_text` companion.
    #[serde(default)]
    pub inexact_cells: u64,
    /// Files written, relative to the dataset root.
    pub files: Vec<WrittenFile>,
    /// For exports: the FHIR base URL the data came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// For exports: the manifest's `transactionTime` (the next `_since`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_time: Option<String>,
    /// For exports: OperationOutcome issues in the server's error files, by severity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outcomes: BTreeMap<String, u64>,
    /// For exports: deleted resources listed by the server.
    #[serde(default)]
    pub deleted: u64,
    /// Warnings (e.g. a file's `count` that did not match the lines read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// For exports: the kick-off request (`--since auto` looks for runs with the same level,
    /// group, types and filters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<ExportRequest>,
    /// Resource type and key columns of every view written (for `<view>_latest`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub view_keys: BTreeMap<String, ViewKey>,
    /// The Delta version of each table that holds this run's rows (its commit).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub committed: BTreeMap<String, u64>,
    /// RFC 3339 time at which the last of the run's commits was made (`query --as-of <run>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<String>,
    /// The current-state tables (`<view>_latest`) this run merged into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current: Vec<String>,
    /// A full snapshot (`export --snapshot`): resources of the exported types that earlier runs
    /// of the same export brought and this one did not are removed from the current state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
    /// Types the export asked for (`_type`) that the access token does not grant reading: the
    /// server may have left them out, so a snapshot run removes none of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_granted: Vec<String>,
    /// A Group export with `_since`: the members that joined since earlier runs and the runs
    /// that fetched their whole history first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<Backfill>,
    /// Per resource type: resources a snapshot run removed from the current state because the
    /// export no longer held them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshot_removed: BTreeMap<String, u64>,
    /// Durations, bytes and HTTP figures.
    #[serde(default)]
    pub metrics: RunMetrics,
}

impl RunManifest {
    /// A finished run's manifest from what it read and wrote (finish time: now).
    pub fn finished(
        kind: &str,
        RunIds {
            run_id,
            export,
            started,
        }: RunIds,
        stats: crate::flatten::DecodeStats,
        inputs: Vec<InputRecord>,
        files: Vec<WrittenFile>,
    ) -> RunManifest {
        let bytes_read = inputs.iter().map(|i| i.bytes).sum();
        RunManifest {
            metrics: RunMetrics {
                bytes_read,
                ..Default::default()
            },
            run_id,
            export,
            started,
            finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            kind: kind.to_string(),
            flatfhir_version: env!("CARGO_PKG_VERSION").into(),
            inputs,
            rejects: stats.rejects(),
            view_rejects: stats.view_rejects,
            inexact_cells: stats.inexact_cells,
            types: stats.types,
            views: stats.view_rows,
            blank_lines: stats.blank_lines,
            files,
            ..Default::default()
        }
    }

    /// Record the resource type and key columns of the views this run wrote, including the
    /// generic tables of resource types that no view reads (`id`, `last_updated`).
    pub fn with_view_keys(mut self, registry: &ViewRegistry) -> Self {
        let written: BTreeSet<&str> = self.files.iter().map(|f| f.view.as_str()).collect();
        for name in written {
            let Some(view) = registry.get(name) else {
                let generic = self.types.keys().find(|t| {
                    crate::view::snake_case(t) == name && registry.views_for(t).next().is_none()
                });
                if let Some(t) = generic {
                    self.view_keys.insert(
                        name.to_string(),
                        ViewKey {
                            resource: t.clone(),
                            id_column: Some("id".into()),
                            last_updated_column: Some("last_updated".into()),
                        },
                    );
                }
                continue;
            };
            let column = |path: &str| {
                view.columns()
                    .iter()
                    .find(|c| !c.collection && c.path.replace(' ', "") == path)
                    .map(|c| c.name.clone())
            };
            self.view_keys.insert(
                name.to_string(),
                ViewKey {
                    resource: view.resource().to_string(),
                    id_column: column("getResourceKey()").or_else(|| column("id")),
                    last_updated_column: column("meta.lastUpdated"),
                },
            );
        }
        self
    }

    /// Relative path of this run's manifest.
    pub fn path(run_id: &str) -> String {
        format!("{RUNS_DIR}/{run_id}.json")
    }

    /// Write the run record (accounting; the Delta commits are what make rows visible).
    pub async fn write_record(&self, loc: &DatasetLocation) -> Result<(), DatasetError> {
        loc.put_json(&Self::path(&self.run_id), self).await
    }

    /// Publish a finished run: one Delta commit per table (skipping tables that already hold
    /// the run, so a resumed or retried publish adds nothing twice), then the current-state
    /// tables merged, then the run record (which says which tables are committed).
    ///
    /// Runs that were killed while they published are finished first ([`Self::finish_interrupted`]).
    /// Between its first commit and its record a run is in two places at once: its rows are in
    /// the history tables, its merge into the current-state tables may be half done. So a run
    /// other than an export (which has its job record and `--resume`) first leaves a copy of
    /// its record under `_publishing/`, with a lease renewed while it publishes; the next run
    /// of the dataset that finds the copy with no live lease finishes publishing it.
    pub async fn publish(&mut self, loc: &DatasetLocation) -> Result<(), DatasetError> {
        Self::finish_interrupted(loc).await;
        if self.kind == "export" {
            return self.publish_now(loc).await;
        }
        let (path, lease) = Self::publishing_paths(&self.run_id);
        // The lease first: whoever sees the record's copy sees it held.
        let guard = super::job::hold_lease(loc, lease).await?;
        loc.put_json(&path, self).await?;
        let r = self.publish_now(loc).await;
        // A run that failed before any table held it is not finished later: it failed, and
        // leaves nothing visible. One that some table holds is (it is visible already).
        let keep = r.is_err() && self.held_anywhere(loc).await;
        if !keep {
            loc.delete(&path).await;
        }
        guard.release().await;
        loc.remove_empty_dir(PUBLISHING_DIR).await;
        r
    }

    /// The copy of a run's record while it publishes, and its lease.
    fn publishing_paths(run_id: &str) -> (String, String) {
        (
            format!("{PUBLISHING_DIR}/{run_id}.json"),
            format!("{PUBLISHING_DIR}/{run_id}.lease"),
        )
    }

    /// Whether some table of the run holds it (committed), or the answer is unknown.
    async fn held_anywhere(&self, loc: &DatasetLocation) -> bool {
        let tables: BTreeSet<&str> = self.files.iter().map(|f| f.view.as_str()).collect();
        for table in tables {
            match loc.open_table(table).await {
                Ok(Some(t)) => {
                    if super::delta::holds_run(&t, &self.export)
                        .await
                        .unwrap_or(true)
                    {
                        return true;
                    }
                }
                Ok(None) => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// Finish publishing the runs that were killed while they published (their record copies
    /// under `_publishing/` with no live lease), oldest first: commit what is not committed yet,
    /// merge them into the current-state tables and write their records. A run that cannot be
    /// finished now is left for the next time, with a warning; it does not stop this one.
    pub async fn finish_interrupted(loc: &DatasetLocation) {
        let pending: Vec<RunManifest> = match loc.list_json_shallow(PUBLISHING_DIR).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for runs interrupted while publishing");
                return;
            }
        };
        let mut pending = pending;
        pending.sort_by(|a, b| (&a.started, &a.run_id).cmp(&(&b.started, &b.run_id)));
        for mut run in pending {
            let (path, lease) = Self::publishing_paths(&run.run_id);
            let published = loc
                .get_json_opt::<serde_json::Value>(&Self::path(&run.run_id))
                .await;
            if matches!(published, Ok(Some(_))) {
                loc.delete(&path).await;
                continue;
            }
            // Claimed with a conditional put: of two runs that find it at once, one finishes it;
            // a live holder (the run itself, still publishing) keeps it.
            let guard = match super::job::claim_lease(loc, lease, &run.run_id).await {
                Ok(Ok(g)) => g,
                Ok(Err(_)) => continue,
                Err(e) => {
                    tracing::warn!(run = %run.run_id, error = %e, "could not claim an interrupted run");
                    continue;
                }
            };
            tracing::warn!(
                run = %run.run_id,
                "finishing the publication of a run that was interrupted while it published"
            );
            match run.publish_now(loc).await {
                Ok(()) => loc.delete(&path).await,
                Err(e) => tracing::warn!(
                    run = %run.run_id,
                    error = %e,
                    "could not finish publishing an interrupted run; the next run tries again"
                ),
            }
            guard.release().await;
        }
        loc.remove_empty_dir(PUBLISHING_DIR).await;
    }

    /// [`Self::publish`] without the bookkeeping of interrupted runs.
    async fn publish_now(&mut self, loc: &DatasetLocation) -> Result<(), DatasetError> {
        let t0 = std::time::Instant::now();
        let (committed, created) = super::delta::commit_run(loc, self).await?;
        self.committed = committed;
        self.metrics.phases.commit = t0.elapsed().as_secs_f64();
        tracing::info!(
            run = %self.run_id,
            tables = self.committed.len(),
            seconds = t0.elapsed().as_secs_f32(),
            "committed the run's rows to the history tables"
        );
        let t1 = std::time::Instant::now();
        let mut keys = BTreeMap::new();
        let mut snapshot = None;
        if self.deleted > 0 || self.snapshot {
            // Tombstones and snapshots can remove resources of types this run wrote no row of.
            let runs = Self::list(loc).await?;
            if self.snapshot {
                snapshot = Some(self.snapshot_scope(&runs));
            }
            for run in runs {
                keys.extend(run.view_keys);
            }
        }
        keys.extend(self.view_keys.clone());
        let (current, removed) =
            super::current::update_current(loc, self, &keys, snapshot.as_ref(), &created).await?;
        self.current = current;
        self.snapshot_removed = removed;
        self.metrics.phases.current_state = t1.elapsed().as_secs_f64();
        tracing::info!(
            run = %self.run_id,
            tables = self.current.len(),
            seconds = t1.elapsed().as_secs_f32(),
            "merged the run into the current-state tables"
        );
        let now = chrono::Utc::now();
        self.published = Some(now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        if let Ok(started) = chrono::DateTime::parse_from_rfc3339(&self.started) {
            self.metrics.duration_seconds =
                (now - started.with_timezone(&chrono::Utc)).as_seconds_f64();
        }
        self.write_record(loc).await
    }

    /// What a snapshot run removes from: the runs of the same export before it (same server,
    /// level and group, whatever their `_since`, types or filters) and the types it covers
    /// (those it asked for with `_type`, else those it read).
    pub fn snapshot_scope(&self, runs: &[RunManifest]) -> super::current::SnapshotScope {
        let scope = |r: &RunManifest| {
            let q = r.request.as_ref()?;
            Some((
                r.source.as_deref()?.trim_end_matches('/').to_string(),
                q.level(),
            ))
        };
        let ours = scope(self);
        let runs = runs
            .iter()
            .filter(|r| r.kind == "export" && r.run_id != self.run_id && r.export < self.export)
            .filter(|r| ours.is_some() && scope(r) == ours)
            .map(|r| r.export.clone())
            .collect();
        let asked = self
            .request
            .as_ref()
            .map(|q| q.types.clone())
            .unwrap_or_default();
        let types = if asked.is_empty() {
            self.types.keys().cloned().collect()
        } else {
            asked
                .into_iter()
                .filter(|t| !self.not_granted.contains(t))
                .collect()
        };
        super::current::SnapshotScope { runs, types }
    }

    /// Every published run of a dataset, oldest first.
    pub async fn list(loc: &DatasetLocation) -> Result<Vec<RunManifest>, DatasetError> {
        let mut runs: Vec<RunManifest> = loc.list_json(RUNS_DIR).await?;
        runs.sort_by(|a, b| (&a.started, &a.run_id).cmp(&(&b.started, &b.run_id)));
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(view: &str, path: &str, rows: u64) -> WrittenFile {
        WrittenFile {
            view: view.into(),
            path: path.into(),
            rows,
            bytes: 1,
            stats: None,
        }
    }

    #[test]
    fn records_written_before_metrics_still_read() {
        let old = r#"{"run_id":"r","export":"e","started":"2024-01-01T00:00:00Z",
            "finished":"2024-01-01T00:00:01Z","kind":"convert","flatfhir_version":"0.1.0",
            "inputs":[],"types":{},"views":{},"blank_lines":0,"rejects":0,"files":[]}"#;
        let m: RunManifest = serde_json::from_str(old).unwrap();
        assert_eq!(m.metrics, RunMetrics::default());
        let round: RunManifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(round, m);
    }

    #[test]
    fn view_keys_name_the_id_and_last_updated_columns() {
        let registry = ViewRegistry::builtin().unwrap();
        let m = RunManifest {
            files: vec![
                file("patient", "patient/export=1/p.parquet", 1),
                file("patient_name", "patient_name/export=1/p.parquet", 1),
                file("_rejects", "_rejects/export=1/p.parquet", 1),
            ],
            ..Default::default()
        }
        .with_view_keys(&registry);
        assert_eq!(
            m.view_keys["patient"],
            ViewKey {
                resource: "Patient".into(),
                id_column: Some("id".into()),
                last_updated_column: Some("last_updated".into()),
            }
        );
        assert_eq!(
            m.view_keys["patient_name"].id_column.as_deref(),
            Some("patient_id")
        );
        assert_eq!(m.view_keys["patient_name"].last_updated_column, None);
        assert!(!m.view_keys.contains_key("_rejects"));

        // A type no view reads lands in its generic table, which gets keys too.
        let m = RunManifest {
            files: vec![file("task", "task/export=1/p.parquet", 1)],
            types: [("Task".to_string(), TypeCounts::default())].into(),
            ..Default::default()
        }
        .with_view_keys(&registry);
        assert_eq!(
            m.view_keys["task"],
            ViewKey {
                resource: "Task".into(),
                id_column: Some("id".into()),
                last_updated_column: Some("last_updated".into()),
            }
        );
    }
}
