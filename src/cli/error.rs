//! The CLI's errors: what went wrong, printed for a person (never a debug dump), and the exit
//! code that tells a script which kind of failure it was.

use std::{fmt::Write as _, process::ExitCode};

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::client::ClientError;

/// The documented exit codes.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure (an internal error, an unexpected answer, a file that cannot be read).
    pub const FAILURE: u8 = 1;
    /// Bad usage: flags (clap's own code), or input the server refused (INVALID_ARGUMENT,
    /// OUT_OF_RANGE).
    pub const USAGE: u8 = 2;
    /// NOT_FOUND: no such change request or policy (or one the caller may not see).
    pub const NOT_FOUND: u8 = 3;
    /// PERMISSION_DENIED or UNAUTHENTICATED.
    pub const DENIED: u8 = 4;
    /// FAILED_PRECONDITION, ABORTED (a stale etag) or ALREADY_EXISTS: the request's state or
    /// the service's content does not allow the call now.
    pub const PRECONDITION: u8 = 5;
    /// UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, or the server cannot be reached:
    /// retry later.
    pub const UNAVAILABLE: u8 = 6;
    /// `--wait`: the request ended without being applied (REJECTED, CANCELLED, EXPIRED or
    /// APPLY_FAILED).
    pub const NOT_APPLIED: u8 = 7;
}

/// The exit code table as a string literal, for `concat!` in `after_help`.
#[macro_export]
macro_rules! exit_codes_help {
    () => {
        "\
Exit codes:
  0  success
  1  any other failure
  2  usage error, or input the server refused (INVALID_ARGUMENT, OUT_OF_RANGE)
  3  not found (NOT_FOUND)
  4  permission denied (PERMISSION_DENIED, UNAUTHENTICATED)
  5  precondition failed (FAILED_PRECONDITION, ABORTED: stale etag, ALREADY_EXISTS)
  6  unavailable (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, cannot connect)
  7  --wait: the request ended without being applied (REJECTED, CANCELLED, EXPIRED, APPLY_FAILED)"
    };
}

/// The exit code table, as `--help` shows it.
pub const EXIT_CODES_HELP: &str = exit_codes_help!();

/// What the CLI reports on stderr, and its exit code.
#[derive(Debug)]
pub enum CliError {
    /// The server refused the call.
    Status(Box<Status>),
    /// Something the CLI itself refused or could not do.
    Local { code: u8, message: String },
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        Self::Status(Box::new(status))
    }
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self::Local {
            code: exit::USAGE,
            message: message.into(),
        }
    }

    pub fn failure(message: impl Into<String>) -> Self {
        Self::Local {
            code: exit::FAILURE,
            message: message.into(),
        }
    }

    pub fn client(error: ClientError) -> Self {
        let code = match error {
            ClientError::Connect { .. } => exit::UNAVAILABLE,
            ClientError::Endpoint { .. } | ClientError::Credential(_) => exit::USAGE,
            ClientError::File { .. } | ClientError::Tls(_) => exit::FAILURE,
        };
        Self::Local {
            code,
            message: error.to_string(),
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Status(status) => code_exit(status.code()),
            Self::Local { code, .. } => *code,
        })
    }

    /// The lines printed on stderr: `error: CODE: message`, then the ErrorInfo reason, then
    /// each BadRequest field violation on its own line.
    pub fn render(&self) -> String {
        match self {
            Self::Local { message, .. } => format!("error: {message}\n"),
            Self::Status(status) => render_status(status),
        }
    }
}

fn code_exit(code: Code) -> u8 {
    match code {
        Code::Ok => exit::OK,
        Code::InvalidArgument | Code::OutOfRange => exit::USAGE,
        Code::NotFound => exit::NOT_FOUND,
        Code::PermissionDenied | Code::Unauthenticated => exit::DENIED,
        Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => exit::PRECONDITION,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => exit::UNAVAILABLE,
        _ => exit::FAILURE,
    }
}

/// The canonical upper-snake name of a status code (`FAILED_PRECONDITION`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn render_status(status: &Status) -> String {
    let mut out = format!(
        "error: {}: {}\n",
        code_name(status.code()),
        status.message()
    );
    let details = status.get_error_details();
    if let Some(info) = details.error_info() {
        let _ = write!(out, "  reason: {}", info.reason);
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        for (key, value) in metadata {
            let _ = write!(out, " {key}={value}");
        }
        out.push('\n');
    }
    if let Some(bad) = details.bad_request() {
        for violation in &bad.field_violations {
            let _ = writeln!(out, "  {}: {}", violation.field, violation.description);
        }
    }
    if let Some(retry) = details.retry_info()
        && let Some(delay) = retry.retry_delay
    {
        let _ = writeln!(out, "  retry after {}", humantime::format_duration(delay));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, FieldViolation};

    #[test]
    fn a_status_renders_its_code_reason_and_each_field() {
        let mut details = ErrorDetails::with_error_info(
            "INVALID_ARGUMENT",
            "approvals",
            std::collections::HashMap::new(),
        );
        details.set_bad_request(vec![
            FieldViolation::new("title", "is too long"),
            FieldViolation::new("changes[0].resource_id", "is required"),
        ]);
        let status = Status::with_error_details(Code::InvalidArgument, "bad input", details);
        let error = CliError::from(status);
        assert_eq!(
            error.render(),
            "error: INVALID_ARGUMENT: bad input\n  reason: INVALID_ARGUMENT\n  title: is too long\n  changes[0].resource_id: is required\n"
        );
        assert_eq!(error.exit_code(), ExitCode::from(exit::USAGE));
    }
}
