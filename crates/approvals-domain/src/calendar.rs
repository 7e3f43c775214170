//! Change calendars (issue 26): when a change may go out.
//!
//! A calendar has an IANA `time_zone`, a `default` (open or closed) and entries, each open or
//! closed with a reason, spanning either a one-off range or an RFC 5545 recurrence with a
//! duration. At an instant, a closed entry that covers it wins over open ones; an open entry
//! wins over the default. Pure: the instant is passed in. Recurrences are expanded by the
//! `rrule` crate in the calendar's time zone (`chrono-tz`), so "every weekday 09:00 for 8 h"
//! stays at 09:00 local time across daylight-saving changes.

use chrono::{DateTime, TimeZone, Utc};
use rrule::{RRule, RRuleSet, Unvalidated};
use serde::{Deserialize, Serialize};

use crate::{DomainError, FieldViolation, Timestamp};

/// How far ahead [`Calendar::state_at`] looks for the next change. Beyond it `next_open_time`
/// / `next_close_time` are absent.
pub const HORIZON_MICROS: i64 = 400 * 24 * 3600 * 1_000_000;

/// Occurrences of one recurrence expanded per look-up, at most (the `rrule` crate's limit).
const MAX_OCCURRENCES: u16 = u16::MAX;

/// Open or closed: a calendar's default and each entry's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WindowKind {
    Open,
    Closed,
}

/// When an entry applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntrySpan {
    /// `[start, end)`.
    Range { start: Timestamp, end: Timestamp },
    /// Occurrences of `rrule` (the value of an RFC 5545 RRULE line, e.g.
    /// `FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR`) starting at `start` (the first occurrence, DTSTART;
    /// later ones keep its wall-clock time in the calendar's zone), each lasting
    /// `duration_micros`.
    Recurrence {
        start: Timestamp,
        rrule: String,
        duration_micros: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalendarEntry {
    pub kind: WindowKind,
    pub reason: String,
    pub span: EntrySpan,
}

/// A calendar's rules, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalendarRules {
    pub time_zone: String,
    pub default: WindowKind,
    pub entries: Vec<CalendarEntry>,
}

/// A stored calendar: its name (unique, what policies name it by), description and rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalendarRecord {
    pub name: String,
    pub description: String,
    pub rules: CalendarRules,
    pub revision: i64,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
}

impl CalendarRecord {
    /// AIP-154: changes with every revision.
    pub fn etag(&self) -> String {
        format!("c{}", self.revision)
    }

    /// Refuses a stale `given` etag (an empty one makes the write unconditional).
    pub fn check_etag(&self, given: Option<&str>) -> Result<(), DomainError> {
        crate::validation::check_etag(self.etag(), given)
    }

    /// Validates the name (letters, digits, `-`, `_`, `.`; 1 to 63 characters) and compiles
    /// the rules; every violation at once, fields prefixed by `prefix` (`calendar.`).
    pub fn validate(&self, prefix: &str) -> Result<Calendar, DomainError> {
        let mut violations = Vec::new();
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            violations.push(FieldViolation {
                field: format!("{prefix}name"),
                description:
                    "is required: letters, digits, '-', '_' and '.', at most 63 characters"
                        .to_owned(),
            });
        }
        if self.description.chars().any(|c| c == '\0') {
            violations.push(FieldViolation {
                field: format!("{prefix}description"),
                description: "must not contain NUL".to_owned(),
            });
        }
        match Calendar::compile(&self.rules) {
            Ok(calendar) if violations.is_empty() => Ok(calendar),
            Ok(_) => Err(DomainError::InvalidArgument(violations)),
            Err(DomainError::InvalidArgument(list)) => {
                violations.extend(list.into_iter().map(|v| FieldViolation {
                    field: format!("{prefix}{}", v.field),
                    description: v.description,
                }));
                Err(DomainError::InvalidArgument(violations))
            }
            Err(other) => Err(other),
        }
    }
}

/// A validated calendar, ready to answer [`Calendar::state_at`].
#[derive(Debug, Clone)]
pub struct Calendar {
    default: WindowKind,
    entries: Vec<Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    kind: WindowKind,
    span: CompiledSpan,
}

