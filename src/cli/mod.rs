//! The command-line surface (binary-only: the one place that uses anyhow, prints to stdout and
//! decides exit codes).

pub mod logging;
mod output;
mod progress;

use std::{
    io::{IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use flatfhir::{
    auth::{PrivateKey, SigningAlg},
    client::{
        Auth, BulkClientBuilder, ExportLevel, ExportRequest, RetryConfig, SmartAuth, SmartConfig,
        smart::export_scope,
    },
    export::{ExportOptions, JobRecord},
    flatten::{DecodeStats, DecoderBuilder},
    pipeline::{self, ConvertOptions, Progress},
    query::Dataset,
    serve::{AuthClient, DataSource, ServerBuilder},
    sink::{DatasetLocation, RunManifest},
    view::{CompiledView, ViewRegistry},
};

/// flatfhir — FHIR Bulk Data (ndjson) → SQL-on-FHIR views → Hive-partitioned Parquet → SQL.
#[derive(Debug, Parser)]
#[command(name = "flatfhir", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output on stderr (-q errors only and no progress, -qq nothing).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Bulk Data $export against a FHIR server and stream it into a Parquet dataset.
    Export(Box<ExportArgs>),
    /// Convert ndjson files (or folders of them) into a Parquet dataset, one table per view.
    Convert(ConvertArgs),
    /// Run SQL over a dataset; every view is a table named by its ViewDefinition `name`.
    Query(QueryArgs),
    /// Run one ViewDefinition over ndjson input and print its rows.
    View(ViewArgs),
    /// List or show the views in use.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Serve a folder of ndjson as a FHIR Bulk Data server (for tests and for other clients).
    Serve(ServeArgs),
    /// Rewrite the many small files of a dataset into fewer large ones (atomically for `query`).
    Compact(CompactArgs),
    /// Start the built-in server on the bundled sample, export a Group from it into
    /// ./flatfhir-demo through the whole pipeline, and query the result.
    Demo(DemoArgs),
    /// SMART Backend Services keys: generate a key pair and the JWKS to register.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Write a new private key (private-key.pem, mode 0600) and its public JWKS (jwks.json) into
    /// DIR, and print the key id (kid). Register jwks.json with the FHIR server.
    Generate {
        /// Signing algorithm: ES384 (EC P-384) or RS384 (RSA 2048).
        #[arg(long, value_enum, default_value = "ES384")]
        alg: SigningAlg,
        /// Folder for the key files.
        #[arg(long, short, value_name = "DIR")]
        out: PathBuf,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("level").args(["system", "patients", "group"]))]
struct ExportArgs {
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
    /// Object store option KEY=VALUE, e.g. aws_endpoint=http://127.0.0.1:9000 (repeatable;
    /// credentials and endpoints also come from the cloud's standard environment variables).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_kv)]
    store_options: Vec<(String, String)>,
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
    #[arg(long, default_value_t = flatfhir::export::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Give up on the whole job after this long (e.g. 90s, 30m, 12h, 7d).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    timeout: std::time::Duration,
    /// Longest wait between status polls, whatever Retry-After says.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    max_poll_interval: std::time::Duration,
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
    #[command(flatten)]
    schema: SchemaArgs,
    /// Fail (exit code 1) when more than N lines are rejected; the run is still written.
    #[arg(long, value_name = "N")]
    max_rejects: Option<u64>,
    /// Print the run manifest as JSON on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Folder of ndjson files (.ndjson, .ndjson.gz) to serve.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// How long each job stays "in progress" (e.g. 2s, 1m); with 0s the first status request
    /// gets the manifest.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    delay: std::time::Duration,
    /// Resources per output file.
    #[arg(long, default_value_t = flatfhir::serve::DEFAULT_RESOURCES_PER_FILE)]
    resources_per_file: usize,
    /// Output files per manifest page (paged manifests with link[next]).
    #[arg(long)]
    files_per_page: Option<usize>,
    /// Require this bearer token on every FHIR request.
    #[arg(long, env = "FLATFHIR_SERVE_TOKEN", hide_env_values = true)]
    bearer_token: Option<String>,
    /// Set requiresAccessToken=true in manifests (file downloads then need the token).
    #[arg(long)]
    requires_access_token: bool,
    /// SMART Backend Services: accept assertions signed by a key of this public JWKS, for any
    /// client id (repeatable).
    #[arg(long, value_name = "FILE")]
    auth_jwks: Vec<PathBuf>,
    /// SMART Backend Services: register client ID with the public keys in JWKS_FILE (repeatable).
    #[arg(long, value_name = "ID=JWKS_FILE", value_parser = parse_kv)]
    auth_client: Vec<(String, String)>,
    /// Scopes registered clients may be granted (repeatable) [default: system/*.read, system/*.rs].
    #[arg(long, value_name = "SCOPE")]
    auth_scope: Vec<String>,
    /// Lifetime of the access tokens the token endpoint issues.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    token_lifetime: std::time::Duration,
    /// SMART scope syntax the token endpoint accepts: both, v1 (system/*.read) or v2
    /// (system/*.rs); a scope in the other syntax is refused with invalid_scope.
    #[arg(long, default_value = "both", value_parser = parse_scope_syntax)]
    scope_syntax: flatfhir::serve::ScopeSyntax,
}

fn parse_scope_syntax(s: &str) -> Result<flatfhir::serve::ScopeSyntax, String> {
    use flatfhir::serve::ScopeSyntax;
    match s {
        "both" => Ok(ScopeSyntax::Both),
        "v1" => Ok(ScopeSyntax::V1),
        "v2" => Ok(ScopeSyntax::V2),
        other => Err(format!("unknown scope syntax {other:?} (both, v1, v2)")),
    }
}

#[derive(Debug, Args)]
struct SchemaArgs {
    /// Folder of ViewDefinition JSON files: adds views, or replaces built-in ones of the same name.
    #[arg(long, value_name = "DIR", env = "FLATFHIR_SCHEMAS")]
    schemas: Option<PathBuf>,
    /// Do not add the raw `resource` JSON column to base views.
    #[arg(long)]
    no_raw: bool,
}

impl SchemaArgs {
    fn registry(&self) -> Result<ViewRegistry> {
        let mut reg = ViewRegistry::builtin()?.with_raw(!self.no_raw);
        if let Some(dir) = &self.schemas {
            reg.add_dir(dir)?;
        }
        Ok(reg)
    }
}

#[derive(Debug, Args)]
struct ConvertArgs {
    /// Input ndjson files (.ndjson, .ndjson.gz) or folders searched recursively for them.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output dataset: a folder (created if missing) or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    out: String,
    /// Object store option KEY=VALUE (repeatable; see `export --help`).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_kv)]
    store_options: Vec<(String, String)>,
    #[command(flatten)]
    schema: SchemaArgs,
    /// Fail (exit code 1) when more than N lines are rejected; the run is still written.
    #[arg(long, value_name = "N")]
    max_rejects: Option<u64>,
    /// Parquet compression: zstd, zstd:LEVEL, snappy or none.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compression: parquet::basic::Compression,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = flatfhir::sink::DEFAULT_ROW_GROUP_ROWS)]
    row_group_size: usize,
    /// Rows per RecordBatch.
    #[arg(long, default_value_t = flatfhir::flatten::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// Decode threads [default: number of cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Print the run manifest as JSON on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueryFormat {
    /// Aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// Dataset written by `convert` or `export`: a folder or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    data: String,
    /// Object store option KEY=VALUE (repeatable; see `export --help`).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_kv)]
    store_options: Vec<(String, String)>,
    /// SQL statement; `-` or nothing reads it from stdin.
    sql: Option<String>,
    /// Read the SQL from a file.
    #[arg(long, short, value_name = "FILE", conflicts_with = "sql")]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: QueryFormat,
}

#[derive(Debug, Args)]
struct CompactArgs {
    /// Dataset: a folder or a URL (s3://, gs://, az://, …).
    #[arg(long, short, value_name = "DIR")]
    data: String,
    /// Object store option KEY=VALUE (repeatable; see `export --help`).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_kv)]
    store_options: Vec<(String, String)>,
    /// Rewrite a partition (one view, one run) when it has at least this many files.
    #[arg(long, default_value_t = flatfhir::compact::DEFAULT_MIN_FILES)]
    min_files: usize,
    /// Only this view (repeatable, or comma-separated); default all.
    #[arg(long = "view", value_name = "NAME", value_delimiter = ',')]
    views: Vec<String>,
    /// Keep only the rows of `<view>_latest` (drops older versions and deleted resources).
    #[arg(long)]
    latest_only: bool,
    /// Parquet compression: zstd, zstd:LEVEL, snappy or none.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compression: parquet::basic::Compression,
    /// Print the compaction record as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ViewFormat {
    /// One JSON object per row, keys in column order.
    Ndjson,
    /// CSV with a header.
    Csv,
    /// A Parquet file (needs --out).
    Parquet,
}

#[derive(Debug, Args)]
struct ViewArgs {
    /// The ViewDefinition JSON file.
    #[arg(long, value_name = "FILE")]
    view: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "ndjson")]
    format: ViewFormat,
    /// Write to this file instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Input ndjson files or folders.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// List the views: name, resource type, columns, origin.
    List(SchemaArgs),
    /// Show one view's columns.
    Show {
        /// View name.
        name: String,
        #[command(flatten)]
        schema: SchemaArgs,
    },
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Where to write the demo dataset.
    #[arg(long, default_value = "flatfhir-demo")]
    out: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once(':')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected NAME:VALUE, got {s:?}"))
}

