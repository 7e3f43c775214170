//! What this process has written and committed, and the PostgreSQL LISTEN/NOTIFY relay that
//! tells the other replicas (and hears from them).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tokio::sync::{Notify, watch};

use crate::connect::{Backend, Store};

/// PostgreSQL LISTEN/NOTIFY channel on which replicas announce commits.
const COMMIT_CHANNEL: &str = "approvals_events";

impl Store {
    /// The highest revision this process has appended to the event log, from the moment it is
    /// appended (before its commit): a reader that has applied the log up to it has seen every
    /// write this process made.
    pub fn written_head(&self) -> i64 {
        self.written.load(Ordering::Acquire)
    }

    pub(crate) fn note_written(&self, revision: i64) {
        self.written.fetch_max(revision, Ordering::AcqRel);
    }

    /// Changes after every commit this process makes.
    pub fn local_commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Wakes this process's log reader: something was just committed.
    pub(crate) fn note_committed(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// PostgreSQL: relays commits between replicas (LISTEN/NOTIFY on `approvals_events`): a
    /// NOTIFY after local commits (coalesced, outside the write transactions, so writers never
    /// queue on the notification lock), and `wake` notified when any replica commits. Other
    /// backends have one process and need nothing. The tasks reconnect on their own.
    pub fn spawn_commit_relay(&self, wake: Arc<Notify>) -> Vec<tokio::task::JoinHandle<()>> {
        if self.backend != Backend::Postgres {
            return Vec::new();
        }
        let url = self.url.clone();
        let listener = tokio::spawn(async move {
            use sea_orm::sqlx::postgres::PgListener;
            loop {
                match PgListener::connect(&url).await {
                    Ok(mut listener) => {
                        if let Err(err) = listener.listen(COMMIT_CHANNEL).await {
                            tracing::warn!(error = %err, "LISTEN failed");
                        } else {
                            // A reconnect may have missed notifications: wake the reader once.
                            wake.notify_one();
                            while listener.recv().await.is_ok() {
                                wake.notify_one();
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot connect to LISTEN for commits")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let store = self.clone();
        let notifier = tokio::spawn(async move {
            let mut commits = store.local_commits();
            while commits.changed().await.is_ok() {
                let notify = Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT pg_notify('{COMMIT_CHANNEL}', '')"),
                );
                if let Err(err) = store.db.execute_raw(notify).await {
                    tracing::debug!(error = %err, "NOTIFY failed");
                }
                // Coalesce: one notification covers the commits of the next few milliseconds.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        vec![listener, notifier]
    }
}
