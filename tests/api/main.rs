//! Black-box tests through the real gRPC interface. One binary (faster to build), one module
//! per feature.

mod common;

mod errors;
mod lifecycle;
mod list;
mod process;
mod server;
mod watch;
