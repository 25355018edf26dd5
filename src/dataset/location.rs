//! Output locations: a URL or path resolved once into an object store plus a prefix.
//!
//! | Location | Store | Credentials and endpoint |
//! |---|---|---|
//! | `out`, `/abs/out`, `file:///abs/out` | [`LocalFileSystem`] (created when writing) | — |
//! | `s3://bucket/prefix` | Amazon S3 or any S3-compatible server | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, … |
//! | `gs://bucket/prefix` | Google Cloud Storage | `GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_APPLICATION_CREDENTIALS`, … |
//! | `az://container/prefix`, `abfss://container@account.dfs.core.windows.net/prefix` | Azure Blob Storage / ADLS Gen2 | `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, … |
//! | `memory://name/prefix` | an in-process [`InMemory`] store, the same for every location with that `name` (tests) | — |
//!
//! Cloud stores read their standard environment variables (object_store's `from_env`), then the
//! explicit options (`--store-option KEY=VALUE`, e.g. `aws_endpoint=http://127.0.0.1:9000`,
//! `aws_allow_http=true`), which win. An option the store does not know is an error, not silently
//! ignored. Requests are retried by object_store (5xx, 429, connection errors; ten retries with
//! backoff within three minutes by default).
//!
//! # Example
//! ```
//! use flatfhir::dataset::DatasetLocation;
//! let loc = DatasetLocation::resolve("memory://doc/datasets/nightly", false).unwrap();
//! assert_eq!(loc.url.as_str(), "memory://doc/datasets/nightly/");
//! assert_eq!(loc.child("_runs/x.json").as_ref(), "datasets/nightly/_runs/x.json");
//!
//! let opts = [("aws_endpoint".to_string(), "http://127.0.0.1:9000".to_string())];
//! let s3 = DatasetLocation::resolve_with_options("s3://bucket/out", &opts, false).unwrap();
//! assert_eq!(s3.prefix.as_ref(), "out");
//! assert!(DatasetLocation::resolve_with_options("s3://b/o", &[("nope".into(), "1".into())], false).is_err());
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use futures::TryStreamExt;
use object_store::{
    ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload, local::LocalFileSystem,
    memory::InMemory, path::Path,
};
use serde::{Serialize, de::DeserializeOwned};
use url::Url;

use super::DatasetError;

/// Where a dataset lives.
#[derive(Debug, Clone)]
pub struct DatasetLocation {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Prefix of the dataset inside the store.
    pub prefix: Path,
    /// The dataset root as a URL ending in `/` (`file:///abs/dir/`, `s3://bucket/prefix/`).
    pub url: Url,
}

impl DatasetLocation {
    /// Resolve a location (see the [module docs](self)) with no store options; a local directory
    /// is created when `create` is set.
    pub fn resolve(location: &str, create: bool) -> Result<Self, DatasetError> {
        Self::resolve_with_options(location, &[], create)
    }

    /// Resolve a location with store options (`KEY=VALUE` pairs as in object_store's config keys,
    /// case-insensitive, e.g. `aws_endpoint`, `aws_allow_http`, `aws_access_key_id`). Pure: no
    /// request is sent; a local directory is created when `create` is set.
    pub fn resolve_with_options(
        location: &str,
        options: &[(String, String)],
        create: bool,
    ) -> Result<Self, DatasetError> {
        let err = |message: String| DatasetError::Location {
            location: location.to_string(),
            message,
        };
        // `C:\data` parses as a URL with scheme `c`: only multi-letter schemes are URLs.
        let url = Url::parse(location).ok().filter(|u| u.scheme().len() > 1);
        match url {
            None => Self::local(
                location,
                std::path::PathBuf::from(location),
                options,
                create,
            ),
            Some(u) if u.scheme() == "file" => {
                let path = u
                    .to_file_path()
                    .map_err(|()| err("not a local file URL".into()))?;
                Self::local(location, path, options, create)
            }
            Some(u) => Self::remote(location, u, options),
        }
    }

