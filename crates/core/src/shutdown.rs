//! One cancellation token for the whole process, cancelled by SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled at the first SIGTERM or SIGINT. A second signal exits
/// at once with status 130, for an operator who does not want to wait for the grace period.
pub fn on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutdown requested; finishing in-flight work"
        );
        t.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without waiting");
        crate::telemetry::finish();
        std::process::exit(130);
    });
    Ok(token)
}

/// Runs `session` again and again until it returns `Ok` (a clean stop) or `shutdown` fires.
/// After a failed session it logs the error under `connection` (its name) and waits, starting at `first` and
/// doubling up to `max`; a session that lasted longer than `max` starts the backoff over.
/// For the long-lived connections of the process: LISTEN, RabbitMQ subscriptions, relays.
pub async fn reconnecting<F, Fut>(
    connection: &'static str,
    shutdown: &CancellationToken,
    first: std::time::Duration,
    max: std::time::Duration,
    session: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    retrying(shutdown, first, max, session, |e, backoff| {
        tracing::warn!(
            connection,
            error = format!("{e:#}"),
            retry_in_ms = backoff.as_millis() as u64,
            "connection lost; reconnecting"
        );
    })
    .await
}

/// Runs `attempt` until it returns `Ok` or `shutdown` fires. After a failure it calls `failed`
/// with the error and the wait before the next attempt, which starts at `first` and doubles up
/// to `max`; an attempt that lasted longer than `max` starts the backoff over.
pub async fn retrying<F, Fut>(
    shutdown: &CancellationToken,
    first: std::time::Duration,
    max: std::time::Duration,
    mut attempt: F,
    failed: impl Fn(&anyhow::Error, std::time::Duration),
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut backoff = first;
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        let Err(e) = attempt().await else {
            return;
        };
        if started.elapsed() > max {
            backoff = first;
        }
        failed(&e, backoff);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}
