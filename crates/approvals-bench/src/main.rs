//! approvals-bench: throughput, latency and watch fan-out of the approvals server, each figure
//! held against a ceiling measured in the same run on the same machine (a bare tonic unary RPC,
//! the database's own rate for the same inserts without gRPC, and its bare rate for two rows per
//! transaction in tables of nothing but a key and a body: see `raw.rs`).
//!
//! See the README's "Benchmark" section for how to run it and what each figure means.

mod applier;
mod load;
mod raw;
mod seed;
mod server;
mod watch;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use approvals::pb::{self, change_requests_client::ChangeRequestsClient};
use clap::{Parser, ValueEnum};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use serde::Serialize;
use tokio::sync::Mutex;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, ClientTlsConfig},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    load::{Stats, drive},
    seed::Template,
    server::{BenchDatabase, ServerOptions, ServerProcess},
    watch::{WatchDecode, WatchOptions, WatchResult},
};

/// The same allocator as the server (mimalloc): the bench's clients, watchers and ceilings share
/// the machine with the server, and glibc's malloc was a large share of their CPU too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Health,
    Direct,
    RawPair,
    Create,
    Get,
    List,
    Lifecycle,
    Watch,
}

/// Load generator for the approvals server.
#[derive(Parser, Debug)]
#[command(name = "approvals-bench")]
struct Cli {
    /// Database of the server the bench starts.
    #[arg(long, value_enum, default_value = "sqlite")]
    database: Backend,
    /// PostgreSQL server on which to create (and afterwards drop) a database for the run.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Bench a running server at this address instead of starting one. Without a database URL
    /// (--target-database-url) the direct-insert ceiling, seeding and RSS are skipped.
    #[arg(long, value_name = "HOST:PORT")]
    target: Option<String>,
    /// With --target: the server's database, for seeding and the direct-insert ceiling.
    #[arg(long)]
    target_database_url: Option<String>,
    /// The `approvals` server binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// The server's database pool size (APPROVALS_DATABASE_MAX_CONNECTIONS; default: the
    /// server's own default).
    #[arg(long)]
    server_db_connections: Option<u32>,
    /// Calls in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Calls in flight for the list scenarios, whose target is a latency (p99 < 5 ms): at 64
    /// in flight their p99 is mostly time spent queueing behind the other 63.
    #[arg(long, default_value_t = 4)]
    list_concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Measured window of each scenario.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before each scenario's window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Requests seeded (with direct SQL) for the list and get scenarios.
    #[arg(long, default_value_t = 1_000_000)]
    seed_rows: u64,
    /// Watchers for each fan-out measurement (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    watchers: Vec<usize>,
    /// Watch streams per HTTP/2 connection.
    #[arg(long, default_value_t = 1000)]
    watchers_per_connection: usize,
    /// Writes observed by the watchers in each fan-out measurement.
    #[arg(long, default_value_t = 40)]
    watch_writes: usize,
    /// Pause between two watched writes.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    watch_interval: Duration,
    /// How much of each watch message the watchers decode: `revisions` (each event's revision;
    /// the rest is skipped unread, so the client's CPU, which shares the machine with the
    /// server, weighs less on the figure) or `full` (the whole generated message).
    #[arg(long, value_enum, default_value = "revisions")]
    watch_decode: WatchDecode,
    /// Scenarios to run (comma separated; default all, or none but the sweep with
    /// --latency-sweep).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the run's database afterwards.
    #[arg(long)]
    keep_database: bool,
    /// Then start a second server with TLS (throwaway certificates, no client certificates)
    /// and run get and create over TLS: rows `get (tls)` and `create (tls)`, each with its
    /// ratio to the plain-text row. Not with --target.
    #[arg(long)]
    tls: bool,
    /// `off`: the server this bench starts writes each create's event without a hash
    /// (`audit.bench_create_hashing = false`), to compare create throughput with hashing on;
    /// run it interleaved with `on` (see the README, "Audit", Cost).
    #[arg(long, value_enum, default_value = "on")]
    create_hashing: Toggle,
    /// Runs `raw_pair (ceiling)` and then `create` at 1, 8 and 64 in flight, and prints the
    /// ops/s, p50 and p99 of each in a short table of its own (JSON: `latency_sweep`): how much
    /// of create's latency is the database's commit and how much queueing. Without --only it
    /// runs only the sweep; with --only, the sweep follows those scenarios. Each point has its
    /// own --warmup and --duration window.
    #[arg(long)]
    latency_sweep: bool,
}

