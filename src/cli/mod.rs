//! The command-line surface (binary-only: the one place that uses anyhow, prints to stdout and
//! decides exit codes).
//!
//! Each command is one file: its clap arguments, their conversion into a validated
//! configuration (flags checked, files and keys read, URLs parsed — before any network request
//! or any write), and a short run that calls the library. [`args`] holds what several commands
//! share.

mod args;
mod compact;
mod convert;
#[cfg(feature = "serve")]
mod demo;
mod export;
mod keys;
pub mod logging;
mod migrate;
mod output;
mod profile;
mod progress;
mod query;
mod schemas;
#[cfg(feature = "serve")]
mod serve;
mod view;

use std::process::ExitCode;

use anyhow::Result;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use flatfhir::dataset::RunManifest;

/// flatfhir — FHIR Bulk Data (ndjson) → SQL-on-FHIR views → Delta Lake tables → SQL.
#[derive(Debug, Parser)]
#[command(name = "flatfhir", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output on stderr (-q: errors only, no progress; -qq: no log lines at all — a command
    /// that fails still prints its one error, and `view` its rejected lines).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
    /// Log lines on stderr: text, or json (one object per line: time, level, run_id, message,
    /// fields; no progress bar).
    #[arg(
        long,
        value_enum,
        default_value_t = logging::LogFormat::Text,
        env = "FLATFHIR_LOG_FORMAT",
        global = true
    )]
    pub log_format: logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Bulk Data $export against a FHIR server and stream it into a dataset of Delta tables.
    Export(Box<export::ExportArgs>),
    /// Convert ndjson files (or folders of them) into a dataset of Delta tables, one per view.
    Convert(convert::ConvertArgs),
    /// Run SQL over a dataset; every view is a table named by its ViewDefinition `name`.
    Query(query::QueryArgs),
    /// Run one ViewDefinition over ndjson input and print its rows.
    View(view::ViewArgs),
    /// List or show the views in use.
    #[command(subcommand)]
    Schemas(schemas::SchemasCommand),
    /// Serve a folder of ndjson as a FHIR Bulk Data server (for tests and for other clients).
    #[cfg(feature = "serve")]
    Serve(serve::ServeArgs),
    /// Compact a dataset's Delta tables (OPTIMIZE: small files into large ones, one commit per
    /// table), and with --retain delete the files no retained version needs (VACUUM).
    Compact(compact::CompactArgs),
    /// Convert a dataset written by flatfhir before Delta Lake into Delta tables, in place.
    Migrate(migrate::MigrateArgs),
    /// Start the built-in server on the bundled sample, export a Group from it into
    /// ./flatfhir-demo through the whole pipeline, and query the result.
    #[cfg(feature = "serve")]
    Demo(demo::DemoArgs),
    /// SMART Backend Services keys: generate a key pair and the JWKS to register.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
}

impl Cli {
    /// Parse the process's arguments and keep clap's matches with them: they tell which values
    /// the command line or the environment gave, which a `--profile` must not override.
    pub fn parse_with_matches() -> (Cli, ArgMatches) {
        let matches = Cli::command_line().get_matches();
        match Cli::from_arg_matches(&matches) {
            Ok(cli) => (cli, matches),
            Err(e) => e.format(&mut Cli::command_line()).exit(),
        }
    }

    /// The command line: the derived one, with `export`'s switches negatable
    /// ([`export::negatable_switches`]).
    pub fn command_line() -> clap::Command {
        Cli::command().mut_subcommand("export", export::negatable_switches)
    }
}

/// How a command that ran to its end went.
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: the run finished and is stored, but rejects exceeded `--max-rejects` (or the
    /// server reported fatal/error issues).
    RejectsExceeded,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code())
    }

    /// The process exit code, as a number.
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::RejectsExceeded => 1,
        }
    }
}

/// The exit code of a command that failed: 3 when the same export is being run by another
/// process (nothing was done), else 2.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    let busy = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<flatfhir::Error>(),
            Some(flatfhir::Error::Export(
                flatfhir::run::export::ExportError::Busy { .. }
            ))
        )
    });
    if busy { 3 } else { 2 }
}

/// Run the command; `matches` are the ones `cli` was made from.
pub fn run(cli: Cli, matches: &ArgMatches) -> Result<Outcome> {
    // JSON logs are read by machines: no progress bar between their lines.
    let quiet = cli.quiet > 0 || cli.log_format == logging::LogFormat::Json;
    // Commands that need no runtime run without one.
    match cli.command {
        Command::Schemas(c) => return schemas::run(c),
        Command::Keys(c) => return keys::run(c),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        match cli.command {
            Command::Export(a) => {
                let m = matches.subcommand_matches("export").unwrap_or(matches);
                let (metrics, out) = a.metrics();
                let a = match a.with_profile(m) {
                    Ok(a) => a,
                    Err(e) => return Err(metrics.failed_early("export", &out, e)),
                };
                // The profile may name the metrics file and the dataset.
                let (metrics, out) = a.metrics();
                match a.validate() {
                    Ok(c) => export::run(c, quiet).await,
                    Err(e) => Err(metrics.failed_early("export", &out, e)),
                }
            }
            #[cfg(feature = "serve")]
            Command::Serve(a) => serve::run(a).await,
            Command::Convert(a) => {
                let (metrics, out) = a.metrics();
                match a.validate() {
                    Ok(c) => convert::run(c, quiet).await,
                    Err(e) => Err(metrics.failed_early("convert", &out, e)),
                }
            }
            Command::Query(a) => query::run(a.validate()?).await,
            Command::View(a) => view::run(a.validate()?).await,
            Command::Compact(a) => compact::run(a.validate()?).await,
            Command::Migrate(a) => migrate::run(a.validate()?).await,
            #[cfg(feature = "serve")]
            Command::Demo(a) => demo::run(a, quiet).await,
            Command::Schemas(_) | Command::Keys(_) => unreachable!("ran above"),
        }
    });
    // Dropping the runtime waits for its blocking threads (decoders, file writers); after a
    // second Ctrl-C the user asked not to wait for anything.
    if result.as_ref().is_err_and(interrupted_twice) {
        rt.shutdown_background();
    }
    result
}

fn interrupted_twice(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<flatfhir::Error>(),
            Some(flatfhir::Error::Export(
                flatfhir::run::export::ExportError::InterruptedTwice { .. }
            ))
        )
    })
}

/// Exit code 1 when a run rejected more lines than `max`.
fn check_rejects(manifest: &RunManifest, max: Option<u64>) -> Outcome {
    match max {
        Some(max) if manifest.rejects + manifest.view_rejects > max => {
            logging::say(
                tracing::Level::ERROR,
                &format!(
                    "{} rejects ({} lines, {} resources a view failed on), more than --max-rejects {max}",
                    manifest.rejects + manifest.view_rejects,
                    manifest.rejects,
                    manifest.view_rejects
                ),
            );
            Outcome::RejectsExceeded
        }
        _ => Outcome::Success,
    }
}
