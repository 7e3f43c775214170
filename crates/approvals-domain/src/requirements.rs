//! The second step of policies: sequential approval levels, justifications, and reviewer
//! diversity (distinct groups, anti-collusion), with the rule for overlapping groups.
//!
//! # Overlapping groups
//!
//! Under `count_approver_once` (the default of new policies), an approver who holds several
//! required groups counts **once**, toward the requirement that needs them: the requirements
//! are met when the approvals can be *assigned* to them, each approval to at most one
//! requirement, every requirement getting its `min_approvals`. The assignment is searched as a
//! bipartite matching (augmenting paths), so the outcome depends only on the set of approvals,
//! never on their order, and adding an approval never un-meets a requirement: one reviewer in
//! two required groups can never block the request by having been "used up" on the wrong one.
//! Policies written before the rule existed keep the earlier one (an approver counts once for
//! each requirement whose group they hold).
//!
//! `distinct_groups` N asks for approvals from N distinct groups, each approver standing for at
//! most one of their groups (the same matching, every group taking one approver).

use serde::{Deserialize, Serialize};

use crate::{GroupRequirement, Principal, PrincipalKind, validation::Violations};

/// Longest `justification.ticket_pattern`, in bytes.
pub const MAX_TICKET_PATTERN_BYTES: usize = 1024;
/// Most levels a policy may have.
pub const MAX_LEVELS: usize = 10;
/// Compiled size limit of a ticket pattern (regex crate), bounding its matching cost.
const TICKET_PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// One approval level: asked only after every earlier level passed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Level {
    /// Distinct approvals this level needs; at least 1.
    pub min_approvals: u32,
    /// Who may approve at this level (besides the policy's own `approvers`, which gate every
    /// level). Empty: anyone the policy allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<Principal>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<GroupRequirement>,
    /// Approvals from at least this many distinct groups; 0: no such rule.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub distinct_groups: u32,
    /// A CEL condition: the level is asked only of requests it matches. Empty: always.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a policy asks of the texts callers write.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JustificationRule {
    /// CreateChangeRequest must carry a `justification`.
    #[serde(default)]
    pub required_on_create: bool,
    /// A regular expression (Rust `regex` syntax) the justification must contain a match of,
    /// e.g. `[A-Z]+-[0-9]+` for a ticket. Empty: any text. Setting it implies
    /// `required_on_create`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ticket_pattern: String,
    /// ApproveChangeRequest must carry a `comment`.
    #[serde(default)]
    pub comment_on_approve: bool,
    /// RejectChangeRequest must carry a `comment`.
    #[serde(default)]
    pub comment_on_reject: bool,
}

impl JustificationRule {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    fn pattern(&self) -> Result<Option<regex::Regex>, regex::Error> {
        if self.ticket_pattern.is_empty() {
            return Ok(None);
        }
        regex::RegexBuilder::new(&self.ticket_pattern)
            .size_limit(TICKET_PATTERN_SIZE_LIMIT)
            .build()
            .map(Some)
    }

    /// Why `justification` does not satisfy the rule of policy `policy`, if it does not.
    pub fn refusal(&self, policy: &str, justification: &str) -> Option<String> {
        let required = self.required_on_create || !self.ticket_pattern.is_empty();
        if required && justification.trim().is_empty() {
            return Some(format!("is required by policy {policy:?}"));
        }
        match self.pattern() {
            Ok(Some(pattern)) if !pattern.is_match(justification) => Some(format!(
                "must reference a ticket: policy {policy:?} asks for a match of {:?}",
                self.ticket_pattern
            )),
            // Compiled when the policy was written; only a hand-edited database gets here.
            Err(err) => Some(format!(
                "cannot be checked: the ticket pattern of policy {policy:?} does not compile: {err}"
            )),
            _ => None,
        }
    }
}

/// Anti-collusion: X may not approve Y's request when Y approved a request of X within
/// `window` before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AntiCollusion {
    pub window_micros: i64,
}

/// A review of another request that makes an approval collusive (found by the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReciprocalApproval {
    /// The request of the would-be approver that the requester approved.
    pub change_request_id: String,
    pub approve_time: crate::Timestamp,
}

/// One level's progress, as shown on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelProgress {
    /// 1-based.
    pub level: u32,
    pub approval_count: u32,
    pub min_approvals: u32,
    pub passed: bool,
}

