//! Change calendars: `approvals.v1.Calendar` to and from the domain's [`CalendarRecord`].

use approvals_domain::{
    Timestamp,
    calendar::{
        CalendarEntry, CalendarRecord, CalendarRules, CalendarState, EntrySpan, WindowKind,
    },
    duration_micros,
    validation::Violations,
};

use super::{from_timestamp, timestamp};
use crate::pb;

fn kind(k: WindowKind) -> pb::WindowKind {
    match k {
        WindowKind::Open => pb::WindowKind::Open,
        WindowKind::Closed => pb::WindowKind::Closed,
    }
}

fn from_kind(field: &str, value: i32, v: &mut Violations) -> WindowKind {
    match pb::WindowKind::try_from(value) {
        Ok(pb::WindowKind::Open) => WindowKind::Open,
        Ok(pb::WindowKind::Closed) => WindowKind::Closed,
        _ => {
            v.add(field, "is required: WINDOW_KIND_OPEN or WINDOW_KIND_CLOSED");
            WindowKind::Closed
        }
    }
}

fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros / 1_000_000,
        nanos: i32::try_from((micros % 1_000_000) * 1000).unwrap_or(0),
    }
}

fn required_time(field: &str, t: Option<&prost_types::Timestamp>, v: &mut Violations) -> Timestamp {
    match t {
        None => {
            v.add(field, "is required");
            Timestamp::from_micros(0)
        }
        Some(t) => match from_timestamp(field, t) {
            Ok(t) => t,
            Err(_) => {
                v.add(field, approvals_domain::TIMESTAMP_RANGE);
                Timestamp::from_micros(0)
            }
        },
    }
}

/// The domain record of `c` (name, description, rules); bad fields go to `v`, prefixed by
/// `prefix` (`calendar.`). Times are set by the caller.
pub fn record(
    c: &pb::Calendar,
    now: Timestamp,
    prefix: &str,
    v: &mut Violations,
) -> CalendarRecord {
    v.no_nul(&format!("{prefix}name"), &c.name);
    v.no_nul(&format!("{prefix}time_zone"), &c.time_zone);
    let default = from_kind(&format!("{prefix}default"), c.default, v);
    let mut entries = Vec::with_capacity(c.entries.len());
    for (i, e) in c.entries.iter().enumerate() {
        let at = format!("{prefix}entries[{i}]");
        v.no_nul(&format!("{at}.reason"), &e.reason);
        let kind = from_kind(&format!("{at}.kind"), e.kind, v);
        let span = match (&e.range, &e.recurrence) {
            (None, None) | (Some(_), Some(_)) => {
                v.add(
                    format!("{at}.range"),
                    "exactly one of range and recurrence is required",
                );
                // A placeholder keeps the domain's entry indices those of the request.
                EntrySpan::Range {
                    start: Timestamp::from_micros(0),
                    end: Timestamp::from_micros(1),
                }
            }
            (Some(r), None) => EntrySpan::Range {
                start: required_time(&format!("{at}.range.start_time"), r.start_time.as_ref(), v),
                end: required_time(&format!("{at}.range.end_time"), r.end_time.as_ref(), v),
            },
            (None, Some(r)) => {
                v.no_nul(&format!("{at}.recurrence.rrule"), &r.rrule);
                let duration_micros = match &r.duration {
                    Some(d) => duration_micros(d.seconds, d.nanos).unwrap_or_else(|| {
                        v.add(
                            format!("{at}.recurrence.duration"),
                            approvals_domain::DURATION_RANGE,
                        );
                        0
                    }),
                    None => {
                        v.add(format!("{at}.recurrence.duration"), "is required");
                        0
                    }
                };
                EntrySpan::Recurrence {
                    start: required_time(
                        &format!("{at}.recurrence.start_time"),
                        r.start_time.as_ref(),
                        v,
                    ),
                    rrule: r.rrule.clone(),
                    duration_micros,
                }
            }
        };
        entries.push(CalendarEntry {
            kind,
            reason: e.reason.clone(),
            span,
        });
    }
    CalendarRecord {
        name: c.name.clone(),
        description: c.description.clone(),
        rules: CalendarRules {
            time_zone: c.time_zone.clone(),
            default,
            entries,
        },
        revision: 0,
        create_time: now,
        update_time: now,
    }
}

pub fn calendar(c: &CalendarRecord) -> pb::Calendar {
    pb::Calendar {
        name: c.name.clone(),
        description: c.description.clone(),
        time_zone: c.rules.time_zone.clone(),
        default: kind(c.rules.default) as i32,
        entries: c
            .rules
            .entries
            .iter()
            .map(|e| pb::CalendarEntry {
                kind: kind(e.kind) as i32,
                reason: e.reason.clone(),
                range: match &e.span {
                    EntrySpan::Range { start, end } => Some(pb::TimeRange {
                        start_time: Some(timestamp(*start)),
                        end_time: Some(timestamp(*end)),
                    }),
                    EntrySpan::Recurrence { .. } => None,
                },
                recurrence: match &e.span {
                    EntrySpan::Recurrence {
                        start,
                        rrule,
                        duration_micros,
                    } => Some(pb::Recurrence {
                        start_time: Some(timestamp(*start)),
                        rrule: rrule.clone(),
                        duration: Some(duration(*duration_micros)),
                    }),
                    EntrySpan::Range { .. } => None,
                },
            })
            .collect(),
        revision: c.revision,
        create_time: Some(timestamp(c.create_time)),
        update_time: Some(timestamp(c.update_time)),
        etag: c.etag(),
    }
}

pub fn state(c: &CalendarRecord, at: Timestamp, s: &CalendarState) -> pb::CalendarState {
    pb::CalendarState {
        calendar: c.name.clone(),
        time: Some(timestamp(at)),
        open: s.open,
        deciding_entry: s.deciding_entry.and_then(|i| i32::try_from(i).ok()),
        reason: s
            .deciding_entry
            .and_then(|i| c.rules.entries.get(i))
            .map(|e| e.reason.clone())
            .unwrap_or_default(),
        next_open_time: s.next_open_time.map(timestamp),
        next_close_time: s.next_close_time.map(timestamp),
    }
}

/// The request path of a field the domain names: `entries[2].rrule` is
/// `entries[2].recurrence.rrule` in `approvals.v1.Calendar`.
pub fn field_path(c: &pb::Calendar, field: &str) -> String {
    let Some(rest) = field.strip_prefix("entries[") else {
        return field.to_owned();
    };
    let Some((index, tail)) = rest.split_once("].") else {
        return field.to_owned();
    };
    let entry = index.parse::<usize>().ok().and_then(|i| c.entries.get(i));
    match entry {
        Some(e) if e.range.is_some() => format!("entries[{index}].range.{tail}"),
        Some(e) if e.recurrence.is_some() => format!("entries[{index}].recurrence.{tail}"),
        _ => field.to_owned(),
    }
}
