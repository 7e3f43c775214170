//! The one method table: every RPC of our services, the scopes that let a caller call it, and
//! whether it streams. The auth layer checks scopes from it, the limits apply to its unary
//! methods, and telemetry reads a streaming method's status from its trailers. A method
//! missing here is denied (CONTRACT.md "Who may call what").

use super::Scope;

/// One RPC, by its gRPC path.
#[derive(Debug)]
pub struct Method {
    pub path: &'static str,
    /// Any one of these lets the caller through the layer.
    pub scopes: &'static [Scope],
    /// Server-streaming: its status comes in the trailers after the last message, and it is
    /// bounded by the watch settings, not by the unary limits.
    pub streaming: bool,
    /// What it reads or writes spans every project (the relays' state: sink names are global,
    /// dead letters hold events of any project), so a credential limited to projects may not
    /// call it, whatever it names (`ALL_PROJECTS_REQUIRED`).
    pub all_projects: bool,
}

const READ: &[Scope] = &[Scope::Read];
const WRITE: &[Scope] = &[Scope::Write];
const ADMIN: &[Scope] = &[Scope::Admin];

const fn unary(path: &'static str, scopes: &'static [Scope]) -> Method {
    Method {
        path,
        scopes,
        streaming: false,
        all_projects: false,
    }
}

/// A method of the relays' state: scope `approvals:relay`, every project.
const fn relay_state(path: &'static str) -> Method {
    Method {
        all_projects: true,
        ..unary(path, &[Scope::Relay])
    }
}

pub const METHODS: &[Method] = &[
    unary("/approvals.v1.ChangeRequests/GetChangeRequest", READ),
    unary("/approvals.v1.ChangeRequests/ListChangeRequests", READ),
    unary("/approvals.v1.ChangeRequests/ListChangeRequestEvents", READ),
    Method {
        path: "/approvals.v1.ChangeRequests/WatchChangeRequests",
        scopes: READ,
        streaming: true,
        all_projects: false,
    },
    unary("/approvals.v1.ChangeRequests/CreateChangeRequest", WRITE),
    unary("/approvals.v1.ChangeRequests/UpdateChangeRequest", WRITE),
    unary("/approvals.v1.ChangeRequests/SubmitChangeRequest", WRITE),
    unary("/approvals.v1.ChangeRequests/ApproveChangeRequest", WRITE),
    unary("/approvals.v1.ChangeRequests/RejectChangeRequest", WRITE),
    unary("/approvals.v1.ChangeRequests/CancelChangeRequest", WRITE),
    unary("/approvals.v1.ChangeRequests/AddComment", WRITE),
    // Write, or bypass alone: which one a call needs depends on its bypass_justification,
    // which only the handler sees (`Caller::require` there names the one that is missing).
    unary(
        "/approvals.v1.ChangeRequests/ApplyChangeRequest",
        &[Scope::Write, Scope::Bypass],
    ),
    unary("/approvals.v1.ChangeRequests/ScheduleChangeRequest", WRITE),
    unary(
        "/approvals.v1.ChangeRequests/UnscheduleChangeRequest",
        WRITE,
    ),
    unary("/approvals.v1.ChangeRequests/CompleteChangeRequest", WRITE),
    unary("/approvals.v1.Policies/GetPolicy", READ),
    unary("/approvals.v1.Policies/ListPolicies", READ),
    unary("/approvals.v1.Policies/CreatePolicy", ADMIN),
    unary("/approvals.v1.Policies/UpdatePolicy", ADMIN),
    unary("/approvals.v1.Policies/DeletePolicy", ADMIN),
    unary("/approvals.v1.Policies/ReplayPolicy", ADMIN),
    unary("/approvals.v1.Calendars/GetCalendar", READ),
    unary("/approvals.v1.Calendars/ListCalendars", READ),
    unary("/approvals.v1.Calendars/GetCalendarState", READ),
    unary("/approvals.v1.Calendars/CreateCalendar", ADMIN),
    unary("/approvals.v1.Calendars/UpdateCalendar", ADMIN),
    unary("/approvals.v1.Calendars/DeleteCalendar", ADMIN),
    unary("/approvals.v1.Audit/GetAuditCheckpoint", READ),
    unary("/approvals.v1.Audit/GetAuditProof", READ),
    unary("/approvals.v1.Audit/GetAuditPublicKey", READ),
    unary("/approvals.v1.Audit/GetAttestation", READ),
    relay_state("/approvals.v1.RelayState/AcquireSinkLease"),
    relay_state("/approvals.v1.RelayState/ReleaseSinkLease"),
    relay_state("/approvals.v1.RelayState/CommitSinkCursor"),
    relay_state("/approvals.v1.RelayState/GetSinkState"),
    relay_state("/approvals.v1.RelayState/AddDeadLetter"),
    relay_state("/approvals.v1.RelayState/ListDeadLetters"),
    relay_state("/approvals.v1.RelayState/RetryDeadLetter"),
    relay_state("/approvals.v1.RelayState/DeleteDeadLetter"),
    relay_state("/approvals.v1.RelayState/UpdateDeadLetter"),
];