/// The calls in flight of each point of `--latency-sweep`.
const SWEEP_LEVELS: [usize; 3] = [1, 8, 64];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Toggle {
    On,
    Off,
}

impl Cli {
    fn runs(&self, scenario: Scenario) -> bool {
        if self.only.is_empty() {
            !self.latency_sweep
        } else {
            self.only.contains(&scenario)
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: String,
    concurrency: usize,
    #[serde(flatten)]
    stats: Stats,
    /// The ceiling this figure is held against, and the ratio of throughputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    ceiling: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    /// The ratio of throughputs to `raw_pair (ceiling)`, the database's bare two-insert
    /// transaction, beside the ratio to `ceiling`.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    database: Backend,
    target: Option<String>,
    concurrency: usize,
    connections: usize,
    duration_seconds: f64,
    seed_rows: u64,
    seed_seconds: Option<f64>,
    cores: usize,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
    rows: Vec<Row>,
    /// `--latency-sweep`: raw_pair and create at each of `SWEEP_LEVELS` in flight.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    latency_sweep: Vec<Row>,
    watch: Vec<WatchResult>,
}

pub(crate) fn with_actor<T>(message: T, actor: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = MetadataValue::try_from(actor) {
        request
            .metadata_mut()
            .insert(approvals::ACTOR_HEADER, value);
    }
    request
}

/// A channel to `addr`, over TLS with `tls`.
pub(crate) async fn connect(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS: {e}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))
}

/// A row of the direct-insert ceilings: a fresh id, the ceiling's project, one requester per
/// worker.
fn ceiling_row(worker: usize, resource_id: String) -> seed::RowSpec {
    seed::RowSpec {
        id: uuid::Uuid::now_v7().to_string(),
        project: "ceiling-direct".into(),
        environment: "prod".into(),
        created_by: format!("user:direct-{worker}"),
        resource_id,
    }
}

fn payload() -> prost_types::Struct {
    use prost_types::{Value, value::Kind};
    prost_types::Struct {
        fields: [
            (
                "enabled".to_owned(),
                Value {
                    kind: Some(Kind::BoolValue(true)),
                },
            ),
            (
                "rollout".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(50.0)),
                },
            ),
        ]
        .into_iter()
        .collect(),
    }
}

/// The create request every scenario sends (a feature flag roll-out, one change).
pub(crate) fn create_request(project: &str, resource_id: &str) -> pb::CreateChangeRequestRequest {
    pb::CreateChangeRequestRequest {
        project: project.to_owned(),
        environment: "prod".into(),
        action_key: "feature_flag.update".into(),
        action_version: 1,
        title: "Roll out checkout".into(),
        description: "50% of users".into(),
        changes: vec![pb::Change {
            action: "update".into(),
            resource_type: "feature_flag".into(),
            resource_id: resource_id.to_owned(),
            payload: Some(payload()),
            ..Default::default()
        }],
        intent_display: "Enable checkout for 50%".into(),
        ..Default::default()
    }
}

fn row(scenario: &str, concurrency: usize, stats: Stats) -> Row {
    Row {
        scenario: scenario.to_owned(),
        concurrency,
        stats,
        ceiling: None,
        ratio: None,
        raw_ratio: None,
        target: None,
    }
}

fn against(mut row: Row, ceiling: Option<&Row>, target: &str) -> Row {
    if let Some(ceiling) = ceiling {
        row.ceiling = Some(ceiling.scenario.clone());
        if ceiling.stats.per_second > 0.0 {
            row.ratio = Some(row.stats.per_second / ceiling.stats.per_second);
        }
    }
    row.target = Some(target.to_owned());
    row
}

/// `row` with its ratio to the raw_pair ceiling, if that ran.
fn against_raw(mut row: Row, raw: Option<&Row>) -> Row {
    if let Some(raw) = raw.filter(|raw| raw.stats.per_second > 0.0) {
        row.raw_ratio = Some(row.stats.per_second / raw.stats.per_second);
    }
    row
}

