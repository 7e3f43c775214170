//! What the CLI prints: the proto JSON mapping for scripts (through the descriptor set that
//! reflection serves, so the JSON is the canonical mapping: lowerCamelCase names, enum names,
//! RFC 3339 times, int64 as strings), and tables with relative times for people.

use std::{io::IsTerminal, sync::OnceLock};

use comfy_table::{Table, presets};
use prost::Message;
use serde_json::Value as Json;

use super::{CliError, Format};
use crate::pb;

/// Full names of the messages the CLI prints or reads.
pub mod names {
    pub const CHANGE_REQUEST: &str = "approvals.v1.ChangeRequest";
    pub const LIST_CHANGE_REQUESTS: &str = "approvals.v1.ListChangeRequestsResponse";
    pub const EVENT: &str = "approvals.v1.Event";
    pub const LIST_EVENTS: &str = "approvals.v1.ListChangeRequestEventsResponse";
    pub const POLICY: &str = "approvals.v1.Policy";
    pub const LIST_POLICIES: &str = "approvals.v1.ListPoliciesResponse";
    pub const CREATE_CHANGE_REQUEST: &str = "approvals.v1.CreateChangeRequestRequest";
    pub const CHANGE: &str = "approvals.v1.Change";
}

/// A message as its proto JSON (fields at their defaults left out, or all of them with
/// `defaults`).
pub fn to_json_with(message: &impl Message, name: &str, defaults: bool) -> Result<Json, CliError> {
    crate::client::json::to_json(message, name, defaults).map_err(CliError::failure)
}

pub fn to_json(message: &impl Message, name: &str) -> Result<Json, CliError> {
    to_json_with(message, name, false)
}

/// A message from its proto JSON (field names as in the proto or in lowerCamelCase).
pub fn from_json<M: Message + Default>(json: Json, name: &str) -> Result<M, String> {
    crate::client::json::from_json(json, name)
}

/// Prints a message as JSON or YAML.
pub fn print_machine(json: &Json, format: Format) -> Result<(), CliError> {
    match format {
        Format::Yaml => {
            let text = serde_yaml::to_string(json).map_err(|e| CliError::failure(e.to_string()))?;
            out!("{text}");
        }
        _ => {
            let text =
                serde_json::to_string_pretty(json).map_err(|e| CliError::failure(e.to_string()))?;
            outln!("{text}");
        }
    }
    Ok(())
}

/// Prints a message in a machine format; false for `table`, which the caller renders.
pub fn machine(message: &impl Message, name: &str, format: Format) -> Result<bool, CliError> {
    match format {
        Format::Json | Format::Yaml => {
            print_machine(&to_json(message, name)?, format)?;
            Ok(true)
        }
        Format::Table | Format::Id => Ok(false),
    }
}

/// Colours only on a terminal, and never with `NO_COLOR` set (to anything non-empty).
pub fn colour() -> bool {
    static COLOUR: OnceLock<bool> = OnceLock::new();
    *COLOUR.get_or_init(|| {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    })
}

fn paint(text: &str, code: &str) -> String {
    if colour() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

pub fn bold(text: &str) -> String {
    paint(text, "1")
}

/// A state without its `STATE_` prefix, coloured by what it means.
pub fn state(value: i32) -> String {
    let state = pb::State::try_from(value).unwrap_or(pb::State::Unspecified);
    let name = state
        .as_str_name()
        .strip_prefix("STATE_")
        .unwrap_or(state.as_str_name());
    let code = match state {
        pb::State::Applied => "32",
        pb::State::Approved | pb::State::Scheduled | pb::State::Applying => "36",
        pb::State::InReview => "33",
        pb::State::Rejected | pb::State::ApplyFailed | pb::State::Expired => "31",
        _ => "2",
    };
    paint(name, code)
}

/// An enum value's name without its prefix (`EVENT_KIND_APPLIED` -> `APPLIED`).
pub fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

/// A table in the style of `kubectl get`: a header, no borders.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(header.iter().map(|h| bold(h)).collect::<Vec<_>>());
    table
}

