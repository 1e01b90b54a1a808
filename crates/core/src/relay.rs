//! The transactional outbox relay, shared by the shard's job events and the catalog's shard-map
//! changes: rows written to a database's `outbox` table in the same transaction as the change
//! they describe are published to a RabbitMQ exchange with publisher confirms, and marked
//! published only after every message of the row was confirmed — at least once, never lost
//! while RabbitMQ is down (the rows wait). A relay publishes the rows it can see in `id` order,
//! but ids are taken when a row is inserted and transactions commit in their own order, so a
//! row with a lower id can become visible (and be published) after a higher one: consumers
//! must not rely on the order of messages, only on what each says (versions, states, times).
//!
//! Several relays may run against one database. How they share the rows is the `select`
//! statement's choice: `FOR UPDATE SKIP LOCKED` lets them work side by side, `FOR UPDATE` makes a
//! second relay wait for the first and then skip what it published.
//!
//! A batch is at most 100 rows and stops after the row that reaches 5,000 messages, so memory
//! and a failed batch's re-sends stay bounded. A relay stops between two batches when the
//! process shuts down, and gives up on a broker
//! that does not accept its connection or confirm a batch within 30 s (the batch's rows stay
//! unpublished and its transaction ends; the relay reconnects with backoff).

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::Pool;
use lapin::{
    BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::FieldTable,
};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Row};
use tokio_util::sync::CancellationToken;

use crate::{config::DatabaseConfig, db, secret::DatabaseUrl};

/// One message to publish.
pub struct Message {
    pub routing_key: String,
    pub body: Vec<u8>,
}

/// What a relay publishes, from where, to where.
pub struct Relay {
    /// For logs: "event relay", "shard-map relay".
    pub name: &'static str,
    pub pool: Pool,
    pub amqp_url: String,
    pub exchange: String,
    pub kind: ExchangeKind,
    /// Unpublished rows in order: `$1` is the batch size; the first column is the row id.
    pub select: &'static str,
    /// The messages of one row.
    pub messages: fn(&Row) -> anyhow::Result<Vec<Message>>,
    /// Poked when new rows may be waiting (e.g. by a LISTEN connection); `poll` is the fallback.
    pub wake: Arc<Notify>,
    pub poll: Duration,
    /// Deletes old published rows, in a small batch; run about once a minute while idle.
    /// `None` when something else prunes the outbox (the shard's queue janitor does).
    pub prune: Option<&'static str>,
}

/// Declares `exchange` (durable) as `kind`: publishers and consumers both do, so neither needs
/// the other to have started first.
pub async fn declare_exchange(
    channel: &lapin::Channel,
    exchange: &str,
    kind: ExchangeKind,
) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {exchange}"))
}

/// Messages published per batch, at most (plus those of the row that crosses it).
const MAX_BATCH_MESSAGES: usize = 5_000;

/// Longest wait for RabbitMQ to accept a connection or confirm a batch.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

impl Relay {
    /// Runs until `shutdown`, reconnecting to RabbitMQ with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        crate::shutdown::reconnecting(
            self.name,
            &shutdown,
            Duration::from_millis(200),
            Duration::from_secs(10),
            || self.connected(&shutdown),
        )
        .await
    }

    async fn connected(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        // A broker that accepts the connection but never answers must not hold the relay (and
        // its shutdown) forever.
        let conn = tokio::time::timeout(
            BROKER_TIMEOUT,
            Connection::connect(&self.amqp_url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("RabbitMQ did not answer within {BROKER_TIMEOUT:?}"))
        .and_then(|c| c.context("connecting to RabbitMQ"))?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_exchange(&channel, &self.exchange, self.kind.clone()).await?;
        tracing::info!(relay = self.name, exchange = %self.exchange, "relay connected");
        let mut pruned = std::time::Instant::now();
        loop {
            // Register interest before looking, so a poke during the batch is not lost.
            let woken = self.wake.notified();
            let published = self.publish_batch(&channel).await?;
            // A backlog is published batch by batch; a shutdown stops it between two.
            if published > 0 && shutdown.is_cancelled() {
                let _ = conn.close(200, "shutdown".into()).await;
                return Ok(());
            }
            if published == 0 {
                if let Some(sql) = self.prune
                    && pruned.elapsed() > Duration::from_secs(60)
                {
                    pruned = std::time::Instant::now();
                    let deleted = self.pool.get().await?.execute(sql, &[]).await?;
                    tracing::debug!(relay = self.name, deleted, "pruned published outbox rows");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = conn.close(200, "shutdown".into()).await;
                        return Ok(());
                    }
                    _ = woken => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        }
    }

    /// Publishes up to 100 rows, stopping after the row that reaches [`MAX_BATCH_MESSAGES`];
    /// returns how many rows.
    async fn publish_batch(&self, channel: &lapin::Channel) -> anyhow::Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx.query(self.select, &[&100i64]).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut confirms = Vec::new();
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            // Bounded by messages as well as rows: one row of the shard's outbox holds a whole
            // completion batch's events. Rows left out stay unpublished for the next batch.
            if confirms.len() >= MAX_BATCH_MESSAGES {
                break;
            }
            ids.push(row.try_get::<_, i64>(0)?);
            for m in (self.messages)(row)? {
                let confirm = channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        m.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &m.body,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into()),
                    )
                    .await?;
                confirms.push(confirm);
            }
        }
        // A broker that stops confirming (a disk or memory alarm blocks publishers) fails the
        // batch after BROKER_TIMEOUT: its rows stay unpublished, the transaction and its row
        // locks end, and the relay reconnects.
        let confirmed = tokio::time::timeout(BROKER_TIMEOUT, async {
            for c in confirms {
                match c.await? {
                    Confirmation::Nack(_) => anyhow::bail!("RabbitMQ refused a message (nack)"),
                    Confirmation::Ack(_) | Confirmation::NotRequested => {}
                }
            }
            Ok(())
        })
        .await;
        confirmed.map_err(|_| {
            anyhow::anyhow!("RabbitMQ did not confirm the batch within {BROKER_TIMEOUT:?}")
        })??;
        tx.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        tracing::debug!(relay = self.name, rows = ids.len(), "published");
        Ok(ids.len())
    }
}

/// Keeps a `LISTEN channel` connection to `url` and pokes `wake` on every notification (and
/// after every reconnect, since notifications may have been missed), until `shutdown`.
pub async fn listen(
    url: DatabaseUrl,
    db: DatabaseConfig,
    channel: &'static str,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let session = || async {
        let cfg = db::pg_config(&url, &db, "tenantry-listen")?;
        let (client, mut conn) = cfg.connect(tokio_postgres::NoTls).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(16);
        let driver = tokio::spawn(async move {
            loop {
                let msg = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
                let send = match msg {
                    Some(Ok(AsyncMessage::Notification(_))) => Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(e.into()),
                    None => Err(anyhow::anyhow!("connection closed")),
                };
                let failed = send.is_err();
                // A full channel already holds a wake-up; dropping this one loses nothing.
                let _ = tx.try_send(send);
                if failed {
                    break;
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", db::quote_ident(channel)))
            .await?;
        wake.notify_one();
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                msg = rx.recv() => match msg {
                    Some(Ok(())) => wake.notify_one(),
                    Some(Err(e)) => break Err(e),
                    None => break Err(anyhow::anyhow!("connection closed")),
                },
            }
        };
        driver.abort();
        outcome
    };
    crate::shutdown::reconnecting(
        channel,
        &shutdown,
        Duration::from_millis(100),
        Duration::from_secs(5),
        session,
    )
    .await
}
