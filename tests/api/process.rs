//! The `approvals` binary as an operator runs it: migrate, serve, stop on SIGTERM, refuse bad
//! configuration, and the README's grpcurl walkthrough, run as written.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::common::{BINARY, Process, TestDatabase, skip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_serve_then_stop_on_sigterm() {
    let (database, url) = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("dir");
    let migrate = Command::new(BINARY)
        .args(["migrate", "--database-url", &url])
        .current_dir(dir.path())
        .output()
        .expect("run migrate");
    assert!(
        migrate.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    // Running it again is a no-op.
    let again = Command::new(BINARY)
        .args(["migrate", "--database-url", &url])
        .current_dir(dir.path())
        .output()
        .expect("migrate");
    assert!(again.status.success());

    let mut server = Process::serve(&url, dir.path());
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    drop(health);

    let exit = server.terminate();
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");
    // Until the reader thread has forwarded the last line (stdout closed when the server
    // exited): under load it may still be behind when the exit is seen.
    let logged: Vec<String> = server.output.iter().collect();
    assert!(
        logged.iter().any(|l| l.contains("shutdown requested")),
        "{logged:?}"
    );
    drop(database);
}

#[test]
fn default_database_is_a_sqlite_file_in_the_working_directory() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(BINARY)
        .arg("migrate")
        .current_dir(dir.path())
        .env_remove("APPROVALS_DATABASE_URL")
        .env_remove("APPROVALS_CONFIG")
        .output()
        .expect("migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("approvals.db").exists());
}

#[test]
fn bad_configuration_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("approvals.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n[database]\nmax_conections = 4\n",
    )
    .expect("write");
    let out = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&file)
        .current_dir(dir.path())
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_conections"), "{stderr}");

    let out = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir.path())
        .env("APPROVALS_MIN_APPROVALS", "many")
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("min_approvals") && stderr.contains("APPROVALS_MIN_APPROVALS"),
        "{stderr}"
    );
}

fn grpcurl() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("GRPCURL") {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join("grpcurl"))
        .chain([Path::new(&home).join(".local/bin/grpcurl")])
        .collect::<Vec<_>>();
    candidates.into_iter().find(|p| p.is_file())
}

/// The shell block between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in the README.
fn readme_block(readme: &str, name: &str) -> String {
    let start = readme
        .find(&format!("<!-- {name}:begin -->"))
        .unwrap_or_else(|| panic!("{name} begin marker"));
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .unwrap_or_else(|| panic!("{name} end marker"));
    readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `script` with bash (`-euo pipefail`) in `dir`, with `path_dir` first on PATH.
fn run_script(script: &str, dir: &Path, path_dir: &Path) -> (String, String) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env(
            "PATH",
            format!(
                "{}:{}",
                path_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env_remove("APPROVALS_API_KEY")
        .env_remove("APPROVALS_TOKEN")
        .env_remove("APPROVALS_PROFILE")
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .output()
        .expect("run walkthrough");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "walkthrough failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// Runs the README's walkthroughs (the blocks between the `cli-walkthrough` and `walkthrough`
/// markers: the CLI's, then grpcurl's) against a real server, so the README works as written.
#[tokio::test]
async fn readme_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let (database, url) = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("dir");
    let server = Process::serve(&url, dir.path());

    let cli = readme_block(&readme, "cli-walkthrough");
    assert!(
        cli.contains("approvals cr"),
        "walkthrough has commands: {cli}"
    );
    let cli = cli.replace("localhost:50051", &server.addr);
    let binary_dir = Path::new(BINARY)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let (stdout, _) = run_script(&cli, dir.path(), &binary_dir);
    assert!(
        stdout.contains("approved ") && stdout.contains("STATE_APPROVED"),
        "the second actor's approval approves:\n{stdout}"
    );

    let Some(grpcurl) = grpcurl() else {
        skip(
            "readme_walkthrough_runs_as_written (grpcurl part)",
            "grpcurl not found in GRPCURL, PATH or ~/.local/bin \
             (../shared/tools/install-grpcurl.sh installs it)",
        );
        return;
    };
    let script = readme_block(&readme, "walkthrough");
    assert!(
        script.contains("grpcurl"),
        "walkthrough has commands: {script}"
    );
    let script = script.replace("localhost:50051", &server.addr);
    let grpcurl_dir = grpcurl.parent().map(Path::to_path_buf).unwrap_or_default();
    let (stdout, _) = run_script(&script, dir.path(), &grpcurl_dir);
    assert!(
        stdout.contains("approvals.v1.ChangeRequests"),
        "list shows the service:\n{stdout}"
    );
    assert!(
        stdout.contains("STATE_APPROVED"),
        "the second actor's approval approves:\n{stdout}"
    );
    drop(server);
    drop(database);
}
