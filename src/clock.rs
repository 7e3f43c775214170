//! Time and ids, given to the handlers and the apply engine rather than read by them: a test
//! (or an embedding) can run the whole server on a clock of its own.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use approvals_domain::Timestamp;

/// Where the server reads the time and takes new ids from.
pub trait Clock: Send + Sync + 'static {
    /// The wall-clock time now.
    fn now(&self) -> Timestamp;

    /// A new unique id (change requests, reviews, comments, policies, apply keys): a UUIDv7,
    /// so ids sort by creation time.
    fn new_id(&self) -> String {
        uuid::Uuid::now_v7().to_string()
    }
}

/// The shared handle the server passes around.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp::from_micros(micros)
    }
}

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sort_by_creation() {
        let clock = SystemClock;
        let first = clock.new_id();
        let second = clock.new_id();
        assert_ne!(first, second);
        assert!(first < second);
        assert!(clock.now().as_micros() > 0);
    }
}
