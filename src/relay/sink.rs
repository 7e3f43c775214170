//! One sink's task: take the sink's lease on the server, watch its events from the cursor,
//! deliver each in revision order, move the cursor, and give up the sink when the lease is
//! lost. Nothing is kept locally: a relay that dies is replaced by any replica, which resumes
//! from the cursor (only the event in flight may be delivered twice, with the same
//! `webhook-id`).

use std::time::Duration;

use tokio::sync::watch;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tracing::Instrument;

use super::{
    config::{Filter, SinkConfig},
    deliver::{self, Delivery, Outcome},
    format::{self, Payload},
    metrics,
};
use crate::{
    client::Client,
    pb::{self, relay_state_client::RelayStateClient},
};

type State = RelayStateClient<crate::client::AuthedChannel>;

/// Everything a sink's task needs.
pub struct SinkTask {
    pub sink: SinkConfig,
    pub filter: Filter,
    pub delivery: Delivery,
    pub http: reqwest::Client,
    pub client: Client,
    pub holder: String,
    pub lease_duration: Duration,
    /// Turns true when the relay stops.
    pub stop: watch::Receiver<bool>,
}

/// The `webhook-id` of an event to a sink: the same on every attempt, from every replica.
pub fn webhook_id(sink: &str, revision: i64) -> String {
    format!("{sink}-{revision}")
}

/// The ErrorInfo reason of a status, and one metadata value.
fn reason(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
}

fn metadata(status: &Status, key: &str) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .and_then(|info| info.metadata.get(key).cloned())
}

/// Why serving the sink stopped.
enum Ended {
    /// Lease lost or relay stopping: go back to acquiring (or stop).
    Lost,
}

impl SinkTask {
    fn state(&self) -> State {
        RelayStateClient::new(self.client.authed_channel())
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits `delay` or until the relay stops; true when stopped.
    async fn pause(&self, delay: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => self.stopped(),
            _ = stop.wait_for(|s| *s) => true,
        }
    }

    fn lease_request(&self, token: &str) -> pb::AcquireSinkLeaseRequest {
        pb::AcquireSinkLeaseRequest {
            sink: self.sink.name.clone(),
            holder: self.holder.clone(),
            lease_duration: Some(prost_types::Duration {
                seconds: i64::try_from(self.lease_duration.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(self.lease_duration.subsec_nanos()).unwrap_or(0),
            }),
            lease_token: token.to_owned(),
        }
    }

    /// Runs until the relay stops: acquire the lease, serve, repeat.
    pub async fn run(self) {
        let poll = self.lease_duration / 3;
        let mut failures = 0u32;
        while !self.stopped() {
            match self
                .state()
                .acquire_sink_lease(self.lease_request(""))
                .await
            {
                Ok(state) => {
                    failures = 0;
                    let state = state.into_inner();
                    tracing::info!(sink = %self.sink.name, cursor = state.cursor, "serving sink");
                    let Ended::Lost = self.serve(state).await;
                }
                Err(status) if reason(&status).as_deref() == Some("SINK_LEASE_HELD") => {
                    if self.pause(poll).await {
                        break;
                    }
                }
                Err(status) => {
                    failures += 1;
                    tracing::warn!(sink = %self.sink.name, error = %status.message(), "cannot take the sink's lease");
                    if self.pause(reconnect_delay(failures)).await {
                        break;
                    }
                }
            }
        }
    }

    /// Renews the lease every third of its duration; turns `lost` true when it is lost (or the
    /// relay stops, after releasing it).
    async fn keep_lease(
        state: State,
        request: pb::AcquireSinkLeaseRequest,
        lease_duration: Duration,
        mut stop: watch::Receiver<bool>,
        lost: watch::Sender<bool>,
    ) {
        let mut valid_until = tokio::time::Instant::now() + lease_duration;
        let mut state = state;
        loop {
            let stopping = tokio::select! {
                () = tokio::time::sleep(lease_duration / 3) => false,
                stopped = stop.wait_for(|s| *s) => stopped.is_ok(),
            };
            if stopping {
                let _ = lost.send(true);
                let _ = state
                    .release_sink_lease(pb::ReleaseSinkLeaseRequest {
                        sink: request.sink.clone(),
                        lease_token: request.lease_token.clone(),
                    })
                    .await;
                return;
            }
            let asked = tokio::time::Instant::now();
            match state.acquire_sink_lease(request.clone()).await {
                Ok(_) => valid_until = asked + lease_duration,
                Err(status) if status.code() == Code::FailedPrecondition => {
                    tracing::warn!(sink = %request.sink, "lost the sink's lease");
                    let _ = lost.send(true);
                    return;
                }
                Err(status) => {
                    tracing::warn!(sink = %request.sink, error = %status.message(), "cannot renew the sink's lease");
                }
            }
            // Stop before the server may give the lease to another replica.
            if tokio::time::Instant::now() + lease_duration / 3 >= valid_until {
                let _ = lost.send(true);
                return;
            }
        }
    }

    async fn serve(&self, state: pb::SinkState) -> Ended {
        let token = state.lease_token.clone();
        let (lost_tx, mut lost) = watch::channel(false);
        let _keeper = AbortOnDrop(tokio::spawn(Self::keep_lease(
            self.state(),
            self.lease_request(&token),
            self.lease_duration,
            self.stop.clone(),
            lost_tx,
        )));
        let mut serving = Serving {
            task: self,
            state: self.state(),
            token,
            cursor: state.cursor,
            committed: state.cursor,
            head: state.cursor,
        };
        serving.watch(&mut lost).await
    }
}

/// Ends the lease keeper with the serving that started it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn reconnect_delay(failures: u32) -> Duration {
    let exp = Duration::from_millis(200).saturating_mul(1 << failures.min(8));
    exp.min(Duration::from_secs(30))
}

