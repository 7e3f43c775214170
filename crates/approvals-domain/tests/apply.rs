//! Applying, scheduling, expiry and conflicts in the domain, without I/O.

use approvals_domain::{
    Actor, ApplyMode, ApplyOutcome, ApplyWiring, ChangeInput, ChangeRequest, Decision, DomainError,
    EventKind, NewChangeRequest, Policy, PolicyRules, PolicySnapshot, Principal, ResourceVersion,
    ScheduleAt, ScheduleStatus, State, Timestamp, calendar::Windows,
};

const NOW: Timestamp = Timestamp::from_micros(1_700_000_000_000_000);
const SECOND: i64 = 1_000_000;

fn at(seconds: i64) -> Timestamp {
    NOW.saturating_add_micros(seconds * SECOND)
}

fn actor(name: &str, groups: &[&str]) -> Actor {
    Actor::new(
        Principal::parse(name).expect("principal"),
        groups.iter().map(|g| g.to_string()).collect(),
    )
}

fn wiring() -> ApplyWiring {
    ApplyWiring {
        policy_name: "web".into(),
        applier_endpoint: "http://applier:1".into(),
        appliers: vec![Principal::parse("group:deployers").expect("group")],
        executors: vec![Principal::parse("service:pipeline").expect("service")],
        forbid_bypass: false,
    }
}

fn request(
    mode: ApplyMode,
    base_version: Option<&str>,
    apply_time: Option<Timestamp>,
) -> ChangeRequest {
    let policy = PolicySnapshot {
        name: "web".into(),
        uid: "uid-web".into(),
        project: "web".into(),
        environment: String::new(),
        action_key: "*".into(),
        rules: PolicyRules {
            min_approvals: 1,
            apply_mode: mode,
            ..PolicyRules::default()
        },
        matched_conditions: Vec::new(),
        condition_errors: Vec::new(),
    };
    let new = NewChangeRequest {
        project: "web".into(),
        environment: "prod".into(),
        action_key: "flag".into(),
        action_version: 1,
        title: String::new(),
        description: String::new(),
        changes: vec![ChangeInput {
            id: None,
            action: "update".into(),
            resource_type: "feature_flag".into(),
            resource_id: "checkout".into(),
            payload: serde_json::Map::new(),
            base_version: base_version.map(str::to_owned),
        }],
        intent_display: String::new(),
        expire_time: Some(at(3600)),
        draft: false,
        apply_time,
        justification: String::new(),
    };
    let mut n = 0;
    ChangeRequest::create(
        "cr".into(),
        new,
        &actor("user:alice", &[]),
        policy,
        NOW,
        &mut || {
            n += 1;
            format!("c{n}")
        },
    )
    .expect("create")
    .0
}

fn approved(mode: ApplyMode) -> ChangeRequest {
    let mut r = request(mode, Some("1"), None);
    r.review(
        &actor("user:bob", &[]),
        Decision::Approve,
        String::new(),
        at(1),
    )
    .expect("approve");
    r
}

#[test]
fn auto_requests_are_due_at_once_and_start_on_behalf_of_the_quorum_approver() {
    let mut r = approved(ApplyMode::Auto);
    assert_eq!(r.state, State::Approved);
    assert_eq!(r.next_due_time(), Some(at(1)));
    let event = r
        .start_automatic_apply(
            &wiring(),
            &Windows::none(),
            "k1".into(),
            "replica-a",
            30 * SECOND,
            at(2),
        )
        .expect("starts");
    assert_eq!(
        (event.kind, event.to_state, event.actor.as_str()),
        (EventKind::ApplyStarted, State::Applying, "user:bob")
    );
    assert_eq!(
        r.next_due_time(),
        Some(at(32)),
        "due again when the lease runs out"
    );
    assert!(
        r.start_automatic_apply(
            &wiring(),
            &Windows::none(),
            "k2".into(),
            "replica-b",
            30 * SECOND,
            at(3)
        )
        .is_none(),
        "started once"
    );
    assert!(
        !r.take_over_lease("replica-b", 30 * SECOND, at(10)),
        "lease still held"
    );
    assert!(
        r.take_over_lease("replica-b", 30 * SECOND, at(33)),
        "expired lease taken over"
    );
    assert!(r.runs("k1", "replica-b"), "same key after the takeover");
}

