//! The raw database ceiling (`raw_pair`): per operation, one transaction of two prepared
//! inserts into two bare tables, a request row and an event row, each with a body as large as
//! the service's own JSON body of a request. No codec, no secondary index, no resource row, no
//! gRPC: what the database itself commits per second for a create's two writes, to hold
//! `create` against beside the `direct_insert` ceiling (which writes the service's real rows).
//!
//! PostgreSQL: a sqlx pool as wide as the widest run, each worker on a connection of its own.
//! SQLite: one connection to a file of its own (WAL, synchronous FULL, as the service opens its
//! database), the transactions one after the other behind a mutex, since SQLite has one writer:
//! at many in flight the latency is mostly the queue.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sea_orm::sqlx::{
    self, ConnectOptions as _, Connection as _, SqlSafeStr as _, SqlStr,
    postgres::{PgPool, PgPoolOptions, Postgres},
    sqlite::{
        Sqlite, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous,
    },
};
use tokio::sync::Mutex;

use crate::load::{Stats, drive};

const DROP_TABLES: [&str; 2] = [
    "DROP TABLE IF EXISTS bench_raw_requests",
    "DROP TABLE IF EXISTS bench_raw_events",
];
const CREATE_REQUESTS: &str = "CREATE TABLE bench_raw_requests (id text PRIMARY KEY, body text)";
/// The event table's revision as each database's service table has it: a sequence on
/// PostgreSQL, AUTOINCREMENT (never reused) on SQLite.
const CREATE_EVENTS_POSTGRES: &str = "CREATE TABLE bench_raw_events \
     (revision bigserial PRIMARY KEY, request_id text, body text)";
const CREATE_EVENTS_SQLITE: &str = "CREATE TABLE bench_raw_events \
     (revision INTEGER PRIMARY KEY AUTOINCREMENT, request_id text, body text)";
const INSERT_REQUEST: &str = "INSERT INTO bench_raw_requests (id, body) VALUES ($1, $2)";
const INSERT_EVENT: &str = "INSERT INTO bench_raw_events (request_id, body) VALUES ($1, $2)";

/// The two bare tables on one database, from their creation to [`RawPair::close`].
pub enum RawPair {
    Postgres {
        pool: PgPool,
    },
    Sqlite {
        connection: Arc<Mutex<SqliteConnection>>,
        path: PathBuf,
    },
}

