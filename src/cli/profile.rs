//! The config file of `flatfhir export --profile NAME`: named server profiles in TOML.
//!
//! A nightly job should be one short line, `flatfhir export --profile epic-prod`, that a
//! crontab, an Airflow task or a Kubernetes CronJob can hold without forty flags and without a
//! token in the crontab or in `ps` output. A profile holds what the export flags hold. This
//! module finds and reads the file and checks all of it before anything else happens;
//! `export.rs` lays the chosen profile under the command line:
//!
//! ```text
//! command-line flag  >  environment variable (FLATFHIR_*)  >  profile  >  built-in default
//! ```
//!
//! The rules, each for a reason:
//! - **Keys are the export flags' long names, `_` for `-`** (`--max-retries` → `max_retries`,
//!   `--type` → `type`, `--group ID` → `group = "ID"`, `--patients` → `patients = true`), so a
//!   command line and a profile translate one to one. Repeatable flags take arrays; `header` and
//!   `store_option` take tables.
//! - **Secrets only by reference.** A bearer token, a secret header (`Authorization`, `Cookie`,
//!   anything with `token`, `secret`, `password` or `api-key` in its name) or a store credential
//!   is named by an environment variable (`*_env`) or a file (`*_file`), and the private key by
//!   its path. A secret written into the file is refused with the key and line: config files get
//!   copied into repositories, tickets and backups. No message quotes the value of such a key.
//! - **Unknown keys are errors** with file and line: a misspelt `max_retires` must not fall back
//!   to the default silently every night.
//! - **Relative paths are relative to the config file's folder** (`~/` is the home folder):
//!   cron starts in `$HOME`, not where the file is.
//! - **Found without I/O surprises**: `--config FILE`, else `FLATFHIR_CONFIG`, else
//!   `$XDG_CONFIG_HOME/flatfhir/config.toml` (`~/.config/flatfhir/config.toml`), and only when a
//!   profile is named.
//!
//! # Example
//!
//! ```toml
//! [profiles.epic-prod]
//! base_url = "https://ehr.example/fhir"
//! group = "nightly-cohort"
//! type = ["Patient", "Condition", "Observation"]
//! since = "auto"
//! client_id = "flatfhir-prod"
//! private_key = "keys/private-key.pem"        # next to this file
//! out = "s3://warehouse/fhir"
//! store_option = { aws_region = "eu-west-1" }
//! store_option_env = { aws_secret_access_key = "WAREHOUSE_SECRET" }
//! max_retries = 8
//! timeout = "12h"
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    marker::PhantomData,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};

use flatfhir::auth::SigningAlg;

use super::args::{parse_duration, parse_kv, parse_max_line_bytes};

/// The environment variable that names the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "FLATFHIR_CONFIG";
/// The environment variable that names the profile when `--profile` is not given.
pub const PROFILE_ENV: &str = "FLATFHIR_PROFILE";
/// The config file looked for under `$XDG_CONFIG_HOME` (or `~/.config`) when neither `--config`
/// nor `FLATFHIR_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "flatfhir/config.toml";

/// What can be wrong with a config file or a profile: each says which file, and where it can,
/// which line and key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// A profile was named but no config file was given or found.
    #[error(
        "--profile {profile} needs a config file: give --config FILE, set {CONFIG_ENV}, or create {default}"
    )]
    NoConfigFile {
        /// The profile asked for.
        profile: String,
        /// Where the default file would be.
        default: String,
    },
    /// `--config` without `--profile`.
    #[error("--config {path} holds profiles: choose one with --profile NAME (or {PROFILE_ENV})")]
    NoProfile {
        /// The config file.
        path: String,
    },
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The config file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Bad TOML, an unknown key, a bad value or a secret written inline.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The config file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (never the value of a secret).
        message: String,
    },
    /// Settings of one profile that do not go together.
    #[error("{path}: profile {profile}: {message}")]
    Conflict {
        /// The config file.
        path: String,
        /// The profile.
        profile: String,
        /// What is wrong.
        message: String,
    },
    /// No profile of that name.
    #[error("{path}: no profile {name:?} (profiles: {available})")]
    UnknownProfile {
        /// The config file.
        path: String,
        /// The name asked for.
        name: String,
        /// The names the file has.
        available: String,
    },
    /// A secret's reference does not lead to a value.
    #[error("{path}: profile {profile}: {key}: {message}")]
    Secret {
        /// The config file.
        path: String,
        /// The profile.
        profile: String,
        /// The key holding the reference (`bearer_token_env`, `header_file.Authorization`…).
        key: String,
        /// What is wrong (never the secret).
        message: String,
    },
}

