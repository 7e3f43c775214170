//! Persistence for the approvals service, through SeaORM: SQLite (embedded default) or
//! PostgreSQL (production, shared by replicas).
//!
//! A change request is stored as a JSON document of the domain aggregate (`body`) beside the
//! columns lists filter on. Every mutation is atomic: it applies a domain command, writes the
//! new document and appends one event, with its snapshot, to the event log (in a transaction
//! that locks the request's row, or on PostgreSQL in a batch statement guarded by what was
//! read, see `transitions`). The event's revision comes from an identity column (no counter
//! row). A snapshot leaves out the request's comments, which are append-only and kept once, in
//! the request's document; readers of the log put them back (see `ev::COMMENT_COUNT`).
//!
//! Where things are: `connect` (the pool, settings, migrations), `write` (the one write
//! transaction every write runs in), `requests` (create, get, mutate), `rows` (the rows of a
//! new request), `codec` (rows <-> domain values), `list` (lists, their totals, snapshot
//! pages), `pending` (lists only the domain can filter), `log` (the event log and its reader),
//! `relay` (commits across replicas), `relay_state` (the relays' cursors, leases and dead
//! letters), `applying` (the apply feature's writes), `batch` (PostgreSQL's group commit
//! queues), `create_batch` and `transitions` (the creates and the transitions they batch),
//! `policies`, `seed` (bulk writes for benchmarks), `redact` (URLs for messages).

mod applying;
mod audit;
mod batch;
mod calendars;
mod codec;
mod connect;
mod create_batch;
mod error;
mod list;
mod log;
mod migration;
mod pending;
mod policies;
mod redact;
mod relay;
mod relay_state;
mod requests;
mod rows;
mod schema;
pub mod seed;
mod transitions;
mod write;

pub use applying::Step;
pub use audit::Checkpoint;
/// Moved to the domain, with the filter; kept here until the server imports it from there.
pub use codec::IdempotencyKey;
pub use connect::{Backend, DatabaseSettings, Store};
pub use error::StoreError;
pub use list::{ListPage, SnapshotPage, TOTAL_SIZE_EXACT_LIMIT};
pub use log::{LogBatch, LogReader};
pub use policies::{PolicyEdit, PolicyFilter};
pub use redact::redact_url;
pub use relay_state::{DeadLetter, DeadLetterFilter, LeaseRequest, SinkState};
pub use requests::Created;
pub use transitions::ReadRequest;
