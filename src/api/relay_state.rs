//! `approvals.v1.RelayState`: the relays' cursors, leases and dead letters, kept by the server
//! so that a relay keeps nothing on disk. The layer checks the scope (`approvals:relay`); lease
//! times are the server's clock.

use std::sync::Arc;

use approvals_domain::{Timestamp, validation::Violations};
use approvals_store::{DeadLetter, DeadLetterFilter, LeaseRequest, SinkState};
use tonic::Request;

use super::{Answer, Context, answer, called, page_token};
use crate::{
    convert,
    error::ApiError,
    pb::{self, relay_state_server::RelayState},
};

const MIN_LEASE_MICROS: i64 = 1_000_000;
const MAX_LEASE_MICROS: i64 = 3_600_000_000;

pub struct RelayStateService {
    context: Arc<Context>,
}

impl RelayStateService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }

    fn now(&self) -> i64 {
        self.context.clock.now().as_micros()
    }
}

/// A required name-like field: not blank, no NUL, at most 200 characters.
fn required(v: &mut Violations, field: &str, value: &str) {
    if value.trim().is_empty() {
        v.add(field, "is required");
    } else if value.chars().count() > 200 {
        v.add(field, "is longer than 200 characters");
    }
    v.no_nul(field, value);
}

fn time(micros: i64) -> prost_types::Timestamp {
    convert::timestamp(Timestamp::from_micros(micros))
}

fn sink_state(state: SinkState, holder_view: bool) -> pb::SinkState {
    pb::SinkState {
        sink: state.sink,
        cursor: state.cursor,
        holder: state.holder.unwrap_or_default(),
        lease_token: if holder_view {
            state.lease_token.unwrap_or_default()
        } else {
            String::new()
        },
        lease_expire_time: state.lease_expire_time.map(time),
        dead_letter_count: state.dead_letter_count,
        retry_requested_count: state.retry_requested_count,
        update_time: Some(time(state.update_time)),
    }
}

fn dead_letter(letter: DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        id: letter.id,
        sink: letter.sink,
        revision: letter.revision,
        last_revision: letter.last_revision,
        gap: letter.gap,
        change_request_id: letter.change_request_id,
        webhook_id: letter.webhook_id,
        reason: letter.reason,
        attempts: i32::try_from(letter.attempts).unwrap_or(i32::MAX),
        payload: letter.payload,
        content_type: letter.content_type,
        create_time: Some(time(letter.create_time)),
        update_time: Some(time(letter.update_time)),
        retry_requested: letter.retry_requested,
    }
}

impl RelayStateService {
    async fn acquire(&self, req: pb::AcquireSinkLeaseRequest) -> Result<pb::SinkState, ApiError> {
        let mut v = Violations::default();
        required(&mut v, "sink", &req.sink);
        required(&mut v, "holder", &req.holder);
        v.no_nul("lease_token", &req.lease_token);
        let duration = match &req.lease_duration {
            None => {
                v.add("lease_duration", "is required");
                0
            }
            Some(d) => {
                let micros = d
                    .seconds
                    .saturating_mul(1_000_000)
                    .saturating_add(i64::from(d.nanos) / 1000);
                if !(MIN_LEASE_MICROS..=MAX_LEASE_MICROS).contains(&micros) {
                    v.add("lease_duration", "must be between 1s and 1h");
                }
                micros
            }
        };
        v.into_result()?;
        let state = self
            .context
            .store
            .acquire_sink_lease(LeaseRequest {
                sink: &req.sink,
                holder: &req.holder,
                token: (!req.lease_token.is_empty()).then_some(req.lease_token.as_str()),
                new_token: self.context.clock.new_id(),
                now: self.now(),
                duration_micros: duration,
            })
            .await?;
        Ok(sink_state(state, true))
    }