/// A config file: its path and its profiles, checked.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

impl ConfigFile {
    /// The config file to read for `profile`: `explicit` (`--config` or `FLATFHIR_CONFIG`, as
    /// clap resolved them), else the default file if it exists.
    pub fn locate(explicit: Option<&Path>, profile: &str) -> Result<PathBuf, ProfileError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        let default = default_path();
        match &default {
            Some(p) if p.is_file() => Ok(p.clone()),
            _ => Err(ProfileError::NoConfigFile {
                profile: profile.into(),
                default: default.map_or_else(
                    || format!("~/.config/{DEFAULT_CONFIG_PATH}"),
                    |p| p.display().to_string(),
                ),
            }),
        }
    }

    /// Read and check a config file.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Check the text of a config file read from `path` (which names it in errors and anchors
    /// its relative paths).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ProfileError> {
        let model: FileModel = toml::from_str(text).map_err(|e| invalid(path, text, &e))?;
        for (name, p) in &model.profiles {
            p.check().map_err(|message| ProfileError::Conflict {
                path: path.display().to_string(),
                profile: name.clone(),
                message,
            })?;
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            profiles: model.profiles,
        })
    }

    /// The profile `name`, its relative paths resolved against the file's folder.
    pub fn profile(mut self, name: &str) -> Result<NamedProfile, ProfileError> {
        let Some(mut profile) = self.profiles.remove(name) else {
            let names: Vec<_> = self.profiles.keys().map(String::as_str).collect();
            return Err(ProfileError::UnknownProfile {
                path: self.path.display().to_string(),
                name: name.into(),
                available: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        };
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        profile.resolve_paths(&dir);
        Ok(NamedProfile {
            path: self.path,
            name: name.into(),
            profile,
        })
    }
}

/// `$XDG_CONFIG_HOME/flatfhir/config.toml`, else `$HOME/.config/flatfhir/config.toml`.
fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".config")))?;
    Some(base.join(DEFAULT_CONFIG_PATH))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A toml error as `file:line:column: message`, without toml's snippet of the source line: the
