use sea_orm::{
    ConnectionTrait, DbBackend, Statement,
    sea_query::{ColumnDef, Index, Table},
};
use sea_orm_migration::{
    DbErr, MigrationName, MigrationTrait, MigratorTrait, SchemaManager, async_trait,
};

use crate::schema::{
    CALENDARS, CHANGE_REQUESTS, CHECKPOINTS, EVENTS, POLICIES, RELAY_DEAD_LETTERS, RELAY_SINKS,
    RESOURCE_VERSIONS, RESOURCES, cal, ckp, cr, dl, ev, pol, res, rs, rv,
};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(Initial),
            Box::new(Policies),
            Box::new(Applying),
            Box::new(EventCommentCounts),
            Box::new(AuditChain),
            Box::new(RelayState),
            Box::new(EventAuthMethod),
            Box::new(PolicyRules),
            Box::new(Calendars),
        ]
    }
}

/// Change requests, the resources their changes touch, and the event log.
struct Initial;

impl MigrationName for Initial {
    fn name(&self) -> &str {
        "m0001_initial"
    }
}

fn text(name: &'static str) -> ColumnDef {
    let mut col = ColumnDef::new(name);
    col.text().not_null();
    col
}

fn big(name: &'static str) -> ColumnDef {
    let mut col = ColumnDef::new(name);
    col.big_integer().not_null();
    col
}

