//! Output locations: a URL or path resolved once into an object store plus a prefix.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, local::LocalFileSystem, path::Path};
use serde::{Serialize, de::DeserializeOwned};
use url::Url;

use super::SinkError;

/// Where a dataset lives.
#[derive(Debug, Clone)]
pub struct DatasetLocation {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Prefix of the dataset inside the store.
    pub prefix: Path,
    /// The dataset root as a URL (`file:///abs/dir/`), for DataFusion.
    pub url: Url,
}

impl DatasetLocation {
    /// Resolve a local path or `file://` URL; creates the directory when `create` is set.
    pub fn resolve(location: &str, create: bool) -> Result<Self, SinkError> {
        let err = |message: String| SinkError::Location {
            location: location.to_string(),
            message,
        };
        let path = if let Some(rest) = location.strip_prefix("file://") {
            std::path::PathBuf::from(rest)
        } else if location.contains("://") {
            return Err(err(
                "only local paths and file:// URLs are supported so far".into(),
            ));
        } else {
            std::path::PathBuf::from(location)
        };
        if create {
            std::fs::create_dir_all(&path).map_err(|e| err(e.to_string()))?;
        }
        let abs = std::fs::canonicalize(&path).map_err(|e| err(e.to_string()))?;
        if !abs.is_dir() {
            return Err(err("not a directory".into()));
        }
        let store = LocalFileSystem::new_with_prefix(&abs).map_err(|e| err(e.to_string()))?;
        let url = Url::from_directory_path(&abs).map_err(|_| err("not an absolute path".into()))?;
        Ok(DatasetLocation {
            store: Arc::new(store),
            prefix: Path::default(),
            url,
        })
    }

    /// Write a JSON document at `rel` (atomically: a put is all or nothing).
    pub async fn put_json(&self, rel: &str, value: &impl Serialize) -> Result<(), SinkError> {
        let body = serde_json::to_vec_pretty(value).map_err(|source| SinkError::Manifest {
            path: rel.to_string(),
            source,
        })?;
        self.store
            .put(&self.child(rel), PutPayload::from(body))
            .await
            .map_err(|source| SinkError::Store {
                path: rel.to_string(),
                source,
            })?;
        Ok(())
    }

    /// Read every `*.json` document under the directory `rel` (none when it does not exist).
    pub async fn list_json<T: DeserializeOwned>(&self, rel: &str) -> Result<Vec<T>, SinkError> {
        let metas: Vec<_> = self
            .store
            .list(Some(&self.child(rel)))
            .try_collect()
            .await
            .map_err(|source| SinkError::Store {
                path: rel.to_string(),
                source,
            })?;
        let mut out = Vec::new();
        for m in metas
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".json"))
        {
            let path = m.location.to_string();
            let store_err = |source| SinkError::Store {
                path: path.clone(),
                source,
            };
            let bytes = self
                .store
                .get(&m.location)
                .await
                .map_err(store_err)?
                .bytes()
                .await
                .map_err(store_err)?;
            out.push(
                serde_json::from_slice(&bytes)
                    .map_err(|source| SinkError::Manifest { path, source })?,
            );
        }
        Ok(out)
    }

    /// `prefix/child`.
    pub fn child(&self, rel: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }
}
