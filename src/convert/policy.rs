//! Conversions between `approvals.v1.Policy` and the domain's policies and snapshots.

use approvals_domain::{
    AntiCollusion, ApplyMode, AutomaticReview, Decision, GroupRequirement, JustificationRule,
    Level, Policy, PolicyMode, PolicyRules, PolicySnapshot, Principal, Risk, RiskRule, Timestamp,
    parse_policy_principal, validation::Violations,
};

use super::{from_struct, timestamp, to_struct};
use crate::pb;

/// The fields of a policy a caller may set (all but `name` and the output-only ones).
pub const WRITABLE_PATHS: [&str; 30] = [
    "project",
    "environment",
    "action_key",
    "min_approvals",
    "approvers",
    "requirements",
    "allow_self_approval",
    "rejections_to_reject",
    "default_ttl",
    "apply_mode",
    "dismiss_stale_approvals",
    "intent_schema",
    "applier_endpoint",
    "appliers",
    "executors",
    "forbid_bypass",
    "independent_approvals",
    "levels",
    "justification",
    "distinct_groups",
    "anti_collusion",
    "count_approver_once",
    "condition",
    "risk_rules",
    "pre_approved",
    "automatic_reviews",
    "protected",
    "mode",
    "calendars",
    "apply_delay",
];

fn apply_mode(mode: ApplyMode) -> pb::ApplyMode {
    match mode {
        ApplyMode::Unspecified => pb::ApplyMode::Unspecified,
        ApplyMode::Auto => pb::ApplyMode::Auto,
        ApplyMode::Manual => pb::ApplyMode::Manual,
        ApplyMode::External => pb::ApplyMode::External,
    }
}

fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

