//! Lints `deploy/` where no container engine or cluster is available: every YAML parses, the
//! Kubernetes manifests keep their invariants (replicas, native gRPC probes on the right health
//! names, selectors that match, resource requests, non-root), and the configuration shipped in
//! the ConfigMap and for compose loads with the server's own loader.

use std::path::{Path, PathBuf};

use approvals::config::{Config, Flags};
use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of every YAML file under deploy/.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    let mut dirs = vec![deploy()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read deploy/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut documents = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read yaml");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::with::singleton_map_recursive::deserialize(document)
                .unwrap_or_else(|e: serde_yaml::Error| panic!("{}: {e}", path.display()));
            documents.push((path.clone(), value));
        }
    }
    documents
}

fn kind<'a>(documents: &'a [(PathBuf, Value)], kind: &str) -> &'a Value {
    documents
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} under deploy/k8s"))
}

fn load_config(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("approvals.toml");
    std::fs::write(&path, text).expect("write");
    Config::load(
        Some(&path),
        |name| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        },
        &Flags::default(),
    )
    .and_then(|config| approvals::transport::check_config(&config).map(|()| config))
    .map_err(|e| e.to_string())
}

#[test]
fn kubernetes_manifests_keep_their_invariants() {
    let documents = documents();
    assert!(documents.len() >= 8, "{} documents", documents.len());

    let deployment = kind(&documents, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    assert_eq!(
        container["livenessProbe"]["grpc"]["service"].as_str(),
        Some(approvals::transport::LIVENESS_SERVICE),
        "liveness checks the health name that ignores the database"
    );
    assert_eq!(
        container["readinessProbe"]["grpc"]["service"].as_str(),
        Some(""),
        "readiness checks the whole server"
    );
    let port = container["ports"][0]["containerPort"].as_u64();
    assert_eq!(container["livenessProbe"]["grpc"]["port"].as_u64(), port);
    assert_eq!(container["readinessProbe"]["grpc"]["port"].as_u64(), port);
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());

    let pdb = kind(&documents, "PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert!(pdb["spec"]["minAvailable"].as_u64().is_some_and(|n| n < 3));
    let service = kind(&documents, "Service");
    for (key, value) in service["spec"]["selector"]
        .as_mapping()
        .expect("service selector")
    {
        assert_eq!(&labels[key], value, "service selector matches the pods");
    }

    // The shipped configuration loads, with the database URL the Secret provides.
    let secret = kind(&documents, "Secret");
    let database_url = secret["stringData"]["database-url"]
        .as_str()
        .expect("database-url in the Secret");
    let config_text = kind(&documents, "ConfigMap")["data"]["approvals.toml"]
        .as_str()
        .expect("approvals.toml in the ConfigMap");
    let config = load_config(config_text, &[("APPROVALS_DATABASE_URL", database_url)])
        .expect("the ConfigMap's configuration loads");
    assert_eq!(config.listen_addr().map(|a| a.port()), Ok(50051));
    assert!(
        config.limits.shutdown_grace.as_secs()
            < pod["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("grace period"),
        "kubelet waits longer than the server drains"
    );
    let jwks = config
        .auth
        .jwt
        .as_ref()
        .and_then(|j| j.jwks_file.clone())
        .expect("jwks_file");
    assert!(jwks.starts_with("/etc/approvals/keys/"), "{jwks}");
}

#[test]
fn compose_stack_and_collector_config_are_consistent() {
    let documents = documents();
    let compose = documents
        .iter()
        .find(|(path, _)| path.ends_with("compose.yaml"))
        .map(|(_, v)| v)
        .expect("compose.yaml");
    let services = &compose["services"];
    for name in ["postgres", "otel-collector", "approvals"] {
        assert!(services[name].is_mapping(), "compose service {name}");
    }
    let env = &services["approvals"]["environment"];
    assert!(env["OTEL_EXPORTER_OTLP_ENDPOINT"].is_string());
    let database_url = env["APPROVALS_DATABASE_URL"]
        .as_str()
        .expect("database url");
    let text = std::fs::read_to_string(deploy().join("approvals.toml")).expect("approvals.toml");
    load_config(&text, &[("APPROVALS_DATABASE_URL", database_url)])
        .expect("compose's configuration loads");

    let collector = documents
        .iter()
        .find(|(path, _)| path.ends_with("otel-collector.yaml"))
        .map(|(_, v)| v)
        .expect("otel-collector.yaml");
    for pipeline in ["traces", "metrics"] {
        let receivers = &collector["service"]["pipelines"][pipeline]["receivers"];
        assert_eq!(receivers[0].as_str(), Some("otlp"), "{pipeline}");
    }

    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.matches("\nFROM ").count() >= 2,
        "multi-stage Dockerfile"
    );
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
}
