#![doc = include_str!("../README.md")]

pub mod bus;
mod companies;
pub mod forward;
mod health;
mod limit;
mod metrics;
pub mod router;
mod routes;
mod upstream;

use std::{sync::Arc, time::Duration};

use actix_web::web;
use anyhow::Context;
use tenantry_core::{
    Config, db,
    http::{HttpContext, PgProbe, Probe, Readiness, RunningServer, start_server},
};
use tokio_util::sync::CancellationToken;

pub use companies::CREATE_SCOPE;

/// How long the gateway role waits for its background tasks once its server has drained.
const BACKGROUND_STOP: Duration = Duration::from_millis(1500);

/// Scope required by operator endpoints such as `GET /v1/shard-map/version`.
pub const OPERATOR_SCOPE: &str = "shardmap:read";

/// What every request handler of the gateway shares.
pub struct Gateway {
    pub router: Arc<router::Router>,
    limiter: Option<limit::RateLimiter>,
    /// `gateway.max_in_flight_per_company`.
    company_in_flight: Arc<limit::CompanyInFlight>,
    upstream_timeout: Duration,
    freeze_wait: Duration,
    body_limit: usize,
    retry_buffer: usize,
    /// Connection settings for the one-off connections company creation opens to a shard.
    database: tenantry_core::config::DatabaseConfig,
    /// Company creations at once: each holds a catalog connection while it reaches the shard,
    /// so at most half the catalog pool (which has at least two), and routing, the shard-map
    /// relay and the readiness probe always keep the other half.
    creations: Arc<tokio::sync::Semaphore>,
}

/// Ready once the shard table has been read: until then every request would wait its turn to
/// read it again (see `Router::pool_for`). A load that failed at startup is tried again here.
struct ShardTableProbe(Arc<router::Router>);

impl Probe for ShardTableProbe {
    fn name(&self) -> &str {
        "shard table"
    }

    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            if self.0.shards_loaded() {
                return Ok(());
            }
            self.0
                .reload_shards()
                .await
                .map_err(|e| format!("the shard table has not been read yet: {e:#}"))
        })
    }
}

/// Ready once the catalog has every expand step this binary embeds: a gateway of a new version
/// started before `migrate up` ran on the catalog would answer 500 to what needs the new
/// schema (company creation reads `shard_live_tenants`, catalog migration 0005).
struct CatalogSchemaProbe {
    pool: deadpool_postgres::Pool,
    migrations: Vec<tenantry_migrate::Migration>,
}

impl Probe for CatalogSchemaProbe {
    fn name(&self) -> &str {
        "catalog schema"
    }

    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            let command = "tenantry admin migrate up";
            tenantry_migrate::schema_ready(&client, &self.migrations, "catalog", command).await
        })
    }
}

