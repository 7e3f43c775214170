//! Loading through the real layers: precedence, key names in errors, what each layer accepts.

use std::time::Duration;

use super::*;

/// Loads `file` (written to a temporary file, shown as `FILE` in errors), `env` and `flags`.
fn load(file: Option<&str>, env: &[(&str, &str)], flags: &Flags) -> Result<Config, String> {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("approvals.toml");
    if let Some(text) = file {
        std::fs::write(&path, text).expect("write");
    }
    let lookup = |name: &str| {
        env.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| (*v).to_owned())
    };
    Config::load(file.map(|_| path.as_path()), lookup, flags)
        .map_err(|e| e.to_string().replace(&path.display().to_string(), "FILE"))
}

fn from_file(text: &str) -> Result<Config, String> {
    load(Some(text), &[], &Flags::default())
}

fn from_env(env: &[(&str, &str)]) -> Result<Config, String> {
    load(None, env, &Flags::default())
}

/// Asserts that `result` is an error starting with `prefix`.
#[track_caller]
fn fails_with(result: Result<Config, String>, prefix: &str) {
    match result {
        Ok(_) => panic!("loads; expected {prefix:?}"),
        Err(err) => assert!(err.starts_with(prefix), "{err}\nexpected: {prefix}"),
    }
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let config = load(
        Some(
            "listen = \"127.0.0.1:1\"\nmin_approvals = 2\n[database]\nurl = \"sqlite://f.db\"\nacquire_timeout = \"500ms\"\n",
        ),
        &[
            ("APPROVALS_MIN_APPROVALS", "3"),
            ("APPROVALS_LISTEN", "127.0.0.1:2"),
        ],
        &Flags::default().set("listen", "--listen", Some("127.0.0.1:3")),
    )
    .expect("loads");
    assert_eq!(config.listen, "127.0.0.1:3");
    assert_eq!(config.min_approvals, 3);
    assert_eq!(config.database.url, "sqlite://f.db");
    assert_eq!(config.database.acquire_timeout, Duration::from_millis(500));
    assert_eq!(config.database.max_connections, 16);
}

#[test]
fn the_file_sets_what_it_names_and_leaves_the_rest_to_the_defaults() {
    let config = from_file(
        "[telemetry]\nlog_format = \"json\"\notlp_endpoint = \"http://collector:4317\"\n\
         [watch]\nmax_watchers_per_principal = 0\n[limits]\nkeepalive_interval = \"0s\"\n",
    )
    .expect("loads");
    assert_eq!(config.telemetry.log_format, "json");
    assert_eq!(config.telemetry.otlp_endpoint, "http://collector:4317");
    assert_eq!(config.telemetry.service_name, "approvals");
    assert_eq!(config.watch.max_watchers_per_principal, 0);
    assert_eq!(config.limits.keepalive_interval, Duration::ZERO);
    assert_eq!(config.limits.max_concurrent_streams, 1000);
    assert_eq!(config.watch.max_watchers, 50_000);
}

#[test]
fn unknown_keys_are_named_by_their_full_path() {
    fails_with(
        from_file("[database]\nurll = \"x\"\n"),
        "database.urll (from FILE): unknown key: the keys of [database] are url, max_connections",
    );
    fails_with(
        from_file("[watch]\nmax_lagg = 5\n"),
        "watch.max_lagg (from FILE): unknown key",
    );
    fails_with(
        from_file("lissen = \"127.0.0.1:1\"\n"),
        "lissen (from FILE): unknown key: the keys of the top level are listen,",
    );
    fails_with(
        from_file(
            "[[auth.api_keys]]\nprincipal = \"service:x\"\nscopes = []\nsha256 = \"\"\nscope = []\n",
        ),
        "auth.api_keys[0].scope (from FILE): unknown key",
    );
    let flags = Flags::default().set("watch.max_lagg", "--watch-max-lagg", Some(1i64));
    fails_with(
        load(None, &[], &flags),
        "watch.max_lagg (from --watch-max-lagg): is not a configuration key",
    );
}

#[test]
fn a_bad_value_names_its_key_and_where_it_was_set() {
    fails_with(
        from_env(&[("APPROVALS_DATABASE_ACQUIRE_TIMEOUT", "soon")]),
        "database.acquire_timeout (from APPROVALS_DATABASE_ACQUIRE_TIMEOUT): \"soon\" is not a duration like \"500ms\" or \"2s\"",
    );
    fails_with(
        from_env(&[("APPROVALS_MIN_APPROVALS", "many")]),
        "min_approvals (from APPROVALS_MIN_APPROVALS): \"many\" is not a whole number",
    );
    fails_with(
        from_file("[limits]\nrate_limit_burst = \"lots\"\n"),
        "limits.rate_limit_burst (from FILE): invalid type",
    );
    fails_with(
        from_file("[[auth.api_keys]]\nprincipal = \"service:x\"\nscopes = []\n"),
        "auth.api_keys[0] (from FILE): missing field `sha256`",
    );
    let flags = Flags::default().set(
        "watch.progress_interval",
        "--watch-progress-interval",
        Some("soon"),
    );
    fails_with(
        load(None, &[], &flags),
        "watch.progress_interval (from --watch-progress-interval): \"soon\"",
    );
    // Bounds are checked as a value is read, rules between keys after the merge: both name
    // the key and its layer, the default included.
    let flags = Flags::default().set("min_approvals", "--min-approvals", Some(0u32));
    fails_with(
        load(None, &[], &flags),
        "min_approvals (from --min-approvals): must be at least 1",
    );
    fails_with(
        from_file("[limits]\nrequest_timeout = \"2s\"\n"),
        "apply.deadline (from the default): must stay below limits.request_timeout",
    );
    fails_with(
        from_env(&[("APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS", "-1")]),
        "limits.max_concurrent_streams (from APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS)",
    );
    fails_with(
        from_env(&[("APPROVALS_TELEMETRY_LOG_FORMAT", "xml")]),
        "telemetry.log_format (from APPROVALS_TELEMETRY_LOG_FORMAT)",
    );
    fails_with(
        from_env(&[("APPROVALS_LIMITS_KEEPALIVE_TIMEOUT", "0s")]),
        "limits.keepalive_timeout (from APPROVALS_LIMITS_KEEPALIVE_TIMEOUT)",
    );
}

