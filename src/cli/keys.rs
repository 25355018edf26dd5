//! `flatfhir keys`: SMART Backend Services key pairs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use flatfhir::auth::SigningAlg;

use super::Outcome;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
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

/// Run a `keys` subcommand.
pub fn run(c: KeysCommand) -> Result<Outcome> {
    match c {
        KeysCommand::Generate { alg, out, force } => keys_generate(alg, &out, force),
    }
}
