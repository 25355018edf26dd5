//! # flatfhir
//!
//! Moves population-scale FHIR data into columnar analytics. The crate is a pipeline; the module
//! tree follows it stage by stage:
//!
//! ```text
//!  client (Bulk Data $export: kick-off, poll, file bodies)      ndjson files
//!     │ bytes                                                      │ bytes
//!     └──────────────► run::Driver ◄───────────────────────────────┘
//!                        │  decode threads: flatten::Decoder (view: compiled ViewDefinitions)
//!                        ▼  one bounded stream of view batches
//!                      sink::DatasetWriter (Parquet parts) ──► dataset (Delta Lake commits,
//!                                                                 │  current-state tables)
//!                                                                 │
//!                                                   query::Dataset (DataFusion SQL)
//! ```
//!
//! * [`client`] — the FHIR Bulk Data client: kick-off, polling, file downloads, SMART Backend
//!   Services authorization ([`auth`] holds the keys).
//! * [`view`] — SQL-on-FHIR v2 ViewDefinitions, compiled once into Arrow schemas plus evaluators.
//! * [`flatten`] — a push decoder: ndjson bytes in, one `RecordBatch` stream per view out; bad
//!   lines become [`flatten::Reject`] records, never panics or silent drops.
//! * [`sink`] — view batches into Parquet parts, with bounded memory.
//! * [`dataset`] — the lake: every table a Delta Lake table (delta-rs); layout, run ids, one
//!   commit per table per run, the current-state tables, run and job records; every command that
//!   reads or writes a dataset goes through it.
//! * [`run`] — the one driver (input → decode → write) and the commands composed of it:
//!   [`run::convert`], [`run::export`], [`run::view`].
//! * [`query`] — a DataFusion `SessionContext` over a dataset's Delta tables (history and
//!   current state), with time travel.
//! * [`compact`] — Delta OPTIMIZE and VACUUM.
//! * `serve` (cargo feature `serve`, on by default) — a Bulk Data server over a folder of
//!   ndjson, with injectable faults (tests, demos, other clients); [`sample`] is the bundled
//!   sample it serves in `flatfhir demo`.
//!
//! Cargo features (all on by default): `serve` (the built-in server), `cloud` (S3, GCS, Azure
//! and HTTP object stores; local folders and `memory://` need nothing), `jemalloc` (the
//! binary's allocator).
//! * [`error`] — the crate-level [`Error`], one variant per stage.
//!
//! The arrow/parquet/datafusion/object_store versions are pinned together and re-exported, so
//! downstream code never mixes two arrows.
#![deny(rustdoc::broken_intra_doc_links)]

pub mod auth;
pub mod client;
pub mod compact;
pub mod dataset;
pub mod error;
pub mod flatten;
pub mod query;
pub mod run;
pub mod sample;
#[cfg(feature = "serve")]
pub mod serve;
pub mod sink;
pub mod view;

pub use datafusion;
pub use datafusion::arrow;
pub use object_store;
pub use parquet;

pub use error::{Error, Result};

mod embedded;