/// CreateChangeRequest at `concurrency` in flight, in `project`, each of a resource of its own.
async fn drive_creates(
    clients: Arc<Clients>,
    project: &str,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Stats {
    let project = project.to_owned();
    drive(concurrency, warmup, duration, move |worker, sequence| {
        let mut client = clients.api(worker);
        let request = create_request(&project, &format!("flag-{worker}-{sequence}"));
        async move {
            client
                .create_change_request(with_actor(request, "user:creator"))
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    })
    .await
}

/// The raw_pair ceiling at each of `levels` in flight, on its two tables, created for it and
/// dropped afterwards with its pool (as wide as the widest level).
async fn raw_pair_rows(
    url: &str,
    template: &Template,
    levels: &[usize],
    warmup: Duration,
    duration: Duration,
) -> Result<Vec<Row>, String> {
    let body: Arc<str> = template.body()?.into();
    eprintln!(
        "  raw_pair rows carry {} bytes each (the template request's JSON body)",
        body.len()
    );
    let widest = levels.iter().copied().max().unwrap_or(1);
    let pair = raw::RawPair::open(url, widest).await?;
    let mut rows = Vec::with_capacity(levels.len());
    let mut failure = None;
    for &c in levels {
        match pair.drive(c, warmup, duration, body.clone()).await {
            Ok(stats) => rows.push(row("raw_pair (ceiling)", c, stats)),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    pair.close().await;
    failure.map_or(Ok(rows), Err)
}

/// GetChangeRequest at `concurrency` in flight, of the id `pick(worker, sequence)` names.
async fn drive_gets(
    clients: Arc<Clients>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    pick: impl Fn(usize, u64) -> String + Send + Sync + 'static,
) -> Stats {
    drive(concurrency, warmup, duration, move |worker, sequence| {
        let mut client = clients.api(worker);
        let id = pick(worker, sequence);
        async move {
            client
                .get_change_request(with_actor(
                    pb::GetChangeRequestRequest { id },
                    "user:reader",
                ))
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    })
    .await
}

async fn open_database(url: &str, connections: u32) -> Result<DatabaseConnection, String> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(30))
        // The database's own rate: no ping before each checkout.
        .test_before_acquire(false)
        .sqlx_logging(false);
    if url.starts_with("sqlite:") {
        // As the service opens it: WAL, synchronous FULL.
        options.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(30))
        });
    }
    Database::connect(options)
        .await
        .map_err(|e| format!("connect to the database: {e}"))
}

/// Seeds `rows` requests in batches, in parallel on PostgreSQL; returns a sample of 10,000 of
/// their ids (the hot set the `get` scenario reads) and the base time that names them all.
async fn seed_table(
    url: &str,
    postgres: bool,
    template: &Template,
    rows: u64,
) -> Result<(Vec<String>, u64), String> {
    const BATCH: u64 = 1000;
    let parallel: u64 = if postgres { 3 } else { 1 };
    let db = open_database(url, parallel as u32).await?;
    let base_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as u64
        - rows
        - 86_400_000;
    let batches = rows.div_ceil(BATCH);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..parallel {
        let db = db.clone();
        let template = template.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let batch = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if batch >= batches {
                    return Ok::<_, String>(());
                }
                let specs: Vec<_> = (batch * BATCH..((batch + 1) * BATCH).min(rows))
                    .map(|i| seed::seeded(i, base_ms))
                    .collect();
                let txn = db.begin().await.map_err(|e| e.to_string())?;
                seed::insert_rows(&txn, &template, &specs)
                    .await
                    .map_err(|e| format!("seed batch {batch}: {e}"))?;
                txn.commit().await.map_err(|e| e.to_string())?;
                if batch.is_multiple_of(100) {
                    eprintln!(
                        "  seeded {} of {rows} rows ({:.0}s)",
                        batch * BATCH,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    // What autovacuum does after a bulk insert (PostgreSQL 13+ vacuums on inserts too): fresh
    // statistics, and a visibility map, so the capped count of a list is an index-only scan
    // (measured at 100,000 rows: 31 ms with heap fetches for 3,400 matches, 1.4 ms without).
    let maintenance = if postgres {
        "VACUUM ANALYZE"
    } else {
        "ANALYZE"
    };
    db.execute_unprepared(maintenance)
        .await
        .map_err(|e| format!("{maintenance}: {e}"))?;
    let step = (rows / 10_000).max(1);
    let sample = (0..rows)
        .step_by(step as usize)
        .map(|i| seed::seeded(i, base_ms).id)
        .collect();
    Ok((sample, base_ms))
}

struct Clients {
    channels: Vec<Channel>,
}

impl Clients {
    async fn open(addr: &str, n: usize, tls: Option<&ClientTlsConfig>) -> Result<Self, String> {
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            channels.push(connect(addr, tls).await?);
        }
        Ok(Self { channels })
    }

    fn api(&self, worker: usize) -> ChangeRequestsClient<Channel> {
        ChangeRequestsClient::new(self.channels[worker % self.channels.len()].clone())
    }
}

/// The end of the full lifecycle: the project's AUTO policy applies the request on quorum, and
/// the second approval returns after the apply.
/// A create in `project` by worker `worker`'s requester, of a resource of its own.
async fn create_as_worker(
    client: &mut ChangeRequestsClient<Channel>,
    project: &str,
    worker: usize,
    sequence: u64,
) -> Result<pb::ChangeRequest, String> {
    client
        .create_change_request(with_actor(
            create_request(project, &format!("flag-{worker}-{sequence}")),
            &format!("user:requester-{worker}"),
        ))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("create: {s}"))
}

/// `reviewer`'s approval of request `id`.
async fn approve_as(
    client: &mut ChangeRequestsClient<Channel>,
    id: &str,
    reviewer: &str,
) -> Result<pb::ChangeRequest, String> {
    client
        .approve_change_request(with_actor(
            pb::ApproveChangeRequestRequest {
                id: id.to_owned(),
                ..Default::default()
            },
            reviewer,
        ))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("approve: {s}"))
}

