use approvals_domain::DomainError;
use sea_orm::{DbErr, RuntimeErr};

/// Why a store operation failed. Database details are logged, never returned to callers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("change request {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("request_id {request_id:?} was already used by this caller for a different request")]
    RequestIdReused {
        request_id: String,
        change_request_id: String,
    },
    #[error("calendar {0:?} not found")]
    CalendarNotFound(String),
    #[error("a calendar named {0:?} exists already")]
    CalendarNameTaken(String),
    #[error("policy {0:?} not found")]
    PolicyNotFound(String),
    #[error("a policy named {0:?} exists already")]
    PolicyNameTaken(String),
    #[error(
        "policy {existing:?} already governs project {project:?}, environment {environment:?}, action_key {action_key:?}"
    )]
    PolicyScopeTaken {
        existing: String,
        project: String,
        environment: String,
        action_key: String,
    },
    #[error(
        "sink {sink:?} is leased by {holder:?}; another holder may take it when the lease expires"
    )]
    SinkLeaseHeld {
        sink: String,
        holder: String,
        expire_time: i64,
    },
    #[error(
        "the lease on sink {0:?} is lost (expired and taken over, or released): stop serving it"
    )]
    SinkLeaseLost(String),
    #[error("sink {0:?} not found: no relay served it yet")]
    SinkNotFound(String),
    #[error("dead letter {0:?} not found")]
    DeadLetterNotFound(String),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("internal database error")]
    Internal(String),
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        match &err {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => Self::Unavailable(err.to_string()),
            DbErr::Exec(RuntimeErr::SqlxError(sqlx))
            | DbErr::Query(RuntimeErr::SqlxError(sqlx))
                if is_connection_error(sqlx) =>
            {
                Self::Unavailable(err.to_string())
            }
            _ => {
                tracing::error!(error = %err, "database error");
                Self::Internal(err.to_string())
            }
        }
    }
}

fn is_connection_error(err: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error;
    match err {
        Error::Io(_)
        | Error::PoolTimedOut
        | Error::PoolClosed
        | Error::WorkerCrashed
        | Error::Tls(_) => true,
        Error::Database(db) => {
            // PostgreSQL: admin shutdown, crash shutdown, cannot connect now, statement timeout.
            matches!(
                db.code().as_deref(),
                Some("57P01" | "57P02" | "57P03" | "57014")
            )
        }
        _ => false,
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(err: serde_json::Error) -> Self {
        tracing::error!(error = %err, "stored document does not decode");
        Self::Internal(format!("stored document does not decode: {err}"))
    }
}

/// Either a database error (kept whole, to tell unique violations apart) or a store error.
pub(crate) enum DbErrOr {
    Db(DbErr),
    Store(StoreError),
}

impl From<DbErr> for DbErrOr {
    fn from(err: DbErr) -> Self {
        Self::Db(err)
    }
}

impl From<StoreError> for DbErrOr {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

impl From<serde_json::Error> for DbErrOr {
    fn from(err: serde_json::Error) -> Self {
        Self::Store(err.into())
    }
}

impl From<DbErrOr> for StoreError {
    fn from(err: DbErrOr) -> Self {
        match err {
            DbErrOr::Db(db) => db.into(),
            DbErrOr::Store(store) => store,
        }
    }
}
