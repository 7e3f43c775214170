//! The audit log's reads and the checkpoints: the stored events as the verifier needs them,
//! every request's chain head at a revision, and the signed checkpoints (written by one
//! replica at a time, under an advisory lock on PostgreSQL).

use approvals_domain::audit::{ChainHead, Hash, StoredEvent, hash_from_slice};
use sea_orm::{
    ConnectionTrait, DbBackend, QueryResult, Statement,
    sea_query::{Expr, ExprTrait, OnConflict, Order, Query},
};

use crate::{
    codec::{EVENT_COLUMNS, decode_stored_event},
    connect::{Backend, Store},
    error::StoreError,
    schema::{CHECKPOINTS, EVENTS, ckp, ev},
};

/// Key of the PostgreSQL advisory lock held by the replica writing a checkpoint.
const CHECKPOINT_LOCK_KEY: i64 = 0x6175_6469_745f_636b; // "audit_ck"

/// A signed checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log up to this revision (inclusive) is covered.
    pub revision: i64,
    pub tree_size: u64,
    pub root: Hash,
    pub time_micros: i64,
    /// Ed25519 over `approvals_domain::audit::checkpoint_message` (64 bytes when well formed).
    pub signature: Vec<u8>,
}

fn decode_checkpoint(row: &QueryResult) -> Result<Checkpoint, StoreError> {
    let root: Vec<u8> = row.try_get("", ckp::ROOT)?;
    let size: i64 = row.try_get("", ckp::TREE_SIZE)?;
    Ok(Checkpoint {
        revision: row.try_get("", ckp::REVISION)?,
        tree_size: u64::try_from(size)
            .map_err(|_| StoreError::Internal("a checkpoint's tree size is negative".into()))?,
        // A stored root of the wrong length can match no tree: verification reports it.
        root: hash_from_slice(&root).unwrap_or([0xff; 32]),
        time_micros: row.try_get("", ckp::CHECKPOINT_TIME)?,
        signature: row.try_get("", ckp::SIGNATURE)?,
    })
}

const CHECKPOINT_COLUMNS: [&str; 5] = [
    ckp::REVISION,
    ckp::TREE_SIZE,
    ckp::ROOT,
    ckp::CHECKPOINT_TIME,
    ckp::SIGNATURE,
];

impl Store {
    /// Stored events after `after` (exclusive), oldest first, at most `limit`, optionally of
    /// one project, as the verifier reads them (columns unparsed).
    pub async fn stored_events(
        &self,
        after: i64,
        project: Option<&str>,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut query = Query::select();
        query
            .columns(EVENT_COLUMNS)
            .columns([ev::PREV_HASH, ev::HASH])
            .from(EVENTS)
            .and_where(Expr::col(ev::REVISION).gt(after))
            .order_by(ev::REVISION, Order::Asc)
            .limit(limit);
        if let Some(project) = project {
            query.and_where(Expr::col(ev::PROJECT).eq(project));
        }
        let rows = self.db.query_all(&query).await?;
        rows.iter().map(decode_stored_event).collect()
    }

    /// One request's stored events up to `revision` (inclusive), oldest first.
    pub async fn stored_chain(
        &self,
        change_request_id: &str,
        revision: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let query = Query::select()
            .columns(EVENT_COLUMNS)
            .columns([ev::PREV_HASH, ev::HASH])
            .from(EVENTS)
            .and_where(Expr::col(ev::CHANGE_REQUEST_ID).eq(change_request_id))
            .and_where(Expr::col(ev::REVISION).lte(revision))
            .order_by(ev::REVISION, Order::Asc)
            .to_owned();
        let rows = self.db.query_all(&query).await?;
        rows.iter().map(decode_stored_event).collect()
    }

    /// Every request's chain head at `revision`: its latest hashed event at or below it, in
    /// leaf order (change request id).
    pub async fn chain_heads_at(&self, revision: i64) -> Result<Vec<ChainHead>, StoreError> {
        chain_heads_at(&self.db, revision).await
    }

