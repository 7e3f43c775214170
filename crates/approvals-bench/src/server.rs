//! The server under test: a database of its own (a SQLite file in a temporary directory, or a
//! fresh PostgreSQL database dropped afterwards) and the real `approvals` binary as a child
//! process, so its resident memory can be read from /proc.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sea_orm::{ConnectionTrait, Database};
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A database created for one run, removed when the run ends (unless kept).
pub enum BenchDatabase {
    Sqlite {
        dir: PathBuf,
        keep: bool,
    },
    Postgres {
        admin_url: String,
        name: String,
        keep: bool,
    },
}

impl BenchDatabase {
    pub async fn create(
        postgres_admin_url: Option<&str>,
        keep: bool,
    ) -> Result<(Self, String), String> {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        match postgres_admin_url {
            Some(admin_url) => {
                let name = format!("approvals_bench_{tag}");
                let admin = Database::connect(admin_url)
                    .await
                    .map_err(|e| format!("connect to {admin_url}: {e}"))?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .map_err(|e| format!("create database {name}: {e}"))?;
                let url = with_database(admin_url, &name);
                Ok((
                    Self::Postgres {
                        admin_url: admin_url.to_owned(),
                        name,
                        keep,
                    },
                    url,
                ))
            }
            None => {
                let dir = std::env::temp_dir().join(format!("approvals-bench-{tag}"));
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let url = format!("sqlite://{}", dir.join("approvals.db").display());
                Ok((Self::Sqlite { dir, keep }, url))
            }
        }
    }

    pub async fn remove(self) {
        match self {
            Self::Sqlite { dir, keep: false } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Self::Postgres {
                admin_url,
                name,
                keep: false,
            } => {
                if let Ok(admin) = Database::connect(&admin_url).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            }
            Self::Sqlite { dir, keep: true } => eprintln!("kept {}", dir.display()),
            Self::Postgres { name, .. } => eprintln!("kept database {name}"),
        }
    }
}

/// `postgres://u@h:5432/db?x=y` with `db` replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let prefix = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{prefix}/{name}?{query}"),
        None => format!("{prefix}/{name}"),
    }
}

/// The `approvals` server as a child process; killed (by its pid) when dropped.
pub struct ServerProcess {
    child: Child,
    pub addr: String,
    /// How clients reach it over TLS (`None`: plain text).
    pub tls: Option<ClientTlsConfig>,
    /// The configuration file written for it, removed on drop.
    config: std::path::PathBuf,
}

/// The TLS of a client of a server started with `tls_dir`: the dev CA, name `localhost`.
pub fn client_tls(dir: &Path) -> Result<ClientTlsConfig, String> {
    let ca = std::fs::read(dir.join("ca.pem")).map_err(|e| format!("ca.pem: {e}"))?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost"))
}

pub struct ServerOptions<'a> {
    pub binary: &'a Path,
    pub database_url: &'a str,
    pub max_watchers: usize,
    /// Watch streams the bench opens on one connection (`limits.max_concurrent_streams` is
    /// set to at least this).
    pub streams_per_connection: usize,
    pub db_connections: Option<u32>,
    pub log: &'a Path,
    /// Serve TLS with the throwaway certificates `approvals::tls::dev` wrote into this
    /// directory (server.pem, server-key.pem; clients verify with ca.pem).
    pub tls_dir: Option<&'a Path>,
    /// `false`: the server writes creates' events unhashed (`audit.bench_create_hashing`).
    pub create_hashing: bool,
}

impl ServerProcess {
    pub async fn start(options: &ServerOptions<'_>) -> Result<Self, String> {
        // An ephemeral port, released just before the server binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("find a free port: {e}"))?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(options.log)
            .map_err(|e| format!("{}: {e}", options.log.display()))?;
        // The lifecycle scenario's applier listens on a loopback port, in plain text: said per
        // entry (`allow_insecure`), so in a file.
        let config = options.log.with_extension("toml");
        std::fs::write(
            &config,
            "[apply]\nallowed_endpoints = [{ endpoint = \"http://127.0.0.1\", allow_insecure = true }]\n",
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut command = Command::new(options.binary);
        command
            .env("APPROVALS_CONFIG", &config)
            .env("APPROVALS_LISTEN", &addr)
            .env("APPROVALS_DATABASE_URL", options.database_url)
            // The lifecycle scenario needs two distinct approvals for quorum.
            .env("APPROVALS_MIN_APPROVALS", "2")
            .env(
                "APPROVALS_WATCH_MAX_WATCHERS",
                options.max_watchers.to_string(),
            )
            // Every bench watcher is the one principal `user:watcher`: no per-principal cap.
            .env("APPROVALS_WATCH_MAX_WATCHERS_PER_PRINCIPAL", "0")
            // The watchers of a connection open at once, however many it carries.
            .env(
                "APPROVALS_LIMITS_MAX_CONCURRENT_STREAMS",
                options.streams_per_connection.max(1000).to_string(),
            )
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !options.create_hashing {
            command.env("APPROVALS_AUDIT_BENCH_CREATE_HASHING", "false");
        }
        if let Some(n) = options.db_connections {
            command.env("APPROVALS_DATABASE_MAX_CONNECTIONS", n.to_string());
        }
        let tls = match options.tls_dir {
            Some(dir) => {
                command
                    .env("APPROVALS_TLS_CERT_FILE", dir.join("server.pem"))
                    .env("APPROVALS_TLS_KEY_FILE", dir.join("server-key.pem"));
                Some(client_tls(dir)?)
            }
            None => None,
        };
        let child = command
            .spawn()
            .map_err(|e| format!("start {}: {e}", options.binary.display()))?;
        let mut server = Self {
            child,
            addr,
            tls,
            config,
        };
        server.wait_until_serving(options.log).await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_until_serving(&mut self, log: &Path) -> Result<(), String> {
        for _ in 0..600 {
            if let Ok(Some(status)) = self.child.try_wait() {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                return Err(format!("server exited with {status}: {tail}"));
            }
            if let Ok(channel) = crate::connect(&self.addr, self.tls.as_ref()).await
                && let Ok(response) = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                && response.get_ref().status == ServingStatus::Serving as i32
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("server did not become SERVING within 60 s".into())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Resident set size of a process in bytes (VmRSS), or None when /proc cannot tell.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat` (`self` for the
/// bench's own).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // In USER_HZ, which the kernel's ABI fixes at 100 for /proc.
    Some(ticks as f64 / 100.0)
}

/// The 1-minute load average, to tell a quiet machine from a busy one in the report.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