    async fn release(&self, req: pb::ReleaseSinkLeaseRequest) -> Result<(), ApiError> {
        let mut v = Violations::default();
        required(&mut v, "sink", &req.sink);
        required(&mut v, "lease_token", &req.lease_token);
        v.into_result()?;
        Ok(self
            .context
            .store
            .release_sink_lease(&req.sink, &req.lease_token, self.now())
            .await?)
    }

    async fn commit(&self, req: pb::CommitSinkCursorRequest) -> Result<pb::SinkState, ApiError> {
        let mut v = Violations::default();
        required(&mut v, "sink", &req.sink);
        required(&mut v, "lease_token", &req.lease_token);
        if req.revision <= 0 {
            v.add("revision", "must be > 0");
        }
        v.into_result()?;
        let state = self
            .context
            .store
            .commit_sink_cursor(&req.sink, &req.lease_token, req.revision, self.now())
            .await?;
        Ok(sink_state(state, true))
    }

    async fn get(&self, req: pb::GetSinkStateRequest) -> Result<pb::SinkState, ApiError> {
        let mut v = Violations::default();
        required(&mut v, "sink", &req.sink);
        v.into_result()?;
        Ok(sink_state(
            self.context.store.sink_state(&req.sink).await?,
            false,
        ))
    }

    async fn add(&self, req: pb::AddDeadLetterRequest) -> Result<pb::DeadLetter, ApiError> {
        let mut v = Violations::default();
        required(&mut v, "sink", &req.sink);
        required(&mut v, "lease_token", &req.lease_token);
        let Some(letter) = req.dead_letter else {
            return Err(ApiError::invalid("dead_letter", "is required"));
        };
        if letter.revision <= 0 {
            v.add("dead_letter.revision", "must be > 0");
        }
        if letter.last_revision < letter.revision {
            v.add(
                "dead_letter.last_revision",
                "must be at least dead_letter.revision",
            );
        }
        if letter.attempts < 0 {
            v.add("dead_letter.attempts", "must be >= 0");
        }
        for (field, value) in [
            ("dead_letter.change_request_id", &letter.change_request_id),
            ("dead_letter.webhook_id", &letter.webhook_id),
            ("dead_letter.reason", &letter.reason),
            ("dead_letter.payload", &letter.payload),
            ("dead_letter.content_type", &letter.content_type),
        ] {
            v.no_nul(field, value);
        }
        if letter.payload.len() > 4 * 1024 * 1024 {
            v.add("dead_letter.payload", "is larger than 4 MiB");
        }
        v.into_result()?;
        let stored = DeadLetter {
            sink: req.sink,
            revision: letter.revision,
            last_revision: letter.last_revision,
            gap: letter.gap,
            change_request_id: letter.change_request_id,
            webhook_id: letter.webhook_id,
            reason: letter.reason,
            attempts: i64::from(letter.attempts),
            payload: letter.payload,
            content_type: letter.content_type,
            ..DeadLetter::default()
        };
        let added = self
            .context
            .store
            .add_dead_letter(
                &req.lease_token,
                stored,
                self.context.clock.new_id(),
                self.now(),
            )
            .await?;
        Ok(dead_letter(added))
    }

