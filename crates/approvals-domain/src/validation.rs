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
