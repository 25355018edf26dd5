//! `flatfhir export`: a Bulk Data export into a dataset.
//!
//! The flags may come from a profile of a config file (`--profile NAME`, see [`super::profile`]):
//! [`ExportArgs::with_profile`] fills what neither the command line nor the environment set,
//! before [`ExportArgs::validate`] checks the result as if it had all been typed.

use std::{io::Write, path::PathBuf, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::{ArgMatches, Args, parser::ValueSource};
use url::Url;

use flatfhir::{
    auth::{PrivateKey, SigningAlg},
    client::{
        Auth, BulkClient, BulkClientBuilder, ExportLevel, ExportRequest, RetryConfig, SmartAuth,
        SmartConfig, smart::export_scope,
    },
    dataset::{DatasetLocation, RunManifest},
    run::{
        Progress,
        export::{
            ExportBuilder, ExportError, ExportOptions, ExportSummary, OnCtrlC, find_unfinished,
            resolve_since_auto,
        },
    },
    view::ViewRegistry,
};

use super::{
    Outcome,
    args::{
        MetricsArgs, SchemaArgs, StoreArgs, parse_duration, parse_header, parse_kv,
        parse_max_line_bytes,
    },
    check_rejects, logging, output,
    profile::{CONFIG_ENV, ConfigFile, NamedProfile, PROFILE_ENV, ProfileError},
    progress,
};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("level").args(["system", "patients", "group"]))]
pub struct ExportArgs {
    /// Take the settings that neither the command line nor the environment gives from this
    /// profile of the config file (a nightly job: `flatfhir export --profile epic-prod`).
    ///
    /// Precedence: command-line flag > environment variable > profile > built-in default. The
    /// file (TOML) holds `[profiles.NAME]` tables whose keys are the long flags of this command
    /// with `_` for `-`: `base_url = "https://ehr.example/fhir"`, `group = "cohort-1"` (or
    /// `system = true`, `patients = true`), `type = ["Patient", "Observation"]`,
    /// `since = "auto"`, `client_id`, `private_key = "key.pem"`, `out`, `max_retries = 8`,
    /// `timeout = "12h"`, `header = { X-Tenant = "a" }`, `store_option = { aws_region = "…" }`.
    /// A list on the command line replaces the profile's list; `--header` and `--store-option`
    /// replace only the entries of the same name. A bearer token or client id given on the
    /// command line or in the environment replaces the profile's way of authorizing. A switch
    /// that a profile turns on is turned off with `=false` (`--keep-job=false`).
    ///
    /// Secrets only by reference: `bearer_token_env = "VAR"` or `bearer_token_file = "PATH"`,
    /// `header_env`/`header_file` for secret headers (Authorization, Cookie, …), and
    /// `store_option_env`/`store_option_file` for store credentials; a secret written inline,
    /// and any unknown key, is an error naming the file and line. Relative paths are relative
    /// to the config file.
    #[arg(long, value_name = "NAME", env = PROFILE_ENV, help_heading = "Config file")]
    profile: Option<String>,
    /// The config file of --profile [default: $XDG_CONFIG_HOME/flatfhir/config.toml, else
    /// ~/.config/flatfhir/config.toml].
    #[arg(long, value_name = "FILE", env = CONFIG_ENV, help_heading = "Config file")]
    config: Option<PathBuf>,
    /// FHIR base URL of the server (e.g. https://ehr.example/fhir).
    #[arg(long, env = "FLATFHIR_BASE_URL")]
    base_url: Option<String>,
    /// System-level export: [base]/$export.
    #[arg(long)]
    system: bool,
    /// Patient-level export: [base]/Patient/$export.
    #[arg(long)]
    patients: bool,
    /// Group-level export: [base]/Group/ID/$export.
    #[arg(long, value_name = "ID")]
    group: Option<String>,
    /// Output dataset: a folder, or a URL (file://, s3://, gs://, az://, abfss://).
    #[arg(long, short, value_name = "DIR")]
    out: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Continue the unfinished export job saved in DIR (polls its status URL, skips committed files).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "level"])]
    resume: Option<String>,
    /// _type: resource types to export (repeatable, or comma-separated).
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
    types: Vec<String>,
    /// _since: only resources changed after this FHIR instant; `auto` uses the transactionTime
    /// of the last published run of the same export (server, level, group, types, filters) in
    /// the dataset, and runs a full export when there is none.
    #[arg(long, value_name = "INSTANT|auto")]
    since: Option<String>,
    /// Full snapshot: resources of the exported types that earlier runs of the same export
    /// (server, level, group) brought and this export no longer holds are removed from the
    /// current-state tables (`<view>_latest`; the history keeps them). For servers that do not
    /// report deletions; needs a full export (no --since, --until, --type-filter, --patient).
    #[arg(long, conflicts_with_all = ["since", "until", "type_filters", "patients_filter", "resume"])]
    snapshot: bool,
    /// On a Group export with --since: do not look for members who joined since the earlier
    /// runs (by default their whole history is fetched first: a `_type=Patient&_elements=id`
    /// export lists the members, then one POST export per 500 new members, without _since).
    #[arg(long)]
    no_backfill: bool,
    /// _until: only resources changed before this FHIR instant.
    #[arg(long, value_name = "INSTANT")]
    until: Option<String>,
    /// _typeFilter: a search query like `Observation?status=final` (repeatable; one query each).
    #[arg(long = "type-filter", value_name = "QUERY")]
    type_filters: Vec<String>,
    /// _elements: elements to keep (repeatable, or comma-separated).
    #[arg(long, value_name = "ELEMENT", value_delimiter = ',')]
    elements: Vec<String>,
    /// patient: export only these patients (repeatable; forces POST).
    #[arg(long = "patient", value_name = "ID")]
    patients_filter: Vec<String>,
    /// includeAssociatedData code (repeatable).
    #[arg(long, value_name = "CODE")]
    include_associated_data: Vec<String>,
    /// _outputFormat (default: the server's, application/fhir+ndjson).
    #[arg(long, value_name = "MIME")]
    output_format: Option<String>,
    /// organizeOutputBy resource type (STU3).
    #[arg(long, value_name = "TYPE")]
    organize_output_by: Option<String>,
    /// allowPartialManifests=true (STU3): download files as they are announced.
    #[arg(long)]
    allow_partial_manifests: bool,
    /// Extra kick-off parameter NAME=VALUE (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_kv)]
    params: Vec<(String, String)>,
    /// Kick off with POST and a FHIR Parameters body instead of GET.
    #[arg(long)]
    post: bool,
    /// Send `Prefer: handling=lenient` (the server may ignore parameters it does not support).
    #[arg(long)]
    lenient: bool,
    /// Send `Prefer: separate-export-status` (STU3): status polls answer 200 and carry the job's
    /// status in `X-Export-Status`.
    #[arg(long)]
    separate_export_status: bool,
    /// Extra HTTP header NAME:VALUE on every request (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// A static bearer token (prefer the environment variable to keep it off the command line).
    #[arg(
        long,
        env = "FLATFHIR_BEARER_TOKEN",
        hide_env_values = true,
        help_heading = "Authorization"
    )]
    bearer_token: Option<String>,
    /// SMART Backend Services client id (registered with the server). Needs --private-key.
    #[arg(long, env = "FLATFHIR_CLIENT_ID", help_heading = "Authorization")]
    client_id: Option<String>,
    /// Private key that signs client assertions: PEM (PKCS#8; RSA or EC P-384) or a JWK / JWKS
    /// file (the key is picked by --kid). Create one with `flatfhir keys generate`.
    #[arg(
        long,
        env = "FLATFHIR_PRIVATE_KEY",
        value_name = "FILE",
        help_heading = "Authorization"
    )]
    private_key: Option<PathBuf>,
    /// Key id sent as the assertion's `kid` (default: the JWK's kid, else the key's RFC 7638
    /// thumbprint, which is what `flatfhir keys generate` registers).
    #[arg(long, env = "FLATFHIR_KID", help_heading = "Authorization")]
    kid: Option<String>,
    /// Check that the key signs with this algorithm (the key type decides: RSA → RS384,
    /// EC P-384 → ES384).
    #[arg(long, value_enum, help_heading = "Authorization")]
    alg: Option<SigningAlg>,
    /// Scopes to request, space-separated [default: system/*.read, or system/*.rs with
    /// --smart-v2; Group exports add system/Group.read or .rs].
    #[arg(long, env = "FLATFHIR_SCOPE", help_heading = "Authorization")]
    scope: Option<String>,
    /// Ask for SMART v2 scopes (system/*.rs) instead of v1 (system/*.read).
    #[arg(long, help_heading = "Authorization")]
    smart_v2: bool,
    /// Token endpoint (default: discovered from [base]/.well-known/smart-configuration, else the
    /// CapabilityStatement).
    #[arg(long, env = "FLATFHIR_TOKEN_URL", help_heading = "Authorization")]
    token_url: Option<String>,
    /// `jku` assertion header: the URL of the JWKS registered for this client, if it has one.
    #[arg(long, help_heading = "Authorization")]
    jku: Option<String>,
    /// Allow plain HTTP to a FHIR server or token endpoint that is not on loopback (the access
    /// token and the client assertion travel unencrypted).
    #[arg(long, help_heading = "Authorization")]
    allow_insecure_http: bool,
    /// Another host that may receive the access token for file downloads (repeatable).
    #[arg(long, value_name = "HOST", help_heading = "Authorization")]
    allow_token_host: Vec<String>,
    /// Longest accepted ndjson line (e.g. 256MiB) [default: 64MiB]; a longer one is rejected,
    /// without its text. A line costs a few times its size in memory while it is decoded.
    #[arg(long, value_name = "SIZE", value_parser = parse_max_line_bytes)]
    max_line_bytes: Option<usize>,
    /// Files downloaded in parallel.
    #[arg(long, default_value_t = flatfhir::run::export::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Most requests to the server in flight at once (kick-off, status and downloads); halved
    /// while the server answers 429/503, raised again as it recovers [default: --concurrency].
    #[arg(long, value_name = "N", env = "FLATFHIR_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,
    /// Give up on the whole job after this long (e.g. 90s, 30m, 12h, 7d).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    timeout: std::time::Duration,
    /// Longest wait between status polls, whatever Retry-After says. After a poll answered
    /// 429 ("polling too fast") the shortest wait doubles (2s, 4s, …) up to this, for the rest
    /// of the job.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    max_poll_interval: std::time::Duration,
    /// Give up on a response that sends no byte for this long, and retry it (a file body
    /// resumes with Range where the server allows it).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    idle_timeout: std::time::Duration,
    /// Redirects followed for one file download (file requests only; kick-off and status
    /// requests never follow redirects).
    #[arg(long, default_value_t = flatfhir::client::DEFAULT_MAX_REDIRECTS)]
    max_redirects: u32,
    /// Retries of one request before giving up.
    #[arg(long, default_value_t = flatfhir::client::retry::DEFAULT_MAX_RETRIES)]
    max_retries: u32,
    /// Do not DELETE the job on the server after success.
    #[arg(long)]
    no_delete: bool,
    /// On Ctrl-C keep the server job (for --resume) instead of cancelling it with DELETE (a
    /// second Ctrl-C stops at once, without cancelling; SIGTERM always keeps the job).
    #[arg(long)]
    keep_job: bool,
    /// Also keep every downloaded file, as received (gzip stays gzip), in this folder.
    #[arg(long, value_name = "DIR")]
    keep_ndjson: Option<PathBuf>,
    /// Keep one part per downloaded file and view instead of rewriting the small parts of many
    /// small files into parts of a sensible size before the run is published.
    #[arg(long)]
    no_coalesce: bool,
    #[command(flatten)]
    schema: SchemaArgs,
    /// Fail (exit code 1) when more than N lines are rejected; the run is still written.
    #[arg(long, value_name = "N")]
    max_rejects: Option<u64>,
    /// Print the run manifest as JSON on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// A validated export: views compiled, the request and flags checked, the key read, the