async fn finish_lifecycle(
    _client: &mut ChangeRequestsClient<Channel>,
    last: &pb::ChangeRequest,
) -> Result<(), String> {
    if last.state != pb::State::Applied as i32 {
        return Err(format!(
            "expected APPLIED after two approvals (AUTO policy), got state {}",
            last.state
        ));
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<Report, String> {
    let load_average_start = server::load_average();
    let postgres = cli.database == Backend::Postgres;
    // The server: ours (a fresh database) or the one named by --target.
    let mut owned = None;
    let (addr, database_url, server_pid) = match &cli.target {
        Some(target) => (target.clone(), cli.target_database_url.clone(), None),
        None => {
            let (database, url) = BenchDatabase::create(
                postgres.then_some(cli.postgres_url.as_str()),
                cli.keep_database,
            )
            .await?;
            let binary = match &cli.server_bin {
                Some(path) => path.clone(),
                None => std::env::current_exe()
                    .map_err(|e| e.to_string())?
                    .with_file_name("approvals"),
            };
            let log = std::env::temp_dir()
                .join(format!("approvals-bench-server-{}.log", std::process::id()));
            let max_watchers = cli.watchers.iter().copied().max().unwrap_or(0) + 1000;
            let process = ServerProcess::start(&ServerOptions {
                binary: &binary,
                database_url: &url,
                max_watchers: max_watchers.max(50_000),
                streams_per_connection: cli.watchers_per_connection,
                db_connections: cli.server_db_connections,
                log: &log,
                tls_dir: None,
                create_hashing: cli.create_hashing == Toggle::On,
            })
            .await;
            let process = match process {
                Ok(process) => process,
                Err(err) => {
                    database.remove().await;
                    return Err(err);
                }
            };
            eprintln!("server pid {} on {} ({url})", process.pid(), process.addr);
            let result = (process.addr.clone(), Some(url), Some(process.pid()));
            owned = Some((process, database));
            result
        }
    };
    let result = scenarios(&cli, &addr, database_url.as_deref(), server_pid).await;
    if let Some((process, database)) = owned {
        drop(process);
        database.remove().await;
    }
    let Outcome {
        mut rows,
        latency_sweep,
        watch,
        seed_seconds,
    } = result?;
    if cli.tls && cli.target.is_none() {
        let tls_rows = over_tls(&cli, &rows).await?;
        rows.extend(tls_rows);
    }
    Ok(Report {
        database: cli.database,
        target: cli.target.clone(),
        concurrency: cli.concurrency,
        connections: cli.connections,
        duration_seconds: cli.duration.as_secs_f64(),
        seed_rows: cli.seed_rows,
        seed_seconds,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average_start,
        load_average_end: server::load_average(),
        rows,
        latency_sweep,
        watch,
    })
}

/// What the scenarios against one server measured.
struct Outcome {
    rows: Vec<Row>,
    latency_sweep: Vec<Row>,
    watch: Vec<WatchResult>,
    seed_seconds: Option<f64>,
}

/// `--tls`: a second server (a fresh database) serving TLS with throwaway certificates; get
/// and create over it, each held against its plain-text row of `plain`.
async fn over_tls(cli: &Cli, plain: &[Row]) -> Result<Vec<Row>, String> {
    let postgres = cli.database == Backend::Postgres;
    let dir = std::env::temp_dir().join(format!("approvals-bench-tls-{}", std::process::id()));
    approvals::tls::dev::write(&dir)?;
    let (database, url) =
        BenchDatabase::create(postgres.then_some(cli.postgres_url.as_str()), false).await?;
    let binary = match &cli.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("approvals"),
    };
    let log = std::env::temp_dir().join(format!(
        "approvals-bench-server-tls-{}.log",
        std::process::id()
    ));
    let process = ServerProcess::start(&ServerOptions {
        binary: &binary,
        database_url: &url,
        max_watchers: 1000,
        streams_per_connection: 1,
        db_connections: cli.server_db_connections,
        log: &log,
        tls_dir: Some(&dir),
        create_hashing: cli.create_hashing == Toggle::On,
    })
    .await;
    let result = match process {
        Ok(process) => {
            eprintln!("TLS server pid {} on {}", process.pid(), process.addr);
            let rows = tls_scenarios(cli, &process, plain).await;
            drop(process);
            rows
        }
        Err(err) => Err(err),
    };
    database.remove().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn tls_scenarios(
    cli: &Cli,
    server: &ServerProcess,
    plain: &[Row],
) -> Result<Vec<Row>, String> {
    let clients =
        Arc::new(Clients::open(&server.addr, cli.connections, server.tls.as_ref()).await?);
    let (c, warmup, duration) = (cli.concurrency, cli.warmup, cli.duration);
    let plain_row = |name: &str| plain.iter().find(|row| row.scenario == name);
    let mut rows = Vec::new();
    if cli.runs(Scenario::Create) {
        eprintln!("create over TLS...");
        let stats = drive_creates(clients.clone(), "bench-create", c, warmup, duration).await;
        rows.push(against(
            row("create (tls)", c, stats),
            plain_row("create"),
            "vs create in plain text",
        ));
    }
    if cli.runs(Scenario::Get) {
        eprintln!("get over TLS...");
        let created = clients
            .api(0)
            .create_change_request(with_actor(
                create_request("bench-template", "flag-0"),
                "user:bench",
            ))
            .await
            .map_err(|s| format!("create the request to get: {s}"))?
            .into_inner();
        let stats = drive_gets(clients.clone(), c, warmup, duration, move |_, _| {
            created.id.clone()
        })
        .await;
        rows.push(against(
            row("get (tls)", c, stats),
            plain_row("get"),
            "vs get in plain text",
        ));
    }
    Ok(rows)
}

async fn scenarios(
    cli: &Cli,
    addr: &str,
    database_url: Option<&str>,
    server_pid: Option<u32>,
) -> Result<Outcome, String> {
    let clients = Arc::new(Clients::open(addr, cli.connections, None).await?);
    let (c, warmup, duration) = (cli.concurrency, cli.warmup, cli.duration);
    let mut rows: Vec<Row> = Vec::new();
    let postgres = database_url.is_some_and(|u| u.starts_with("postgres"));

    // The template rows: one request created by the service itself.
    let mut template_client = clients.api(0);
    let template_request = template_client
        .create_change_request(with_actor(
            create_request("bench-template", "flag-0"),
            "user:bench",
        ))
        .await
        .map_err(|s| format!("create the template request: {s}"))?
        .into_inner();
    // Read with a one-connection store; the direct ceiling opens its own pool, as wide as the
    // concurrency, and closes it afterwards, so the server's pool and the bench's never hold
    // more than PostgreSQL's max_connections (100 by default) between them.
    let template = match database_url {
        Some(url) => Some(Template::read(url, &template_request.id).await?),
        None => None,
    };

    // Ceiling 1: a bare tonic unary RPC against the same server.
    let health = if cli.runs(Scenario::Health) || cli.runs(Scenario::Get) {
        eprintln!("health (bare tonic ceiling)...");
        let channels = clients.channels.clone();
        let stats = drive(c, warmup, duration, move |worker, _| {
            let mut client = HealthClient::new(channels[worker % channels.len()].clone());
            async move {
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        })
        .await;
        let health = row("health_check (ceiling)", c, stats);
        rows.push(health.clone());
        Some(health)
    } else {
        None
    };

    // Ceiling 2: the same inserts straight into the database, one transaction per request.
    let direct = match (database_url, &template) {
        (Some(url), Some(template)) if cli.runs(Scenario::Direct) || cli.runs(Scenario::Create) => {
            eprintln!("direct inserts (database ceiling)...");
            let db = open_database(url, c as u32).await?;
            let pool = db.clone();
            let template = Arc::new(template.clone());
            let one_statement_template = template.clone();
            // SQLite takes one writer at a time; the service queues its writers the same way.
            let writer = Arc::new(Mutex::new(()));
            let stats = drive(c, warmup, duration, move |worker, sequence| {
                let (db, template, writer) = (db.clone(), template.clone(), writer.clone());
                async move {
                    let spec = ceiling_row(worker, format!("flag-{sequence}"));
                    let _guard = if postgres {
                        None
                    } else {
                        Some(writer.lock().await)
                    };
                    seed::insert_one(&db, &template, &spec).await
                }
            })
            .await;
            let direct = row("direct_insert (ceiling)", c, stats);
            rows.push(direct.clone());
            if postgres {
                eprintln!("direct inserts, one statement each (database ceiling)...");
                let template = one_statement_template;
                let db = pool.clone();
                let stats = drive(c, warmup, duration, move |worker, sequence| {
                    let (db, template) = (db.clone(), template.clone());
                    async move {
                        let spec = ceiling_row(worker, format!("flag-one-{sequence}"));
                        seed::insert_one_statement(&db, &template, &spec).await
                    }
                })
                .await;
                rows.push(row("direct_insert_one_statement (ceiling)", c, stats));
            }
            let _ = pool.close().await;
            Some(direct)
        }
        _ => None,
    };

    // Ceiling 3: the database's bare rate for two inserts per transaction (see raw.rs).
    let raw = match (database_url, &template) {
        (Some(url), Some(template))
            if cli.runs(Scenario::RawPair) || cli.runs(Scenario::Create) =>
        {
            eprintln!("raw_pair (bare two-insert transactions, database ceiling)...");
            let raw = raw_pair_rows(url, template, &[c], warmup, duration)
                .await?
                .pop();
            rows.extend(raw.clone());
            raw
        }
        _ => None,
    };

    if cli.runs(Scenario::Create) {
        eprintln!("create...");
        let stats = drive_creates(clients.clone(), "bench-create", c, warmup, duration).await;
        rows.push(against_raw(
            against(
                row("create", c, stats),
                direct.as_ref(),
                ">= 0.8 of direct_insert (PostgreSQL)",
            ),
            raw.as_ref(),
        ));
    }

    // The table lists and gets read from.
    let mut seed_seconds = None;
    let mut sample_ids = vec![template_request.id.clone()];
    let mut seeded_base_ms = None;
    if (cli.runs(Scenario::List) || cli.runs(Scenario::Get)) && cli.seed_rows > 0 {
        match (database_url, &template) {
            (Some(url), Some(template)) => {
                eprintln!("seeding {} requests with direct SQL...", cli.seed_rows);
                let started = Instant::now();
                let (sample, base_ms) = seed_table(url, postgres, template, cli.seed_rows).await?;
                sample_ids = sample;
                seeded_base_ms = Some(base_ms);
                seed_seconds = Some(started.elapsed().as_secs_f64());
                eprintln!("  seeded in {:.1}s", started.elapsed().as_secs_f64());
            }
            _ => eprintln!("no database URL: not seeding; get reads the template request"),
        }
    }

    if cli.runs(Scenario::Get) {
        eprintln!("get...");
        let ids = Arc::new(sample_ids.clone());
        let stats = drive_gets(
            clients.clone(),
            c,
            warmup,
            duration,
            move |worker, sequence| {
                ids[(seed::mix(worker as u64 * 1_000_003 + sequence) % ids.len() as u64) as usize]
                    .clone()
            },
        )
        .await;
        rows.push(against(
            row("get", c, stats),
            health.as_ref(),
            ">= 0.5 of health_check, p99 < 10 ms",
        ));
    }

    // The same call over every seeded row, uniformly: with 1,000,000 rows and the server's
    // default cache of 20,000 requests, most reads miss the cache and read the database.
    if let (true, Some(base_ms)) = (cli.runs(Scenario::Get), seeded_base_ms) {
        eprintln!("get over every seeded row...");
        let seeded = cli.seed_rows;
        let stats = drive_gets(
            clients.clone(),
            c,
            warmup,
            duration,
            move |worker, sequence| {
                let i = seed::mix(worker as u64 * 1_000_003 + sequence + 7) % seeded;
                seed::seeded(i, base_ms).id
            },
        )
        .await;
        rows.push(against(
            row("get_every_row", c, stats),
            health.as_ref(),
            "(reads mostly miss the cache)",
        ));
    }

    if cli.runs(Scenario::List) {
        // Three filters over the seeded table: selective on an indexed column (requester), on
        // the resources table (resource id), and broad (environment: a third of a project,
        // beyond the exact total_size limit).
        for (name, filter) in [
            ("list_by_requester", 0u8),
            ("list_by_resource", 1),
            ("list_by_environment", 2),
        ] {
            eprintln!("{name}...");
            let clients = clients.clone();
            let c = cli.list_concurrency;
            let stats = drive(c, warmup, duration, move |worker, sequence| {
                let mut client = clients.api(worker);
                let h = seed::mix(worker as u64 * 7_777_777 + sequence);
                let mut request = pb::ListChangeRequestsRequest {
                    project: format!("seed-{}", h % seed::SEED_PROJECTS),
                    page_size: 20,
                    ..Default::default()
                };
                match filter {
                    0 => request.requester = format!("user:u{}", (h >> 16) % seed::SEED_REQUESTERS),
                    1 => {
                        request.resource_type = "feature_flag".into();
                        request.resource_id = format!("flag-{}", (h >> 16) % seed::SEED_RESOURCES);
                    }
                    _ => request.environment = seed::ENVIRONMENTS[((h >> 16) % 3) as usize].into(),
                }
                async move {
                    client
                        .list_change_requests(with_actor(request, "user:reader"))
                        .await
                        .map(|_| ())
                        .map_err(|s| s.to_string())
                }
            })
            .await;
            // No ratio: the target is a latency, at another concurrency than the ceiling's.
            rows.push(against(
                row(name, c, stats),
                None,
                "p99 < 5 ms over 1,000,000 requests",
            ));
        }
    }

    if cli.runs(Scenario::Lifecycle) {
        // The short lifecycle: a create and one approval (a project without a policy, so the
        // server's default quorum decides whether it is approved yet), two calls, two events.
        eprintln!("create_approve (create -> 1 approval)...");
        let approving = clients.clone();
        let stats = drive(c, warmup, duration, move |worker, sequence| {
            let mut client = approving.api(worker);
            async move {
                let created =
                    create_as_worker(&mut client, "bench-approve", worker, sequence).await?;
                let approved = approve_as(&mut client, &created.id, "user:reviewer-a").await?;
                if approved.approval_count != 1 {
                    return Err(format!("{} approvals counted", approved.approval_count));
                }
                Ok(())
            }
        })
        .await;
        rows.push(against_raw(
            against(
                row("create_approve", c, stats),
                direct.as_ref(),
                "2 events per call pair: created, reviewed",
            ),
            raw.as_ref(),
        ));

        eprintln!("lifecycle (create -> 2 approvals -> APPLIED)...");
        let endpoint = applier::start().await?;
        applier::auto_policy(clients.channels[0].clone(), "bench-lifecycle", &endpoint).await?;
        let clients = clients.clone();
        let stats = drive(c, warmup, duration, move |worker, sequence| {
            let mut client = clients.api(worker);
            async move {
                let mut last =
                    create_as_worker(&mut client, "bench-lifecycle", worker, sequence).await?;
                for reviewer in ["user:reviewer-a", "user:reviewer-b"] {
                    last = approve_as(&mut client, &last.id, reviewer).await?;
                }
                finish_lifecycle(&mut client, &last).await
            }
        })
        .await;
        rows.push(against_raw(
            against(
                row("lifecycle", c, stats),
                direct.as_ref(),
                "5 events per lifecycle: created, 2 reviews, apply started, applied",
            ),
            raw.as_ref(),
        ));
    }

    // --latency-sweep: the database's bare commit first, then create, at each level.
    let mut latency_sweep = Vec::new();
    if cli.latency_sweep {
        match (database_url, &template) {
            (Some(url), Some(template)) => {
                eprintln!("latency sweep: raw_pair at {SWEEP_LEVELS:?} in flight...");
                latency_sweep =
                    raw_pair_rows(url, template, &SWEEP_LEVELS, warmup, duration).await?;
            }
            _ => eprintln!("latency sweep: no database URL, so no raw_pair"),
        }
        for level in SWEEP_LEVELS {
            eprintln!("latency sweep: create at {level} in flight...");
            // A project per level: each point creates requests of its own.
            let project = format!("bench-sweep-{level}");
            let stats = drive_creates(clients.clone(), &project, level, warmup, duration).await;
            latency_sweep.push(row("create", level, stats));
        }
    }

    let mut watch = Vec::new();
    if cli.runs(Scenario::Watch) {
        for &watchers in &cli.watchers {
            eprintln!("watch fan-out with {watchers} watchers...");
            let result = watch::fan_out(
                addr,
                server_pid,
                &WatchOptions {
                    watchers,
                    per_connection: cli.watchers_per_connection,
                    writes: cli.watch_writes,
                    interval: cli.watch_interval,
                    decode: cli.watch_decode,
                    project: format!("bench-watch-{watchers}"),
                },
            )
            .await?;
            watch.push(result);
        }
    }
    Ok(Outcome {
        rows,
        latency_sweep,
        watch,
        seed_seconds,
    })
}

fn print_report(report: &Report) {
    println!(
        "\napprovals-bench: {:?}, {} in flight over {} connections, {:.0}s windows, {} cores, load average {:.2} -> {:.2}",
        report.database,
        report.concurrency,
        report.connections,
        report.duration_seconds,
        report.cores,
        report.load_average_start.unwrap_or(f64::NAN),
        report.load_average_end.unwrap_or(f64::NAN),
    );
    // The scenario column as wide as its longest name, so every row's figures line up.
    let width = report
        .rows
        .iter()
        .map(|row| row.scenario.len())
        .max()
        .unwrap_or(0)
        .max(24);
    println!(
        "{:<width$} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}  {:<24} {:>6} {:>6}  target",
        "scenario",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "errors",
        "ceiling",
        "ratio",
        "vs raw"
    );
    for row in &report.rows {
        println!(
            "{:<width$} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}  {:<24} {:>6} {:>6}  {}",
            row.scenario,
            row.stats.per_second,
            row.stats.p50_ms,
            row.stats.p99_ms,
            row.stats.p999_ms,
            row.stats.max_ms,
            row.stats.errors,
            row.ceiling.as_deref().unwrap_or("-"),
            row.ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
            row.raw_ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
            row.target.as_deref().unwrap_or(""),
        );
        if let Some(err) = &row.stats.first_error {
            println!("    first error: {err}");
        }
    }
    if report.rows.iter().any(|row| row.raw_ratio.is_some()) {
        println!(
            "vs raw: ratio of throughputs to raw_pair (ceiling), the bare two-insert transaction"
        );
    }
    if !report.latency_sweep.is_empty() {
        println!(
            "\nlatency sweep\n{:<24} {:>9} {:>10} {:>8} {:>8} {:>7}",
            "scenario", "in flight", "ops/s", "p50 ms", "p99 ms", "errors"
        );
        for row in &report.latency_sweep {
            println!(
                "{:<24} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>7}",
                row.scenario,
                row.concurrency,
                row.stats.per_second,
                row.stats.p50_ms,
                row.stats.p99_ms,
                row.stats.errors,
            );
            if let Some(err) = &row.stats.first_error {
                println!("    first error: {err}");
            }
        }
    }
    if !report.watch.is_empty() {
        println!(
            "\n{:<10} {:>6} {:>8} {:>10} {:>8} {:>8} {:>8} {:>9}  {:>16}  CPU us/delivery: server client",
            "watchers",
            "conns",
            "open",
            "delivered",
            "missing",
            "p50 ms",
            "p99 ms",
            "max ms",
            "RSS/idle watcher"
        );
        for w in &report.watch {
            println!(
                "{:<10} {:>6} {:>8} {:>10} {:>8} {:>8.2} {:>8.2} {:>9.2}  {:>16}  {:>6} {:>6}",
                w.watchers,
                w.connections,
                w.established,
                w.deliveries,
                w.missing,
                w.p50_ms,
                w.p99_ms,
                w.max_ms,
                w.bytes_per_idle_watcher
                    .map_or("-".to_owned(), |b| format!("{:.2} KiB", b / 1024.0)),
                w.server_cpu_us_per_delivery
                    .map_or("-".to_owned(), |us| format!("{us:.2}")),
                w.client_cpu_us_per_delivery
                    .map_or("-".to_owned(), |us| format!("{us:.2}")),
            );
        }
        if let Some(w) = report.watch.first() {
            println!(
                "latency: from the write issued to each watcher holding the event; watchers decode {}",
                match w.decode {
                    WatchDecode::Revisions => "each event's revision (--watch-decode revisions)",
                    WatchDecode::Full => "whole messages (--watch-decode full)",
                }
            );
        }
        println!(
            "targets: 10,000 watchers p99 < 50 ms; 100,000 (--watchers 100000 --watch-writes 20 --watch-interval 250ms) p99 < 250 ms; <= 8 KiB per idle watcher"
        );
    }
    if let Some(seconds) = report.seed_seconds {
        println!("seeded {} requests in {seconds:.1}s", report.seed_rows);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("approvals-bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json.clone();
    match runtime.block_on(run(cli)) {
        Ok(report) => {
            print_report(&report);
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(err) = std::fs::write(&path, text) {
                    eprintln!("approvals-bench: {}: {err}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("approvals-bench: {err}");
            ExitCode::FAILURE
        }
    }
}