#[test]
fn transient_failures_retry_then_give_up() {
    let mut r = approved(ApplyMode::Auto);
    r.start_automatic_apply(
        &wiring(),
        &Windows::none(),
        "k".into(),
        "a",
        30 * SECOND,
        at(2),
    )
    .expect("starts");
    assert!(
        r.record_transient_failure("Unavailable".into(), 3, at(3), 30 * SECOND, at(2))
            .is_none()
    );
    assert!(
        r.record_transient_failure("Unavailable".into(), 3, at(5), 30 * SECOND, at(4))
            .is_none()
    );
    let event = r
        .record_transient_failure("Unavailable: down".into(), 3, at(9), 30 * SECOND, at(8))
        .expect("gives up");
    assert_eq!(
        (event.kind, event.to_state),
        (EventKind::ApplyFailed, State::ApplyFailed)
    );
    assert_eq!(
        r.apply_error.as_deref(),
        Some("gave up after 3 attempts: Unavailable: down")
    );
}

#[test]
fn finishing_records_outcomes_once_per_key() {
    let mut r = approved(ApplyMode::Auto);
    r.start_automatic_apply(
        &wiring(),
        &Windows::none(),
        "k".into(),
        "a",
        30 * SECOND,
        at(2),
    )
    .expect("starts");
    assert!(
        r.finish_apply("other", ApplyOutcome::Failed { error: "x".into() }, at(3))
            .is_none(),
        "stale key ignored"
    );
    let event = r
        .finish_apply(
            "k",
            ApplyOutcome::Applied {
                result_data: None,
                versions: vec![],
            },
            at(3),
        )
        .expect("applied");
    assert_eq!(
        (
            event.kind,
            r.state,
            r.applied_by.as_ref().map(|p| p.as_str())
        ),
        (EventKind::Applied, State::Applied, Some("user:bob"))
    );
    assert!(
        r.finish_apply(
            "k",
            ApplyOutcome::Failed {
                error: "late".into()
            },
            at(4)
        )
        .is_none(),
        "once"
    );
}

#[test]
fn manual_apply_permissions_and_refusals() {
    let mut r = approved(ApplyMode::Manual);
    let outsider = r.start_manual_apply(
        &actor("user:carol", &[]),
        &wiring(),
        &Windows::none(),
        None,
        "k".into(),
        "a",
        SECOND,
        at(2),
    );
    assert!(matches!(outsider, Err(DomainError::NotApplier { .. })));
    let mut no_endpoint = wiring();
    no_endpoint.applier_endpoint.clear();
    let refused = r.start_manual_apply(
        &actor("user:alice", &[]),
        &no_endpoint,
        &Windows::none(),
        None,
        "k".into(),
        "a",
        SECOND,
        at(2),
    );
    assert!(
        matches!(refused, Err(DomainError::CannotApply(ref m)) if m.contains("policy \"web\"")),
        "{refused:?}"
    );
    let event = r
        .start_manual_apply(
            &actor("user:dave", &["deployers"]),
            &wiring(),
            &Windows::none(),
            None,
            "k".into(),
            "a",
            SECOND,
            at(2),
        )
        .expect("an applier by group");
    assert_eq!(event.kind, EventKind::ApplyStarted);
}

#[test]
fn break_glass_needs_a_policy_that_allows_it() {
    let mut r = request(ApplyMode::Manual, None, None);
    let mut forbidding = wiring();
    forbidding.forbid_bypass = true;
    let refused = r.start_manual_apply(
        &actor("user:oncall", &[]),
        &forbidding,
        &Windows::none(),
        Some("down".into()),
        "k".into(),
        "a",
        SECOND,
        at(1),
    );
    assert!(matches!(refused, Err(DomainError::BypassForbidden { .. })));
    let event = r
        .start_manual_apply(
            &actor("user:oncall", &[]),
            &wiring(),
            &Windows::none(),
            Some("down".into()),
            "k".into(),
            "a",
            SECOND,
            at(1),
        )
        .expect("bypass");
    assert_eq!(
        (event.kind, event.from_state, event.to_state),
        (EventKind::Bypassed, State::InReview, State::Applying)
    );
    assert_eq!(
        r.bypassed_by.as_ref().map(|p| p.as_str()),
        Some("user:oncall")
    );
}

