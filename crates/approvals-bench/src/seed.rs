//! Rows shaped exactly like the service's own, written with plain SQL.
//!
//! The shape is not re-implemented here: the bench creates one request through the API and
//! copies the three rows the service wrote for it (`change_requests`, its CREATED event in
//! `change_request_events`, its `change_request_resources` row), changing only the columns and
//! JSON fields that make a row distinct (id, project, environment, requester, resource id, change
//! id, revision). The writes follow the service's create transaction: the event first (its
//! identity column gives the revision), then the request whose body carries that revision, then
//! the resource row. Used twice: to seed the list table in bulk (many rows per statement), and for
//! the direct-insert ceiling (one request per transaction, as the service does).

use std::collections::HashMap;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, QueryResult, SqliteTransactionMode,
    TransactionOptions, TransactionTrait,
    sea_query::{Expr, ExprTrait, Query},
};
use serde_json::Value;

const CHANGE_REQUESTS: &str = "change_requests";
const RESOURCES: &str = "change_request_resources";
const EVENTS: &str = "change_request_events";

/// The rows the service wrote for one created request, to copy.
#[derive(Clone)]
pub struct Template {
    body: Value,
    snapshot: Value,
    action_key: String,
    state: String,
    create_time: i64,
    update_time: i64,
    expire_time: Option<i64>,
    kind: String,
    from_state: String,
    to_state: String,
    event_time: i64,
    detail: String,
    resource_type: String,
}

/// What differs between two seeded requests.
pub struct RowSpec {
    pub id: String,
    pub project: String,
    pub environment: String,
    pub created_by: String,
    pub resource_id: String,
}

fn get<T: sea_orm::TryGetable>(row: &QueryResult, column: &str) -> Result<T, String> {
    row.try_get("", column)
        .map_err(|e| format!("template column {column}: {e}"))
}

impl Template {
    /// Reads the rows of request `id`, which the service has just created.
    pub async fn read(db: &DatabaseConnection, id: &str) -> Result<Self, String> {
        let request = Query::select()
            .columns([
                "body",
                "action_key",
                "state",
                "create_time",
                "update_time",
                "expire_time",
            ])
            .from(CHANGE_REQUESTS)
            .and_where(Expr::col("id").eq(id))
            .to_owned();
        let request = db
            .query_one(&request)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("template request not found")?;
        let event = Query::select()
            .columns([
                "kind",
                "actor",
                "from_state",
                "to_state",
                "event_time",
                "detail",
                "snapshot",
            ])
            .from(EVENTS)
            .and_where(Expr::col("change_request_id").eq(id))
            .to_owned();
        let event = db
            .query_one(&event)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("template event not found")?;
        let resource = Query::select()
            .columns(["resource_type"])
            .from(RESOURCES)
            .and_where(Expr::col("change_request_id").eq(id))
            .to_owned();
        let resource = db
            .query_one(&resource)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("template resource not found")?;
        let body: String = get(&request, "body")?;
        let snapshot: String = get(&event, "snapshot")?;
        Ok(Self {
            body: serde_json::from_str(&body).map_err(|e| e.to_string())?,
            snapshot: serde_json::from_str(&snapshot).map_err(|e| e.to_string())?,
            action_key: get(&request, "action_key")?,
            state: get(&request, "state")?,
            create_time: get(&request, "create_time")?,
            update_time: get(&request, "update_time")?,
            expire_time: get(&request, "expire_time")?,
            kind: get(&event, "kind")?,
            from_state: get(&event, "from_state")?,
            to_state: get(&event, "to_state")?,
            event_time: get(&event, "event_time")?,
            detail: get(&event, "detail")?,
            resource_type: get(&resource, "resource_type")?,
        })
    }

    /// The request document for `spec`, as the service would store it at `revision`.
    fn document(&self, base: &Value, spec: &RowSpec, revision: i64) -> Value {
        let mut doc = base.clone();
        doc["id"] = spec.id.clone().into();
        doc["project"] = spec.project.clone().into();
        doc["environment"] = spec.environment.clone().into();
        doc["created_by"] = spec.created_by.clone().into();
        doc["revision"] = revision.into();
        if let Some(change) = doc["changes"].get_mut(0) {
            change["resource_id"] = spec.resource_id.clone().into();
            change["created_by"] = spec.created_by.clone().into();
            change["id"] = uuid::Uuid::now_v7().to_string().into();
        }
        doc
    }
}