fn strings(principals: &[Principal]) -> Vec<String> {
    principals.iter().map(ToString::to_string).collect()
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn group_requirements(list: &[GroupRequirement]) -> Vec<pb::GroupRequirement> {
    list.iter()
        .map(|r| pb::GroupRequirement {
            group: r.group.to_string(),
            min_approvals: to_i32(r.min_approvals),
            condition: r.condition.clone(),
            escalate_after: r.escalate_after_micros.map(duration),
            escalate_to: strings(&r.escalate_to),
        })
        .collect()
}

fn rules_into(rules: &PolicyRules, out: &mut pb::Policy) {
    out.min_approvals = to_i32(rules.min_approvals);
    out.approvers = strings(&rules.approvers);
    out.requirements = group_requirements(&rules.requirements);
    out.levels = rules
        .levels
        .iter()
        .map(|l| pb::ApprovalLevel {
            min_approvals: to_i32(l.min_approvals),
            approvers: strings(&l.approvers),
            requirements: group_requirements(&l.requirements),
            distinct_groups: to_i32(l.distinct_groups),
            condition: l.condition.clone(),
        })
        .collect();
    let j = &rules.justification;
    out.justification = (!j.is_empty()).then(|| pb::JustificationRequirement {
        required_on_create: j.required_on_create,
        ticket_pattern: j.ticket_pattern.clone(),
        comment_on_approve: j.comment_on_approve,
        comment_on_reject: j.comment_on_reject,
    });
    out.distinct_groups = to_i32(rules.distinct_groups);
    out.anti_collusion = rules.anti_collusion.map(|a| pb::AntiCollusion {
        window: Some(duration(a.window_micros)),
    });
    out.count_approver_once = Some(rules.count_approver_once);
    out.condition = rules.condition.clone();
    out.risk_rules = rules
        .risk_rules
        .iter()
        .map(|r| pb::RiskRule {
            condition: r.condition.clone(),
            risk: super::risk(r.risk).into(),
        })
        .collect();
    out.pre_approved = rules.pre_approved;
    out.automatic_reviews = rules
        .automatic_reviews
        .iter()
        .map(|r| pb::AutomaticReview {
            condition: r.condition.clone(),
            decision: match r.decision {
                Decision::Approve => pb::Decision::Approve,
                Decision::Reject => pb::Decision::Reject,
            }
            .into(),
            reason: r.reason.clone(),
            group: r
                .group
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        })
        .collect();
    out.allow_self_approval = rules.allow_self_approval;
    out.rejections_to_reject = to_i32(rules.rejections_to_reject);
    out.default_ttl = rules.default_ttl_micros.map(duration);
    out.apply_mode = apply_mode(rules.apply_mode).into();
    out.dismiss_stale_approvals = Some(rules.dismiss_stale_approvals);
    out.intent_schema = rules.intent_schema.as_ref().map(to_struct);
    out.applier_endpoint = rules.applier_endpoint.clone();
    out.appliers = strings(&rules.appliers);
    out.executors = strings(&rules.executors);
    out.forbid_bypass = rules.forbid_bypass;
    out.independent_approvals = Some(rules.independent_approvals);
    out.protected = rules.protected;
    out.calendars = rules.calendars.clone();
    out.apply_delay = rules.apply_delay_micros.map(duration);
    out.mode = match rules.mode {
        PolicyMode::Unspecified => pb::PolicyMode::Unspecified,
        PolicyMode::Enforce => pb::PolicyMode::Enforce,
        PolicyMode::Shadow => pb::PolicyMode::Shadow,
    }
    .into();
}

pub fn policy(p: &Policy) -> pb::Policy {
    let mut out = pb::Policy {
        name: p.name.clone(),
        uid: p.uid.clone(),
        project: p.project.clone(),
        environment: p.environment.clone(),
        action_key: p.action_key.clone(),
        etag: p.etag(),
        create_time: Some(timestamp(p.create_time)),
        update_time: Some(timestamp(p.update_time)),
        ..Default::default()
    };
    rules_into(&p.rules, &mut out);
    out
}

/// A request's frozen rules, as a `Policy` (empty name: the server default).
pub fn snapshot(s: &PolicySnapshot) -> pb::Policy {
    let mut out = pb::Policy {
        name: s.name.clone(),
        uid: s.uid.clone(),
        project: s.project.clone(),
        environment: s.environment.clone(),
        action_key: s.action_key.clone(),
        ..Default::default()
    };
    rules_into(&s.rules, &mut out);
    out.matched_conditions = s.matched_conditions.clone();
    out.condition_errors = s.condition_errors.clone();
    out
}

/// A new policy from a create request, with every writable field read; `uid` is the new
/// policy's own (the caller's is output only, ignored).
pub fn new_policy(body: &pb::Policy, uid: String, now: Timestamp, v: &mut Violations) -> Policy {
    let mut policy = Policy {
        name: body.name.clone(),
        uid,
        project: String::new(),
        environment: String::new(),
        action_key: String::new(),
        rules: PolicyRules::default(),
        create_time: now,
        update_time: now,
        revision: 0,
    };
    for path in WRITABLE_PATHS {
        set_field(&mut policy, body, path, v);
    }
    policy
}

fn principals(field: &str, list: &[String], v: &mut Violations) -> Vec<Principal> {
    list.iter()
        .enumerate()
        .filter_map(
            |(i, text)| match parse_policy_principal(&format!("{field}[{i}]"), text) {
                Ok(p) => Some(p),
                Err(violation) => {
                    v.add(violation.field, violation.description);
                    None
                }
            },
        )
        .collect()
}

fn requirements(
    field: &str,
    list: &[pb::GroupRequirement],
    v: &mut Violations,
) -> Vec<GroupRequirement> {
    list.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let group = match parse_policy_principal(&format!("{field}[{i}].group"), &r.group) {
                Ok(group) => group,
                Err(violation) => {
                    v.add(violation.field, violation.description);
                    return None;
                }
            };
            let escalate_after_micros = r.escalate_after.as_ref().map(|d| {
                approvals_domain::duration_micros(d.seconds, d.nanos).unwrap_or_else(|| {
                    v.add(
                        format!("{field}[{i}].escalate_after"),
                        approvals_domain::DURATION_RANGE,
                    );
                    1
                })
            });
            Some(GroupRequirement {
                group,
                min_approvals: count(&format!("{field}[{i}].min_approvals"), r.min_approvals, v),
                condition: r.condition.clone(),
                escalate_after_micros,
                escalate_to: principals(&format!("{field}[{i}].escalate_to"), &r.escalate_to, v),
            })
        })
        .collect()
}