/// `90s`, `30m`, `12h`, `7d`, or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 90s, 30m, 12h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h, d)")),
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn parse_compression(s: &str) -> Result<parquet::basic::Compression, String> {
    use parquet::basic::{Compression, ZstdLevel};
    match s.split_once(':') {
        None if s == "zstd" => Ok(Compression::ZSTD(ZstdLevel::default())),
        None if s == "snappy" => Ok(Compression::SNAPPY),
        None if s == "none" || s == "uncompressed" => Ok(Compression::UNCOMPRESSED),
        Some(("zstd", l)) => {
            let level: i32 = l.parse().map_err(|_| format!("bad zstd level {l:?}"))?;
            ZstdLevel::try_new(level)
                .map(Compression::ZSTD)
                .map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "unknown compression {s:?} (zstd, zstd:LEVEL, snappy, none)"
        )),
    }
}

/// How a successful command ended.
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: the run finished, but rejects exceeded the limit.
    RejectsExceeded,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Outcome::Success => ExitCode::SUCCESS,
            Outcome::RejectsExceeded => ExitCode::from(1),
        }
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let quiet = cli.quiet > 0;
    match cli.command {
        Command::Export(a) => rt.block_on(export(*a, quiet)),
        Command::Serve(a) => rt.block_on(serve(a)),
        Command::Convert(a) => rt.block_on(convert(a, quiet)),
        Command::Query(a) => rt.block_on(query(a)),
        Command::View(a) => view(a),
        Command::Schemas(SchemasCommand::List(s)) => schemas_list(&s),
        Command::Schemas(SchemasCommand::Show { name, schema }) => schemas_show(&name, &schema),
        Command::Compact(a) => rt.block_on(compact(a)),
        Command::Demo(a) => rt.block_on(demo(a, quiet)),
        Command::Keys(KeysCommand::Generate { alg, out, force }) => keys_generate(alg, &out, force),
    }
}