/// line may hold a secret written inline.
fn invalid(path: &Path, text: &str, e: &toml::de::Error) -> ProfileError {
    let (line, column) = e
        .span()
        .map(|s| line_column(text, s.start))
        .unwrap_or((1, 1));
    let mut message = e.message().trim().to_string();
    if message.starts_with("unknown field")
        && let Some(cut) = message.find(", expected")
    {
        message.truncate(cut);
        message.push_str(
            " (keys are the long flags of `flatfhir export`, `_` for `-`; see `flatfhir export --help`)",
        );
    }
    ProfileError::Invalid {
        path: path.display().to_string(),
        line,
        column,
        message,
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// One profile: every export setting a profile may hold, each optional. Keys are the export
/// flags' long names; see the module docs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    // The server and the kick-off request.
    pub base_url: Option<String>,
    pub system: Option<bool>,
    pub patients: Option<bool>,
    pub group: Option<String>,
    #[serde(rename = "type")]
    pub types: Option<Vec<String>>,
    pub since: Option<String>,
    pub snapshot: Option<bool>,
    pub no_backfill: Option<bool>,
    pub until: Option<String>,
    pub type_filter: Option<Vec<String>>,
    pub elements: Option<Vec<String>>,
    pub patient: Option<Vec<String>>,
    pub include_associated_data: Option<Vec<String>>,
    pub output_format: Option<String>,
    pub organize_output_by: Option<String>,
    pub allow_partial_manifests: Option<bool>,
    pub param: Option<Vec<Kv>>,
    pub post: Option<bool>,
    pub lenient: Option<bool>,
    pub separate_export_status: Option<bool>,
    #[serde(default)]
    pub header: BTreeMap<PlainHeader, String>,
    #[serde(default)]
    pub header_env: BTreeMap<String, String>,
    #[serde(default)]
    pub header_file: BTreeMap<String, PathBuf>,

    // Authorization.
    pub bearer_token_env: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    pub client_id: Option<String>,
    pub private_key: Option<KeyPath>,
    pub kid: Option<String>,
    pub alg: Option<Alg>,
    pub scope: Option<String>,
    pub smart_v2: Option<bool>,
    pub token_url: Option<String>,
    pub jku: Option<String>,
    pub allow_insecure_http: Option<bool>,
    pub allow_token_host: Option<Vec<String>>,
    /// Refused (deserializing it fails): a bearer token goes by reference.
    #[serde(default, rename = "bearer_token")]
    _bearer_token: Option<Refused<BearerToken>>,
    /// Refused (deserializing it fails): flatfhir signs assertions with a private key and
    /// takes no client secret.
    #[serde(default, rename = "client_secret")]
    _client_secret: Option<Refused<ClientSecret>>,

    // The output.
    pub out: Option<String>,
    #[serde(default)]
    pub store_option: BTreeMap<PlainStoreKey, String>,
    #[serde(default)]
    pub store_option_env: BTreeMap<String, String>,
    #[serde(default)]
    pub store_option_file: BTreeMap<String, PathBuf>,
    pub schemas: Option<PathBuf>,
    pub no_raw: Option<bool>,
    pub keep_ndjson: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
    pub no_coalesce: Option<bool>,
    pub max_rejects: Option<u64>,
    pub json: Option<bool>,

    // Limits and the job.
    pub concurrency: Option<usize>,
    pub max_concurrent_requests: Option<usize>,
    pub max_line_bytes: Option<LineLimit>,
    pub timeout: Option<Dur>,
    pub max_poll_interval: Option<Dur>,
    pub idle_timeout: Option<Dur>,
    pub max_redirects: Option<u32>,
    pub max_retries: Option<u32>,
    pub no_delete: Option<bool>,
    pub keep_job: Option<bool>,
}

impl Profile {
    /// Settings that do not go together within the profile (the command line may still
    /// override either).
    fn check(&self) -> Result<(), String> {
        let levels = [
            self.system == Some(true),
            self.patients == Some(true),
            self.group.is_some(),
        ];
        if levels.iter().filter(|l| **l).count() > 1 {
            return Err("choose one export level: system = true, patients = true or group".into());
        }
        if self.bearer_token_env.is_some() && self.bearer_token_file.is_some() {
            return Err("bearer_token_env and bearer_token_file: choose one".into());
        }
        let bearer = self.bearer_token_env.is_some() || self.bearer_token_file.is_some();
        if bearer && self.client_id.is_some() {
            return Err("a bearer token and a SMART client_id: choose one way to authorize".into());
        }
        if self.client_id.is_some() != self.private_key.is_some() {
            return Err("SMART Backend Services needs both client_id and private_key".into());
        }
        let headers = self.header.keys().map(|h| h.0.to_ascii_lowercase());
        let headers = headers.chain(
            (self.header_env.keys().chain(self.header_file.keys())).map(|h| h.to_ascii_lowercase()),
        );
        if let Some(h) = first_repeat(headers) {
            return Err(format!("header {h:?} is set twice"));
        }
        let options = self.store_option.keys().map(|k| k.0.clone());
        let options = options.chain(
            (self.store_option_env.keys())
                .chain(self.store_option_file.keys())
                .cloned(),
        );
        if let Some(k) = first_repeat(options) {
            return Err(format!("store option {k:?} is set twice"));
        }
        Ok(())
    }

    /// Resolve relative paths against `dir` and `~/` against the home folder.
    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| *p = anchored(dir, p);
        if let Some(KeyPath(p)) = &mut self.private_key {
            fix(p);
        }
        for p in [
            &mut self.bearer_token_file,
            &mut self.schemas,
            &mut self.keep_ndjson,
            &mut self.metrics_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        self.header_file.values_mut().for_each(fix);
        self.store_option_file.values_mut().for_each(fix);
        if let Some(out) = &mut self.out
            && !out.contains("://")
        {
            *out = anchored(dir, Path::new(out)).display().to_string();
        }
    }
}

/// The first name that comes twice.
fn first_repeat(names: impl Iterator<Item = String>) -> Option<String> {
    let mut seen = std::collections::BTreeSet::new();
    names.into_iter().find(|n| !seen.insert(n.clone()))
}

/// `p` with `~/` expanded and, when relative, joined to `dir`.
fn anchored(dir: &Path, p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~")
        && let Some(home) = home()
    {
        return home.join(rest);
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// A profile chosen from a file: its settings plus what error messages need to name it.
#[derive(Debug)]
pub struct NamedProfile {
    pub path: PathBuf,
    pub name: String,
    pub profile: Profile,
}

/// Where a secret comes from.
enum SecretRef<'a> {
    Env(&'a str),
    File(&'a Path),
}

impl NamedProfile {
    /// The bearer token the profile names (read now), if it names one.
    pub fn bearer_token(&self) -> Result<Option<String>, ProfileError> {
        let p = &self.profile;
        if let Some(var) = &p.bearer_token_env {
            return self.read("bearer_token_env", SecretRef::Env(var)).map(Some);
        }
        if let Some(file) = &p.bearer_token_file {
            return self
                .read("bearer_token_file", SecretRef::File(file))
                .map(Some);
        }
        Ok(None)
    }

    /// The profile's headers that `keep` keeps: `header`, then `header_env` and `header_file`
    /// (read now; a header not kept is not read).
    pub fn headers(
        &self,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>, ProfileError> {
        let p = &self.profile;
        let plain = p.header.iter().map(|(k, v)| (k.0.as_str(), v.as_str()));
        self.entries("header", plain, &p.header_env, &p.header_file, keep)
    }

    /// The profile's object store options that `keep` keeps: `store_option`, then
    /// `store_option_env` and `store_option_file` (read now; an option not kept is not read).
    pub fn store_options(
        &self,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>, ProfileError> {
        let p = &self.profile;
        let plain = p
            .store_option
            .iter()
            .map(|(k, v)| (k.0.as_str(), v.as_str()));
        self.entries(
            "store_option",
            plain,
            &p.store_option_env,
            &p.store_option_file,
            keep,
        )
    }

    fn entries<'a>(
        &self,
        key: &str,
        plain: impl Iterator<Item = (&'a str, &'a str)>,
        env: &BTreeMap<String, String>,
        file: &BTreeMap<String, PathBuf>,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>, ProfileError> {
        let mut out: Vec<_> = plain
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        for (name, var) in env.iter().filter(|(k, _)| keep(k)) {
            let v = self.read(&format!("{key}_env.{name}"), SecretRef::Env(var))?;
            out.push((name.clone(), v));
        }
        for (name, path) in file.iter().filter(|(k, _)| keep(k)) {
            let v = self.read(&format!("{key}_file.{name}"), SecretRef::File(path))?;
            out.push((name.clone(), v));
        }
        Ok(out)
    }

    /// Read a secret: an environment variable, or a file without its trailing newline.
    fn read(&self, key: &str, from: SecretRef<'_>) -> Result<String, ProfileError> {
        let value = match from {
            SecretRef::Env(var) => match std::env::var(var) {
                Ok(v) => Ok(v),
                Err(std::env::VarError::NotPresent) => {
                    Err(format!("environment variable {var} is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(format!("environment variable {var} is not UTF-8"))
                }
            },
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
        .and_then(|v| {
            if v.is_empty() {
                Err("the secret it names is empty".into())
            } else {
                Ok(v)
            }
        });
        value.map_err(|message| ProfileError::Secret {
            path: self.path.display().to_string(),
            profile: self.name.clone(),
            key: key.into(),
            message,
        })
    }
}

// Values parsed inside the deserializer, so that toml puts the value's line on a bad one.

/// Deserialize a string with `parse` from within the value's deserializer (toml then knows
/// the span of a value that fails).
fn parse_str<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T>(&'static str, fn(&str) -> Result<T, String>, PhantomData<T>);
    impl<T> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            (self.1)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V(expecting, parse, PhantomData))
}

/// A duration such as `90s`, `30m`, `12h` or `7d`.
#[derive(Debug, Clone, Copy)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(
            d,
            "a duration such as \"90s\", \"30m\", \"12h\" or \"7d\"",
            |s| parse_duration(s).map(Dur),
        )
    }
}

/// A line limit: a size such as `"256MiB"` (or a number of bytes), as `--max-line-bytes`.
#[derive(Debug, Clone, Copy)]
pub struct LineLimit(pub usize);

impl<'de> Deserialize<'de> for LineLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Bytes(u64),
            Text(String),
        }
        let text = match Either::deserialize(d)? {
            Either::Bytes(n) => n.to_string(),
            Either::Text(s) => s,
        };
        parse_max_line_bytes(&text)
            .map(LineLimit)
            .map_err(serde::de::Error::custom)
    }
}

/// A kick-off parameter `NAME=VALUE`.
#[derive(Debug, Clone)]
pub struct Kv(pub (String, String));

impl<'de> Deserialize<'de> for Kv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "\"NAME=VALUE\"", |s| parse_kv(s).map(Kv))
    }
}

