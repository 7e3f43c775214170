//! Closed-loop load: `concurrency` workers, each issuing its next call as soon as the previous
//! one returns, for a warm-up and then a measured window. Latencies are recorded per call.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

/// Latency percentiles and throughput of one measured window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The first error seen, if any, to tell a failing scenario from a slow one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl Stats {
    /// Stats from latencies in nanoseconds (sorted here) over a window of `seconds`.
    pub fn from_latencies(mut nanos: Vec<u64>, errors: u64, seconds: f64) -> Self {
        nanos.sort_unstable();
        let ops = nanos.len() as u64;
        Self {
            ops,
            errors,
            seconds,
            per_second: if seconds > 0.0 {
                ops as f64 / seconds
            } else {
                0.0
            },
            p50_ms: percentile(&nanos, 0.50),
            p99_ms: percentile(&nanos, 0.99),
            p999_ms: percentile(&nanos, 0.999),
            max_ms: nanos.last().map_or(0.0, |n| *n as f64 / 1e6),
            first_error: None,
        }
    }
}

/// The value at quantile `q` of sorted nanoseconds, in milliseconds (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1e6
}

/// Runs `op(worker, sequence)` from `concurrency` workers: `warmup` unmeasured, then `duration`
/// measured. A call that fails counts as an error and its latency is not recorded.
pub async fn drive<F, Fut>(concurrency: usize, warmup: Duration, duration: Duration, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut first_error = None;
            let mut sequence = 0u64;
            loop {
                let begun = Instant::now();
                if begun >= end {
                    break;
                }
                let result = op(worker, sequence).await;
                sequence += 1;
                let done = Instant::now();
                // A call counts in the window it started in, and only if it ended in it too.
                if begun >= measure_from && done <= end {
                    match result {
                        Ok(()) => latencies.push((done - begun).as_nanos() as u64),
                        Err(err) => {
                            errors += 1;
                            first_error.get_or_insert(err);
                        }
                    }
                } else if let Err(err) = result {
                    first_error.get_or_insert(err);
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for worker in workers {
        if let Ok((latencies, e, first)) = worker.await {
            all.extend(latencies);
            errors += e;
            if first_error.is_none() {
                first_error = first;
            }
        }
    }
    let mut stats = Stats::from_latencies(all, errors, duration.as_secs_f64());
    stats.first_error = first_error;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let nanos: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        assert_eq!(percentile(&nanos, 0.5), 500.0);
        assert_eq!(percentile(&nanos, 0.99), 990.0);
        assert_eq!(percentile(&nanos, 0.999), 999.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
