//! Policy rules that act on a request by themselves: risk labels, pre-approved standard
//! changes, automatic reviews, and escalation of group requirements.
//!
//! - **Risk.** A policy's `risk_rules` each pair a CEL condition with a [`Risk`]; the request's
//!   risk is the highest of the rules that matched (an evaluation error counts as a match, so
//!   it fails toward the higher label), evaluated with the policy's other conditions (at
//!   creation and after every edit of the changes).
//! - **Pre-approved standard changes.** A snapshot whose policy is `pre_approved` approves the
//!   request as it enters review (create without `draft`, submit, an edit that sends it back),
//!   as one review by `policy:<name>`; the apply mode then applies.
//! - **Automatic reviews.** The first of the policy's `automatic_reviews` whose condition
//!   matched records one review by `policy:<name>`, with the rule's decision and reason, as the
//!   request enters review; it counts as a person's would (toward `min_approvals`, in the rule's
//!   `group` if it names one; a REJECT counts toward `rejections_to_reject`). It never removes a
//!   person's rejection.
//! - **Escalation.** A group requirement with `escalate_after` and `escalate_to` escalates when
//!   the request has been in review that long without being approved: from then on, members of
//!   the `escalate_to` groups may review too, and their approvals count toward that requirement.
//!   The service's sweep records it ([`crate::EventKind::Escalated`]); until the event is
//!   committed the requirement is not escalated, so what a caller sees and what counts agree.
//!   Escalation only adds reviewers: it never removes anyone's eligibility, nor an approval.

use serde::{Deserialize, Serialize};

use crate::{
    Actor, ChangeRequest, Decision, EventDraft, EventKind, GroupRequirement, Principal,
    PrincipalKind, Review, State, Timestamp, validation::Violations,
};

/// A risk label (see the module documentation).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Risk {
    /// No rule matched (or the policy has none).
    #[default]
    Unspecified,
    Low,
    Medium,
    High,
}

impl Risk {
    pub const ALL: [Risk; 4] = [Risk::Unspecified, Risk::Low, Risk::Medium, Risk::High];

    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Unspecified => "UNSPECIFIED",
            Risk::Low => "LOW",
            Risk::Medium => "MEDIUM",
            Risk::High => "HIGH",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    pub fn is_unspecified(&self) -> bool {
        *self == Risk::Unspecified
    }
}

/// A condition that labels the requests it matches with a risk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskRule {
    /// A CEL condition (required).
    pub condition: String,
    /// LOW, MEDIUM or HIGH.
    pub risk: Risk,
}

/// A machine review a policy records by itself on the requests its condition matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomaticReview {
    /// A CEL condition; empty: every request.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
    pub decision: Decision,
    /// Recorded as the review's comment (required).
    pub reason: String,
    /// The group (`group:NAME`) the review counts in, for group requirements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Principal>,
}

/// The principal a policy's own reviews are recorded under.
pub fn policy_principal(policy_name: &str) -> Principal {
    Principal::from_trusted(format!("policy:{policy_name}"))
}

