//! The relay's OpenTelemetry instruments (global meter `approvals`), each with the attribute
//! `sink`:
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `approvals.relay.delivered` | counter | events delivered (2xx) |
//! | `approvals.relay.retried` | counter | failed attempts that are retried |
//! | `approvals.relay.dead_lettered` | counter | events (and gaps) sent to dead letters |
//! | `approvals.relay.lag` | gauge (revisions) | the newest revision the watch reported minus the sink's cursor |

use std::sync::OnceLock;

use opentelemetry::{
    KeyValue, global,
    metrics::{Counter, Gauge},
};

struct Instruments {
    delivered: Counter<u64>,
    retried: Counter<u64>,
    dead_lettered: Counter<u64>,
    lag: Gauge<i64>,
}

fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let meter = global::meter("approvals");
        Instruments {
            delivered: meter
                .u64_counter("approvals.relay.delivered")
                .with_description("Events delivered to a sink")
                .build(),
            retried: meter
                .u64_counter("approvals.relay.retried")
                .with_description("Failed delivery attempts that are retried")
                .build(),
            dead_lettered: meter
                .u64_counter("approvals.relay.dead_lettered")
                .with_description("Events (and gaps) sent to dead letters")
                .build(),
            lag: meter
                .i64_gauge("approvals.relay.lag")
                .with_description("Revisions between the watch's newest and the sink's cursor")
                .build(),
        }
    })
}

fn sink(name: &str) -> [KeyValue; 1] {
    [KeyValue::new("sink", name.to_owned())]
}

pub fn delivered(name: &str) {
    instruments().delivered.add(1, &sink(name));
}

pub fn retried(name: &str) {
    instruments().retried.add(1, &sink(name));
}

pub fn dead_lettered(name: &str) {
    instruments().dead_lettered.add(1, &sink(name));
}

pub fn lag(name: &str, lag: i64) {
    instruments().lag.record(lag.max(0), &sink(name));
}
