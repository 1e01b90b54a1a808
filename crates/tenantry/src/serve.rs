//! `tenantry serve`: every enabled role, side by side, under one shutdown token.

use std::time::Duration;

use anyhow::Context;
use tenantry_core::{Config, http::RunningServer};
use tokio::task::JoinSet;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let shutdown = tenantry_core::shutdown::on_signal().context("installing signal handlers")?;
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    let mut roles = Vec::new();

    let mut add_server = |role: &'static str, server: RunningServer| {
        roles.push(role);
        tasks.spawn(async move {
            let r = match server.task.await {
                Ok(r) => r,
                Err(e) => Err(anyhow::anyhow!("{role} task panicked: {e}")),
            };
            (role, r)
        });
    };

    if cfg.gateway.enabled {
        add_server("gateway", tenantry_gateway::run(&cfg, shutdown.clone())?);
    } else {
        tracing::info!(role = "gateway", "role disabled (gateway.enabled = false)");
    }
    if cfg.api.enabled {
        add_server("api", tenantry_shard_api::run(&cfg, shutdown.clone())?);
    } else {
        tracing::info!(role = "api", "role disabled (api.enabled = false)");
    }
    if cfg.worker.threads > 0 {
        anyhow::bail!("worker.threads > 0: the worker role is not part of this build yet");
    } else {
        tracing::info!(role = "worker", "role disabled (worker.threads = 0)");
    }
    if roles.is_empty() {
        anyhow::bail!(
            "no role is enabled: set gateway.enabled, api.enabled or worker.threads \
             (see `tenantry config check`)"
        );
    }
    tracing::info!(roles = ?roles, version = tenantry_core::VERSION, "tenantry started");

    // A role that stops on its own (a listener that died) takes the whole process down, so a
    // supervisor restarts it instead of leaving a half-working node.
    let grace = cfg.shutdown.grace_period;
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (role, result) = joined.context("role task panicked")?;
        if let Err(e) = result {
            tracing::error!(role, error = format!("{e:#}"), "role failed; shutting down");
            failure.get_or_insert(e);
        } else if !shutdown.is_cancelled() {
            tracing::error!(role, "role stopped unexpectedly; shutting down");
        }
        if !shutdown.is_cancelled() {
            shutdown.cancel();
            // Whatever is still running gets the grace period, plus a little for bookkeeping.
            let deadline = grace + Duration::from_secs(2);
            if tokio::time::timeout(deadline, drain(&mut tasks))
                .await
                .is_err()
            {
                tracing::warn!("roles did not stop within the grace period; exiting");
            }
            break;
        }
    }
    tracing::info!("tenantry stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn drain(tasks: &mut JoinSet<(&'static str, anyhow::Result<()>)>) {
    while let Some(joined) = tasks.join_next().await {
        if let Ok((role, Err(e))) = joined {
            tracing::error!(role, error = format!("{e:#}"), "role failed while stopping");
        }
    }
}