/// output resolved — before any request is sent.
pub struct ExportConfig {
    registry: ViewRegistry,
    out: String,
    location: DatasetLocation,
    resume: bool,
    base_url: Option<Url>,
    request: Option<ExportRequest>,
    key: Option<(String, PrivateKey)>,
    token_url: Option<Url>,
    args: Box<ExportArgs>,
}

/// Let every switch of `export` that a profile can turn on be turned off again on the command
/// line: `--keep-job` stays a switch (on), and `--keep-job=false` overrides a profile's
/// `keep_job = true`. Without this a flag could only ever add to what a profile says.
/// The export level (`--system`, `--patients`) is replaced as a whole by another level instead.
pub fn negatable_switches(cmd: clap::Command) -> clap::Command {
    const NOT: [&str; 3] = ["system", "patients", "resume"];
    let switches: Vec<clap::Id> = cmd
        .get_arguments()
        .filter(|a| matches!(a.get_action(), clap::ArgAction::SetTrue))
        .filter(|a| a.get_long().is_some() && !NOT.contains(&a.get_id().as_str()))
        .map(|a| a.get_id().clone())
        .collect();
    switches.into_iter().fold(cmd, |cmd, id| {
        cmd.mut_arg(id, |a| {
            a.action(clap::ArgAction::Set)
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true")
                .default_value("false")
                .value_name("BOOL")
                .hide_possible_values(true)
                .hide_default_value(true)
        })
    })
}