/// `RS384` or `ES384`.
#[derive(Debug, Clone, Copy)]
pub struct Alg(pub SigningAlg);

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "\"RS384\" or \"ES384\"", |s| {
            SigningAlg::parse(s)
                .map(Alg)
                .ok_or_else(|| "alg: expected \"RS384\" or \"ES384\"".into())
        })
    }
}

/// The path of a private key file; a key written inline is refused.
#[derive(Debug, Clone)]
pub struct KeyPath(pub PathBuf);

impl<'de> Deserialize<'de> for KeyPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "the path of a key file", |s| {
            if s.contains("-----BEGIN") || s.contains('\n') || s.trim_start().starts_with('{') {
                Err(
                    "private_key is the path of the key file: a key written inline is refused \
                     (secrets go by reference)"
                        .into(),
                )
            } else {
                Ok(KeyPath(PathBuf::from(s)))
            }
        })
    }
}

/// The name of a header whose value may be written in the file: not a secret one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlainHeader(pub String);

/// Headers that carry credentials: their values go by reference.
fn secret_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie"
    ) || ["token", "secret", "password", "api-key", "apikey"]
        .iter()
        .any(|s| n.contains(s))
}

impl<'de> Deserialize<'de> for PlainHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a header name", |s| {
            if secret_header(s) {
                Err(format!(
                    "header {s:?} carries a secret: secrets go by reference, \
                     header_env.{s} = \"VAR\" or header_file.{s} = \"PATH\""
                ))
            } else {
                Ok(PlainHeader(s.into()))
            }
        })
    }
}

