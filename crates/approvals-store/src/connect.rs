//! Reaching the database: the pool and its settings, the backend, health and pool figures,
//! and migrations (serialised across replicas by an advisory lock).

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicI64},
    time::{Duration, Instant},
};

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
    sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous},
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, watch};

use crate::{error::StoreError, migration::Migrator, redact::redact_url};

/// Key of the PostgreSQL advisory lock that serialises migrations across replicas.
const MIGRATION_LOCK_KEY: i64 = 0x6170_7072_6f76_616c; // "approval"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` or `postgres://...`.
    pub url: String,
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before failing with UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// PostgreSQL `statement_timeout` for every statement.
    pub statement_timeout: Duration,
}

/// The store: one connection pool, and the use cases as transactions.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: DatabaseConnection,
    pub(crate) backend: Backend,
    /// SQLite takes one writer at a time; queueing writers here, in order, is fairer and cheaper
    /// than letting them spin on the busy timeout, and lets them share one commit (see
    /// [`Store::write`]). Unused on PostgreSQL.
    pub(crate) sqlite_writer: crate::write::SqliteWriter,
    /// Counts this process's commits, so the log reader wakes at once after a local write.
    pub(crate) commits: Arc<watch::Sender<u64>>,
    /// The highest revision this process has appended to the log (committed or not).
    pub(crate) written: Arc<AtomicI64>,
    /// Estimates of list totals beyond the exact limit, by statement, reused for a minute:
    /// PostgreSQL's planner estimate changes only with the table's statistics (ANALYZE); on
    /// SQLite it is a count, a minute old at most.
    pub(crate) estimates: Arc<std::sync::Mutex<HashMap<String, (Instant, i64)>>>,
    pub(crate) url: Arc<str>,
    /// Whether a create hashes its CREATED event (see [`Store::without_create_hashing`]).
    pub(crate) create_hashing: bool,
    /// PostgreSQL: the creates waiting for their shared statement (see
    /// [`crate::create_batch`]). `None` on SQLite, whose writers share a commit already.
    pub(crate) creates: Option<crate::create_batch::CreateQueue>,
    /// PostgreSQL: the transitions waiting for their shared statement (see
    /// [`crate::transitions`]). `None` on SQLite.
    pub(crate) transitions: Option<crate::transitions::TransitionQueue>,
}

impl Store {
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let backend = if settings.url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if settings.url.starts_with("postgres://")
            || settings.url.starts_with("postgresql://")
        {
            Backend::Postgres
        } else {
            return Err(StoreError::Unavailable(format!(
                "unsupported database url {:?}: expected sqlite://PATH or postgres://...",
                redact_url(&settings.url)
            )));
        };
        let mut options = ConnectOptions::new(settings.url.clone());
        options
            .max_connections(Ord::max(settings.max_connections, 1))
            .min_connections(0)
            .acquire_timeout(settings.acquire_timeout)
            .connect_timeout(settings.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            // Ping only connections idle for a while (those a restart, proxy or firewall may
            // have dropped), not every checkout: a ping per checkout is one more round trip on
            // every call (approvals-bench, PostgreSQL, 64 in flight: see the README figures).
            .test_before_acquire_if_idle_for(Duration::from_secs(1))
            .sqlx_logging(false);
        match backend {
            Backend::Sqlite => {
                options.map_sqlx_sqlite_opts(|o| {
                    o.create_if_missing(true)
                        .journal_mode(SqliteJournalMode::Wal)
                        // FULL: an acknowledged write survives a power cut, not only a crash.
                        .synchronous(SqliteSynchronous::Full)
                        .busy_timeout(Duration::from_secs(5))
                });
            }
            Backend::Postgres => {
                let timeout_ms = settings.statement_timeout.as_millis().to_string();
                options.map_sqlx_postgres_opts(move |o| {
                    o.options([("statement_timeout", timeout_ms.as_str())])
                        .application_name("approvals")
                });
            }
        }
        let db = Database::connect(options).await.map_err(|err| {
            StoreError::Unavailable(format!(
                "cannot connect to {}: {err}",
                redact_url(&settings.url)
            ))
        })?;
        let (creates, transitions) = if backend == Backend::Postgres {
            let pool = db.get_postgres_connection_pool();
            (
                Some(crate::create_batch::CreateQueue::start(pool.clone())),
                Some(crate::transitions::TransitionQueue::start(pool.clone())),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            db,
            creates,
            transitions,
            backend,
            sqlite_writer: Arc::new(Mutex::new(None)),
            commits: Arc::new(watch::channel(0).0),
            written: Arc::new(AtomicI64::new(0)),
            estimates: Arc::default(),
            url: settings.url.as_str().into(),
            create_hashing: true,
        })
    }

    /// For the benchmark's hashing comparison only (`audit.bench_create_hashing = false`):
    /// creates write their CREATED event without a hash, so the cost of hashing can be measured
    /// against the same server. Such requests' chains start at their second event, which
    /// `audit verify` accepts as it accepts events written before hashing existed.
    pub fn without_create_hashing(mut self) -> Self {
        self.create_hashing = false;
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    pub(crate) fn db_backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Applies pending migrations. On PostgreSQL under an advisory lock, so replicas starting
    /// together apply them once; on SQLite in one immediate (write-locked) transaction.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.write(async |w| {
            if w.backend() == Backend::Postgres {
                w.txn
                    .execute_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "SELECT pg_advisory_xact_lock($1)",
                        [MIGRATION_LOCK_KEY.into()],
                    ))
                    .await?;
            }
            Migrator::up(&w.txn, None).await?;
            Ok(())
        })
        .await
    }

    /// The pool's open connections and how many of them are idle, for metrics.
    pub fn pool_usage(&self) -> (u32, usize) {
        match self.backend {
            Backend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            Backend::Sqlite => {
                let pool = self.db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
        }
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .query_one_raw(Statement::from_string(self.db_backend(), "SELECT 1"))
            .await?;
        Ok(())
    }
}