/// Services served without authentication: health checks and reflection.
pub const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The method at `path`, if it is one of ours.
pub fn method(path: &str) -> Option<&'static Method> {
    METHODS.iter().find(|method| method.path == path)
}

/// Whether `path` is one of our server-streaming methods.
pub fn is_streaming(path: &str) -> bool {
    method(path).is_some_and(|method| method.streaming)
}

/// Whether `path` is one of our unary methods (the ones request limits apply to).
pub fn is_unary(path: &str) -> bool {
    method(path).is_some_and(|method| !method.streaming)
}

/// Whether `path` belongs to a service served without authentication.
pub fn is_open(path: &str) -> bool {
    OPEN_SERVICES.iter().any(|open| path.starts_with(open))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The table and the protos agree: every RPC of `approvals.v1` is listed, with the right
    /// streaming flag, and nothing else is.
    #[test]
    fn the_table_lists_every_rpc_of_the_protos_and_nothing_else() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut rpcs = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for rpc in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), rpc.name());
                    // ChangeApplier is served by appliers, not by us.
                    if service.name() != "ChangeApplier" {
                        rpcs.push((path, rpc.server_streaming()));
                    }
                }
            }
        }
        assert!(!rpcs.is_empty());
        for (path, streaming) in &rpcs {
            let method = method(path).unwrap_or_else(|| panic!("{path} has no scopes"));
            assert_eq!(method.streaming, *streaming, "{path}");
            assert!(!method.scopes.is_empty(), "{path}");
        }
        assert_eq!(
            rpcs.len(),
            METHODS.len(),
            "the table lists a method no proto has"
        );
        assert!(method("/approvals.v1.ChangeRequests/DropEverything").is_none());
        assert!(is_streaming(
            "/approvals.v1.ChangeRequests/WatchChangeRequests"
        ));
        assert!(is_unary("/approvals.v1.ChangeRequests/GetChangeRequest"));
        assert!(!is_unary("/grpc.health.v1.Health/Check"));
        assert!(is_open("/grpc.health.v1.Health/Check"));
    }

    /// The `Scope:` line each RPC's proto comment carries (what the API reference shows)
    /// names the scopes of the table, so the documentation cannot drift from the check.
    #[test]
    fn each_rpcs_documented_scope_is_the_tables() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut checked = 0;
        for file in &set.file {
            for (si, service) in file.service.iter().enumerate() {
                for (mi, rpc) in service.method.iter().enumerate() {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), rpc.name());
                    let Some(method) = method(&path) else {
                        continue;
                    };
                    // A method's location path in its file: service (6) si, method (2) mi.
                    let wanted = [6, si as i32, 2, mi as i32];
                    let comment = file
                        .source_code_info
                        .iter()
                        .flat_map(|info| &info.location)
                        .find(|l| l.path == wanted)
                        .map(|l| l.leading_comments().to_owned())
                        .unwrap_or_default();
                    let line = comment
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("Scope:"))
                        .unwrap_or_else(|| panic!("{path}: its comment has no Scope: line"));
                    let documented: Vec<&str> = line
                        .split('`')
                        .skip(1)
                        .step_by(2)
                        .filter(|name| name.starts_with("approvals:"))
                        .collect();
                    let table: Vec<&str> = method.scopes.iter().map(|s| s.as_str()).collect();
                    assert_eq!(documented, table, "{path}: the comment says {line:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, METHODS.len());
    }
}
