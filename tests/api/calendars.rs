//! Change calendars through the real server (issue 26): CRUD, validation, scopes and the state
//! at an instant.

use approvals::{
    auth::AuthConfig,
    pb::{self, WindowKind},
};
use tonic::Code;

use crate::{
    callers::*,
    common::{TestServer, assert_error, assert_invalid},
};

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// Monday 2026-03-02 00:00 UTC.
const MONDAY: i64 = 1_772_409_600;

/// Open on weekdays 09:00-17:00 Berlin time, with a closed freeze on Wednesday 2026-03-04.
fn business_hours(name: &str) -> pb::Calendar {
    pb::Calendar {
        name: name.into(),
        description: "office hours".into(),
        time_zone: "Europe/Berlin".into(),
        default: WindowKind::Closed as i32,
        entries: vec![
            pb::CalendarEntry {
                kind: WindowKind::Open as i32,
                reason: "business hours".into(),
                // 09:00 wall time in Berlin on the first Monday.
                recurrence: Some(pb::Recurrence {
                    start_time: Some(ts(MONDAY + 8 * 3600)),
                    rrule: "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR".into(),
                    duration: Some(prost_types::Duration {
                        seconds: 8 * 3600,
                        nanos: 0,
                    }),
                }),
                ..Default::default()
            },
            pb::CalendarEntry {
                kind: WindowKind::Closed as i32,
                reason: "release freeze".into(),
                range: Some(pb::TimeRange {
                    start_time: Some(ts(MONDAY + 2 * 86_400 - 3600)),
                    end_time: Some(ts(MONDAY + 3 * 86_400 - 3600)),
                }),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

async fn admin(server: &TestServer) -> CalendarsClient {
    calendars(server, Headers::actor("user:root")).await
}

async fn state_at(client: &mut CalendarsClient, name: &str, at: i64) -> pb::CalendarState {
    client
        .get_calendar_state(pb::GetCalendarStateRequest {
            calendar: name.into(),
            time: Some(ts(at)),
        })
        .await
        .expect("state")
        .into_inner()
}

#[tokio::test]
async fn calendars_crud_and_state() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;

    let created = admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(business_hours("office")),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.revision, 1);
    assert_eq!(created.entries, business_hours("office").entries);

    let again = admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(business_hours("office")),
        })
        .await
        .expect_err("same name");
    assert_error(&again, Code::AlreadyExists, "CALENDAR_ALREADY_EXISTS");

    let got = admin
        .get_calendar(pb::GetCalendarRequest {
            name: "office".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got, created);

    // Monday 10:00 Berlin (09:00 UTC): open until 17:00 Berlin.
    let monday = state_at(&mut admin, "office", MONDAY + 9 * 3600).await;
    assert!(monday.open);
    assert_eq!(monday.deciding_entry, Some(0));
    assert_eq!(monday.reason, "business hours");
    assert_eq!(monday.next_close_time, Some(ts(MONDAY + 16 * 3600)));
    // Monday 20:00 Berlin: closed by default, opens Tuesday 09:00 Berlin.
    let evening = state_at(&mut admin, "office", MONDAY + 19 * 3600).await;
    assert!(!evening.open);
    assert_eq!(evening.deciding_entry, None);
    assert_eq!(evening.next_open_time, Some(ts(MONDAY + 86_400 + 8 * 3600)));
    // Wednesday 10:00 Berlin: the freeze wins over the open window; opens Thursday 09:00.
    let frozen = state_at(&mut admin, "office", MONDAY + 2 * 86_400 + 9 * 3600).await;
    assert!(!frozen.open);
    assert_eq!(frozen.deciding_entry, Some(1));
    assert_eq!(frozen.reason, "release freeze");
    assert_eq!(
        frozen.next_open_time,
        Some(ts(MONDAY + 3 * 86_400 + 8 * 3600))
    );

    // Update replaces the rules: without the freeze, Wednesday is open.
    let mut edited = business_hours("office");
    edited.entries.truncate(1);
    let updated = admin
        .update_calendar(pb::UpdateCalendarRequest {
            calendar: Some(edited),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.entries.len(), 1);
    let wednesday = state_at(&mut admin, "office", MONDAY + 2 * 86_400 + 9 * 3600).await;
    assert!(wednesday.open);

    admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(business_hours("another")),
        })
        .await
        .expect("create another");
    let page = admin
        .list_calendars(pb::ListCalendarsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.calendars.len(), 1);
    assert_eq!(page.calendars[0].name, "another");
    let rest = admin
        .list_calendars(pb::ListCalendarsRequest {
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .expect("list on")
        .into_inner();
    assert_eq!(rest.calendars.len(), 1);
    assert_eq!(rest.calendars[0].name, "office");
    assert!(rest.next_page_token.is_empty());

    admin
        .delete_calendar(pb::DeleteCalendarRequest {
            name: "office".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let gone = admin
        .get_calendar_state(pb::GetCalendarStateRequest {
            calendar: "office".into(),
            time: None,
        })
        .await
        .expect_err("deleted");
    assert_error(&gone, Code::NotFound, "CALENDAR_NOT_FOUND");
    let gone = admin
        .delete_calendar(pb::DeleteCalendarRequest {
            name: "office".into(),
            ..Default::default()
        })
        .await
        .expect_err("deleted twice");
    assert_error(&gone, Code::NotFound, "CALENDAR_NOT_FOUND");
    server.stop().await;
}

/// AIP-154 on calendars: UpdateCalendar and DeleteCalendar with the etag a caller read are
/// conditional, so two administrators editing one calendar cannot overwrite each other unseen:
/// a stale etag is ABORTED with ETAG_MISMATCH and the current etag, and nothing is written.
#[tokio::test]
async fn calendar_updates_and_deletes_with_a_stale_etag_are_refused() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    let created = admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(business_hours("office")),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.etag, "c1");
    // Two administrators read it; the first one's update goes through.
    let mut first = created.clone();
    first.entries.truncate(1);
    let updated = admin
        .update_calendar(pb::UpdateCalendarRequest {
            calendar: Some(first),
        })
        .await
        .expect("update with the current etag")
        .into_inner();
    assert_eq!((updated.revision, updated.etag.as_str()), (2, "c2"));
    // The second one's, from the same read, is refused, and so is a delete from it.
    let mut second = created.clone();
    second.description = "overwrites the first".into();
    let refused = admin
        .update_calendar(pb::UpdateCalendarRequest {
            calendar: Some(second),
        })
        .await
        .expect_err("a stale etag");
    let message = assert_error(&refused, Code::Aborted, "ETAG_MISMATCH");
    assert!(message.contains("c2"), "{message}");
    let refused = admin
        .delete_calendar(pb::DeleteCalendarRequest {
            name: "office".into(),
            etag: created.etag.clone(),
        })
        .await
        .expect_err("a stale etag");
    assert_error(&refused, Code::Aborted, "ETAG_MISMATCH");
    let kept = admin
        .get_calendar(pb::GetCalendarRequest {
            name: "office".into(),
        })
        .await
        .expect("still there")
        .into_inner();
    assert_eq!(kept, updated, "nothing of the refused calls was written");
    // Without an etag, or with the current one, the calls go through.
    admin
        .update_calendar(pb::UpdateCalendarRequest {
            calendar: Some(pb::Calendar {
                etag: String::new(),
                ..kept.clone()
            }),
        })
        .await
        .expect("an unconditional update");
    admin
        .delete_calendar(pb::DeleteCalendarRequest {
            name: "office".into(),
            etag: "c3".into(),
        })
        .await
        .expect("delete with the current etag");
    server.stop().await;
}

#[tokio::test]
async fn calendars_refuse_bad_fields_at_once() {
    let server = TestServer::start().await;
    let mut admin = admin(&server).await;
    let mut bad = business_hours("bad name");
    bad.default = WindowKind::Unspecified as i32;
    if let Some(r) = &mut bad.entries[0].recurrence {
        r.rrule = "FREQ=SOMETIMES".into();
    }
    if let Some(r) = &mut bad.entries[1].range {
        r.end_time = r.start_time;
    }
    bad.entries.push(pb::CalendarEntry {
        kind: WindowKind::Open as i32,
        ..Default::default()
    });
    let err = admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(bad),
        })
        .await
        .expect_err("bad");
    assert_invalid(
        &err,
        &[
            "calendar.default",
            "calendar.entries[2].range",
            "calendar.name",
            "calendar.entries[0].recurrence.rrule",
            "calendar.entries[1].range.end_time",
        ],
    );
    let mut zone = business_hours("zone");
    zone.time_zone = "Mars/Olympus".into();
    let err = admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(zone),
        })
        .await
        .expect_err("bad zone");
    assert_invalid(&err, &["calendar.time_zone"]);
    let missing = admin
        .update_calendar(pb::UpdateCalendarRequest {
            calendar: Some(business_hours("nowhere")),
        })
        .await
        .expect_err("not there");
    assert_error(&missing, Code::NotFound, "CALENDAR_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn calendars_read_with_read_scope_and_write_with_admin() {
    let (read_key, read) = api_key("user:reader", &["approvals:read"], &[], &[]);
    let (admin_key, admin_entry) = api_key("user:admin", &["approvals:admin"], &[], &[]);
    let server = TestServer::start_with(|c| {
        c.auth = AuthConfig {
            api_keys: vec![read, admin_entry],
            ..AuthConfig::default()
        }
    })
    .await;
    let mut reader = calendars(&server, Headers::bearer(&read_key)).await;
    let mut admin = calendars(&server, Headers::bearer(&admin_key)).await;
    let err = reader
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(business_hours("office")),
        })
        .await
        .expect_err("read may not write");
    assert_error(&err, Code::PermissionDenied, "MISSING_SCOPE");
    admin
        .create_calendar(pb::CreateCalendarRequest {
            calendar: Some(business_hours("office")),
        })
        .await
        .expect("admin writes");
    let state = state_at(&mut reader, "office", MONDAY + 9 * 3600).await;
    assert!(state.open);
    reader
        .list_calendars(pb::ListCalendarsRequest::default())
        .await
        .expect("read lists");
    server.stop().await;
}
