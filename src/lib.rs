//! The approvals server: a gRPC service for change requests (the "four-eyes" workflow).
//!
//! Rooms, from the bottom up (each imports only from rooms below it):
//! - [`pb`] the generated protobuf code, [`error`] the one mapping of errors to `Status`,
//!   [`config`] the configuration, [`telemetry`] logs, traces and metrics, [`tls`] certificates;
//! - [`convert`] domain <-> protobuf, [`auth`] who is calling and what it may do;
//! - [`watch`] the event-log hub and watch streams, [`apply`] the apply engine, [`audit`] the
//!   checkpoint signer and the `approvals audit` commands;
//! - [`api`] the gRPC handlers;
//! - [`transport`] the server's assembly: the tower stack, HTTP/2 and the routes;
//! - [`client`] the client of the public API that the CLI and the relay share (it imports only
//!   [`pb`]);
//! - [`cli`] the human CLI (`approvals cr`, `approvals policy`, `approvals login`), and
//!   [`relay`] the relay (`approvals relay`): both clients of the public API, over [`client`].

pub mod api;
pub mod apply;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod convert;
pub mod error;
pub mod pb;
pub mod relay;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod watch;

pub use auth::{
    ACTOR_HEADER, AUTHORIZATION_HEADER, GROUPS_HEADER, ON_BEHALF_OF_GROUPS_HEADER,
    ON_BEHALF_OF_HEADER, USER_TOKEN_HEADER,
};
pub use error::ERROR_DOMAIN;
