//! The gRPC handlers. Each one takes the caller the auth layer found, converts the request
//! (`requests`), runs the domain command through the store, and converts the result back;
//! errors are [`ApiError`]s, turned into a `Status` in one place (`crate::error`).

pub mod audit;
pub mod calendars;
pub mod change_requests;
mod governance;
mod page_token;
pub mod policies;
pub mod read_cache;
mod reads;
pub mod relay_state;
mod requests;

use std::sync::Arc;

use approvals_store::Store;
use tonic::{Request, Response, Status};

use crate::{
    apply::ApplyEngine, auth::Caller, clock::SharedClock,
    config::allowed_endpoints::AllowedEndpoints, error::ApiError, watch::Hub,
};

use self::read_cache::RequestCache;

/// What the handlers share: the store, the watch hub, the apply engine, the read cache, the
/// clock, and the settings they read.
pub struct Context {
    pub store: Store,
    pub hub: Arc<Hub>,
    pub engine: Arc<ApplyEngine>,
    /// The replica's cache for GetChangeRequest, kept current by `hub`.
    pub cache: Arc<RequestCache>,
    pub clock: SharedClock,
    /// `min_approvals`: the quorum of a request no policy matches.
    pub min_approvals: u32,
    /// `apply.allowed_endpoints`: the only applier endpoints a policy may name.
    pub allowed_endpoints: AllowedEndpoints,
    /// Signs approval attestations; `None` without `audit.signing_key_file`.
    pub attestor: Option<Arc<crate::audit::attestation::Attestor>>,
}

impl Context {
    /// Attests `request` when `event` (the command just run on it) reached quorum or applied
    /// it break-glass, and the server has a key.
    pub fn attest_if_due(
        &self,
        request: &mut approvals_domain::ChangeRequest,
        event: &approvals_domain::EventDraft,
        now: approvals_domain::Timestamp,
    ) {
        if let Some(attestor) = &self.attestor
            && request.attestation_due(event)
        {
            attestor.attest(request, now);
        }
    }
}

/// What a handler answers.
type Answer<T> = Result<Response<T>, Status>;

/// The caller the auth layer put into the request, and the message.
fn called<T>(request: Request<T>) -> Result<(Arc<Caller>, T), ApiError> {
    let caller = crate::auth::caller(&request)?;
    Ok((caller, request.into_inner()))
}

/// A handler's result as the generated trait wants it.
fn answer<T>(result: Result<T, ApiError>) -> Answer<T> {
    result.map(Response::new).map_err(Status::from)
}
