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
        match location.open_table(name).await {
            Ok(Some(t)) if super::delta::holds_run(&t, export).await.unwrap_or(true) => {
                deleted.committed.push(name.to_string());
                continue;
            }
            // A current-state table's merges carry their own app id, not the run's, and a
            // version of it may read the run's partition (a merge of the run that committed
            // before the run failed): its files stay. What a merge that never committed wrote
            // there is unreferenced and harmless.
            Ok(Some(_)) if name.ends_with(super::current::LATEST_SUFFIX) => continue,
            // Unknown: keep everything.
            Err(_) => continue,
            _ => {}
        }
        let (objects, bytes) = delete_partition(location, name, export).await;
        deleted.objects += objects;
        deleted.bytes += bytes;
    }
    deleted
}

/// Delete what a killed process left half-written under run `export`'s partitions of a local
/// dataset: `LocalFileSystem` writes a file as `<path>#<n>` and renames it when complete, and no
/// listing shows the unfinished ones, so neither the run's own clean-up nor a VACUUM would
/// ever remove them. Only for a run no live process writes (a resumed job holds its lease).
/// Returns the files removed.
pub async fn sweep_unfinished_local(location: &DatasetLocation, export: &str) -> usize {
    let Some(root) = location.local_dir() else {
        return 0;
    };
    if !is_plain_name(export) {
        return 0;
    }
    let partition = format!("{}={export}", super::PARTITION_COLUMN);
    tokio::task::spawn_blocking(move || {
        let mut removed = 0;
        let Ok(tables) = std::fs::read_dir(&root) else {
            return 0;
        };
        for t in tables.flatten() {
            let Ok(files) = std::fs::read_dir(t.path().join(&partition)) else {
                continue;
            };
            for f in files.flatten() {
                if is_unfinished_write(&f.file_name().to_string_lossy())
                    && std::fs::remove_file(f.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    })
    .await
    .unwrap_or(0)
}

/// `LocalFileSystem`'s name for a file being written: `<name>#<digits>`.
fn is_unfinished_write(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(stem, n)| {
        !stem.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Delete everything under `<table>/export=<export>/`, on a local disk also what no listing
/// shows (half-written `<part>#<n>` files); returns the objects and bytes deleted (best
/// effort).
pub(crate) async fn delete_partition(
    location: &DatasetLocation,
    table: &str,
    export: &str,
) -> (usize, u64) {
    let mut deleted = (0, 0);
    let dir = location.child(&format!("{table}/{}={export}", super::PARTITION_COLUMN));
    let objects: Vec<_> = match location.store.list(Some(&dir)).try_collect().await {
        Ok(v) => v,
        Err(_) => return deleted,
    };
    for o in objects {
        if location.store.delete(&o.location).await.is_ok() {
            deleted.0 += 1;
            deleted.1 += o.size;
        }
    }
    if let Some(root) = location.local_dir()
        && is_plain_name(table)
        && is_plain_name(export)
    {
        let table_dir = root.join(table);
        let dir = table_dir.join(format!("{}={export}", super::PARTITION_COLUMN));
        if let Ok((objects, bytes)) = tokio::task::spawn_blocking(move || {
            let removed = remove_local_dir(&dir);
            // A table the failed run created (no Delta log, no other run): nothing of it is
            // left behind either. Only an empty directory goes; another writer's new partition
            // in it keeps it (and a writer whose directory vanished creates it again).
            let _ = std::fs::remove_dir(&table_dir);
            removed
        })
        .await
        {
            deleted.0 += objects;
            deleted.1 += bytes;
        }
    }
    deleted
}

/// A run id usable as one path component (no separator, not `.` or `..`).
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Remove a local partition directory with whatever the store's listing did not show (a killed
/// process's unfinished `<part>#<n>` writes); returns the files and bytes removed.
fn remove_local_dir(dir: &std::path::Path) -> (usize, u64) {
    let mut files = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    if std::fs::remove_file(e.path()).is_ok() {
                        files.0 += 1;
                        files.1 += len;
                    }
                }
                Err(_) => {}
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed process's unfinished local write (`<part>#<n>`, which no listing shows) goes
    /// with the run's other files; another run's partition stays.
    #[tokio::test]
    async fn discarding_a_run_removes_its_unfinished_local_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = DatasetLocation::resolve(tmp.path().to_str().unwrap(), true).unwrap();
        let run = tmp
            .path()
            .join("patient/export=20261205T144207.043Z-cb2c857482e1");
        let other = tmp
            .path()
            .join("patient/export=20261204T010101.000Z-aaaaaaaaaaaa");
        for d in [&run, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("part-0.parquet"), b"1234").unwrap();
        }
        std::fs::write(run.join("part-1.parquet.staged#1"), b"123456").unwrap();
        let d = discard_run(&loc, "20261205T144207.043Z-cb2c857482e1").await;
        assert_eq!((d.objects, d.bytes), (2, 10), "{d:?}");
        assert!(!run.exists(), "the run's partition goes");
        assert!(other.join("part-0.parquet").exists());
        assert!(is_unfinished_write("part-1.parquet.staged#12"));
        assert!(!is_unfinished_write("part-1.parquet") && !is_unfinished_write("a#b1"));
        // A run id that is not one path component is never joined into a path.
        assert!(!is_plain_name("../x") && !is_plain_name("..") && !is_plain_name("a/b"));
        // The other run keeps the table's directory; a table only the failed run wrote
        // (a failed first run) leaves no empty directory behind.
        assert!(tmp.path().join("patient").is_dir());
        let only = tmp
            .path()
            .join("observation/export=20261205T144207.043Z-cb2c857482e1");
        std::fs::create_dir_all(&only).unwrap();
        std::fs::write(only.join("part-0.parquet"), b"1").unwrap();
        discard_run(&loc, "20261205T144207.043Z-cb2c857482e1").await;
        assert!(!tmp.path().join("observation").exists());
        assert!(tmp.path().join("patient").is_dir());
    }
}
