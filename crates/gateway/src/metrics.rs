//! The gateway's metrics (all prefixed `tenantry_gateway_`).

use std::sync::LazyLock;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
use tenantry_core::metrics::register;

/// Forwarded requests by shard and final status.
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new(
            "gateway_requests_total",
            "Tenant requests by shard and status",
        ),
        &["shard", "status"],
    ))
});

/// Time from sending to a shard until its response head arrived.
pub static UPSTREAM_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(HistogramVec::new(
        HistogramOpts::new(
            "gateway_upstream_seconds",
            "Upstream latency (until the response head) by shard",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["shard"],
    ))
});

/// Routing cache events: hit, miss, negative_hit, eviction, update, flush.
pub static CACHE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new("gateway_cache_events_total", "Routing cache events by kind"),
        &["event"],
    ))
});

/// Shard-map messages received from RabbitMQ, by type.
pub static MAP_MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new(
            "gateway_map_messages_total",
            "Shard-map messages received by type",
        ),
        &["type"],
    ))
});

/// Connections to RabbitMQ after the first (each one flushed the cache).
pub static RECONNECTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(IntCounter::new(
        "gateway_bus_reconnects_total",
        "Reconnections to RabbitMQ (each flushes the routing cache)",
    ))
});

/// 1 while subscribed to shard-map changes, 0 while not (routes are then served from the
/// cache, dropped when the catalog's map version changes): worth an alert when it stays 0.
pub static BUS_CONNECTED: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new(
        "gateway_bus_connected",
        "1 while subscribed to shard-map changes on RabbitMQ, else 0",
    ))
});

/// Requests sent again: misdirected (421 → reload), frozen (held during a move), connect
/// (another endpoint after a connect failure).
pub static RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new("gateway_retries_total", "Upstream retries by reason"),
        &["reason"],
    ))
});

/// Requests refused before reaching a shard: rate_limited, company_busy, shard_busy.
pub static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new(
            "gateway_refused_total",
            "Requests refused by the gateway's own limits",
        ),
        &["reason"],
    ))
});

/// Answers cut off because their caller took nothing of them for `gateway.upstream_timeout`.
pub static ABANDONED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new(
            "gateway_answers_abandoned_total",
            "Answers cut off because the caller stopped reading, by shard",
        ),
        &["shard"],
    ))
});

/// Answers cut off because the shard sent nothing for `gateway.upstream_timeout` after its
/// response head.
pub static STALLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new(
            "gateway_answers_stalled_total",
            "Answers cut off because the shard stopped sending, by shard",
        ),
        &["shard"],
    ))
});
