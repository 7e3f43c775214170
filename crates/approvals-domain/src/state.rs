use std::fmt;

use serde::{Deserialize, Serialize};

/// The lifecycle state of a change request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Draft,
    InReview,
    Approved,
    Scheduled,
    Applying,
    Applied,
    ApplyFailed,
    Rejected,
    Cancelled,
    Expired,
}

impl State {
    pub const ALL: [State; 10] = [
        State::Draft,
        State::InReview,
        State::Approved,
        State::Scheduled,
        State::Applying,
        State::Applied,
        State::ApplyFailed,
        State::Rejected,
        State::Cancelled,
        State::Expired,
    ];

    /// The name stored in the database and shown in messages (`IN_REVIEW`).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Draft => "DRAFT",
            State::InReview => "IN_REVIEW",
            State::Approved => "APPROVED",
            State::Scheduled => "SCHEDULED",
            State::Applying => "APPLYING",
            State::Applied => "APPLIED",
            State::ApplyFailed => "APPLY_FAILED",
            State::Rejected => "REJECTED",
            State::Cancelled => "CANCELLED",
            State::Expired => "EXPIRED",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Open requests can still change state by review, apply or schedule.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            State::Draft | State::InReview | State::Approved | State::Scheduled
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reviewer's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Decision {
    Approve,
    Reject,
}

/// What a caller (or the service itself) asks to do to a change request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Update,
    Submit,
    Approve,
    Reject,
    Cancel,
    Comment,
    Apply,
    Schedule,
    Unschedule,
    Complete,
    Expire,
    Bypass,
}

impl Action {
    pub const ALL: [Action; 12] = [
        Action::Update,
        Action::Submit,
        Action::Approve,
        Action::Reject,
        Action::Cancel,
        Action::Comment,
        Action::Apply,
        Action::Schedule,
        Action::Unschedule,
        Action::Complete,
        Action::Expire,
        Action::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Update => "update",
            Action::Submit => "submit",
            Action::Approve => "approve",
            Action::Reject => "reject",
            Action::Cancel => "cancel",
            Action::Comment => "comment on",
            Action::Apply => "apply",
            Action::Schedule => "schedule",
            Action::Unschedule => "unschedule",
            Action::Complete => "complete",
            Action::Expire => "expire",
            Action::Bypass => "bypass",
        }
    }

    /// The transition table: the states from which this action is allowed. Every rule about
    /// "which action in which state" lives here and nowhere else.
    pub fn allowed_from(self) -> &'static [State] {
        use State::*;
        match self {
            Action::Update => &[Draft, InReview],
            Action::Submit => &[Draft],
            Action::Approve | Action::Reject => &[InReview],
            Action::Cancel => &[Draft, InReview, Approved, Scheduled],
            Action::Comment => &State::ALL,
            Action::Apply => &[Approved, ApplyFailed],
            Action::Schedule => &[Approved, Scheduled],
            Action::Unschedule => &[Scheduled],
            Action::Complete => &[Approved],
            Action::Expire => &[InReview, Approved, Scheduled],
            Action::Bypass => &[InReview],
        }
    }

    pub fn is_allowed_in(self, state: State) -> bool {
        self.allowed_from().contains(&state)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
            let json = serde_json::to_string(&state).expect("serialises");
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        assert_eq!(State::parse("in_review"), None);
    }

    /// The whole table, written out the other way round (state by state), so that a change to
    /// one side without the other fails.
    #[test]
    fn transition_table() {
        use Action::*;
        let expected: &[(State, &[Action])] = &[
            (State::Draft, &[Update, Submit, Cancel, Comment]),
            (
                State::InReview,
                &[Update, Approve, Reject, Cancel, Comment, Expire, Bypass],
            ),
            (
                State::Approved,
                &[Cancel, Comment, Apply, Schedule, Complete, Expire],
            ),
            (
                State::Scheduled,
                &[Cancel, Comment, Schedule, Unschedule, Expire],
            ),
            (State::Applying, &[Comment]),
            (State::Applied, &[Comment]),
            (State::ApplyFailed, &[Comment, Apply]),
            (State::Rejected, &[Comment]),
            (State::Cancelled, &[Comment]),
            (State::Expired, &[Comment]),
        ];
        for (state, actions) in expected {
            for action in Action::ALL {
                assert_eq!(
                    action.is_allowed_in(*state),
                    actions.contains(&action),
                    "{action} from {state}"
                );
            }
        }
    }

    #[test]
    fn open_states() {
        let open: Vec<State> = State::ALL.into_iter().filter(|s| s.is_open()).collect();
        assert_eq!(
            open,
            vec![
                State::Draft,
                State::InReview,
                State::Approved,
                State::Scheduled
            ]
        );
    }
}
