//! New Group members (the IG's informative "Group membership" pattern, §1.8).
//!
//! A Group export with `_since` returns only what changed after it, so a patient who joined the
//! Group since the last run arrives with the resources changed since then and without their
//! older history. Before such a run flatfhir
//!
//! 1. asks for the members the Group has now: a Group export of `_type=Patient&_elements=id`
//!    (no `_since`), whose lines are read for their ids only and never reach the dataset;
//! 2. compares them with the Patient ids that earlier runs of the same Group export (same
//!    server, same Group) brought into the Patient history table;
//! 3. fetches the whole history of the new members in runs of their own (POST, one `patient`
//!    parameter per member, no `_since`, [`BACKFILL_CHUNK`] members per run), published before
//!    the `_since` run, which records them ([`Backfill`]).
//!
//! The backfill runs have a `patient` set, so `--since auto` never continues from them; the
//! `_since` run may bring some of the same resources again, and the newer run's copy wins in the
//! current state (the same rows). Members who left the Group keep their rows; a `--snapshot`
//! run of the Group removes them from the current state.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use serde::Deserialize;

use super::{ExportBuilder, Tasks, parse_url, poll};
use crate::{
    Result,
    client::{BulkClient, ClientError, ExportLevel, ExportRequest},
    dataset::{Backfill, RunManifest, ViewKey},
    run::Progress,
};

/// New members whose history one backfill run fetches (one `patient` parameter each).
pub const BACKFILL_CHUNK: usize = 500;
/// Largest member-list file read (after inflation): ~10 million ids.
const MAX_MEMBER_FILE: usize = 512 << 20;

/// Whether a request is one whose new members are looked for: a Group export with `_since`
/// over the whole Group (no `patient` set).
pub(super) fn wants_backfill(request: &ExportRequest) -> Option<&str> {
    match &request.level {
        Some(ExportLevel::Group(g)) if request.since.is_some() && request.patients.is_empty() => {
            Some(g)
        }
        _ => None,
    }
}

/// Find the Group's new members and fetch their whole history (see the module docs). `None`
/// when no earlier run of this Group export is in the dataset (nothing to compare with).
pub(super) async fn backfill(
    b: &ExportBuilder,
    group: &str,
    progress: &Progress,
) -> Result<Option<Backfill>> {
    let base = b.client.base().as_str().trim_end_matches('/').to_string();
    let runs = RunManifest::list(&b.location).await?;
    let same: Vec<&RunManifest> = runs
        .iter()
        .filter(|r| r.kind == "export")
        .filter(|r| r.source.as_deref().map(|s| s.trim_end_matches('/')) == Some(base.as_str()))
        .filter(|r| {
            r.request
                .as_ref()
                .is_some_and(|q| q.level() == ExportLevel::Group(group.to_string()))
        })
        .collect();
    if same.is_empty() {
        tracing::warn!(
            group,
            "no earlier run of this Group export in the dataset: new members cannot be told apart (run a full export first)"
        );
        return Ok(None);
    }
    let mut keys: BTreeMap<String, ViewKey> = BTreeMap::new();
    for r in &same {
        keys.extend(r.view_keys.clone());
    }
    let exports: Vec<String> = same.iter().map(|r| r.export.clone()).collect();
    let Some(seen) =
        crate::dataset::current::resource_ids(&b.location, &keys, "Patient", &exports).await?
    else {
        tracing::warn!(
            group,
            "earlier runs of this Group export wrote no Patient rows: new members cannot be told apart"
        );
        return Ok(None);
    };
    progress.set_state("listing the Group's members");
    let members = member_ids(&b.client, group, progress).await?;
    let mut new: Vec<String> = members
        .iter()
        .filter(|m| !seen.contains(m.as_str()))
        .cloned()
        .collect();
    new.sort();
    tracing::info!(
        group,
        members = members.len(),
        new = new.len(),
        "Group members compared with earlier runs"
    );
    let mut record = Backfill {
        members: members.len() as u64,
        new_members: new.len() as u64,
        runs: Vec::new(),
    };
    for (i, chunk) in new.chunks(BACKFILL_CHUNK).enumerate() {
        progress.set_state(format!(
            "fetching the history of {} new Group members ({}/{})",
            chunk.len(),
            i + 1,
            new.len().div_ceil(BACKFILL_CHUNK)
        ));
        let request = ExportRequest {
            since: None,
            patients: chunk.iter().map(|id| format!("Patient/{id}")).collect(),
            post: true,
            ..b.request.clone()
        };
        let mut options = b.options.clone();
        options.backfill = false;
        let run = ExportBuilder::new(b.client.clone(), b.registry.clone(), b.location.clone())
            .with_request(request)
            .with_options(options)
            .with_progress(b.progress.clone());
        let summary = Box::pin(run.run()).await?;
        record.runs.push(summary.manifest.run_id);
    }
    Ok(Some(record))
}

