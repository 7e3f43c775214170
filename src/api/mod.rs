//! The gRPC handlers: each authenticates (the caller the auth layer found), converts the
//! request, runs the domain command through the store, and converts the result back.

pub mod change_requests;
mod page_token;
pub mod policies;
