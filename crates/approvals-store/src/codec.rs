//! Rows <-> domain values: the columns a request and an event are written as, and how rows
//! are read back (an event's snapshot gets its comments back from the request row).

use std::collections::{BTreeSet, HashMap};

use approvals_domain::{
    AuthMethod, ChangeRequest, Comment, Event, EventDraft, EventKind, Principal, State, Timestamp,
    audit::{AuditRecord, EventFields, Hash, StoredEvent, hash_from_slice},
};
use sea_orm::{
    ConnectionTrait, QueryResult,
    sea_query::{Expr, ExprTrait, Query, SelectStatement},
};

use crate::{
    error::StoreError,
    schema::{CHANGE_REQUESTS, cr, ev, res},
};

/// An idempotency key (AIP-155) and a digest of the request body it was used with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub request_id: String,
    pub fingerprint: String,
}

pub(crate) const EVENT_COLUMNS: [&str; 14] = [
    ev::REVISION,
    ev::CHANGE_REQUEST_ID,
    ev::PROJECT,
    ev::ENVIRONMENT,
    ev::KIND,
    ev::ACTOR,
    ev::ACTING_PRINCIPAL,
    ev::FROM_STATE,
    ev::TO_STATE,
    ev::EVENT_TIME,
    ev::DETAIL,
    ev::SNAPSHOT,
    ev::COMMENT_COUNT,
    ev::AUTH_METHOD,
];

/// The values of an event row, in the order of `EVENT_COLUMNS[1..]` (all but the revision),
/// and the event's audit record (the bytes its hash covers, see `approvals_domain::audit`).
/// The snapshot is the request without its comments, and the number of comments beside it (see
/// [`ev::COMMENT_COUNT`]); `request` is as it was when this returns.
pub(crate) fn event_values(
    request: &mut ChangeRequest,
    event: &EventDraft,
    hashed: bool,
) -> Result<(Vec<sea_orm::Value>, Vec<u8>), StoreError> {
    let comments = std::mem::take(&mut request.comments);
    let snapshot = serde_json::to_string(&*request);
    request.comments = comments;
    let snapshot = snapshot?;
    let comment_count = i64::try_from(request.comments.len())
        .map_err(|_| StoreError::Internal("too many comments to count".into()))?;
    let record = if !hashed {
        Vec::new()
    } else {
        AuditRecord {
            change_request_id: &request.id,
            project: &request.project,
            environment: &request.environment,
            kind: event.kind.as_str(),
            actor: event.actor.as_str(),
            acting_principal: event.acting_principal.as_ref().map_or("", |p| p.as_str()),
            from_state: event.from_state.as_str(),
            to_state: event.to_state.as_str(),
            event_time_micros: event.time.as_micros(),
            detail: &event.detail,
            snapshot: &snapshot,
            comment_count: Some(comment_count),
            auth_method: event.auth_method.stored().unwrap_or(""),
        }
        .encode()
    };
    let values = vec![
        request.id.clone().into(),
        request.project.clone().into(),
        request.environment.clone().into(),
        event.kind.as_str().into(),
        event.actor.as_str().into(),
        event
            .acting_principal
            .as_ref()
            .map(|p| p.as_str().to_owned())
            .into(),
        event.from_state.as_str().into(),
        event.to_state.as_str().into(),
        event.time.as_micros().into(),
        event.detail.clone().into(),
        snapshot.into(),
        comment_count.into(),
        event.auth_method.stored().map(str::to_owned).into(),
    ];
    Ok((values, record))
}

/// An event row read back for verification: the stored columns as they are, not parsed (a
/// tampered row may not parse), and its hashes.
pub(crate) fn decode_stored_event(row: &QueryResult) -> Result<StoredEvent, StoreError> {
    let hash = |column: &str| -> Result<Option<Hash>, StoreError> {
        let bytes: Option<Vec<u8>> = row.try_get("", column)?;
        // A stored value of the wrong length is kept as a hash no event can have.
        Ok(bytes.map(|b| hash_from_slice(&b).unwrap_or([0xff; 32])))
    };
    let fields = EventFields {
        change_request_id: row.try_get("", ev::CHANGE_REQUEST_ID)?,
        project: row.try_get("", ev::PROJECT)?,
        environment: row.try_get("", ev::ENVIRONMENT)?,
        kind: row.try_get("", ev::KIND)?,
        actor: row.try_get("", ev::ACTOR)?,
        acting_principal: row.try_get("", ev::ACTING_PRINCIPAL)?,
        from_state: row.try_get("", ev::FROM_STATE)?,
        to_state: row.try_get("", ev::TO_STATE)?,
        event_time_micros: row.try_get("", ev::EVENT_TIME)?,
        detail: row.try_get("", ev::DETAIL)?,
        snapshot: row.try_get("", ev::SNAPSHOT)?,
        comment_count: row.try_get("", ev::COMMENT_COUNT)?,
        auth_method: row.try_get("", ev::AUTH_METHOD)?,
    };
    Ok(StoredEvent {
        revision: row.try_get("", ev::REVISION)?,
        fields,
        prev_hash: hash(ev::PREV_HASH)?,
        hash: hash(ev::HASH)?,
    })
}