#[derive(Debug, Clone)]
enum CompiledSpan {
    Range { start: i64, end: i64 },
    Recurrence { set: Box<RRuleSet>, duration: i64 },
}

/// The answer of `GetCalendarState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarState {
    pub open: bool,
    /// Index in [`CalendarRules::entries`] of the entry that decides; `None`: the default.
    pub deciding_entry: Option<usize>,
    /// When closed: the first instant after which it is open, within [`HORIZON_MICROS`].
    pub next_open_time: Option<Timestamp>,
    /// When open: the first instant at which it is closed, within [`HORIZON_MICROS`].
    pub next_close_time: Option<Timestamp>,
}

/// One covered span of one entry: `[start, end)`.
#[derive(Debug, Clone, Copy)]
struct Interval {
    start: i64,
    end: i64,
    kind: WindowKind,
    entry: usize,
}

fn utc(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

impl Calendar {
    /// Validates `rules`: a known IANA zone, ranges with `end > start`, positive durations and
    /// RRULEs the `rrule` crate accepts. Violations name the field (`time_zone`,
    /// `entries[2].rrule`, ...).
    pub fn compile(rules: &CalendarRules) -> Result<Self, DomainError> {
        let mut violations = Vec::new();
        let tz: Option<chrono_tz::Tz> = match rules.time_zone.parse() {
            Ok(tz) => Some(tz),
            Err(_) => {
                violations.push(FieldViolation::new(
                    "time_zone",
                    format!("unknown IANA time zone {:?}", rules.time_zone),
                ));
                None
            }
        };
        let mut entries = Vec::with_capacity(rules.entries.len());
        for (i, entry) in rules.entries.iter().enumerate() {
            match &entry.span {
                EntrySpan::Range { start, end } => {
                    if end <= start {
                        violations.push(FieldViolation::new(
                            format!("entries[{i}].end_time"),
                            "must be after start_time",
                        ));
                        continue;
                    }
                    entries.push(Compiled {
                        kind: entry.kind,
                        span: CompiledSpan::Range {
                            start: start.as_micros(),
                            end: end.as_micros(),
                        },
                    });
                }
                EntrySpan::Recurrence {
                    start,
                    rrule,
                    duration_micros,
                } => {
                    if *duration_micros <= 0 {
                        violations.push(FieldViolation::new(
                            format!("entries[{i}].duration"),
                            "must be positive",
                        ));
                    }
                    let Some(tz) = tz else { continue };
                    let Some(dtstart) = utc(start.as_micros()) else {
                        violations.push(FieldViolation::new(
                            format!("entries[{i}].start_time"),
                            "out of range",
                        ));
                        continue;
                    };
                    let dtstart = dtstart.with_timezone(&rrule::Tz::Tz(tz));
                    let set = rrule
                        .parse::<RRule<Unvalidated>>()
                        .and_then(|rule| rule.build(dtstart));
                    match set {
                        Ok(set) if *duration_micros > 0 => entries.push(Compiled {
                            kind: entry.kind,
                            span: CompiledSpan::Recurrence {
                                set: Box::new(set),
                                duration: *duration_micros,
                            },
                        }),
                        Ok(_) => {}
                        Err(e) => violations.push(FieldViolation::new(
                            format!("entries[{i}].rrule"),
                            format!("not a valid RFC 5545 RRULE: {e}"),
                        )),
                    }
                }
            }
        }
        if !violations.is_empty() {
            return Err(DomainError::InvalidArgument(violations));
        }
        Ok(Self {
            default: rules.default,
            entries,
        })
    }

    /// Every covered span of every entry that overlaps `[from, to]`.
    fn intervals(&self, from: i64, to: i64) -> Vec<Interval> {
        let mut out = Vec::new();
        for (entry, compiled) in self.entries.iter().enumerate() {
            match &compiled.span {
                CompiledSpan::Range { start, end } => {
                    if *end > from && *start <= to {
                        out.push(Interval {
                            start: *start,
                            end: *end,
                            kind: compiled.kind,
                            entry,
                        });
                    }
                }
                CompiledSpan::Recurrence { set, duration } => {
                    let tz = set.get_dt_start().timezone();
                    let (Some(after), Some(before)) = (
                        utc(from.saturating_sub(*duration)),
                        utc(to.saturating_add(1)),
                    ) else {
                        continue;
                    };
                    let found = set
                        .as_ref()
                        .clone()
                        .after(after.with_timezone(&tz))
                        .before(before.with_timezone(&tz))
                        .all(MAX_OCCURRENCES);
                    for date in found.dates {
                        let start = date.with_timezone(&Utc).timestamp_micros();
                        let end = start.saturating_add(*duration);
                        if end > from && start <= to {
                            out.push(Interval {
                                start,
                                end,
                                kind: compiled.kind,
                                entry,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    fn decide(&self, intervals: &[Interval], at: i64) -> (bool, Option<usize>) {
        let covering = |kind| {
            intervals
                .iter()
                .filter(|iv| iv.kind == kind && iv.start <= at && at < iv.end)
                .map(|iv| iv.entry)
                .min()
        };
        if let Some(entry) = covering(WindowKind::Closed) {
            return (false, Some(entry));
        }
        if let Some(entry) = covering(WindowKind::Open) {
            return (true, Some(entry));
        }
        (self.default == WindowKind::Open, None)
    }

    /// Open or closed at `at`, the deciding entry, and the next change within
    /// [`HORIZON_MICROS`]. The state only changes where an entry starts or ends, so the first
    /// such boundary with the other state is the next change: no earlier instant is skipped.
    pub fn state_at(&self, at: Timestamp) -> CalendarState {
        let now = at.as_micros();
        let horizon = now.saturating_add(HORIZON_MICROS);
        let intervals = self.intervals(now, horizon);
        let (open, deciding_entry) = self.decide(&intervals, now);
        let mut boundaries: Vec<i64> = intervals
            .iter()
            .flat_map(|iv| [iv.start, iv.end])
            .filter(|b| *b > now && *b <= horizon)
            .collect();
        boundaries.sort_unstable();
        boundaries.dedup();
        let next = boundaries
            .into_iter()
            .find(|b| self.decide(&intervals, *b).0 != open)
            .map(Timestamp::from_micros);
        CalendarState {
            open,
            deciding_entry,
            next_open_time: if open { None } else { next },
            next_close_time: if open { next } else { None },
        }
    }

    /// The first instant at or after `at` when the calendar is open (`at` itself when open).
    pub fn next_open_at_or_after(&self, at: Timestamp) -> Option<Timestamp> {
        let state = self.state_at(at);
        if state.open {
            Some(at)
        } else {
            state.next_open_time
        }
    }
}

/// Which calendar keeps a request from applying at `at`, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked<'a> {
    /// The name of the first closed calendar.
    pub calendar: &'a str,
    /// The first instant at or after `at` when every calendar is open, within the horizon.
    pub next_open_time: Option<Timestamp>,
}

/// The earliest instant a request may apply: no earlier than `earliest` (approval plus the
/// policy's `apply_delay`) and when every calendar of its snapshot is open. `Ok(at)` when open
/// at `earliest`; otherwise the first closed calendar and the next instant all are open.
pub fn when_all_open<'a>(
    calendars: &'a [(String, Calendar)],
    earliest: Timestamp,
) -> Result<Timestamp, Blocked<'a>> {
    let blocker = calendars
        .iter()
        .find(|(_, cal)| !cal.state_at(earliest).open)
        .map(|(name, _)| name.as_str());
    let Some(calendar) = blocker else {
        return Ok(earliest);
    };
    // Move to the next open instant of each calendar in turn until all agree; each round
    // moves forward, and the horizon bounds the number of rounds.
    let mut at = earliest;
    let limit = earliest.saturating_add_micros(HORIZON_MICROS);
    let next_open_time = loop {
        let mut moved = false;
        let mut gone = false;
        for (_, cal) in calendars {
            match cal.next_open_at_or_after(at) {
                Some(t) if t == at => {}
                Some(t) => {
                    at = t;
                    moved = true;
                }
                None => gone = true,
            }
        }
        if gone || at > limit {
            break None;
        }
        if !moved {
            break Some(at);
        }
    };
    Err(Blocked {
        calendar,
        next_open_time,
    })
}

/// Why a request may not apply at an instant: the first closed calendar of its snapshot, the
/// reason of the entry (or default) that closes it, and the first instant at or after that one
/// when every calendar of the snapshot is open (within [`HORIZON_MICROS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    pub calendar: String,
    pub reason: String,
    pub next_open_time: Option<Timestamp>,
}

impl Closure {
    /// "calendar freeze is closed (year-end freeze) until 2027-01-04T08:00:00Z".
    pub fn describe(&self) -> String {
        let until = match self.next_open_time {
            Some(t) => format!("until {}", rfc3339(t)),
            None => "with no open window in the next 400 days".to_owned(),
        };
        format!(
            "calendar {} is closed ({}) {until}",
            self.calendar, self.reason
        )
    }
}

/// The calendars a request's snapshot names, as they are stored now, compiled: what an apply
/// checks. Names the snapshot lists but no calendar holds any longer close nothing (deleting a
/// freeze releases what it held).
#[derive(Debug, Clone, Default)]
pub struct Windows {
    calendars: Vec<(String, Calendar)>,
    rules: Vec<CalendarRules>,
}

impl Windows {
    /// No calendars: always open.
    pub fn none() -> Self {
        Self::default()
    }

    /// The compiled `records`; a stored calendar that no longer compiles is an error (it was
    /// valid when written).
    pub fn from_records(records: &[CalendarRecord]) -> Result<Self, DomainError> {
        let mut windows = Self::default();
        for record in records {
            let compiled = Calendar::compile(&record.rules)?;
            windows.calendars.push((record.name.clone(), compiled));
            windows.rules.push(record.rules.clone());
        }
        Ok(windows)
    }

    pub fn is_empty(&self) -> bool {
        self.calendars.is_empty()
    }

    /// `None` when every calendar is open at `at`; otherwise why not, and until when.
    pub fn closed_at(&self, at: Timestamp) -> Option<Closure> {
        let blocked = when_all_open(&self.calendars, at).err()?;
        let index = self
            .calendars
            .iter()
            .position(|(name, _)| name == blocked.calendar)?;
        let state = self.calendars[index].1.state_at(at);
        let reason = match state.deciding_entry {
            Some(entry) => match self.rules[index].entries.get(entry) {
                Some(e) if !e.reason.trim().is_empty() => e.reason.clone(),
                _ => format!("entry {entry}"),
            },
            None => "closed by default".to_owned(),
        };
        Some(Closure {
            calendar: blocked.calendar.to_owned(),
            reason,
            next_open_time: blocked.next_open_time,
        })
    }
}

/// RFC 3339 in UTC, as error metadata and event details show instants.
pub fn rfc3339(t: Timestamp) -> String {
    match utc(t.as_micros()) {
        Some(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => format!("{} microseconds since the epoch", t.as_micros()),
    }
}

/// Wall time in `zone` to a [`Timestamp`], for tests and callers holding local times. `None`
/// when the wall time does not exist or is ambiguous (a daylight-saving change).
pub fn local_timestamp(
    zone: &str,
    (y, mo, d): (i32, u32, u32),
    (h, mi, s): (u32, u32, u32),
) -> Option<Timestamp> {
    let tz: chrono_tz::Tz = zone.parse().ok()?;
    let dt = tz.with_ymd_and_hms(y, mo, d, h, mi, s).single()?;
    Some(Timestamp::from_micros(
        dt.with_timezone(&Utc).timestamp_micros(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: i64 = 3600 * 1_000_000;

    fn weekdays_9_to_17(zone: &str, first: (i32, u32, u32)) -> CalendarRules {
        CalendarRules {
            time_zone: zone.into(),
            default: WindowKind::Closed,
            entries: vec![CalendarEntry {
                kind: WindowKind::Open,
                reason: "business hours".into(),
                span: EntrySpan::Recurrence {
                    start: local_timestamp(zone, first, (9, 0, 0)).expect("a wall time"),
                    rrule: "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR".into(),
                    duration_micros: 8 * HOUR,
                },
            }],
        }
    }

    fn at(zone: &str, date: (i32, u32, u32), time: (u32, u32, u32)) -> Timestamp {
        local_timestamp(zone, date, time).expect("a wall time")
    }

    /// Berlin moves to summer time on Sunday 2026-03-29; the window on Monday 03-30 is still
    /// 09:00-17:00 local (07:00-15:00 UTC, not 08:00-16:00 as the week before).
    #[test]
    fn berlin_window_keeps_local_hours_across_the_spring_change() {
        let z = "Europe/Berlin";
        let cal = Calendar::compile(&weekdays_9_to_17(z, (2026, 3, 2))).expect("valid");
        let friday = cal.state_at(at(z, (2026, 3, 27), (16, 59, 0)));
        assert!(friday.open);
        assert_eq!(friday.deciding_entry, Some(0));
        assert_eq!(
            friday.next_close_time,
            Some(at(z, (2026, 3, 27), (17, 0, 0)))
        );
        let sunday = cal.state_at(at(z, (2026, 3, 29), (12, 0, 0)));
        assert!(!sunday.open);
        assert_eq!(sunday.deciding_entry, None);
        let monday_nine = at(z, (2026, 3, 30), (9, 0, 0));
        assert_eq!(sunday.next_open_time, Some(monday_nine));
        assert_eq!(
            monday_nine.as_micros(),
            DateTime::parse_from_rfc3339("2026-03-30T07:00:00Z")
                .expect("valid")
                .timestamp_micros()
        );
        assert!(!cal.state_at(at(z, (2026, 3, 30), (8, 59, 59))).open);
        assert!(!cal.state_at(at(z, (2026, 3, 30), (17, 0, 0))).open);
        // Autumn: 2026-10-25 back to winter time; Monday 10-26 09:00 is 08:00 UTC.
        let sunday = cal.state_at(at(z, (2026, 10, 25), (12, 0, 0)));
        assert_eq!(
            sunday.next_open_time.expect("valid").as_micros(),
            DateTime::parse_from_rfc3339("2026-10-26T08:00:00Z")
                .expect("valid")
                .timestamp_micros()
        );
    }

    /// New York changes on Sunday 2026-03-08 and 2026-11-01; a daily 09:00-17:00 window on the
    /// change days themselves is 8 h long in local hours.
    #[test]
    fn new_york_daily_window_on_the_change_days() {
        let z = "America/New_York";
        let mut rules = weekdays_9_to_17(z, (2026, 3, 1));
        if let EntrySpan::Recurrence { rrule, .. } = &mut rules.entries[0].span {
            *rrule = "FREQ=DAILY".into();
        }
        let cal = Calendar::compile(&rules).expect("valid");
        for day in [(2026, 3, 8), (2026, 11, 1)] {
            let open = cal.state_at(at(z, day, (9, 0, 0)));
            assert!(open.open, "{day:?}");
            assert_eq!(
                open.next_close_time,
                Some(at(z, day, (17, 0, 0))),
                "{day:?}"
            );
            let before = cal.state_at(at(z, day, (3, 30, 0)));
            assert_eq!(
                before.next_open_time,
                Some(at(z, day, (9, 0, 0))),
                "{day:?}"
            );
        }
        // 13:00 UTC is 09:00 EDT on 03-08 (summer time) and 08:00 EST on 11-01.
        let t = |s: &str| {
            Timestamp::from_micros(
                DateTime::parse_from_rfc3339(s)
                    .expect("valid")
                    .timestamp_micros(),
            )
        };
        assert!(cal.state_at(t("2026-03-08T13:00:00Z")).open);
        assert!(!cal.state_at(t("2026-11-01T13:00:00Z")).open);
    }

    /// "Every Friday from 16:00 for 64 h": closed over the weekend, crossing midnight twice.
    #[test]
    fn weekend_freeze_crosses_midnight() {
        let z = "Europe/Berlin";
        let rules = CalendarRules {
            time_zone: z.into(),
            default: WindowKind::Open,
            entries: vec![CalendarEntry {
                kind: WindowKind::Closed,
                reason: "weekend".into(),
                span: EntrySpan::Recurrence {
                    start: at(z, (2026, 1, 2), (16, 0, 0)),
                    rrule: "FREQ=WEEKLY;BYDAY=FR".into(),
                    duration_micros: 64 * HOUR,
                },
            }],
        };
        let cal = Calendar::compile(&rules).expect("valid");
        let saturday = cal.state_at(at(z, (2026, 6, 13), (0, 30, 0)));
        assert!(!saturday.open);
        assert_eq!(saturday.deciding_entry, Some(0));
        assert_eq!(
            saturday.next_open_time,
            Some(at(z, (2026, 6, 15), (8, 0, 0)))
        );
        let thursday = cal.state_at(at(z, (2026, 6, 11), (10, 0, 0)));
        assert!(thursday.open);
        assert_eq!(
            thursday.next_close_time,
            Some(at(z, (2026, 6, 12), (16, 0, 0)))
        );
    }

    /// A closed range inside an open window wins; the window reopens when the freeze ends, and
    /// the next open time skips a second, overlapping freeze.
    #[test]
    fn closed_entries_win_over_open_ones() {
        let z = "UTC";
        let mut rules = weekdays_9_to_17(z, (2026, 6, 1));
        rules.entries.push(CalendarEntry {
            kind: WindowKind::Closed,
            reason: "launch".into(),
            span: EntrySpan::Range {
                start: at(z, (2026, 6, 3), (12, 0, 0)),
                end: at(z, (2026, 6, 3), (14, 0, 0)),
            },
        });
        rules.entries.push(CalendarEntry {
            kind: WindowKind::Closed,
            reason: "incident".into(),
            span: EntrySpan::Range {
                start: at(z, (2026, 6, 3), (13, 0, 0)),
                end: at(z, (2026, 6, 3), (15, 0, 0)),
            },
        });
        let cal = Calendar::compile(&rules).expect("valid");
        let s = cal.state_at(at(z, (2026, 6, 3), (12, 30, 0)));
        assert!(!s.open);
        assert_eq!(s.deciding_entry, Some(1));
        assert_eq!(s.next_open_time, Some(at(z, (2026, 6, 3), (15, 0, 0))));
        let s = cal.state_at(at(z, (2026, 6, 3), (11, 0, 0)));
        assert!(s.open);
        assert_eq!(s.next_close_time, Some(at(z, (2026, 6, 3), (12, 0, 0))));
    }

    #[test]
    fn bad_rules_name_their_fields() {
        let rules = CalendarRules {
            time_zone: "Mars/Olympus".into(),
            default: WindowKind::Open,
            entries: vec![CalendarEntry {
                kind: WindowKind::Closed,
                reason: String::new(),
                span: EntrySpan::Range {
                    start: Timestamp::from_micros(10),
                    end: Timestamp::from_micros(10),
                },
            }],
        };
        let Err(DomainError::InvalidArgument(v)) = Calendar::compile(&rules) else {
            panic!("accepted");
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["time_zone", "entries[0].end_time"]);
        let mut rules = weekdays_9_to_17("UTC", (2026, 1, 1));
        if let EntrySpan::Recurrence { rrule, .. } = &mut rules.entries[0].span {
            *rrule = "FREQ=SOMETIMES".into();
        }
        let Err(DomainError::InvalidArgument(v)) = Calendar::compile(&rules) else {
            panic!("accepted");
        };
        assert_eq!(v[0].field, "entries[0].rrule");
    }

    /// Two calendars: business hours and a freeze. The request waits for an instant both are
    /// open; with none, the first closed calendar is named.
    #[test]
    fn all_calendars_must_be_open() {
        let z = "UTC";
        let hours = Calendar::compile(&weekdays_9_to_17(z, (2026, 6, 1))).expect("valid");
        let freeze = Calendar::compile(&CalendarRules {
            time_zone: z.into(),
            default: WindowKind::Open,
            entries: vec![CalendarEntry {
                kind: WindowKind::Closed,
                reason: "launch".into(),
                span: EntrySpan::Range {
                    start: at(z, (2026, 6, 3), (8, 0, 0)),
                    end: at(z, (2026, 6, 4), (12, 0, 0)),
                },
            }],
        })
        .expect("valid");
        let cals = vec![("hours".to_string(), hours), ("freeze".to_string(), freeze)];
        let open = at(z, (2026, 6, 2), (10, 0, 0));
        assert_eq!(when_all_open(&cals, open), Ok(open));
        // Wednesday 07:00: hours closed, then the freeze until Thursday 12:00.
        let blocked = when_all_open(&cals, at(z, (2026, 6, 3), (7, 0, 0))).expect_err("closed");
        assert_eq!(blocked.calendar, "hours");
        assert_eq!(
            blocked.next_open_time,
            Some(at(z, (2026, 6, 4), (12, 0, 0)))
        );
        let blocked = when_all_open(&cals, at(z, (2026, 6, 3), (10, 0, 0))).expect_err("closed");
        assert_eq!(blocked.calendar, "freeze");
        assert_eq!(
            blocked.next_open_time,
            Some(at(z, (2026, 6, 4), (12, 0, 0)))
        );
    }

    fn entry() -> impl Strategy<Value = CalendarEntry> {
        let base = 1_780_000_000_000_000i64; // 2026-05-28
        (
            any::<bool>(),
            0i64..(30 * 24),
            1i64..72,
            prop::sample::select(vec![
                None,
                Some("FREQ=DAILY"),
                Some("FREQ=WEEKLY;BYDAY=MO,FR"),
            ]),
        )
            .prop_map(move |(closed, start_h, len_h, rule)| CalendarEntry {
                kind: if closed {
                    WindowKind::Closed
                } else {
                    WindowKind::Open
                },
                reason: String::new(),
                span: match rule {
                    None => EntrySpan::Range {
                        start: Timestamp::from_micros(base + start_h * HOUR),
                        end: Timestamp::from_micros(base + (start_h + len_h) * HOUR),
                    },
                    Some(r) => EntrySpan::Recurrence {
                        start: Timestamp::from_micros(base + start_h * HOUR),
                        rrule: r.into(),
                        duration_micros: len_h * HOUR / 4 + HOUR,
                    },
                },
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The next open instant is open and inside no closed entry, and every sampled instant
        /// before it is closed (none was skipped).
        #[test]
        fn next_open_is_open_and_first(
            entries in prop::collection::vec(entry(), 0..5),
            default_open in any::<bool>(),
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York"]),
            offset_min in 0i64..(40 * 24 * 60),
            samples in prop::collection::vec(0.0f64..1.0, 16),
        ) {
            let rules = CalendarRules {
                time_zone: zone.into(),
                default: if default_open { WindowKind::Open } else { WindowKind::Closed },
                entries,
            };
            let cal = Calendar::compile(&rules).expect("valid");
            let now = Timestamp::from_micros(1_780_000_000_000_000 + offset_min * 60_000_000);
            let state = cal.state_at(now);
            if let Some(next) = state.next_open_time {
                prop_assert!(!state.open);
                prop_assert!(next > now);
                let there = cal.state_at(next);
                prop_assert!(there.open);
                let intervals = cal.intervals(next.as_micros(), next.as_micros());
                prop_assert!(!intervals.iter().any(|iv| iv.kind == WindowKind::Closed
                    && iv.start <= next.as_micros() && next.as_micros() < iv.end));
                let span = (next.as_micros() - now.as_micros()) as f64;
                for f in samples {
                    let t = Timestamp::from_micros(now.as_micros() + (span * f) as i64);
                    prop_assert!(!cal.state_at(t).open, "open at {t:?} before {next:?}");
                }
                // One microsecond earlier is still closed.
                prop_assert!(!cal.state_at(Timestamp::from_micros(next.as_micros() - 1)).open);
            }
        }
    }
}