    fn local(
        location: &str,
        path: std::path::PathBuf,
        options: &[(String, String)],
        create: bool,
    ) -> Result<Self, DatasetError> {
        let err = |message: String| DatasetError::Location {
            location: location.to_string(),
            message,
        };
        if let Some((k, _)) = options.first() {
            return Err(err(format!(
                "store option {k:?} given, but a local directory takes no options"
            )));
        }
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

    fn remote(
        location: &str,
        mut url: Url,
        options: &[(String, String)],
    ) -> Result<Self, DatasetError> {
        let err = |message: String| DatasetError::Location {
            location: location.to_string(),
            message,
        };
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        if url.scheme() == "memory" {
            let prefix = Path::from_url_path(url.path()).map_err(|e| err(e.to_string()))?;
            return Ok(DatasetLocation {
                store: memory_store(url.host_str().unwrap_or_default()),
                prefix,
                url,
            });
        }
        let (scheme, prefix) = ObjectStoreScheme::parse(&url).map_err(|e| err(e.to_string()))?;
        let store = cloud_store(scheme, &url, options).map_err(err)?;
        Ok(DatasetLocation { store, prefix, url })
    }

    /// Write a JSON document at `rel` (atomically: a put is all or nothing).
    pub async fn put_json(&self, rel: &str, value: &impl Serialize) -> Result<(), DatasetError> {
        let body = serde_json::to_vec_pretty(value).map_err(|source| DatasetError::Manifest {
            path: rel.to_string(),
            source,
        })?;
        self.store
            .put(&self.child(rel), PutPayload::from(body))
            .await
            .map_err(|source| DatasetError::Store {
                path: rel.to_string(),
                source,
            })?;
        Ok(())
    }

    /// Write a JSON document at `rel` unless an object is there already; `false` when one is.
    /// A store without conditional puts writes it anyway (and says `true`).
    pub async fn put_json_if_absent(
        &self,
        rel: &str,
        value: &impl Serialize,
    ) -> Result<bool, DatasetError> {
        let body = serde_json::to_vec_pretty(value).map_err(|source| DatasetError::Manifest {
            path: rel.to_string(),
            source,
        })?;
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        let store_err = |source| DatasetError::Store {
            path: rel.to_string(),
            source,
        };
        match self
            .store
            .put_opts(&self.child(rel), PutPayload::from(body.clone()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                self.store
                    .put(&self.child(rel), PutPayload::from(body))
                    .await
                    .map_err(store_err)?;
                Ok(true)
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// Delete the object at `rel`, best effort: one that is not there is fine, any other
    /// failure is logged (what is left is bookkeeping the next run cleans up).
    pub async fn delete(&self, rel: &str) {
        match self.store.delete(&self.child(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(path = rel, error = %e, "could not delete"),
        }
    }

    /// Remove the directory `rel` of a dataset on the local file system if it is empty, best
    /// effort. A local store creates the directories of the objects it writes but leaves them
    /// when their last object is deleted, so bookkeeping directories (`_publishing/`,
    /// `_jobs/<run id>/`) would stay behind empty after every run. Only an empty directory
    /// goes: a writer putting an object there meanwhile keeps it (its staged file is in it) or,
    /// finding it gone, creates it again. Object stores have no directories: nothing to do.
    pub async fn remove_empty_dir(&self, rel: &str) {
        if let Some(root) = self.local_dir() {
            let _ = tokio::fs::remove_dir(root.join(rel)).await;
        }
    }

    /// Read every `*.json` document under the directory `rel` (none when it does not exist).
    pub async fn list_json<T: DeserializeOwned>(&self, rel: &str) -> Result<Vec<T>, DatasetError> {
        let metas: Vec<_> = self
            .store
            .list(Some(&self.child(rel)))
            .try_collect()
            .await
            .map_err(|source| DatasetError::Store {
                path: rel.to_string(),
                source,
            })?;
        let mut out = Vec::new();
        for m in metas
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".json"))
        {
            out.push(self.get_json(&m.location).await?);
        }
        Ok(out)
    }

    /// Read the `*.json` documents directly in the directory `rel`, not in its subdirectories.
    pub async fn list_json_shallow<T: DeserializeOwned>(
        &self,
        rel: &str,
    ) -> Result<Vec<T>, DatasetError> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.child(rel)))
            .await
            .map_err(|source| DatasetError::Store {
                path: rel.to_string(),
                source,
            })?;
        let mut out = Vec::new();
        for m in listing
            .objects
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".json"))
        {
            out.push(self.get_json(&m.location).await?);
        }
        Ok(out)
    }

    /// Read the JSON document at `rel`; `None` when there is none.
    pub async fn get_json_opt<T: DeserializeOwned>(
        &self,
        rel: &str,
    ) -> Result<Option<T>, DatasetError> {
        match self.get_json(&self.child(rel)).await {
            Ok(v) => Ok(Some(v)),
            Err(DatasetError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, location: &Path) -> Result<T, DatasetError> {
        let path = location.to_string();
        let store_err = |source| DatasetError::Store {
            path: path.clone(),
            source,
        };
        let bytes = self
            .store
            .get(location)
            .await
            .map_err(store_err)?
            .bytes()
            .await
            .map_err(store_err)?;
        serde_json::from_slice(&bytes).map_err(|source| DatasetError::Manifest { path, source })
    }

    /// The location as a user writes it: a local folder's path, else the URL.
    pub fn for_humans(&self) -> String {
        match self.local_dir() {
            Some(dir) => dir.display().to_string(),
            None => self.url.to_string(),
        }
    }

    /// The dataset's directory when it is on the local file system: what a killed process's
    /// unfinished writes (`LocalFileSystem` writes to `<path>#<n>` and renames on completion)
    /// can only be found and removed through, since the store's listings skip them.
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        (self.url.scheme() == "file")
            .then(|| self.url.to_file_path().ok())
            .flatten()
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

/// The object store of a cloud URL, `options` applied through the builder's `with_config`
/// (unknown keys rejected). The error is the message for [`DatasetError::Location`].
#[cfg(feature = "cloud")]
fn cloud_store(
    scheme: ObjectStoreScheme,
    url: &Url,
    options: &[(String, String)],
) -> Result<Arc<dyn ObjectStore>, String> {
    use object_store::{
        aws::{AmazonS3Builder, AmazonS3ConfigKey},
        azure::{AzureConfigKey, MicrosoftAzureBuilder},
        gcp::{GoogleCloudStorageBuilder, GoogleConfigKey},
        http::HttpBuilder,
    };
    let err = |m: String| m;
    /// Apply `options` through a builder's `with_config`, rejecting unknown keys.
    macro_rules! configure {
        ($builder:expr, $key:ty) => {{
            let mut b = $builder;
            for (k, v) in options {
                let key: $key = k.to_ascii_lowercase().parse().map_err(|_| {
                    err(format!(
                        "unknown store option {k:?} for {}://",
                        url.scheme()
                    ))
                })?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err(e.to_string()))?) as Arc<dyn ObjectStore>
        }};
    }
    let store = match scheme {
        ObjectStoreScheme::AmazonS3 => configure!(
            AmazonS3Builder::from_env().with_url(url.as_str()),
            AmazonS3ConfigKey
        ),
        ObjectStoreScheme::GoogleCloudStorage => configure!(
            GoogleCloudStorageBuilder::from_env().with_url(url.as_str()),
            GoogleConfigKey
        ),
        ObjectStoreScheme::MicrosoftAzure => configure!(
            MicrosoftAzureBuilder::from_env().with_url(url.as_str()),
            AzureConfigKey
        ),
        ObjectStoreScheme::Http => {
            if let Some((k, _)) = options.first() {
                return Err(err(format!("store option {k:?}: http(s) takes no options")));
            }
            let root = format!("{}://{}", url.scheme(), url.authority());
            Arc::new(
                HttpBuilder::new()
                    .with_url(root)
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            ) as Arc<dyn ObjectStore>
        }
        _ => {
            return Err(err(format!(
                "unsupported scheme {}:// (use a path, file://, s3://, gs://, az://, abfss:// or memory://)",
                url.scheme()
            )));
        }
    };
    Ok(store)
}

/// Without the `cloud` feature only local folders and `memory://` are stores.
#[cfg(not(feature = "cloud"))]
fn cloud_store(
    _scheme: ObjectStoreScheme,
    url: &Url,
    _options: &[(String, String)],
) -> Result<Arc<dyn ObjectStore>, String> {
    Err(format!(
        "{}:// needs flatfhir built with the `cloud` feature",
        url.scheme()
    ))
}

/// The in-process store named `name` (one per name for the life of the process).
fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    stores.entry(name.to_string()).or_default().clone()
}
