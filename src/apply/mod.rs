//! The apply engine: calls the policy's `ChangeApplier` for requests in APPLYING, exactly once
//! per idempotency key as far as the applier honours it, across crashes and replicas.
//!
//! - APPLYING is persisted, with the key and a lease held by this replica, before the applier
//!   is called; the lease is renewed while the call is in flight.
//! - Transient statuses (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED; a call
//!   timeout counts as DEADLINE_EXCEEDED) are retried with the same key, backing off from
//!   `apply.retry_backoff` (doubling, at most 60 s), up to `apply.max_attempts`.
//! - A background worker in every replica claims due requests (`FOR UPDATE SKIP LOCKED` on
//!   PostgreSQL): expires them, starts AUTO applies and schedules, and takes over applies whose
//!   lease expired (a replica died), with the same key.
//!
//! One cohesive thing over 500 lines (its tests included): the engine's start, run, retry,
//! sweep and takeover share one lease protocol, read best in one place.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use approvals_domain::{
    ApplyMode, ApplyOutcome, ApplyWiring, ChangeRequest, ResourceVersion, ScheduleStatus, State,
    calendar::Windows, validation,
};
use approvals_store::{Step, Store, StoreError};
use tokio::task::JoinHandle;
use tonic::{Code, transport::Channel};

use crate::{
    clock::SharedClock,
    config::ApplyConfig,
    convert,
    pb::{self, change_applier_client::ChangeApplierClient},
    telemetry::metrics,
};

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A new UUIDv7: the ids of requests, changes and comments, and apply runs' idempotency keys.
/// Time-ordered, so ids sort newest last and index well.
pub struct ApplyEngine {
    store: Store,
    settings: ApplyConfig,
    clock: SharedClock,
    /// This process: the owner named in the leases it holds.
    replica: String,
    channels: Mutex<HashMap<String, Channel>>,
    /// Requests this process is applying now, each with a flag set when its run ends.
    running: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
}

