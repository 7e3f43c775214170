//! Approval policies: which rules govern a change request, chosen by project, environment and
//! action key, and frozen into the request at creation as its [`PolicySnapshot`].
//!
//! Precedence, most specific first: a policy for the request's environment beats one for any
//! environment (`""`); within that, an exact `action_key` beats a prefix (`feature_flag.*`), a
//! longer prefix beats a shorter one, and `*` (the project default) comes last; then the server
//! default.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    Actor, ChangeInput, DomainError, Principal, PrincipalKind, Review, Timestamp,
    condition::{self, Outcome, RequestFacts},
    error::FieldViolation,
    governance::PolicyMode,
    requirements::{self, AntiCollusion, JustificationRule, Level, LevelProgress},
    rules::{self as policy_rules, AutomaticReview, Risk, RiskRule},
    validation::Violations,
};

/// How an approved request is applied (acted on by the apply feature; stored here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplyMode {
    /// Not chosen: the server's behaviour for requests without a policy.
    #[default]
    Unspecified,
    Auto,
    Manual,
    External,
}

/// At least `min_approvals` approvals from members of `group` (written `group:NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRequirement {
    pub group: Principal,
    pub min_approvals: u32,
    /// A CEL condition (see [`crate::condition`]): the requirement applies only to requests
    /// it matches. Empty: always.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
    /// Escalation (see [`crate::rules`]): after the request has been in review this many
    /// microseconds without being approved, members of `escalate_to` may approve too, counting
    /// toward this requirement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_after_micros: Option<i64>,
    /// The groups (`group:NAME`) the requirement escalates to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalate_to: Vec<Principal>,
}

impl GroupRequirement {
    /// A requirement of `min_approvals` from `group`, without condition or escalation.
    pub fn new(group: Principal, min_approvals: u32) -> Self {
        Self {
            group,
            min_approvals,
            condition: String::new(),
            escalate_after_micros: None,
            escalate_to: Vec::new(),
        }
    }

    /// The bare group name, as callers' groups are recorded (`sre` for `group:sre`).
    pub fn group_name(&self) -> &str {
        self.group
            .as_str()
            .strip_prefix("group:")
            .unwrap_or(self.group.as_str())
    }
}

/// The rules a policy sets. In a stored [`Policy`], `min_approvals` 0 means "the server default"
/// and `rejections_to_reject` 0 means 1; a [`PolicySnapshot`] holds them resolved.
///
/// Every field added after the first release has a serde default, so request documents written
/// before policies existed (which held only the first four fields) still decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRules {
    pub min_approvals: u32,
    /// Who may review: principals (`user:x`, `service:y`) and groups (`group:z`). Empty: anyone
    /// allowed to write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<Principal>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<GroupRequirement>,
    pub allow_self_approval: bool,
    pub rejections_to_reject: u32,
    /// Requests expire this many microseconds after creation unless the caller asks for less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ttl_micros: Option<i64>,
    #[serde(default)]
    pub apply_mode: ApplyMode,
    pub dismiss_stale_approvals: bool,
    /// JSON Schema every change's payload must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent_schema: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub applier_endpoint: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub appliers: Vec<Principal>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executors: Vec<Principal>,
    #[serde(default)]
    pub forbid_bypass: bool,
    /// Approvals must be independent: approvals whose identity only one acting credential
    /// vouched for (on-behalf-of without the user's token) count once for that credential, and
    /// not at all when that credential also created the request. Stored policies written before
    /// the setting existed decode as false; new policies and the server default have it on.
    #[serde(default)]
    pub independent_approvals: bool,
    /// Sequential approval levels; empty: one level made of `min_approvals`, `requirements`
    /// and `distinct_groups`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<Level>,
    #[serde(default, skip_serializing_if = "JustificationRule::is_empty")]
    pub justification: JustificationRule,
    /// Approvals from at least this many distinct groups (without levels); 0: no such rule.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub distinct_groups: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_collusion: Option<AntiCollusion>,
    /// The overlapping-groups rule (see [`crate::requirements`]): an approver counts once,
    /// toward the requirement that needs them. Stored policies and snapshots written before the
    /// rule existed decode as false (each approver counts for every group they hold); new
    /// policies and the server default have it on.
    #[serde(default)]
    pub count_approver_once: bool,
    /// A CEL condition: the policy governs only the requests it matches (others fall to the
    /// next most specific policy). Empty: every request it is selected for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
    /// Risk labels by condition (see [`crate::rules`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub risk_rules: Vec<RiskRule>,
    /// A standard change: requests this policy governs are approved by the policy itself as
    /// they enter review.
    #[serde(default)]
    pub pre_approved: bool,
    /// Machine reviews by condition (see [`crate::rules`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub automatic_reviews: Vec<AutomaticReview>,
    /// Changed only through a change request on project `_policies` (four eyes); direct
    /// updates and deletes are refused ([`crate::governance::check_direct_change`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
    /// Enforced, or only evaluated (shadow mode).
    #[serde(default, skip_serializing_if = "is_unspecified_mode")]
    pub mode: PolicyMode,
    /// Change calendars (by name) that must all be open for a request to apply (see
    /// [`crate::calendar`]); part of the snapshot, their definitions read when applying.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calendars: Vec<String>,
    /// An approved request applies no earlier than this many microseconds after its approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_delay_micros: Option<i64>,
}