#[test]
fn schedules_and_expiry() {
    let mut r = approved(ApplyMode::Manual);
    let err = r
        .schedule(
            &actor("user:alice", &[]),
            &wiring(),
            &Windows::none(),
            ScheduleAt::Time(at(7200)),
            at(2),
        )
        .expect_err("after expiry");
    assert!(matches!(err, DomainError::InvalidArgument(_)));
    r.schedule(
        &actor("user:alice", &[]),
        &wiring(),
        &Windows::none(),
        ScheduleAt::Time(at(60)),
        at(2),
    )
    .expect("schedule");
    assert_eq!(
        (r.state, r.next_due_time()),
        (State::Scheduled, Some(at(60)))
    );
    assert!(
        r.start_automatic_apply(&wiring(), &Windows::none(), "k".into(), "a", SECOND, at(59))
            .is_none(),
        "not yet"
    );
    let event = r
        .start_automatic_apply(&wiring(), &Windows::none(), "k".into(), "a", SECOND, at(60))
        .expect("at its time");
    assert_eq!(event.actor.as_str(), "user:alice");

    let mut open = request(ApplyMode::Manual, None, None);
    assert!(open.expire(at(3599)).is_none());
    let event = open.expire(at(3600)).expect("expires");
    assert_eq!(
        (event.kind, open.state),
        (EventKind::Expired, State::Expired)
    );
    let mut late = request(ApplyMode::Manual, None, None);
    let err = late
        .review(
            &actor("user:bob", &[]),
            Decision::Approve,
            String::new(),
            at(3601),
        )
        .expect_err("expired");
    assert!(matches!(err, DomainError::Expired { .. }));
}

#[test]
fn creation_with_apply_time_schedules_on_quorum() {
    let mut r = request(ApplyMode::Manual, None, Some(at(120)));
    r.review(
        &actor("user:bob", &[]),
        Decision::Approve,
        String::new(),
        at(1),
    )
    .expect("approve");
    assert_eq!(r.state, State::Scheduled);
    assert_eq!(
        r.schedule.as_ref().map(|s| s.scheduled_by.as_str()),
        Some("user:alice")
    );
}

#[test]
fn conflicts_suspend_schedules_and_updates_resolve_them() {
    let moved = vec![ResourceVersion {
        resource_type: "feature_flag".into(),
        resource_id: "checkout".into(),
        version: "2".into(),
    }];
    let mut same = approved(ApplyMode::Manual);
    same.changes[0].base_version = Some("2".into());
    assert!(
        same.mark_conflicts("prod", &moved, "other", at(2))
            .is_none(),
        "written against the new version"
    );
    let mut elsewhere = approved(ApplyMode::Manual);
    assert!(
        elsewhere
            .mark_conflicts("staging", &moved, "other", at(2))
            .is_none(),
        "another environment"
    );

    let mut r = approved(ApplyMode::Manual);
    r.schedule(
        &actor("user:alice", &[]),
        &wiring(),
        &Windows::none(),
        ScheduleAt::Time(at(60)),
        at(2),
    )
    .expect("schedule");
    let event = r
        .mark_conflicts("prod", &moved, "other", at(3))
        .expect("conflict");
    assert_eq!(event.kind, EventKind::ScheduleSuspended);
    assert_eq!(
        r.schedule.as_ref().map(|s| s.status),
        Some(ScheduleStatus::Suspended)
    );
    assert_eq!(
        r.next_due_time(),
        Some(at(3600)),
        "only the expiry remains due"
    );
    let refused = r.start_manual_apply(
        &actor("user:alice", &[]),
        &wiring(),
        &Windows::none(),
        None,
        "k".into(),
        "a",
        SECOND,
        at(4),
    );
    assert!(matches!(
        refused,
        Err(DomainError::InvalidTransition { .. })
    ));

    let mut rewritten = r.changes[0].clone();
    rewritten.base_version = Some("2".into());
    let patch = approvals_domain::ChangeRequestPatch {
        changes: Some(vec![ChangeInput {
            id: Some(rewritten.id.clone()),
            action: rewritten.action,
            resource_type: rewritten.resource_type,
            resource_id: rewritten.resource_id,
            payload: rewritten.payload,
            base_version: rewritten.base_version,
        }]),
        ..Default::default()
    };
    let event = r
        .update_with_versions(
            &actor("user:alice", &[]),
            patch,
            at(5),
            &mut || "new".into(),
            &|_, _| Some("2".into()),
        )
        .expect("resolve");
    assert_eq!(
        (event.from_state, event.to_state),
        (State::Scheduled, State::InReview)
    );
    assert!(r.conflict().is_none() && r.schedule.is_none() && r.approval_count() == 0);
}