/// Whether the approvers (each given as the groups they held) meet `requirements` and
/// `distinct_groups`. `count_once`: the overlapping-groups rule of the module documentation;
/// else the earlier rule (each approver counts for every requirement they hold the group of).
pub fn groups_met(
    requirements: &[GroupRequirement],
    distinct_groups: u32,
    approvers: &[&[String]],
    count_once: bool,
) -> bool {
    let requirements_met = if count_once {
        let slots: Vec<(&str, u32)> = requirements
            .iter()
            .map(|r| (r.group_name(), r.min_approvals))
            .collect();
        assignable(&slots, approvers)
    } else {
        requirements.iter().all(|r| {
            let holders = approvers
                .iter()
                .filter(|groups| groups.iter().any(|g| g == r.group_name()))
                .count();
            u32::try_from(holders).unwrap_or(u32::MAX) >= r.min_approvals
        })
    };
    requirements_met && (distinct_groups == 0 || distinct_group_count(approvers) >= distinct_groups)
}

/// The most distinct groups the approvers stand for, each standing for one of theirs.
pub fn distinct_group_count(approvers: &[&[String]]) -> u32 {
    let mut groups: Vec<&str> = approvers
        .iter()
        .flat_map(|g| g.iter().map(String::as_str))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let slots: Vec<(&str, u32)> = groups.iter().map(|g| (*g, 1)).collect();
    u32::try_from(matching(&slots, approvers)).unwrap_or(u32::MAX)
}

/// Whether every slot `(group, n)` can get `n` approvers holding `group`, each approver going
/// to at most one slot.
pub fn assignable(slots: &[(&str, u32)], approvers: &[&[String]]) -> bool {
    let needed: u64 = slots.iter().map(|(_, n)| u64::from(*n)).sum();
    if needed > approvers.len() as u64 {
        return false;
    }
    matching(slots, approvers) as u64 == needed
}

/// The size of a maximum assignment of approvers to slot units (Kuhn's augmenting paths).
/// Slot units are bounded by the approvers' number, so the work is O(approvers^2 * groups).
fn matching(slots: &[(&str, u32)], approvers: &[&[String]]) -> usize {
    // One unit per required approval, never more units per slot than approvers exist.
    let units: Vec<&str> = slots
        .iter()
        .flat_map(|(group, n)| {
            let n = usize::try_from(*n)
                .unwrap_or(usize::MAX)
                .min(approvers.len());
            std::iter::repeat_n(*group, n)
        })
        .collect();
    let mut owner: Vec<Option<usize>> = vec![None; units.len()];
    let mut matched = 0;
    for approver in 0..approvers.len() {
        let mut seen = vec![false; units.len()];
        if augment(approver, approvers, &units, &mut owner, &mut seen) {
            matched += 1;
        }
    }
    matched
}

fn augment(
    approver: usize,
    approvers: &[&[String]],
    units: &[&str],
    owner: &mut [Option<usize>],
    seen: &mut [bool],
) -> bool {
    for unit in 0..units.len() {
        if seen[unit] || !approvers[approver].iter().any(|g| g == units[unit]) {
            continue;
        }
        seen[unit] = true;
        let free = match owner[unit] {
            None => true,
            Some(other) => augment(other, approvers, units, owner, seen),
        };
        if free {
            owner[unit] = Some(approver);
            return true;
        }
    }
    false
}

fn validate_requirement_list(
    v: &mut Violations,
    field: &dyn Fn(&str) -> String,
    requirements: &[GroupRequirement],
) {
    let mut seen = Vec::new();
    for (i, requirement) in requirements.iter().enumerate() {
        if requirement.group.kind() != PrincipalKind::Group {
            v.add(
                field(&format!("requirements[{i}].group")),
                format!(
                    "{:?} is not a group: write group:NAME",
                    requirement.group.as_str()
                ),
            );
        }
        if requirement.min_approvals < 1 {
            v.add(
                field(&format!("requirements[{i}].min_approvals")),
                "must be at least 1",
            );
        }
        if seen.contains(&requirement.group) {
            v.add(
                field(&format!("requirements[{i}].group")),
                format!("{} has a requirement already", requirement.group),
            );
        }
        seen.push(requirement.group.clone());
        check_condition(
            v,
            &field(&format!("requirements[{i}].condition")),
            &requirement.condition,
        );
    }
}

fn check_condition(v: &mut Violations, field: &str, source: &str) {
    if !source.is_empty()
        && let Err(err) = crate::condition::check(source)
    {
        v.add(field, err);
    }
}

/// Checks a policy's requirements (`prefix` names the policy message, `policy.`).
pub(crate) fn validate_requirements(
    v: &mut Violations,
    prefix: &str,
    requirements: &[GroupRequirement],
) {
    validate_requirement_list(v, &|name| format!("{prefix}{name}"), requirements);
}