fn is_unspecified_mode(mode: &PolicyMode) -> bool {
    *mode == PolicyMode::Unspecified
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Default for PolicyRules {
    /// The defaults of a new policy: server-default quorum, no self-approval, one rejection
    /// rejects, edits dismiss earlier reviews.
    fn default() -> Self {
        Self {
            min_approvals: 0,
            approvers: Vec::new(),
            requirements: Vec::new(),
            allow_self_approval: false,
            rejections_to_reject: 1,
            default_ttl_micros: None,
            apply_mode: ApplyMode::Unspecified,
            dismiss_stale_approvals: true,
            intent_schema: None,
            applier_endpoint: String::new(),
            appliers: Vec::new(),
            executors: Vec::new(),
            forbid_bypass: false,
            independent_approvals: true,
            levels: Vec::new(),
            justification: JustificationRule::default(),
            distinct_groups: 0,
            anti_collusion: None,
            count_approver_once: true,
            condition: String::new(),
            risk_rules: Vec::new(),
            pre_approved: false,
            automatic_reviews: Vec::new(),
            protected: false,
            mode: PolicyMode::Unspecified,
            calendars: Vec::new(),
            apply_delay_micros: None,
        }
    }
}

/// An approval policy, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Unique across the service.
    pub name: String,
    /// Assigned at creation and never changed: tells this policy from one created later under
    /// the same name (after a delete, possibly in another project). Empty for policies stored
    /// before uids existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    pub project: String,
    /// `""`: any environment.
    pub environment: String,
    /// An exact action key, or a prefix ending in `*` (`*` alone: the project default).
    pub action_key: String,
    #[serde(flatten)]
    pub rules: PolicyRules,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    /// Increases with every update; set by the store.
    #[serde(default)]
    pub revision: i64,
}

/// How specifically a policy matches a request; greater is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    environment_specific: bool,
    exact: bool,
    prefix_chars: usize,
}

impl Policy {
    /// The opaque etag of the current version (AIP-154).
    pub fn etag(&self) -> String {
        format!("p{}", self.revision)
    }

    pub fn check_etag(&self, given: Option<&str>) -> Result<(), DomainError> {
        crate::validation::check_etag(self.etag(), given)
    }

    /// How specifically this policy matches a request for `project`, `environment` and
    /// `action_key`; `None` when it does not match.
    pub fn specificity(
        &self,
        project: &str,
        environment: &str,
        action_key: &str,
    ) -> Option<Specificity> {
        if self.project != project {
            return None;
        }
        let environment_specific = match self.environment.as_str() {
            "" => false,
            env if env == environment => true,
            _ => return None,
        };
        let (exact, prefix_chars) = match self.action_key.strip_suffix('*') {
            Some(prefix) if action_key.starts_with(prefix) => (false, prefix.chars().count()),
            Some(_) => return None,
            None if self.action_key == action_key => (true, 0),
            None => return None,
        };
        Some(Specificity {
            environment_specific,
            exact,
            prefix_chars,
        })
    }

    /// Checks every field; `prefix` names the message field (`policy.`).
    pub fn validate(&self, prefix: &str) -> Result<(), DomainError> {
        let mut v = Violations::default();
        let field = |name: &str| format!("{prefix}{name}");
        // One violation for the name: the character rule covers control characters and NUL.
        if !self.name.trim().is_empty()
            && self
                .name
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            v.add(
                field("name"),
                "may contain only ASCII letters, digits, '-', '_' and '.'",
            );
        } else {
            v.required_name(&field("name"), &self.name);
        }
        v.required_name(&field("project"), &self.project);
        v.optional_name(&field("environment"), &self.environment);
        v.required_name(&field("action_key"), &self.action_key);
        if let Some(star) = self.action_key.find('*')
            && star + 1 != self.action_key.len()
        {
            v.add(
                field("action_key"),
                "'*' may only end a prefix (\"feature_flag.*\", or \"*\" for every action)",
            );
        }
        validate_rules(&mut v, prefix, &self.rules);
        v.into_result()
    }
}

