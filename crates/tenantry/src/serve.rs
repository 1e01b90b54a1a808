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
    // The api and worker roles of one shard share one pool and one LISTEN connection. That
    // connection outlives the roles' drain (it stops with `background`, after them), so a
    // request still waiting for its job during the grace period is woken when the job ends.
    let background = tokio_util::sync::CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let shard = if cfg.api.enabled || cfg.worker.threads > 0 {
        let registry = tenantry_queue::Registry::from_config(&cfg.queue);
        Some(tenantry_queue::ShardQueue::start(
            &cfg,
            registry,
            background.clone(),
        )?)
    } else {
        None
    };
    if let (true, Some(shard)) = (cfg.api.enabled, &shard) {
        add_server(
            "api",
            tenantry_shard_api::run(&cfg, shard.clone(), shutdown.clone())?,
        );
    } else {
        tracing::info!(role = "api", "role disabled (api.enabled = false)");
    }
    if let (true, Some(shard)) = (cfg.worker.threads > 0, &shard) {
        roles.push("worker");
        let opts = tenantry_queue::WorkerOptions::from_config(
            &cfg.shard.id,
            cfg.worker.threads,
            &cfg.queue,
            cfg.shutdown.grace_period,
        );
        let worker = tenantry_queue::Worker::new(
            shard.pool.clone(),
            shard.registry.clone(),
            opts,
            shard.listener.clone(),
        );
        let token = shutdown.clone();
        tasks.spawn(async move { ("worker", worker.run(token).await) });
        if cfg.rabbitmq.relay_events {
            let relay = tenantry_queue::relay::run(
                shard.pool.clone(),
                cfg.rabbitmq.url.expose().to_owned(),
                cfg.rabbitmq.events_exchange.clone(),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                relay.await;
                ("relay", Ok(()))
            });
        } else {
            tracing::info!(
                role = "relay",
                "event relay disabled (rabbitmq.relay_events = false)"
            );
        }
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
    // supervisor restarts it instead of leaving a half-working node. However the shutdown
    // began (a signal or a failed role), whatever still runs gets the grace period, plus a
    // little for bookkeeping, and is then abandoned: a stuck role never keeps the process up.
    let grace = cfg.shutdown.grace_period;
    let mut failure = None;
    tokio::select! {
        joined = tasks.join_next() => if let Some(joined) = joined {
            // A role that panicked fails like a role that returned an error: the others
            // still get their drain.
            let (role, result) = match joined {
                Ok(r) => r,
                Err(e) => ("a role", Err(anyhow::anyhow!("role task panicked: {e}"))),
            };
            match result {
                Err(e) => {
                    tracing::error!(role, error = format!("{e:#}"), "role failed; shutting down");
                    failure = Some(e);
                }
                Ok(()) if !shutdown.is_cancelled() => {
                    tracing::error!(role, "role stopped unexpectedly; shutting down");
                    // Exit non-zero, or a supervisor that restarts on failure would not.
                    failure = Some(anyhow::anyhow!("the {role} role stopped unexpectedly"));
                }
                Ok(()) => {}
            }
        },
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
    let deadline = grace + Duration::from_secs(2);
    if tokio::time::timeout(deadline, drain(&mut tasks))
        .await
        .is_err()
    {
        tracing::warn!(
            roles = tasks.len(),
            "roles did not stop within the grace period; exiting without them"
        );
    }
    tracing::info!("tenantry stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn drain(tasks: &mut JoinSet<(&'static str, anyhow::Result<()>)>) {
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((role, Err(e))) => {
                tracing::error!(role, error = format!("{e:#}"), "role failed while stopping");
            }
            Err(e) => tracing::error!(error = %e, "role task panicked while stopping"),
            Ok((_, Ok(()))) => {}
        }
    }
}
