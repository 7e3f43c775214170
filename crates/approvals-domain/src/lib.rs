//! The approvals domain: change requests, reviews, the state machine and validation.
//!
//! Pure: no I/O, no clock reads, no id generation. Time and ids are passed in by the caller, so
//! every rule here is testable on its own.

mod apply;
pub mod attestation;
pub mod audit;
pub mod calendar;
mod change_request;
pub mod condition;
mod error;
mod event;
mod filter;
pub mod governance;
mod policy;
mod principal;
pub mod requirements;
pub mod rules;
mod state;
mod time;
pub mod validation;

pub use apply::{
    ApplyOutcome, ApplyRun, ApplyWiring, ResourceVersion, Schedule, ScheduleAt, ScheduleStatus,
    listed,
};
pub use change_request::{
    Change, ChangeInput, ChangeRequest, ChangeRequestPatch, Comment, NewChangeRequest, Review,
    ValidationStatus, ViewerFlags,
};
pub use error::{DomainError, FieldViolation};
pub use event::{Event, EventDraft, EventKind};
pub use filter::{RequestFilter, touches_resource};
pub use governance::{PolicyMode, ShadowVerdict};
pub use policy::{
    ApplyMode, GroupRequirement, Policy, PolicyRules, PolicySnapshot, ReviewRules, Specificity,
    parse_policy_principal, select_policy,
};
pub use principal::{Actor, AuthMethod, IdentityProof, Principal, PrincipalKind, SYSTEM_PRINCIPAL};
pub use requirements::{
    AntiCollusion, JustificationRule, Level, LevelProgress, ReciprocalApproval,
};
pub use rules::{AutomaticReview, Risk, RiskRule, policy_principal};
pub use state::{Action, Decision, State};
pub use time::{DURATION_RANGE, TIMESTAMP_RANGE, Timestamp, duration_micros};
