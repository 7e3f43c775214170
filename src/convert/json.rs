//! `google.protobuf.Struct` <-> JSON objects (payloads, result data, intent schemas): a
//! caller's Struct is checked against the payload limits before anything is copied.

use approvals_domain::validation::{self, Violations};
use prost::Message as _;
use prost_types::{Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// A Struct from a trusted peer (an applier's result) as JSON; non-finite numbers become null.
/// Not limited: the applier is configured by the policy's administrators.
pub fn struct_to_json(s: &Struct) -> Map<String, Json> {
    json_object(s)
}

/// JSON object -> `google.protobuf.Struct`.
pub fn to_struct(map: &Map<String, Json>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(to_struct(map)),
    };
    Value { kind: Some(kind) }
}

/// A caller's `google.protobuf.Struct` (a change's payload, `result_data`, a policy's
/// `intent_schema`) -> JSON object. Checked before anything is copied, so the work is bounded
/// by the limit, not by what a caller sends: at most [`validation::MAX_PAYLOAD_BYTES`] encoded
/// (protobuf), keys of at most [`validation::MAX_PAYLOAD_KEY_CHARS`] characters, finite numbers.
/// A refused Struct adds one violation, naming `field` or the path inside it, and converts to an
/// empty object. Nesting is bounded by prost's decoding limit (100 nested messages, so fewer
/// than 50 JSON levels), below serde_json's reading limit of 128 for the stored document.
pub fn from_struct(field: &str, s: &Struct, v: &mut Violations) -> Map<String, Json> {
    let size = s.encoded_len();
    if size > validation::MAX_PAYLOAD_BYTES {
        v.add(
            field,
            format!(
                "is {size} bytes encoded as a google.protobuf.Struct; the limit is {} bytes",
                validation::MAX_PAYLOAD_BYTES
            ),
        );
        return Map::new();
    }
    let mut path = Vec::new();
    if let Err(problem) = check_struct(s, &mut path) {
        v.add(render_path(field, &path), problem);
        return Map::new();
    }
    json_object(s)
}

/// One step into a Struct: a key of an object, or an index into a list.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Finds the first thing wrong in `s`, leaving `path` at the object or value it concerns. Paths
/// are only rendered for a violation, never for every value.
fn check_struct<'a>(s: &'a Struct, path: &mut Vec<Step<'a>>) -> Result<(), String> {
    for (key, value) in &s.fields {
        // Bytes bound characters: counting them only for long keys.
        if key.len() > validation::MAX_PAYLOAD_KEY_CHARS {
            let chars = key.chars().count();
            if chars > validation::MAX_PAYLOAD_KEY_CHARS {
                return Err(format!(
                    "has a key of {chars} characters; keys may have at most {}",
                    validation::MAX_PAYLOAD_KEY_CHARS
                ));
            }
        }
        path.push(Step::Key(key));
        check_value(value, path)?;
        path.pop();
    }
    Ok(())
}

fn check_value<'a>(value: &'a Value, path: &mut Vec<Step<'a>>) -> Result<(), String> {
    match &value.kind {
        Some(Kind::NumberValue(n)) if !n.is_finite() => Err("numbers must be finite".to_owned()),
        Some(Kind::StructValue(inner)) => check_struct(inner, path),
        Some(Kind::ListValue(list)) => {
            for (i, item) in list.values.iter().enumerate() {
                path.push(Step::Index(i));
                check_value(item, path)?;
                path.pop();
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Longest path a violation names; a longer one is cut (keys are short, but nesting is deep).
const MAX_PATH_BYTES: usize = 1024;

fn render_path(field: &str, path: &[Step<'_>]) -> String {
    use std::fmt::Write as _;
    let mut out = field.to_owned();
    for step in path {
        let _ = match step {
            Step::Key(key) => write!(out, ".{key}"),
            Step::Index(i) => write!(out, "[{i}]"),
        };
        if out.len() > MAX_PATH_BYTES {
            let mut cut = MAX_PATH_BYTES;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("...");
            break;
        }
    }
    out
}

/// The conversion itself, after the checks; a non-finite number (only from a trusted peer)
/// becomes null.
fn json_object(s: &Struct) -> Map<String, Json> {
    s.fields
        .iter()
        .map(|(k, value)| (k.clone(), json_value(value)))
        .collect()
}

fn json_value(value: &Value) -> Json {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(json_value).collect()),
        Some(Kind::StructValue(inner)) => Json::Object(json_object(inner)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_round_trips_through_json() {
        let json: Map<String, Json> =
            serde_json::from_str(r#"{"a": 1.5, "b": [true, null, "x"], "c": {"d": {}}}"#)
                .expect("json");
        let mut v = Violations::default();
        assert_eq!(from_struct("payload", &to_struct(&json), &mut v), json);
        assert!(v.is_empty());
    }

    #[test]
    fn non_finite_numbers_are_named() {
        let mut s = Struct::default();
        s.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        let mut v = Violations::default();
        from_struct("changes[0].payload", &s, &mut v);
        let err = v.into_result().expect_err("nan refused");
        assert!(err.to_string().contains("changes[0].payload.x"), "{err}");
    }

    fn list_of(values: Vec<Value>) -> Value {
        Value {
            kind: Some(Kind::ListValue(prost_types::ListValue { values })),
        }
    }

    #[test]
    fn only_the_first_violation_is_named_and_paths_stay_short() {
        let nan = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        // Many bad numbers: one violation, the first.
        let mut s = Struct::default();
        s.fields.insert("a".into(), list_of(vec![nan; 1000]));
        let mut v = Violations::default();
        assert!(from_struct("payload", &s, &mut v).is_empty());
        let err = v.into_result().expect_err("refused").to_string();
        assert!(
            err.contains("payload.a[0]: numbers must be finite"),
            "{err}"
        );
        assert!(!err.contains("a[1]"), "{err}");

        // A deep path of long keys is cut.
        let key = "k".repeat(validation::MAX_PAYLOAD_KEY_CHARS);
        let mut inner = Struct::default();
        inner.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::INFINITY)),
            },
        );
        for _ in 0..20 {
            let mut outer = Struct::default();
            outer.fields.insert(
                key.clone(),
                Value {
                    kind: Some(Kind::StructValue(inner)),
                },
            );
            inner = outer;
        }
        let mut v = Violations::default();
        from_struct("payload", &inner, &mut v);
        let Err(approvals_domain::DomainError::InvalidArgument(list)) = v.into_result() else {
            panic!("refused");
        };
        assert!(
            list[0].field.len() <= MAX_PATH_BYTES + 3,
            "{}",
            list[0].field.len()
        );
        assert!(list[0].field.ends_with("..."));
    }

    #[test]
    fn keys_are_counted_in_characters() {
        let mut v = Violations::default();
        let mut s = Struct::default();
        // 256 two-byte characters: 512 bytes, within the limit.
        s.fields.insert(
            "é".repeat(validation::MAX_PAYLOAD_KEY_CHARS),
            list_of(vec![]),
        );
        assert_eq!(from_struct("payload", &s, &mut v).len(), 1);
        assert!(v.is_empty());
        s.fields.insert(
            "é".repeat(validation::MAX_PAYLOAD_KEY_CHARS + 1),
            list_of(vec![]),
        );
        from_struct("payload", &s, &mut v);
        let err = v.into_result().expect_err("too long").to_string();
        assert!(
            err.contains("payload: has a key of 257 characters"),
            "{err}"
        );
    }
}
