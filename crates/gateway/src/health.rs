//! Active health checks: every `gateway.health_interval`, each shard endpoint's `/readyz` is
//! asked (with `gateway.connect_timeout` + 1 s to answer); an endpoint that fails gets no
//! traffic until it passes again. Forwarding marks an endpoint unhealthy at once when a
//! connection to it fails, so the checker mostly brings endpoints back.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::router::Router;

/// Runs on its own thread: the HTTP client is single-threaded (actix), like the listener's.
pub fn spawn(
    router: Arc<Router>,
    interval: Duration,
    connect_timeout: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("gateway-health".into())
        .spawn(move || {
            actix_rt::System::new().block_on(async move {
                let client = awc::Client::builder()
                    .connector(awc::Connector::new().timeout(connect_timeout))
                    .timeout(connect_timeout + Duration::from_secs(1))
                    .disable_redirects()
                    .finish();
                loop {
                    let checks = router.endpoints().into_iter().map(|endpoint| {
                        let req = client.get(format!("{}/readyz", endpoint.base));
                        async move {
                            let failed = "shard endpoint failed its health check";
                            match req.send().await {
                                Ok(res) if res.status().is_success() => endpoint.mark_up(),
                                Ok(res) => endpoint.mark_down(
                                    failed,
                                    &format_args!("/readyz answered {}", res.status()),
                                ),
                                Err(e) => endpoint.mark_down(failed, &e),
                            }
                        }
                    });
                    futures_util::future::join_all(checks).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
            })
        })
        .map(|_| ())
}
