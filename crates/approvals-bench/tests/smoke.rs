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
