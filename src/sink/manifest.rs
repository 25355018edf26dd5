//! The run manifest (`_runs/<run id>.json`): what a run read, wrote and rejected. Written last —
//! its presence is what makes a run's files visible to `query`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{DatasetLocation, RUNS_DIR, SinkError, WrittenFile};
use crate::flatten::TypeCounts;

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
}

impl RunManifest {
    /// A finished run's manifest from what it read and wrote (finish time: now).
    pub fn finished(
        kind: &str,
        (run_id, export, started): (String, String, String),
        stats: crate::flatten::DecodeStats,
        inputs: Vec<InputRecord>,
        files: Vec<WrittenFile>,
    ) -> RunManifest {
        RunManifest {
            run_id,
            export,
            started,
            finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            kind: kind.to_string(),
            flatfhir_version: env!("CARGO_PKG_VERSION").into(),
            inputs,
            rejects: stats.rejects(),
            types: stats.types,
            views: stats.view_rows,
            blank_lines: stats.blank_lines,
            files,
            ..Default::default()
        }
    }

    /// Relative path of this run's manifest.
    pub fn path(run_id: &str) -> String {
        format!("{RUNS_DIR}/{run_id}.json")
    }

    /// Write the manifest: the last step of a run.
    pub async fn publish(&self, loc: &DatasetLocation) -> Result<(), SinkError> {
        loc.put_json(&Self::path(&self.run_id), self).await
    }

    /// Every published run of a dataset, oldest first.
    pub async fn list(loc: &DatasetLocation) -> Result<Vec<RunManifest>, SinkError> {
        let mut runs: Vec<RunManifest> = loc.list_json(RUNS_DIR).await?;
        runs.sort_by(|a, b| (&a.started, &a.run_id).cmp(&(&b.started, &b.run_id)));
        Ok(runs)
    }
}
