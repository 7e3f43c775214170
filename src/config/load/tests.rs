//! Loading through the real layers: precedence, key names in errors, what each layer accepts.

use std::{collections::HashMap, time::Duration};

use super::*;

fn write(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(text)
}

/// A file removed when dropped; enough for these tests without another dependency.
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn with(text: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("approvals-config-{}.toml", uuid::Uuid::now_v7()));
            std::fs::write(&path, text).expect("temp file");
            Self(path)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn from_env(name: &'static str, value: &'static str) -> impl Fn(&str) -> Option<String> {
    move |k| (k == name).then(|| value.to_owned())
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let file = write(
        "listen = \"127.0.0.1:1\"\nmin_approvals = 2\n[database]\nurl = \"sqlite://f.db\"\nacquire_timeout = \"500ms\"\n",
    );
    let env: HashMap<&str, &str> = [
        ("APPROVALS_MIN_APPROVALS", "3"),
        ("APPROVALS_LISTEN", "127.0.0.1:2"),
    ]
    .into();
    let flags = Flags::default().set("listen", "--listen", Some("127.0.0.1:3"));
    let config =
        Config::load(Some(&file.0), |k| env.get(k).map(|v| v.to_string()), &flags).expect("loads");
    assert_eq!(config.listen, "127.0.0.1:3");
    assert_eq!(config.min_approvals, 3);
    assert_eq!(config.database.url, "sqlite://f.db");
    assert_eq!(config.database.acquire_timeout, Duration::from_millis(500));
    assert_eq!(config.database.max_connections, 16);
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let file = write("[database]\nurll = \"x\"\n");
    let err = Config::load(Some(&file.0), |_| None, &Flags::default()).expect_err("unknown");
    let shown = file.0.display().to_string();
    assert!(
        err.to_string()
            .starts_with(&format!("database.urll (from {shown}): unknown key")),
        "{err}"
    );
    let file = write("[watch]\nmax_lagg = 5\n");
    let err = Config::load(Some(&file.0), |_| None, &Flags::default()).expect_err("unknown");
    assert!(
        err.to_string().starts_with("watch.max_lagg (from "),
        "{err}"
    );
    assert!(err.to_string().contains("max_lag, "), "{err}");
    let file = write("lissen = \"127.0.0.1:1\"\n");
    let err = Config::load(Some(&file.0), |_| None, &Flags::default()).expect_err("unknown");
    assert!(err.to_string().starts_with("lissen (from "), "{err}");

    let err = Config::load(
        None,
        from_env("APPROVALS_DATABASE_ACQUIRE_TIMEOUT", "soon"),
        &Flags::default(),
    )
    .expect_err("bad duration");
    assert!(
        err.to_string().starts_with(
            "database.acquire_timeout (from APPROVALS_DATABASE_ACQUIRE_TIMEOUT): \"soon\" is not a duration"
        ),
        "{err}"
    );
    let err = Config::load(
        None,
        from_env("APPROVALS_MIN_APPROVALS", "many"),
        &Flags::default(),
    )
    .expect_err("not a number");
    assert_eq!(
        err.to_string(),
        "min_approvals (from APPROVALS_MIN_APPROVALS): \"many\" is not a whole number"
    );

    let flags = Flags::default().set("min_approvals", "--min-approvals", Some(0u32));
    let err = Config::load(None, |_| None, &flags).expect_err("zero");
    assert_eq!(
        err.to_string(),
        "min_approvals (from --min-approvals): must be at least 1"
    );
    let flags = Flags::default().set("watch.max_lagg", "--watch-max-lagg", Some(1i64));
    let err = Config::load(None, |_| None, &flags).expect_err("no such key");
    assert_eq!(
        err.to_string(),
        "watch.max_lagg (from --watch-max-lagg): is not a configuration key"
    );
    let flags = Flags::default().set(
        "watch.progress_interval",
        "--watch-progress-interval",
        Some("soon"),
    );
    let err = Config::load(None, |_| None, &flags).expect_err("bad duration");
    assert!(
        err.to_string()
            .starts_with("watch.progress_interval (from --watch-progress-interval): \"soon\""),
        "{err}"
    );

    let file = write("[limits]\nrequest_timeout = \"2s\"\n");
    let err = Config::load(Some(&file.0), |_| None, &Flags::default()).expect_err("deadline");
    assert!(
        err.to_string()
            .starts_with("apply.deadline (from the default): must stay below"),
        "{err}"
    );

    let file = write("[[auth.api_keys]]\nprincipal = \"service:x\"\nscopes = []\n");
    let err = Config::load(Some(&file.0), |_| None, &Flags::default()).expect_err("sha256");
    let shown = file.0.display().to_string();
    assert_eq!(
        err.to_string(),
        format!("auth.api_keys[0] (from {shown}): missing field `sha256`"),
        "{err}"
    );
}