impl ExportArgs {
    /// Lay the profile named by `--profile` (or `FLATFHIR_PROFILE`) under what the command line
    /// and the environment set. `m` are the export command's matches: they say where each value
    /// came from. Reads the config file and the secrets the profile uses; sends nothing.
    pub fn with_profile(mut self: Box<Self>, m: &ArgMatches) -> Result<Box<Self>> {
        let Some(name) = self.profile.clone() else {
            if let Some(path) = &self.config
                && m.value_source("config") == Some(ValueSource::CommandLine)
            {
                return Err(ProfileError::NoProfile {
                    path: path.display().to_string(),
                }
                .into());
            }
            return Ok(self);
        };
        let path = ConfigFile::locate(self.config.as_deref(), &name)?;
        let profile = ConfigFile::load(&path)?.profile(&name)?;
        self.apply(profile, m)?;
        Ok(self)
    }

    /// Fill every setting that neither the command line nor the environment gave from `np`.
    fn apply(&mut self, np: NamedProfile, m: &ArgMatches) -> Result<()> {
        let given = |id: &str| {
            matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        // One way of authorizing given by the user replaces the profile's other way.
        let user_bearer = given("bearer_token");
        let user_smart = given("client_id") || given("private_key");
        let bearer = match user_bearer || user_smart {
            true => None,
            false => np.bearer_token()?,
        };
        // Entries named on the command line replace the profile's of the same name only.
        let headers =
            np.headers(|h| !self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(h)))?;
        self.headers = headers.into_iter().chain(self.headers.drain(..)).collect();
        let options = &mut self.store.store_options;
        let profile_options = np.store_options(|k| !options.iter().any(|(n, _)| n == k))?;
        *options = profile_options
            .into_iter()
            .chain(options.drain(..))
            .collect();

        let p = np.profile;
        // `$field` takes the profile's value unless the user gave one (clap ids are field names).
        macro_rules! fill {
            ($($field:ident = $value:expr),* $(,)?) => {$(
                if let Some(v) = $value
                    && !given(stringify!($field))
                {
                    self.$field = v;
                }
            )*};
        }
        if !(given("system") || given("patients") || given("group")) {
            fill!(
                system = p.system,
                patients = p.patients,
                group = p.group.map(Some),
            );
        }
        if !user_bearer {
            fill!(
                client_id = p.client_id.map(Some),
                private_key = p.private_key.map(|k| Some(k.0)),
            );
        }
        fill!(
            bearer_token = bearer.map(Some),
            base_url = p.base_url.map(Some),
            out = p.out.map(Some),
            types = p.types,
            // A snapshot asked for on the command line is a full export: the profile's
            // `since` (often `auto`, for the nightly runs) does not apply to it.
            since = p.since.filter(|_| !given("snapshot")).map(Some),
            snapshot = p.snapshot,
            no_backfill = p.no_backfill,
            until = p.until.map(Some),
            type_filters = p.type_filter,
            elements = p.elements,
            patients_filter = p.patient,
            include_associated_data = p.include_associated_data,
            output_format = p.output_format.map(Some),
            organize_output_by = p.organize_output_by.map(Some),
            allow_partial_manifests = p.allow_partial_manifests,
            params = p.param.map(|ps| ps.into_iter().map(|kv| kv.0).collect()),
            post = p.post,
            lenient = p.lenient,
            separate_export_status = p.separate_export_status,
            kid = p.kid.map(Some),
            alg = p.alg.map(|a| Some(a.0)),
            scope = p.scope.map(Some),
            smart_v2 = p.smart_v2,
            token_url = p.token_url.map(Some),
            jku = p.jku.map(Some),
            allow_insecure_http = p.allow_insecure_http,
            allow_token_host = p.allow_token_host,
            concurrency = p.concurrency,
            max_concurrent_requests = p.max_concurrent_requests.map(Some),
            max_line_bytes = p.max_line_bytes.map(|n| Some(n.0)),
            timeout = p.timeout.map(|d| d.0),
            max_poll_interval = p.max_poll_interval.map(|d| d.0),
            idle_timeout = p.idle_timeout.map(|d| d.0),
            max_redirects = p.max_redirects,
            max_retries = p.max_retries,
            no_delete = p.no_delete,
            keep_job = p.keep_job,
            keep_ndjson = p.keep_ndjson.map(Some),
            no_coalesce = p.no_coalesce,
            max_rejects = p.max_rejects.map(Some),
            json = p.json,
        );
        if let Some(dir) = p.schemas
            && !given("schemas")
        {
            self.schema.schemas = Some(dir);
        }
        if let Some(file) = p.metrics_file
            && !given("metrics_file")
        {
            self.metrics.metrics_file = Some(file);
        }
        if let Some(no_raw) = p.no_raw
            && !given("no_raw")
        {
            self.schema.no_raw = no_raw;
        }
        Ok(())
    }

