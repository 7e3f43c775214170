use serde::{Deserialize, Serialize};

use crate::{AuthMethod, ChangeRequest, Principal, State, Timestamp};

/// The kind of a committed mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    Created,
    Updated,
    Submitted,
    Reviewed,
    Commented,
    Cancelled,
    ApplyStarted,
    Applied,
    ApplyFailed,
    Scheduled,
    Unscheduled,
    ScheduleSuspended,
    ScheduleFailed,
    Expired,
    ConflictDetected,
    Bypassed,
    Completed,
    /// A group requirement escalated (see [`crate::rules`]).
    Escalated,
    /// A schedule a change calendar suspended is pending again: its calendars opened.
    ScheduleResumed,
}

impl EventKind {
    pub const ALL: [EventKind; 19] = [
        EventKind::Created,
        EventKind::Updated,
        EventKind::Submitted,
        EventKind::Reviewed,
        EventKind::Commented,
        EventKind::Cancelled,
        EventKind::ApplyStarted,
        EventKind::Applied,
        EventKind::ApplyFailed,
        EventKind::Scheduled,
        EventKind::Unscheduled,
        EventKind::ScheduleSuspended,
        EventKind::ScheduleFailed,
        EventKind::Expired,
        EventKind::ConflictDetected,
        EventKind::Bypassed,
        EventKind::Completed,
        EventKind::Escalated,
        EventKind::ScheduleResumed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "CREATED",
            EventKind::Updated => "UPDATED",
            EventKind::Submitted => "SUBMITTED",
            EventKind::Reviewed => "REVIEWED",
            EventKind::Commented => "COMMENTED",
            EventKind::Cancelled => "CANCELLED",
            EventKind::ApplyStarted => "APPLY_STARTED",
            EventKind::Applied => "APPLIED",
            EventKind::ApplyFailed => "APPLY_FAILED",
            EventKind::Scheduled => "SCHEDULED",
            EventKind::Unscheduled => "UNSCHEDULED",
            EventKind::ScheduleSuspended => "SCHEDULE_SUSPENDED",
            EventKind::ScheduleFailed => "SCHEDULE_FAILED",
            EventKind::Expired => "EXPIRED",
            EventKind::ConflictDetected => "CONFLICT_DETECTED",
            EventKind::Bypassed => "BYPASSED",
            EventKind::Completed => "COMPLETED",
            EventKind::Escalated => "ESCALATED",
            EventKind::ScheduleResumed => "SCHEDULE_RESUMED",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// What a command produced, before the store gives it a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDraft {
    pub kind: EventKind,
    pub actor: Principal,
    pub acting_principal: Option<Principal>,
    /// How the credential that made the change was presented (unspecified for the service's
    /// own work and for events written before it was recorded).
    pub auth_method: AuthMethod,
    pub from_state: State,
    pub to_state: State,
    pub time: Timestamp,
    pub detail: String,
}

/// A committed event from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub revision: i64,
    pub change_request_id: String,
    pub project: String,
    pub environment: String,
    pub kind: EventKind,
    pub actor: Principal,
    pub acting_principal: Option<Principal>,
    /// How the credential that made the change was presented (unspecified for the service's
    /// own work and for events written before it was recorded).
    pub auth_method: AuthMethod,
    pub from_state: State,
    pub to_state: State,
    pub time: Timestamp,
    pub detail: String,
    /// The change request right after the event, when the reader asked for it.
    pub change_request: Option<ChangeRequest>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
    }
}