/// Checks the fields of this module on a policy (`prefix`: `policy.`).
pub(crate) fn validate(v: &mut Violations, prefix: &str, rules: &crate::PolicyRules) {
    let field = |name: &str| format!("{prefix}{name}");
    for (i, rule) in rules.risk_rules.iter().enumerate() {
        let condition = field(&format!("risk_rules[{i}].condition"));
        if rule.condition.trim().is_empty() {
            v.add(condition, "is required");
        } else if let Err(err) = crate::condition::check(&rule.condition) {
            v.add(condition, err);
        }
        if rule.risk.is_unspecified() {
            v.add(
                field(&format!("risk_rules[{i}].risk")),
                "must be RISK_LOW, RISK_MEDIUM or RISK_HIGH",
            );
        }
    }
    for (i, rule) in rules.automatic_reviews.iter().enumerate() {
        let at = |name: &str| field(&format!("automatic_reviews[{i}].{name}"));
        if !rule.condition.is_empty()
            && let Err(err) = crate::condition::check(&rule.condition)
        {
            v.add(at("condition"), err);
        }
        if rule.reason.trim().is_empty() {
            v.add(
                at("reason"),
                "is required: it is recorded as the review's comment",
            );
        } else {
            v.text(
                &at("reason"),
                &rule.reason,
                crate::validation::MAX_TEXT_BYTES,
            );
        }
        if let Some(group) = &rule.group
            && group.kind() != PrincipalKind::Group
        {
            v.add(
                at("group"),
                format!("{:?} is not a group: write group:NAME", group.as_str()),
            );
        }
    }
    if rules.pre_approved && !rules.automatic_reviews.is_empty() {
        v.add(
            field("automatic_reviews"),
            "must be empty on a pre_approved policy: its requests are approved outright",
        );
    }
    let mut requirement_lists: Vec<(String, &[GroupRequirement])> =
        vec![(String::new(), rules.requirements.as_slice())];
    for (i, level) in rules.levels.iter().enumerate() {
        requirement_lists.push((format!("levels[{i}]."), level.requirements.as_slice()));
    }
    for (list_prefix, list) in requirement_lists {
        for (j, r) in list.iter().enumerate() {
            let at = |name: &str| field(&format!("{list_prefix}requirements[{j}].{name}"));
            match r.escalate_after_micros {
                Some(after) if after <= 0 => v.add(at("escalate_after"), "must be positive"),
                Some(_) if r.escalate_to.is_empty() => v.add(
                    at("escalate_to"),
                    "is required with escalate_after: the groups that may approve after it",
                ),
                None if !r.escalate_to.is_empty() => v.add(
                    at("escalate_after"),
                    "is required with escalate_to: how long the request waits first",
                ),
                _ => {}
            }
            for (k, group) in r.escalate_to.iter().enumerate() {
                if group.kind() != PrincipalKind::Group {
                    v.add(
                        at(&format!("escalate_to[{k}]")),
                        format!("{:?} is not a group: write group:NAME", group.as_str()),
                    );
                }
            }
        }
    }
}

/// Bare group names of `groups` (`sre` for `group:sre`).
pub(crate) fn bare_names(groups: &[Principal]) -> impl Iterator<Item = &str> {
    groups
        .iter()
        .map(|g| g.as_str().strip_prefix("group:").unwrap_or(g.as_str()))
}

impl ChangeRequest {
    /// When the request entered review (its latest create or submit, or an edit that sent it
    /// back); the creation time for requests stored before this was recorded.
    pub fn review_start(&self) -> Timestamp {
        self.review_start_time.unwrap_or(self.create_time)
    }

    /// Marks the request as entering review at `now`: its escalation clock restarts, and the
    /// policy's own work (pre-approval, automatic reviews) is due.
    pub(crate) fn enter_review(&mut self, now: Timestamp) {
        self.review_start_time = Some(now);
        self.escalated.clear();
        self.policy_work_pending =
            self.policy.rules.pre_approved || !self.policy.rules.automatic_reviews.is_empty();
    }

    /// The policy's own work on a request that entered review: the pre-approval of a standard
    /// change, or the first automatic review whose condition matched. At most one event (a
    /// REVIEWED by `policy:<name>`); `None` when nothing is due (also once done).
    pub fn run_policy_work(&mut self, now: Timestamp) -> Option<EventDraft> {
        if !self.policy_work_pending {
            return None;
        }
        self.policy_work_pending = false;
        if self.state != State::InReview || self.policy.name.is_empty() {
            return None;
        }
        let actor = Actor::new(policy_principal(&self.policy.name), Vec::new());
        let level = self.current_level().unwrap_or(0);
        let level = if self.policy.has_levels() { level } else { 0 };
        if self.policy.rules.pre_approved {
            let comment = format!(
                "pre-approved standard change (policy {:?})",
                self.policy.name
            );
            self.reviews.push(machine_review(
                &actor,
                Decision::Approve,
                &comment,
                None,
                level,
                now,
            ));
            let to = self.approved_state();
            return Some(self.moved(EventKind::Reviewed, &actor, to, now, comment));
        }
        let rule = self
            .policy
            .rules
            .automatic_reviews
            .iter()
            .enumerate()
            .find(|(i, r)| {
                r.condition.is_empty()
                    || self
                        .policy
                        .matched_conditions
                        .iter()
                        .any(|m| *m == format!("automatic_reviews[{i}].condition"))
            })
            .map(|(_, r)| r.clone())?;
        // A later decision of the policy replaces its earlier one, as a person's does.
        self.reviews
            .retain(|r| r.dismissed || r.reviewer != actor.principal || r.level != level);
        let group = rule.group.as_ref().map(|g| {
            g.as_str()
                .strip_prefix("group:")
                .unwrap_or(g.as_str())
                .to_owned()
        });
        self.reviews.push(machine_review(
            &actor,
            rule.decision,
            &rule.reason,
            group,
            level,
            now,
        ));
        let to = self.state_after_review();
        Some(self.moved(EventKind::Reviewed, &actor, to, now, rule.reason))
    }