#[test]
fn external_completion_by_executors_only() {
    let mut r = approved(ApplyMode::External);
    assert!(
        r.next_due_time() == Some(at(3600)),
        "nothing to start: an executor applies it"
    );
    let err = r
        .complete(
            &actor("user:bob", &[]),
            &wiring(),
            true,
            None,
            String::new(),
            at(2),
        )
        .expect_err("not an executor");
    assert!(matches!(err, DomainError::NotExecutor { .. }));
    let event = r
        .complete(
            &actor("service:pipeline", &[]),
            &wiring(),
            true,
            None,
            String::new(),
            at(2),
        )
        .expect("executor");
    assert_eq!(
        (event.kind, r.state),
        (EventKind::Completed, State::Applied)
    );
    let mut manual = approved(ApplyMode::Manual);
    let err = manual
        .complete(
            &actor("service:pipeline", &[]),
            &wiring(),
            true,
            None,
            String::new(),
            at(2),
        )
        .expect_err("not external");
    assert!(matches!(err, DomainError::CannotApply(_)));
}

/// The policy `request()`'s snapshot was taken from (uid `uid-web`, project `web`), as it now
/// stands: another endpoint and a bypass ban.
fn current_policy() -> Policy {
    Policy {
        name: "web".into(),
        uid: "uid-web".into(),
        project: "web".into(),
        environment: String::new(),
        action_key: "*".into(),
        rules: PolicyRules {
            applier_endpoint: "http://fixed:1".into(),
            forbid_bypass: true,
            ..PolicyRules::default()
        },
        create_time: at(-60),
        update_time: at(10),
        revision: 2,
    }
}

#[test]
fn the_wiring_follows_only_the_same_policy_in_the_same_project() {
    let mut r = request(ApplyMode::Manual, None, None);
    r.policy.rules.applier_endpoint = "http://snapshot:1".into();
    let current = current_policy();
    let endpoint = |current: Option<&Policy>| ApplyWiring::of(&r, current).applier_endpoint;

    // The same policy, edited: its current wiring.
    let wiring = ApplyWiring::of(&r, Some(&current));
    assert_eq!(
        (wiring.applier_endpoint.as_str(), wiring.forbid_bypass),
        ("http://fixed:1", true)
    );
    // Gone: the snapshot.
    assert_eq!(endpoint(None), "http://snapshot:1");
    // Another policy under the same name (another uid), in this project or another: the snapshot.
    let recreated = Policy {
        uid: "uid-other".into(),
        ..current.clone()
    };
    assert_eq!(endpoint(Some(&recreated)), "http://snapshot:1");
    let elsewhere = Policy {
        project: "mobile".into(),
        ..recreated.clone()
    };
    assert_eq!(endpoint(Some(&elsewhere)), "http://snapshot:1");
    // The same policy moved to another project: no longer this request's.
    let moved = Policy {
        project: "mobile".into(),
        ..current.clone()
    };
    assert_eq!(endpoint(Some(&moved)), "http://snapshot:1");
    // A policy without a uid (stored before uids) is never the source of a snapshot with one.
    let legacy_policy = Policy {
        uid: String::new(),
        ..current.clone()
    };
    assert_eq!(endpoint(Some(&legacy_policy)), "http://snapshot:1");

    // A snapshot from before uids: the current policy of its name if in the request's project
    // and created before the request (a policy created later cannot be its source).
    r.policy.uid = String::new();
    let endpoint = |current: Option<&Policy>| ApplyWiring::of(&r, current).applier_endpoint;
    assert_eq!(endpoint(Some(&current)), "http://fixed:1");
    assert_eq!(endpoint(Some(&legacy_policy)), "http://fixed:1");
    assert_eq!(endpoint(Some(&moved)), "http://snapshot:1");
    let created_later = Policy {
        create_time: at(5),
        ..recreated
    };
    assert_eq!(endpoint(Some(&created_later)), "http://snapshot:1");

    // The server default (no policy) has no current policy to follow.
    let mut default = request(ApplyMode::Manual, None, None);
    default.policy = PolicySnapshot::server_default(1);
    let nameless = Policy {
        name: String::new(),
        ..current_policy()
    };
    assert_eq!(
        ApplyWiring::of(&default, Some(&nameless)).applier_endpoint,
        ""
    );
}

