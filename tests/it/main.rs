//! flatfhir's integration tests: one binary, a module per stage.

mod auth;
mod cli;
mod conformance;
mod convert;
mod delta;
mod downloads;
mod driver;
mod export;
mod flatten;
mod incremental;
mod nightly;
mod profiles;
mod s3;
mod scheduler;
mod store;
mod support;
mod valid_fhir;
