#![doc = include_str!("../README.md")]

mod fence;
mod jobs;

use std::{future::Future, pin::Pin, sync::Arc};

use actix_web::web;
use deadpool_postgres::Pool;
use tenantry_core::{
    Config,
    auth::JwtKey,
    http::{HttpContext, Probe, Readiness, RunningServer, start_server},
};
use tenantry_queue::ShardQueue;
use tokio_util::sync::CancellationToken;

/// The shard database is ready when it is reachable, migrated, and is the shard this node was
/// configured for: a node pointed at another shard's database must never serve it.
/// "Migrated": every expand step this binary embeds is applied (a rollout starts the new
/// version only after `migrate up`; a node started before it must not take traffic whose
/// statements need a column it lacks). Steps applied by a newer version are fine: they only
/// expand.
struct ShardProbe {
    shard_id: String,
    pool: Pool,
    migrations: Vec<tenantry_migrate::Migration>,
}

impl Probe for ShardProbe {
    fn name(&self) -> &str {
        "shard_database"
    }

    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            let row = client
                .query_opt("SELECT shard_id FROM shard_identity", &[])
                .await
                .map_err(|e| {
                    format!("shard schema missing (run `tenantry admin migrate up`): {e}")
                })?;
            match row.map(|r| r.get::<_, String>(0)) {
                Some(id) if id == self.shard_id => {}
                Some(id) => {
                    return Err(format!(
                        "database belongs to shard {id}, not {}",
                        self.shard_id
                    ));
                }
                None => {
                    return Err(
                        "shard identity not recorded (run `tenantry admin shard apply`)".into(),
                    );
                }
            }
            let command = format!("tenantry admin migrate up --shard {}", self.shard_id);
            tenantry_migrate::schema_ready(&client, &self.migrations, "shard", &command).await
        })
    }
}

/// Starts the shard API listener for `shard.id`, sharing `shard` (pool, LISTEN connection,
/// notifier, registry) with the worker role when both run in this process.
pub fn run(
    cfg: &Config,
    shard: ShardQueue,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningServer> {
    let probes: Vec<Box<dyn Probe>> = vec![Box::new(ShardProbe {
        shard_id: cfg.shard.id.clone(),
        pool: shard.pool.clone(),
        migrations: tenantry_migrate::embedded(tenantry_migrate::Target::Shard),
    })];
    let ctx = HttpContext {
        role: "api",
        shard_id: Some(cfg.shard.id.clone()),
        probes: Arc::new(Readiness::new(probes)),
        shutdown: shutdown.clone(),
        body_limit: cfg.api.body_limit.as_usize(),
        prefix_routes: &[],
    };
    // Three quarters into the grace period, counted from the stop: the rest is for the
    // answers to go out.
    let answer_now = CancellationToken::new();
    tokio::spawn({
        let (shutdown, answer_now) = (shutdown.clone(), answer_now.clone());
        let wait = cfg.shutdown.grace_period * 3 / 4;
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(wait).await;
            answer_now.cancel();
        }
    });
    let state = web::Data::new(jobs::JobsState {
        shard,
        sync_wait: cfg.api.sync_wait,
        queue: cfg.queue.clone(),
        answer_now,
    });
    let key = web::Data::new(JwtKey::from_config(&cfg.auth)?);
    let server = start_server(
        ctx,
        cfg.api.listen,
        &cfg.http,
        cfg.shutdown.grace_period,
        move |c| {
            c.app_data(state.clone())
                .app_data(key.clone())
                .configure(jobs::configure);
        },
    )?;
    tracing::info!(role = "api", shard.id = %cfg.shard.id, listen = %server.addr, "shard API listening");
    Ok(server)
}