    async fn list(
        &self,
        req: pb::ListDeadLettersRequest,
    ) -> Result<pb::ListDeadLettersResponse, ApiError> {
        let mut v = Violations::default();
        v.no_nul("sink", &req.sink);
        v.into_result()?;
        let page_size = page_token::page_size(
            req.page_size,
            page_token::DEFAULT_PAGE_SIZE,
            page_token::MAX_PAGE_SIZE,
        )?;
        let retry = if req.retry_requested { "retry" } else { "" };
        let digest = page_token::query_digest(&["dead_letters", &req.sink, retry]);
        let after = page_token::decode(&req.page_token, &digest)?;
        let filter = DeadLetterFilter {
            sink: (!req.sink.is_empty()).then(|| req.sink.clone()),
            retry_requested: req.retry_requested,
        };
        let (letters, next) = self
            .context
            .store
            .list_dead_letters(&filter, after.as_deref(), page_size)
            .await?;
        Ok(pb::ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(dead_letter).collect(),
            next_page_token: next
                .map(|id| page_token::encode(&id, &digest))
                .unwrap_or_default(),
        })
    }

    async fn retry(
        &self,
        req: pb::RetryDeadLetterRequest,
    ) -> Result<pb::RetryDeadLetterResponse, ApiError> {
        let mut v = Violations::default();
        v.no_nul("id", &req.id);
        v.no_nul("sink", &req.sink);
        match (req.id.is_empty(), req.all) {
            (true, false) => v.add("id", "is required (or set all)"),
            (false, true) => v.add("all", "is exclusive with id"),
            _ => {}
        }
        v.into_result()?;
        let count = self
            .context
            .store
            .retry_dead_letters(
                (!req.id.is_empty()).then_some(req.id.as_str()),
                (!req.sink.is_empty()).then_some(req.sink.as_str()),
                self.now(),
            )
            .await?;
        Ok(pb::RetryDeadLetterResponse {
            count: i64::try_from(count).unwrap_or(i64::MAX),
        })
    }

    async fn delete(&self, req: pb::DeleteDeadLetterRequest) -> Result<(), ApiError> {
        let mut v = Violations::default();
        required(&mut v, "id", &req.id);
        v.into_result()?;
        Ok(self.context.store.delete_dead_letter(&req.id).await?)
    }

    async fn update(&self, req: pb::UpdateDeadLetterRequest) -> Result<pb::DeadLetter, ApiError> {
        let mut v = Violations::default();
        required(&mut v, "id", &req.id);
        v.no_nul("reason", &req.reason);
        if req.attempts < 0 {
            v.add("attempts", "must be >= 0");
        }
        v.into_result()?;
        let updated = self
            .context
            .store
            .update_dead_letter(&req.id, i64::from(req.attempts), &req.reason, self.now())
            .await?;
        Ok(dead_letter(updated))
    }
}

#[tonic::async_trait]
impl RelayState for RelayStateService {
    async fn acquire_sink_lease(
        &self,
        request: Request<pb::AcquireSinkLeaseRequest>,
    ) -> Answer<pb::SinkState> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.acquire(req).await
        };
        answer(result.await)
    }

    async fn release_sink_lease(
        &self,
        request: Request<pb::ReleaseSinkLeaseRequest>,
    ) -> Answer<()> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.release(req).await
        };
        answer(result.await)
    }

    async fn commit_sink_cursor(
        &self,
        request: Request<pb::CommitSinkCursorRequest>,
    ) -> Answer<pb::SinkState> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.commit(req).await
        };
        answer(result.await)
    }

    async fn get_sink_state(
        &self,
        request: Request<pb::GetSinkStateRequest>,
    ) -> Answer<pb::SinkState> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.get(req).await
        };
        answer(result.await)
    }

    async fn add_dead_letter(
        &self,
        request: Request<pb::AddDeadLetterRequest>,
    ) -> Answer<pb::DeadLetter> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.add(req).await
        };
        answer(result.await)
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Answer<pb::ListDeadLettersResponse> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.list(req).await
        };
        answer(result.await)
    }

    async fn retry_dead_letter(
        &self,
        request: Request<pb::RetryDeadLetterRequest>,
    ) -> Answer<pb::RetryDeadLetterResponse> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.retry(req).await
        };
        answer(result.await)
    }

    async fn delete_dead_letter(
        &self,
        request: Request<pb::DeleteDeadLetterRequest>,
    ) -> Answer<()> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.delete(req).await
        };
        answer(result.await)
    }

    async fn update_dead_letter(
        &self,
        request: Request<pb::UpdateDeadLetterRequest>,
    ) -> Answer<pb::DeadLetter> {
        let result = async {
            let (_caller, req) = called(request)?;
            self.update(req).await
        };
        answer(result.await)
    }
}
