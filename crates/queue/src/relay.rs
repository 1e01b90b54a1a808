//! The event relay: publishes the shard's `outbox` rows to RabbitMQ exchange
//! `tenantry.events` (topic, durable) with publisher confirms, one message per event with
//! routing key `company.<uuid>`, and marks a row published only after every one of its
//! messages was confirmed or, if RabbitMQ refused some, moved to a row of their own that is
//! tried again later (`0006`) — at least once. Several relays may run: rows are locked with SKIP
//! LOCKED, so each is taken by one relay at a time. Events are not ordered (completions commit
//! in their own order and several relays publish side by side): a consumer tells a job's latest
//! state by its `state` and `finished_at`, or by reading the job. The mechanics are
//! [`tenantry_core::relay`]'s.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use lapin::ExchangeKind;
use serde_json::Value;
use tenantry_core::relay::{Message, Relay};
use tokio_util::sync::CancellationToken;

/// Runs until `shutdown`, reconnecting to RabbitMQ with backoff. RabbitMQ being down delays
/// events; it never loses them (they stay in the outbox) and never affects the queue.
pub async fn run(pool: Pool, amqp_url: String, exchange: String, shutdown: CancellationToken) {
    Relay {
        name: "event relay",
        pool,
        amqp_url,
        exchange,
        kind: ExchangeKind::Topic,
        select: SELECT_SQL,
        messages,
        // Completions are batched; a 200 ms poll keeps the relay cheap and events prompt.
        wake: Arc::default(),
        poll: Duration::from_millis(200),
        // A row holds a whole completion batch, for many companies: refused events move to a
        // row of their own, so the others are not sent again.
        requeue: Some(REQUEUE_SQL),
        spent: Some("DELETE FROM outbox WHERE id = ANY($1::int8[]) AND tries > 0"),
        // The queue's janitor prunes the shard outbox with the finished jobs.
        prune: None,
    }
    .run(shutdown)
    .await
}

/// The unpublished rows in id order (`$1` rows at most, none of `$2`), locked (skipping those
/// another relay holds), and of those the events of the rows up to the one that reaches the
/// relay's message cap ([`tenantry_core::relay::MAX_BATCH_MESSAGES`], 5,000): a row holds a
/// whole completion batch (up to `queue.complete_batch` events), and the batch would leave the
/// rest out anyway, so only their counts leave the database. (The database still unpacks each
/// locked row to count its events; a column holding the count would spare that, at the price
/// of a migration.)
pub const SELECT_SQL: &str = "
    WITH candidates AS (
        SELECT id, jsonb_array_length(events) AS n FROM outbox
         WHERE published_at IS NULL AND (not_before IS NULL OR not_before <= now())
           AND id <> ALL($2::int8[])
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
    ), capped AS (
        SELECT id FROM (SELECT id, sum(n) OVER (ORDER BY id) - n AS before FROM candidates) c
         WHERE before < 5000
    )
    SELECT o.id, o.events FROM outbox o JOIN capped USING (id) ORDER BY o.id";

/// Moves a relay batch's refused events (`$1`) out of their rows (`$2`, one per event) to rows
/// of their own, one per refusal count of the rows they came from: each refused once more than
/// its events' rows, and not to be tried again before 1 s after the first refusal, doubling to
/// 60 s (the exponent is capped before it is raised, so a row refused for days cannot overflow
/// it). Events refused for the first time thus wait 1 s even when they share a batch with
/// events refused for days. `clock_timestamp()`, not the transaction's start: the batch may
/// have waited for RabbitMQ's confirms.
pub const REQUEUE_SQL: &str = "
    INSERT INTO outbox (events, tries, not_before)
    SELECT jsonb_agg(r.e::jsonb ORDER BY r.n), o.tries + 1,
           clock_timestamp() + least(60, 2 ^ least(o.tries, 6)) * interval '1 second'
      FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY r(e, src, n)
      JOIN outbox o ON o.id = r.src
     GROUP BY o.tries
    RETURNING id, tries, jsonb_array_length(events)";

/// One message per event of the row, routed by company.
fn messages(row: &tokio_postgres::Row) -> anyhow::Result<Vec<Message>> {
    let events: Value = row.try_get(1)?;
    events
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|event| {
            let routing_key = event
                .get("company_id")
                .and_then(Value::as_str)
                .map(|c| format!("company.{c}"))
                .unwrap_or_else(|| "company.unknown".into());
            Ok(Message {
                routing_key,
                body: serde_json::to_vec(event)?,
            })
        })
        .collect()
}