#[test]
fn durations_and_numbers_accept_surrounding_blanks() {
    let file = write("[database]\nacquire_timeout = \" 2s \"\n");
    let env: HashMap<&str, &str> = [
        ("APPROVALS_MIN_APPROVALS", " 3 "),
        ("APPROVALS_WATCH_POLL_INTERVAL", " 250ms"),
        ("APPROVALS_TELEMETRY_LOG_FORMAT", "json "),
    ]
    .into();
    let config = Config::load(
        Some(&file.0),
        |k| env.get(k).map(|v| v.to_string()),
        &Flags::default(),
    )
    .expect("loads");
    assert_eq!(config.database.acquire_timeout, Duration::from_secs(2));
    assert_eq!(config.min_approvals, 3);
    assert_eq!(config.watch.poll_interval, Duration::from_millis(250));
    assert_eq!(config.telemetry.log_format, "json");
}

#[test]
fn telemetry_section() {
    let file =
        write("[telemetry]\nlog_format = \"json\"\notlp_endpoint = \"http://collector:4317\"\n");
    let config = Config::load(Some(&file.0), |_| None, &Flags::default()).expect("loads");
    assert_eq!(config.telemetry.log_format, "json");
    assert_eq!(config.telemetry.otlp_endpoint, "http://collector:4317");
    assert_eq!(config.telemetry.service_name, "approvals");
    let err = Config::load(
        None,
        from_env("APPROVALS_TELEMETRY_LOG_FORMAT", "xml"),
        &Flags::default(),
    )
    .expect_err("unknown format");
    assert!(
        err.to_string()
            .starts_with("telemetry.log_format (from APPROVALS_TELEMETRY_LOG_FORMAT)"),
        "{err}"
    );
    // A value that looks like a number stays the string it is.
    let config = Config::load(
        None,
        from_env("APPROVALS_TELEMETRY_SERVICE_NAME", "1234"),
        &Flags::default(),
    )
    .expect("loads");
    assert_eq!(config.telemetry.service_name, "1234");
}

#[test]
fn keepalive_is_configurable_and_checked() {
    let file = write("[limits]\nkeepalive_interval = \"0s\"\n");
    let config = Config::load(Some(&file.0), |_| None, &Flags::default()).expect("loads");
    assert_eq!(config.limits.keepalive_interval, Duration::ZERO);
    let config = Config::load(
        None,
        from_env("APPROVALS_LIMITS_KEEPALIVE_INTERVAL", "5s"),
        &Flags::default(),
    )
    .expect("loads");
    assert_eq!(config.limits.keepalive_interval, Duration::from_secs(5));
    assert_eq!(config.limits.keepalive_timeout, Duration::from_secs(10));
    let err = Config::load(
        None,
        from_env("APPROVALS_LIMITS_KEEPALIVE_TIMEOUT", "0s"),
        &Flags::default(),
    )
    .expect_err("no timeout");
    assert!(
        err.to_string()
            .starts_with("limits.keepalive_timeout (from APPROVALS_LIMITS_KEEPALIVE_TIMEOUT)"),
        "{err}"
    );
}

#[test]
fn allowed_endpoints_from_the_file_or_the_environment() {
    assert!(
        Config::default()
            .apply
            .allowed_endpoints
            .entries()
            .is_empty()
    );
    let file = write(
        "[apply]\nallowed_endpoints = [\"http://127.0.0.1\", \"https://*.svc.cluster.local:8443\"]\n",
    );
    let config = Config::load(Some(&file.0), |_| None, &Flags::default()).expect("loads");
    assert_eq!(
        config.apply.allowed_endpoints.entries(),
        ["http://127.0.0.1", "https://*.svc.cluster.local:8443"]
    );
    let config = Config::load(
        Some(&file.0),
        from_env(
            "APPROVALS_APPLY_ALLOWED_ENDPOINTS",
            " http://flags.internal:8080 ,, http://deploy.internal, ",
        ),
        &Flags::default(),
    )
    .expect("loads");
    assert_eq!(
        config.apply.allowed_endpoints.entries(),
        ["http://flags.internal:8080", "http://deploy.internal"],
        "the environment replaces the file's list; blanks are skipped"
    );
    let config = Config::load(
        Some(&file.0),
        from_env("APPROVALS_APPLY_ALLOWED_ENDPOINTS", ""),
        &Flags::default(),
    )
    .expect("loads");
    assert!(config.apply.allowed_endpoints.entries().is_empty());
    let err = Config::load(
        None,
        from_env("APPROVALS_APPLY_ALLOWED_ENDPOINTS", "http://a.internal/x"),
        &Flags::default(),
    )
    .expect_err("a path");
    assert!(
        err.to_string().starts_with(
            "apply.allowed_endpoints (from APPROVALS_APPLY_ALLOWED_ENDPOINTS): entry [0]"
        ),
        "{err}"
    );
    let file = write("[apply]\nallowed_endpoints = [\"grpc://x\"]\n");
    let err = Config::load(Some(&file.0), |_| None, &Flags::default()).expect_err("a scheme");
    assert!(
        err.to_string()
            .starts_with("apply.allowed_endpoints (from "),
        "{err}"
    );
    // The file takes an array only, as before.
    let file = write("[apply]\nallowed_endpoints = \"http://127.0.0.1\"\n");
    Config::load(Some(&file.0), |_| None, &Flags::default()).expect_err("not an array");
}

