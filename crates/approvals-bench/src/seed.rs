//! Rows shaped exactly like the service's own, written through the store's own codec.
//!
//! The shape is not re-implemented here: the bench creates one request through the API, reads
//! it back through the store (the request and its CREATED event, as domain values), and writes
//! copies with `approvals_store::seed`, which encodes them as the store's create does (the same
//! columns, document and statements: the event first, its identity column giving the revision,
//! then the request's row, then its resource row). A copy differs only in what makes it
//! distinct (id, project, environment, requester, resource id, change id). Used twice: to seed
//! the list table in bulk (many rows per statement), and for the direct-insert ceiling (one
//! request per transaction, or per statement on PostgreSQL, as the service writes a create).

use std::time::Duration;

use approvals_domain::{ChangeRequest, EventDraft, Principal};
use approvals_store::{DatabaseSettings, Store, seed};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};

/// The request the service created, and its CREATED event, to copy.
#[derive(Clone)]
pub struct Template {
    request: ChangeRequest,
    event: EventDraft,
}

/// What differs between two seeded requests.
pub struct RowSpec {
    pub id: String,
    pub project: String,
    pub environment: String,
    pub created_by: String,
    pub resource_id: String,
}

impl Template {
    /// Reads request `id`, which the service has just created, through the store.
    pub async fn read(url: &str, id: &str) -> Result<Self, String> {
        let store = Store::connect(&DatabaseSettings {
            url: url.to_owned(),
            max_connections: 1,
            acquire_timeout: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(30),
        })
        .await
        .map_err(|e| format!("open the store: {e}"))?;
        let request = store
            .get(id)
            .await
            .map_err(|e| format!("read the template request: {e}"))?;
        let event = store
            .events(id, 0, 1, false)
            .await
            .map_err(|e| format!("read the template event: {e}"))?
            .into_iter()
            .next()
            .ok_or("template event not found")?;
        Ok(Self {
            request,
            event: EventDraft {
                kind: event.kind,
                actor: event.actor,
                acting_principal: event.acting_principal,
                auth_method: event.auth_method,
                from_state: event.from_state,
                to_state: event.to_state,
                time: event.time,
                detail: event.detail,
            },
        })
    }

    /// The request's JSON body, as the store writes it in the request's row (and, the same
    /// request without comments, as the CREATED event's snapshot): the size of the service's
    /// own rows, for the raw ceiling's bare rows.
    pub fn body(&self) -> Result<String, String> {
        serde_json::to_string(&self.request).map_err(|e| format!("the template's body: {e}"))
    }

    /// The request and event of `spec`: the template's, with `spec`'s values.
    fn created(&self, spec: &RowSpec) -> Result<(ChangeRequest, EventDraft), String> {
        let created_by = Principal::parse(&spec.created_by)?;
        let mut request = self.request.clone();
        request.id = spec.id.clone();
        request.project = spec.project.clone();
        request.environment = spec.environment.clone();
        request.created_by = created_by.clone();
        if let Some(change) = request.changes.first_mut() {
            change.resource_id = spec.resource_id.clone();
            change.created_by = created_by.clone();
            change.id = uuid::Uuid::now_v7().to_string();
        }
        let event = EventDraft {
            actor: created_by,
            ..self.event.clone()
        };
        Ok((request, event))
    }
}

/// Writes `specs` as created requests, with one multi-row statement per table.
pub async fn insert_rows<C: ConnectionTrait>(
    db: &C,
    template: &Template,
    specs: &[RowSpec],
) -> Result<(), String> {
    let mut created = specs
        .iter()
        .map(|spec| template.created(spec))
        .collect::<Result<Vec<_>, _>>()?;
    seed::insert_created(db, &mut created)
        .await
        .map_err(|e| e.to_string())
}

/// One request in one transaction (immediate on SQLite, as the service's writer is): three
/// inserts, commit. The SQLite service writes a create this way.
pub async fn insert_one(
    db: &DatabaseConnection,
    template: &Template,
    spec: &RowSpec,
) -> Result<(), String> {
    let txn = db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    insert_rows(&txn, template, std::slice::from_ref(spec)).await?;
    txn.commit().await.map_err(|e| e.to_string())
}

/// A cheap, well-mixed hash (splitmix64), so seeded columns are spread without an RNG.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

pub const SEED_PROJECTS: u64 = 10;
pub const SEED_REQUESTERS: u64 = 1000;
pub const SEED_RESOURCES: u64 = 20_000;
pub const ENVIRONMENTS: [&str; 3] = ["prod", "staging", "dev"];

/// The seeded request number `i` of `total`: ids are UUIDv7 one millisecond apart, all older
/// than anything the service creates during the run, so "newest first" keeps its meaning.
pub fn seeded(i: u64, base_ms: u64) -> RowSpec {
    let h = mix(i);
    let random = h.to_le_bytes();
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(&random);
    bytes[8..].copy_from_slice(&(i as u16).to_le_bytes());
    let id = uuid::Builder::from_unix_timestamp_millis(base_ms + i, &bytes).into_uuid();
    RowSpec {
        id: id.to_string(),
        project: format!("seed-{}", i % SEED_PROJECTS),
        environment: ENVIRONMENTS[(h % 3) as usize].to_owned(),
        created_by: format!("user:u{}", (h >> 8) % SEED_REQUESTERS),
        resource_id: format!("flag-{}", (h >> 24) % SEED_RESOURCES),
    }
}

/// PostgreSQL: one request in one statement (data-modifying CTEs, no transaction block), the
/// way the PostgreSQL service writes a create: the fastest direct form of the same rows.
pub async fn insert_one_statement(
    db: &DatabaseConnection,
    template: &Template,
    spec: &RowSpec,
) -> Result<(), String> {
    let (mut request, event) = template.created(spec)?;
    seed::insert_created_in_one_statement(db, &mut request, &event)
        .await
        .map_err(|e| e.to_string())
}