    /// The latest checkpoint, if any.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let query = Query::select()
            .columns(CHECKPOINT_COLUMNS)
            .from(CHECKPOINTS)
            .order_by(ckp::REVISION, Order::Desc)
            .limit(1)
            .to_owned();
        self.db
            .query_one(&query)
            .await?
            .as_ref()
            .map(decode_checkpoint)
            .transpose()
    }

    /// The checkpoint at exactly `revision`, if any.
    pub async fn checkpoint_at(&self, revision: i64) -> Result<Option<Checkpoint>, StoreError> {
        let query = Query::select()
            .columns(CHECKPOINT_COLUMNS)
            .from(CHECKPOINTS)
            .and_where(Expr::col(ckp::REVISION).eq(revision))
            .to_owned();
        self.db
            .query_one(&query)
            .await?
            .as_ref()
            .map(decode_checkpoint)
            .transpose()
    }

    /// Every checkpoint at or after `revision`, oldest first.
    pub async fn checkpoints_since(&self, revision: i64) -> Result<Vec<Checkpoint>, StoreError> {
        let query = Query::select()
            .columns(CHECKPOINT_COLUMNS)
            .from(CHECKPOINTS)
            .and_where(Expr::col(ckp::REVISION).gte(revision))
            .order_by(ckp::REVISION, Order::Asc)
            .to_owned();
        let rows = self.db.query_all(&query).await?;
        rows.iter().map(decode_checkpoint).collect()
    }

    /// Writes a checkpoint when the log has grown past the latest one: `make` gets the settled
    /// head `R` (no revision at or below it is still being written) and every request's chain
    /// head at `R`, and returns the signed checkpoint. One replica at a time (a PostgreSQL
    /// advisory lock held for the transaction; a replica that finds it taken does nothing).
    /// Returns the checkpoint written, if any.
    pub async fn write_checkpoint<F>(&self, make: F) -> Result<Option<Checkpoint>, StoreError>
    where
        F: FnOnce(i64, &[ChainHead]) -> Checkpoint + Send,
    {
        let head = self.settled_head().await?;
        if head == 0 {
            return Ok(None);
        }
        self.write(async |w| {
            if w.backend() == Backend::Postgres {
                let row = w
                    .txn
                    .query_one_raw(Statement::from_string(
                        DbBackend::Postgres,
                        format!("SELECT pg_try_advisory_xact_lock({CHECKPOINT_LOCK_KEY}) AS taken"),
                    ))
                    .await?
                    .ok_or_else(|| StoreError::Internal("no advisory lock row".into()))?;
                let taken: bool = row.try_get("", "taken")?;
                if !taken {
                    return Ok(None);
                }
            }
            let latest = Query::select()
                .expr_as(
                    Expr::cust(format!("COALESCE(MAX({}), 0)", ckp::REVISION)),
                    "latest",
                )
                .from(CHECKPOINTS)
                .to_owned();
            let latest: i64 = match w.txn.query_one(&latest).await? {
                Some(row) => row.try_get("", "latest")?,
                None => 0,
            };
            if latest >= head {
                return Ok(None);
            }
            let heads = chain_heads_at(&w.txn, head).await?;
            let checkpoint = make(head, &heads);
            let size = i64::try_from(checkpoint.tree_size)
                .map_err(|_| StoreError::Internal("tree size out of range".into()))?;
            let insert = Query::insert()
                .into_table(CHECKPOINTS)
                .columns(CHECKPOINT_COLUMNS)
                .values_panic([
                    checkpoint.revision.into(),
                    size.into(),
                    checkpoint.root.to_vec().into(),
                    checkpoint.time_micros.into(),
                    checkpoint.signature.clone().into(),
                ])
                .on_conflict(OnConflict::column(ckp::REVISION).do_nothing().to_owned())
                .to_owned();
            w.txn.execute(&insert).await?;
            Ok(Some(checkpoint))
        })
        .await
    }
}

/// Every request's chain head at `revision` (see [`Store::chain_heads_at`]), read through `db`
/// (the pool, or the checkpoint's own transaction).
async fn chain_heads_at(
    db: &impl ConnectionTrait,
    revision: i64,
) -> Result<Vec<ChainHead>, StoreError> {
    let sql = format!(
        "SELECT e.{id} AS id, e.{rev} AS rev, e.{hash} AS hash FROM {EVENTS} e \
             JOIN (SELECT {id}, MAX({rev}) AS head FROM {EVENTS} \
             WHERE {rev} <= {revision} AND {hash} IS NOT NULL GROUP BY {id}) h \
             ON e.{rev} = h.head",
        id = ev::CHANGE_REQUEST_ID,
        rev = ev::REVISION,
        hash = ev::HASH,
    );
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(backend, sql))
        .await?;
    let mut heads = rows
        .iter()
        .map(|row| {
            let bytes: Vec<u8> = row.try_get("", "hash")?;
            Ok(ChainHead {
                change_request_id: row.try_get("", "id")?,
                revision: row.try_get("", "rev")?,
                hash: hash_from_slice(&bytes).unwrap_or([0xff; 32]),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    // Byte order of the ids, whatever the database's collation.
    heads.sort_by(|a, b| a.change_request_id.cmp(&b.change_request_id));
    Ok(heads)
}
