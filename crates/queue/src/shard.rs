//! What a shard node's roles share: the pool, the one LISTEN connection, the notifier, the
//! handler registry, and a cheap estimate of the shard's waiting jobs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use deadpool_postgres::Pool;
use tenantry_core::{Config, db};
use tokio_util::sync::CancellationToken;

use crate::{Listener, Notifier, Registry, store};

#[derive(Clone)]
pub struct ShardQueue {
    pub shard_id: String,
    pub pool: Pool,
    pub listener: Listener,
    pub notifier: Notifier,
    pub registry: Registry,
    waiting: Arc<AtomicI64>,
}

impl ShardQueue {
    /// Connects lazily (nothing fails here if the database is down: `/readyz` reports it).
    pub fn start(
        cfg: &Config,
        registry: Registry,
        shutdown: CancellationToken,
    ) -> anyhow::Result<ShardQueue> {
        let pool = store::pool(
            &cfg.shard.url,
            cfg.shard.pool_size,
            &cfg.database,
            "tenantry-shard",
        )
        .context("configuring the shard pool")?;
        let pg = db::pg_config(&cfg.shard.url, &cfg.database, "tenantry-listen")?;
        let listener = Listener::start(pg, cfg.queue.max_waiters, shutdown.clone());
        let notifier = Notifier::start(pool.clone(), shutdown.clone());
        let waiting = Arc::new(AtomicI64::new(0));
        // The shard-wide cap is a safety limit, so a count refreshed every second is enough and
        // keeps a count of up to 200,000 rows off every enqueue.
        let (p, w, cap) = (
            pool.clone(),
            waiting.clone(),
            cfg.queue.max_waiting_per_shard,
        );
        tokio::spawn(async move {
            // A failed refresh keeps the last count; said once when the refreshes start failing
            // and once when they work again, not every second.
            let mut failing = false;
            loop {
                let counted = async {
                    let client = p.get().await?;
                    Ok::<_, anyhow::Error>(store::waiting_total(&**client, cap).await?)
                }
                .await;
                match counted {
                    Ok(n) => {
                        w.store(n, Ordering::Relaxed);
                        if std::mem::take(&mut failing) {
                            tracing::info!(
                                waiting = n,
                                "counting the shard's waiting jobs works again"
                            );
                        }
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(
                            error = format!("{e:#}"),
                            waiting = w.load(Ordering::Relaxed),
                            "counting the shard's waiting jobs failed; the shard-wide cap uses the \
                             last count until a count succeeds (tried every second)"
                        );
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(ShardQueue {
            shard_id: cfg.shard.id.clone(),
            pool,
            listener,
            notifier,
            registry,
            waiting,
        })
    }

    /// Waiting jobs on the shard as of the last refresh (at most a second old).
    pub fn waiting_estimate(&self) -> i64 {
        self.waiting.load(Ordering::Relaxed)
    }
}
