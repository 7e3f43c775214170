//! Policy changes under four eyes: a change request on project `_policies` with action
//! `policy.update` (each change's payload is the new policy, in its proto JSON form, replacing
//! every writable field of the policy its `resource_id` names) or `policy.delete` (each change
//! names a policy to delete). Its changes are checked when the request is created, so a bad
//! policy is refused then; the service applies the request itself once it is APPROVED.

use approvals_domain::{
    ChangeRequest, DomainError, Policy, Timestamp,
    governance::{ACTION_DELETE, ACTION_UPDATE, POLICIES_PROJECT, RESOURCE_TYPE},
    validation::Violations,
};
use approvals_store::PolicyEdit;
use serde_json::{Map, Value};

use super::{Context, policies::validate_into};
use crate::{
    auth::Caller,
    client::json,
    convert::policy::{self, WRITABLE_PATHS},
    error::ApiError,
    pb,
};

/// One change of a `_policies` request.
pub enum PolicyChange {
    /// Replace the writable fields of the named policy with those of `body`.
    Update {
        name: String,
        body: Box<pb::Policy>,
    },
    Delete {
        name: String,
    },
}

/// What a change names: its resource type, its resource id (the policy) and its payload.
pub struct Named<'a> {
    pub resource_type: &'a str,
    pub resource_id: &'a str,
    pub payload: &'a Map<String, Value>,
}

/// Parses the changes of a `_policies` request, refusing (INVALID_ARGUMENT, each field named)
/// another action key, another resource type, a policy named twice, and a payload that is not
/// a valid policy.
pub fn parse(
    action_key: &str,
    changes: &[Named<'_>],
    context: &Context,
) -> Result<Vec<PolicyChange>, ApiError> {
    if action_key != ACTION_UPDATE && action_key != ACTION_DELETE {
        return Err(ApiError::invalid(
            "action_key",
            format!(
                "a change request on project {POLICIES_PROJECT} must have action_key {ACTION_UPDATE} or {ACTION_DELETE}"
            ),
        ));
    }
    let mut v = Violations::default();
    let mut out = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let at = format!("changes[{i}]");
        if change.resource_type != RESOURCE_TYPE {
            v.add(
                format!("{at}.resource_type"),
                format!("must be {RESOURCE_TYPE:?} on project {POLICIES_PROJECT}"),
            );
        }
        let name = change.resource_id.to_owned();
        if changes[..i].iter().any(|c| c.resource_id == name) {
            v.add(
                format!("{at}.resource_id"),
                format!("policy {name:?} is named by an earlier change"),
            );
        }
        if action_key == ACTION_DELETE {
            out.push(PolicyChange::Delete { name });
            continue;
        }
        let body = match json::from_json::<pb::Policy>(
            Value::Object(change.payload.clone()),
            "approvals.v1.Policy",
        ) {
            Ok(body) => body,
            Err(err) => {
                v.add(
                    format!("{at}.payload"),
                    format!("is not an approvals.v1.Policy in proto JSON: {err}"),
                );
                continue;
            }
        };
        if !body.name.is_empty() && body.name != name {
            v.add(
                format!("{at}.payload.name"),
                format!("must be empty or the resource_id {name:?}"),
            );
        }
        let mut checked = Violations::default();
        let mut draft = policy::new_policy(
            &body,
            String::new(),
            Timestamp::from_micros(0),
            &mut checked,
        );
        draft.name = name.clone();
        check_endpoint(context, &draft, &mut checked);
        if let Err(DomainError::InvalidArgument(list)) = validate_into(&draft, checked) {
            for violation in list {
                let field = violation
                    .field
                    .strip_prefix("policy.")
                    .unwrap_or(&violation.field);
                v.add(format!("{at}.payload.{field}"), violation.description);
            }
        }
        out.push(PolicyChange::Update {
            name,
            body: Box::new(body),
        });
    }
    v.into_result()?;
    Ok(out)
}

fn check_endpoint(context: &Context, policy: &Policy, v: &mut Violations) {
    let endpoint = &policy.rules.applier_endpoint;
    if endpoint.is_empty() || endpoint.chars().any(char::is_control) {
        return;
    }
    if let Err(refusal) = context.allowed_endpoints.check(endpoint) {
        v.add("policy.applier_endpoint", format!("{endpoint:?} {refusal}"));
    }
}

/// The changes of a stored request, as [`parse`] reads them.
fn named(request: &ChangeRequest) -> Vec<Named<'_>> {
    request
        .changes
        .iter()
        .map(|c| Named {
            resource_type: &c.resource_type,
            resource_id: &c.resource_id,
            payload: &c.payload,
        })
        .collect()
}

/// Checks the changes of a new `_policies` request: valid policies, and for an update or a
/// delete, a policy that exists (POLICY_NOT_FOUND otherwise).
/// The caller must be allowed the project of each policy, before and after the change.
pub async fn check_new(
    context: &Context,
    caller: &Caller,
    action_key: &str,
    changes: &[Named<'_>],
) -> Result<(), ApiError> {
    for change in parse(action_key, changes, context)? {
        let name = match &change {
            PolicyChange::Update { name, body } => {
                caller.ensure_project(&body.project)?;
                name
            }
            PolicyChange::Delete { name } => name,
        };
        let current = context.store.get_policy(name).await?;
        caller.ensure_sees_policy(&current)?;
    }
    Ok(())
}

/// Applies an APPROVED `_policies` request: its policy changes (the protected rule does not
/// apply: this is the four-eyes path) and APPROVED -> APPLIED by `system:approvals`, in one
/// transaction. A change that fails (the policy was deleted meanwhile, its new (project,
/// environment, action_key) is taken) is returned, and leaves every policy as it was and the
/// request APPROVED.
pub async fn apply(context: &Context, request: &ChangeRequest) -> Result<ChangeRequest, ApiError> {
    let changes = parse(&request.action_key, &named(request), context)?;
    let now = context.clock.now();
    let mut applied = Vec::new();
    let mut edits = Vec::new();
    for change in changes {
        match change {
            PolicyChange::Update { name, body } => {
                applied.push(format!("updated {name}"));
                let edit = move |current: &mut Policy| {
                    let mut v = Violations::default();
                    for path in WRITABLE_PATHS {
                        policy::set_field(current, &body, path, &mut v);
                    }
                    validate_into(current, v)?;
                    current.update_time = now;
                    Ok::<(), DomainError>(())
                };
                edits.push(PolicyEdit::Update {
                    name,
                    edit: Box::new(edit),
                });
            }
            PolicyChange::Delete { name } => {
                applied.push(format!("deleted {name}"));
                edits.push(PolicyEdit::Delete { name });
            }
        }
    }
    let detail = applied.join(", ");
    // The edits and the APPLIED event in one transaction: all of them, or none.
    Ok(context
        .store
        .apply_policy_edits(&request.id, edits, |r| r.applied_by_service(now, detail))
        .await?)
}
