//! # flatfhir
//!
//! Moves population-scale FHIR data into columnar analytics. The crate is a pipeline; the module
//! tree follows it stage by stage:
//!
//! ```text
//!  ndjson bytes ──► flatten::Decoder ──► RecordBatch per view ──► sink::DatasetWriter ──► Parquet
//!  (files, HTTP)    (view::ViewRegistry:    (bounded channel)       (Hive layout,           │
//!                    compiled SQL-on-FHIR                            run manifest last)      ▼
//!                    ViewDefinitions)                                              query::Dataset
//!                                                                                  (DataFusion SQL)
//! ```
//!
//! * [`view`] — SQL-on-FHIR v2 ViewDefinitions, compiled once into Arrow schemas plus evaluators.
//! * [`flatten`] — a push decoder: ndjson bytes in, one `RecordBatch` stream per view out;
//!   bad lines become [`flatten::Reject`] records, never panics or silent drops.
//! * [`sink`] — Hive-partitioned Parquet (`<view>/export=<stamp>/part-<n>-<run>.parquet`) written
//!   through `object_store`, files published atomically and the run manifest written last.
//! * [`query`] — a DataFusion `SessionContext` over a dataset, one table per view.
//! * [`pipeline`] — wires the stages together for `convert`.
//! * [`compact`] — rewrites many small files into fewer large ones, atomically for `query`.
//!
//! The arrow/parquet/datafusion/object_store versions are pinned together and re-exported, so
//! downstream code never mixes two arrows.
#![deny(rustdoc::broken_intra_doc_links)]

pub mod auth;
pub mod client;
pub mod compact;
pub mod error;
pub mod export;
pub mod flatten;
pub mod pipeline;
pub mod query;
pub mod sample;
pub mod serve;
pub mod sink;
pub mod view;

pub use datafusion;
pub use datafusion::arrow;
pub use object_store;
pub use parquet;

pub use error::{Error, Result};

mod embedded;