/// The columns of a new request's row, all but the revision (which the event assigns; the
/// stored body's revision is never read, the column's is).
pub(crate) const REQUEST_COLUMNS: [&str; 14] = [
    cr::ID,
    cr::PROJECT,
    cr::ENVIRONMENT,
    cr::ACTION_KEY,
    cr::STATE,
    cr::CREATED_BY,
    cr::CREATE_TIME,
    cr::UPDATE_TIME,
    cr::EXPIRE_TIME,
    cr::DUE_TIME,
    cr::REQUEST_ID,
    cr::REQUEST_FINGERPRINT,
    cr::BODY,
    cr::RISK,
];

/// The values of a new request's row, in the order of `REQUEST_COLUMNS`.
pub(crate) fn request_values(
    request: &ChangeRequest,
    key: Option<&IdempotencyKey>,
) -> Result<Vec<sea_orm::Value>, StoreError> {
    Ok(vec![
        request.id.clone().into(),
        request.project.clone().into(),
        request.environment.clone().into(),
        request.action_key.clone().into(),
        request.state.as_str().into(),
        request.created_by.as_str().into(),
        request.create_time.as_micros().into(),
        request.update_time.as_micros().into(),
        request.expire_time.map(Timestamp::as_micros).into(),
        request.next_due_time().map(Timestamp::as_micros).into(),
        key.map(|k| k.request_id.clone()).into(),
        key.map(|k| k.fingerprint.clone()).into(),
        serde_json::to_string(request)?.into(),
        risk_value(request).into(),
    ])
}

/// The `risk` column's value: NULL for a request without a risk label.
pub(crate) fn risk_value(request: &ChangeRequest) -> Option<String> {
    (!request.risk.is_unspecified()).then(|| request.risk.as_str().to_owned())
}

pub(crate) fn select_request(id: &str) -> SelectStatement {
    Query::select()
        .columns([cr::ID, cr::REVISION, cr::BODY, cr::AUDIT_HEAD])
        .from(CHANGE_REQUESTS)
        .and_where(Expr::col(cr::ID).eq(id))
        .to_owned()
}

/// The columns of a resource row (see [`resource_values`]).
pub(crate) const RESOURCE_COLUMNS: [&str; 4] = [
    res::CHANGE_REQUEST_ID,
    res::PROJECT,
    res::RESOURCE_TYPE,
    res::RESOURCE_ID,
];

/// The rows of the resources `request`'s changes touch (each once), in the order of
/// `RESOURCE_COLUMNS`.
pub(crate) fn resource_values(request: &ChangeRequest) -> Vec<[sea_orm::Value; 4]> {
    resource_keys(request)
        .into_iter()
        .map(|(resource_type, resource_id)| {
            [
                request.id.clone().into(),
                request.project.clone().into(),
                resource_type.into(),
                resource_id.into(),
            ]
        })
        .collect()
}

pub(crate) fn resource_keys(request: &ChangeRequest) -> BTreeSet<(String, String)> {
    request
        .changes
        .iter()
        .map(|c| (c.resource_type.clone(), c.resource_id.clone()))
        .collect()
}

/// The chain head stored on a request row read with [`select_request`] (`None` before its
/// first hashed event).
pub(crate) fn decode_audit_head(row: &QueryResult) -> Result<Option<Hash>, StoreError> {
    let bytes: Option<Vec<u8>> = row.try_get("", cr::AUDIT_HEAD)?;
    bytes
        .map(|b| {
            hash_from_slice(&b).ok_or_else(|| {
                StoreError::Internal("a change request's audit head is not 32 bytes".into())
            })
        })
        .transpose()
}

pub(crate) fn decode_request(row: &QueryResult) -> Result<ChangeRequest, StoreError> {
    let body: String = row.try_get("", cr::BODY)?;
    let mut request: ChangeRequest = serde_json::from_str(&body)?;
    request.revision = row.try_get("", cr::REVISION)?;
    Ok(request)
}

