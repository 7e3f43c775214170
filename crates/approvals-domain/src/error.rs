use crate::state::{Action, State};

/// One bad field of a request: its path (`changes[1].payload`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Why the domain refused a command. Each variant maps to one gRPC code and reason at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("cannot {action} a change request in state {state}")]
    InvalidTransition { state: State, action: Action },
    #[error("only the requester ({requester}) may {action} this change request")]
    NotRequester { requester: String, action: Action },
    #[error("the requester cannot approve their own change request")]
    SelfApproval,
    /// An approval whose party (see [`crate::Actor::party`]) is the requester's, or already
    /// approved through another reviewer, under a policy with independent approvals.
    #[error(
        "this approval is not independent: {party} vouches for {principal} without proof, and {party} already stands behind {other}; the approver must prove their own identity"
    )]
    NotIndependent {
        party: String,
        principal: String,
        other: String,
    },
    #[error("{principal} is not among the approvers of this change request's policy")]
    NotApprover { principal: String },
    /// Under a policy with levels: the caller is not among the current level's approvers.
    #[error(
        "{principal} is not among the approvers of level {level}, the level this change request waits for"
    )]
    NotLevelApprover { principal: String, level: u32 },
    /// Under a policy with levels: one person approves at one level only.
    #[error("{principal} approved this change request at level {level} already")]
    ApprovedAtEarlierLevel { principal: String, level: u32 },
    /// Anti-collusion: the requester approved a request of the caller within the window.
    #[error(
        "{principal} may not approve a change request of {requester}, who approved {principal}'s change request {change_request_id} within the policy's anti-collusion window"
    )]
    ReciprocalApproval {
        principal: String,
        requester: String,
        change_request_id: String,
    },
    /// A change request the caller may not see: answered exactly as an unknown id, so that
    /// ids of other projects cannot be probed.
    #[error("change request {id:?} not found")]
    ChangeRequestNotFound { id: String },
    /// A policy the caller may not see: answered exactly as an unknown name.
    #[error("policy {name:?} not found")]
    PolicyNotFound { name: String },
    /// A direct update or delete of a protected policy.
    #[error(
        "policy {name:?} is protected: change it through a change request of action policy.update or policy.delete on project _policies"
    )]
    PolicyProtected { name: String },
    #[error("the caller may not act in project {project:?}")]
    ProjectNotAllowed { project: String },
    #[error(
        "etag {given:?} does not match the current etag {current:?}; re-read the change request and retry"
    )]
    EtagMismatch { given: String, current: String },
    /// Applying, completing or scheduling a request that has a conflict.
    #[error(
        "change {change_id} has a conflict: {conflict}; update the change request to resolve it"
    )]
    Conflict { change_id: String, conflict: String },
    #[error("the change request expired at {expire_time_micros} (microseconds since the epoch)")]
    Expired { expire_time_micros: i64 },
    #[error("{principal} may not {action} this change request: only the requester{others}")]
    NotApplier {
        principal: String,
        action: Action,
        others: String,
    },
    #[error("{principal} is not among the executors of this change request's policy")]
    NotExecutor { principal: String },
    /// The request cannot be applied by the service (no applier, or an EXTERNAL request).
    #[error("{0}")]
    CannotApply(String),
    /// A manual apply while a calendar of the request's snapshot is closed.
    #[error("{}; apply it then, schedule it with next_open_window, or break glass", .0.describe())]
    WindowClosed(crate::calendar::Closure),
    /// A manual apply (or a schedule) before approval plus the policy's `apply_delay`.
    #[error(
        "the policy's apply_delay holds this change request until {}",
        crate::calendar::rfc3339(*.apply_time)
    )]
    ApplyDelay { apply_time: crate::Timestamp },
    #[error("policy {policy:?} forbids break-glass applies")]
    BypassForbidden { policy: String },
    #[error("the change request has {limit} comments, the most it may hold")]
    TooManyComments { limit: usize },
    #[error(
        "the change request has {limit} reviews (dismissed ones included), the most it may hold"
    )]
    TooManyReviews { limit: usize },
    #[error(
        "the change request would be {size} bytes encoded; the limit is {limit} bytes (shorten it, or start a new change request)"
    )]
    DocumentTooLarge { size: usize, limit: usize },
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}
