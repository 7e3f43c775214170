//! Table and column names, shared by the migration and the queries.

pub const CHANGE_REQUESTS: &str = "change_requests";
pub const RESOURCES: &str = "change_request_resources";
pub const EVENTS: &str = "change_request_events";

pub mod cr {
    pub const ID: &str = "id";
    pub const PROJECT: &str = "project";
    pub const ENVIRONMENT: &str = "environment";
    pub const ACTION_KEY: &str = "action_key";
    pub const STATE: &str = "state";
    pub const CREATED_BY: &str = "created_by";
    pub const CREATE_TIME: &str = "create_time";
    pub const UPDATE_TIME: &str = "update_time";
    pub const EXPIRE_TIME: &str = "expire_time";
    pub const REVISION: &str = "revision";
    pub const REQUEST_ID: &str = "request_id";
    pub const REQUEST_FINGERPRINT: &str = "request_fingerprint";
    pub const BODY: &str = "body";
    /// When the service next has work on the request (schedule, expiry, apply lease).
    pub const DUE_TIME: &str = "due_time";
    /// The hash of the request's latest event (its chain head), so the next event needs no
    /// extra read; NULL before the request's first hashed event.
    pub const AUDIT_HEAD: &str = "audit_head";
    /// The request's risk label (`LOW`, `MEDIUM`, `HIGH`); NULL when it has none.
    pub const RISK: &str = "risk";
}

pub const RESOURCE_VERSIONS: &str = "resource_versions";

pub mod rv {
    pub const PROJECT: &str = "project";
    pub const ENVIRONMENT: &str = "environment";
    pub const RESOURCE_TYPE: &str = "resource_type";
    pub const RESOURCE_ID: &str = "resource_id";
    pub const VERSION: &str = "version";
    pub const CHANGE_REQUEST_ID: &str = "change_request_id";
    pub const UPDATE_TIME: &str = "update_time";
}

pub mod res {
    pub const CHANGE_REQUEST_ID: &str = "change_request_id";
    pub const PROJECT: &str = "project";
    pub const RESOURCE_TYPE: &str = "resource_type";
    pub const RESOURCE_ID: &str = "resource_id";
}

pub mod ev {
    pub const REVISION: &str = "revision";
    pub const CHANGE_REQUEST_ID: &str = "change_request_id";
    pub const PROJECT: &str = "project";
    pub const ENVIRONMENT: &str = "environment";
    pub const KIND: &str = "kind";
    pub const ACTOR: &str = "actor";
    pub const ACTING_PRINCIPAL: &str = "acting_principal";
    pub const FROM_STATE: &str = "from_state";
    pub const TO_STATE: &str = "to_state";
    pub const EVENT_TIME: &str = "event_time";
    pub const DETAIL: &str = "detail";
    pub const SNAPSHOT: &str = "snapshot";
    /// How many comments the request had right after the event. The snapshot leaves them out:
    /// comments are append-only and the request row holds them all, so the snapshot's are the
    /// first `comment_count` of those. NULL in rows written before: their snapshot has them.
    pub const COMMENT_COUNT: &str = "comment_count";
    /// How the credential that made the change was presented (`AuthMethod::stored`: `API_KEY`,
    /// ...). NULL when not recorded: rows written before, and the service's own events.
    pub const AUTH_METHOD: &str = "auth_method";
    /// The hash of the request's previous event (32 zero bytes for its first), and this
    /// event's hash (see `approvals_domain::audit`). NULL in events written before hashing.
    pub const PREV_HASH: &str = "prev_hash";
    pub const HASH: &str = "hash";
}

/// Signed checkpoints of the audit log (see `approvals_domain::audit`).
pub const CHECKPOINTS: &str = "audit_checkpoints";

pub mod ckp {
    /// The revision the checkpoint covers the log up to (inclusive); unique.
    pub const REVISION: &str = "revision";
    pub const TREE_SIZE: &str = "tree_size";
    pub const ROOT: &str = "root";
    pub const CHECKPOINT_TIME: &str = "checkpoint_time";
    pub const SIGNATURE: &str = "signature";
}

pub const POLICIES: &str = "policies";

pub mod pol {
    pub const NAME: &str = "name";
    pub const PROJECT: &str = "project";
    pub const ENVIRONMENT: &str = "environment";
    pub const ACTION_KEY: &str = "action_key";
    pub const REVISION: &str = "revision";
    pub const CREATE_TIME: &str = "create_time";
    pub const UPDATE_TIME: &str = "update_time";
    pub const BODY: &str = "body";
}

/// Relays' state per sink: cursor and lease.
pub const RELAY_SINKS: &str = "relay_sinks";

pub mod rs {
    pub const SINK: &str = "sink";
    pub const CURSOR: &str = "cursor";
    pub const HOLDER: &str = "holder";
    pub const LEASE_TOKEN: &str = "lease_token";
    /// Microseconds since the epoch, server clock; NULL when released.
    pub const LEASE_EXPIRE_TIME: &str = "lease_expire_time";
    pub const UPDATE_TIME: &str = "update_time";
}

/// Events (and gaps) a relay gave up delivering to a sink.
pub const RELAY_DEAD_LETTERS: &str = "relay_dead_letters";

pub mod dl {
    pub const ID: &str = "id";
    pub const SINK: &str = "sink";
    pub const REVISION: &str = "revision";
    pub const LAST_REVISION: &str = "last_revision";
    /// 1 for a gap of revisions lost from the watch history, else 0.
    pub const GAP: &str = "gap";
    pub const CHANGE_REQUEST_ID: &str = "change_request_id";
    pub const WEBHOOK_ID: &str = "webhook_id";
    pub const REASON: &str = "reason";
    pub const ATTEMPTS: &str = "attempts";
    pub const PAYLOAD: &str = "payload";
    pub const CONTENT_TYPE: &str = "content_type";
    pub const CREATE_TIME: &str = "create_time";
    pub const UPDATE_TIME: &str = "update_time";
    /// 1 once RetryDeadLetter asked for a redelivery, else 0.
    pub const RETRY_REQUESTED: &str = "retry_requested";
}

/// Change calendars (issue 26): a JSON document per calendar.
pub const CALENDARS: &str = "calendars";

pub mod cal {
    pub const NAME: &str = "name";
    pub const REVISION: &str = "revision";
    pub const CREATE_TIME: &str = "create_time";
    pub const UPDATE_TIME: &str = "update_time";
    pub const BODY: &str = "body";
}
