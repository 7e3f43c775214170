//! Applying approved changes: schedules, apply runs (with their idempotency key and lease),
//! external completion, expiry, conflicts and break-glass. Pure like the rest of the domain:
//! the caller passes in the time, the keys, and the apply wiring read from the current policy.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    Action, Actor, ChangeRequest, DomainError, EventDraft, EventKind, Policy, Principal, State,
    Timestamp,
    calendar::{Closure, Windows, rfc3339},
    policy::ApplyMode,
};

/// Status of a planned apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ScheduleStatus {
    Pending,
    Failed,
    Suspended,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub apply_time: Timestamp,
    pub scheduled_by: Principal,
    pub status: ScheduleStatus,
    #[serde(default)]
    pub reason: String,
    /// SUSPENDED by a change calendar: its name (empty for a conflict).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub calendar: String,
    /// SUSPENDED by a change calendar: when every calendar opens again (it resumes then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_open_time: Option<Timestamp>,
}

impl Schedule {
    /// Pending at `apply_time`, on behalf of `scheduled_by`.
    pub fn pending(apply_time: Timestamp, scheduled_by: Principal) -> Self {
        Self {
            apply_time,
            scheduled_by,
            status: ScheduleStatus::Pending,
            reason: String::new(),
            calendar: String::new(),
            next_open_time: None,
        }
    }

    /// Suspended by `closure`; true when that changed anything.
    fn suspend(&mut self, closure: &Closure) -> bool {
        let reason = closure.describe();
        let changed = self.status != ScheduleStatus::Suspended
            || self.calendar != closure.calendar
            || self.reason != reason
            || self.next_open_time != closure.next_open_time;
        self.status = ScheduleStatus::Suspended;
        self.calendar = closure.calendar.clone();
        self.reason = reason;
        self.next_open_time = closure.next_open_time;
        changed
    }

    /// Whether a change calendar (not a conflict) suspended it.
    pub fn suspended_by_calendar(&self) -> bool {
        self.status == ScheduleStatus::Suspended && !self.calendar.is_empty()
    }
}

/// The detail of the event that schedules a request for the end of its apply delay.
fn delay_detail(at: Timestamp) -> String {
    format!("the policy's apply_delay: applies at {}", rfc3339(at))
}

/// When ScheduleChangeRequest asks to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleAt {
    Time(Timestamp),
    /// The first instant at or after now (and after the policy's `apply_delay`) when every
    /// calendar of the snapshot is open.
    NextOpenWindow,
}

/// The apply in progress (state APPLYING), or the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRun {
    /// The same on every attempt of this apply.
    pub idempotency_key: String,
    /// On whose behalf it applies (`applied_by` once applied).
    pub applied_by: Principal,
    pub attempts: u32,
    /// The replica working on it, until `lease_until`.
    pub lease_owner: String,
    pub lease_until: Timestamp,
    #[serde(default)]
    pub last_error: String,
    /// Started by a schedule: a failure also fails the schedule.
    #[serde(default)]
    pub scheduled: bool,
}

/// How the request is applied: read from the current version of the policy its snapshot was
/// taken from (the same policy by uid, still in the request's project), so fixing an endpoint
/// helps open requests; from the snapshot when that policy is gone, moved to another project,
/// or its name now belongs to another policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyWiring {
    pub policy_name: String,
    pub applier_endpoint: String,
    pub appliers: Vec<Principal>,
    pub executors: Vec<Principal>,
    pub forbid_bypass: bool,
}

impl ApplyWiring {
    /// The wiring of `request`, given `current`, the policy that now holds its snapshot's name
    /// (if any): see [`crate::PolicySnapshot::is_taken_from`].
    pub fn of(request: &ChangeRequest, current: Option<&Policy>) -> Self {
        let snapshot = &request.policy;
        let rules = match current {
            Some(policy)
                if snapshot.is_taken_from(policy, &request.project, request.create_time) =>
            {
                &policy.rules
            }
            _ => &snapshot.rules,
        };
        Self {
            policy_name: snapshot.name.clone(),
            applier_endpoint: rules.applier_endpoint.clone(),
            appliers: rules.appliers.clone(),
            executors: rules.executors.clone(),
            forbid_bypass: rules.forbid_bypass,
        }
    }
}