pub fn print_table(table: &Table) {
    // comfy-table pads every column with one space on the left: drop it.
    for line in table.to_string().lines() {
        outln!("{}", line.strip_prefix(' ').unwrap_or(line).trim_end());
    }
}

fn seconds_since(t: &prost_types::Timestamp) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now - t.seconds
}

/// `3m ago`, `in 2h`, `-` when unset.
pub fn relative(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let delta = seconds_since(t);
    let span = delta.unsigned_abs();
    let text = match span {
        0..=59 => format!("{span}s"),
        60..=3599 => format!("{}m", span / 60),
        3600..=86_399 => format!("{}h", span / 3600),
        _ => format!("{}d", span / 86_400),
    };
    if delta >= 0 {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

/// RFC 3339 (UTC), as the JSON mapping writes it.
pub fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or_else(
            || "-".into(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        )
}

/// `3m ago (2026-12-07T10:00:00Z)`.
pub fn when(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(_) => format!("{} ({})", relative(t), rfc3339(t)),
        None => "-".into(),
    }
}

/// A Struct (payload, result data) as indented YAML lines.
pub fn struct_yaml(s: Option<&prost_types::Struct>, indent: &str) -> String {
    let Some(s) = s else {
        return format!("{indent}{{}}\n");
    };
    let json = integral(Json::Object(crate::convert::struct_to_json(s)));
    let text = serde_yaml::to_string(&json).unwrap_or_else(|_| json.to_string());
    text.lines().map(|l| format!("{indent}{l}\n")).collect()
}

/// Struct numbers are doubles: `50` rather than `50.0` for people.
fn integral(json: Json) -> Json {
    match json {
        Json::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Json::from(f as i64),
            _ => Json::Number(n),
        },
        Json::Array(items) => Json::Array(items.into_iter().map(integral).collect()),
        Json::Object(map) => Json::Object(map.into_iter().map(|(k, v)| (k, integral(v))).collect()),
        other => other,
    }
}

/// Parses a time for `--at`: RFC 3339 (`2026-12-07T10:00:00Z`, `...+02:00`), or a delay from now
/// (`in 2h`, `+30m`).
pub fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    let trimmed = text.trim();
    let delay = trimmed
        .strip_prefix("in ")
        .or_else(|| trimmed.strip_prefix('+'));
    if let Some(delay) = delay {
        let delay =
            humantime::parse_duration(delay.trim()).map_err(|e| format!("{text:?}: {e}"))?;
        let at = std::time::SystemTime::now() + delay;
        let since = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?;
        return Ok(prost_types::Timestamp {
            seconds: i64::try_from(since.as_secs()).map_err(|e| e.to_string())?,
            nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        });
    }
    let at = chrono::DateTime::parse_from_rfc3339(trimmed).map_err(|e| {
        format!("{text:?}: {e} (expected RFC 3339, e.g. 2026-12-07T10:00:00Z, or `in 2h`)")
    })?;
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_mapping_round_trips_a_change_request() {
        let request = pb::ChangeRequest {
            id: "0193".into(),
            state: pb::State::InReview as i32,
            revision: 42,
            create_time: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json = to_json(&request, names::CHANGE_REQUEST).expect("json");
        assert_eq!(json["state"], "STATE_IN_REVIEW");
        assert_eq!(json["revision"], "42");
        assert_eq!(json["createTime"], "2027-01-15T08:00:00Z");
        let back: pb::ChangeRequest = from_json(json, names::CHANGE_REQUEST).expect("back");
        assert_eq!(back, request);
    }

    #[test]
    fn times_parse_as_rfc3339_or_a_delay() {
        let at = parse_time("2027-01-15T10:00:00+02:00").expect("time");
        assert_eq!(at.seconds, 1_800_000_000);
        assert!(parse_time("in 2h").expect("delay").seconds > 1_700_000_000);
        assert!(parse_time("tomorrow").is_err());
    }
}
