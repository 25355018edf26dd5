//! `flatfhir serve`: the built-in Bulk Data server.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use flatfhir::serve::{AuthClient, DataSource, ServerBuilder};

use super::{
    Outcome,
    args::{parse_bytes, parse_duration, parse_kv},
};

#[derive(Debug, Args)]
pub struct ServeArgs {
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
    /// Send each file download at most this fast (bytes per second on the wire, e.g. 2MB), as
    /// an EHR's file storage does; default: as fast as the client reads. Benchmarks of a
    /// client against a local server use it so that the server does not compete for the cores.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    file_rate: Option<u64>,
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

pub async fn run(a: ServeArgs) -> Result<Outcome> {
    let server = ServerBuilder::new(DataSource::Dir(a.data.clone()))
        .with_addr(a.addr)
        .with_delay(a.delay)
        .with_resources_per_file(a.resources_per_file.max(1))
        .with_files_per_page(a.files_per_page)
        .with_bearer_token(a.bearer_token.clone())
        .with_smart_clients(serve_clients(&a)?)
        .with_token_lifetime(a.token_lifetime)
        .with_scope_syntax(a.scope_syntax)
        .with_file_rate(a.file_rate);
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
