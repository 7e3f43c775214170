//! Compiles `proto/` into Rust with protox (pure Rust: no `protoc` needed on the machine) and
//! tonic-prost-build, and writes the encoded descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/approvals/v1/attestation.proto",
    "proto/approvals/v1/resources.proto",
    "proto/approvals/v1/change_requests.proto",
    "proto/approvals/v1/applier.proto",
    "proto/approvals/v1/policies.proto",
    "proto/approvals/v1/audit.proto",
    "proto/approvals/v1/relay.proto",
    "proto/approvals/v1/calendars.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build does not announce its inputs; without this, proto edits would not rebuild.
    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("approvals_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