/// The key of an object store option whose value may be written in the file: not a
/// credential.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlainStoreKey(pub String);

/// Object store options that carry credentials (`aws_secret_access_key`,
/// `azure_storage_account_key`, `sas_token`, `google_service_account_key`…); identifiers such
/// as `aws_access_key_id` are not secret.
fn secret_store_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    !k.ends_with("_id")
        && [
            "secret",
            "token",
            "password",
            "sas",
            "access_key",
            "account_key",
            "service_account_key",
        ]
        .iter()
        .any(|s| k.contains(s))
}

impl<'de> Deserialize<'de> for PlainStoreKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "an object store option", |s| {
            if secret_store_key(s) {
                Err(format!(
                    "store option {s:?} is a credential: secrets go by reference, \
                     store_option_env.{s} = \"VAR\" or store_option_file.{s} = \"PATH\""
                ))
            } else {
                Ok(PlainStoreKey(s.into()))
            }
        })
    }
}

/// A key whose presence is an error, whatever its value (which no message repeats).
#[derive(Debug)]
struct Refused<W>(PhantomData<W>);

/// Why a refused key is refused.
trait Why {
    const WHY: &'static str;
}

#[derive(Debug)]
struct BearerToken;
impl Why for BearerToken {
    const WHY: &'static str = "bearer_token: secrets go by reference, \
        bearer_token_env = \"VAR\" or bearer_token_file = \"PATH\"";
}

#[derive(Debug)]
struct ClientSecret;
impl Why for ClientSecret {
    const WHY: &'static str = "client_secret: flatfhir signs SMART client assertions with a \
        private key (client_id and private_key = \"PATH\") and takes no client secret; secrets \
        go by reference, never inline";
}

