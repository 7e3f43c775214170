//! Limits and checks on caller input. Every check names the field it refuses.
//!
//! One rule holds for every string a caller sends that the service stores or looks up (names,
//! titles, free text, principals, request ids, and every key and string inside a JSON payload,
//! schema or result): it must not contain U+0000 (NUL). PostgreSQL's `text` cannot hold NUL
//! (and its `jsonb` refuses the `\u0000` escape) while SQLite can, so refusing it here, before
//! any query, gives the same answer on both databases: INVALID_ARGUMENT naming the field.

use serde_json::{Map, Value};

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

/// AIP-154: an `etag` a caller sent with a write must be the resource's `current` one; an
/// empty or absent etag makes the write unconditional.
pub fn check_etag(current: String, given: Option<&str>) -> Result<(), crate::DomainError> {
    match given {
        Some(given) if !given.is_empty() && given != current => {
            Err(crate::DomainError::EtagMismatch {
                given: given.to_owned(),
                current,
            })
        }
        _ => Ok(()),
    }
}

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

    /// Free text: at most `max_bytes`, no NUL.
    pub fn text(&mut self, field: &str, value: &str, max_bytes: usize) {
        if value.len() > max_bytes {
            self.add(
                field,
                format!("must be at most {max_bytes} bytes (got {})", value.len()),
            );
        } else {
            self.no_nul(field, value);
        }
    }

    /// A title: at most [`MAX_TITLE_CHARS`], no NUL.
    pub fn title(&mut self, field: &str, value: &str) {
        if value.chars().count() > MAX_TITLE_CHARS {
            self.add(
                field,
                format!("must be at most {MAX_TITLE_CHARS} characters"),
            );
        } else {
            self.no_nul(field, value);
        }
    }

    /// The rule of the module documentation for a string checked by nothing else (a lookup
    /// key, a filter). Returns whether it held.
    pub fn no_nul(&mut self, field: &str, value: &str) -> bool {
        let clean = !value.contains('\0');
        if !clean {
            self.add(field, NUL_DESCRIPTION);
        }
        clean
    }

    /// The rule for a JSON document (a payload, an intent schema, result data): no key and no
    /// string in it contains NUL. The first one found is named by its path below `field`
    /// (`changes[0].payload.meta.tags[1]`; a key's NUL is written `\u0000` in the path), so a
    /// document with many never makes the answer large. The path is built only when one is found.
    pub fn json_strings(&mut self, field: &str, document: &Map<String, Value>) {
        if let Some((mut reversed, in_key)) = nul_in_object(document) {
            let mut path = field.to_owned();
            while let Some(segment) = reversed.pop() {
                match segment {
                    Segment::Key(key) => {
                        path.push('.');
                        path.push_str(&key.replace('\0', "\\u0000"));
                    }
                    Segment::Index(i) => path.push_str(&format!("[{i}]")),
                }
            }
            let description = if in_key {
                "keys must not contain U+0000 (NUL)"
            } else {
                NUL_DESCRIPTION
            };
            self.add(path, description);
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

const NUL_DESCRIPTION: &str = "must not contain U+0000 (NUL)";

/// One step of a path into a JSON document.
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// The path (innermost step first) to the first key or string holding a NUL, and whether it
/// is a key. Nothing is allocated until one is found.
fn nul_in_object(map: &Map<String, Value>) -> Option<(Vec<Segment<'_>>, bool)> {
    map.iter().find_map(|(key, value)| {
        if key.contains('\0') {
            return Some((vec![Segment::Key(key)], true));
        }
        let (mut path, in_key) = nul_in(value)?;
        path.push(Segment::Key(key));
        Some((path, in_key))
    })
}

fn nul_in(value: &Value) -> Option<(Vec<Segment<'_>>, bool)> {
    match value {
        Value::String(s) => s.contains('\0').then(|| (Vec::new(), false)),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let (mut path, in_key) = nul_in(item)?;
            path.push(Segment::Index(i));
            Some((path, in_key))
        }),
        Value::Object(map) => nul_in_object(map),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Violations) -> Vec<(String, String)> {
        v.0.into_iter().map(|f| (f.field, f.description)).collect()
    }

    #[test]
    fn nul_is_refused_in_every_kind_of_string() {
        let mut v = Violations::default();
        v.text("description", "a\0b", MAX_TEXT_BYTES);
        v.title("title", "a\0b");
        v.optional_name("environment", "a\0b");
        assert!(!v.no_nul("name", "\0"));
        assert!(v.no_nul("name", "fine"));
        let named: Vec<String> = fields(v).into_iter().map(|(f, _)| f).collect();
        assert_eq!(named, ["description", "title", "environment", "name"]);
    }

    #[test]
    fn json_strings_names_the_first_nul_by_its_path() {
        let document = |json: serde_json::Value| match json {
            Value::Object(map) => map,
            _ => unreachable!("an object"),
        };
        let mut v = Violations::default();
        v.json_strings(
            "changes[0].payload",
            &document(serde_json::json!({"a": 1, "b": {"c": [true, "x", "y\0"]}})),
        );
        v.json_strings(
            "result_data",
            &document(serde_json::json!({"ok": {"k\0": null}})),
        );
        v.json_strings(
            "clean",
            &document(serde_json::json!({"a": ["b", {"c": "d"}], "e": null})),
        );
        assert_eq!(
            fields(v),
            [
                (
                    "changes[0].payload.b.c[2]".to_owned(),
                    NUL_DESCRIPTION.to_owned()
                ),
                (
                    "result_data.ok.k\\u0000".to_owned(),
                    "keys must not contain U+0000 (NUL)".to_owned()
                ),
            ]
        );
    }
}