fn keys_generate(alg: SigningAlg, out: &std::path::Path, force: bool) -> Result<Outcome> {
    let (key, key_path, jwks_path) = flatfhir::auth::generate_key_files(alg, out, force)?;
    eprintln!(
        "flatfhir keys: wrote the private key {} (keep it secret) and the public JWKS {} \
         (register it with the FHIR server); {alg} key id:",
        key_path.display(),
        jwks_path.display()
    );
    println!("{}", key.kid());
    Ok(Outcome::Success)
}

/// The export's authorization from the command line: SMART Backend Services, a static bearer
/// token, or none.
fn export_auth(a: &ExportArgs, base: &url::Url, request: &ExportRequest) -> Result<Auth> {
    if let (Some(client_id), Some(key_path)) = (&a.client_id, &a.private_key) {
        flatfhir::auth::warn_if_key_readable_by_others(key_path);
        let key = PrivateKey::load(key_path, a.kid.as_deref())?;
        if let Some(alg) = a.alg
            && alg != key.alg()
        {
            bail!(
                "--alg {alg} does not fit the key in {} (it signs {})",
                key_path.display(),
                key.alg()
            );
        }
        let token_url = a
            .token_url
            .as_deref()
            .map(|u| url::Url::parse(u).with_context(|| format!("invalid --token-url {u:?}")))
            .transpose()?;
        let group = matches!(request.level, Some(ExportLevel::Group(_)));
        let cfg = SmartConfig {
            scope: export_scope(a.scope.as_deref(), a.smart_v2, group),
            token_url,
            jku: a.jku.clone(),
            allow_insecure_http: a.allow_insecure_http,
            ..SmartConfig::new(client_id.clone(), key)
        };
        return Ok(Auth::Smart(Arc::new(SmartAuth::new(cfg, base.clone())?)));
    }
    Ok(match &a.bearer_token {
        Some(t) => Auth::Bearer(t.clone()),
        None => Auth::None,
    })
}

