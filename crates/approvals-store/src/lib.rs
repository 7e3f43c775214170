//! Persistence for the approvals service, through SeaORM: SQLite (embedded default) or
//! PostgreSQL (production, shared by replicas).
//!
//! A change request is stored as a JSON document of the domain aggregate (`body`) beside the
//! columns lists filter on. Every mutation runs in one transaction that locks the request's row,
//! applies a domain command, writes the new document and appends one event, with its snapshot,
//! to the event log. The event's revision comes from an identity column (no counter row). A
//! snapshot leaves out the request's comments, which are append-only and kept once, in the
//! request's document; readers of the log put them back (see `ev::COMMENT_COUNT`).

mod applying;
mod codec;
mod connect;
mod error;
mod list;
mod log;
mod migration;
mod pending;
mod policies;
mod redact;
mod relay;
mod requests;
mod schema;
mod write;

pub use applying::Step;
/// Moved to the domain, with the filter; kept here until the server imports it from there.
pub use approvals_domain::touches_resource;
pub use connect::{Backend, DatabaseSettings, Store};
pub use error::StoreError;
pub use list::{ListFilter, ListPage, SnapshotPage, TOTAL_SIZE_EXACT_LIMIT};
pub use log::{LogBatch, LogReader};
pub use policies::PolicyFilter;
pub use redact::redact_url;
pub use requests::{Created, IdempotencyKey};
