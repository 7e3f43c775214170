//! Smoke test: the bench starts the server binary, runs a few hundred calls of each unary
//! scenario on SQLite, and writes its JSON. It asserts that the machinery works, never a figure.

use std::{path::PathBuf, process::Command};

#[test]
fn runs_a_few_hundred_calls_against_a_server() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_approvals-bench"));
    let server = bench.with_file_name("approvals");
    if !server.exists() {
        eprintln!(
            "skipped: {} is not built (run `cargo test --workspace`)",
            server.display()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("approvals-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("bench.json");
    let output = Command::new(&bench)
        .args([
            "--database",
            "sqlite",
            "--server-bin",
            server.to_str().expect("utf-8 path"),
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--warmup",
            "0s",
            "--duration",
            "300ms",
            "--seed-rows",
            "300",
            "--only",
            "health,direct,create,get,list,lifecycle",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run approvals-bench");
    assert!(
        output.status.success(),
        "approvals-bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid json");
    let _ = std::fs::remove_dir_all(&dir);
    let rows = report["rows"].as_array().expect("rows");
    for scenario in ["create", "get", "list_by_requester", "lifecycle"] {
        let row = rows
            .iter()
            .find(|r| r["scenario"] == scenario)
            .unwrap_or_else(|| panic!("no {scenario} row"));
        assert!(row["ops"].as_u64().unwrap_or(0) > 0, "{scenario}: {row}");
        assert_eq!(row["errors"], 0, "{scenario}: {row}");
    }
}

/// The watch fan-out against the server the bench starts: every stream opens (the server's
/// per-principal watch cap and streams-per-connection limit are set for the bench) and every
/// watcher gets every write.
#[test]
fn the_watch_fan_out_opens_every_stream_and_delivers_every_write() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_approvals-bench"));
    let server = bench.with_file_name("approvals");
    if !server.exists() {
        eprintln!(
            "skipped: {} is not built (run `cargo test --workspace`)",
            server.display()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "approvals-bench-watch-smoke-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("bench.json");
    // More streams on one connection, and from the one bench principal, than the server's
    // defaults (1,000 of each) allow.
    let output = Command::new(&bench)
        .args([
            "--database",
            "sqlite",
            "--server-bin",
            server.to_str().expect("utf-8 path"),
            "--only",
            "watch",
            "--watchers",
            "1200",
            "--watchers-per-connection",
            "1200",
            "--watch-writes",
            "2",
            "--watch-interval",
            "20ms",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run approvals-bench");
    assert!(
        output.status.success(),
        "approvals-bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid json");
    let _ = std::fs::remove_dir_all(&dir);
    let watch = &report["watch"][0];
    assert_eq!(watch["established"], 1200, "{watch}");
    assert_eq!(watch["missing"], 0, "{watch}");
}