impl ExportArgs {
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

async fn export(a: ExportArgs, quiet: bool) -> Result<Outcome> {
    let registry = Arc::new(a.schema.registry()?);
    let out = a
        .resume
        .clone()
        .or_else(|| a.out.clone())
        .context("--out DIR is required")?;
    let location = DatasetLocation::resolve_with_options(&out, &a.store_options, true)?;
    let unfinished = JobRecord::latest_unfinished(&location).await?;
    let (base, request, resume) = if a.resume.is_some() {
        let job = unfinished.context(format!("no unfinished export job in {out}"))?;
        (job.base_url.clone(), job.request.clone(), Some(job))
    } else {
        let base = a.base_url.clone().context("--base-url is required")?;
        let request = flatfhir::export::resolve_since_auto(&location, &base, a.request()?).await?;
        // The same command again continues the job it left unfinished.
        let same = unfinished.filter(|j| {
            j.request == request && j.base_url.trim_end_matches('/') == base.trim_end_matches('/')
        });
        if same.is_some() {
            eprintln!("flatfhir: continuing the unfinished export job in {out}");
        }
        (base, request, same)
    };
    let base = url::Url::parse(&base).with_context(|| format!("invalid --base-url {base:?}"))?;
    let auth = export_auth(&a, &base, &request)?;
    let retry = RetryConfig {
        max_retries: a.max_retries,
        max_poll_interval: a.max_poll_interval,
        ..Default::default()
    };
    let client = BulkClientBuilder::new(base)
        .with_auth(auth)
        .with_headers(a.headers.clone())
        .with_retry(retry)
        .with_token_hosts(a.allow_token_host.clone())
        .build()?;
    let opts = ExportOptions {
        concurrency: a.concurrency.max(1),
        timeout: a.timeout,
        delete_after: !a.no_delete,
        keep_ndjson: a.keep_ndjson.clone(),
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let display = progress::ProgressDisplay::start(progress.clone(), 0, 0, quiet);
    let run = flatfhir::export::run_export(
        client.clone(),
        request,
        registry,
        location.clone(),
        opts,
        progress,
        resume,
    );
    let summary = tokio::select! {
        r = run => {
            display.stop();
            r?
        }
        _ = tokio::signal::ctrl_c() => {
            display.stop();
            if let Some(job) = JobRecord::latest_unfinished(&location).await? {
                if a.keep_job {
                    eprintln!("flatfhir: interrupted; the server job is kept: continue with `flatfhir export --resume {out}`");
                } else if let Some(s) = job.status_url.as_deref().and_then(|s| url::Url::parse(s).ok()) {
                    match client.delete(&s).await {
                        Ok(()) => eprintln!("flatfhir: interrupted; the export job was cancelled on the server"),
                        Err(e) => eprintln!("flatfhir: interrupted; cancelling the server job failed: {e}"),
                    }
                }
            }
            bail!("interrupted");
        }
    };
    finish_export(&summary, &out, a.json, a.max_rejects)
}

fn finish_export(
    summary: &flatfhir::export::ExportSummary,
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
        eprintln!(
            "error: the server reported fatal or error issues for this export (see table `_outcomes`)"
        );
        return Ok(Outcome::RejectsExceeded);
    }
    Ok(check_rejects(m, max_rejects))
}

/// The SMART clients `serve` registers from `--auth-jwks` / `--auth-client`.
fn serve_clients(a: &ServeArgs) -> Result<Vec<AuthClient>> {
    let clients = a
        .auth_jwks
        .iter()
        .map(|p| (None, PathBuf::from(p)))
        .chain(
            a.auth_client
                .iter()
                .map(|(id, p)| (Some(id.clone()), PathBuf::from(p))),
        )
        .map(|(id, path)| {
            let c = AuthClient::from_jwks_file(id, &path)?;
            Ok(if a.auth_scope.is_empty() {
                c
            } else {
                c.with_allowed_scopes(a.auth_scope.clone())
            })
        })
        .collect::<Result<Vec<_>, flatfhir::serve::ServeError>>()?;
    Ok(clients)
}

async fn serve(a: ServeArgs) -> Result<Outcome> {
    let server = ServerBuilder::new(DataSource::Dir(a.data.clone()))
        .with_addr(a.addr)
        .with_delay(a.delay)
        .with_resources_per_file(a.resources_per_file.max(1))
        .with_files_per_page(a.files_per_page)
        .with_bearer_token(a.bearer_token.clone())
        .with_smart_clients(serve_clients(&a)?)
        .with_token_lifetime(a.token_lifetime)
        .with_scope_syntax(a.scope_syntax);
    let server = if a.requires_access_token {
        server.with_requires_access_token(true)
    } else {
        server
    };
    let server = server.start().await?;
    let counts = server.counts();
    eprintln!(
        "flatfhir serve: {} resources of {} types from {} at {} (Ctrl-C stops)",
        counts.values().sum::<u64>(),
        counts.len(),
        a.data.display(),
        server.base_url()
    );
    if !a.auth_jwks.is_empty() || !a.auth_client.is_empty() {
        eprintln!(
            "flatfhir serve: SMART Backend Services on; token endpoint {} (tokens last {:?})",
            server.token_url(),
            a.token_lifetime
        );
    }
    println!("{}", server.base_url());
    server.wait().await;
    Ok(Outcome::Success)
}

async fn run_convert(
    files: Vec<PathBuf>,
    registry: ViewRegistry,
    (out, store_options): (&str, &[(String, String)]),
    opts: ConvertOptions,
    quiet: bool,
) -> Result<RunManifest> {
    if files.is_empty() {
        bail!("no input files (looked for *.ndjson, *.ndjson.gz, *.jsonl, *.jsonl.gz)");
    }
    let location = DatasetLocation::resolve_with_options(out, store_options, true)?;
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let progress = Arc::new(Progress::default());
    let display =
        progress::ProgressDisplay::start(progress.clone(), total, files.len() as u64, quiet);
    tracing::info!(files = files.len(), bytes = total, out, "converting");
    let r = pipeline::convert(files, Arc::new(registry), location, opts, progress).await;
    display.stop();
    Ok(r?)
}

async fn convert(a: ConvertArgs, quiet: bool) -> Result<Outcome> {
    let registry = a.schema.registry()?;
    let files = pipeline::expand_inputs(&a.inputs)?;
    let mut opts = ConvertOptions {
        batch_size: a.batch_size.max(1),
        compression: a.compression,
        row_group_rows: a.row_group_size.max(1),
        ..Default::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    let manifest = run_convert(files, registry, (&a.out, &a.store_options), opts, quiet).await?;
    let mut stdout = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut stdout, &manifest)?;
        writeln!(stdout)?;
    } else {
        output::write_accounting(&mut stdout, &manifest, &a.out)?;
    }
    Ok(check_rejects(&manifest, a.max_rejects))
}