fn validate_rules(v: &mut Violations, prefix: &str, rules: &PolicyRules) {
    let field = |name: &str| format!("{prefix}{name}");
    for (i, approver) in rules.approvers.iter().enumerate() {
        if approver.kind() == PrincipalKind::System {
            v.add(
                field(&format!("approvers[{i}]")),
                "must be user:NAME, service:NAME or group:NAME",
            );
        }
    }
    requirements::validate_requirements(v, prefix, &rules.requirements);
    if let Some(ttl) = rules.default_ttl_micros
        && ttl <= 0
    {
        v.add(field("default_ttl"), "must be positive");
    }
    if let Some(schema) = &rules.intent_schema {
        if let Err(err) = jsonschema::validator_for(&Value::Object(schema.clone())) {
            v.add(
                field("intent_schema"),
                format!("is not a valid JSON Schema: {err}"),
            );
        }
        v.json_strings(&field("intent_schema"), schema);
    }
    v.optional_name(&field("applier_endpoint"), &rules.applier_endpoint);
    for (name, list) in [
        ("appliers", &rules.appliers),
        ("executors", &rules.executors),
    ] {
        for (i, principal) in list.iter().enumerate() {
            if principal.kind() == PrincipalKind::System {
                v.add(
                    field(&format!("{name}[{i}]")),
                    "must be user:NAME, service:NAME or group:NAME",
                );
            }
        }
    }
    requirements::validate(v, prefix, rules);
    policy_rules::validate(v, prefix, rules);
}

/// The most specific policy matching a request, if any (see the module documentation).
pub fn select_policy<'a>(
    policies: &'a [Policy],
    project: &str,
    environment: &str,
    action_key: &str,
) -> Option<&'a Policy> {
    policies
        .iter()
        // A shadow policy is evaluated beside the one enforced, never selected.
        .filter(|p| !p.rules.mode.is_shadow())
        .filter_map(|p| {
            p.specificity(project, environment, action_key)
                .map(|s| (s, p))
        })
        .max_by(|(a, pa), (b, pb)| a.cmp(b).then_with(|| pb.name.cmp(&pa.name)))
        .map(|(_, p)| p)
}

/// What a change request's rules were called before policies existed.
pub type ReviewRules = PolicySnapshot;

/// The rules frozen into a change request at creation: the matching policy's (with its name),
/// or the server default (empty name). Later policy edits never change it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySnapshot {
    /// The policy's name; empty for the server default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The policy's uid; empty for the server default, and in snapshots taken before uids
    /// existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub project: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub environment: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action_key: String,
    /// Resolved: `min_approvals` >= 1 and `rejections_to_reject` >= 1.
    #[serde(flatten)]
    pub rules: PolicyRules,
    /// The conditions that matched the request (paths such as `requirements[1].condition`,
    /// `levels[0].condition`, `condition`), evaluated at creation and after every edit of its
    /// changes. A condition not listed did not match: what it guards does not apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matched_conditions: Vec<String>,
    /// Conditions whose evaluation failed (`path: error`); they count as matched (fail closed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub condition_errors: Vec<String>,
}

impl PolicySnapshot {
    /// The server default: `min_approvals` distinct approvals, no self-approval, one rejection
    /// rejects, edits dismiss earlier reviews.
    pub fn server_default(min_approvals: u32) -> Self {
        Self {
            name: String::new(),
            uid: String::new(),
            project: String::new(),
            environment: String::new(),
            action_key: String::new(),
            rules: PolicyRules {
                min_approvals: min_approvals.max(1),
                ..PolicyRules::default()
            },
            matched_conditions: Vec::new(),
            condition_errors: Vec::new(),
        }
    }

    /// The server default (the name `ReviewRules` had before policies existed).
    pub fn with_min_approvals(min_approvals: u32) -> Self {
        Self::server_default(min_approvals)
    }

