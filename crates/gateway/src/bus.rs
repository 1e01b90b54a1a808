//! The gateway's ear on RabbitMQ: its own exclusive, server-named queue bound to the
//! shard-map fan-out exchange. Messages update the routing cache; every (re)connection drops
//! the cache first, because messages may have been missed while away, and so does a message
//! whose map version skips some (its queue dropped them). While disconnected the gateway keeps
//! serving from the cache, reads the catalog's map version every `gateway.disconnected_ttl`
//! and drops the cache when it changed, and reconnects with backoff.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use tenantry_shardmap::tenants::{TENANT_CHANGED, TenantChanged};
use tokio_util::sync::CancellationToken;

use tenantry_core::relay;

use crate::{metrics, router::Router};

/// Messages kept for a gateway that is not keeping up; older ones are dropped first (the
/// shards' fencing keeps routing correct, and the gap in map versions flushes the cache).
pub(crate) const MAX_QUEUED: i64 = 100_000;

/// Messages RabbitMQ hands the gateway before it has acknowledged them. The rest wait in the
/// broker's queue, bounded by [`MAX_QUEUED`]; without the bound they would all be pushed into
/// the client's memory, which nothing limits.
pub const PREFETCH: u16 = 64;

pub async fn run(router: Arc<Router>, url: String, exchange: String, shutdown: CancellationToken) {
    let connections = AtomicU64::new(0);
    let subscription = tenantry_core::shutdown::reconnecting(
        "shard-map subscription",
        &shutdown,
        Duration::from_millis(100),
        Duration::from_secs(5),
        || async {
            let result = listen(&router, &url, &exchange, &shutdown, &connections).await;
            router.on_disconnected();
            if result.is_err() {
                tracing::warn!(
                    "serving routes from cache, dropped when the catalog's shard map changes"
                );
            }
            result
        },
    );
    tokio::join!(subscription, watch_while_disconnected(&router, &shutdown));
}

/// While the subscription is down: reads the catalog's map version every
/// `gateway.disconnected_ttl`, and when it differs from the one the cache is current with,
/// drops the cache and re-reads the shard table. One small query per interval, however many
/// companies are cached; a catalog that is unreachable too leaves the cache as it is (the
/// shards' fencing still turns a stale route into a 421 and a reload).
async fn watch_while_disconnected(router: &Router, shutdown: &CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(router.disconnected_poll()) => {}
        }
        if router.is_connected() {
            continue;
        }
        match router.catalog_version().await {
            Ok(version) if version != router.known_version() => {
                // 0: not known yet (RabbitMQ unreachable since the start); nothing to report.
                let changed = router.known_version() != 0;
                router.flush();
                // Recorded whether or not the shard table could be read: a failed read is not
                // worth a flush at every poll, and the next change or reconnection reads it.
                router.set_known_version(version);
                if let Err(e) = router.reload_shards().await {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "re-reading the shard table failed; it is read again at the next change"
                    );
                }
                if changed {
                    tracing::info!(
                        map_version = version,
                        "the shard map changed while RabbitMQ is unreachable; cached routes dropped"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(
                error = format!("{e:#}"),
                "the catalog is unreachable too; serving routes from cache"
            ),
        }
    }
}

async fn listen(
    router: &Router,
    url: &str,
    exchange: &str,
    shutdown: &CancellationToken,
    connections: &AtomicU64,
) -> anyhow::Result<()> {
    let connecting = relay::connect_bounded(shutdown, async {
        let conn =
            Connection::connect(&relay::with_heartbeat(url), ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ")?;
        let channel = conn.create_channel().await?;
        let (queue, consumer) = subscribe(&channel, exchange).await?;
        anyhow::Ok((conn, channel, queue, consumer))
    });
    let Some((conn, _channel, queue, mut consumer)) = connecting.await? else {
        return Ok(());
    };
    // Bound first, flushed second: every change from here on arrives as a message, and
    // everything before is re-read from the catalog.
    router.on_connected();
    catch_up(router, shutdown).await;
    if connections.fetch_add(1, Ordering::Relaxed) > 0 {
        metrics::RECONNECTS.inc();
    }
    tracing::info!(exchange, queue = %queue, "subscribed to shard-map changes");
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return relay::close(conn).await,
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(d) => d.context("receiving from RabbitMQ")?,
            None => anyhow::bail!("RabbitMQ closed the subscription"),
        };
        handle(router, &delivery.data, shutdown).await;
        let acked = delivery
            .ack(BasicAckOptions::default())
            .await
            .context("acknowledging a shard-map message")?;
        // `false`: the channel closed or failed underneath; reconnect (and flush the cache).
        anyhow::ensure!(
            acked,
            "the channel closed before a shard-map message was acknowledged"
        );
    }
}