fn check_rejects(manifest: &RunManifest, max: Option<u64>) -> Outcome {
    match max {
        Some(max) if manifest.rejects > max => {
            eprintln!(
                "error: {} lines rejected, more than --max-rejects {max}",
                manifest.rejects
            );
            Outcome::RejectsExceeded
        }
        _ => Outcome::Success,
    }
}

async fn query(a: QueryArgs) -> Result<Outcome> {
    let sql = match (&a.sql, &a.file) {
        (_, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (Some(s), None) if s != "-" => s.clone(),
        _ => {
            if std::io::stdin().is_terminal() {
                bail!("no SQL given: pass it as an argument, with --file, or on stdin");
            }
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
    };
    let location = DatasetLocation::resolve_with_options(&a.data, &a.store_options, false)?;
    let ds = Dataset::open(&location).await?;
    if ds.tables().is_empty() {
        tracing::warn!(
            data = a.data,
            "the dataset has no finished runs; no tables are registered"
        );
    }
    let mut last = Vec::new();
    for stmt in split_statements(&sql) {
        last = ds.sql(stmt).await?;
    }
    let mut stdout = std::io::stdout().lock();
    match a.format {
        QueryFormat::Table => output::write_table(&mut stdout, &last)?,
        QueryFormat::Csv => output::write_csv(&mut stdout, &last)?,
        QueryFormat::Json => output::write_ndjson(&mut stdout, &last)?,
    }
    stdout.flush()?;
    Ok(Outcome::Success)
}

/// Split a script on `;` outside quotes; empty statements dropped.
fn split_statements(sql: &str) -> Vec<&str> {
    let (mut out, mut start, mut quote) = (Vec::new(), 0, None::<char>);
    for (i, c) in sql.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ';') => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&sql[start..]);
    out.into_iter()
        .filter(|s| {
            !s.trim().is_empty()
                && !s
                    .lines()
                    .all(|l| l.trim().is_empty() || l.trim().starts_with("--"))
        })
        .collect()
}

