//! The approvals server: a gRPC service for change requests (the "four-eyes" workflow).

pub mod applier_endpoints;
mod apply;
pub mod auth;
pub mod config;
pub mod config_check;
mod connection;
mod convert;
mod error;
mod identity;
pub mod limits;
mod live_ring;
pub mod metrics;
mod page_token;
mod read_cache;
pub mod server;
mod service;
pub mod telemetry;
mod watch;
mod watch_route;

/// Code generated from `proto/approvals/v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("approvals.v1");

    /// The encoded descriptor set of `approvals.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("approvals_descriptor");
}

pub use auth::{
    AUTHORIZATION_HEADER, ON_BEHALF_OF_GROUPS_HEADER, ON_BEHALF_OF_HEADER, USER_TOKEN_HEADER,
};
pub use error::ERROR_DOMAIN;
pub use identity::{ACTOR_HEADER, GROUPS_HEADER};