/// Writes `specs` as created requests, in the service's order (events, requests, resources),
/// with one multi-row statement per table.
pub async fn insert_rows<C: ConnectionTrait>(
    db: &C,
    template: &Template,
    specs: &[RowSpec],
) -> Result<(), DbErr> {
    if specs.is_empty() {
        return Ok(());
    }
    let mut events = Query::insert();
    events.into_table(EVENTS).columns([
        "change_request_id",
        "project",
        "environment",
        "kind",
        "actor",
        "acting_principal",
        "from_state",
        "to_state",
        "event_time",
        "detail",
        "snapshot",
    ]);
    for spec in specs {
        events.values_panic(event_values(template, spec).into_iter().map(Expr::val));
    }
    events.returning(Query::returning().columns(["revision", "change_request_id"]));
    let mut revisions = HashMap::with_capacity(specs.len());
    for row in db.query_all(&events).await? {
        let revision: i64 = row.try_get("", "revision")?;
        let id: String = row.try_get("", "change_request_id")?;
        revisions.insert(id, revision);
    }

    let mut requests = Query::insert();
    requests.into_table(CHANGE_REQUESTS).columns([
        "id",
        "project",
        "environment",
        "action_key",
        "state",
        "created_by",
        "create_time",
        "update_time",
        "expire_time",
        "revision",
        "request_id",
        "request_fingerprint",
        "body",
    ]);
    let mut resources = Query::insert();
    resources.into_table(RESOURCES).columns([
        "change_request_id",
        "project",
        "resource_type",
        "resource_id",
    ]);
    for spec in specs {
        let revision = revisions.get(&spec.id).copied().unwrap_or_default();
        let body = template.document(&template.body, spec, revision);
        requests.values_panic([
            spec.id.clone().into(),
            spec.project.clone().into(),
            spec.environment.clone().into(),
            template.action_key.clone().into(),
            template.state.clone().into(),
            spec.created_by.clone().into(),
            template.create_time.into(),
            template.update_time.into(),
            template.expire_time.into(),
            revision.into(),
            Option::<String>::None.into(),
            Option::<String>::None.into(),
            body.to_string().into(),
        ]);
        resources.values_panic([
            spec.id.clone().into(),
            spec.project.clone().into(),
            template.resource_type.clone().into(),
            spec.resource_id.clone().into(),
        ]);
    }
    db.execute(&requests).await?;
    db.execute(&resources).await?;
    Ok(())
}

/// The values of `spec`'s CREATED event row, in the column order of `insert_rows`.
fn event_values(template: &Template, spec: &RowSpec) -> Vec<sea_orm::Value> {
    // The snapshot is taken before the store sets the revision: keep the template's.
    let revision = template.snapshot["revision"].as_i64().unwrap_or_default();
    let snapshot = template.document(&template.snapshot, spec, revision);
    vec![
        spec.id.clone().into(),
        spec.project.clone().into(),
        spec.environment.clone().into(),
        template.kind.clone().into(),
        spec.created_by.clone().into(),
        Option::<String>::None.into(),
        template.from_state.clone().into(),
        template.to_state.clone().into(),
        template.event_time.into(),
        template.detail.clone().into(),
        snapshot.to_string().into(),
    ]
}

/// One request in one transaction (immediate on SQLite, as the service's writer is): three
/// inserts, commit. The SQLite service writes a create this way.
pub async fn insert_one(
    db: &DatabaseConnection,
    template: &Template,
    spec: &RowSpec,
) -> Result<(), DbErr> {
    let txn = db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await?;
    insert_rows(&txn, template, std::slice::from_ref(spec)).await?;
    txn.commit().await
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
) -> Result<(), DbErr> {
    // The stored body's revision is never read (the column's is).
    let body = template.document(&template.body, spec, 0);
    // $1..$11: the event
    let mut values = event_values(template, spec);
    values.extend::<[sea_orm::Value; 10]>([
        // $12..$19: the request
        template.action_key.clone().into(),
        template.state.clone().into(),
        template.create_time.into(),
        template.update_time.into(),
        template.expire_time.into(),
        Option::<String>::None.into(),
        Option::<String>::None.into(),
        body.to_string().into(),
        // $20, $21: the resource
        template.resource_type.clone().into(),
        spec.resource_id.clone().into(),
    ]);
    let sql = format!(
        "WITH event AS (INSERT INTO {EVENTS} (change_request_id, project, environment, kind, \
         actor, acting_principal, from_state, to_state, event_time, detail, snapshot) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING revision), \
         request AS (INSERT INTO {CHANGE_REQUESTS} (id, project, environment, action_key, state, \
         created_by, create_time, update_time, expire_time, revision, request_id, \
         request_fingerprint, body) SELECT $1, $2, $3, $12, $13, $5, $14, $15, $16, \
         event.revision, $17, $18, $19 FROM event), \
         resource AS (INSERT INTO {RESOURCES} (change_request_id, project, resource_type, \
         resource_id) VALUES ($1, $2, $20, $21)) \
         SELECT revision FROM event"
    );
    db.query_one_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        sql,
        values,
    ))
    .await?;
    Ok(())
}