async fn compact(a: CompactArgs) -> Result<Outcome> {
    let location = DatasetLocation::resolve_with_options(&a.data, &a.store_options, false)?;
    let opts = flatfhir::compact::CompactOptions {
        min_files: a.min_files.max(1),
        views: a.views.clone(),
        latest_only: a.latest_only,
        compression: a.compression,
        ..Default::default()
    };
    let s = flatfhir::compact::compact(&location, &opts).await?;
    let mut stdout = std::io::stdout().lock();
    match (&s.manifest, a.json) {
        (Some(m), true) => {
            serde_json::to_writer_pretty(&mut stdout, m)?;
            writeln!(stdout)?;
        }
        (Some(m), false) => writeln!(
            stdout,
            "compacted {} partitions of {}: {} files → {} ({} rows → {}); record _compactions/{}.json",
            m.partitions.len(),
            a.data,
            s.files_before,
            s.files_after,
            s.rows.0,
            s.rows.1,
            m.id
        )?,
        (None, _) => writeln!(
            stdout,
            "nothing to compact in {} ({} files; no partition has {} or more)",
            a.data, s.files_before, opts.min_files
        )?,
    }
    if s.not_deleted > 0 {
        eprintln!(
            "warning: {} replaced files could not be deleted (not read any more; the next compact retries)",
            s.not_deleted
        );
    }
    Ok(Outcome::Success)
}