    /// The snapshot of `policy`, with its defaults resolved against the server's.
    pub fn of(policy: &Policy, server_min_approvals: u32) -> Self {
        let mut rules = policy.rules.clone();
        if rules.min_approvals == 0 {
            rules.min_approvals = server_min_approvals.max(1);
        }
        rules.rejections_to_reject = rules.rejections_to_reject.max(1);
        Self {
            name: policy.name.clone(),
            uid: policy.uid.clone(),
            project: policy.project.clone(),
            environment: policy.environment.clone(),
            action_key: policy.action_key.clone(),
            rules,
            matched_conditions: Vec::new(),
            condition_errors: Vec::new(),
        }
    }

    /// The snapshot for a new request: the most specific matching policy whose `condition`
    /// (if any) matches the request (an evaluation error counts as a match), else the server
    /// default. [`crate::ChangeRequest::create`] evaluates its conditions.
    pub fn select_for(
        policies: &[Policy],
        facts: &RequestFacts<'_>,
        server_min_approvals: u32,
    ) -> Self {
        let candidates: Vec<Policy> = policies
            .iter()
            .filter(|p| {
                p.rules.condition.is_empty()
                    || condition::evaluate(&p.rules.condition, facts).applies()
            })
            .cloned()
            .collect();
        Self::select(
            &candidates,
            facts.project,
            facts.environment,
            facts.action_key,
            server_min_approvals,
        )
    }

    /// Every condition of the snapshot's rules, with its path.
    fn conditions(&self) -> Vec<(String, &str)> {
        let mut all = Vec::new();
        let rules = &self.rules;
        if !rules.condition.is_empty() {
            all.push(("condition".to_owned(), rules.condition.as_str()));
        }
        for (i, r) in rules.requirements.iter().enumerate() {
            if !r.condition.is_empty() {
                all.push((format!("requirements[{i}].condition"), r.condition.as_str()));
            }
        }
        for (i, level) in rules.levels.iter().enumerate() {
            if !level.condition.is_empty() {
                all.push((format!("levels[{i}].condition"), level.condition.as_str()));
            }
            for (j, r) in level.requirements.iter().enumerate() {
                if !r.condition.is_empty() {
                    all.push((
                        format!("levels[{i}].requirements[{j}].condition"),
                        r.condition.as_str(),
                    ));
                }
            }
        }
        for (i, r) in rules.risk_rules.iter().enumerate() {
            all.push((format!("risk_rules[{i}].condition"), r.condition.as_str()));
        }
        for (i, r) in rules.automatic_reviews.iter().enumerate() {
            if !r.condition.is_empty() {
                all.push((
                    format!("automatic_reviews[{i}].condition"),
                    r.condition.as_str(),
                ));
            }
        }
        all
    }

