//! The outbox relay: publishes the shard's `outbox` rows to RabbitMQ exchange
//! `tenantry.events` (topic, durable) with publisher confirms, one message per event with
//! routing key `company.<uuid>`, and marks a row published only after every one of its
//! messages was confirmed — at least once, in order per relay. Several relays may run: rows
//! are locked with SKIP LOCKED, so each is taken by one relay at a time.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use lapin::{
    BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::FieldTable,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::store;

/// Runs until `shutdown`, reconnecting to RabbitMQ with backoff. RabbitMQ being down delays
/// events; it never loses them (they stay in the outbox) and never affects the queue.
pub async fn run(pool: Pool, amqp_url: String, exchange: String, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match relay_connected(&pool, &amqp_url, &exchange, &shutdown).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                retry_in_ms = backoff.as_millis() as u64,
                "event relay interrupted"
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn relay_connected(
    pool: &Pool,
    url: &str,
    exchange: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the events exchange")?;
    tracing::info!(exchange, "event relay connected");
    loop {
        let published = publish_batch(pool, &channel, exchange).await?;
        if published == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// Publishes up to 100 outbox rows; returns how many.
async fn publish_batch(
    pool: &Pool,
    channel: &lapin::Channel,
    exchange: &str,
) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = store::outbox_batch(&tx, 100).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut confirms = Vec::new();
    for (_, events) in &rows {
        for event in events.as_array().map(Vec::as_slice).unwrap_or_default() {
            let key = event
                .get("company_id")
                .and_then(Value::as_str)
                .map(|c| format!("company.{c}"))
                .unwrap_or_else(|| "company.unknown".into());
            let body = serde_json::to_vec(event)?;
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await?;
            confirms.push(confirm);
        }
    }
    for c in confirms {
        match c.await? {
            Confirmation::Nack(_) => anyhow::bail!("RabbitMQ refused an event (nack)"),
            Confirmation::Ack(_) | Confirmation::NotRequested => {}
        }
    }
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    store::outbox_mark_published(&tx, &ids).await?;
    tx.commit().await?;
    Ok(rows.len())
}