fn count(field: &str, n: i32, v: &mut Violations) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| {
        v.add(field, "must not be negative");
        0
    })
}

/// Copies one writable field, named as in an update mask, from `body` into `policy`. Returns
/// false for a path that is not a writable field.
pub fn set_field(policy: &mut Policy, body: &pb::Policy, path: &str, v: &mut Violations) -> bool {
    let field = format!("policy.{path}");
    let rules = &mut policy.rules;
    match path {
        "project" => policy.project = body.project.clone(),
        "environment" => policy.environment = body.environment.clone(),
        "action_key" => policy.action_key = body.action_key.clone(),
        "min_approvals" => rules.min_approvals = count(&field, body.min_approvals, v),
        "approvers" => rules.approvers = principals(&field, &body.approvers, v),
        "requirements" => rules.requirements = requirements(&field, &body.requirements, v),
        "levels" => {
            rules.levels = body
                .levels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let at = format!("{field}[{i}]");
                    Level {
                        min_approvals: count(&format!("{at}.min_approvals"), l.min_approvals, v),
                        approvers: principals(&format!("{at}.approvers"), &l.approvers, v),
                        requirements: requirements(
                            &format!("{at}.requirements"),
                            &l.requirements,
                            v,
                        ),
                        distinct_groups: count(
                            &format!("{at}.distinct_groups"),
                            l.distinct_groups,
                            v,
                        ),
                        condition: l.condition.clone(),
                    }
                })
                .collect();
        }
        "justification" => {
            rules.justification = body
                .justification
                .as_ref()
                .map(|j| JustificationRule {
                    required_on_create: j.required_on_create,
                    ticket_pattern: j.ticket_pattern.clone(),
                    comment_on_approve: j.comment_on_approve,
                    comment_on_reject: j.comment_on_reject,
                })
                .unwrap_or_default();
        }
        "distinct_groups" => rules.distinct_groups = count(&field, body.distinct_groups, v),
        "anti_collusion" => {
            rules.anti_collusion = body.anti_collusion.as_ref().map(|a| {
                let window_field = format!("{field}.window");
                let window_micros = match &a.window {
                    None => {
                        v.add(window_field, "is required");
                        // Refused already; not named twice ("must be positive").
                        1
                    }
                    Some(d) => approvals_domain::duration_micros(d.seconds, d.nanos)
                        .unwrap_or_else(|| {
                            v.add(window_field, approvals_domain::DURATION_RANGE);
                            1
                        }),
                };
                AntiCollusion { window_micros }
            });
        }
        "condition" => rules.condition = body.condition.clone(),
        "risk_rules" => {
            rules.risk_rules =
                body.risk_rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| RiskRule {
                        condition: r.condition.clone(),
                        risk: super::from_risk(&format!("{field}[{i}].risk"), r.risk)
                            .unwrap_or_else(|_| {
                                v.add(
                                    format!("{field}[{i}].risk"),
                                    format!("{} is not a risk (RISK_LOW .. RISK_HIGH)", r.risk),
                                );
                                // Refused already; not named twice.
                                Risk::High
                            }),
                    })
                    .collect();
        }
        "pre_approved" => rules.pre_approved = body.pre_approved,
        "automatic_reviews" => {
            rules.automatic_reviews = body
                .automatic_reviews
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let at = format!("{field}[{i}]");
                    let decision = match pb::Decision::try_from(r.decision) {
                        Ok(pb::Decision::Approve) => Decision::Approve,
                        Ok(pb::Decision::Reject) => Decision::Reject,
                        _ => {
                            v.add(
                                format!("{at}.decision"),
                                "must be DECISION_APPROVE or DECISION_REJECT",
                            );
                            Decision::Reject
                        }
                    };
                    let group = if r.group.is_empty() {
                        None
                    } else {
                        match parse_policy_principal(&format!("{at}.group"), &r.group) {
                            Ok(group) => Some(group),
                            Err(violation) => {
                                v.add(violation.field, violation.description);
                                None
                            }
                        }
                    };
                    AutomaticReview {
                        condition: r.condition.clone(),
                        decision,
                        reason: r.reason.clone(),
                        group,
                    }
                })
                .collect();
        }
        "protected" => rules.protected = body.protected,
        "calendars" => {
            for (i, name) in body.calendars.iter().enumerate() {
                let at = format!("{field}[{i}]");
                if name.trim().is_empty() {
                    v.add(at, "must name a calendar");
                } else if body.calendars[..i].contains(name) {
                    v.add(at, format!("lists calendar {name:?} twice"));
                } else {
                    v.no_nul(&at, name);
                }
            }
            rules.calendars = body.calendars.clone();
        }
        "apply_delay" => {
            rules.apply_delay_micros = match &body.apply_delay {
                None => None,
                Some(d) => match approvals_domain::duration_micros(d.seconds, d.nanos) {
                    Some(micros) if micros < 0 => {
                        v.add(field.as_str(), "must not be negative");
                        None
                    }
                    Some(micros) => Some(micros),
                    None => {
                        v.add(field.as_str(), approvals_domain::DURATION_RANGE);
                        None
                    }
                },
            };
        }
        "mode" => {
            rules.mode = match pb::PolicyMode::try_from(body.mode) {
                Ok(pb::PolicyMode::Unspecified) => PolicyMode::Unspecified,
                Ok(pb::PolicyMode::Enforce) => PolicyMode::Enforce,
                Ok(pb::PolicyMode::Shadow) => PolicyMode::Shadow,
                Err(_) => {
                    v.add(field.as_str(), format!("{} is not a PolicyMode", body.mode));
                    PolicyMode::Unspecified
                }
            };
        }
        "count_approver_once" => {
            rules.count_approver_once = body.count_approver_once.unwrap_or(true);
        }
        "allow_self_approval" => rules.allow_self_approval = body.allow_self_approval,
        "rejections_to_reject" => {
            rules.rejections_to_reject = count(&field, body.rejections_to_reject, v).max(1);
        }
        "default_ttl" => {
            rules.default_ttl_micros = match &body.default_ttl {
                None => None,
                Some(d) => {
                    let micros = approvals_domain::duration_micros(d.seconds, d.nanos);
                    if micros.is_none() {
                        v.add(field.as_str(), approvals_domain::DURATION_RANGE);
                    }
                    micros
                }
            };
        }
        "apply_mode" => {
            rules.apply_mode = match pb::ApplyMode::try_from(body.apply_mode) {
                Ok(pb::ApplyMode::Unspecified) => ApplyMode::Unspecified,
                Ok(pb::ApplyMode::Auto) => ApplyMode::Auto,
                Ok(pb::ApplyMode::Manual) => ApplyMode::Manual,
                Ok(pb::ApplyMode::External) => ApplyMode::External,
                Err(_) => {
                    v.add(
                        field.as_str(),
                        format!("{} is not an ApplyMode", body.apply_mode),
                    );
                    ApplyMode::Unspecified
                }
            };
        }
        "dismiss_stale_approvals" => {
            rules.dismiss_stale_approvals = body.dismiss_stale_approvals.unwrap_or(true);
        }
        "intent_schema" => {
            rules.intent_schema = body
                .intent_schema
                .as_ref()
                .map(|s| from_struct(&field, s, v));
        }
        "applier_endpoint" => rules.applier_endpoint = body.applier_endpoint.clone(),
        "appliers" => rules.appliers = principals(&field, &body.appliers, v),
        "executors" => rules.executors = principals(&field, &body.executors, v),
        "forbid_bypass" => rules.forbid_bypass = body.forbid_bypass,
        "independent_approvals" => {
            rules.independent_approvals = body.independent_approvals.unwrap_or(true);
        }
        _ => return false,
    }
    true
}
