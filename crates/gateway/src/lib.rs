#![doc = include_str!("../README.md")]

mod routes;

use std::sync::Arc;

use actix_web::web;
use anyhow::Context;
use tenantry_core::{
    Config, db,
    http::{HttpContext, PgProbe, Probe, RunningServer, start_server},
};
use tokio_util::sync::CancellationToken;

/// Scope required by operator endpoints such as `GET /v1/shard-map/version`.
pub const OPERATOR_SCOPE: &str = "shardmap:read";

/// Starts the gateway listener. It stops accepting when `shutdown` fires and finishes
/// in-flight requests within `shutdown.grace_period`.
pub fn run(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<RunningServer> {
    let catalog = db::pool(
        &cfg.catalog.url,
        cfg.catalog.pool_size,
        &cfg.database,
        "tenantry-gateway",
    )
    .context("configuring the catalog pool")?;
    let probes: Vec<Box<dyn Probe>> = vec![Box::new(PgProbe {
        name: "catalog".into(),
        pool: catalog.clone(),
    })];
    let ctx = HttpContext {
        role: "gateway",
        shard_id: None,
        probes: Arc::new(probes),
        shutdown,
        body_limit: cfg.gateway.body_limit.as_usize(),
    };
    let key = web::Data::new(tenantry_core::auth::JwtKey(cfg.auth.jwt_secret.clone()));
    let catalog = web::Data::new(catalog);
    let server = start_server(
        ctx,
        cfg.gateway.listen,
        &cfg.http,
        cfg.shutdown.grace_period,
        move |c| {
            c.app_data(key.clone())
                .app_data(catalog.clone())
                .configure(routes::configure);
        },
    )?;
    tracing::info!(role = "gateway", listen = %server.addr, "gateway listening");
    Ok(server)
}
