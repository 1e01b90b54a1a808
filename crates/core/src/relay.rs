//! The transactional outbox relay, shared by the shard's job events and the catalog's shard-map
//! changes: rows written to a database's `outbox` table in the same transaction as the change
//! they describe are published to a RabbitMQ exchange with publisher confirms, and marked
//! published only after every message of the row was confirmed (or, for messages RabbitMQ
//! refused, moved to a row of their own; see below) — at least once, never lost
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
//! and a failed batch's re-sends stay bounded; a select over rows of many messages stops there
//! itself (the shard's does), so the messages of the rows past it do not leave the database. A message RabbitMQ refuses (a nack: typically a
//! queue bound for one company is full and set to `x-overflow: reject-publish`) holds up only
//! itself, not every other company's events. With [`Relay::requeue`] the refused messages of a
//! batch move to new rows, one per refusal count, which record when to try them again (1 s
//! after the first refusal, doubling to 60 s, for every relay of the database), and the rows
//! they came from are marked published, so what RabbitMQ accepted is not sent again; such a
//! row of copies, once published or moved on itself, is deleted ([`Relay::spent`]), as the
//! rows they came from keep every message. Without it the refused row
//! stays unpublished and this relay leaves it out of its batches for the same waits.
//!
//! A relay stops between two batches when the process shuts down, or abandons the batch it is
//! in (whose rows stay unpublished, to be sent again) when the broker holds it up. It gives up
//! on a broker that does not accept its connection, or publish and confirm a batch, within
//! 30 s: the batch's rows stay unpublished, its transaction ends, and the relay reconnects with
//! backoff. While RabbitMQ blocks publishers (`connection.blocked`, sent when a connection
//! publishes during a memory or disk alarm, which can last hours) the relay gives up the batch
//! it is in at once and opens no transaction until the alarm clears: a publish would not
//! return until then, and the transaction around it would hold its row locks and keep vacuum
//! from the database's churned tables.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

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
    /// Unpublished rows in order: `$1` is the batch size, `$2` (`int8[]`) the ids to leave out
    /// for now (refused rows waiting to be tried again); the first column is the row id.
    pub select: &'static str,
    /// The messages of one row.
    pub messages: fn(&Row) -> anyhow::Result<Vec<Message>>,
    /// Poked when new rows may be waiting (e.g. by a LISTEN connection); `poll` is the fallback.
    pub wake: Arc<Notify>,
    pub poll: Duration,
    /// For an outbox whose rows hold many messages: inserts rows holding just a batch's
    /// refused messages (`$1`: their bodies, `text[]`; `$2`: the row each came from, `int8[]`),
    /// one per refusal count of the rows they came from, each not to be selected before its
    /// wait (1 s after the first refusal, doubling to 60 s), and returns for each its id, how
    /// often its messages were refused, and how many it holds. `None`: a refused row itself
    /// waits, left out of this relay's batches (right when a row holds one message).
    pub requeue: Option<&'static str>,
    /// With `requeue`: deletes, of the rows a batch just published (`$1`, `int8[]`), those that
    /// only held copies of refused messages (the rows they came from keep them).
    pub spent: Option<&'static str>,
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
pub const MAX_BATCH_MESSAGES: usize = 5_000;

/// Longest wait for RabbitMQ to accept a connection, or to take and confirm a batch.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// The AMQP heartbeat, in seconds, every connection asks for unless its URL names one
/// (`?heartbeat=N`; the lower of the client's and the broker's wins). A broker that vanished
/// without closing its connections (a failover whose old host is gone, a dropped NAT entry)
/// is noticed once nothing came from it for twice this, 20 s, where RabbitMQ's default of 60 s
/// took two minutes: all that time a gateway served routes from its cache without reading the
/// catalog's map version, and relays held their events.
pub const HEARTBEAT_SECS: u16 = 10;

