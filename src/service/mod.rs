pub mod change_requests;
pub mod policies;