    /// The risk of the request: the highest label among the `risk_rules` whose condition
    /// matched (see [`Self::evaluate_conditions`]); unspecified when none did.
    pub fn risk(&self) -> Risk {
        self.rules
            .risk_rules
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let path = format!("risk_rules[{i}].condition");
                self.matched_conditions.contains(&path)
            })
            .map(|(_, r)| r.risk)
            .max()
            .unwrap_or_default()
    }

    /// Every requirement with an escalation, by path (`requirements[0]`,
    /// `levels[1].requirements[0]`), with its `escalate_after`; only those whose condition (and
    /// level's condition) matched.
    pub fn escalating_requirements(&self) -> Vec<(String, i64)> {
        let mut all = Vec::new();
        let mut push = |prefix: &str, list: &[GroupRequirement]| {
            for (j, r) in list.iter().enumerate() {
                if let Some(after) = r.escalate_after_micros
                    && self.applies(
                        &format!("{prefix}requirements[{j}].condition"),
                        &r.condition,
                    )
                {
                    all.push((format!("{prefix}requirements[{j}]"), after));
                }
            }
        };
        if self.has_levels() {
            for (i, level) in self.rules.levels.iter().enumerate() {
                if self.applies(&format!("levels[{i}].condition"), &level.condition) {
                    push(&format!("levels[{i}]."), &level.requirements);
                }
            }
        } else {
            push("", &self.rules.requirements);
        }
        all
    }

    /// The requirement at `path` (`requirements[0]`, `levels[1].requirements[0]`).
    pub fn requirement_at(&self, path: &str) -> Option<&GroupRequirement> {
        let index = |text: &str| -> Option<usize> {
            text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
        };
        match path.strip_prefix("levels") {
            Some(rest) => {
                let (level, requirement) = rest.split_once("].requirements")?;
                let level = self.rules.levels.get(index(&format!("{level}]"))?)?;
                level.requirements.get(index(requirement)?)
            }
            None => self
                .rules
                .requirements
                .get(index(path.strip_prefix("requirements")?)?),
        }
    }

    /// Evaluates every condition over the request and records the outcomes
    /// (`matched_conditions`, `condition_errors`).
    pub fn evaluate_conditions(&mut self, facts: &RequestFacts<'_>) {
        let mut matched = Vec::new();
        let mut errors = Vec::new();
        let conditions = self.conditions();
        if conditions.is_empty() {
            self.matched_conditions = matched;
            self.condition_errors = errors;
            return;
        }
        let prepared = condition::Prepared::new(facts);
        for (path, source) in conditions {
            match condition::evaluate_prepared(source, &prepared) {
                Outcome::Matched => matched.push(path),
                Outcome::NotMatched => {}
                Outcome::Failed(err) => {
                    errors.push(format!("{path}: {err}"));
                    matched.push(path);
                }
            }
        }
        self.matched_conditions = matched;
        self.condition_errors = errors;
    }

    /// Whether what the condition at `path` (`source`) guards applies.
    fn applies(&self, path: &str, source: &str) -> bool {
        source.is_empty() || self.matched_conditions.iter().any(|m| m == path)
    }

    fn applying_requirements(
        &self,
        prefix: &str,
        list: &[GroupRequirement],
    ) -> Vec<GroupRequirement> {
        list.iter()
            .enumerate()
            .filter(|(i, r)| {
                self.applies(
                    &format!("{prefix}requirements[{i}].condition"),
                    &r.condition,
                )
            })
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// The snapshot for a new request: the most specific matching policy, else the default.
    pub fn select(
        policies: &[Policy],
        project: &str,
        environment: &str,
        action_key: &str,
        server_min_approvals: u32,
    ) -> Self {
        match select_policy(policies, project, environment, action_key) {
            Some(policy) => Self::of(policy, server_min_approvals),
            None => Self::server_default(server_min_approvals),
        }
    }

    /// Whether `current`, the policy now holding this snapshot's name, is a later version of
    /// the policy the snapshot was taken from, still governing `project` (the request's), so
    /// that its apply wiring may be used. A policy deleted and created again under the same
    /// name is another policy, and so is one moved to another project.
    ///
    /// `created`: when the request was created. A snapshot taken before uids existed has none;
    /// its policy is then recognised by name and project, and by having existed when the
    /// request was created (a policy created later cannot be the one it was taken from).
    pub fn is_taken_from(&self, current: &Policy, project: &str, created: Timestamp) -> bool {
        if self.name.is_empty() || current.name != self.name || current.project != project {
            return false;
        }
        if self.uid.is_empty() {
            current.create_time <= created
        } else {
            current.uid == self.uid
        }
    }

    /// Whether `actor` is among the approvers (always, when the list is empty).
    pub fn may_review(&self, actor: &Actor) -> bool {
        self.rules.approvers.is_empty() || listed_in(&self.rules.approvers, actor)
    }

    /// Quorum over every live approval in `reviews` (see [`Self::quorum_met`]).
    pub fn quorum_reached(&self, reviews: &[Review]) -> bool {
        let approvals: Vec<&Review> = counting(reviews).collect();
        self.quorum_met(&approvals)
    }

    /// Whether the policy has `levels` (else its own quorum is its one level).
    pub fn has_levels(&self) -> bool {
        !self.rules.levels.is_empty()
    }

    /// The levels to pass, in order, with their numbers (1-based): the policy's `levels`
    /// whose condition matched (with the requirements whose condition matched), or one made of
    /// its own `min_approvals`, `requirements` and `distinct_groups`.
    pub fn stages(&self) -> Vec<(u32, Level)> {
        if self.has_levels() {
            return self
                .rules
                .levels
                .iter()
                .enumerate()
                .filter(|(i, l)| self.applies(&format!("levels[{i}].condition"), &l.condition))
                .map(|(i, l)| {
                    let mut level = l.clone();
                    level.requirements =
                        self.applying_requirements(&format!("levels[{i}]."), &l.requirements);
                    (u32::try_from(i + 1).unwrap_or(u32::MAX), level)
                })
                .collect();
        }
        vec![(
            1,
            Level {
                min_approvals: self.rules.min_approvals.max(1),
                approvers: Vec::new(),
                requirements: self.applying_requirements("", &self.rules.requirements),
                distinct_groups: self.rules.distinct_groups,
                condition: String::new(),
            },
        )]
    }

    /// Each level's progress. With levels, an approval counts only for the level it was made
    /// at (`Review::level`); a level passes when it is met and every earlier one passed.
    /// `approvals` are the ones that count ([`crate::ChangeRequest::counted_approvals`]).
    pub fn level_progress(&self, approvals: &[&Review]) -> Vec<LevelProgress> {
        self.level_progress_escalated(approvals, &[])
    }

    /// [`Self::level_progress`] with the requirements at the paths `escalated` escalated: an
    /// approver holding one of a requirement's `escalate_to` groups counts toward it as if they
    /// held its group.
    pub fn level_progress_escalated(
        &self,
        approvals: &[&Review],
        escalated: &[String],
    ) -> Vec<LevelProgress> {
        let mut earlier_passed = true;
        self.stages()
            .iter()
            .map(|(number, level)| {
                let number = *number;
                let at_level: Vec<&Review> = approvals
                    .iter()
                    .copied()
                    .filter(|r| !self.has_levels() || r.level == number)
                    .collect();
                let groups: Vec<&[String]> = at_level
                    .iter()
                    .map(|r| r.reviewer_groups.as_slice())
                    .collect();
                let prefix = if self.has_levels() {
                    format!("levels[{}].requirements[", number.saturating_sub(1))
                } else {
                    "requirements[".to_owned()
                };
                let escalations: Vec<(&str, Vec<&str>)> = escalated
                    .iter()
                    .filter(|path| path.starts_with(&prefix))
                    .filter_map(|path| self.requirement_at(path))
                    .map(|r| {
                        (
                            r.group_name(),
                            policy_rules::bare_names(&r.escalate_to).collect(),
                        )
                    })
                    .collect();
                let widened: Vec<Vec<String>> = groups
                    .iter()
                    .map(|held| {
                        let mut held = held.to_vec();
                        for (group, to) in &escalations {
                            if to.iter().any(|t| held.iter().any(|h| h == t))
                                && !held.iter().any(|h| h == group)
                            {
                                held.push((*group).to_owned());
                            }
                        }
                        held
                    })
                    .collect();
                let widened: Vec<&[String]> = widened.iter().map(Vec::as_slice).collect();
                let count = u32::try_from(at_level.len()).unwrap_or(u32::MAX);
                let met = count >= level.min_approvals.max(1)
                    && requirements::groups_met(
                        &level.requirements,
                        0,
                        &widened,
                        self.rules.count_approver_once,
                    )
                    && requirements::groups_met(
                        &[],
                        level.distinct_groups,
                        &groups,
                        self.rules.count_approver_once,
                    );
                let passed = earlier_passed && met;
                earlier_passed = passed;
                LevelProgress {
                    level: number,
                    approval_count: count,
                    min_approvals: level.min_approvals.max(1),
                    passed,
                }
            })
            .collect()
    }

    /// The level waiting for approvals (1-based); `None` once every level passed.
    pub fn current_level(&self, approvals: &[&Review]) -> Option<u32> {
        self.level_progress(approvals)
            .iter()
            .find(|p| !p.passed)
            .map(|p| p.level)
    }

    /// Quorum: every level passed (see [`Self::level_progress`]). Without levels: at least
    /// `min_approvals` approvals that count, every group requirement met by approvers who held
    /// the group when they reviewed (under `count_approver_once` each approver counts once,
    /// toward the requirement that needs them; see [`crate::requirements`]), and
    /// `distinct_groups`.
    pub fn quorum_met(&self, approvals: &[&Review]) -> bool {
        self.current_level(approvals).is_none()
    }

    /// [`Self::quorum_met`] with the requirements at the paths `escalated` escalated.
    pub fn quorum_met_escalated(&self, approvals: &[&Review], escalated: &[String]) -> bool {
        self.level_progress_escalated(approvals, escalated)
            .iter()
            .all(|p| p.passed)
    }

    /// Whether `actor` may review at `level` (1-based): among the policy's approvers and the
    /// level's own (when it lists any).
    pub fn may_review_at(&self, actor: &Actor, level: u32) -> bool {
        let listed = usize::try_from(level.saturating_sub(1))
            .ok()
            .and_then(|i| self.rules.levels.get(i))
            .map(|l| l.approvers.as_slice())
            .unwrap_or_default();
        self.may_review(actor) && (listed.is_empty() || listed_in(listed, actor))
    }

    /// When a request created at `now` expires: the caller's time, capped by `default_ttl`.
    /// Never past [`Timestamp::MAX`] (a ttl may be 10,000 years): every expiry is a Timestamp
    /// clients can decode.
    pub fn expire_time(
        &self,
        requested: Option<Timestamp>,
        created: Timestamp,
    ) -> Option<Timestamp> {
        let limit = self
            .rules
            .default_ttl_micros
            .map(|ttl| created.saturating_add_micros(ttl).min(Timestamp::MAX));
        match (requested, limit) {
            (Some(requested), Some(limit)) => Some(requested.min(limit)),
            (requested, limit) => requested.or(limit),
        }
    }

    /// Checks every change's payload against the intent schema. `Ok(None)`: no schema, nothing
    /// checked. `Ok(Some(()))`: every payload is valid. Every violation is named as a field
    /// (`{prefix}changes[1].payload.rollout`).
    pub fn validate_intent(
        &self,
        prefix: &str,
        changes: &[ChangeInput],
    ) -> Result<Option<()>, DomainError> {
        let Some(schema) = &self.rules.intent_schema else {
            return Ok(None);
        };
        let validator =
            jsonschema::validator_for(&Value::Object(schema.clone())).map_err(|err| {
                // Refused when the policy was written; only a hand-edited database gets here.
                DomainError::invalid(
                    "policy_snapshot.intent_schema",
                    format!("the policy's intent schema does not compile: {err}"),
                )
            })?;
        let mut violations = Vec::new();
        for (i, change) in changes.iter().enumerate() {
            let payload = Value::Object(change.payload.clone());
            for error in validator.iter_errors(&payload) {
                let path = json_pointer_to_path(error.instance_path().as_str());
                violations.push(FieldViolation::new(
                    format!("{prefix}changes[{i}].payload{path}"),
                    error.to_string(),
                ));
            }
        }
        if violations.is_empty() {
            Ok(Some(()))
        } else {
            Err(DomainError::InvalidArgument(violations))
        }
    }
}