/// The ids of the Group's members: a `_type=Patient&_elements=id` Group export, read for ids.
async fn member_ids(
    client: &BulkClient,
    group: &str,
    progress: &Progress,
) -> Result<HashSet<String>> {
    let request = ExportRequest {
        level: Some(ExportLevel::Group(group.to_string())),
        types: vec!["Patient".into()],
        elements: vec!["id".into()],
        ..Default::default()
    };
    let status = client.kick_off(&request).await?;
    let mut tasks = Tasks::new();
    let pages = poll::poll_until_complete(client, &status, progress, |_, _| {}, &mut tasks).await?;
    let mut ids = HashSet::new();
    for page in &pages {
        for item in &page.output {
            if item.type_.as_deref().is_some_and(|t| t != "Patient") {
                continue;
            }
            let url = parse_url(&item.url)?;
            let body = read_capped(client, &url, page.requires_access_token).await?;
            ids.extend(patient_ids(&body));
        }
    }
    if let Err(e) = client.delete(&status).await {
        tracing::debug!(error = %e, "DELETE of the member-list job failed (ignored)");
    }
    Ok(ids)
}

/// A whole (small) file, inflated, at most [`MAX_MEMBER_FILE`] bytes.
async fn read_capped(client: &BulkClient, url: &url::Url, requires_token: bool) -> Result<Vec<u8>> {
    let too_big = || ClientError::Protocol {
        url: crate::client::error_redact(url),
        message: format!("a member-list file over {} MiB", MAX_MEMBER_FILE >> 20),
    };
    let mut download = client.download(url, requires_token).await?;
    let gzip = download.gzip();
    let mut body = Vec::new();
    while let Some(chunk) = download.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > MAX_MEMBER_FILE {
            return Err(too_big().into());
        }
        body.extend_from_slice(&chunk);
    }
    if !gzip && !body.starts_with(&[0x1f, 0x8b]) {
        return Ok(body);
    }
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(&body[..])
        .take(MAX_MEMBER_FILE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ClientError::Protocol {
            url: crate::client::error_redact(url),
            message: format!("gzip: {e}"),
        })?;
    if out.len() > MAX_MEMBER_FILE {
        return Err(too_big().into());
    }
    Ok(out)
}

/// The ids of the Patient lines of an ndjson body (other lines, and lines that do not parse,
/// are skipped: the list only decides whose history to fetch).
fn patient_ids(body: &[u8]) -> impl Iterator<Item = String> + '_ {
    #[derive(Deserialize)]
    struct Line<'a> {
        #[serde(rename = "resourceType", borrow)]
        resource_type: Option<&'a str>,
        id: Option<String>,
    }
    body.split(|b| *b == b'\n').filter_map(|line| {
        let line = line.strip_prefix(b"\xef\xbb\xbf").unwrap_or(line);
        let l: Line = serde_json::from_slice(line).ok()?;
        (l.resource_type == Some("Patient")).then_some(l.id?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_patient_lines_only() {
        let body =
            b"\xef\xbb\xbf{\"resourceType\":\"Patient\",\"id\":\"a\",\"meta\":{\"tag\":[]}}\n\
            {\"resourceType\":\"Group\",\"id\":\"g\"}\n\nnot json\n{\"resourceType\":\"Patient\"}\n\
            {\"resourceType\":\"Patient\",\"id\":\"b\"}";
        let ids: Vec<String> = patient_ids(body).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn only_whole_group_exports_with_since_look_for_new_members() {
        let group = |since: Option<&str>, patients: &[&str]| ExportRequest {
            level: Some(ExportLevel::Group("g".into())),
            since: since.map(Into::into),
            patients: patients.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(wants_backfill(&group(Some("2020-01-01"), &[])), Some("g"));
        assert_eq!(wants_backfill(&group(None, &[])), None);
        assert_eq!(
            wants_backfill(&group(Some("2020-01-01"), &["Patient/1"])),
            None
        );
        let system = ExportRequest {
            since: Some("2020-01-01".into()),
            ..Default::default()
        };
        assert_eq!(wants_backfill(&system), None);
    }
}
