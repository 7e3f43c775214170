//! The relay (`approvals relay`): notifies people and systems of change request events. It is
//! an ordinary client of the public API ([`crate::client`]): for each configured sink it takes
//! the sink's lease (`approvals.v1.RelayState`), watches the sink's events from its cursor
//! (`WatchChangeRequests`), POSTs each one, signed (Standard Webhooks), as a CloudEvent or a
//! Slack message, and moves the cursor. It never touches the database and keeps nothing on
//! local disk.
//!
//! - [`config`] the `[relay]` file; [`format`] CloudEvents and Slack bodies; [`sign`] the
//!   signatures; [`deliver`] one POST and its retries; [`sink`] one sink's task; [`metrics`].
//! - Entry points: [`run`] (the relay), [`check`], [`list_dead_letters`], [`retry_dead_letters`].

pub mod cli;
pub mod config;
pub mod deliver;
pub mod format;
pub mod metrics;
pub mod sign;
pub mod sink;

use std::future::Future;

use tokio::sync::watch;

pub use self::config::{RelayConfig, RelayConfigError, RelayFlags, SinkConfig};
use self::{deliver::Delivery, sign::Secret, sink::SinkTask};
use crate::{
    client::{Client, ClientError},
    pb::{self, relay_state_client::RelayStateClient},
};

/// Why the relay (or one of its commands) failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] RelayConfigError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("sink {0:?} is not configured")]
    UnknownSink(String),
    #[error("{0}")]
    Sink(String),
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
}

/// This replica's name in leases: `HOSTNAME/pid/uuid`.
fn default_holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".to_owned());
    format!(
        "{host}/{}/{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    )
}

fn delivery(sink: &SinkConfig) -> Result<Delivery, RelayError> {
    let secrets = sink
        .secrets
        .iter()
        .map(|s| Secret::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| RelayError::Sink(format!("sink {}: secrets: {m}", sink.name)))?;
    Ok(Delivery {
        url: sink.url.clone(),
        secrets,
        max_attempts: sink.max_attempts,
        max_age: sink.max_age,
        backoff: sink.backoff,
        max_backoff: sink.max_backoff,
    })
}

fn http_client(sink: &SinkConfig) -> Result<reqwest::Client, RelayError> {
    // One process-wide TLS provider; an error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(sink.timeout)
        .connect_timeout(sink.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("approvals-relay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| RelayError::Sink(format!("sink {}: HTTP client: {e}", sink.name)))
}

fn connect(config: &RelayConfig) -> Result<Client, RelayError> {
    let client_config = config.client(|name| std::env::var(name).ok())?;
    Ok(Client::connect_lazy(&client_config)?)
}

/// Runs the relay until `shutdown` completes: one task per sink, so a sink that is down never
/// delays another. On shutdown each task releases its lease (another replica takes over at
/// once).
pub async fn run(
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RelayError> {
    let holder = config.holder.clone().unwrap_or_else(default_holder);
    let (stop_tx, stop) = watch::channel(false);
    // Dropping the relay's future (an embedding that aborts it) ends every sink task too.
    let mut tasks = tokio::task::JoinSet::new();
    for sink in &config.sinks {
        let task = SinkTask {
            filter: sink
                .filter()
                .map_err(|m| RelayError::Sink(format!("sink {}: {m}", sink.name)))?,
            delivery: delivery(sink)?,
            http: http_client(sink)?,
            sink: sink.clone(),
            // A connection of its own per sink: a sink that is not reading its watch stream
            // (retrying a delivery) holds HTTP/2 flow-control window, which on a shared
            // connection would stall every other sink's stream.
            client: connect(&config)?,
            holder: holder.clone(),
            lease_duration: config.lease_duration,
            stop: stop.clone(),
        };
        tasks.spawn(task.run());
    }
    tracing::info!(%holder, sinks = config.sinks.len(), endpoint = %config.endpoint, "relay running");
    shutdown.await;
    tracing::info!("relay stopping");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// `approvals relay check --sink NAME`: one signed test event (CloudEvents type
/// `approvals.relay.check`, or a Slack text); returns the sink's answer, described.
pub async fn check(config: &RelayConfig, name: &str) -> Result<String, RelayError> {
    let sink = config
        .sink(name)
        .ok_or_else(|| RelayError::UnknownSink(name.to_owned()))?;
    let id = format!("{name}-check-{}", uuid::Uuid::now_v7().simple());
    let payload = format::check(sink, &id).map_err(RelayError::Sink)?;
    let answer = deliver::attempt(&http_client(sink)?, &delivery(sink)?, &id, &payload).await;
    Ok(match answer {
        deliver::Attempt::Delivered { status, body } => {
            format!("delivered: HTTP {status} {body}")
        }
        deliver::Attempt::Retry { reason, .. } => format!("failed (would be retried): {reason}"),
        deliver::Attempt::Refused { reason } => {
            format!("refused (would be dead lettered): {reason}")
        }
    })
}

fn state_client(
    config: &RelayConfig,
) -> Result<RelayStateClient<crate::client::AuthedChannel>, RelayError> {
    Ok(RelayStateClient::new(connect(config)?.authed_channel()))
}

/// `approvals relay dead-letters list`: every dead letter (of `sink` when given), as text.
pub async fn list_dead_letters(
    config: &RelayConfig,
    sink: Option<&str>,
) -> Result<String, RelayError> {
    let mut state = state_client(config)?;
    let mut out = String::new();
    let mut page_token = String::new();
    loop {
        let page = state
            .list_dead_letters(pb::ListDeadLettersRequest {
                sink: sink.unwrap_or_default().to_owned(),
                retry_requested: false,
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        for letter in &page.dead_letters {
            let what = if letter.gap {
                format!("gap {}..={}", letter.revision, letter.last_revision)
            } else {
                format!(
                    "revision {} change request {}",
                    letter.revision, letter.change_request_id
                )
            };
            let retry = if letter.retry_requested {
                " (retry requested)"
            } else {
                ""
            };
            out.push_str(&format!(
                "{}\t{}\t{what}\tattempts {}{retry}\t{}\n",
                letter.id, letter.sink, letter.attempts, letter.reason
            ));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(out)
}

/// `approvals relay dead-letters retry [ID|--all]`: marks dead letters for redelivery by the
/// relay serving their sink; returns how many.
pub async fn retry_dead_letters(
    config: &RelayConfig,
    id: Option<&str>,
    sink: Option<&str>,
) -> Result<i64, RelayError> {
    let mut state = state_client(config)?;
    let answer = state
        .retry_dead_letter(pb::RetryDeadLetterRequest {
            id: id.unwrap_or_default().to_owned(),
            all: id.is_none(),
            sink: sink.unwrap_or_default().to_owned(),
        })
        .await?;
    Ok(answer.into_inner().count)
}
