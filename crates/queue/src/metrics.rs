//! Queue metrics, registered in the process registry that `/metrics` renders.

use std::sync::LazyLock;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tenantry_core::metrics::register;

const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

pub static DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(IntGaugeVec::new(
        Opts::new(
            "queue_jobs",
            "Jobs waiting, processing or dead-lettered (error) in the shard's queue, by kind",
        ),
        &["shard", "state", "kind"],
    ))
});
pub static CLAIM_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(HistogramVec::new(
        HistogramOpts::new(
            "queue_claim_duration_seconds",
            "Time one claim statement takes",
        )
        .buckets(LATENCY.into()),
        &["shard"],
    ))
});
pub static ENQUEUE_TO_START_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(HistogramVec::new(
        HistogramOpts::new(
            "queue_enqueue_to_start_seconds",
            "From enqueue to a worker starting the job",
        )
        .buckets(LATENCY.into()),
        &["shard", "kind"],
    ))
});
pub static RUN_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(HistogramVec::new(
        HistogramOpts::new("queue_run_duration_seconds", "Handler run time")
            .buckets(LATENCY.into()),
        &["shard", "kind"],
    ))
});
pub static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new(
            "queue_events_total",
            "Queue events: rescued, dead_lettered, retried, refused_company, refused_shard, late_completion, completed",
        ),
        &["shard", "event"],
    ))
});

/// Whether the process's LISTEN connection is up (1) or being re-established (0). While it is
/// down, requests wait out their whole synchronous wait (a POST answers 202) and workers poll.
pub static LISTENER_CONNECTED: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new(
        "queue_listener_connected",
        "Whether the process's LISTEN connection to its shard is up (1) or not (0)",
    ))
});
/// Requests waiting for a job's result in this process (bounded by `queue.max_waiters`).
pub static WAITING_REQUESTS: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new(
        "queue_waiting_requests",
        "Requests of this process waiting for a job's result",
    ))
});

pub fn count(shard: &str, event: &str, n: u64) {
    if n > 0 {
        EVENTS.with_label_values(&[shard, event]).inc_by(n);
    }
}
