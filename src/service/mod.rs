pub mod change_requests;