fn view(a: ViewArgs) -> Result<Outcome> {
    let text = std::fs::read_to_string(&a.view)
        .with_context(|| format!("reading {}", a.view.display()))?;
    let view = CompiledView::from_json(&text, &a.view.display().to_string())?;
    let name = view.name().to_string();
    let schema = view.schema().clone();
    let mut reg = ViewRegistry::empty().with_raw(false);
    reg.add_json(&text, &a.view.display().to_string())?;
    let reg = Arc::new(reg);
    let files = pipeline::expand_inputs(&a.inputs)?;
    let progress = Progress::default();
    let mut batches = Vec::new();
    let mut rejects = Vec::new();
    let mut stats = DecodeStats::default();
    for f in &files {
        let label = f.display().to_string();
        let mut input =
            pipeline::open_input(f, &progress).with_context(|| format!("reading {label}"))?;
        let mut d = DecoderBuilder::new(reg.clone(), label.clone())
            .with_only_viewed_types(true)
            .build();
        let mut buf = vec![0u8; pipeline::DEFAULT_CHUNK_BYTES];
        loop {
            let n = input
                .read(&mut buf)
                .with_context(|| format!("reading {label}"))?;
            if n == 0 {
                break;
            }
            d.decode(&buf[..n])?;
            batches.extend(d.take_batches());
        }
        batches.extend(d.finish()?);
        rejects.extend(d.take_rejects());
        stats.merge(d.stats());
    }
    let batches: Vec<_> = batches
        .into_iter()
        .filter(|b| *b.view == *name)
        .map(|b| b.batch)
        .collect();
    if let ViewFormat::Parquet = a.format {
        let Some(p) = &a.out else {
            bail!("--format parquet needs --out FILE")
        };
        let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        output::write_parquet(f, schema, &batches)?;
        return report_view_rejects(&rejects, &stats);
    }
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    match a.format {
        ViewFormat::Ndjson => output::write_view_ndjson(&mut out, &batches)?,
        ViewFormat::Csv => output::write_csv(&mut out, &batches)?,
        ViewFormat::Parquet => unreachable!("handled above"),
    }
    out.flush()?;
    report_view_rejects(&rejects, &stats)
}

fn report_view_rejects(
    rejects: &[flatfhir::flatten::Reject],
    stats: &DecodeStats,
) -> Result<Outcome> {
    for r in rejects {
        eprintln!("{}:{}: {}", r.file, r.line, r.reason);
    }
    if rejects.is_empty() {
        Ok(Outcome::Success)
    } else {
        eprintln!(
            "error: {} of {} resources rejected",
            rejects.len(),
            stats.lines - stats.blank_lines
        );
        Ok(Outcome::RejectsExceeded)
    }
}

fn schemas_list(s: &SchemaArgs) -> Result<Outcome> {
    let reg = s.registry()?;
    let mut out = std::io::stdout().lock();
    let rows: Vec<Vec<String>> = reg
        .views()
        .map(|v| {
            vec![
                v.name().to_string(),
                v.resource().to_string(),
                v.schema().fields().len().to_string(),
                reg.origin(v.name()).unwrap_or_default().to_string(),
            ]
        })
        .collect();
    output::write_text_table(&mut out, &["view", "resource", "columns", "origin"], &rows)?;
    Ok(Outcome::Success)
}