impl ApplyEngine {
    pub fn new(store: Store, settings: ApplyConfig, clock: SharedClock) -> Arc<Self> {
        Arc::new(Self {
            store,
            settings,
            clock,
            replica: format!("replica-{}", uuid::Uuid::now_v7()),
            channels: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
        })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn lease_micros(&self) -> i64 {
        micros(self.settings.lease)
    }

    /// How the request is applied: from the current version of the policy its snapshot was
    /// taken from (same uid, same project as the request), else from the snapshot itself.
    pub async fn wiring(&self, request: &ChangeRequest) -> Result<ApplyWiring, StoreError> {
        let name = &request.policy.name;
        let current = if name.is_empty() {
            None
        } else {
            match self.store.get_policy(name).await {
                Ok(policy) => Some(policy),
                Err(StoreError::PolicyNotFound(_)) => None,
                Err(err) => return Err(err),
            }
        };
        Ok(ApplyWiring::of(request, current.as_ref()))
    }

    /// The change calendars `request`'s snapshot names, as stored now (none: no query).
    pub async fn windows(&self, request: &ChangeRequest) -> Result<Windows, StoreError> {
        let names = &request.policy.rules.calendars;
        if names.is_empty() {
            return Ok(Windows::none());
        }
        let records = self.store.calendars_named(names).await?;
        Windows::from_records(&records).map_err(|err| {
            StoreError::Internal(format!(
                "a calendar of change request {} no longer compiles: {err}",
                request.id
            ))
        })
    }

    /// Runs the apply of `request` (APPLYING, leased to this replica) in the background, and
    /// waits for it at most `apply.deadline`; returns the request as it then stands.
    pub async fn run_and_wait(
        self: &Arc<Self>,
        request: ChangeRequest,
    ) -> Result<ChangeRequest, StoreError> {
        let id = request.id.clone();
        let deadline = tokio::time::Instant::now() + self.settings.deadline;
        if request.runs_under(&self.replica) {
            self.spawn_run(request);
        }
        // Whoever runs it (this handler, this replica's worker, another replica), wait until it
        // leaves APPLYING or the deadline passes.
        loop {
            let done = self.running.lock().ok().and_then(|r| r.get(&id).cloned());
            match done {
                Some(mut done) => {
                    let _ = tokio::time::timeout_at(deadline, done.wait_for(|finished| *finished))
                        .await;
                }
                None => {
                    let current = self.store.get(&id).await?;
                    if current.state != State::Applying || tokio::time::Instant::now() >= deadline {
                        return Ok(current);
                    }
                    tokio::time::sleep_until(Ord::min(
                        deadline,
                        tokio::time::Instant::now() + Duration::from_millis(20),
                    ))
                    .await;
                    continue;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return self.store.get(&id).await;
            }
        }
    }

    /// Starts the apply of `request` if it is APPLYING under this replica's lease and not
    /// already running here.
    pub fn spawn_run(self: &Arc<Self>, request: ChangeRequest) -> JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            let Some(key) = request
                .apply_run
                .as_ref()
                .filter(|_| request.state == State::Applying)
                .map(|r| r.idempotency_key.clone())
            else {
                return;
            };
            let (finished, done) = tokio::sync::watch::channel(false);
            let claimed = engine
                .running
                .lock()
                .map(|mut r| match r.entry(request.id.clone()) {
                    std::collections::hash_map::Entry::Occupied(_) => false,
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(done);
                        true
                    }
                })
                .unwrap_or(false);
            if !claimed {
                return;
            }
            let id = request.id.clone();
            if let Err(err) = engine.run(request, &key).await {
                tracing::warn!(change_request = %id, error = %err, "apply interrupted; the lease will let a replica retry it");
            }
            if let Ok(mut running) = engine.running.lock() {
                running.remove(&id);
            }
            finished.send_replace(true);
        })
    }

    async fn run(&self, mut request: ChangeRequest, key: &str) -> Result<(), StoreError> {
        loop {
            if !request.runs(key, &self.replica) {
                return Ok(());
            }
            let wiring = self.wiring(&request).await?;
            // The endpoint was allowed when its policy was written; the list may have changed
            // since, and an old snapshot may hold any endpoint. Never connect to a refused one.
            if let Err(refusal) = self
                .settings
                .allowed_endpoints
                .check(&wiring.applier_endpoint)
            {
                tracing::warn!(change_request = %request.id, endpoint = %wiring.applier_endpoint, %refusal, "applier endpoint not allowed; the apply fails without a call");
                let outcome = ApplyOutcome::Failed {
                    error: format!(
                        "applier endpoint {:?} {refusal}; the service did not call it",
                        wiring.applier_endpoint
                    ),
                };
                let now = self.clock.now();
                self.store
                    .finish_apply(&request.id, &[], now, |r| {
                        r.finish_apply(key, outcome.clone(), now)
                    })
                    .await?;
                metrics::record_apply_outcome("endpoint_not_allowed");
                return Ok(());
            }
            let call = self.call(&wiring.applier_endpoint, &request, key);
            let result = self.renewing_lease(&request.id, key, call).await?;
            let now = self.clock.now();
            match result {
                Ok(response) => {
                    let outcome = outcome(response);
                    let versions = match &outcome {
                        ApplyOutcome::Applied { versions, .. } => versions.clone(),
                        _ => Vec::new(),
                    };
                    let label = match &outcome {
                        ApplyOutcome::Applied { .. } => "applied",
                        ApplyOutcome::Failed { .. } => "failed",
                        ApplyOutcome::Conflict { .. } => "conflict",
                    };
                    self.store
                        .finish_apply(&request.id, &versions, now, |r| {
                            r.finish_apply(key, outcome.clone(), now)
                        })
                        .await?;
                    metrics::record_apply_outcome(label);
                    return Ok(());
                }
                Err(status) if is_transient(status.code()) => {
                    let first = self.settings.retry_backoff;
                    let error = describe(&status);
                    let max = self.settings.max_attempts;
                    let lease = self.lease_micros();
                    let replica = self.replica.clone();
                    request = self
                        .store
                        .step(&request.id, |r| {
                            if !r.runs(key, &replica) {
                                return Ok(Step::Unchanged);
                            }
                            // The wait after the n-th failed attempt, counting this one (the
                            // stored count is the failures before it).
                            let failed = r.apply_run.as_ref().map_or(0, |run| run.attempts) + 1;
                            let retry_at =
                                now.saturating_add_micros(micros(backoff(first, failed)));
                            Ok(
                                match r.record_transient_failure(error, max, retry_at, lease, now) {
                                    Some(event) => Step::Event(event),
                                    None => Step::Quiet,
                                },
                            )
                        })
                        .await?;
                    if request.state != State::Applying {
                        metrics::record_apply_outcome("gave_up");
                        return Ok(());
                    }
                    metrics::record_apply_outcome("retried");
                    // The failure just recorded is counted: 1st -> first, 2nd -> 2 x first, ...
                    let failed = request.apply_run.as_ref().map_or(1, |run| run.attempts);
                    tokio::time::sleep(backoff(first, failed)).await;
                }
                Err(status) => {
                    let outcome = ApplyOutcome::Failed {
                        error: describe(&status),
                    };
                    self.store
                        .finish_apply(&request.id, &[], now, |r| {
                            r.finish_apply(key, outcome.clone(), now)
                        })
                        .await?;
                    metrics::record_apply_outcome("failed");
                    return Ok(());
                }
            }
        }
    }

    /// Runs `call`, renewing this replica's lease on the request meanwhile.
    async fn renewing_lease<F>(
        &self,
        id: &str,
        key: &str,
        call: F,
    ) -> Result<Result<pb::ApplyChangesResponse, tonic::Status>, StoreError>
    where
        F: std::future::Future<Output = Result<pb::ApplyChangesResponse, tonic::Status>>,
    {
        tokio::pin!(call);
        let every = self.settings.lease / 3;
        loop {
            tokio::select! {
                result = &mut call => return Ok(result),
                () = tokio::time::sleep(every) => {
                    let now = self.clock.now();
                    let lease = self.lease_micros();
                    let replica = self.replica.clone();
                    self.store
                        .step(id, |r| Ok(if r.renew_lease(key, &replica, lease, now) { Step::Quiet } else { Step::Unchanged }))
                        .await?;
                }
            }
        }
    }

    async fn call(
        &self,
        endpoint: &str,
        request: &ChangeRequest,
        key: &str,
    ) -> Result<pb::ApplyChangesResponse, tonic::Status> {
        let channel = self.channel(endpoint)?;
        let mut client = ChangeApplierClient::new(channel);
        let message = pb::ApplyChangesRequest {
            idempotency_key: key.to_owned(),
            change_request: Some(convert::change_request(request, None)),
            approvers: request.approvers(),
            attestation: request
                .attestation
                .as_ref()
                .map(crate::audit::attestation::to_proto),
        };
        match tokio::time::timeout(self.settings.call_timeout, client.apply_changes(message)).await
        {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "the applier did not answer within {:?}",
                self.settings.call_timeout
            ))),
        }
    }

    /// The channel to `endpoint`, opened on first use with the TLS of the
    /// `apply.allowed_endpoints` entry that allows it: `https://` verified (system roots or the
    /// entry's `ca_file`, its client certificate presented), `http://` only where the entry
    /// says `allow_insecure`.
    fn channel(&self, endpoint: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| tonic::Status::internal("applier channel cache poisoned"))?;
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let settings = self
            .settings
            .allowed_endpoints
            .check(endpoint)
            .map_err(|refusal| {
                tonic::Status::failed_precondition(format!(
                    "applier_endpoint {endpoint:?} {refusal}"
                ))
            })?;
        let mut builder = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| {
                tonic::Status::invalid_argument(format!("applier_endpoint {endpoint:?}: {e}"))
            })?
            .connect_timeout(Duration::from_secs(5));
        if endpoint.starts_with("https://") {
            let tls = crate::tls::outbound::applier_tls(settings).map_err(|message| {
                tonic::Status::failed_precondition(format!(
                    "applier_endpoint {endpoint:?}: TLS: {message}"
                ))
            })?;
            builder = builder.tls_config(tls).map_err(|e| {
                tonic::Status::failed_precondition(format!(
                    "applier_endpoint {endpoint:?}: TLS: {e}"
                ))
            })?;
        } else if !settings.allow_insecure {
            return Err(tonic::Status::failed_precondition(format!(
                "applier_endpoint {endpoint:?} is plain text and its apply.allowed_endpoints entry does not say allow_insecure = true"
            )));
        }
        let channel = builder.connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Starts the service's own apply of `request` if it is due (an AUTO request at quorum, a
    /// schedule whose time came), under a lease held by this replica; the row lock and the
    /// domain's checks make it happen once whichever replica or handler tries.
    pub async fn start_automatic(
        &self,
        request: &ChangeRequest,
    ) -> Result<ChangeRequest, StoreError> {
        let wiring = self.wiring(request).await?;
        let windows = self.windows(request).await?;
        let lease = self.lease_micros();
        // Twice at most: a schedule the calendars release resumes (one event), then, when its
        // time has passed, starts (another).
        let mut request = request.clone();
        for _ in 0..2 {
            let key = self.clock.new_id();
            let now = self.clock.now();
            let before = request.revision;
            request = self
                .store
                .step(&request.id, |r| {
                    Ok(
                        match r.start_automatic_apply(
                            &wiring,
                            &windows,
                            key,
                            &self.replica,
                            lease,
                            now,
                        ) {
                            Some(event) => Step::Event(event),
                            // A scheduled request re-checked early (a calendar changed) keeps
                            // its plan: store its due time again, without an event.
                            None if r.state == State::Scheduled => Step::Quiet,
                            None => Step::Unchanged,
                        },
                    )
                })
                .await?;
            let resumed = request.revision != before
                && request.state == State::Scheduled
                && request
                    .schedule
                    .as_ref()
                    .is_some_and(|s| s.status == ScheduleStatus::Pending && s.apply_time <= now);
            if !resumed {
                break;
            }
        }
        Ok(request)
    }

    /// The policy's own work on a request that just entered review (see
    /// `approvals_domain::rules`): records it, and starts the apply of an AUTO request it
    /// approved, waiting for it as an approval does. Returns the request as it then stands.
    pub async fn run_policy_work(
        self: &Arc<Self>,
        request: ChangeRequest,
    ) -> Result<ChangeRequest, StoreError> {
        if !request.policy_work_pending {
            return Ok(request);
        }
        let now = self.clock.now();
        let reviewed = self
            .store
            .step(&request.id, |r| {
                Ok(match r.run_policy_work(now) {
                    Some(event) => Step::Event(event),
                    None => Step::Unchanged,
                })
            })
            .await?;
        if reviewed.state != State::Approved || reviewed.apply_mode() != ApplyMode::Auto {
            return Ok(reviewed);
        }
        let started = self.start_automatic(&reviewed).await?;
        if started.runs_under(&self.replica) {
            self.run_and_wait(started).await
        } else {
            Ok(started)
        }
    }

    /// The background worker: every `apply.poll_interval`, claims due requests.
    pub fn spawn_worker(self: &Arc<Self>) -> JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(engine.settings.poll_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(err) = engine.sweep().await {
                    tracing::warn!(error = %err, "apply worker: sweep failed; retrying");
                }
            }
        })
    }

    /// One pass over due work.
    pub async fn sweep(self: &Arc<Self>) -> Result<(), StoreError> {
        let now = self.clock.now();
        let running: HashSet<String> = self
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        let lease = self.lease_micros();
        let mut to_start = Vec::new();
        let taken = self
            .store
            .claim_due(now, 100, |r| {
                if running.contains(&r.id) {
                    return Step::Unchanged;
                }
                if let Some(event) = r.expire(now) {
                    return Step::Event(event);
                }
                // The policy's own work on a request in review (pre-approval, automatic
                // reviews; normally done by the call that put it there), then escalations.
                if let Some(event) = r.run_policy_work(now).or_else(|| r.escalate(now)) {
                    return Step::Event(event);
                }
                if r.state == State::Applying {
                    return if r.take_over_lease(&self.replica, lease, now) {
                        Step::Quiet
                    } else {
                        Step::Unchanged
                    };
                }
                to_start.push(r.id.clone());
                Step::Unchanged
            })
            .await?;
        for request in taken {
            if request.runs_under(&self.replica) {
                tracing::info!(change_request = %request.id, "taking over an apply whose lease expired");
                self.spawn_run(request);
            }
        }
        for id in to_start {
            let request = self.store.get(&id).await?;
            let started = self.start_automatic(&request).await?;
            if started.runs_under(&self.replica) {
                self.spawn_run(started);
            }
        }
        Ok(())
    }
}

fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    )
}

fn describe(status: &tonic::Status) -> String {
    from_applier(format!("{:?}: {}", status.code(), status.message()))
}

/// The wait after `failed` failed attempts of one apply (`failed` >= 1, counting the one that
/// just failed): `first`, then doubling per attempt, at most [`MAX_BACKOFF`].
fn backoff(first: Duration, failed: u32) -> Duration {
    let factor = 2u32.saturating_pow(failed.saturating_sub(1).min(16));
    first.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Text an applier sent, made storable as every caller string must be (no U+0000, which
/// PostgreSQL's text refuses, and at most `MAX_TEXT_BYTES`): an outcome that could not be
/// recorded would leave the request APPLYING until its lease expired, and the applier would be
/// called again, every lease period.
fn from_applier(text: String) -> String {
    let mut text = if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    };
    if text.len() > validation::MAX_TEXT_BYTES {
        let mut end = validation::MAX_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The same for every string (and key) of the applier's result data.
fn json_from_applier(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(text) => Value::String(from_applier(text)),
        Value::Array(items) => Value::Array(items.into_iter().map(json_from_applier).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (from_applier(k), json_from_applier(v)))
                .collect(),
        ),
        other => other,
    }
}

fn outcome(response: pb::ApplyChangesResponse) -> ApplyOutcome {
    let error = if response.error.is_empty() {
        "the applier reported a failure".to_owned()
    } else {
        from_applier(response.error)
    };
    match pb::Outcome::try_from(response.outcome) {
        Ok(pb::Outcome::Applied) => ApplyOutcome::Applied {
            result_data: response.result_data.as_ref().map(|data| {
                let json = serde_json::Value::Object(convert::struct_to_json(data));
                match json_from_applier(json) {
                    serde_json::Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                }
            }),
            versions: response
                .resource_versions
                .into_iter()
                .map(|v| ResourceVersion {
                    resource_type: from_applier(v.resource_type),
                    resource_id: from_applier(v.resource_id),
                    version: from_applier(v.version),
                })
                .collect(),
        },
        Ok(pb::Outcome::Conflict) => ApplyOutcome::Conflict { error },
        _ => ApplyOutcome::Failed { error },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let first = Duration::from_secs(1);
        assert_eq!(backoff(first, 1), Duration::from_secs(1));
        assert_eq!(backoff(first, 2), Duration::from_secs(2));
        assert_eq!(backoff(first, 4), Duration::from_secs(8));
        assert_eq!(backoff(first, 30), MAX_BACKOFF);
    }

    #[test]
    fn transient_codes() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
        ] {
            assert!(is_transient(code));
        }
        for code in [
            Code::Internal,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::PermissionDenied,
        ] {
            assert!(!is_transient(code));
        }
    }
}
