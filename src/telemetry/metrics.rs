//! Metrics, as OpenTelemetry instruments on the global meter `approvals`. Without an exporter
//! configured (see [`crate::telemetry`]) every instrument is a no-op. Instruments are created on
//! first use, after the telemetry setup installed the meter provider.
//!
//! | name | kind | attributes |
//! | --- | --- | --- |
//! | `approvals.rpc.calls` | counter | `rpc.method`, `rpc.grpc.status_code` |
//! | `approvals.rpc.duration` | histogram (s) | `rpc.method`, `rpc.grpc.status_code` |
//! | `approvals.transitions` | counter | `event_kind` |
//! | `approvals.watch.watchers` | gauge | |
//! | `approvals.watch.lag` | histogram (events) | |
//! | `approvals.apply.outcomes` | counter | `outcome` |
//! | `approvals.limits.refused` | counter | `limit` (`rate`, `concurrency`) |
//! | `approvals.tls.reloads` | counter | `outcome` (`reloaded`, `failed`) |
//! | `approvals.db.pool.connections` | gauge | `state` (`idle`, `in_use`), plus `approvals.db.pool.max` |

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    KeyValue, global,
    metrics::{Counter, Histogram},
};

const METER: &str = "approvals";

struct Instruments {
    rpc_calls: Counter<u64>,
    rpc_duration: Histogram<f64>,
    transitions: Counter<u64>,
    watch_lag: Histogram<u64>,
    apply_outcomes: Counter<u64>,
    refused: Counter<u64>,
    tls_reloads: Counter<u64>,
}

static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
static OPEN_WATCHERS: AtomicI64 = AtomicI64::new(0);

fn instruments() -> &'static Instruments {
    INSTRUMENTS.get_or_init(|| {
        let meter = global::meter(METER);
        // Observed on each collection.
        let _watchers = meter
            .i64_observable_gauge("approvals.watch.watchers")
            .with_description("Open watch streams")
            .with_callback(|observer| observer.observe(OPEN_WATCHERS.load(Ordering::Relaxed), &[]))
            .build();
        Instruments {
            rpc_calls: meter
                .u64_counter("approvals.rpc.calls")
                .with_description("RPCs handled, by method and status code")
                .build(),
            rpc_duration: meter
                .f64_histogram("approvals.rpc.duration")
                .with_unit("s")
                .with_description("RPC latency, by method and status code")
                .build(),
            transitions: meter
                .u64_counter("approvals.transitions")
                .with_description(
                    "Events appended to the log, by kind (service-wide: every replica reads the whole log, so aggregate with max, not sum)",
                )
                .build(),
            watch_lag: meter
                .u64_histogram("approvals.watch.lag")
                .with_unit("{event}")
                .with_description("Revisions a live watcher is behind the head when it sends")
                .build(),
            apply_outcomes: meter
                .u64_counter("approvals.apply.outcomes")
                .with_description("Apply attempts, by outcome")
                .build(),
            refused: meter
                .u64_counter("approvals.limits.refused")
                .with_description("Unary calls refused with RESOURCE_EXHAUSTED, by limit")
                .build(),
            tls_reloads: meter
                .u64_counter("approvals.tls.reloads")
                .with_description(
                    "Changes of the [tls] files on disk: loaded (reloaded) or refused (failed; the old certificate stays)",
                )
                .build(),
        }
    })
}

/// One RPC finished with `code` (e.g. `OK`, `UNAVAILABLE`) after `elapsed`.
pub fn record_rpc(method: &str, code: &str, elapsed: Duration) {
    let attributes = [
        KeyValue::new("rpc.method", method.to_owned()),
        KeyValue::new("rpc.grpc.status_code", code.to_owned()),
    ];
    let instruments = instruments();
    instruments.rpc_calls.add(1, &attributes);
    instruments
        .rpc_duration
        .record(elapsed.as_secs_f64(), &attributes);
}

/// An event of `kind` (e.g. `REVIEWED`) appeared in the log.
pub fn record_transition(kind: &str) {
    instruments()
        .transitions
        .add(1, &[KeyValue::new("event_kind", kind.to_owned())]);
}

/// An apply attempt ended: `outcome` is e.g. `applied`, `failed`, `retried`, `timed_out`.
pub fn record_apply_outcome(outcome: &str) {
    instruments()
        .apply_outcomes
        .add(1, &[KeyValue::new("outcome", outcome.to_owned())]);
}

/// A live watcher sent events while `lag` revisions behind the head.
pub fn record_watch_lag(lag: i64) {
    instruments()
        .watch_lag
        .record(u64::try_from(lag).unwrap_or(0), &[]);
}

/// A unary call was refused by `limit` (`rate` or `concurrency`).
pub fn record_limited(limit: &str) {
    instruments()
        .refused
        .add(1, &[KeyValue::new("limit", limit.to_owned())]);
}

/// The `[tls]` files changed: `outcome` is `reloaded` or `failed`.
pub fn record_tls_reload(outcome: &str) {
    instruments()
        .tls_reloads
        .add(1, &[KeyValue::new("outcome", outcome.to_owned())]);
}

/// Counts an open watch stream while it lives.
pub struct OpenWatcher(());

impl OpenWatcher {
    pub fn new() -> Self {
        instruments();
        OPEN_WATCHERS.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Default for OpenWatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OpenWatcher {
    fn drop(&mut self) {
        OPEN_WATCHERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reports the connection pool's use on each collection.
pub fn observe_pool(store: approvals_store::Store, max: u32) {
    let meter = global::meter(METER);
    let _connections = meter
        .i64_observable_gauge("approvals.db.pool.connections")
        .with_description("Database connections in the pool, by state")
        .with_callback(move |observer| {
            let (size, idle) = store.pool_usage();
            let in_use = i64::from(size).saturating_sub(i64::try_from(idle).unwrap_or(0));
            observer.observe(in_use, &[KeyValue::new("state", "in_use")]);
            observer.observe(
                i64::try_from(idle).unwrap_or(0),
                &[KeyValue::new("state", "idle")],
            );
        })
        .build();
    let _max = meter
        .i64_observable_gauge("approvals.db.pool.max")
        .with_description("Largest number of database connections the pool opens")
        .with_callback(move |observer| observer.observe(i64::from(max), &[]))
        .build();
}
