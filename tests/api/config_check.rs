//! `approvals config check`: the effective configuration with secrets redacted, or the error
//! naming the key (exit 2).

use std::process::Command;

use crate::common::BINARY;

fn check(file: &str, env: &[(&str, &str)]) -> std::process::Output {
    check_with(file, env, &[])
}

/// `approvals config check --config FILE ARGS...` with `env` set.
fn check_with(file: &str, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("approvals.toml");
    std::fs::write(&path, file).expect("write config");
    let mut command = Command::new(BINARY);
    command
        .args(["config", "check", "--config"])
        .arg(&path)
        .args(args)
        .current_dir(dir.path())
        .env_remove("APPROVALS_CONFIG")
        .env_remove("APPROVALS_DATABASE_URL");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run config check")
}

#[test]
fn prints_the_effective_configuration_with_secrets_redacted() {
    let out = check(
        "[database]\nurl = \"postgres://app:hunter2@db:5432/approvals\"\n[limits]\nrate_limit_per_second = 5\n",
        &[("APPROVALS_LIMITS_MAX_CONCURRENT_REQUESTS", "64")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(
        stdout.contains("postgres://app:<redacted>@db:5432/approvals"),
        "{stdout}"
    );
    assert!(stdout.contains("rate_limit_per_second = 5"), "{stdout}");
    assert!(stdout.contains("max_concurrent_requests = 64"), "{stdout}");
    // What it prints is a configuration the server loads.
    let _: approvals::config::Config = toml::from_str(&stdout).expect("loads back");
}

#[test]
fn an_invalid_configuration_names_the_key_and_exits_2() {
    let out = check("[limits]\nrate_limit_burst = \"lots\"\n", &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rate_limit_burst"), "{stderr}");

    let out = check("", &[("APPROVALS_LIMITS_RATE_LIMIT_PER_SECOND", "-1")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("limits.rate_limit_per_second (from APPROVALS_LIMITS_RATE_LIMIT_PER_SECOND)"),
        "{stderr}"
    );
}

/// Each range check names the key that is out of range, not a neighbour it is checked with.
#[test]
fn a_value_out_of_range_is_named_by_its_own_key() {
    for (file, key) in [
        ("[watch]\npoll_interval = \"0s\"\n", "watch.poll_interval"),
        (
            "[watch]\nprogress_interval = \"0s\"\n",
            "watch.progress_interval",
        ),
        ("[watch]\nmax_watchers = 0\n", "watch.max_watchers"),
        ("[watch]\nbuffer = 8\n", "watch.buffer"),
        ("[apply]\npoll_interval = \"0s\"\n", "apply.poll_interval"),
        ("[apply]\ncall_timeout = \"0s\"\n", "apply.call_timeout"),
        ("[apply]\nlease = \"0s\"\n", "apply.lease"),
    ] {
        let out = check(file, &[]);
        assert_eq!(out.status.code(), Some(2), "{file}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("invalid configuration: {key} (from ")),
            "{file}: {stderr}"
        );
    }
}

#[test]
fn an_unknown_key_is_named_by_its_full_path() {
    let out = check("[watch]\nmax_lagg = 5\n", &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("watch.max_lagg (from ") && stderr.contains("unknown key"),
        "{stderr}"
    );
}

/// Each serve flag sets its key, over the environment and the file; `--log-format` included.
#[test]
fn the_serve_flags_are_the_last_layer() {
    let out = check_with(
        "[watch]\nmax_lag = 5\nhistory = 6\n",
        &[
            ("APPROVALS_WATCH_MAX_LAG", "7"),
            ("APPROVALS_TELEMETRY_LOG_FORMAT", "text"),
        ],
        &[
            "--listen",
            "127.0.0.1:9",
            "--database-url",
            "sqlite://flags.db",
            "--min-approvals",
            "2",
            "--watch-history",
            "8",
            "--watch-max-lag",
            "9",
            "--watch-progress-interval",
            "3s",
            "--log-format",
            "json",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: approvals::config::Config = toml::from_str(&stdout).expect("loads back");
    assert_eq!(config.listen, "127.0.0.1:9");
    assert_eq!(config.database.url, "sqlite://flags.db");
    assert_eq!(config.min_approvals, 2);
    assert_eq!(config.watch.history, 8);
    assert_eq!(config.watch.max_lag, 9);
    assert_eq!(
        config.watch.progress_interval,
        std::time::Duration::from_secs(3)
    );
    assert_eq!(config.telemetry.log_format, "json");

    let out = check_with("", &[], &["--watch-progress-interval", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("watch.progress_interval (from --watch-progress-interval)"),
        "{stderr}"
    );
}