fn schemas_show(name: &str, s: &SchemaArgs) -> Result<Outcome> {
    let reg = s.registry()?;
    let Some(v) = reg.get(name) else {
        bail!("no view named {name:?}; `flatfhir schemas list` shows them");
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} — resource {} ({})",
        v.name(),
        v.resource(),
        reg.origin(name).unwrap_or_default()
    )?;
    if let Some(d) = v.description() {
        writeln!(out, "{d}")?;
    }
    let mut rows: Vec<Vec<String>> = v
        .columns()
        .iter()
        .zip(v.schema().fields())
        .map(|(c, f)| {
            vec![
                c.name.clone(),
                f.data_type().to_string(),
                c.fhir_type.clone(),
                c.path.clone(),
            ]
        })
        .collect();
    if v.raw_column() {
        rows.push(vec![
            "resource".into(),
            "Utf8".into(),
            "json".into(),
            "(the raw resource)".into(),
        ]);
    }
    output::write_text_table(
        &mut out,
        &["column", "arrow type", "fhir type", "path"],
        &rows,
    )?;
    Ok(Outcome::Success)
}

async fn demo(a: DemoArgs, quiet: bool) -> Result<Outcome> {
    let files = flatfhir::sample::files()
        .iter()
        .map(|(name, bytes)| (name.to_string(), bytes::Bytes::from_static(bytes)))
        .collect();
    // SMART Backend Services end to end: a key made for this run, registered with the server.
    let key = PrivateKey::generate(SigningAlg::Es384)?;
    let client_id = "flatfhir-demo";
    let registered =
        AuthClient::from_jwks_json(Some(client_id.into()), &key.public_jwks().to_string())?;
    let kid = key.kid().to_string();
    let server = ServerBuilder::new(DataSource::Files(files))
        .with_delay(std::time::Duration::from_millis(1500))
        .with_resources_per_file(500)
        .with_smart_clients(vec![registered])
        .start()
        .await?;
    eprintln!(
        "flatfhir demo: built-in Bulk Data server on {} with the bundled sample; exporting Group/{} into {}/",
        server.base_url(),
        flatfhir::sample::DEMO_GROUP,
        a.out
    );
    eprintln!(
        "flatfhir demo: authorizing with SMART Backend Services as {client_id:?} (ES384 key generated for this run, kid {kid})"
    );
    let location = DatasetLocation::resolve(&a.out, true)?;
    let smart = SmartAuth::new(
        SmartConfig {
            scope: export_scope(None, false, true),
            ..SmartConfig::new(client_id, key)
        },
        server.base_url().clone(),
    )?;
    let client = BulkClientBuilder::new(server.base_url().clone())
        .with_auth(Auth::Smart(Arc::new(smart)))
        .with_retry(RetryConfig {
            base: std::time::Duration::from_millis(200),
            ..Default::default()
        })
        .build()?;
    let request = ExportRequest {
        level: Some(ExportLevel::Group(flatfhir::sample::DEMO_GROUP.into())),
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let display = progress::ProgressDisplay::start(progress.clone(), 0, 0, quiet);
    let registry = Arc::new(ViewRegistry::builtin()?);
    let summary = flatfhir::export::run_export(
        client,
        request,
        registry,
        location.clone(),
        ExportOptions::default(),
        progress,
        None,
    )
    .await;
    display.stop();
    server.shutdown().await;
    let outcome = finish_export(&summary?, &a.out, false, None)?;
    let ds = Dataset::open(&location).await?;
    let mut stdout = std::io::stdout().lock();
    for (title, sql) in flatfhir::sample::DEMO_QUERIES {
        writeln!(stdout, "\n{title}\n  {sql}")?;
        output::write_table(&mut stdout, &ds.sql(sql).await?)?;
    }
    writeln!(
        stdout,
        "\nTry: flatfhir query --data {} \"select * from observation limit 5\"",
        a.out
    )?;
    Ok(outcome)
}