#[test]
fn the_environment_reads_each_value_by_the_type_of_its_key() {
    let config = load(
        Some("[database]\nacquire_timeout = \" 2s \"\n"),
        &[
            ("APPROVALS_MIN_APPROVALS", " 3 "),
            ("APPROVALS_WATCH_POLL_INTERVAL", " 250ms"),
            ("APPROVALS_TELEMETRY_LOG_FORMAT", "json "),
            // A value that looks like a number stays the string it is.
            ("APPROVALS_TELEMETRY_SERVICE_NAME", "1234"),
            ("APPROVALS_LIMITS_KEEPALIVE_INTERVAL", "5s"),
            ("APPROVALS_WATCH_MAX_WATCHERS_PER_PRINCIPAL", "25"),
            // Not a key: ignored, as before.
            ("APPROVALS_WATCH", "x"),
        ],
        &Flags::default(),
    )
    .expect("loads");
    assert_eq!(config.database.acquire_timeout, Duration::from_secs(2));
    assert_eq!(config.min_approvals, 3);
    assert_eq!(config.watch.poll_interval, Duration::from_millis(250));
    assert_eq!(config.telemetry.log_format, "json");
    assert_eq!(config.telemetry.service_name, "1234");
    assert_eq!(config.limits.keepalive_interval, Duration::from_secs(5));
    assert_eq!(config.limits.keepalive_timeout, Duration::from_secs(10));
    assert_eq!(config.watch.max_watchers_per_principal, 25);
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
    let file = "[apply]\nallowed_endpoints = [{ endpoint = \"http://127.0.0.1\", allow_insecure = true }, \"https://*.svc.cluster.local:8443\"]\n";
    let config = from_file(file).expect("loads");
    assert_eq!(
        config.apply.allowed_endpoints.entries(),
        ["http://127.0.0.1", "https://*.svc.cluster.local:8443"]
    );
    let list = |value: &str| {
        load(
            Some(file),
            &[("APPROVALS_APPLY_ALLOWED_ENDPOINTS", value)],
            &Flags::default(),
        )
        .map(|config| config.apply.allowed_endpoints.entries().to_vec())
    };
    assert_eq!(
        list(" https://flags.internal:8080 ,, https://deploy.internal, ").expect("loads"),
        ["https://flags.internal:8080", "https://deploy.internal"],
        "the environment replaces the file's list; blanks are skipped"
    );
    // Clear text is said per entry, in a table: the environment's plain entries cannot.
    fails_with(
        from_env(&[("APPROVALS_APPLY_ALLOWED_ENDPOINTS", "http://flags.internal")]),
        "apply.allowed_endpoints (from APPROVALS_APPLY_ALLOWED_ENDPOINTS): entry [0] \"http://flags.internal\" would send applier calls in clear text",
    );
    assert_eq!(list("").expect("loads"), Vec::<String>::new());
    fails_with(
        from_env(&[("APPROVALS_APPLY_ALLOWED_ENDPOINTS", "https://a.internal/x")]),
        "apply.allowed_endpoints (from APPROVALS_APPLY_ALLOWED_ENDPOINTS): entry [0]",
    );
    fails_with(
        from_file("[apply]\nallowed_endpoints = [\"grpc://x\"]\n"),
        "apply.allowed_endpoints (from FILE): entry [0]",
    );
    // The file takes an array only, as before.
    fails_with(
        from_file("[apply]\nallowed_endpoints = \"https://127.0.0.1\"\n"),
        "apply.allowed_endpoints (from FILE): invalid type",
    );
}

#[test]
fn jwt_keys_from_the_environment_make_the_jwt_table() {
    let config = from_env(&[
        ("APPROVALS_AUTH_JWT_ISSUER", "https://id.example.com/"),
        ("APPROVALS_AUTH_JWT_AUDIENCE", "approvals"),
        ("APPROVALS_AUTH_JWT_JWKS_FILE", "/etc/jwks.json"),
    ])
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
            Shape::Integer => "7777",
            Shape::Boolean => "true",
            Shape::List => "https://127.0.0.1",
            Shape::Text => match key.as_str() {
                "listen" => "127.0.0.1:7",
                "tls.client_auth" => "optional",
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