    /// `--metrics-file` and the dataset it reports on, for a run that fails validation.
    pub fn metrics(&self) -> (MetricsArgs, String) {
        let out = self.resume.as_ref().or(self.out.as_ref());
        (self.metrics.clone(), out.cloned().unwrap_or_default())
    }

    /// Check everything that can be checked without the network.
    pub fn validate(self: Box<Self>) -> Result<ExportConfig> {
        let registry = self.schema.registry()?;
        flatfhir::dataset::check_views(&registry)?;
        let resume = self.resume.is_some();
        let out = self
            .resume
            .clone()
            .or_else(|| self.out.clone())
            .context("--out DIR is required (or `out` in the --profile)")?;
        let location = self.store.location(&out, !resume)?;
        let (base_url, request) = if resume {
            (None, None)
        } else {
            let base = self.base_url.as_deref().context(
                "--base-url is required (or FLATFHIR_BASE_URL, or `base_url` in the --profile)",
            )?;
            let base = Url::parse(base).with_context(|| format!("invalid --base-url {base:?}"))?;
            let request = self.request()?;
            request.validate()?;
            (Some(base), Some(request))
        };
        if self.bearer_token.is_some() && self.client_id.is_some() {
            bail!("a bearer token and --client-id: choose one way to authorize");
        }
        let key = match (&self.client_id, &self.private_key) {
            (Some(id), Some(path)) => {
                flatfhir::auth::warn_if_key_readable_by_others(path);
                let key = PrivateKey::load(path, self.kid.as_deref())?;
                if let Some(alg) = self.alg
                    && alg != key.alg()
                {
                    bail!(
                        "--alg {alg} does not fit the key in {} (it signs {})",
                        path.display(),
                        key.alg()
                    );
                }
                Some((id.clone(), key))
            }
            (Some(_), None) => bail!("--client-id needs --private-key (the key that signs)"),
            (None, Some(_)) => bail!("--private-key needs --client-id"),
            (None, None) => None,
        };
        let token_url = self
            .token_url
            .as_deref()
            .map(|u| Url::parse(u).with_context(|| format!("invalid --token-url {u:?}")))
            .transpose()?;
        Ok(ExportConfig {
            registry,
            out,
            location,
            resume,
            base_url,
            request,
            key,
            token_url,
            args: self,
        })
    }

