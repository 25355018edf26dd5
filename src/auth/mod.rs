//! SMART Backend Services keys and client assertions, shared by the export client
//! ([`crate::client::SmartAuth`]) and the built-in server's token endpoint ([`crate::serve`]).
//!
//! Bulk export is a server-to-server job: nobody clicks "allow". The client proves who it is
//! with a short-lived JWT signed by its private key (RS384 or ES384, both required by SMART),
//! exchanges it for an access token with `system/` scopes, and repeats that whenever the token
//! runs out — real tokens last five minutes, exports last hours. This module holds the parts
//! that know about keys and JWTs; the HTTP exchanges live with the client and the server.
//!
//! Secrets never reach a log: [`PrivateKey`]'s `Debug` shows only the algorithm and `kid`.

mod keys;

pub(crate) use keys::random_hex;
pub use keys::{
    ASSERTION_LIFETIME, AssertionClaims, PrivateKey, SigningAlg, generate_key_files,
    jwk_thumbprint, warn_if_key_readable_by_others,
};

/// Errors of key handling and assertion signing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A key file could not be read.
    #[error("cannot read the key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key could not be used.
    #[error("key {what}: {message}")]
    Key {
        /// The file or a description of the key.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Signing failed.
    #[error("cannot sign the client assertion: {0}")]
    Sign(String),
}
