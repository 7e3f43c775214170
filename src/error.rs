//! Every error the service returns, mapped to a `tonic::Status` in one place (AIP-193): a
//! canonical code, a message naming the field or state, `google.rpc.ErrorInfo` with a stable
//! reason, and `BadRequest` field violations for bad input.

use std::collections::HashMap;

use approvals_domain::{DomainError, FieldViolation};
use approvals_store::StoreError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `google.rpc.ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "approvals";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Unauthenticated(String),
    #[error(
        "start_revision {requested} is older than the watch history allows; the oldest revision a watch may start from is {oldest}: list the change requests, then watch from the list's revision"
    )]
    RevisionTooOld { requested: i64, oldest: i64 },
    #[error(
        "the watcher fell more than {max_lag} events behind; resume with start_revision {resume}"
    )]
    WatcherTooSlow { max_lag: i64, resume: i64 },
    #[error("too many watch streams ({max}); retry later")]
    TooManyWatchers { max: usize },
    #[error(
        "too many watch streams for {principal}: at most {max} per principal (watch.max_watchers_per_principal); end one or retry later"
    )]
    TooManyWatchersForPrincipal { principal: String, max: usize },
    #[error("{}", credentials_expired_message(*resume))]
    CredentialsExpired { resume: Option<i64> },
    #[error("the server is shutting down; resume with start_revision {resume}")]
    ShuttingDown { resume: i64 },
    #[error("{0}")]
    CredentialsMissing(String),
    #[error("{0}")]
    CredentialsInvalid(String),
    /// A verified client certificate that no `[[auth.client_certs]]` entry matches.
    #[error("{0}")]
    ClientCertificateNotMapped(String),
    #[error("{method} needs the scope {scope}, which the caller does not hold")]
    MissingScope { scope: &'static str, method: String },
    #[error(
        "{method} spans every project, and the caller's credential is limited to some projects"
    )]
    AllProjectsRequired { method: String },
    #[error("{0} is not a method this service authorises")]
    MethodNotAllowed(String),
    #[error("{0}")]
    ActAsNotAllowed(String),
    #[error(
        "the server has no audit signing key (audit.signing_key_file): it writes no checkpoints"
    )]
    AuditNotConfigured,
    #[error("{}", match revision { 0 => "no audit checkpoint has been written yet".to_owned(), r => format!("no audit checkpoint at revision {r}") })]
    AuditCheckpointNotFound { revision: i64 },
    #[error(
        "change request {id} has no hashed event at or below revision {revision}, the checkpoint's: ask for a later checkpoint"
    )]
    AuditNotCovered { id: String, revision: i64 },
    #[error(
        "change request {id} has no attestation: it is not approved, an edit sent it back to review, or it was approved while the server had no audit.signing_key_file"
    )]
    AttestationNotFound { id: String },
}

fn credentials_expired_message(resume: Option<i64>) -> String {
    match resume {
        Some(resume) => format!(
            "the credentials of this watch stream expired; watch again with fresh credentials and start_revision {resume}"
        ),
        None => "the credentials of this watch stream expired before its snapshot was complete; watch again with fresh credentials and include_initial".to_owned(),
    }
}

impl From<DomainError> for ApiError {
    fn from(err: DomainError) -> Self {
        Self::Store(StoreError::Domain(err))
    }
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        DomainError::invalid(field, description).into()
    }

    pub fn invalid_all(violations: Vec<FieldViolation>) -> Self {
        DomainError::InvalidArgument(violations).into()
    }
}

/// The ErrorInfo reason `err` is answered with (`NOT_APPROVER`, ...).
pub fn reason_of(err: DomainError) -> String {
    Status::from(ApiError::from(err))
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn status(
    code: Code,
    message: String,
    reason: &str,
    metadata: &[(&str, String)],
) -> (Code, String, ErrorDetails) {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    (
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        // What the caller may not see is answered exactly as what does not exist.
        let err = match err {
            ApiError::Store(StoreError::Domain(DomainError::ChangeRequestNotFound { id })) => {
                ApiError::Store(StoreError::NotFound(id))
            }
            ApiError::Store(StoreError::Domain(DomainError::PolicyNotFound { name })) => {
                ApiError::Store(StoreError::PolicyNotFound(name))
            }
            other => other,
        };
        let message = err.to_string();
        let (code, message, details) = match err {
            ApiError::Unauthenticated(_) => {
                status(Code::Unauthenticated, message, "ACTOR_MISSING", &[])
            }
            ApiError::RevisionTooOld { oldest, .. } => status(
                Code::OutOfRange,
                message,
                "REVISION_TOO_OLD",
                &[("oldest_revision", oldest.to_string())],
            ),
            ApiError::WatcherTooSlow { resume, .. } => status(
                Code::ResourceExhausted,
                message,
                "WATCHER_TOO_SLOW",
                &[("resume_revision", resume.to_string())],
            ),
            ApiError::TooManyWatchers { max } => status(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_WATCHERS",
                &[("max_watchers", max.to_string())],
            ),
            ApiError::TooManyWatchersForPrincipal { principal, max } => status(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_WATCHERS",
                &[
                    ("max_watchers_per_principal", max.to_string()),
                    ("principal", principal),
                ],
            ),
            ApiError::CredentialsExpired { resume } => match resume {
                Some(resume) => status(
                    Code::Unauthenticated,
                    message,
                    "CREDENTIALS_EXPIRED",
                    &[("resume_revision", resume.to_string())],
                ),
                None => status(Code::Unauthenticated, message, "CREDENTIALS_EXPIRED", &[]),
            },
            ApiError::ShuttingDown { resume } => status(
                Code::Unavailable,
                message,
                "SHUTTING_DOWN",
                &[("resume_revision", resume.to_string())],
            ),
            ApiError::CredentialsMissing(_) => {
                status(Code::Unauthenticated, message, "CREDENTIALS_MISSING", &[])
            }
            ApiError::CredentialsInvalid(_) => {
                status(Code::Unauthenticated, message, "CREDENTIALS_INVALID", &[])
            }
            ApiError::ClientCertificateNotMapped(_) => status(
                Code::Unauthenticated,
                message,
                "CLIENT_CERTIFICATE_NOT_MAPPED",
                &[],
            ),
            ApiError::MissingScope { scope, method } => status(
                Code::PermissionDenied,
                message,
                "MISSING_SCOPE",
                &[("scope", scope.to_owned()), ("method", method)],
            ),
            ApiError::AllProjectsRequired { method } => status(
                Code::PermissionDenied,
                message,
                "ALL_PROJECTS_REQUIRED",
                &[("method", method)],
            ),
            ApiError::ActAsNotAllowed(_) => {
                status(Code::PermissionDenied, message, "ACT_AS_NOT_ALLOWED", &[])
            }
            ApiError::AuditNotConfigured => status(
                Code::FailedPrecondition,
                message,
                "AUDIT_NOT_CONFIGURED",
                &[],
            ),
            ApiError::AuditCheckpointNotFound { revision } => status(
                Code::NotFound,
                message,
                "AUDIT_CHECKPOINT_NOT_FOUND",
                &[("revision", revision.to_string())],
            ),
            ApiError::AuditNotCovered { id, revision } => status(
                Code::FailedPrecondition,
                message,
                "AUDIT_NOT_COVERED",
                &[("id", id), ("revision", revision.to_string())],
            ),
            ApiError::AttestationNotFound { id } => status(
                Code::NotFound,
                message,
                "ATTESTATION_NOT_FOUND",
                &[("id", id)],
            ),
            ApiError::MethodNotAllowed(method) => status(
                Code::PermissionDenied,
                message,
                "METHOD_NOT_ALLOWED",
                &[("method", method)],
            ),
            ApiError::Store(store) => match store {
                StoreError::NotFound(id) => {
                    let (code, message, mut details) = status(
                        Code::NotFound,
                        message,
                        "CHANGE_REQUEST_NOT_FOUND",
                        &[("id", id.clone())],
                    );
                    details.set_resource_info("approvals.v1.ChangeRequest", id, "", "not found");
                    (code, message, details)
                }
                StoreError::RequestIdReused {
                    request_id,
                    change_request_id,
                } => status(
                    Code::AlreadyExists,
                    message,
                    "REQUEST_ID_REUSED",
                    &[
                        ("request_id", request_id),
                        ("change_request_id", change_request_id),
                    ],
                ),
                StoreError::PolicyNotFound(name) => {
                    let (code, message, mut details) = status(
                        Code::NotFound,
                        message,
                        "POLICY_NOT_FOUND",
                        &[("name", name.clone())],
                    );
                    details.set_resource_info("approvals.v1.Policy", name, "", "not found");
                    (code, message, details)
                }
                StoreError::CalendarNotFound(name) => {
                    let (code, message, mut details) = status(
                        Code::NotFound,
                        message,
                        "CALENDAR_NOT_FOUND",
                        &[("name", name.clone())],
                    );
                    details.set_resource_info("approvals.v1.Calendar", name, "", "not found");
                    (code, message, details)
                }
                StoreError::CalendarNameTaken(name) => status(
                    Code::AlreadyExists,
                    message,
                    "CALENDAR_ALREADY_EXISTS",
                    &[("name", name)],
                ),
                StoreError::PolicyNameTaken(name) => status(
                    Code::AlreadyExists,
                    message,
                    "POLICY_ALREADY_EXISTS",
                    &[("name", name)],
                ),
                StoreError::PolicyScopeTaken {
                    existing,
                    project,
                    environment,
                    action_key,
                } => status(
                    Code::AlreadyExists,
                    message,
                    "POLICY_ALREADY_EXISTS",
                    &[
                        ("existing", existing),
                        ("project", project),
                        ("environment", environment),
                        ("action_key", action_key),
                    ],
                ),
                StoreError::SinkLeaseHeld {
                    sink,
                    holder,
                    expire_time,
                } => status(
                    Code::FailedPrecondition,
                    message,
                    "SINK_LEASE_HELD",
                    &[
                        ("sink", sink),
                        ("holder", holder),
                        (
                            "expire_time",
                            humantime::format_rfc3339_micros(
                                std::time::UNIX_EPOCH
                                    + std::time::Duration::from_micros(
                                        u64::try_from(expire_time).unwrap_or(0),
                                    ),
                            )
                            .to_string(),
                        ),
                    ],
                ),
                StoreError::SinkLeaseLost(sink) => status(
                    Code::FailedPrecondition,
                    message,
                    "SINK_LEASE_LOST",
                    &[("sink", sink)],
                ),
                StoreError::SinkNotFound(sink) => {
                    status(Code::NotFound, message, "SINK_NOT_FOUND", &[("sink", sink)])
                }
                StoreError::DeadLetterNotFound(id) => status(
                    Code::NotFound,
                    message,
                    "DEAD_LETTER_NOT_FOUND",
                    &[("id", id)],
                ),
                StoreError::Unavailable(detail) => {
                    tracing::warn!(%detail, "database unavailable");
                    status(
                        Code::Unavailable,
                        "the database is unavailable; retry later".to_owned(),
                        "DATABASE_UNAVAILABLE",
                        &[],
                    )
                }
                StoreError::Internal(_) => {
                    status(Code::Internal, "internal error".to_owned(), "INTERNAL", &[])
                }
                StoreError::Domain(domain) => match domain {
                    DomainError::InvalidArgument(violations) => {
                        let (code, message, mut details) =
                            status(Code::InvalidArgument, message, "INVALID_ARGUMENT", &[]);
                        for violation in violations {
                            details
                                .add_bad_request_violation(violation.field, violation.description);
                        }
                        (code, message, details)
                    }
                    DomainError::InvalidTransition { state, action } => status(
                        Code::FailedPrecondition,
                        message,
                        "INVALID_TRANSITION",
                        &[
                            ("state", state.as_str().to_owned()),
                            ("action", action.as_str().to_owned()),
                        ],
                    ),
                    DomainError::NotRequester { requester, action } => status(
                        Code::PermissionDenied,
                        message,
                        "NOT_REQUESTER",
                        &[
                            ("requester", requester),
                            ("action", action.as_str().to_owned()),
                        ],
                    ),
                    DomainError::SelfApproval => status(
                        Code::PermissionDenied,
                        message,
                        "SELF_APPROVAL_FORBIDDEN",
                        &[],
                    ),
                    DomainError::NotIndependent { party, .. } => status(
                        Code::PermissionDenied,
                        message,
                        "APPROVAL_NOT_INDEPENDENT",
                        &[("party", party)],
                    ),
                    DomainError::NotApprover { principal } => status(
                        Code::PermissionDenied,
                        message,
                        "NOT_APPROVER",
                        &[("principal", principal)],
                    ),
                    DomainError::NotLevelApprover { principal, level } => status(
                        Code::PermissionDenied,
                        message,
                        "NOT_LEVEL_APPROVER",
                        &[("principal", principal), ("level", level.to_string())],
                    ),
                    DomainError::ApprovedAtEarlierLevel { level, .. } => status(
                        Code::PermissionDenied,
                        message,
                        "APPROVED_AT_EARLIER_LEVEL",
                        &[("level", level.to_string())],
                    ),
                    DomainError::ReciprocalApproval {
                        change_request_id, ..
                    } => status(
                        Code::PermissionDenied,
                        message,
                        "RECIPROCAL_APPROVAL",
                        &[("change_request_id", change_request_id)],
                    ),
                    DomainError::ChangeRequestNotFound { id } => status(
                        Code::NotFound,
                        message,
                        "CHANGE_REQUEST_NOT_FOUND",
                        &[("id", id)],
                    ),
                    DomainError::PolicyNotFound { name } => status(
                        Code::NotFound,
                        message,
                        "POLICY_NOT_FOUND",
                        &[("name", name)],
                    ),
                    DomainError::PolicyProtected { name } => status(
                        Code::FailedPrecondition,
                        message,
                        "POLICY_PROTECTED",
                        &[("name", name)],
                    ),
                    DomainError::ProjectNotAllowed { project } => status(
                        Code::PermissionDenied,
                        message,
                        "PROJECT_NOT_ALLOWED",
                        &[("project", project)],
                    ),
                    DomainError::EtagMismatch { current, .. } => status(
                        Code::Aborted,
                        message,
                        "ETAG_MISMATCH",
                        &[("current_etag", current)],
                    ),
                    DomainError::Conflict { change_id, .. } => status(
                        Code::FailedPrecondition,
                        message,
                        "CONFLICT",
                        &[("change_id", change_id)],
                    ),
                    DomainError::Expired { .. } => {
                        status(Code::FailedPrecondition, message, "EXPIRED", &[])
                    }
                    DomainError::NotApplier { action, .. } => status(
                        Code::PermissionDenied,
                        message,
                        "NOT_APPLIER",
                        &[("action", action.as_str().to_owned())],
                    ),
                    DomainError::NotExecutor { .. } => {
                        status(Code::PermissionDenied, message, "NOT_EXECUTOR", &[])
                    }
                    DomainError::CannotApply(_) => {
                        status(Code::FailedPrecondition, message, "NO_APPLIER", &[])
                    }
                    DomainError::WindowClosed(closure) => {
                        let mut metadata =
                            vec![("calendar", closure.calendar), ("reason", closure.reason)];
                        if let Some(open) = closure.next_open_time {
                            metadata.push((
                                "next_open_time",
                                approvals_domain::calendar::rfc3339(open),
                            ));
                        }
                        status(
                            Code::FailedPrecondition,
                            message,
                            "CHANGE_WINDOW_CLOSED",
                            &metadata,
                        )
                    }
                    DomainError::ApplyDelay { apply_time } => status(
                        Code::FailedPrecondition,
                        message,
                        "APPLY_DELAY_NOT_ELAPSED",
                        &[(
                            "apply_time",
                            approvals_domain::calendar::rfc3339(apply_time),
                        )],
                    ),
                    DomainError::BypassForbidden { policy } => status(
                        Code::FailedPrecondition,
                        message,
                        "BYPASS_FORBIDDEN",
                        &[("policy", policy)],
                    ),
                    // FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: retrying cannot help (and
                    // clients retry RESOURCE_EXHAUSTED, as this service's own apply does).
                    DomainError::TooManyComments { limit } => status(
                        Code::FailedPrecondition,
                        message,
                        "TOO_MANY_COMMENTS",
                        &[("max_comments", limit.to_string())],
                    ),
                    DomainError::TooManyReviews { limit } => status(
                        Code::FailedPrecondition,
                        message,
                        "TOO_MANY_REVIEWS",
                        &[("max_reviews", limit.to_string())],
                    ),
                    DomainError::DocumentTooLarge { size, limit } => status(
                        Code::FailedPrecondition,
                        message,
                        "DOCUMENT_TOO_LARGE",
                        &[
                            ("max_document_bytes", limit.to_string()),
                            ("document_bytes", size.to_string()),
                        ],
                    ),
                },
            },
        };
        Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    /// Every reason this file can answer with is documented in the protos' comments (which the
    /// API reference, docs/api.md, is generated from): a new reason without documentation, or
    /// a typo in one, fails here.
    #[test]
    fn every_reason_is_documented_in_the_protos() {
        let protos = [
            include_str!("../proto/approvals/v1/change_requests.proto"),
            include_str!("../proto/approvals/v1/policies.proto"),
            include_str!("../proto/approvals/v1/audit.proto"),
            include_str!("../proto/approvals/v1/relay.proto"),
            include_str!("../proto/approvals/v1/calendars.proto"),
        ]
        .concat();
        let source = include_str!("error.rs");
        let code = &source[..source.find("#[cfg(test)]").unwrap_or(source.len())];
        let reasons: Vec<&str> = code
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.len() > 3 && s.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        assert!(reasons.len() > 20, "found only {reasons:?}");
        for reason in reasons {
            assert!(
                protos.contains(&format!("`{reason}`")),
                "{reason} is not in the protos' list of error reasons"
            );
        }
    }
}