    fn request(&self) -> Result<ExportRequest> {
        let level = match (self.system, self.patients, &self.group) {
            (_, _, Some(g)) => ExportLevel::Group(g.clone()),
            (_, true, None) => ExportLevel::Patients,
            (true, false, None) => ExportLevel::System,
            _ => bail!("choose the export level: --system, --patients or --group ID"),
        };
        Ok(ExportRequest {
            level: Some(level),
            types: self.types.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            type_filters: self.type_filters.clone(),
            elements: self.elements.clone(),
            patients: self.patients_filter.clone(),
            include_associated_data: self.include_associated_data.clone(),
            output_format: self.output_format.clone(),
            organize_output_by: self.organize_output_by.clone(),
            allow_partial_manifests: self.allow_partial_manifests,
            params: self.params.clone(),
            post: self.post,
            lenient: self.lenient,
            separate_export_status: self.separate_export_status,
        })
    }
}

impl ExportConfig {
    /// The export's authorization: SMART Backend Services, a static bearer token, or none.
    fn auth(&mut self, base: &Url, request: &ExportRequest) -> Result<Auth> {
        let a = &self.args;
        if let Some((client_id, key)) = self.key.take() {
            let group = matches!(request.level, Some(ExportLevel::Group(_)));
            let cfg = SmartConfig {
                scope: export_scope(a.scope.as_deref(), a.smart_v2, group),
                token_url: self.token_url.clone(),
                jku: a.jku.clone(),
                allow_insecure_http: a.allow_insecure_http,
                ..SmartConfig::new(client_id, key)
            };
            return Ok(Auth::Smart(Arc::new(SmartAuth::new(cfg, base.clone())?)));
        }
        Ok(match &a.bearer_token {
            Some(t) => Auth::Bearer(t.clone()),
            None => Auth::None,
        })
    }
}