impl RawPair {
    /// Creates the two tables (dropping any left from an earlier run) on the database of `url`:
    /// on PostgreSQL in that database, through a pool of up to `connections`; on SQLite in a
    /// file of their own beside the database `url` names (or in the temporary directory).
    pub async fn open(url: &str, connections: usize) -> Result<Self, String> {
        if url.starts_with("postgres") {
            let pool = PgPoolOptions::new()
                .max_connections(connections.max(1) as u32)
                .min_connections(0)
                .acquire_timeout(Duration::from_secs(30))
                .test_before_acquire(false)
                .connect(url)
                .await
                .map_err(|e| format!("raw_pair: connect to PostgreSQL: {e}"))?;
            let created = async {
                for sql in DROP_TABLES
                    .into_iter()
                    .chain([CREATE_REQUESTS, CREATE_EVENTS_POSTGRES])
                {
                    sqlx::raw_sql(sql).execute(&pool).await?;
                }
                Ok::<_, sqlx::Error>(())
            }
            .await;
            if let Err(e) = created {
                pool.close().await;
                return Err(format!("raw_pair: create the tables: {e}"));
            }
            Ok(Self::Postgres { pool })
        } else {
            let path = sqlite_path(url);
            let mut connection = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(30))
                .connect()
                .await
                .map_err(|e| format!("raw_pair: open {}: {e}", path.display()))?;
            for sql in DROP_TABLES
                .into_iter()
                .chain([CREATE_REQUESTS, CREATE_EVENTS_SQLITE])
            {
                if let Err(e) = sqlx::raw_sql(sql).execute(&mut connection).await {
                    let _ = connection.close().await;
                    remove_sqlite(&path);
                    return Err(format!("raw_pair: create the tables: {e}"));
                }
            }
            Ok(Self::Sqlite {
                connection: Arc::new(Mutex::new(connection)),
                path,
            })
        }
    }

    /// `concurrency` workers, each running one transaction of the two inserts after another,
    /// with `body` in both rows. On PostgreSQL each worker holds its own connection for the
    /// whole run; on SQLite they queue for the one connection.
    pub async fn drive(
        &self,
        concurrency: usize,
        warmup: Duration,
        duration: Duration,
        body: Arc<str>,
    ) -> Result<Stats, String> {
        match self {
            Self::Postgres { pool } => {
                let mut connections = Vec::with_capacity(concurrency);
                for _ in 0..concurrency {
                    let connection = pool
                        .acquire()
                        .await
                        .map_err(|e| format!("raw_pair: a connection for each worker: {e}"))?;
                    connections.push(Mutex::new(connection));
                }
                let connections = Arc::new(connections);
                Ok(drive(concurrency, warmup, duration, move |worker, _| {
                    let (connections, body) = (connections.clone(), body.clone());
                    async move {
                        // The worker's own connection: never contended.
                        let mut connection = connections[worker].lock().await;
                        insert_pair::<Postgres>(&mut connection, "BEGIN".into_sql_str(), &body)
                            .await
                            .map_err(|e| e.to_string())
                    }
                })
                .await)
            }
            Self::Sqlite { connection, .. } => {
                let connection = connection.clone();
                Ok(drive(concurrency, warmup, duration, move |_, _| {
                    let (connection, body) = (connection.clone(), body.clone());
                    async move {
                        // The one writer: tokio's mutex queues the workers first come, first
                        // served.
                        let mut connection = connection.lock().await;
                        // Immediate, as the service's writer begins.
                        insert_pair::<Sqlite>(
                            &mut connection,
                            "BEGIN IMMEDIATE".into_sql_str(),
                            &body,
                        )
                        .await
                        .map_err(|e| e.to_string())
                    }
                })
                .await)
            }
        }
    }

    /// Drops the two tables and closes the pool (on SQLite, removes the file).
    pub async fn close(self) {
        match self {
            Self::Postgres { pool } => {
                for sql in DROP_TABLES {
                    if let Err(e) = sqlx::raw_sql(sql).execute(&pool).await {
                        eprintln!("raw_pair: {sql}: {e}");
                    }
                }
                pool.close().await;
            }
            Self::Sqlite { connection, path } => {
                let mut guard = connection.lock().await;
                for sql in DROP_TABLES {
                    if let Err(e) = sqlx::raw_sql(sql).execute(&mut *guard).await {
                        eprintln!("raw_pair: {sql}: {e}");
                    }
                }
                drop(guard);
                // The runs are over, so this is the connection's last handle: close it (the
                // WAL checkpointed) before the files go.
                if let Ok(connection) = Arc::try_unwrap(connection) {
                    let _ = connection.into_inner().close().await;
                }
                remove_sqlite(&path);
            }
        }
    }
}

/// One transaction (begun with `begin`), two prepared inserts (sqlx prepares each statement
/// once per connection), commit.
async fn insert_pair<DB>(
    connection: &mut DB::Connection,
    begin: SqlStr,
    body: &str,
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'b> &'b str: sqlx::Encode<'b, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    // The statements as `SqlStr`s, not `&'static str`s held across an await: a `&str` there
    // makes the future's `Send` a higher-ranked bound that `&'static str: SqlSafeStr` misses.
    let id = uuid::Uuid::now_v7().to_string();
    let mut txn = connection.begin_with(begin).await?;
    sqlx::query::<DB>(INSERT_REQUEST)
        .bind(id.as_str())
        .bind(body)
        .execute(&mut *txn)
        .await?;
    sqlx::query::<DB>(INSERT_EVENT)
        .bind(id.as_str())
        .bind(body)
        .execute(&mut *txn)
        .await?;
    txn.commit().await
}

/// `bench-raw-<pid>.db` in the directory of the SQLite database `url` names (so on the same
/// disk), or in the temporary directory for an in-memory database.
fn sqlite_path(url: &str) -> PathBuf {
    let file = format!("bench-raw-{}.db", std::process::id());
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .filter(|path| !path.is_empty() && !path.contains(":memory:"));
    match path.and_then(|path| Path::new(path).parent()) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(file),
        _ => std::env::temp_dir().join(file),
    }
}

/// The file and its WAL and shared-memory files.
fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqlite_file_sits_beside_the_service_database() {
        let file = format!("bench-raw-{}.db", std::process::id());
        assert_eq!(
            sqlite_path("sqlite:///tmp/approvals-bench-x/approvals.db"),
            PathBuf::from("/tmp/approvals-bench-x").join(&file)
        );
        assert_eq!(
            sqlite_path("sqlite:/srv/data/approvals.db?mode=rwc"),
            PathBuf::from("/srv/data").join(&file)
        );
        assert_eq!(
            sqlite_path("sqlite::memory:"),
            std::env::temp_dir().join(&file)
        );
    }
}