/// A sink being served under a lease.
struct Serving<'a> {
    task: &'a SinkTask,
    state: State,
    token: String,
    /// The last revision delivered, dead lettered or filtered out.
    cursor: i64,
    /// The cursor the server holds.
    committed: i64,
    /// The newest revision the watch reported.
    head: i64,
}

impl Serving<'_> {
    fn name(&self) -> &str {
        &self.task.sink.name
    }

    /// Tells the server the cursor; false when the lease is lost.
    async fn commit(&mut self) -> bool {
        if self.cursor <= self.committed {
            return true;
        }
        loop {
            match self
                .state
                .commit_sink_cursor(pb::CommitSinkCursorRequest {
                    sink: self.name().to_owned(),
                    lease_token: self.token.clone(),
                    revision: self.cursor,
                })
                .await
            {
                Ok(_) => {
                    self.committed = self.cursor;
                    metrics::lag(self.name(), self.head - self.cursor);
                    return true;
                }
                Err(status) if status.code() == Code::FailedPrecondition => return false,
                Err(status) => {
                    tracing::warn!(sink = %self.name(), error = %status.message(), "cannot commit the cursor; retrying");
                    if self.task.pause(Duration::from_millis(500)).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn add_dead_letter(&mut self, letter: pb::DeadLetter) -> bool {
        loop {
            match self
                .state
                .add_dead_letter(pb::AddDeadLetterRequest {
                    sink: self.name().to_owned(),
                    lease_token: self.token.clone(),
                    dead_letter: Some(letter.clone()),
                })
                .await
            {
                Ok(_) => {
                    metrics::dead_lettered(self.name());
                    return true;
                }
                Err(status) if status.code() == Code::FailedPrecondition => return false,
                Err(status) => {
                    tracing::warn!(sink = %self.name(), error = %status.message(), "cannot record a dead letter; retrying");
                    if self.task.pause(Duration::from_millis(500)).await {
                        return false;
                    }
                }
            }
        }
    }

    fn watch_request(&self) -> pb::WatchChangeRequestsRequest {
        let sink = &self.task.sink;
        pb::WatchChangeRequestsRequest {
            project: sink.project.clone(),
            environment: sink.environment.clone(),
            action_key: sink.action_key.clone(),
            states: self.task.filter.states.iter().map(|s| *s as i32).collect(),
            start_revision: if self.cursor == 0 { 0 } else { self.cursor + 1 },
            ..Default::default()
        }
    }

    /// Watches and delivers until the lease is lost.
    async fn watch(&mut self, lost: &mut watch::Receiver<bool>) -> Ended {
        let mut failures = 0u32;
        let retry_every = self.task.lease_duration / 3;
        while !*lost.borrow() {
            if !self.retry_dead_letters(lost).await {
                return Ended::Lost;
            }
            let mut watcher = self.task.client.change_requests();
            let opened = tokio::select! {
                opened = watcher.watch_change_requests(self.watch_request()) => opened,
                _ = lost.wait_for(|l| *l) => return Ended::Lost,
            };
            let mut stream = match opened {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    if !self.on_watch_error(&status).await {
                        return Ended::Lost;
                    }
                    failures += 1;
                    if reason(&status).as_deref() != Some("REVISION_TOO_OLD") {
                        tokio::select! {
                            () = tokio::time::sleep(reconnect_delay(failures)) => {}
                            _ = lost.wait_for(|l| *l) => return Ended::Lost,
                        }
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    message = stream.message() => Some(message),
                    () = tokio::time::sleep(retry_every) => None,
                    _ = lost.wait_for(|l| *l) => return Ended::Lost,
                };
                let Some(message) = next else {
                    // Idle: pick up dead letters whose retry was asked for.
                    if !self.retry_dead_letters(lost).await {
                        return Ended::Lost;
                    }
                    continue;
                };
                match message {
                    Ok(Some(response)) => {
                        failures = 0;
                        if !self.on_response(response, lost).await {
                            return Ended::Lost;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(sink = %self.name(), error = %status.message(), "watch ended; resuming");
                        if !self.on_watch_error(&status).await {
                            return Ended::Lost;
                        }
                        break;
                    }
                }
            }
            failures += 1;
            tokio::select! {
                () = tokio::time::sleep(reconnect_delay(failures.min(3))) => {}
                _ = lost.wait_for(|l| *l) => return Ended::Lost,
            }
        }
        Ended::Lost
    }

    /// REVISION_TOO_OLD: the revisions after the cursor left the watch history. Recorded as a
    /// gap dead letter, and the cursor moves to just before the oldest revision available.
    /// False when the lease is lost.
    async fn on_watch_error(&mut self, status: &Status) -> bool {
        if reason(status).as_deref() != Some("REVISION_TOO_OLD") {
            tracing::warn!(sink = %self.name(), code = ?status.code(), error = %status.message(), "watch failed");
            return true;
        }
        let Some(oldest) = metadata(status, "oldest_revision").and_then(|v| v.parse::<i64>().ok())
        else {
            return true;
        };
        let first = self.cursor + 1;
        let last = oldest - 1;
        if last >= first {
            tracing::error!(sink = %self.name(), first, last, "revisions lost from the watch history; recorded as a dead letter");
            let gap = pb::DeadLetter {
                revision: first,
                last_revision: last,
                gap: true,
                reason: format!(
                    "revisions {first}..={last} left the watch history before the relay delivered them (REVISION_TOO_OLD, oldest_revision {oldest})"
                ),
                ..Default::default()
            };
            if !self.add_dead_letter(gap).await {
                return false;
            }
            self.cursor = last;
        }
        self.commit().await
    }

    async fn on_response(
        &mut self,
        response: pb::WatchChangeRequestsResponse,
        lost: &mut watch::Receiver<bool>,
    ) -> bool {
        self.head = self.head.max(response.revision);
        for event in response.events {
            self.head = self.head.max(event.revision);
            if event.revision <= self.cursor {
                continue;
            }
            if !self.task.filter.admits(&event) {
                // Filtered out: the cursor moves past it with the next commit.
                self.cursor = event.revision;
                continue;
            }
            if !self.deliver(&event, lost).await {
                return false;
            }
            self.cursor = event.revision;
            if !self.commit().await {
                return false;
            }
        }
        if response.progress && response.revision > self.cursor {
            self.cursor = response.revision;
        }
        metrics::lag(self.name(), self.head - self.cursor);
        self.commit().await
    }

    /// Delivers one event (to dead letters when it cannot be); false when the lease is lost.
    async fn deliver(&mut self, event: &pb::Event, lost: &mut watch::Receiver<bool>) -> bool {
        let id = webhook_id(self.name(), event.revision);
        let span = tracing::info_span!(
            "relay.deliver",
            sink = %self.name(),
            revision = event.revision,
            change_request_id = %event.change_request_id,
            kind = %format::kind_name(event.kind),
            webhook_id = %id,
        );
        let payload = match format::render(&self.task.sink, event) {
            Ok(payload) => payload,
            Err(message) => {
                return self
                    .add_dead_letter(pb::DeadLetter {
                        revision: event.revision,
                        last_revision: event.revision,
                        change_request_id: event.change_request_id.clone(),
                        webhook_id: id,
                        reason: format!("cannot render the event: {message}"),
                        ..Default::default()
                    })
                    .await;
            }
        };
        let name = self.name().to_owned();
        let outcome = deliver::deliver(
            &self.task.http,
            &self.task.delivery,
            &id,
            &payload,
            lost,
            |_| metrics::retried(&name),
        )
        .instrument(span.clone())
        .await;
        let _entered = span.enter();
        match outcome {
            Outcome::Delivered { attempts } => {
                metrics::delivered(self.name());
                tracing::debug!(attempts, "delivered");
                true
            }
            Outcome::Cancelled => false,
            Outcome::DeadLetter { attempts, reason } => {
                tracing::warn!(attempts, %reason, "delivery given up; recorded as a dead letter");
                self.add_dead_letter(pb::DeadLetter {
                    revision: event.revision,
                    last_revision: event.revision,
                    change_request_id: event.change_request_id.clone(),
                    webhook_id: id,
                    reason,
                    attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
                    payload: payload.body,
                    content_type: payload.content_type.to_owned(),
                    ..Default::default()
                })
                .await
            }
        }
    }

    /// Redelivers the dead letters whose retry was asked for: deleted once delivered, else
    /// their attempts and reason updated. False when the lease is lost.
    async fn retry_dead_letters(&mut self, lost: &mut watch::Receiver<bool>) -> bool {
        let listed = self
            .state
            .list_dead_letters(pb::ListDeadLettersRequest {
                sink: self.name().to_owned(),
                retry_requested: true,
                page_size: 100,
                page_token: String::new(),
            })
            .await;
        let letters = match listed {
            Ok(list) => list.into_inner().dead_letters,
            Err(status) => {
                tracing::warn!(sink = %self.name(), error = %status.message(), "cannot list dead letters");
                return !*lost.borrow();
            }
        };
        for letter in letters {
            let content_type = match letter.content_type.as_str() {
                format::CLOUDEVENTS_CONTENT_TYPE => format::CLOUDEVENTS_CONTENT_TYPE,
                _ => format::JSON_CONTENT_TYPE,
            };
            let payload = Payload {
                body: letter.payload.clone(),
                content_type,
            };
            let name = self.name().to_owned();
            let span = tracing::info_span!("relay.redeliver", sink = %name, revision = letter.revision, webhook_id = %letter.webhook_id);
            let outcome = deliver::deliver(
                &self.task.http,
                &self.task.delivery,
                &letter.webhook_id,
                &payload,
                lost,
                |_| metrics::retried(&name),
            )
            .instrument(span)
            .await;
            let result = match outcome {
                Outcome::Cancelled => return false,
                Outcome::Delivered { .. } => {
                    metrics::delivered(&name);
                    self.state
                        .delete_dead_letter(pb::DeleteDeadLetterRequest {
                            id: letter.id.clone(),
                        })
                        .await
                        .map(|_| ())
                }
                Outcome::DeadLetter { attempts, reason } => self
                    .state
                    .update_dead_letter(pb::UpdateDeadLetterRequest {
                        id: letter.id.clone(),
                        attempts: letter
                            .attempts
                            .saturating_add(i32::try_from(attempts).unwrap_or(i32::MAX)),
                        reason,
                    })
                    .await
                    .map(|_| ()),
            };
            if let Err(status) = result {
                tracing::warn!(sink = %name, id = %letter.id, error = %status.message(), "cannot record the retry of a dead letter");
            }
        }
        !*lost.borrow()
    }
}
