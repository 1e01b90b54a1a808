//! The process's Prometheus registry. Every role registers into it; `/metrics` on any listener
//! renders all of it.

use std::{sync::LazyLock, time::Duration};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The registry `/metrics` renders.
pub static REGISTRY: LazyLock<Registry> =
    LazyLock::new(|| Registry::new_custom(Some("tenantry".into()), None).unwrap_or_default());

static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(IntCounterVec::new(
        Opts::new(
            "http_requests_total",
            "HTTP requests by role, route and status",
        ),
        &["role", "route", "status"],
    ))
});

static HTTP_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(HistogramVec::new(
        HistogramOpts::new(
            "http_request_duration_seconds",
            "HTTP request latency by role and route",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["role", "route"],
    ))
});

/// Registers a collector in [`REGISTRY`]; a metric definition that does not register is a bug
/// in its constant options, caught by the tests that render `/metrics`.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    c: Result<C, prometheus::Error>,
) -> C {
    #[allow(clippy::expect_used)]
    let c = c.expect("metric options are valid constants");
    if let Err(e) = REGISTRY.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registered twice");
    }
    c
}

pub(crate) fn http_observe(role: &str, route: &str, status: u16, elapsed: Duration) {
    HTTP_REQUESTS
        .with_label_values(&[role, route, &status.to_string()])
        .inc();
    HTTP_DURATION
        .with_label_values(&[role, route])
        .observe(elapsed.as_secs_f64());
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}
