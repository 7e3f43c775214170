//! Limits and checks on caller input. Every check names the field it refuses.

use crate::error::FieldViolation;

/// Largest payload of one change, measured as its JSON encoding and, at the API, as its
/// `google.protobuf.Struct` encoding (checked before the Struct is converted). The API holds a
/// CompleteChangeRequest's `result_data` and a policy's `intent_schema` to it too.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Longest key (in characters) of a caller's Struct: a payload, `result_data`, `intent_schema`.
pub const MAX_PAYLOAD_KEY_CHARS: usize = 256;
/// Most changes one request may bundle.
pub const MAX_CHANGES: usize = 100;
/// Longest identifier-like field (project, environment, action_key, resource type and id, action).
pub const MAX_NAME_CHARS: usize = 256;
pub const MAX_TITLE_CHARS: usize = 512;
/// Longest free text (description, intent_display, comments, review comments, reasons).
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// Most comments one change request holds; AddComment beyond is FAILED_PRECONDITION
/// (`TOO_MANY_COMMENTS`).
pub const MAX_COMMENTS: usize = 500;
/// Most reviews one change request holds, dismissed ones included (each edit in review
/// dismisses the reviews, and reviewers review again); a review beyond is FAILED_PRECONDITION
/// (`TOO_MANY_REVIEWS`). A reviewer replacing their own current review adds none.
pub const MAX_REVIEWS: usize = 500;
/// Largest change request document, both as stored (its JSON) and as served (the
/// `approvals.v1.ChangeRequest` message): half the 4 MiB gRPC message limit clients have by
/// default, leaving room for the event or response around it. A command from a caller that
/// would make it larger is FAILED_PRECONDITION (`DOCUMENT_TOO_LARGE`); the service's own
/// transitions (apply outcomes, conflicts, expiry) are never refused for it.
pub const MAX_DOCUMENT_BYTES: usize = 2 * 1024 * 1024;

/// Refuses a document of `size` bytes (however measured) over [`MAX_DOCUMENT_BYTES`].
pub fn check_document_size(size: usize) -> Result<(), crate::DomainError> {
    if size > MAX_DOCUMENT_BYTES {
        Err(crate::DomainError::DocumentTooLarge {
            size,
            limit: MAX_DOCUMENT_BYTES,
        })
    } else {
        Ok(())
    }
}

/// Bytes a value takes as JSON, counted without building the text.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        // Only a map with non-string keys fails, and the domain has none: count it as too big.
        Err(_) => usize::MAX,
    }
}

/// Collects violations so that one response names every bad field at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// A required name: non-empty, at most [`MAX_NAME_CHARS`], no control characters.
    pub fn required_name(&mut self, field: &str, value: &str) {
        if value.trim().is_empty() {
            self.add(field, "is required");
        } else {
            self.optional_name(field, value);
        }
    }

    pub fn optional_name(&mut self, field: &str, value: &str) {
        if value.chars().count() > MAX_NAME_CHARS {
            self.add(
                field,
                format!("must be at most {MAX_NAME_CHARS} characters"),
            );
        } else if value.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        } else if value != value.trim() {
            self.add(field, "must not start or end with whitespace");
        }
    }

    pub fn text(&mut self, field: &str, value: &str, max_bytes: usize) {
        if value.len() > max_bytes {
            self.add(
                field,
                format!("must be at most {max_bytes} bytes (got {})", value.len()),
            );
        }
    }

    pub fn title(&mut self, field: &str, value: &str) {
        if value.chars().count() > MAX_TITLE_CHARS {
            self.add(
                field,
                format!("must be at most {MAX_TITLE_CHARS} characters"),
            );
        }
    }

    pub fn into_result(self) -> Result<(), crate::DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(crate::DomainError::InvalidArgument(self.0))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