/// What an applier reported.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyOutcome {
    Applied {
        result_data: Option<Map<String, Value>>,
        versions: Vec<ResourceVersion>,
    },
    Failed {
        error: String,
    },
    Conflict {
        error: String,
    },
}

/// A resource's version after an apply; a resource is (project, environment, type, id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceVersion {
    pub resource_type: String,
    pub resource_id: String,
    pub version: String,
}

/// Whether `actor` is named in `list` directly or through one of its groups.
pub fn listed(list: &[Principal], actor: &Actor) -> bool {
    list.iter().any(|entry| {
        entry == &actor.principal
            || entry
                .as_str()
                .strip_prefix("group:")
                .is_some_and(|group| actor.groups.iter().any(|g| g == group))
    })
}

impl ChangeRequest {
    pub fn apply_mode(&self) -> ApplyMode {
        match self.policy.rules.apply_mode {
            ApplyMode::Unspecified => ApplyMode::Manual,
            mode => mode,
        }
    }

    /// The first change with a conflict, if any.
    pub fn conflict(&self) -> Option<(&str, &str)> {
        self.changes.iter().find_map(|c| {
            c.conflict
                .as_deref()
                .map(|conflict| (c.id.as_str(), conflict))
        })
    }

    fn ensure_no_conflict(&self) -> Result<(), DomainError> {
        match self.conflict() {
            Some((change_id, conflict)) => Err(DomainError::Conflict {
                change_id: change_id.to_owned(),
                conflict: conflict.to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// Expired requests are closed to approvals, applies and schedules even before the
    /// background sweep marks them EXPIRED.
    pub fn ensure_not_expired(&self, now: Timestamp) -> Result<(), DomainError> {
        match self.expire_time {
            Some(expire) if expire <= now && self.state.is_open() => Err(DomainError::Expired {
                expire_time_micros: expire.as_micros(),
            }),
            _ => Ok(()),
        }
    }

    /// The requester or one of the policy's appliers.
    fn ensure_applier(
        &self,
        actor: &Actor,
        wiring: &ApplyWiring,
        action: Action,
    ) -> Result<(), DomainError> {
        if self.is_requester(&actor.principal) || listed(&wiring.appliers, actor) {
            Ok(())
        } else {
            Err(DomainError::NotApplier {
                principal: actor.principal.to_string(),
                action,
                others: if wiring.appliers.is_empty() {
                    String::new()
                } else {
                    " or the policy's appliers".to_owned()
                },
            })
        }
    }

    fn ensure_applier_endpoint(&self, wiring: &ApplyWiring) -> Result<(), DomainError> {
        if self.apply_mode() == ApplyMode::External {
            return Err(DomainError::CannotApply(
                "this change request's policy applies it EXTERNALly: its executor reports completion with CompleteChangeRequest".into(),
            ));
        }
        if wiring.applier_endpoint.trim().is_empty() {
            return Err(DomainError::CannotApply(if wiring.policy_name.is_empty() {
                "no policy matched this change request, so it has no applier_endpoint to apply it"
                    .into()
            } else {
                format!(
                    "policy {:?} has no applier_endpoint to apply this change request",
                    wiring.policy_name
                )
            }));
        }
        Ok(())
    }

    /// Validates a planned apply time: in the future and not after the expiry.
    pub fn check_apply_time(
        &self,
        field: &str,
        apply_time: Timestamp,
        now: Timestamp,
    ) -> Result<(), DomainError> {
        if apply_time <= now {
            return Err(DomainError::invalid(field, "must be in the future"));
        }
        if let Some(expire) = self.expire_time
            && apply_time > expire
        {
            return Err(DomainError::invalid(
                field,
                "must not be after the change request's expire_time",
            ));
        }
        Ok(())
    }

    /// A manual apply, or a new apply after APPLY_FAILED, by the requester or an applier; or a
    /// break-glass apply of an IN_REVIEW request (the caller's bypass scope is checked by the
    /// server). Moves to APPLYING under a lease held by `replica`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_manual_apply(
        &mut self,
        actor: &Actor,
        wiring: &ApplyWiring,
        windows: &Windows,
        bypass_justification: Option<String>,
        key: String,
        replica: &str,
        lease_micros: i64,
        now: Timestamp,
    ) -> Result<EventDraft, DomainError> {
        if let Some(justification) = bypass_justification {
            self.ensure_allowed(Action::Bypass)?;
            self.ensure_not_expired(now)?;
            if wiring.forbid_bypass {
                return Err(DomainError::BypassForbidden {
                    policy: wiring.policy_name.clone(),
                });
            }
            self.ensure_applier_endpoint(wiring)?;
            self.ensure_no_conflict()?;
            self.bypassed_by = Some(actor.principal.clone());
            self.bypass_justification = Some(justification.clone());
            // Break-glass overrides closed calendars and the apply delay; which calendar it
            // overrode stays on the request.
            self.bypassed_calendar = windows.closed_at(now).map(|c| c.calendar);
            self.begin_run(
                actor.principal.clone(),
                key,
                replica,
                lease_micros,
                now,
                false,
            );
            return Ok(self.moved(
                EventKind::Bypassed,
                actor,
                State::Applying,
                now,
                justification,
            ));
        }
        self.ensure_allowed(Action::Apply)?;
        self.ensure_not_expired(now)?;
        self.ensure_applier(actor, wiring, Action::Apply)?;
        self.ensure_applier_endpoint(wiring)?;
        self.ensure_no_conflict()?;
        self.ensure_may_apply_at(windows, now)?;
        self.begin_run(
            actor.principal.clone(),
            key,
            replica,
            lease_micros,
            now,
            false,
        );
        Ok(self.moved(
            EventKind::ApplyStarted,
            actor,
            State::Applying,
            now,
            String::new(),
        ))
    }

    /// The first instant the policy's `apply_delay` lets an approved request apply: its
    /// approval (the latest counted approval; its entry into review, or its creation, when no
    /// approval was needed) plus the delay. `None` without a delay.
    pub fn apply_delay_until(&self) -> Option<Timestamp> {
        let delay = self.policy.rules.apply_delay_micros.filter(|d| *d > 0)?;
        let approved = self
            .quorum_review()
            .map(|r| r.create_time)
            .or(self.review_start_time)
            .unwrap_or(self.create_time);
        Some(approved.saturating_add_micros(delay))
    }

    /// Refuses an apply at `now` within the apply delay or while a calendar is closed.
    fn ensure_may_apply_at(&self, windows: &Windows, now: Timestamp) -> Result<(), DomainError> {
        if let Some(until) = self.apply_delay_until()
            && now < until
        {
            return Err(DomainError::ApplyDelay { apply_time: until });
        }
        match windows.closed_at(now) {
            Some(closure) => Err(DomainError::WindowClosed(closure)),
            None => Ok(()),
        }
    }

    /// The calendars' and apply delay's say on the service's own apply, before it starts:
    /// `Some` when the request is (re)scheduled, suspended or resumed instead (one event),
    /// `None` when the apply may go on as planned (or there is nothing to do).
    fn hold_for_windows(&mut self, windows: &Windows, now: Timestamp) -> Option<EventDraft> {
        let system = Actor::system();
        match (self.state, self.schedule.clone()) {
            (State::Approved, _)
                if self.apply_mode() == ApplyMode::Auto && self.apply_run.is_none() =>
            {
                let approver = self.quorum_approver()?;
                let earliest = self.apply_delay_until().filter(|t| *t > now).unwrap_or(now);
                let mut schedule = Schedule::pending(earliest, approver);
                let (kind, detail) = match windows.closed_at(earliest) {
                    Some(closure) => {
                        schedule.suspend(&closure);
                        if let Some(open) = closure.next_open_time {
                            schedule.apply_time = open;
                        }
                        (EventKind::ScheduleSuspended, schedule.reason.clone())
                    }
                    None if earliest > now => (EventKind::Scheduled, delay_detail(earliest)),
                    None => return None,
                };
                self.schedule = Some(schedule);
                Some(self.moved(kind, &system, State::Scheduled, now, detail))
            }
            (State::Scheduled, Some(mut schedule))
                if schedule.status == ScheduleStatus::Pending =>
            {
                if let Some(until) = self.apply_delay_until()
                    && schedule.apply_time < until
                    && now < until
                {
                    schedule.apply_time = until;
                    let detail = delay_detail(until);
                    self.schedule = Some(schedule);
                    return Some(self.moved(
                        EventKind::Scheduled,
                        &system,
                        State::Scheduled,
                        now,
                        detail,
                    ));
                }
                let closure = windows.closed_at(schedule.apply_time.max(now))?;
                schedule.suspend(&closure);
                let detail = schedule.reason.clone();
                self.schedule = Some(schedule);
                Some(self.moved(
                    EventKind::ScheduleSuspended,
                    &system,
                    State::Scheduled,
                    now,
                    detail,
                ))
            }
            (State::Scheduled, Some(mut schedule)) if schedule.suspended_by_calendar() => {
                let at = schedule.apply_time.max(now);
                // Suspended while a calendar is closed now, or at the schedule's time: a
                // re-check inside the window (a calendar edited) resumes nothing early.
                let closed = windows.closed_at(now).or_else(|| windows.closed_at(at));
                let (kind, detail) = match closed {
                    Some(closure) => {
                        if !schedule.suspend(&closure) {
                            return None;
                        }
                        (EventKind::ScheduleSuspended, schedule.reason.clone())
                    }
                    None => {
                        let detail = format!(
                            "calendar {} is open again; applies at {}",
                            schedule.calendar,
                            rfc3339(at)
                        );
                        schedule = Schedule::pending(schedule.apply_time, schedule.scheduled_by);
                        (EventKind::ScheduleResumed, detail)
                    }
                };
                self.schedule = Some(schedule);
                Some(self.moved(kind, &system, State::Scheduled, now, detail))
            }
            _ => None,
        }
    }

    fn begin_run(
        &mut self,
        applied_by: Principal,
        key: String,
        replica: &str,
        lease_micros: i64,
        now: Timestamp,
        scheduled: bool,
    ) {
        self.apply_error = None;
        self.apply_run = Some(ApplyRun {
            idempotency_key: key,
            applied_by,
            attempts: 0,
            lease_owner: replica.to_owned(),
            lease_until: now.saturating_add_micros(lease_micros),
            last_error: String::new(),
            scheduled,
        });
    }

    /// The service's own start of an apply: an AUTO request that reached quorum (on behalf of
    /// the approver who reached it), or a SCHEDULED request whose time came (on behalf of
    /// `scheduled_by`). `None` when there is nothing to start.
    pub fn start_automatic_apply(
        &mut self,
        wiring: &ApplyWiring,
        windows: &Windows,
        key: String,
        replica: &str,
        lease_micros: i64,
        now: Timestamp,
    ) -> Option<EventDraft> {
        if self.conflict().is_none()
            && let Some(event) = self.hold_for_windows(windows, now)
        {
            return Some(event);
        }
        let system = Actor::system();
        let (applied_by, scheduled) = match (self.state, &self.schedule) {
            (State::Approved, _)
                if self.apply_mode() == ApplyMode::Auto && self.apply_run.is_none() =>
            {
                (self.quorum_approver()?, false)
            }
            (State::Scheduled, Some(s))
                if s.status == ScheduleStatus::Pending && s.apply_time <= now =>
            {
                (s.scheduled_by.clone(), true)
            }
            _ => return None,
        };
        if self.conflict().is_some() {
            return None;
        }
        if let Err(err) = self.ensure_applier_endpoint(wiring) {
            // Nothing can apply it: fail it now rather than leave it hanging.
            let message = err.to_string();
            self.apply_error = Some(message.clone());
            if let Some(schedule) = &mut self.schedule {
                schedule.status = ScheduleStatus::Failed;
                schedule.reason = message.clone();
            }
            let kind = if scheduled {
                EventKind::ScheduleFailed
            } else {
                EventKind::ApplyFailed
            };
            return Some(self.moved(kind, &system, State::ApplyFailed, now, message));
        }
        self.begin_run(
            applied_by.clone(),
            key,
            replica,
            lease_micros,
            now,
            scheduled,
        );
        let actor = Actor::new(applied_by, Vec::new());
        Some(self.moved(
            EventKind::ApplyStarted,
            &actor,
            State::Applying,
            now,
            String::new(),
        ))
    }

    /// The approval that reached quorum: the latest counting approval.
    fn quorum_review(&self) -> Option<&crate::Review> {
        self.counted_approvals()
            .into_iter()
            .max_by_key(|r| r.create_time)
    }

    /// The approver whose approval reached quorum.
    fn quorum_approver(&self) -> Option<Principal> {
        self.quorum_review().map(|r| r.reviewer.clone())
    }

    /// Principals whose approvals counted.
    pub fn approvers(&self) -> Vec<String> {
        self.counted_approvals()
            .into_iter()
            .map(|r| r.reviewer.to_string())
            .collect()
    }

    /// Takes over an APPLYING request whose lease expired (its replica died): same key.
    pub fn take_over_lease(&mut self, replica: &str, lease_micros: i64, now: Timestamp) -> bool {
        match (&mut self.apply_run, self.state) {
            (Some(run), State::Applying) if run.lease_until <= now => {
                run.lease_owner = replica.to_owned();
                run.lease_until = now.saturating_add_micros(lease_micros);
                true
            }
            _ => false,
        }
    }

    /// Extends the lease while `replica` works on the apply; false when it no longer holds it.
    pub fn renew_lease(
        &mut self,
        key: &str,
        replica: &str,
        lease_micros: i64,
        now: Timestamp,
    ) -> bool {
        match (&mut self.apply_run, self.state) {
            (Some(run), State::Applying)
                if run.idempotency_key == key && run.lease_owner == replica =>
            {
                run.lease_until = now.saturating_add_micros(lease_micros);
                true
            }
            _ => false,
        }
    }

    /// Whether the request is APPLYING under a lease held by `replica`.
    pub fn runs_under(&self, replica: &str) -> bool {
        self.state == State::Applying
            && self
                .apply_run
                .as_ref()
                .is_some_and(|r| r.lease_owner == replica)
    }

    /// Whether `replica` still runs the apply with `key`.
    pub fn runs(&self, key: &str, replica: &str) -> bool {
        self.state == State::Applying
            && self
                .apply_run
                .as_ref()
                .is_some_and(|r| r.idempotency_key == key && r.lease_owner == replica)
    }

    /// A transient failure (the applier was unavailable, timed out, ...). Below `max_attempts`
    /// the request stays APPLYING and the run waits `retry_at` (the lease covers the wait);
    /// at `max_attempts` it fails: "gave up after N attempts: <last error>".
    pub fn record_transient_failure(
        &mut self,
        error: String,
        max_attempts: u32,
        retry_at: Timestamp,
        lease_micros: i64,
        now: Timestamp,
    ) -> Option<EventDraft> {
        let run = self.apply_run.as_mut()?;
        run.attempts += 1;
        run.last_error = error.clone();
        if run.attempts >= max_attempts.max(1) {
            let message = format!("gave up after {} attempts: {error}", run.attempts);
            return Some(self.fail_run(message, Vec::new(), now));
        }
        run.lease_until = retry_at.saturating_add_micros(lease_micros);
        None
    }

    fn fail_run(&mut self, message: String, _conflicting: Vec<()>, now: Timestamp) -> EventDraft {
        let scheduled = self.apply_run.as_ref().is_some_and(|r| r.scheduled);
        self.apply_error = Some(message.clone());
        let kind = if scheduled {
            if let Some(schedule) = &mut self.schedule {
                schedule.status = ScheduleStatus::Failed;
                schedule.reason = message.clone();
            }
            EventKind::ScheduleFailed
        } else {
            EventKind::ApplyFailed
        };
        self.moved(kind, &Actor::system(), State::ApplyFailed, now, message)
    }

    /// The applier's final answer for the run with `key`. `None` when that run is no longer
    /// the current one (nothing to record).
    pub fn finish_apply(
        &mut self,
        key: &str,
        outcome: ApplyOutcome,
        now: Timestamp,
    ) -> Option<EventDraft> {
        let run = self
            .apply_run
            .as_mut()
            .filter(|r| r.idempotency_key == key)?;
        if self.state != State::Applying {
            return None;
        }
        run.attempts += 1;
        let applied_by = run.applied_by.clone();
        match outcome {
            ApplyOutcome::Applied { result_data, .. } => {
                self.apply_error = None;
                self.result_data = result_data;
                self.applied_by = Some(applied_by.clone());
                self.apply_time = Some(now);
                Some(self.moved(
                    EventKind::Applied,
                    &Actor::new(applied_by, Vec::new()),
                    State::Applied,
                    now,
                    String::new(),
                ))
            }
            ApplyOutcome::Failed { error } => Some(self.fail_run(error, Vec::new(), now)),
            ApplyOutcome::Conflict { error } => {
                for change in &mut self.changes {
                    change.conflict = Some(error.clone());
                }
                Some(self.fail_run(error, Vec::new(), now))
            }
        }
    }

    /// The service applied the approved request itself (a policy change on `_policies`):
    /// APPROVED -> APPLIED by `system:approvals`.
    pub fn applied_by_service(
        &mut self,
        now: Timestamp,
        detail: String,
    ) -> Result<EventDraft, DomainError> {
        if self.state != State::Approved {
            return Err(DomainError::CannotApply(format!(
                "the service applies a policy change once it is APPROVED; it is {}",
                self.state
            )));
        }
        let system = Actor::system();
        self.apply_error = None;
        self.applied_by = Some(system.principal.clone());
        self.apply_time = Some(now);
        Ok(self.moved(EventKind::Applied, &system, State::Applied, now, detail))
    }

    /// An EXTERNAL request's executor reports the outcome.
    pub fn complete(
        &mut self,
        actor: &Actor,
        wiring: &ApplyWiring,
        success: bool,
        result_data: Option<Map<String, Value>>,
        error: String,
        now: Timestamp,
    ) -> Result<EventDraft, DomainError> {
        if self.apply_mode() != ApplyMode::External {
            return Err(DomainError::CannotApply(
                "only EXTERNAL change requests are completed by an executor; this one is applied by the service".into(),
            ));
        }
        self.ensure_allowed(Action::Complete)?;
        if !listed(&wiring.executors, actor) {
            return Err(DomainError::NotExecutor {
                principal: actor.principal.to_string(),
            });
        }
        self.ensure_no_conflict()?;
        self.applied_by = Some(actor.principal.clone());
        if success {
            self.result_data = result_data;
            self.apply_time = Some(now);
            Ok(self.moved(
                EventKind::Completed,
                actor,
                State::Applied,
                now,
                String::new(),
            ))
        } else {
            let error = if error.trim().is_empty() {
                "the executor reported a failure".to_owned()
            } else {
                error
            };
            self.apply_error = Some(error.clone());
            Ok(self.moved(EventKind::Completed, actor, State::ApplyFailed, now, error))
        }
    }

    /// APPROVED -> SCHEDULED, or a new time for a SCHEDULED request.
    ///
    /// A time within the policy's `apply_delay` is refused; a time inside a closed calendar
    /// window is accepted and the schedule is SUSPENDED at once (it resumes when the calendars
    /// open). `NextOpenWindow` picks the first instant every calendar is open (after the delay).
    pub fn schedule(
        &mut self,
        actor: &Actor,
        wiring: &ApplyWiring,
        windows: &Windows,
        at: ScheduleAt,
        now: Timestamp,
    ) -> Result<EventDraft, DomainError> {
        let delay_until = self.apply_delay_until().filter(|t| *t > now);
        let apply_time = match at {
            ScheduleAt::Time(apply_time) => {
                self.check_apply_time("apply_time", apply_time, now)?;
                apply_time
            }
            ScheduleAt::NextOpenWindow => {
                let earliest = delay_until.unwrap_or(now);
                let apply_time = match windows.closed_at(earliest) {
                    None => earliest,
                    Some(Closure {
                        next_open_time: Some(open),
                        ..
                    }) => open,
                    Some(closure) => return Err(DomainError::WindowClosed(closure)),
                };
                if let Some(expire) = self.expire_time
                    && apply_time > expire
                {
                    return Err(DomainError::invalid(
                        "next_open_window",
                        format!(
                            "the next open window ({}) is after the change request's expire_time",
                            rfc3339(apply_time)
                        ),
                    ));
                }
                apply_time
            }
        };
        self.ensure_allowed(Action::Schedule)?;
        self.ensure_not_expired(now)?;
        self.ensure_applier(actor, wiring, Action::Schedule)?;
        self.ensure_applier_endpoint(wiring)?;
        self.ensure_no_conflict()?;
        if let Some(until) = delay_until
            && apply_time < until
        {
            return Err(DomainError::invalid(
                "apply_time",
                format!(
                    "must not be before {}: the policy's apply_delay after approval",
                    rfc3339(until)
                ),
            ));
        }
        let mut schedule = Schedule::pending(apply_time, actor.principal.clone());
        let detail = match windows.closed_at(apply_time) {
            Some(closure) => {
                schedule.suspend(&closure);
                schedule.reason.clone()
            }
            None => String::new(),
        };
        self.schedule = Some(schedule);
        Ok(self.moved(EventKind::Scheduled, actor, State::Scheduled, now, detail))
    }

    /// SCHEDULED -> APPROVED, by the requester, an applier or whoever scheduled it.
    pub fn unschedule(
        &mut self,
        actor: &Actor,
        wiring: &ApplyWiring,
        now: Timestamp,
    ) -> Result<EventDraft, DomainError> {
        self.ensure_allowed(Action::Unschedule)?;
        let scheduled_by = self
            .schedule
            .as_ref()
            .is_some_and(|s| s.scheduled_by == actor.principal);
        if !scheduled_by {
            self.ensure_applier(actor, wiring, Action::Unschedule)?;
        }
        self.schedule = None;
        Ok(self.moved(
            EventKind::Unscheduled,
            actor,
            State::Approved,
            now,
            String::new(),
        ))
    }

    /// The service's sweep: an open request past its expiry becomes EXPIRED.
    pub fn expire(&mut self, now: Timestamp) -> Option<EventDraft> {
        let expire = self.expire_time?;
        if expire > now || !Action::Expire.is_allowed_in(self.state) {
            return None;
        }
        Some(self.moved(
            EventKind::Expired,
            &Actor::system(),
            State::Expired,
            now,
            String::new(),
        ))
    }

    /// Another request moved resources this one changes: mark each change written against an
    /// older version. A scheduled request is suspended. `None` when nothing changed.
    pub fn mark_conflicts(
        &mut self,
        environment: &str,
        versions: &[ResourceVersion],
        moved_by: &str,
        now: Timestamp,
    ) -> Option<EventDraft> {
        if !self.state.is_open() || self.environment != environment {
            return None;
        }
        let mut first = None;
        for change in &mut self.changes {
            let Some(base) = &change.base_version else {
                continue;
            };
            let Some(moved) = versions.iter().find(|v| {
                v.resource_type == change.resource_type && v.resource_id == change.resource_id
            }) else {
                continue;
            };
            if &moved.version != base {
                let text = format!(
                    "{} {} is now at version {} (applied by change request {moved_by}); this change was written against version {base}",
                    change.resource_type, change.resource_id, moved.version
                );
                first.get_or_insert_with(|| text.clone());
                change.conflict = Some(text);
            }
        }
        let conflict = first?;
        let state = self.state;
        if state == State::Scheduled
            && let Some(schedule) = &mut self.schedule
        {
            // A conflict outranks a calendar: it does not resume by itself.
            schedule.status = ScheduleStatus::Suspended;
            schedule.reason = conflict.clone();
            schedule.calendar.clear();
            schedule.next_open_time = None;
            return Some(self.moved(
                EventKind::ScheduleSuspended,
                &Actor::system(),
                state,
                now,
                conflict,
            ));
        }
        Some(self.moved(
            EventKind::ConflictDetected,
            &Actor::system(),
            state,
            now,
            conflict,
        ))
    }

    /// When the service next has work on this request: a schedule's time, an expiry, an AUTO
    /// apply to start, an apply run's lease to take over, the policy's own work or an escalation. `None`: nothing planned.
    pub fn next_due_time(&self) -> Option<Timestamp> {
        let expiry = self
            .expire_time
            .filter(|_| Action::Expire.is_allowed_in(self.state));
        let work = match self.state {
            State::Approved if self.apply_mode() == ApplyMode::Auto && self.apply_run.is_none() => {
                Some(self.update_time)
            }
            State::Scheduled => self.schedule.as_ref().and_then(|s| match s.status {
                ScheduleStatus::Pending => Some(s.apply_time),
                // Re-checked when the calendars open (and whenever a calendar changes).
                ScheduleStatus::Suspended if s.suspended_by_calendar() => s.next_open_time,
                _ => None,
            }),
            State::Applying => self.apply_run.as_ref().map(|r| r.lease_until),
            // The policy's own work (pre-approval, automatic reviews) at once, then the next
            // escalation (see `crate::rules`).
            State::InReview if self.policy_work_pending => Some(self.update_time),
            State::InReview => self.next_escalation_time(),
            _ => None,
        };
        match (expiry, work) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