/// Whether `actor` is one of `list`, or holds one of its groups.
fn listed_in(list: &[Principal], actor: &Actor) -> bool {
    list.iter().any(|approver| {
        approver == &actor.principal
            || approver
                .as_str()
                .strip_prefix("group:")
                .is_some_and(|group| actor.groups.iter().any(|g| g == group))
    })
}

/// Approvals that count: not dismissed.
fn counting(reviews: &[Review]) -> impl Iterator<Item = &Review> {
    reviews.iter().filter(|r| r.is_live_approval())
}

/// `/rollout/steps/0` -> `.rollout.steps[0]`.
fn json_pointer_to_path(pointer: &str) -> String {
    let mut path = String::new();
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        if !token.is_empty() && token.chars().all(|c| c.is_ascii_digit()) {
            path.push_str(&format!("[{token}]"));
        } else {
            path.push('.');
            path.push_str(&token);
        }
    }
    path
}

/// Parses a principal a policy names (`user:x`, `service:y`, `group:z`).
pub fn parse_policy_principal(field: &str, text: &str) -> Result<Principal, FieldViolation> {
    match Principal::parse(text) {
        Ok(p) if p.kind() != PrincipalKind::System => Ok(p),
        Ok(_) => Err(FieldViolation::new(
            field,
            format!("{text:?}: expected user:NAME, service:NAME or group:NAME"),
        )),
        Err(message) => Err(FieldViolation::new(field, message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);

    fn policy(name: &str, environment: &str, action_key: &str) -> Policy {
        Policy {
            name: name.into(),
            uid: format!("uid-{name}"),
            project: "web".into(),
            environment: environment.into(),
            action_key: action_key.into(),
            rules: PolicyRules::default(),
            create_time: NOW,
            update_time: NOW,
            revision: 1,
        }
    }

    fn selected(policies: &[Policy], environment: &str, action_key: &str) -> Option<String> {
        select_policy(policies, "web", environment, action_key).map(|p| p.name.clone())
    }

    #[test]
    fn precedence_environment_then_exact_then_longest_prefix_then_star() {
        let policies = vec![
            policy("any-star", "", "*"),
            policy("any-flag-prefix", "", "feature_flag.*"),
            policy("any-exact", "", "feature_flag.update"),
            policy("prod-star", "prod", "*"),
            policy("prod-short", "prod", "feature*"),
            policy("prod-long", "prod", "feature_flag.*"),
            policy("prod-exact", "prod", "feature_flag.update"),
        ];
        assert_eq!(
            selected(&policies, "prod", "feature_flag.update").as_deref(),
            Some("prod-exact")
        );
        assert_eq!(
            selected(&policies, "prod", "feature_flag.delete").as_deref(),
            Some("prod-long")
        );
        assert_eq!(
            selected(&policies, "prod", "feature_set.create").as_deref(),
            Some("prod-short")
        );
        assert_eq!(
            selected(&policies, "prod", "segment.update").as_deref(),
            Some("prod-star")
        );
        // Another environment: only the any-environment policies apply.
        assert_eq!(
            selected(&policies, "staging", "feature_flag.update").as_deref(),
            Some("any-exact")
        );
        assert_eq!(
            selected(&policies, "staging", "feature_flag.delete").as_deref(),
            Some("any-flag-prefix")
        );
        assert_eq!(
            selected(&policies, "staging", "segment.update").as_deref(),
            Some("any-star")
        );
        // An environment-specific wildcard beats an any-environment exact match.
        assert_eq!(
            selected(&policies[3..4], "prod", "x").as_deref(),
            Some("prod-star")
        );
        let mut mixed = policies[..3].to_vec();
        mixed.push(policy("prod-star", "prod", "*"));
        assert_eq!(
            selected(&mixed, "prod", "feature_flag.update").as_deref(),
            Some("prod-star")
        );
        assert_eq!(selected(&policies, "prod", "x"), Some("prod-star".into()));
        assert_eq!(
            select_policy(&policies, "other", "prod", "feature_flag.update"),
            None
        );
    }

    #[test]
    fn snapshot_resolves_defaults() {
        let p = policy("p", "", "*");
        let snapshot = PolicySnapshot::of(&p, 3);
        assert_eq!(snapshot.rules.min_approvals, 3);
        assert_eq!(snapshot.rules.rejections_to_reject, 1);
        assert!(snapshot.rules.dismiss_stale_approvals);
        assert_eq!(snapshot.name, "p");
        assert_eq!(
            PolicySnapshot::select(&[], "web", "", "x", 2),
            PolicySnapshot::server_default(2)
        );
    }

    #[test]
    fn old_review_rules_documents_still_decode() {
        let old = r#"{"min_approvals":2,"allow_self_approval":false,"rejections_to_reject":1,"dismiss_stale_approvals":true}"#;
        let snapshot: PolicySnapshot = serde_json::from_str(old).expect("decodes");
        // Written before independent approvals existed: the rule it was created under stays.
        let mut expected = PolicySnapshot::server_default(2);
        expected.rules.independent_approvals = false;
        expected.rules.count_approver_once = false;
        assert_eq!(snapshot, expected);
        let round: PolicySnapshot =
            serde_json::from_str(&serde_json::to_string(&snapshot).expect("encodes"))
                .expect("decodes");
        assert_eq!(round, snapshot);
    }

    #[test]
    fn validation_names_every_bad_field() {
        let mut p = policy("bad name", "", "feature*.x");
        p.rules.requirements = vec![GroupRequirement::new(
            Principal::parse("user:bob").expect("principal"),
            0,
        )];
        p.rules.default_ttl_micros = Some(0);
        p.rules.intent_schema =
            Some(serde_json::from_str(r#"{"type": "no-such-type"}"#).expect("json"));
        let err = p.validate("policy.").expect_err("invalid");
        let DomainError::InvalidArgument(violations) = err else {
            panic!("expected InvalidArgument");
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "policy.name",
                "policy.action_key",
                "policy.requirements[0].group",
                "policy.requirements[0].min_approvals",
                "policy.default_ttl",
                "policy.intent_schema",
            ]
        );
    }

    #[test]
    fn expire_time_is_capped_by_the_default_ttl() {
        let mut snapshot = PolicySnapshot::server_default(1);
        let later = NOW.saturating_add_micros(10);
        assert_eq!(snapshot.expire_time(None, NOW), None);
        assert_eq!(snapshot.expire_time(Some(later), NOW), Some(later));
        snapshot.rules.default_ttl_micros = Some(5);
        let cap = NOW.saturating_add_micros(5);
        assert_eq!(snapshot.expire_time(None, NOW), Some(cap));
        assert_eq!(snapshot.expire_time(Some(later), NOW), Some(cap));
        let sooner = NOW.saturating_add_micros(2);
        assert_eq!(snapshot.expire_time(Some(sooner), NOW), Some(sooner));
        snapshot.rules.default_ttl_micros = Some(315_576_000_000_000_000);
        assert_eq!(snapshot.expire_time(None, NOW), Some(Timestamp::MAX));
    }

    #[test]
    fn json_pointers_become_field_paths() {
        assert_eq!(json_pointer_to_path(""), "");
        assert_eq!(json_pointer_to_path("/rollout"), ".rollout");
        assert_eq!(json_pointer_to_path("/steps/0/a~1b"), ".steps[0].a/b");
    }
}
