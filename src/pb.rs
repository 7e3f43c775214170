//! Code generated from `proto/approvals/v1`.
#![allow(clippy::all, clippy::pedantic)]
tonic::include_proto!("approvals.v1");

/// The encoded descriptor set of `approvals.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("approvals_descriptor");