#[test]
fn watch_and_stream_limits_are_configurable() {
    let config = Config::default();
    assert_eq!(config.watch.max_watchers_per_principal, 1000);
    assert_eq!(config.limits.max_concurrent_streams, 1000);
    let file = write("[watch]\nmax_watchers_per_principal = 0\n");
    let config = Config::load(Some(&file.0), |_| None, &Flags::default()).expect("loads");
    assert_eq!(config.watch.max_watchers_per_principal, 0);
    let env: HashMap<&str, &str> = [
        ("APPROVALS_WATCH_MAX_WATCHERS_PER_PRINCIPAL", "25"),
        ("APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS", "64"),
    ]
    .into();
    let config = Config::load(
        Some(&file.0),
        |k| env.get(k).map(|v| v.to_string()),
        &Flags::default(),
    )
    .expect("loads");
    assert_eq!(config.watch.max_watchers_per_principal, 25);
    assert_eq!(config.limits.max_concurrent_streams, 64);
    let err = Config::load(
        None,
        from_env("APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS", "-1"),
        &Flags::default(),
    )
    .expect_err("negative");
    assert!(
        err.to_string().starts_with(
            "limits.max_concurrent_streams (from APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS)"
        ),
        "{err}"
    );
}

#[test]
fn jwt_keys_from_the_environment_make_the_jwt_table() {
    let env: HashMap<&str, &str> = [
        ("APPROVALS_AUTH_JWT_ISSUER", "https://id.example.com/"),
        ("APPROVALS_AUTH_JWT_AUDIENCE", "approvals"),
        ("APPROVALS_AUTH_JWT_JWKS_FILE", "/etc/jwks.json"),
    ]
    .into();
    let config = Config::load(
        None,
        |k| env.get(k).map(|v| v.to_string()),
        &Flags::default(),
    )
    .expect("loads");
    let jwt = config.auth.jwt.expect("the table");
    assert_eq!(jwt.issuer, "https://id.example.com/");
    assert_eq!(jwt.jwks_file.as_deref(), Some("/etc/jwks.json"));
    assert_eq!(jwt.jwks_url, None);
    assert_eq!(jwt.leeway, Duration::from_secs(30), "the rest: defaults");
}

#[test]
fn env_names_follow_the_key_path() {
    assert_eq!(env_name("database.url"), "APPROVALS_DATABASE_URL");
    assert_eq!(env_name("listen"), "APPROVALS_LISTEN");
    assert_eq!(env_name("watch.max_lag"), "APPROVALS_WATCH_MAX_LAG");
    let keys = key_paths();
    for key in [
        "listen",
        "min_approvals",
        "database.url",
        "watch.max_lag",
        "apply.allowed_endpoints",
        "auth.jwt.jwks_url",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
    }
    for key in &keys {
        assert!(!key.starts_with("auth.api_keys"), "{key} is file-only");
        assert!(!key.starts_with("auth.groups"), "{key} is file-only");
    }
    let names: std::collections::HashSet<String> = keys.iter().map(|k| env_name(k)).collect();
    assert_eq!(names.len(), keys.len(), "two keys share a variable");
}

/// Every key path has its variable, and the variable sets that key: a value read back from
/// the loaded configuration at the same path is the one the variable gave.
#[test]
fn every_key_path_is_set_by_its_variable() {
    for (key, kind) in settable_keys() {
        let text = match kind {
            Shape::Integer => "77",
            Shape::Boolean => "true",
            Shape::List => "http://127.0.0.1",
            Shape::Text => match key.as_str() {
                "listen" => "127.0.0.1:7",
                "telemetry.log_format" => "json",
                _ if lookup_text(&every_key(), &key)
                    .is_some_and(|v| humantime::parse_duration(&v).is_ok()) =>
                {
                    "7s"
                }
                _ => "set-by-env",
            },
        };
        let name = env_name(&key);
        let figment = Figment::new().merge(
            Layer::environment(&|k: &str| (k == name).then(|| text.to_owned())).expect("parses"),
        );
        let config: Config = figment.extract().unwrap_or_else(|e| panic!("{key}: {e}"));
        let expected = match kind {
            Shape::List => format!("[\"{text}\"]"),
            _ => text.to_owned(),
        };
        assert_eq!(
            lookup_text(&config, &key),
            Some(expected),
            "{name} does not set {key}"
        );
    }
}

/// The value at `key` in `config`'s TOML, as text (strings without quotes).
fn lookup_text(config: &Config, key: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(&toml::to_string(config).ok()?).ok()?;
    let mut node: Option<&toml::Value> = None;
    let mut current = Some(&table);
    for part in key.split('.') {
        node = current.and_then(|t| t.get(part));
        current = node.and_then(toml::Value::as_table);
    }
    Some(match node? {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}