impl<'de, W: Why> Deserialize<'de> for Refused<W> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<W>(PhantomData<W>);
        // Every visit refuses without looking at the value, so no error text can hold it.
        impl<'de, W: Why> de::Visitor<'de> for V<W> {
            type Value = Refused<W>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(W::WHY)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Err(E::custom(W::WHY))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Err(E::custom(W::WHY))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Err(E::custom(W::WHY))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Err(E::custom(W::WHY))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Err(E::custom(W::WHY))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
                Err(de::Error::custom(W::WHY))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
                Err(de::Error::custom(W::WHY))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, ProfileError> {
        ConfigFile::parse(Path::new("/etc/flatfhir/config.toml"), text)
    }

    /// The error of a file that must be refused, as printed.
    fn refused(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// A config file of two profiles, shared with the export's precedence tests.
    pub(in crate::cli) const NIGHTLY: &str = r#"
[profiles.epic-prod]
base_url = "https://ehr.example/fhir"
group = "cohort-1"
type = ["Patient", "Observation"]
since = "auto"
param = ["_flatfhirFault=slow:1"]
client_id = "flatfhir"
private_key = "keys/private-key.pem"
alg = "ES384"
scope = "system/*.rs"
out = "warehouse"
keep_ndjson = "/var/archive"
store_option = { aws_region = "eu-west-1", aws_endpoint = "http://minio:9000" }
header = { X-Tenant = "a", X-Site = "north" }
concurrency = 2
max_retries = 8
timeout = "12h"
no_delete = true
no_raw = true

[profiles.other]
base_url = "http://127.0.0.1:8080/fhir"
patients = true
out = "s3://bucket/fhir"
"#;

    /// Profile `name` of [`NIGHTLY`], read from `/etc/flatfhir/config.toml`.
    pub(in crate::cli) fn nightly(name: &str) -> NamedProfile {
        parse(NIGHTLY).unwrap().profile(name).unwrap()
    }

    #[test]
    fn a_full_profile_parses_and_anchors_relative_paths() {
        let p = nightly("epic-prod");
        assert_eq!(p.name, "epic-prod");
        let p = p.profile;
        assert_eq!(p.group.as_deref(), Some("cohort-1"));
        assert_eq!(p.types.unwrap(), ["Patient", "Observation"]);
        assert_eq!(
            p.param.unwrap()[0].0,
            ("_flatfhirFault".into(), "slow:1".into())
        );
        assert_eq!(
            p.private_key.unwrap().0,
            Path::new("/etc/flatfhir/keys/private-key.pem")
        );
        assert_eq!(p.alg.unwrap().0, SigningAlg::Es384);
        assert_eq!(p.out.as_deref(), Some("/etc/flatfhir/warehouse"));
        assert_eq!(p.keep_ndjson.unwrap(), Path::new("/var/archive"));
        assert_eq!(p.timeout.unwrap().0, Duration::from_secs(12 * 3600));
        assert_eq!(p.max_retries, Some(8));
        // A URL stays as it is.
        let other = nightly("other").profile;
        assert_eq!(other.out.as_deref(), Some("s3://bucket/fhir"));
        assert_eq!(other.patients, Some(true));
    }

    #[test]
    fn secrets_written_inline_are_refused_by_line_without_their_value() {
        let cases = [
            ("bearer_token = \"s3cr3t-value\"", "bearer_token_env"),
            ("bearer_token = 12345678", "bearer_token_file"),
            ("client_secret = \"s3cr3t-value\"", "private key"),
            (
                "header = { Authorization = \"Bearer s3cr3t-value\" }",
                "header_env.Authorization",
            ),
            (
                "header = { x-api-key = \"s3cr3t-value\" }",
                "header_file.x-api-key",
            ),
            (
                "store_option = { aws_secret_access_key = \"s3cr3t-value\" }",
                "store_option_env.aws_secret_access_key",
            ),
            (
                "store_option = { azure_storage_sas_token = \"s3cr3t-value\" }",
                "store_option_file.azure_storage_sas_token",
            ),
            (
                "private_key = \"-----BEGIN PRIVATE KEY-----s3cr3t-value\"",
                "private_key is the path of the key file",
            ),
        ];
        for (line, hint) in cases {
            let text = format!("[profiles.p]\nbase_url = \"https://x/fhir\"\n{line}\n");
            let e = refused(&text);
            assert!(e.starts_with("/etc/flatfhir/config.toml:3:"), "{line}: {e}");
            assert!(e.contains(hint), "{line}: {e}");
            assert!(e.contains("by reference"), "{line}: {e}");
            assert!(!e.contains("s3cr3t") && !e.contains("12345678"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_line_and_key() {
        let e = refused("[profiles.p]\n\nmax_retires = 3\n");
        assert!(
            e.starts_with("/etc/flatfhir/config.toml:3:1: unknown field `max_retires`"),
            "{e}"
        );
        assert!(e.contains("flatfhir export --help"), "{e}");
        let e = refused("[profile.p]\nbase_url = \"x\"\n");
        assert!(
            e.contains(":1:") && e.contains("unknown field `profile`"),
            "{e}"
        );
        let e = refused("[profiles.p]\ntimeout = \"12 parsecs\"\n");
        assert!(
            e.starts_with("/etc/flatfhir/config.toml:2:11: bad duration"),
            "{e}"
        );
        let e = refused("[profiles.p]\nalg = \"HS256\"\n");
        assert!(e.contains(":2:") && e.contains("RS384"), "{e}");
        let e = refused("[profiles.p]\nconcurrency = \"four\"\n");
        assert!(e.contains(":2:") && e.contains("invalid type"), "{e}");
        let e = refused("[profiles.p]\nbase_url = \n");
        assert!(e.contains(":2:"), "{e}");
    }

    #[test]
    fn every_export_flag_is_a_profile_key() {
        let cmd = super::super::Cli::command_line();
        let export = cmd.find_subcommand("export").unwrap();
        let mut keys = 0;
        for arg in export.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            // Not profile settings: choosing the profile, continuing a job, help; and a bearer
            // token, which a profile names by reference only.
            if [
                "profile",
                "config",
                "resume",
                "help",
                "version",
                "verbose",
                "quiet",
                // Logging starts before the profile is read.
                "log-format",
            ]
            .contains(&long)
            {
                continue;
            }
            let key = long.replace('-', "_");
            // An array fits no key, so every known key fails on its type, an unknown one by name.
            let e = refused(&format!("[profiles.p]\n{key} = [[]]\n"));
            assert!(!e.contains("unknown field"), "--{long}: no key {key}: {e}");
            keys += 1;
        }
        assert!(keys > 40, "{keys}");
    }

    #[test]
    fn conflicting_settings_and_unknown_profiles() {
        let e = refused("[profiles.p]\nsystem = true\ngroup = \"g\"\n");
        assert!(e.contains("profile p: choose one export level"), "{e}");
        let e = refused(
            "[profiles.p]\nclient_id = \"c\"\nbearer_token_env = \"T\"\nprivate_key = \"k\"\n",
        );
        assert!(e.contains("choose one way to authorize"), "{e}");
        let e = refused("[profiles.p]\nclient_id = \"c\"\n");
        assert!(e.contains("both client_id and private_key"), "{e}");
        let e = refused("[profiles.p]\nheader = { x-a = \"1\" }\nheader_file = { X-A = \"f\" }\n");
        assert!(e.contains("\"x-a\" is set twice"), "{e}");

        let file = parse("[profiles.b]\n[profiles.a]\n").unwrap();
        let e = file.profile("prod").unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/flatfhir/config.toml: no profile \"prod\" (profiles: a, b)"
        );
    }

    #[test]
    fn secrets_are_read_from_files_when_used() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "tok-123\n").unwrap();
        let path = tmp.path().join("config.toml");
        std::fs::write(
            &path,
            "[profiles.p]\nbearer_token_file = \"token\"\nheader_file = { Cookie = \"missing\" }\n",
        )
        .unwrap();
        let p = ConfigFile::load(&path).unwrap().profile("p").unwrap();
        assert_eq!(p.bearer_token().unwrap().as_deref(), Some("tok-123"));
        // Not read when the command line names the header itself.
        assert!(p.headers(|_| false).unwrap().is_empty());
        let e = p.headers(|_| true).unwrap_err().to_string();
        assert!(
            e.contains("profile p: header_file.Cookie: cannot read") && e.contains("missing"),
            "{e}"
        );
        let e = ConfigFile::load(&tmp.path().join("nope.toml")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read config file"), "{e}");
    }

    #[test]
    fn an_explicit_file_wins_over_the_default() {
        let p = ConfigFile::locate(Some(Path::new("/x/c.toml")), "p").unwrap();
        assert_eq!(p, Path::new("/x/c.toml"));
    }
}
