//! Smoke test: the bench starts the server binary, runs a few hundred calls of each unary
//! scenario on SQLite, and writes its JSON. It asserts that the machinery works, never a figure.

use std::{path::PathBuf, process::Command};

/// Runs the bench on SQLite with `args` against the `approvals` binary built beside it and
/// returns its JSON report; `None` (the test skipped) when that binary is not built.
fn bench(name: &str, args: &[&str]) -> Option<serde_json::Value> {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_approvals-bench"));
    let server = bench.with_file_name("approvals");
    if !server.exists() {
        eprintln!(
            "skipped: {} is not built (run `cargo test --workspace`)",
            server.display()
        );
        return None;
    }
    let dir = std::env::temp_dir().join(format!("approvals-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("bench.json");
    let output = Command::new(&bench)
        .args([
            "--database",
            "sqlite",
            "--server-bin",
            server.to_str().expect("utf-8 path"),
        ])
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run approvals-bench");
    assert!(
        output.status.success(),
        "approvals-bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
        .expect("valid json");
    let _ = std::fs::remove_dir_all(&dir);
    Some(report)
}

/// The report's row of `scenario`.
fn row<'a>(report: &'a serde_json::Value, scenario: &str) -> &'a serde_json::Value {
    report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["scenario"] == scenario)
        .unwrap_or_else(|| panic!("no {scenario} row in {report}"))
}

/// A measured row that made calls, none of which failed.
fn assert_ran(row: &serde_json::Value) {
    assert!(row["ops"].as_u64().unwrap_or(0) > 0, "{row}");
    assert_eq!(row["errors"], 0, "{row}");
}

#[test]
fn runs_a_few_hundred_calls_against_a_server() {
    let Some(report) = bench(
        "smoke",
        &[
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
        ],
    ) else {
        return;
    };
    for scenario in [
        "create",
        "get",
        "list_by_requester",
        "create_approve",
        "lifecycle",
    ] {
        assert_ran(row(&report, scenario));
    }
}

/// The raw two-insert ceiling on SQLite (a file of its own, one writer), create held against
/// it as well as against direct_insert, and `--latency-sweep`'s six points.
#[test]
fn the_raw_pair_ceiling_and_the_latency_sweep_run() {
    let Some(report) = bench(
        "raw",
        &[
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--warmup",
            "0s",
            "--duration",
            "200ms",
            "--only",
            "raw-pair,create",
            "--latency-sweep",
        ],
    ) else {
        return;
    };
    assert_ran(row(&report, "raw_pair (ceiling)"));
    let create = row(&report, "create");
    assert_ran(create);
    assert_eq!(create["ceiling"], "direct_insert (ceiling)", "{create}");
    assert!(create["ratio"].is_f64(), "{create}");
    assert!(create["raw_ratio"].is_f64(), "{create}");
    let sweep = report["latency_sweep"].as_array().expect("latency_sweep");
    let points: Vec<(&str, u64)> = sweep
        .iter()
        .map(|r| {
            (
                r["scenario"].as_str().unwrap_or(""),
                r["concurrency"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        points,
        [
            ("raw_pair (ceiling)", 1),
            ("raw_pair (ceiling)", 8),
            ("raw_pair (ceiling)", 64),
            ("create", 1),
            ("create", 8),
            ("create", 64),
        ]
    );
    sweep.iter().for_each(assert_ran);
}

/// The watch fan-out against the server the bench starts: every stream opens (the server's
/// per-principal watch cap and streams-per-connection limit are set for the bench) and every
/// watcher gets every write.
#[test]
fn the_watch_fan_out_opens_every_stream_and_delivers_every_write() {
    // More streams on one connection, and from the one bench principal, than the server's
    // defaults (1,000 of each) allow.
    let Some(report) = bench(
        "watch-smoke",
        &[
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
        ],
    ) else {
        return;
    };
    let watch = &report["watch"][0];
    assert_eq!(watch["established"], 1200, "{watch}");
    assert_eq!(watch["missing"], 0, "{watch}");
}
