//! One POST of a signed payload to a sink, and the retries around it: exponential backoff with
//! jitter (a random wait between half and all of the exponential delay) on timeouts, connection
//! errors, 5xx, 408 and 429 (waiting at least `Retry-After`); no retry on other 4xx; dead letter
//! after `max_attempts` or `max_age`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use reqwest::{StatusCode, header};
use tokio::sync::watch;

use super::{
    format::Payload,
    sign::{self, Secret},
};

/// What the sink said to one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx.
    Delivered { status: u16, body: String },
    /// Worth another attempt (timeout, connection error, 5xx, 408, 429).
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Another 4xx (or 3xx: redirects are not followed): retrying would not help.
    Refused { reason: String },
}

/// How delivering one event ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        attempts: u32,
    },
    /// Give up: to dead letters.
    DeadLetter {
        attempts: u32,
        reason: String,
    },
    /// The lease was lost (or the relay is stopping) before it ended.
    Cancelled,
}

/// How a sink is called.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub url: String,
    pub secrets: Vec<Secret>,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

const BODY_EXCERPT: usize = 512;

fn excerpt(text: &str) -> String {
    let mut cut: String = text.chars().take(BODY_EXCERPT).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// One signed POST (the client carries the per-attempt timeout).
pub async fn attempt(
    client: &reqwest::Client,
    delivery: &Delivery,
    webhook_id: &str,
    payload: &Payload,
) -> Attempt {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut request = client
        .post(&delivery.url)
        .header(header::CONTENT_TYPE, payload.content_type)
        .header(sign::ID_HEADER, webhook_id)
        .header(sign::TIMESTAMP_HEADER, timestamp.to_string());
    if !delivery.secrets.is_empty() {
        request = request.header(
            sign::SIGNATURE_HEADER,
            sign::signature(
                &delivery.secrets,
                webhook_id,
                timestamp,
                payload.body.as_bytes(),
            ),
        );
    }
    let response = match request.body(payload.body.clone()).send().await {
        Ok(response) => response,
        Err(err) => {
            let kind = if err.is_timeout() {
                "timed out"
            } else if err.is_connect() {
                "cannot connect"
            } else {
                "failed"
            };
            return Attempt::Retry {
                reason: format!("{kind}: {}", crate::client::error_chain(&err)),
                retry_after: None,
            };
        }
    };
    let status = response.status();
    let wait = retry_after(response.headers());
    let body = response.text().await.unwrap_or_default();
    let reason = format!("HTTP {}: {}", status.as_u16(), excerpt(&body));
    if status.is_success() {
        Attempt::Delivered {
            status: status.as_u16(),
            body,
        }
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Attempt::Retry {
            reason,
            retry_after: wait,
        }
    } else {
        Attempt::Refused { reason }
    }
}

/// The wait before attempt `n + 1` (n >= 1): a random wait between half and all of
/// `backoff * 2^(n-1)`, capped at `max_backoff`.
fn backoff(delivery: &Delivery, attempts: u32) -> Duration {
    let exp = delivery
        .backoff
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(delivery.max_backoff);
    let micros = u64::try_from(exp.as_micros()).unwrap_or(u64::MAX).max(1);
    Duration::from_micros(rand::rng().random_range(micros / 2..=micros))
}

/// Delivers until delivered, given up on, or `cancel` turns true. `on_retry` is told of each
/// failed attempt that will be retried.
pub async fn deliver(
    client: &reqwest::Client,
    delivery: &Delivery,
    webhook_id: &str,
    payload: &Payload,
    cancel: &mut watch::Receiver<bool>,
    mut on_retry: impl FnMut(&str),
) -> Outcome {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        if *cancel.borrow() {
            return Outcome::Cancelled;
        }
        attempts += 1;
        let result = tokio::select! {
            result = attempt(client, delivery, webhook_id, payload) => result,
            _ = cancel.wait_for(|c| *c) => return Outcome::Cancelled,
        };
        let (reason, wait) = match result {
            Attempt::Delivered { .. } => return Outcome::Delivered { attempts },
            Attempt::Refused { reason } => return Outcome::DeadLetter { attempts, reason },
            Attempt::Retry {
                reason,
                retry_after,
            } => (reason, retry_after),
        };
        let delay = wait.map_or_else(
            || backoff(delivery, attempts),
            |wait| wait.max(backoff(delivery, attempts)),
        );
        if attempts >= delivery.max_attempts {
            return Outcome::DeadLetter {
                attempts,
                reason: format!("{reason} (after {attempts} attempts)"),
            };
        }
        if started.elapsed() + delay > delivery.max_age {
            return Outcome::DeadLetter {
                attempts,
                reason: format!(
                    "{reason} (max_age {} reached after {attempts} attempts)",
                    humantime::format_duration(delivery.max_age)
                ),
            };
        }
        on_retry(&reason);
        tracing::debug!(%reason, ?delay, attempts, "retrying delivery");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = cancel.wait_for(|c| *c) => return Outcome::Cancelled,
        }
    }
}
