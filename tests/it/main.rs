//! flatfhir's integration tests: one binary, a module per stage.

mod auth;
mod cli;
mod conformance;
mod convert;
mod export;
mod flatten;
mod support;