/// Starts the gateway: its listener, the shard-map subscription, the catalog outbox relay and
/// the endpoint health checker. The listener stops accepting when `shutdown` fires and finishes
/// in-flight requests within `shutdown.grace_period`; the background tasks stop with it.
pub fn run(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<RunningServer> {
    let g = &cfg.gateway;
    let catalog = db::pool(
        &cfg.catalog.url,
        cfg.catalog.pool_size,
        &cfg.database,
        "tenantry-gateway",
    )
    .context("configuring the catalog pool")?;
    let router = Arc::new(router::Router::new(
        catalog.clone(),
        g,
        router::heard_for(&cfg.database),
    ));
    let probes: Vec<Box<dyn Probe>> = vec![
        Box::new(PgProbe {
            name: "catalog".into(),
            pool: catalog.clone(),
        }),
        Box::new(CatalogSchemaProbe {
            pool: catalog.clone(),
            migrations: tenantry_migrate::embedded(tenantry_migrate::Target::Catalog),
        }),
        Box::new(ShardTableProbe(router.clone())),
    ];
    let ctx = HttpContext {
        role: "gateway",
        shard_id: None,
        probes: Arc::new(Readiness::new(probes)),
        shutdown: shutdown.clone(),
        body_limit: g.body_limit.as_usize(),
        prefix_routes: &[("/v1/companies/", routes::FORWARDED_ROUTE)],
    };
    let gateway = web::Data::new(Gateway {
        router: router.clone(),
        limiter: limit::RateLimiter::new(g.rate_limit, g.rate_burst, g.cache_capacity),
        company_in_flight: Arc::new(limit::CompanyInFlight::new(g.max_in_flight_per_company)),
        upstream_timeout: g.upstream_timeout,
        freeze_wait: g.freeze_wait,
        body_limit: g.body_limit.as_usize(),
        retry_buffer: g.retry_buffer.as_usize(),
        database: cfg.database.clone(),
        creations: Arc::new(tokio::sync::Semaphore::new(
            (cfg.catalog.pool_size / 2).max(1),
        )),
    });

    // Background tasks: they end when `shutdown` fires, and the role waits for them (see
    // below) once its server has drained.
    let mut background = tokio::task::JoinSet::new();
    let amqp = cfg.rabbitmq.url.expose().to_owned();
    background.spawn(bus::run(
        router.clone(),
        amqp.clone(),
        cfg.rabbitmq.shardmap_exchange.clone(),
        shutdown.clone(),
    ));
    if cfg.rabbitmq.relay_shardmap {
        let wake = Arc::new(tokio::sync::Notify::new());
        background.spawn(tenantry_core::relay::listen(
            cfg.catalog.url.clone(),
            cfg.database.clone(),
            tenantry_shardmap::catalog::OUTBOX_CHANNEL,
            wake.clone(),
            shutdown.clone(),
        ));
        let relay = tenantry_shardmap::catalog::relay(
            catalog.clone(),
            amqp,
            cfg.rabbitmq.shardmap_exchange.clone(),
            wake,
        );
        background.spawn(relay.run(shutdown.clone()));
    }
    let loader = router.clone();
    tokio::spawn(async move {
        if let Err(e) = loader.reload_shards().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "loading the shard table at startup"
            );
        }
    });
    health::spawn(
        router,
        g.health_interval,
        g.connect_timeout,
        shutdown.clone(),
    )
    .context("starting the health checker")?;

    let key = web::Data::new(tenantry_core::auth::JwtKey::from_config(&cfg.auth)?);
    let (connect_timeout, connections) = (g.connect_timeout, g.upstream_connections);
    let RunningServer { addr, task } = start_server(
        ctx,
        g.listen,
        &cfg.http,
        cfg.shutdown.grace_period,
        move |c| {
            c.app_data(key.clone())
                .app_data(gateway.clone())
                .app_data(web::Data::new(upstream::Upstreams::new(
                    connect_timeout,
                    connections,
                )))
                .configure(routes::configure);
        },
    )?;
    tracing::info!(role = "gateway", listen = %addr, "gateway listening");
    // Once the server has drained at shutdown, the role ends when its background tasks have:
    // the shard-map subscription and the catalog relay close their RabbitMQ connections (a
    // second at most each), and a relay batch under way is confirmed (or given up after a
    // second), instead of being cut off when the process exits. They have had the drain's time
    // too, and get `BACKGROUND_STOP` more at most (a catalog read under way, say), then are
    // aborted: within the 2 s `tenantry serve` allows a role past the grace period. A server
    // that ended without a shutdown (its listener failed) returns at once, so the process
    // still goes down.
    let task = tokio::spawn(async move {
        let served = task
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("gateway server task panicked: {e}")));
        if shutdown.is_cancelled() {
            let joined = tokio::time::timeout(BACKGROUND_STOP, async {
                while background.join_next().await.is_some() {}
            })
            .await;
            if joined.is_err() {
                tracing::warn!(
                    tasks = background.len(),
                    "gateway background tasks still busy at shutdown; stopping without them"
                );
                background.abort_all();
            }
        }
        served
    });
    Ok(RunningServer { addr, task })
}
