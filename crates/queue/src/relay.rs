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
        select: "SELECT id, events FROM outbox
                  WHERE published_at IS NULL AND (not_before IS NULL OR not_before <= now())
                    AND id <> ALL($2::int8[])
                  ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        messages,
        // Completions are batched; a 200 ms poll keeps the relay cheap and events prompt.
        wake: Arc::default(),
        poll: Duration::from_millis(200),
        // A row holds a whole completion batch, for many companies: refused events move to a
        // row of their own, so the others are not sent again.
        requeue: Some(REQUEUE_SQL),
        // The queue's janitor prunes the shard outbox with the finished jobs.
        prune: None,
    }
    .run(shutdown)
    .await
}

/// Moves a relay batch's refused events (`$1`) out of their rows (`$2`) to a row of their own:
/// refused once more than the most refused of those rows, and not to be tried again before
/// 1 s after the first refusal, doubling to 60 s (the exponent is capped before it is raised,
/// so a row refused for days cannot overflow it). `clock_timestamp()`, not the transaction's
/// start: the batch may have waited for RabbitMQ's confirms.
pub const REQUEUE_SQL: &str = "
    INSERT INTO outbox (events, tries, not_before)
    SELECT (SELECT jsonb_agg(e::jsonb ORDER BY n) FROM unnest($1::text[]) WITH ORDINALITY r(e, n)),
           o.tries + 1,
           clock_timestamp() + least(60, 2 ^ least(o.tries, 6)) * interval '1 second'
      FROM (SELECT max(tries) AS tries FROM outbox WHERE id = ANY($2::int8[])) o
    RETURNING id, tries";

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
