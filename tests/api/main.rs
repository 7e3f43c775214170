//! Black-box tests through the real gRPC interface. One binary (faster to build), one module
//! per feature.

mod callers;
mod common;

mod api_reference;
mod applier_endpoints;
mod apply;
mod attestation;
mod audit;
mod auth;
mod calendars;
mod cli;
mod errors;
mod four_eyes;
mod inputs;
mod lifecycle;
mod list;
mod now;
mod policies;
mod policies2;
mod policies_governance;
mod policies_rules;
mod process;
mod reads;
mod relay;
mod server;
mod stalled;
mod watch;
mod watch_limits;

mod config_check;
mod crash;
mod deploy;
mod documents;
mod limits;
mod outage;
mod payloads;
mod pg_cluster;
mod telemetry;
mod tls;