#[async_trait::async_trait]
impl MigrationTrait for Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(CHANGE_REQUESTS)
                    .col(
                        ColumnDef::new(cr::ID)
                            .string_len(36)
                            .not_null()
                            .primary_key(),
                    )
                    .col(text(cr::PROJECT))
                    .col(text(cr::ENVIRONMENT))
                    .col(text(cr::ACTION_KEY))
                    .col(text(cr::STATE))
                    .col(text(cr::CREATED_BY))
                    .col(big(cr::CREATE_TIME))
                    .col(big(cr::UPDATE_TIME))
                    .col(ColumnDef::new(cr::EXPIRE_TIME).big_integer().null())
                    .col(big(cr::REVISION))
                    .col(ColumnDef::new(cr::REQUEST_ID).text().null())
                    .col(ColumnDef::new(cr::REQUEST_FINGERPRINT).text().null())
                    .col(text(cr::BODY))
                    .to_owned(),
            )
            .await?;
        // Lists are newest first (ids are UUIDv7) within a project, filtered by one column.
        for (name, column) in [
            ("cr_project_id", None),
            ("cr_project_state_id", Some(cr::STATE)),
            ("cr_project_created_by_id", Some(cr::CREATED_BY)),
            ("cr_project_action_key_id", Some(cr::ACTION_KEY)),
            ("cr_project_environment_id", Some(cr::ENVIRONMENT)),
        ] {
            let mut index = Index::create();
            index.name(name).table(CHANGE_REQUESTS).col(cr::PROJECT);
            if let Some(column) = column {
                index.col(column);
            }
            manager.create_index(index.col(cr::ID).to_owned()).await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("cr_request_id")
                    .table(CHANGE_REQUESTS)
                    .col(cr::CREATED_BY)
                    .col(cr::REQUEST_ID)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("cr_state_expire_time")
                    .table(CHANGE_REQUESTS)
                    .col(cr::STATE)
                    .col(cr::EXPIRE_TIME)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(RESOURCES)
                    .col(
                        ColumnDef::new(res::CHANGE_REQUEST_ID)
                            .string_len(36)
                            .not_null(),
                    )
                    .col(text(res::PROJECT))
                    .col(text(res::RESOURCE_TYPE))
                    .col(text(res::RESOURCE_ID))
                    .primary_key(
                        Index::create()
                            .col(res::CHANGE_REQUEST_ID)
                            .col(res::RESOURCE_TYPE)
                            .col(res::RESOURCE_ID),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("res_project_type_id")
                    .table(RESOURCES)
                    .col(res::PROJECT)
                    .col(res::RESOURCE_TYPE)
                    .col(res::RESOURCE_ID)
                    .col(res::CHANGE_REQUEST_ID)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("res_project_id")
                    .table(RESOURCES)
                    .col(res::PROJECT)
                    .col(res::RESOURCE_ID)
                    .col(res::CHANGE_REQUEST_ID)
                    .to_owned(),
            )
            .await?;

        // The revision is an identity column: concurrent writers never wait on a counter row.
        let revision = match manager.get_database_backend() {
            DbBackend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            _ => "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        };
        let sql = format!(
            "CREATE TABLE {EVENTS} (
                {rev} {revision},
                {cr_id} VARCHAR(36) NOT NULL,
                {project} TEXT NOT NULL,
                {environment} TEXT NOT NULL,
                {kind} TEXT NOT NULL,
                {actor} TEXT NOT NULL,
                {acting} TEXT NULL,
                {from} TEXT NOT NULL,
                {to} TEXT NOT NULL,
                {time} BIGINT NOT NULL,
                {detail} TEXT NOT NULL,
                {snapshot} TEXT NOT NULL
            )",
            rev = ev::REVISION,
            cr_id = ev::CHANGE_REQUEST_ID,
            project = ev::PROJECT,
            environment = ev::ENVIRONMENT,
            kind = ev::KIND,
            actor = ev::ACTOR,
            acting = ev::ACTING_PRINCIPAL,
            from = ev::FROM_STATE,
            to = ev::TO_STATE,
            time = ev::EVENT_TIME,
            detail = ev::DETAIL,
            snapshot = ev::SNAPSHOT,
        );
        let backend = manager.get_database_backend();
        manager
            .get_connection()
            .execute_raw(Statement::from_string(backend, sql))
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ev_change_request_revision")
                    .table(EVENTS)
                    .col(ev::CHANGE_REQUEST_ID)
                    .col(ev::REVISION)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Approval policies: a JSON document per policy beside the columns that select it. One policy
/// per (project, environment, action_key).
struct Policies;

impl MigrationName for Policies {
    fn name(&self) -> &str {
        "m0002_policies"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Policies {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(POLICIES)
                    .col(ColumnDef::new(pol::NAME).text().not_null().primary_key())
                    .col(text(pol::PROJECT))
                    .col(text(pol::ENVIRONMENT))
                    .col(text(pol::ACTION_KEY))
                    .col(big(pol::REVISION))
                    .col(big(pol::CREATE_TIME))
                    .col(big(pol::UPDATE_TIME))
                    .col(text(pol::BODY))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("pol_project_environment_action_key")
                    .table(POLICIES)
                    .col(pol::PROJECT)
                    .col(pol::ENVIRONMENT)
                    .col(pol::ACTION_KEY)
                    .unique()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Applying: when each request next needs the service (schedules, expiry, apply leases), and
/// the latest version of each resource an applier reported (for conflicts).
struct Applying;

impl MigrationName for Applying {
    fn name(&self) -> &str {
        "m0003_applying"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Applying {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(CHANGE_REQUESTS)
                    .add_column(ColumnDef::new(cr::DUE_TIME).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("cr_due_time")
                    .table(CHANGE_REQUESTS)
                    .col(cr::DUE_TIME)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RESOURCE_VERSIONS)
                    .col(text(rv::PROJECT))
                    .col(text(rv::ENVIRONMENT))
                    .col(text(rv::RESOURCE_TYPE))
                    .col(text(rv::RESOURCE_ID))
                    .col(text(rv::VERSION))
                    .col(
                        ColumnDef::new(rv::CHANGE_REQUEST_ID)
                            .string_len(36)
                            .not_null(),
                    )
                    .col(big(rv::UPDATE_TIME))
                    .primary_key(
                        Index::create()
                            .col(rv::PROJECT)
                            .col(rv::ENVIRONMENT)
                            .col(rv::RESOURCE_TYPE)
                            .col(rv::RESOURCE_ID),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Comments kept once, in the request row, instead of in every event's snapshot: a request's
/// snapshots grew with the square of its comments. Additive: existing rows keep their
/// snapshots whole (NULL count).
struct EventCommentCounts;

impl MigrationName for EventCommentCounts {
    fn name(&self) -> &str {
        "m0004_event_comment_counts"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for EventCommentCounts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(EVENTS)
                    .add_column(ColumnDef::new(ev::COMMENT_COUNT).big_integer().null())
                    .to_owned(),
            )
            .await
    }
}

/// The audit chain: each event's hash and its predecessor's, the chain head on the request row,
/// and the signed checkpoints. Additive: events written before keep NULL hashes (legacy events,
/// which `audit verify` counts apart); a request's chain starts at its first hashed event.
struct AuditChain;

impl MigrationName for AuditChain {
    fn name(&self) -> &str {
        "m0005_audit_chain"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AuditChain {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [ev::PREV_HASH, ev::HASH] {
            manager
                .alter_table(
                    Table::alter()
                        .table(EVENTS)
                        .add_column(ColumnDef::new(column).binary().null())
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(CHANGE_REQUESTS)
                    .add_column(ColumnDef::new(cr::AUDIT_HEAD).binary().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(CHECKPOINTS)
                    .col(
                        ColumnDef::new(ckp::REVISION)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(big(ckp::TREE_SIZE))
                    .col(ColumnDef::new(ckp::ROOT).binary().not_null())
                    .col(big(ckp::CHECKPOINT_TIME))
                    .col(ColumnDef::new(ckp::SIGNATURE).binary().not_null())
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Relays' state, kept by the server so relays keep nothing on disk: a cursor and a lease per
/// sink, and the sinks' dead letters.
struct RelayState;

impl MigrationName for RelayState {
    fn name(&self) -> &str {
        "m0006_relay_state"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for RelayState {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RELAY_SINKS)
                    .col(ColumnDef::new(rs::SINK).text().not_null().primary_key())
                    .col(big(rs::CURSOR))
                    .col(ColumnDef::new(rs::HOLDER).text().null())
                    .col(ColumnDef::new(rs::LEASE_TOKEN).text().null())
                    .col(ColumnDef::new(rs::LEASE_EXPIRE_TIME).big_integer().null())
                    .col(big(rs::UPDATE_TIME))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RELAY_DEAD_LETTERS)
                    .col(
                        ColumnDef::new(dl::ID)
                            .string_len(36)
                            .not_null()
                            .primary_key(),
                    )
                    .col(text(dl::SINK))
                    .col(big(dl::REVISION))
                    .col(big(dl::LAST_REVISION))
                    .col(big(dl::GAP))
                    .col(text(dl::CHANGE_REQUEST_ID))
                    .col(text(dl::WEBHOOK_ID))
                    .col(text(dl::REASON))
                    .col(big(dl::ATTEMPTS))
                    .col(text(dl::PAYLOAD))
                    .col(text(dl::CONTENT_TYPE))
                    .col(big(dl::CREATE_TIME))
                    .col(big(dl::UPDATE_TIME))
                    .col(big(dl::RETRY_REQUESTED))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("dl_sink_id")
                    .table(RELAY_DEAD_LETTERS)
                    .col(dl::SINK)
                    .col(dl::ID)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// How the credential that made each event was presented (`API_KEY`, `JWT`,
/// `CLIENT_CERTIFICATE`, `DEVELOPMENT`). Additive: NULL in events written before and in the
/// service's own events. (Reviews keep theirs in the request's stored body.)
struct EventAuthMethod;

impl MigrationName for EventAuthMethod {
    fn name(&self) -> &str {
        "m0007_auth_method"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for EventAuthMethod {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(EVENTS)
                    .add_column(ColumnDef::new(ev::AUTH_METHOD).text().null())
                    .to_owned(),
            )
            .await
    }
}

/// Risk labels (issue 25): a column so that lists filter by risk in SQL. Additive: NULL (no
/// label) in requests written before.
struct PolicyRules;

impl MigrationName for PolicyRules {
    fn name(&self) -> &str {
        "m0008_policy_rules"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for PolicyRules {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(CHANGE_REQUESTS)
                    .add_column(ColumnDef::new(cr::RISK).text().null())
                    .to_owned(),
            )
            .await
    }
}

/// Change calendars (issue 26): one row per calendar, its JSON document beside its name.
struct Calendars;

impl MigrationName for Calendars {
    fn name(&self) -> &str {
        "m0010_calendars"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Calendars {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(CALENDARS)
                    .col(ColumnDef::new(cal::NAME).text().not_null().primary_key())
                    .col(big(cal::REVISION))
                    .col(big(cal::CREATE_TIME))
                    .col(big(cal::UPDATE_TIME))
                    .col(text(cal::BODY))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