/// `url` asking for a heartbeat of [`HEARTBEAT_SECS`], unless it names its own.
pub fn with_heartbeat(url: &str) -> String {
    let named = url.split_once('?').is_some_and(|(_, q)| {
        q.split('&')
            .any(|p| p.split('=').next() == Some("heartbeat"))
    });
    if named {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}heartbeat={HEARTBEAT_SECS}")
}

/// Runs `connect` (a connection to RabbitMQ and its setup) bounded by [`BROKER_TIMEOUT`], so a
/// broker that accepts the connection but never answers does not hold its caller (and that
/// caller's reconnects) for good; `None` if `shutdown` fires first, which the caller's role is
/// waiting for it to see.
pub async fn connect_bounded<T>(
    shutdown: &CancellationToken,
    connect: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    tokio::select! {
        connected = tokio::time::timeout(BROKER_TIMEOUT, connect) => connected
            .map_err(|_| anyhow::anyhow!("RabbitMQ did not answer within {BROKER_TIMEOUT:?}"))?
            .map(Some),
        _ = shutdown.cancelled() => Ok(None),
    }
}

/// How long a shutdown lets a batch under way finish before abandoning it.
const BATCH_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// How often a relay looks whether RabbitMQ still blocks publishers.
const BLOCKED_POLL: Duration = Duration::from_millis(200);

/// Closes the connection at shutdown, waiting at most a second: a broker blocking publishers
/// (or gone) may never answer. The relay's run ends well either way.
pub async fn close(conn: Connection) -> anyhow::Result<()> {
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "shutdown".into())).await;
    Ok(())
}

/// Refused rows remembered at most; past it the one whose wait ends first is forgotten.
const MAX_HELD: usize = 10_000;

/// Rows whose messages RabbitMQ refused and that wait where they are (no [`Relay::requeue`]),
/// by id: how often, and not to be tried before when.
#[derive(Default)]
struct Held(Mutex<HashMap<i64, (u32, Instant)>>);

impl Held {
    /// The ids not to select now. Entries whose wait ended long ago are dropped: their row was
    /// published or pruned by another relay, or will start again at 1 s.
    fn waiting(&self) -> Vec<i64> {
        let now = Instant::now();
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, (_, after)| *after + Duration::from_secs(600) > now);
        held.iter()
            .filter(|(_, (_, after))| *after > now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Records a refusal of row `id`; returns how many in a row and the wait before the next try.
    fn refused(&self, id: i64) -> (u32, Duration) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let times = held.get(&id).map_or(0, |(n, _)| *n) + 1;
        let wait = Duration::from_secs(1 << (times - 1).min(6)).min(Duration::from_secs(60));
        if held.len() >= MAX_HELD && !held.contains_key(&id) {
            let first = held
                .iter()
                .min_by_key(|(_, (_, after))| *after)
                .map(|(k, _)| *k);
            if let Some(first) = first {
                held.remove(&first);
            }
        }
        held.insert(id, (times, Instant::now() + wait));
        (times, wait)
    }

    fn published(&self, ids: &[i64]) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !held.is_empty() {
            for id in ids {
                held.remove(id);
            }
        }
    }
}