/// Open by default, closed by one freeze from `from` to `to` (seconds after NOW).
fn freeze(from: i64, to: i64) -> Windows {
    use approvals_domain::calendar::{
        CalendarEntry, CalendarRecord, CalendarRules, EntrySpan, WindowKind,
    };
    Windows::from_records(&[CalendarRecord {
        name: "freeze".into(),
        description: String::new(),
        rules: CalendarRules {
            time_zone: "Europe/Berlin".into(),
            default: WindowKind::Open,
            entries: vec![CalendarEntry {
                kind: WindowKind::Closed,
                reason: "launch".into(),
                span: EntrySpan::Range {
                    start: at(from),
                    end: at(to),
                },
            }],
        },
        revision: 1,
        create_time: NOW,
        update_time: NOW,
    }])
    .expect("windows")
}

#[test]
fn auto_on_quorum_inside_a_freeze_is_suspended_until_it_ends_then_resumes_once() {
    let mut r = approved(ApplyMode::Auto);
    let windows = freeze(0, 100);
    let suspended = r
        .start_automatic_apply(&wiring(), &windows, "k".into(), "a", SECOND, at(2))
        .expect("suspended");
    assert_eq!(
        (suspended.kind, suspended.to_state),
        (EventKind::ScheduleSuspended, State::Scheduled)
    );
    let schedule = r.schedule.clone().expect("schedule");
    assert_eq!(schedule.status, ScheduleStatus::Suspended);
    assert_eq!(
        (
            schedule.calendar.as_str(),
            schedule.reason.contains("launch")
        ),
        ("freeze", true),
        "{schedule:?}"
    );
    assert_eq!(schedule.next_open_time, Some(at(100)));
    assert_eq!(r.next_due_time(), Some(at(100)), "due when the freeze ends");
    // Still inside the freeze: nothing to do, and no second event.
    assert!(
        r.start_automatic_apply(&wiring(), &windows, "k".into(), "a", SECOND, at(50))
            .is_none()
    );
    // The freeze is over: resumed (PENDING, at its time), then started.
    let resumed = r
        .start_automatic_apply(&wiring(), &windows, "k".into(), "a", SECOND, at(100))
        .expect("resumed");
    assert_eq!(resumed.kind, EventKind::ScheduleResumed);
    assert_eq!(
        r.schedule.as_ref().map(|s| s.status),
        Some(ScheduleStatus::Pending)
    );
    let started = r
        .start_automatic_apply(&wiring(), &windows, "k".into(), "a", SECOND, at(100))
        .expect("started");
    assert_eq!(
        (started.kind, started.to_state),
        (EventKind::ApplyStarted, State::Applying)
    );
}

#[test]
fn a_pending_schedule_a_freeze_now_covers_is_suspended_and_a_lifted_one_resumes() {
    let mut r = approved(ApplyMode::Manual);
    r.schedule(
        &actor("user:alice", &[]),
        &wiring(),
        &Windows::none(),
        ScheduleAt::Time(at(30)),
        at(2),
    )
    .expect("schedule");
    assert_eq!(
        r.schedule.as_ref().map(|s| s.status),
        Some(ScheduleStatus::Pending)
    );
    // A freeze created afterwards over the schedule's time: suspended at once, before it is due.
    let event = r
        .start_automatic_apply(&wiring(), &freeze(10, 60), "k".into(), "a", SECOND, at(5))
        .expect("suspended");
    assert_eq!(event.kind, EventKind::ScheduleSuspended);
    assert_eq!(
        r.schedule.as_ref().and_then(|s| s.next_open_time),
        Some(at(60))
    );
    // The freeze deleted: resumed at its own time, not applied before it.
    let event = r
        .start_automatic_apply(&wiring(), &Windows::none(), "k".into(), "a", SECOND, at(6))
        .expect("resumed");
    assert_eq!(event.kind, EventKind::ScheduleResumed);
    let schedule = r.schedule.clone().expect("schedule");
    assert_eq!(
        (schedule.status, schedule.apply_time),
        (ScheduleStatus::Pending, at(30))
    );
    assert!(
        r.start_automatic_apply(&wiring(), &Windows::none(), "k".into(), "a", SECOND, at(7))
            .is_none(),
        "not due before its time"
    );
}