    /// The state a review leaves the request in: rejected, approved (or scheduled), or still in
    /// review.
    pub(crate) fn state_after_review(&self) -> State {
        let rejections = self
            .reviews
            .iter()
            .filter(|r| !r.dismissed && r.decision == Decision::Reject)
            .count();
        if u32::try_from(rejections).unwrap_or(u32::MAX)
            >= self.policy.rules.rejections_to_reject.max(1)
        {
            State::Rejected
        } else if self.policy_quorum_met() {
            self.approved_state()
        } else {
            State::InReview
        }
    }

    /// APPROVED, or SCHEDULED for a request created with an apply_time (not EXTERNAL).
    pub(crate) fn approved_state(&self) -> State {
        if self.schedule.is_some() && self.apply_mode() != crate::policy::ApplyMode::External {
            State::Scheduled
        } else {
            State::Approved
        }
    }

    /// Quorum, with the escalations recorded so far.
    pub(crate) fn policy_quorum_met(&self) -> bool {
        self.policy
            .quorum_met_escalated(&self.counted_approvals(), &self.escalated)
    }

    /// Requirements (their paths, `requirements[0]`, `levels[1].requirements[0]`) whose
    /// escalation is due at `now` and not recorded yet.
    pub fn escalations_due(&self, now: Timestamp) -> Vec<String> {
        if self.state != State::InReview {
            return Vec::new();
        }
        self.policy
            .escalating_requirements()
            .into_iter()
            .filter(|(path, _)| !self.escalated.contains(path))
            .filter(|(_, after)| self.review_start().saturating_add_micros(*after) <= now)
            .map(|(path, _)| path)
            .collect()
    }

    /// When the next escalation falls due (none once every one is recorded, or out of review).
    pub(crate) fn next_escalation_time(&self) -> Option<Timestamp> {
        if self.state != State::InReview {
            return None;
        }
        self.policy
            .escalating_requirements()
            .into_iter()
            .filter(|(path, _)| !self.escalated.contains(path))
            .map(|(_, after)| self.review_start().saturating_add_micros(after))
            .min()
    }

    /// The service's sweep: records every escalation due at `now`, in one ESCALATED event by
    /// `system:approvals`. `None` when none is due.
    pub fn escalate(&mut self, now: Timestamp) -> Option<EventDraft> {
        let due = self.escalations_due(now);
        if due.is_empty() {
            return None;
        }
        let mut described = Vec::new();
        for path in &due {
            if let Some(r) = self.policy.requirement_at(path) {
                let to: Vec<&str> = r.escalate_to.iter().map(Principal::as_str).collect();
                described.push(format!(
                    "{path} ({}) escalated to {}",
                    r.group,
                    to.join(", ")
                ));
            }
        }
        self.escalated.extend(due);
        let state = self.state;
        Some(self.moved(
            EventKind::Escalated,
            &Actor::system(),
            state,
            now,
            described.join("; "),
        ))
    }

    /// Whether `actor` holds a group that an escalated requirement (at `level`, 0: the
    /// policy's own) was escalated to.
    pub(crate) fn escalated_reviewer(&self, actor: &Actor, level: u32) -> bool {
        self.escalated.iter().any(|path| {
            let at_level = match path.strip_prefix("levels[") {
                Some(rest) => rest
                    .split(']')
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|i| i + 1 == level),
                None => level == 0 || !self.policy.has_levels(),
            };
            at_level
                && self.policy.requirement_at(path).is_some_and(|r| {
                    bare_names(&r.escalate_to).any(|g| actor.groups.iter().any(|h| h == g))
                })
        })
    }
}

fn machine_review(
    actor: &Actor,
    decision: Decision,
    comment: &str,
    group: Option<String>,
    level: u32,
    now: Timestamp,
) -> Review {
    Review {
        reviewer: actor.principal.clone(),
        decision,
        comment: comment.to_owned(),
        create_time: now,
        dismissed: false,
        reviewer_groups: group.into_iter().collect(),
        acting_principal: None,
        proof: crate::IdentityProof::Unspecified,
        auth_method: crate::AuthMethod::Unspecified,
        level,
    }
}