impl Relay {
    /// Runs until `shutdown`, reconnecting to RabbitMQ with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let held = Held::default();
        crate::shutdown::reconnecting(
            self.name,
            &shutdown,
            Duration::from_millis(200),
            Duration::from_secs(10),
            || self.connected(&shutdown, &held),
        )
        .await
    }

    async fn connected(&self, shutdown: &CancellationToken, held: &Held) -> anyhow::Result<()> {
        let connecting = connect_bounded(shutdown, async {
            let conn = Connection::connect(
                &with_heartbeat(&self.amqp_url),
                ConnectionProperties::default(),
            )
            .await
            .context("connecting to RabbitMQ")?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            declare_exchange(&channel, &self.exchange, self.kind.clone()).await?;
            anyhow::Ok((conn, channel))
        });
        let Some((conn, channel)) = connecting.await? else {
            return Ok(());
        };
        tracing::info!(relay = self.name, exchange = %self.exchange, "relay connected");
        let mut pruned = std::time::Instant::now();
        loop {
            if conn.status().blocked() {
                tracing::warn!(
                    relay = self.name,
                    "RabbitMQ is blocking publishers (a memory or disk alarm); the relay waits \
                     for the alarm to clear"
                );
                while conn.status().blocked() && conn.status().connected() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return close(conn).await,
                        _ = tokio::time::sleep(BLOCKED_POLL) => {}
                    }
                }
                // lapin leaves a closed connection marked blocked: without this, every batch
                // would be given up at once below, and the relay would never reconnect.
                if !conn.status().connected() {
                    anyhow::bail!("the connection closed while RabbitMQ blocked publishers");
                }
                tracing::info!(relay = self.name, "RabbitMQ accepts publishers again");
            }
            // Register interest before looking, so a poke during the batch is not lost.
            let woken = self.wake.notified();
            // Bounded as a whole: a publish does not return while RabbitMQ blocks publishers,
            // and an alarm raised after the check above would otherwise hold this batch's
            // transaction for as long as it lasts; abandoning the batch rolls it back. A
            // shutdown lets a batch under way finish for a moment (it usually takes
            // milliseconds): its rows would otherwise be sent again by the next relay.
            let batch = tokio::time::timeout(BROKER_TIMEOUT, self.publish_batch(&channel, held));
            tokio::pin!(batch);
            // RabbitMQ tells a connection it is blocked only when it publishes during an alarm,
            // that is, in the middle of a batch: the batch is then given up at once (its
            // transaction rolled back) and the relay waits out the alarm above, on the same
            // connection. Its publishes still buffered go out when the alarm clears, and the
            // batch's rows are published again: at least once, as always.
            let blocked = async {
                while !conn.status().blocked() {
                    tokio::time::sleep(BLOCKED_POLL).await;
                }
            };
            if !conn.status().connected() {
                anyhow::bail!("the connection to RabbitMQ closed");
            }
            let batch = tokio::select! {
                batch = &mut batch => batch,
                () = blocked => continue,
                _ = shutdown.cancelled() => {
                    match tokio::time::timeout(BATCH_AT_SHUTDOWN, &mut batch).await {
                        Ok(batch) => batch,
                        Err(_) => return close(conn).await,
                    }
                }
            };
            let published = batch.map_err(|_| {
                anyhow::anyhow!(
                    "a batch did not finish within {BROKER_TIMEOUT:?} (RabbitMQ taking or \
                     confirming it, or the database)"
                )
            })??;
            // A backlog is published batch by batch; a shutdown stops it between two.
            if published > 0 && shutdown.is_cancelled() {
                return close(conn).await;
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
                    _ = shutdown.cancelled() => return close(conn).await,
                    _ = woken => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        }
    }

    /// Publishes up to 100 rows, stopping after the row that reaches [`MAX_BATCH_MESSAGES`];
    /// returns how many rows it marked published.
    async fn publish_batch(&self, channel: &lapin::Channel, held: &Held) -> anyhow::Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx.query(self.select, &[&100i64, &held.waiting()]).await?;
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
            for (n, m) in (self.messages)(row)?.into_iter().enumerate() {
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
                confirms.push((ids.len() - 1, n, confirm));
            }
        }
        // By row: the positions of its messages that RabbitMQ refused. (A broker that stops
        // confirming fails the batch after BROKER_TIMEOUT, see `connected`.)
        let mut refused = vec![Vec::new(); ids.len()];
        for (row, n, c) in confirms {
            if let Confirmation::Nack(_) = c.await? {
                refused[row].push(n);
            }
        }
        let mut published = Vec::with_capacity(ids.len());
        // With `requeue`: the batch's refused messages, and the row each came from.
        let (mut bodies, mut sources) = (Vec::new(), Vec::new());
        for ((id, row), refused) in ids.iter().zip(&rows).zip(refused) {
            if refused.is_empty() {
                published.push(*id);
            } else if self.requeue.is_some() {
                let messages = (self.messages)(row)?;
                for n in refused {
                    bodies.push(String::from_utf8(messages[n].body.clone())?);
                    sources.push(*id);
                }
                published.push(*id);
            } else {
                let (times, wait) = held.refused(*id);
                tracing::warn!(
                    relay = self.name,
                    outbox.id = id,
                    refused = refused.len(),
                    times,
                    retry_in_ms = wait.as_millis() as u64,
                    "RabbitMQ refused messages of this outbox row (nack: a full queue set to \
                     reject-publish?); the row waits and is tried again later"
                );
            }
        }
        if let (Some(requeue), false) = (self.requeue, bodies.is_empty()) {
            // A row per refusal count, not per refused row, so the rows waiting to be tried
            // again grow with the batches that meet a refusal, not with every row that does,
            // and a message refused for the first time waits 1 s, whatever else was refused.
            for row in tx.query(requeue, &[&bodies, &sources]).await? {
                let (waits_in, tries, refused): (i64, i32, i32) =
                    (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                if tries == 1 {
                    tracing::warn!(
                        relay = self.name,
                        refused,
                        waits_in,
                        "RabbitMQ refused messages (nack: a full queue set to reject-publish?); they wait in outbox row `waits_in` and are tried again later"
                    );
                } else {
                    tracing::debug!(
                        relay = self.name,
                        refused,
                        waits_in,
                        tries,
                        "RabbitMQ refused messages again; they wait in outbox row `waits_in`"
                    );
                }
            }
        }
        if let Some(spent) = self.spent {
            tx.execute(spent, &[&published]).await?;
        }
        tx.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1)",
            &[&published],
        )
        .await?;
        tx.commit().await?;
        held.published(&published);
        tracing::debug!(relay = self.name, rows = published.len(), "published");
        Ok(published.len())
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
        let (client, mut conn) = db::connect_raw(&cfg).await?;
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
        db::listen(
            &client,
            &cfg,
            &format!("LISTEN {}", db::quote_ident(channel)),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_ask_for_a_short_heartbeat_unless_their_url_names_one() {
        let plain = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert_eq!(with_heartbeat(plain), format!("{plain}?heartbeat=10"));
        assert_eq!(
            with_heartbeat(&format!("{plain}?frame_max=8192")),
            format!("{plain}?frame_max=8192&heartbeat=10")
        );
        for own in [
            format!("{plain}?heartbeat=0"),
            format!("{plain}?frame_max=8192&heartbeat=30"),
        ] {
            assert_eq!(with_heartbeat(&own), own);
        }
        // Parsed as lapin parses it.
        let uri: lapin::uri::AMQPUri = with_heartbeat(plain).parse().unwrap();
        assert_eq!(uri.query.heartbeat, Some(HEARTBEAT_SECS));
    }

    #[test]
    fn a_refused_row_waits_longer_each_time_up_to_a_minute_and_is_forgotten_once_published() {
        let held = Held::default();
        let waits: Vec<u64> = (0..9).map(|_| held.refused(7).1.as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(held.waiting(), [7]);
        held.published(&[7]);
        assert!(held.waiting().is_empty());
        assert_eq!(held.refused(7).0, 1, "a later refusal starts again at 1 s");
    }

    #[test]
    fn a_full_map_forgets_the_row_whose_wait_ends_first() {
        let held = Held::default();
        for id in 0..MAX_HELD as i64 {
            held.refused(id);
        }
        held.refused(0); // now waits 2 s, the others 1 s
        held.refused(-1);
        let waiting = held.waiting();
        assert_eq!(waiting.len(), MAX_HELD);
        assert!(waiting.contains(&-1) && waiting.contains(&0));
    }
}
