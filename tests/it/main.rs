//! flatfhir's integration tests: one binary, a module per stage.

mod cli;
mod convert;
mod flatten;
mod support;