pub async fn run(c: ExportConfig, quiet: bool) -> Result<Outcome> {
    let started = std::time::Instant::now();
    let metrics = c.args.metrics.clone();
    let dataset = c.out.clone();
    let mut client: Option<BulkClient> = None;
    let result = export(c, quiet, &mut client).await;
    let http = || client.map(|c| c.http_summary()).unwrap_or_default();
    metrics.report("export", &dataset, started, result, http)
}

/// The export; `client` is set once built, for the figures of a failed run.
async fn export(
    mut c: ExportConfig,
    quiet: bool,
    client: &mut Option<BulkClient>,
) -> Result<(Outcome, RunManifest)> {
    let (base, request, resume) = if c.resume {
        let job = find_unfinished(&c.location, None).await?.ok_or_else(|| {
            ExportError::NothingToResume {
                location: c.out.clone(),
            }
        })?;
        let base = Url::parse(&job.base_url)
            .with_context(|| format!("the job record's base URL {:?}", job.base_url))?;
        (base, job.request.clone(), Some(job))
    } else {
        let base = c.base_url.clone().expect("validated");
        let request = c.request.take().expect("validated");
        let request = resolve_since_auto(&c.location, base.as_str(), request).await?;
        // The same command again continues the job it left unfinished.
        let same = find_unfinished(&c.location, Some((base.as_str(), &request))).await?;
        let busy = match &same {
            Some(job) => job.holder(&c.location).await?.is_some(),
            None => false,
        };
        match &same {
            Some(job) if !busy && job.state == flatfhir::dataset::JobState::Created => {
                // Stopped before the server accepted the kick-off: nothing to continue.
                logging::say(
                    tracing::Level::INFO,
                    "an earlier run of this export stopped before the server accepted it; \
                     starting it again",
                );
            }
            Some(_) if !busy => logging::say(
                tracing::Level::INFO,
                &format!("continuing the unfinished export job in {}", c.out),
            ),
            _ => {}
        }
        (base, request, same)
    };
    let auth = c.auth(&base, &request)?;
    let a = &c.args;
    let retry = RetryConfig {
        max_retries: a.max_retries,
        max_poll_interval: a.max_poll_interval,
        ..Default::default()
    };
    let built = BulkClientBuilder::new(base)
        .with_auth(auth)
        .with_headers(a.headers.clone())
        .with_retry(retry)
        .with_token_hosts(a.allow_token_host.clone())
        .with_insecure_http(a.allow_insecure_http)
        .with_idle_timeout(a.idle_timeout)
        .with_max_redirects(a.max_redirects)
        .with_max_concurrent_requests(a.max_concurrent_requests.unwrap_or(a.concurrency))
        .build()?;
    let client = client.insert(built).clone();
    let options = ExportOptions {
        concurrency: a.concurrency.max(1),
        timeout: a.timeout,
        delete_after: !a.no_delete,
        keep_ndjson: a.keep_ndjson.clone(),
        coalesce: !a.no_coalesce,
        backfill: !a.no_backfill,
        max_line_bytes: a
            .max_line_bytes
            .unwrap_or(flatfhir::flatten::DEFAULT_MAX_LINE_BYTES),
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let display = progress::ProgressDisplay::start(progress.clone(), 0, 0, quiet);
    let builder = ExportBuilder::new(client, Arc::new(c.registry), c.location);
    // `--resume` continues the job it names or fails; the same command run again (a
    // scheduled run) starts afresh when the server has forgotten the job it left unfinished.
    let builder = if c.resume {
        builder.with_resume(resume)
    } else {
        builder.with_continue(resume)
    };
    let summary = builder
        .with_request(request)
        .with_snapshot(a.snapshot)
        .with_options(options)
        .with_progress(progress)
        .with_ctrl_c(if a.keep_job {
            OnCtrlC::KeepServerJob
        } else {
            OnCtrlC::CancelServerJob
        })
        .run()
        .await;
    display.stop();
    let summary = summary?;
    let outcome = finish_export(&summary, &c.out, a.json, a.max_rejects)?;
    Ok((outcome, summary.manifest))
}

pub fn finish_export(
    summary: &ExportSummary,
    out: &str,
    json: bool,
    max_rejects: Option<u64>,
) -> Result<Outcome> {
    let m = &summary.manifest;
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, m)?;
        writeln!(stdout)?;
    } else {
        output::write_accounting(&mut stdout, m, out)?;
        if let Some(t) = &m.transaction_time {
            match flatfhir::run::export::since_auto_start(m) {
                Some(r) if r != *t => writeln!(
                    stdout,
                    "transactionTime {t}; bounded by --until, so the next run with --since auto \
                     starts at {r}"
                )?,
                _ => writeln!(
                    stdout,
                    "transactionTime {t} (the next run with --since auto starts here)"
                )?,
            }
        }
        if m.deleted > 0 {
            writeln!(
                stdout,
                "{} deleted resources listed by the server: table `_deleted`",
                m.deleted
            )?;
        }
        if let Some(b) = &m.backfill {
            writeln!(
                stdout,
                "Group members: {} now, {} new since the earlier runs{}",
                b.members,
                b.new_members,
                if b.runs.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; their whole history came first, in run {}",
                        b.runs.join(", ")
                    )
                }
            )?;
        }
        if m.snapshot {
            let removed: u64 = m.snapshot_removed.values().sum();
            let by_type: Vec<String> = m
                .snapshot_removed
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect();
            writeln!(
                stdout,
                "snapshot: {removed} resources no longer exported removed from the current state{}",
                if by_type.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", by_type.join(", "))
                }
            )?;
        }
        for (sev, n) in &m.outcomes {
            writeln!(
                stdout,
                "server outcome issues, {sev}: {n} (table `_outcomes`)"
            )?;
        }
        for w in &m.warnings {
            writeln!(stdout, "warning: {w}")?;
        }
    }
    if summary.server_errors {
        logging::say(
            tracing::Level::ERROR,
            "the server reported fatal or error issues for this export (see table `_outcomes`)",
        );
        return Ok(Outcome::RejectsExceeded);
    }
    Ok(check_rejects(m, max_rejects))
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use clap::FromArgMatches;

    use super::*;
    use crate::cli::profile::tests::nightly;

    /// `flatfhir export ARGS…` with profile `epic-prod` of the shared test file applied.
    fn with_profile(args: &[&str]) -> Box<ExportArgs> {
        let cmd = super::super::Cli::command_line();
        let m = cmd
            .try_get_matches_from(["flatfhir", "export"].iter().chain(args))
            .unwrap();
        let m = m.subcommand_matches("export").unwrap();
        let mut a = Box::new(ExportArgs::from_arg_matches(m).unwrap());
        a.apply(nightly("epic-prod"), m).unwrap();
        a
    }

    #[test]
    fn the_profile_fills_what_the_command_line_leaves_unset() {
        let a = with_profile(&[]);
        assert_eq!(a.base_url.as_deref(), Some("https://ehr.example/fhir"));
        let r = a.request().unwrap();
        assert_eq!(r.level, Some(ExportLevel::Group("cohort-1".into())));
        assert_eq!(r.types, ["Patient", "Observation"]);
        assert_eq!(r.since.as_deref(), Some("auto"));
        assert_eq!(r.params, [("_flatfhirFault".into(), "slow:1".into())]);
        assert_eq!(a.client_id.as_deref(), Some("flatfhir"));
        let key = Path::new("/etc/flatfhir/keys/private-key.pem");
        assert_eq!(a.private_key.as_deref(), Some(key));
        assert_eq!(a.out.as_deref(), Some("/etc/flatfhir/warehouse"));
        assert_eq!(a.concurrency, 2, "a profile value beats a built-in default");
        assert_eq!(a.max_retries, 8);
        assert_eq!(a.timeout, Duration::from_secs(12 * 3600));
        assert!(a.no_delete && a.schema.no_raw);
        // Unset in the profile: the built-in defaults stay.
        assert_eq!(a.idle_timeout, Duration::from_secs(300));
        assert_eq!(a.max_redirects, flatfhir::client::DEFAULT_MAX_REDIRECTS);
    }

    #[test]
    fn a_snapshot_on_the_command_line_drops_the_profiles_since() {
        let a = with_profile(&["--snapshot"]);
        assert!(a.snapshot);
        assert_eq!(a.request().unwrap().since, None);
    }

    #[test]
    fn command_line_flags_override_the_profile() {
        let a = with_profile(&[
            "--base-url",
            "https://other.example/fhir",
            "--patients",
            "--type",
            "Condition",
            "--max-retries",
            "1",
            "--concurrency",
            "4",
            "--header",
            "x-tenant: b",
            "--store-option",
            "aws_region=us-east-1",
            "--out",
            "elsewhere",
        ]);
        assert_eq!(a.base_url.as_deref(), Some("https://other.example/fhir"));
        let r = a.request().unwrap();
        assert_eq!(r.level, Some(ExportLevel::Patients), "the level as a whole");
        assert_eq!(a.group, None);
        assert_eq!(r.types, ["Condition"], "a list replaces the profile's");
        assert_eq!(r.since.as_deref(), Some("auto"), "what no flag named stays");
        assert_eq!(a.max_retries, 1);
        assert_eq!(
            a.concurrency, 4,
            "even when the flag gives the default value"
        );
        assert_eq!(a.out.as_deref(), Some("elsewhere"));
        // Headers and store options: the command line's replace the profile's of that name.
        let mut h = a.headers.clone();
        h.sort();
        assert_eq!(
            h,
            [
                ("X-Site".into(), "north".into()),
                ("x-tenant".into(), "b".into())
            ]
        );
        let mut o = a.store.store_options.clone();
        o.sort();
        assert_eq!(
            o,
            [
                ("aws_endpoint".into(), "http://minio:9000".into()),
                ("aws_region".into(), "us-east-1".into())
            ]
        );
    }

    #[test]
    fn a_switch_the_profile_turns_on_is_turned_off_with_false() {
        let a = with_profile(&[]);
        assert!(a.no_delete && a.schema.no_raw && !a.keep_job);
        let a = with_profile(&["--no-delete=false", "--no-raw=false", "--keep-job"]);
        assert!(!a.no_delete && !a.schema.no_raw && a.keep_job);
        let a = with_profile(&["--no-delete=true", "--keep-job=false"]);
        assert!(a.no_delete && !a.keep_job);
        // A value only with `=`: no flag swallows the word after it.
        let cmd = super::super::Cli::command_line();
        assert!(
            cmd.try_get_matches_from(["flatfhir", "export", "--keep-job", "false"])
                .is_err()
        );
        let help = super::super::Cli::command_line()
            .find_subcommand_mut("export")
            .unwrap()
            .render_help()
            .to_string();
        assert!(help.contains("--keep-job[=<BOOL>]"), "{help}");
    }

    #[test]
    fn a_way_of_authorizing_on_the_command_line_replaces_the_profiles() {
        let a = with_profile(&["--bearer-token", "t"]);
        assert_eq!(a.bearer_token.as_deref(), Some("t"));
        assert_eq!((a.client_id, a.private_key), (None, None));
        // The other SMART settings stay; without a client id they are not used.
        assert_eq!(a.scope.as_deref(), Some("system/*.rs"));

        let a = with_profile(&["--private-key", "/other/key.pem"]);
        assert_eq!(a.private_key.as_deref(), Some(Path::new("/other/key.pem")));
        assert_eq!(a.client_id.as_deref(), Some("flatfhir"));
    }

    #[test]
    fn without_a_profile_nothing_changes_and_auth_pairs_are_checked() {
        let cmd = super::super::Cli::command_line();
        let parse = |args: &[&str]| {
            let m = cmd
                .clone()
                .try_get_matches_from(["flatfhir", "export"].iter().chain(args))
                .unwrap();
            let m = m.subcommand_matches("export").unwrap().clone();
            let a = Box::new(ExportArgs::from_arg_matches(&m).unwrap());
            a.with_profile(&m).unwrap()
        };
        let a = parse(&["--base-url", "http://x/fhir", "--system", "--out", "d"]);
        assert_eq!(a.concurrency, flatfhir::run::export::DEFAULT_CONCURRENCY);
        let err = |args: &[&str]| match parse(args).validate() {
            Ok(_) => panic!("{args:?} validated"),
            Err(e) => e.to_string(),
        };
        let base = ["--base-url", "http://x/fhir", "--system", "--out"];
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().to_str().unwrap();
        let e = err(&[&base[..], &[out, "--client-id", "c"]].concat());
        assert!(e.contains("--client-id needs --private-key"), "{e}");
        let e = err(&[&base[..], &[out, "--private-key", "k.pem"]].concat());
        assert!(e.contains("--private-key needs --client-id"), "{e}");
        let e = err(&[
            &base[..],
            &[
                out,
                "--bearer-token",
                "t",
                "--client-id",
                "c",
                "--private-key",
                "k",
            ],
        ]
        .concat());
        assert!(e.contains("choose one way to authorize"), "{e}");
        let e = err(&["--system", "--out", out]);
        assert!(e.contains("--base-url is required"), "{e}");
    }
}
