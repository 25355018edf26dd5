//! Staged parts: an export writes each downloaded file's parts under a staged name
//! (`<path>.staged`, which no reader lists), records them in the job record, and only then
//! renames them visible, so a file's rows are committed exactly once even when the run is killed
//! between the two steps (`--resume` rolls the rename forward).

use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use super::{DatasetError, DatasetLocation, STAGED_SUFFIX, WrittenFile};

/// Make staged files visible (rename `<path>.staged` → `<path>`). Idempotent: a file already
/// renamed (a resumed run rolling a commit forward) is skipped.
pub async fn commit_staged(
    location: &DatasetLocation,
    files: &[WrittenFile],
) -> Result<(), DatasetError> {
    for f in files {
        let from = location.child(&format!("{}{STAGED_SUFFIX}", f.path));
        let to = location.child(&f.path);
        match location.store.rename(&from, &to).await {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) if location.store.head(&to).await.is_ok() => {
            }
            Err(source) => {
                return Err(DatasetError::Store {
                    path: f.path.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Delete the staged files of an abandoned attempt (best effort).
pub async fn discard_staged(location: &DatasetLocation, files: &[WrittenFile]) {
    for f in files {
        let _ = location
            .store
            .delete(&location.child(&format!("{}{STAGED_SUFFIX}", f.path)))
            .await;
    }
}

/// What [`discard_run`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Objects deleted.
    pub objects: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Tables that hold the run already (committed before the failure): their files stay.
    pub committed: Vec<String>,
}

/// Delete every object of run `export` under `<table>/export=<export>/` in every table of the
/// dataset that has no commit of the run: what a run that failed before publishing leaves behind
/// (best effort; returns what was deleted). A table that already holds the run keeps its files.
pub async fn discard_run(location: &DatasetLocation, export: &str) -> Discarded {
    let Ok(top) = location
        .store
        .list_with_delimiter(Some(&location.prefix))
        .await
    else {
        return Discarded::default();
    };
    let mut deleted = Discarded::default();
    for table in top.common_prefixes {
        let Some(name) = table.filename() else {
            continue;
        };
        if let Ok(Some(t)) = location.open_table(name).await
            && super::delta::holds_run(&t, export).await.unwrap_or(true)
        {
            deleted.committed.push(name.to_string());
            continue;
        }
        let dir = location.child(&format!("{name}/{}={export}", super::PARTITION_COLUMN));
        let objects: Vec<_> = match location.store.list(Some(&dir)).try_collect().await {
            Ok(v) => v,
            Err(_) => continue,
        };
        for o in objects {
            if location.store.delete(&o.location).await.is_ok() {
                deleted.objects += 1;
                deleted.bytes += o.size;
            }
        }
    }
    deleted
}
