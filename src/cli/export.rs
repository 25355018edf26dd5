//! `flatfhir export`: a Bulk Data export into a dataset.

use std::{io::Write, path::PathBuf, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::Args;
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
    args::{MetricsArgs, SchemaArgs, StoreArgs, parse_duration, parse_header, parse_kv},
    check_rejects, logging, output, progress,
};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("level").args(["system", "patients", "group"]))]
pub struct ExportArgs {
    /// FHIR base URL of the server (e.g. https://ehr.example/fhir).
    #[arg(long, env = "FLATFHIR_BASE_URL", required_unless_present = "resume")]
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
    #[arg(long, short, value_name = "DIR", required_unless_present = "resume")]
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
        help_heading = "Authorization",
        conflicts_with = "client_id"
    )]
    bearer_token: Option<String>,
    /// SMART Backend Services client id (registered with the server). Needs --private-key.
    #[arg(
        long,
        env = "FLATFHIR_CLIENT_ID",
        help_heading = "Authorization",
        requires = "private_key"
    )]
    client_id: Option<String>,
    /// Private key that signs client assertions: PEM (PKCS#8; RSA or EC P-384) or a JWK / JWKS
    /// file (the key is picked by --kid). Create one with `flatfhir keys generate`.
    #[arg(
        long,
        env = "FLATFHIR_PRIVATE_KEY",
        value_name = "FILE",
        help_heading = "Authorization",
        requires = "client_id"
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
    /// Allow a plain-HTTP token endpoint that is not on loopback (the assertion travels unencrypted).
    #[arg(long, help_heading = "Authorization")]
    allow_insecure_http: bool,
    /// Another host that may receive the access token for file downloads (repeatable).
    #[arg(long, value_name = "HOST", help_heading = "Authorization")]
    allow_token_host: Vec<String>,
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
    /// Longest wait between status polls, whatever Retry-After says.
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
    /// On Ctrl-C keep the server job (for --resume) instead of cancelling it with DELETE.
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

impl ExportArgs {
    /// `--metrics-file` and the dataset it reports on, for a run that fails validation.
    pub fn metrics(&self) -> (MetricsArgs, String) {
        let out = self.resume.as_ref().or(self.out.as_ref());
        (self.metrics.clone(), out.cloned().unwrap_or_default())
    }

    /// Check everything that can be checked without the network.
    pub fn validate(self: Box<Self>) -> Result<ExportConfig> {
        let registry = self.schema.registry()?;
        let resume = self.resume.is_some();
        let out = self
            .resume
            .clone()
            .or_else(|| self.out.clone())
            .context("--out DIR is required")?;
        let location = self.store.location(&out, !resume)?;
        let (base_url, request) = if resume {
            (None, None)
        } else {
            let base = self.base_url.as_deref().context("--base-url is required")?;
            let base = Url::parse(base).with_context(|| format!("invalid --base-url {base:?}"))?;
            let request = self.request()?;
            request.validate()?;
            (Some(base), Some(request))
        };
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
            _ => None,
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
        if same.is_some() {
            logging::say(
                tracing::Level::INFO,
                &format!("continuing the unfinished export job in {}", c.out),
            );
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
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let display = progress::ProgressDisplay::start(progress.clone(), 0, 0, quiet);
    let summary = ExportBuilder::new(client, Arc::new(c.registry), c.location)
        .with_request(request)
        .with_resume(resume)
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
            writeln!(
                stdout,
                "transactionTime {t} (the next run with --since auto starts here)"
            )?;
        }
        if m.deleted > 0 {
            writeln!(
                stdout,
                "{} deleted resources listed by the server: table `_deleted`",
                m.deleted
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