/// Declares the gateway's own queue on `exchange` and consumes it, at most [`PREFETCH`]
/// unacknowledged messages at a time. Returns the queue's (server-chosen) name.
pub async fn subscribe(channel: &Channel, exchange: &str) -> anyhow::Result<(String, Consumer)> {
    relay::declare_exchange(channel, exchange, ExchangeKind::Fanout).await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(MAX_QUEUED));
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await
        .context("declaring the gateway's queue")?;
    let name = queue.name().as_str().to_owned();
    channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .context("limiting unacknowledged shard-map messages")?;
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "gateway".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((name, consumer))
}

/// Re-reads the shard table, trying again with backoff (100 ms, doubling to 5 s) until it
/// succeeds or the gateway stops. A `shard.changed` is acknowledged only once applied: were a
/// failed read just logged, the gateway would go on using the old endpoints until the next
/// change to the shard table, however long that took. Meanwhile the messages behind it wait in
/// the broker.
async fn reload_shards(router: &Router, shutdown: &CancellationToken) {
    until_read(shutdown, "the shard table", || router.reload_shards()).await
}

/// After a flush: records the catalog's map version (the one the cache is now current with, to
/// spot missed messages by) and re-reads the shard table, trying again as [`reload_shards`].
async fn catch_up(router: &Router, shutdown: &CancellationToken) {
    until_read(shutdown, "the shard map", || async {
        let version = router.catalog_version().await?;
        router.reload_shards().await?;
        router.set_known_version(version);
        anyhow::Ok(())
    })
    .await
}

/// Runs `read` until it succeeds or the gateway stops, backing off from 100 ms to 5 s.
async fn until_read<F, Fut>(shutdown: &CancellationToken, what: &'static str, read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tenantry_core::shutdown::retrying(
        shutdown,
        Duration::from_millis(100),
        Duration::from_secs(5),
        read,
        |e, wait| {
            tracing::warn!(
                error = format!("{e:#}"),
                retry_in_ms = wait.as_millis() as u64,
                "re-reading {what} failed; trying again"
            );
        },
    )
    .await
}

async fn handle(router: &Router, body: &[u8], shutdown: &CancellationToken) {
    if let Some(version) = apply(router, body, shutdown).await
        && router.heard_version(version)
    {
        tracing::warn!(
            map_version = version,
            "shard-map messages before this one were missed (the gateway's queue drops its \
             oldest when it falls behind); cached routes dropped"
        );
        router.flush();
        reload_shards(router, shutdown).await;
    }
}

/// Applies one message; returns its map version.
async fn apply(router: &Router, body: &[u8], shutdown: &CancellationToken) -> Option<i64> {
    let Ok(msg) = serde_json::from_slice::<Value>(body) else {
        metrics::MAP_MESSAGES
            .with_label_values(&["malformed"])
            .inc();
        tracing::warn!(
            bytes = body.len(),
            "ignoring a shard-map message that is not JSON"
        );
        return None;
    };
    let version = msg.get("map_version").and_then(Value::as_i64);
    let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        TENANT_CHANGED => match serde_json::from_value::<TenantChanged>(msg.clone()) {
            Ok(change) => {
                metrics::MAP_MESSAGES
                    .with_label_values(&[TENANT_CHANGED])
                    .inc();
                tracing::debug!(company.id = %change.company_id, version = change.placement.version, "placement changed");
                router.apply(change).await;
            }
            Err(e) => {
                metrics::MAP_MESSAGES
                    .with_label_values(&["malformed"])
                    .inc();
                tracing::warn!(error = %e, "ignoring a malformed tenant.changed message");
            }
        },
        "shard.changed" => {
            metrics::MAP_MESSAGES
                .with_label_values(&["shard.changed"])
                .inc();
            reload_shards(router, shutdown).await;
        }
        other => {
            metrics::MAP_MESSAGES.with_label_values(&["unknown"]).inc();
            tracing::debug!(r#type = other, "ignoring an unknown shard-map message");
        }
    }
    version
}