/// Checks the second-step fields of a policy.
pub(crate) fn validate(v: &mut Violations, prefix: &str, rules: &crate::PolicyRules) {
    let field = |name: &str| format!("{prefix}{name}");
    if rules.levels.len() > MAX_LEVELS {
        v.add(
            field("levels"),
            format!("at most {MAX_LEVELS} levels (got {})", rules.levels.len()),
        );
    }
    if !rules.levels.is_empty() {
        if rules.min_approvals != 0 {
            v.add(
                field("min_approvals"),
                "must be 0 (unset) when the policy has levels: each level sets its own",
            );
        }
        if !rules.requirements.is_empty() {
            v.add(
                field("requirements"),
                "must be empty when the policy has levels: each level sets its own",
            );
        }
        if rules.distinct_groups != 0 {
            v.add(
                field("distinct_groups"),
                "must be 0 when the policy has levels: each level sets its own",
            );
        }
    }
    for (i, level) in rules.levels.iter().enumerate() {
        let level_field = |name: &str| format!("{prefix}levels[{i}].{name}");
        if level.min_approvals < 1 {
            v.add(level_field("min_approvals"), "must be at least 1");
        }
        for (j, approver) in level.approvers.iter().enumerate() {
            if approver.kind() == PrincipalKind::System {
                v.add(
                    level_field(&format!("approvers[{j}]")),
                    "must be user:NAME, service:NAME or group:NAME",
                );
            }
        }
        validate_requirement_list(v, &level_field, &level.requirements);
        check_condition(v, &level_field("condition"), &level.condition);
    }
    check_condition(v, &field("condition"), &rules.condition);
    let rule = &rules.justification;
    if rule.ticket_pattern.len() > MAX_TICKET_PATTERN_BYTES {
        v.add(
            field("justification.ticket_pattern"),
            format!("is longer than {MAX_TICKET_PATTERN_BYTES} bytes"),
        );
    } else if v.no_nul(&field("justification.ticket_pattern"), &rule.ticket_pattern)
        && let Err(err) = rule.pattern()
    {
        v.add(
            field("justification.ticket_pattern"),
            format!("is not a valid regular expression: {err}"),
        );
    }
    if let Some(anti) = rules.anti_collusion
        && anti.window_micros <= 0
    {
        v.add(field("anti_collusion.window"), "must be positive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(list: &[&[&str]]) -> Vec<Vec<String>> {
        list.iter()
            .map(|g| g.iter().map(|s| (*s).to_owned()).collect())
            .collect()
    }

    fn refs(list: &[Vec<String>]) -> Vec<&[String]> {
        list.iter().map(Vec::as_slice).collect()
    }

    fn requirement(group: &str, n: u32) -> GroupRequirement {
        GroupRequirement::new(
            Principal::parse(&format!("group:{group}")).expect("group"),
            n,
        )
    }

    #[test]
    fn one_reviewer_in_two_groups_counts_once_toward_the_one_that_needs_it() {
        let reqs = [requirement("sre", 1), requirement("sec", 1)];
        // alice holds both; alone she meets only one requirement.
        let alice = groups(&[&["sre", "sec"]]);
        assert!(!groups_met(&reqs, 0, &refs(&alice), true));
        // The earlier rule let her meet both.
        assert!(groups_met(&reqs, 0, &refs(&alice), false));
        // bob holds sre only: alice moves to sec, whatever the order.
        let both = groups(&[&["sre", "sec"], &["sre"]]);
        assert!(groups_met(&reqs, 0, &refs(&both), true));
        let reversed = groups(&[&["sre"], &["sre", "sec"]]);
        assert!(groups_met(&reqs, 0, &refs(&reversed), true));
    }

    #[test]
    fn distinct_groups_count_each_approver_once() {
        let two = groups(&[&["sre", "sec"], &["sre"]]);
        assert_eq!(distinct_group_count(&refs(&two)), 2);
        let same = groups(&[&["sre"], &["sre"]]);
        assert_eq!(distinct_group_count(&refs(&same)), 1);
        assert!(!groups_met(&[], 2, &refs(&same), true));
        assert!(groups_met(&[], 2, &refs(&two), true));
    }

    #[test]
    fn huge_minimums_are_unmet_without_work() {
        let one = groups(&[&["sre"]]);
        assert!(!assignable(&[("sre", u32::MAX)], &refs(&one)));
    }

    #[test]
    fn justification_rules() {
        let rule = JustificationRule {
            ticket_pattern: "[A-Z]+-[0-9]+".into(),
            ..JustificationRule::default()
        };
        assert!(rule.refusal("p", "").is_some());
        assert!(rule.refusal("p", "because").is_some());
        assert_eq!(rule.refusal("p", "fixes OPS-12"), None);
        assert_eq!(JustificationRule::default().refusal("p", ""), None);
    }
}
