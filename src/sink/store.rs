//! Output locations: a URL or path resolved once into an object store plus a prefix.

use std::sync::Arc;

use object_store::{ObjectStore, local::LocalFileSystem, path::Path};
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

    /// `prefix/child`.
    pub fn child(&self, rel: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }
}
