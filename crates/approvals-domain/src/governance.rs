//! Policy governance: protected policies (changed only under four eyes) and shadow mode (a
//! policy evaluated on every request it matches, its verdict recorded, never enforced).
//!
//! Pure: a verdict is a function of the policy and the request's facts, so evaluating the same
//! policy on the same request twice gives the same verdict, and nothing here mutates its input.

use serde::{Deserialize, Serialize};

use crate::{
    ChangeRequest, DomainError, Policy, PolicySnapshot,
    condition::{self, RequestFacts},
};

/// The project whose change requests change policies (four eyes on policy changes).
pub const POLICIES_PROJECT: &str = "_policies";
/// Action key of a change request that replaces policies: each change names a policy
/// (`resource_type` `policy`, `resource_id` its name) and carries the new policy as its payload.
pub const ACTION_UPDATE: &str = "policy.update";
/// Action key of a change request that deletes the policies its changes name.
pub const ACTION_DELETE: &str = "policy.delete";
/// The `resource_type` of every change of such a request.
pub const RESOURCE_TYPE: &str = "policy";

/// Whether a change request changes policies (and is applied by the service itself).
pub fn is_policy_change(project: &str) -> bool {
    project == POLICIES_PROJECT
}

/// Whether a policy is enforced or only evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyMode {
    /// Not chosen: enforced.
    #[default]
    Unspecified,
    Enforce,
    /// Evaluated on every request it matches and its verdict recorded on the request
    /// (`shadow_verdicts`); never selected to govern a request.
    Shadow,
}

impl PolicyMode {
    pub fn is_shadow(self) -> bool {
        self == PolicyMode::Shadow
    }
}

/// What a shadow policy would have asked of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowVerdict {
    /// The shadow policy's name.
    pub policy: String,
    /// Approvals it would have required (over all its levels).
    pub required_approvals: u32,
    /// Group requirements it would have added (`group:NAME`), over all its levels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_groups: Vec<String>,
    /// Whether it would have blocked the request until approved (a pre-approved policy does
    /// not).
    pub would_block: bool,
    /// Whether it would have approved the request by itself.
    pub would_auto_approve: bool,
    /// The paths of its conditions that matched (as `policy_snapshot.matched_conditions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matched_conditions: Vec<String>,
}

/// Refuses a direct update or delete of a protected policy: it changes only through a change
/// request of action `policy.update` or `policy.delete` on project `_policies`. Protecting an
/// unprotected policy is allowed directly (only `current` counts, not the edit).
pub fn check_direct_change(current: &Policy) -> Result<(), DomainError> {
    if current.rules.protected {
        Err(DomainError::PolicyProtected {
            name: current.name.clone(),
        })
    } else {
        Ok(())
    }
}

/// Whether `policy` matches the request: its project, environment and action key, and its
/// condition (a failing condition counts as a match, as in enforcement).
pub fn matches(policy: &Policy, facts: &RequestFacts<'_>) -> bool {
    policy
        .specificity(facts.project, facts.environment, facts.action_key)
        .is_some()
        && (policy.rules.condition.is_empty()
            || condition::evaluate(&policy.rules.condition, facts).applies())
}

/// The snapshot `policy` would give the request, with its conditions evaluated; `None` when it
/// does not match.
pub fn would_snapshot(
    policy: &Policy,
    facts: &RequestFacts<'_>,
    server_min_approvals: u32,
) -> Option<PolicySnapshot> {
    if !matches(policy, facts) {
        return None;
    }
    let mut snapshot = PolicySnapshot::of(policy, server_min_approvals);
    snapshot.evaluate_conditions(facts);
    Some(snapshot)
}

/// Approvals a snapshot requires, over all its levels.
pub fn required_approvals(snapshot: &PolicySnapshot) -> u32 {
    snapshot
        .stages()
        .iter()
        .map(|(_, level)| level.min_approvals.max(1))
        .sum()
}

/// The verdict of `policy` on the request, if it matches.
pub fn verdict(
    policy: &Policy,
    facts: &RequestFacts<'_>,
    server_min_approvals: u32,
) -> Option<ShadowVerdict> {
    let snapshot = would_snapshot(policy, facts, server_min_approvals)?;
    let required_approvals = required_approvals(&snapshot);
    let mut required_groups: Vec<String> = snapshot
        .stages()
        .iter()
        .flat_map(|(_, level)| level.requirements.iter())
        .map(|r| r.group.as_str().to_owned())
        .collect();
    required_groups.sort();
    required_groups.dedup();
    Some(ShadowVerdict {
        policy: policy.name.clone(),
        required_approvals,
        required_groups,
        // A standard change (`pre_approved`) is approved by the policy itself as it enters review.
        would_block: required_approvals > 0 && !policy.rules.pre_approved,
        would_auto_approve: required_approvals == 0 || policy.rules.pre_approved,
        matched_conditions: snapshot.matched_conditions,
    })
}

/// The verdicts of every shadow policy among `policies` that matches the request, by name.
pub fn shadow_verdicts(
    policies: &[Policy],
    facts: &RequestFacts<'_>,
    server_min_approvals: u32,
) -> Vec<ShadowVerdict> {
    let mut out: Vec<ShadowVerdict> = policies
        .iter()
        .filter(|p| p.rules.mode.is_shadow())
        .filter_map(|p| verdict(p, facts, server_min_approvals))
        .collect();
    out.sort_by(|a, b| a.policy.cmp(&b.policy));
    out
}

/// How a draft policy would have changed the outcome of a past request (see [`replay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// The draft does not match the request.
    NotMatched,
    /// It matches, and the request's approvals pass (or fail) it as they did the enforced
    /// rules, with no more approvals required.
    Unchanged,
    /// The request's approvals passed the enforced rules and would not pass the draft.
    WouldBlock,
    /// Neither passes differently, but the draft requires more approvals.
    NeedsMoreApprovals,
    /// The request's approvals did not pass the enforced rules and would pass the draft.
    WouldPass,
}

/// One replayed request: its outcome and the approvals each side requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub outcome: ReplayOutcome,
    pub enforced_required: u32,
    pub draft_required: u32,
}

/// Evaluates `draft` against a past request as it stands (its reviews, its enforced snapshot),
/// without changing it. The requester's groups at creation are not recorded on the request:
/// conditions over `requester_groups` see `groups`.
pub fn replay(
    draft: &Policy,
    request: &ChangeRequest,
    groups: &[String],
    server_min_approvals: u32,
) -> Replayed {
    let enforced_required = required_approvals(&request.policy);
    let facts = request.facts(groups);
    let Some(snapshot) = would_snapshot(draft, &facts, server_min_approvals) else {
        return Replayed {
            outcome: ReplayOutcome::NotMatched,
            enforced_required,
            draft_required: 0,
        };
    };
    let draft_required = required_approvals(&snapshot);
    let enforced_met = request.policy.quorum_reached(&request.reviews);
    let draft_met = snapshot.quorum_reached(&request.reviews);
    let outcome = match (enforced_met, draft_met) {
        (true, false) => ReplayOutcome::WouldBlock,
        (false, true) => ReplayOutcome::WouldPass,
        _ if draft_required > enforced_required => ReplayOutcome::NeedsMoreApprovals,
        _ => ReplayOutcome::Unchanged,
    };
    Replayed {
        outcome,
        enforced_required,
        draft_required,
    }
}