/// An event row as read, before its snapshot got its comments back (see [`with_comments`]).
pub(crate) struct EventRow {
    event: Event,
    /// The snapshot left out the request's first `n` comments (None: it holds its comments).
    comments_apart: Option<usize>,
}

pub(crate) fn decode_event(row: &QueryResult, with_snapshot: bool) -> Result<EventRow, StoreError> {
    let revision: i64 = row.try_get("", ev::REVISION)?;
    let kind: String = row.try_get("", ev::KIND)?;
    let from: String = row.try_get("", ev::FROM_STATE)?;
    let to: String = row.try_get("", ev::TO_STATE)?;
    let actor: String = row.try_get("", ev::ACTOR)?;
    let acting: Option<String> = row.try_get("", ev::ACTING_PRINCIPAL)?;
    let auth_method: Option<String> = row.try_get("", ev::AUTH_METHOD)?;
    let corrupt =
        |what: &str| StoreError::Internal(format!("event {revision} has an unknown {what}"));
    let (change_request, comments_apart) = if with_snapshot {
        let snapshot: String = row.try_get("", ev::SNAPSHOT)?;
        let mut request: ChangeRequest = serde_json::from_str(&snapshot)?;
        request.revision = revision;
        let count: Option<i64> = row.try_get("", ev::COMMENT_COUNT)?;
        let count = count
            .map(|n| usize::try_from(n).map_err(|_| corrupt("comment count")))
            .transpose()?;
        (Some(request), count)
    } else {
        (None, None)
    };
    let event = Event {
        revision,
        change_request_id: row.try_get("", ev::CHANGE_REQUEST_ID)?,
        project: row.try_get("", ev::PROJECT)?,
        environment: row.try_get("", ev::ENVIRONMENT)?,
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        actor: Principal::parse(&actor).map_err(|_| corrupt("actor"))?,
        acting_principal: acting
            .map(|p| Principal::parse(&p).map_err(|_| corrupt("acting principal")))
            .transpose()?,
        auth_method: auth_method
            .map(|m| AuthMethod::parse(&m).ok_or_else(|| corrupt("auth method")))
            .transpose()?
            .unwrap_or_default(),
        from_state: State::parse(&from).ok_or_else(|| corrupt("from_state"))?,
        to_state: State::parse(&to).ok_or_else(|| corrupt("to_state"))?,
        time: Timestamp::from_micros(row.try_get("", ev::EVENT_TIME)?),
        detail: row.try_get("", ev::DETAIL)?,
        change_request,
    };
    Ok(EventRow {
        event,
        comments_apart,
    })
}

/// The comments of a stored request, read without the rest of it.
#[derive(serde::Deserialize)]
struct CommentsOnly {
    #[serde(default)]
    comments: Vec<Comment>,
}

/// The events of `rows`, each snapshot with its comments: the first `comment_count` comments of
/// the request as it is now (one read of the request rows that need it). Exact, because
/// comments are only ever appended, in order, in the same transaction as their event, and a
/// request row is never deleted: the row read here, at least as new as the events, holds every
/// comment each of them had, first.
pub(crate) async fn with_comments(
    db: &impl ConnectionTrait,
    rows: Vec<EventRow>,
) -> Result<Vec<Event>, StoreError> {
    let wanted: BTreeSet<String> = rows
        .iter()
        .filter(|row| row.event.change_request.is_some() && row.comments_apart.unwrap_or(0) > 0)
        .map(|row| row.event.change_request_id.clone())
        .collect();
    let mut comments: HashMap<String, Vec<Comment>> = HashMap::new();
    if !wanted.is_empty() {
        let query = Query::select()
            .columns([cr::ID, cr::BODY])
            .from(CHANGE_REQUESTS)
            .and_where(Expr::col(cr::ID).is_in(wanted))
            .to_owned();
        for row in db.query_all(&query).await? {
            let id: String = row.try_get("", cr::ID)?;
            let body: String = row.try_get("", cr::BODY)?;
            let only: CommentsOnly = serde_json::from_str(&body)?;
            comments.insert(id, only.comments);
        }
    }
    rows.into_iter()
        .map(|row| {
            let mut event = row.event;
            if let (Some(count), Some(request)) =
                (row.comments_apart, event.change_request.as_mut())
                && count > 0
            {
                let prefix = comments
                    .get(&event.change_request_id)
                    .and_then(|all| all.get(..count))
                    .ok_or_else(|| {
                        StoreError::Internal(format!(
                            "event {} counts {count} comments that change request {} does not hold",
                            event.revision, event.change_request_id
                        ))
                    })?;
                request.comments = prefix.to_vec();
            }
            Ok(event)
        })
        .collect()
}
