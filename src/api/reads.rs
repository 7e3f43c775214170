//! The reads of `approvals.v1.ChangeRequests`: get (through the replica's read cache), list,
//! the events of one request, and opening a watch.

use std::sync::Arc;

use approvals_domain::{ChangeRequest, State};
use approvals_store::StoreError;
use tonic::{Request, Response};

use super::{
    called,
    change_requests::{ChangeRequestsService, view},
    page_token,
    requests::{self, EventsQuery, ListQuery, WatchQuery},
};
use crate::{
    auth::{Caller, Scope},
    convert,
    error::ApiError,
    pb,
    watch::{self, WatchStream},
};

impl ChangeRequestsService {
    /// WatchChangeRequests: checks the request and opens the stream (the transport writes its
    /// frames, see `transport::watch_route`).
    pub async fn open_watch(
        &self,
        request: Request<pb::WatchChangeRequestsRequest>,
    ) -> Result<Response<WatchStream>, ApiError> {
        let (caller, req) = called(request)?;
        let query = WatchQuery::try_from(&req)?;
        // A watcher sees only the projects its credentials allow; the filter holds it to one.
        caller.ensure_project(&query.filter.project)?;
        let stream =
            watch::open(self.context.hub.clone(), query.filter, query.start, &caller).await?;
        Ok(Response::new(stream))
    }

    pub(super) async fn get(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<pb::ChangeRequest, ApiError> {
        let id = requests::id("id", id)?;
        let cache = &self.context.cache;
        let store = &self.context.store;
        let change_request = match cache.get(&id, store.written_head()) {
            Some(cached) => cached,
            None => {
                let mark = cache.mark();
                let read = store.get(&id).await?;
                cache.offer(mark, &read);
                Arc::new(read)
            }
        };
        caller.ensure_sees(&change_request)?;
        let mut out = view(&change_request, caller);
        // Anti-collusion needs the history of other requests: checked here, not in lists.
        if out.can_approve {
            let actor = caller.actor();
            let reciprocal = self.reciprocal_approval(&change_request, &actor).await?;
            let now = self.context.clock.now();
            if let Some(refusal) = change_request.approve_refusal(&actor, reciprocal.as_ref(), now)
            {
                out.can_approve = false;
                out.can_approve_reason = crate::error::reason_of(refusal);
            }
        }
        Ok(out)
    }

    pub(super) async fn list(
        &self,
        caller: &Caller,
        req: &pb::ListChangeRequestsRequest,
    ) -> Result<pb::ListChangeRequestsResponse, ApiError> {
        let query = ListQuery::try_from(req)?;
        caller.ensure_project(&query.filter.project)?;
        let store = &self.context.store;
        let after = query.after.as_deref();
        let page = if query.pending_for_me {
            let pending = |r: &ChangeRequest| pending_for(r, caller);
            store
                .list_matching(&query.filter, pending, after, query.page_size)
                .await?
        } else {
            store.list(&query.filter, after, query.page_size).await?
        };
        Ok(pb::ListChangeRequestsResponse {
            change_requests: page
                .change_requests
                .iter()
                .map(|r| view(r, caller))
                .collect(),
            next_page_token: page
                .next_after
                .map(|after| page_token::encode(&after, &query.digest))
                .unwrap_or_default(),
            total_size: i32::try_from(page.total_size).unwrap_or(i32::MAX),
        })
    }

    pub(super) async fn events(
        &self,
        caller: &Caller,
        req: &pb::ListChangeRequestEventsRequest,
    ) -> Result<pb::ListChangeRequestEventsResponse, ApiError> {
        let query = EventsQuery::try_from(req)?;
        let mut events = self
            .context
            .store
            .events(
                &query.id,
                query.after,
                query.page_size + 1,
                req.include_change_request,
            )
            .await?;
        // Every request has at least its CREATED event: none means no such request. Another
        // project's request is answered as an unknown id.
        let visible = events
            .first()
            .map(|first| caller.may_act_in(&first.project));
        if visible == Some(false) || (visible.is_none() && query.after == 0) {
            return Err(StoreError::NotFound(query.id).into());
        }
        let next_page_token = if events.len() as u64 > query.page_size {
            events.truncate(query.page_size as usize);
            events
                .last()
                .map(|e| page_token::encode(&e.revision.to_string(), &query.digest))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListChangeRequestEventsResponse {
            events: events.iter().map(convert::event).collect(),
            next_page_token,
        })
    }
}

/// `pending_for_me`: in review, approvable by the caller now, and not yet reviewed by them.
fn pending_for(request: &ChangeRequest, caller: &Caller) -> bool {
    let flags = request.viewer_flags(&caller.actor());
    request.state == State::InReview
        && caller.has(Scope::Write)
        && flags.can_approve
        && flags.user_decision.is_none()
}
