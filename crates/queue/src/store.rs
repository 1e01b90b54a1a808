//! Every SQL statement of the queue. Each function does one thing in one round trip where it
//! can; the comments on the tricky statements name the race they prevent.

use std::{future::Future, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::{GenericClient, Row, Statement, Transaction, types::ToSql};
use uuid::Uuid;

use crate::job::{ClaimedJob, JobRecord, JobState, JobView, NewJob};

/// Channel that wakes workers: "there may be claimable jobs".
pub const CHANNEL_WAITING: &str = "tenantry_jobs_waiting";
/// Channel that tells waiters "these jobs finished": payload is comma-separated job ids.
pub const CHANNEL_FINISHED: &str = "tenantry_jobs_finished";

/// Fairness quantum: each job a company already has waiting pushes its next job this much
/// further back in claim order (see [`enqueue`]). One second: large against the time a bulk
/// enqueue takes, so a burst of one company cannot get ahead of another's next job, and small
/// against hours, so old jobs still go first.
pub const FAIRNESS_QUANTUM_US: i64 = 1_000_000;
/// [`FAIRNESS_QUANTUM_US`] as SQL text, for statements that are string constants.
macro_rules! fairness_quantum_us {
    () => {
        "1000000"
    };
}

/// SQL for the timestamp `$ts` as microseconds since the epoch: the unit of claim order.
macro_rules! epoch_us {
    ($ts:expr) => {
        concat!("(extract(epoch FROM ", $ts, ") * 1e6)::bigint")
    };
}

/// The virtual time a new job's claim order starts from (µs): the clock, or the claim order of
/// the oldest waiting job when the queue has fallen behind the clock. Without the second, a
/// backlog worked off at less than one job per quantum drifts into the past, and a new job of
/// another company, stamped "now", would queue behind all of that backlog's overdue jobs. One
/// probe of the head of `jobs_claimable`; in a bulk insert it is evaluated once. Spelled as
/// `ORDER BY … LIMIT 1` rather than `min()`, which leaves the planner no other way: for `min()`
/// it also weighs aggregating a walk of a whole index of waiting rows. The enqueue statements
/// have not been seen to take it, but a plain `SELECT` of the same `min()`, planned on an empty
/// queue, did: 57 ms per run once 100,000 jobs were waiting, against 0.4 ms.
macro_rules! virtual_now {
    () => {
        concat!(
            "least(",
            epoch_us!("clock_timestamp()"),
            ",
               (SELECT h.priority FROM jobs h WHERE h.state = 'waiting'
                 ORDER BY h.priority LIMIT 1))"
        )
    };
}

/// The `job.finished` events of the rows of `updated` (id, state, company_id, kind,
/// request_id, finished_at) that finished. Rows going back to `waiting` (a retry) have not
/// finished and get no event. Each event is a row turned into JSON (a quarter cheaper than
/// `jsonb_build_object`, same document). Shared by completion and the rescuer so the event
/// shape cannot drift; macros so that statements can embed them in a `const`.
macro_rules! finished_event_rows {
    () => {
        "SELECT 'job.finished' AS type, company_id, id AS job_id, kind AS job_kind,
                            state, request_id, finished_at
                       FROM updated WHERE state IN ('done', 'error')"
    };
}

/// The CTE that writes one outbox row holding the events of [`finished_event_rows`] as one
/// JSON array, or no row when nothing finished.
macro_rules! finished_events {
    () => {
        concat!(
            "events AS (
                 INSERT INTO outbox (events)
                 SELECT jsonb_agg(e) FROM (",
            finished_event_rows!(),
            ") e
                 HAVING count(*) > 0
             )"
        )
    };
}

/// [`finished_events`] for a statement that updates at most one row: the same array of one
/// event, without an aggregate (whose set-up was a visible share of a one-job completion).
macro_rules! finished_event {
    () => {
        concat!(
            "events AS (
                 INSERT INTO outbox (events)
                 SELECT jsonb_build_array(to_jsonb(e)) FROM (",
            finished_event_rows!(),
            ") e
             )"
        )
    };
}

/// A connection the hot statements (claim, finish) run on. A pooled connection keeps each of
/// them prepared once for its lifetime (deadpool's statement cache), so a claim or a completion
/// costs one round trip and no parsing or planning on the server; a bare
/// `tokio_postgres::Client` (tests, tools) prepares them on every call.
pub trait QueueConn: Send + Sync {
    fn pg(&self) -> &tokio_postgres::Client;
    fn prepared(
        &self,
        sql: &'static str,
    ) -> impl Future<Output = Result<Statement, tokio_postgres::Error>> + Send;
}

/// `impl $tr for $ty`: `$inner()` is the connection or transaction itself, and statements
/// are prepared with its method `$prepare` (`prepare_cached` on pooled connections).
macro_rules! prepares {
    ($tr:ident for $ty:ty, $inner:ident: $inner_ty:ty, $prepare:ident) => {
        impl $tr for $ty {
            fn $inner(&self) -> &$inner_ty {
                self
            }
            fn prepared(
                &self,
                sql: &'static str,
            ) -> impl Future<Output = Result<Statement, tokio_postgres::Error>> + Send {
                self.$prepare(sql)
            }
        }
    };
}
prepares!(QueueConn for tokio_postgres::Client, pg: tokio_postgres::Client, prepare);
prepares!(QueueConn for deadpool_postgres::Object, pg: tokio_postgres::Client, prepare_cached);

/// A transaction to enqueue in (the caller's own). In a pooled connection's transaction
/// (deadpool's) the enqueue statements stay prepared for the connection's lifetime, so each
/// costs one round trip and no parsing or planning; a bare tokio-postgres transaction prepares
/// them on every call.
pub trait QueueTx: Sync {
    fn tx(&self) -> &Transaction<'_>;
    fn prepared(
        &self,
        sql: &'static str,
    ) -> impl Future<Output = Result<Statement, tokio_postgres::Error>> + Send;
}

prepares!(QueueTx for Transaction<'_>, tx: Transaction<'_>, prepare);
prepares!(QueueTx for deadpool_postgres::Transaction<'_>, tx: Transaction<'_>, prepare_cached);

/// Planner settings for every connection the queue's statements run on, set once per
/// connection at its start (`-c` options in the startup packet: no round trip, no
/// transaction around each statement). [`pool`] applies them.
///
/// The plans must not depend on the table's statistics: a queue table's distribution swings by
/// orders of magnitude within seconds (a burst of 100,000 waiting jobs arrives just after an
/// ANALYZE saw none), and a fresh table has no statistics at all. With a wrong estimate the
/// planner sorts every waiting row for each claim, or joins a batch of outcomes to the table in
/// a nested loop that rescans the batch for every row: both quadratic. Without sequential and
/// bitmap scans, hash and merge joins, and sorts it can only walk `jobs_claimable` in claim
/// order and reach rows by primary key, which is right at any size, provided a statement that
/// joins to `jobs` by id gives no other condition that implies a partial index's predicate
/// (the planner would also consider walking that whole index; see [`claim`]). JIT is off
/// because those "disabled" paths carry a huge cost that would otherwise trigger JIT
/// compilation (~0.3 s).
/// The plan is generic and built once per connection (`force_generic_plan`): it no longer
/// depends on the parameters, so re-planning the claim for every execution (a quarter of the
/// server's CPU per job when claiming one at a time) buys nothing. The shard API's statements
/// on the same pool (lookups by key, inserts) have no other sensible plan either.
pub const SESSION_OPTIONS: &str = "-c jit=off -c plan_cache_mode=force_generic_plan \
     -c enable_seqscan=off -c enable_bitmapscan=off -c enable_hashjoin=off \
     -c enable_mergejoin=off -c enable_sort=off";

/// The shard pool: at most `size` connections, each started with [`SESSION_OPTIONS`].
pub fn pool(
    url: &tenantry_core::secret::DatabaseUrl,
    size: usize,
    db: &tenantry_core::config::DatabaseConfig,
    application_name: &str,
) -> anyhow::Result<deadpool_postgres::Pool> {
    tenantry_core::db::pool_with(url, size, db, application_name, SESSION_OPTIONS)
}

/// Whether `conn` carries [`SESSION_OPTIONS`] (checked once by a starting worker, which warns
/// otherwise: its claims would be planned from statistics).
pub async fn has_session_options(
    conn: &tokio_postgres::Client,
) -> Result<bool, tokio_postgres::Error> {
    let mode: String = conn
        .query_one("SELECT current_setting('plan_cache_mode')", &[])
        .await?
        .get(0);
    Ok(mode == "force_generic_plan")
}

/// Runs `sql` in its own implicit transaction: one round trip on a pooled connection.
async fn single_statement(
    conn: &impl QueueConn,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = conn.prepared(sql).await?;
    conn.pg().query(&stmt, params).await
}

/// The outcome of a statement sent after a transaction committed (the finished
/// notification): a failure there must not turn the committed work into an error, which the
/// caller would retry and then find discarded. Waiters that miss it hit their timeout.
fn after_commit(result: Result<(), tokio_postgres::Error>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "the notification after a committed completion failed");
    }
}

/// Limits checked at enqueue time.
#[derive(Debug, Clone, Copy)]
pub struct EnqueueLimits {
    pub max_waiting_per_company: i64,
    /// The caller found the shard's queue full (an estimate it keeps, see
    /// `ShardQueue::waiting_estimate`): a new job is refused with
    /// [`EnqueueError::ShardFull`], while a replayed idempotency key still gets its job.
    pub shard_full: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("company {company_id} already has {waiting} waiting jobs (the limit is {limit})")]
    CompanyFull {
        company_id: Uuid,
        waiting: i64,
        limit: i64,
    },
    #[error("the shard's queue is full")]
    ShardFull,
    #[error("idempotency key reused with a different request")]
    IdempotencyConflict,
    /// [`enqueue_many`] was given a job with an idempotency key, which it cannot honour (a
    /// key's replay or conflict is decided per job): enqueue such jobs with [`enqueue`].
    #[error("bulk enqueue takes no idempotency keys; enqueue keyed jobs one by one")]
    KeyInBulk,
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// What enqueueing did.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// A new row.
    Created(JobRecord),
    /// The idempotency key was seen before with the same kind and params: the original job.
    Replayed(JobRecord),
}

impl Enqueued {
    pub fn record(&self) -> &JobRecord {
        match self {
            Enqueued::Created(r) | Enqueued::Replayed(r) => r,
        }
    }
}

macro_rules! record_columns {
    () => {
        record_columns!("result", "user_context", "params")
    };
    // The same columns with the payloads' expressions given (see `SUMMARY_COLUMNS`).
    ($result:literal, $user_context:literal, $params:literal) => {
        concat!(
            "id, kind, state, ",
            $result,
            ", error, attempts, created_at, started_at, \
             finished_at, request_id, company_id, ",
            $user_context,
            ", ",
            $params,
            ", worker_id, max_attempts, \
             run_at, lease_expires_at, idempotency_key, resolution_note, retried_after"
        )
    };
}
const RECORD_COLUMNS: &str = record_columns!();

/// [`RECORD_COLUMNS`] without the payloads (result NULL, user context and params JSON
/// `null`): what a listing shows, without reading up to `queue.max_result_size` per row.
const SUMMARY_COLUMNS: &str = record_columns!(
    "NULL::jsonb AS result",
    "'null'::jsonb AS user_context",
    "'null'::jsonb AS params"
);

/// One company's job by id: every `GET` and every wake of a waiting request runs it, so it is
/// a constant, prepared once per pooled connection.
const GET_SQL: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM jobs WHERE id = $1 AND company_id = $2"
);

fn record(row: &Row) -> JobRecord {
    let state: String = row.get(2);
    JobRecord {
        view: JobView {
            id: row.get(0),
            kind: row.get(1),
            // The CHECK constraint allows only known states.
            state: JobState::parse(&state).unwrap_or(JobState::Error),
            result: row.get(3),
            error: row.get(4),
            attempts: row.get(5),
            created_at: row.get(6),
            started_at: row.get(7),
            finished_at: row.get(8),
        },
        request_id: row.get(9),
        company_id: row.get(10),
        user_context: row.get(11),
        params: row.get(12),
        worker_id: row.get(13),
        max_attempts: row.get(14),
        run_at: row.get(15),
        lease_expires_at: row.get(16),
        idempotency_key: row.get(17),
        resolution_note: row.get(18),
        retried_after: row.get(19),
    }
}

/// Waiting jobs of a company, counted no further than `limit` (so the check stays cheap for
/// everyone below the limit).
async fn waiting_of(
    tx: &impl QueueTx,
    company: Uuid,
    limit: i64,
) -> Result<i64, tokio_postgres::Error> {
    let stmt = tx.prepared(WAITING_OF_SQL).await?;
    Ok(tx.tx().query_one(&stmt, &[&company, &limit]).await?.get(0))
}

const WAITING_OF_SQL: &str = "SELECT count(*) FROM (SELECT 1 FROM jobs
                               WHERE company_id = $1 AND state = 'waiting' LIMIT $2) t";

/// SQL for the statement's `now()` plus `$ms` milliseconds (a `float8` or `int8` expression).
macro_rules! ms_from_now {
    ($ms:literal) => {
        concat!("now() + ", $ms, " * interval '1 millisecond'")
    };
}

/// A margin on top of a waiting request's wait before its job stops being announced. Both
/// marks are written after the request set its deadline (a POST counts its wait from before
/// the enqueuing transaction, a long poll from before its mark), so they outlast it already;
/// the margin absorbs drift between the API's and the database's clocks. A mark that ends too
/// early costs a waiter its whole wait, one that ends too late only a notification.
const AWAIT_SLACK: Duration = Duration::from_secs(1);

/// `awaited_until`, in milliseconds from the statement's `now()`, for a request that waits up
/// to `wait` (0 when nobody waits: the row is then awaited until its own creation, which every
/// completion is after).
fn awaited_ms(wait: Duration) -> f64 {
    match wait.is_zero() {
        true => 0.0,
        false => (wait + AWAIT_SLACK).as_millis() as f64,
    }
}

/// One job; `$9` is how many the company already has waiting (its fairness offset), `$10` the
/// milliseconds it is awaited for ([`awaited_ms`]).
/// ON CONFLICT DO NOTHING: two requests with the same new key race; the loser inserts nothing
/// and replays the winner's row instead of failing with a unique violation.
const ENQUEUE_SQL: &str = concat!(
    "INSERT INTO jobs (id, request_id, company_id, user_context, kind, params,
                       max_attempts, idempotency_key, awaited_until, priority)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
             ",
    ms_from_now!("$10::float8"),
    ", ",
    virtual_now!(),
    " + $9::bigint * ",
    fairness_quantum_us!(),
    ")
     ON CONFLICT (company_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
     RETURNING ",
    record_columns!()
);

const BY_IDEMPOTENCY_KEY_SQL: &str = concat!(
    "SELECT ",
    record_columns!(),
    ", params = $3::jsonb FROM jobs WHERE company_id = $1 AND idempotency_key = $2"
);

/// Inserts one job inside the caller's transaction, so the job exists exactly when the caller's
/// write commits. After the commit, call [`crate::Notifier::poke`] to wake workers.
///
/// Fairness: the claim order (`priority`) is the queue's virtual time pushed back by one
/// quantum per job the company already has waiting — a start-time fair queue. The virtual time
/// is "now", or the claim order of the oldest waiting job if that is earlier (the queue is
/// behind), so a new job never queues behind another company's overdue backlog. A company with
/// 10,000 waiting jobs puts its next one 10,000 s of virtual time back, so another company's
/// single job is claimed next, not after the 10,000.
pub async fn enqueue(
    tx: &impl QueueTx,
    job: &NewJob,
    limits: EnqueueLimits,
) -> Result<Enqueued, EnqueueError> {
    if let Some(key) = &job.idempotency_key
        && let Some(existing) = by_idempotency_key(tx, job, key).await?
    {
        return replay(existing, job);
    }
    if limits.shard_full {
        return Err(EnqueueError::ShardFull);
    }
    let waiting = waiting_of(tx, job.company_id, limits.max_waiting_per_company).await?;
    if waiting >= limits.max_waiting_per_company {
        return Err(EnqueueError::CompanyFull {
            company_id: job.company_id,
            waiting,
            limit: limits.max_waiting_per_company,
        });
    }
    let id = Uuid::now_v7();
    let insert = tx.prepared(ENQUEUE_SQL).await?;
    let row = tx
        .tx()
        .query_opt(
            &insert,
            &[
                &id,
                &job.request_id,
                &job.company_id,
                &job.user_context,
                &job.kind,
                &job.params,
                &job.max_attempts,
                &job.idempotency_key,
                &waiting,
                &awaited_ms(job.awaited_for),
            ],
        )
        .await?;
    match row {
        Some(row) => Ok(Enqueued::Created(record(&row))),
        None => {
            let key = job.idempotency_key.as_deref().unwrap_or_default();
            match by_idempotency_key(tx, job, key).await? {
                Some(existing) => replay(existing, job),
                None => Err(EnqueueError::IdempotencyConflict),
            }
        }
    }
}

/// The job already under this request's key: its own when kind and params are the same.
fn replay(
    (existing, same_params): (JobRecord, bool),
    job: &NewJob,
) -> Result<Enqueued, EnqueueError> {
    if existing.view.kind == job.kind && same_params {
        Ok(Enqueued::Replayed(existing))
    } else {
        Err(EnqueueError::IdempotencyConflict)
    }
}

/// The company's job under `key`, and whether its params equal `job`'s. The database compares
/// them as `jsonb`, by value: the row's params come back from it normalized (`1e2` reads back
/// as `100`), so comparing them with the request's in Rust would refuse an identical repeat.
async fn by_idempotency_key(
    tx: &impl QueueTx,
    job: &NewJob,
    key: &str,
) -> Result<Option<(JobRecord, bool)>, tokio_postgres::Error> {
    let stmt = tx.prepared(BY_IDEMPOTENCY_KEY_SQL).await?;
    Ok(tx
        .tx()
        .query_opt(&stmt, &[&job.company_id, &key, &job.params])
        .await?
        .map(|r| keyed(&r)))
}

fn keyed(row: &Row) -> (JobRecord, bool) {
    (record(row), row.get::<_, Option<bool>>(20).unwrap_or(false))
}

/// The company's job under `key`, and whether its params equal `params` (compared as a replay
/// in [`enqueue`] compares them; `None`: not compared, `false`): for a repeat that this node
/// would now refuse before enqueuing (a rollout dropped the kind, or lowered a limit) but that
/// an earlier version accepted.
pub async fn by_key(
    client: &impl GenericClient,
    company: Uuid,
    key: &str,
    params: Option<&Value>,
) -> Result<Option<(JobRecord, bool)>, tokio_postgres::Error> {
    Ok(client
        .query_opt(BY_IDEMPOTENCY_KEY_SQL, &[&company, &key, &params])
        .await?
        .map(|r| keyed(&r)))
}

/// Many jobs from typed arrays; `"offset"` is each job's fairness offset (see [`enqueue`]).
const ENQUEUE_MANY_SQL: &str = concat!(
    "INSERT INTO jobs (id, request_id, company_id, user_context, kind, params, max_attempts,
                       awaited_until, priority)
     SELECT x.id, x.request_id, x.company_id, x.user_context, x.kind, x.params, x.max_attempts,
            ",
    ms_from_now!("x.awaited_ms"),
    ", ",
    virtual_now!(),
    " + x.\"offset\" * ",
    fairness_quantum_us!(),
    "
       FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::jsonb[], $5::text[], $6::jsonb[],
                   $7::int4[], $8::int8[], $9::float8[])
         AS x(id, request_id, company_id, user_context, kind, params, max_attempts, \"offset\",
              awaited_ms)"
);

/// Inserts many jobs in one statement inside the caller's transaction. The whole batch is
/// refused if any company would go over its waiting limit, so nothing half-written remains,
/// and if any job carries an idempotency key ([`EnqueueError::KeyInBulk`]): a key would be
/// silently dropped otherwise. The shard's cap is the caller's `limits.shard_full`, as for
/// [`enqueue`]: a batch begun below the cap is taken whole and may leave the shard above it by
/// up to its own size, so a caller bounds its batches. Returns the new ids in input order.
pub async fn enqueue_many(
    tx: &impl QueueTx,
    jobs: &[NewJob],
    limits: EnqueueLimits,
) -> Result<Vec<Uuid>, EnqueueError> {
    if jobs.iter().any(|j| j.idempotency_key.is_some()) {
        return Err(EnqueueError::KeyInBulk);
    }
    if limits.shard_full && !jobs.is_empty() {
        return Err(EnqueueError::ShardFull);
    }
    let mut per_company: std::collections::HashMap<Uuid, (i64, i64)> = Default::default();
    for j in jobs {
        per_company.entry(j.company_id).or_default().1 += 1;
    }
    for (company, (waiting, adding)) in per_company.iter_mut() {
        *waiting = waiting_of(tx, *company, limits.max_waiting_per_company).await?;
        if *waiting + *adding > limits.max_waiting_per_company {
            return Err(EnqueueError::CompanyFull {
                company_id: *company,
                waiting: *waiting,
                limit: limits.max_waiting_per_company,
            });
        }
    }
    let mut seen: std::collections::HashMap<Uuid, i64> = Default::default();
    let n = jobs.len();
    let mut ids = Vec::with_capacity(n);
    let (mut request_ids, mut companies, mut contexts, mut kinds) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut params, mut max_attempts, mut offsets, mut awaited) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for j in jobs {
        ids.push(Uuid::now_v7());
        let nth = seen.entry(j.company_id).or_default();
        offsets.push(per_company.get(&j.company_id).map_or(0, |c| c.0) + *nth);
        *nth += 1;
        request_ids.push(j.request_id.as_str());
        companies.push(j.company_id);
        contexts.push(&j.user_context);
        kinds.push(j.kind.as_str());
        params.push(&j.params);
        max_attempts.push(j.max_attempts);
        awaited.push(awaited_ms(j.awaited_for));
    }
    // Typed arrays, sent in binary: no JSON document to build here and parse there.
    let insert = tx.prepared(ENQUEUE_MANY_SQL).await?;
    tx.tx()
        .execute(
            &insert,
            &[
                &ids,
                &request_ids,
                &companies,
                &contexts,
                &kinds,
                &params,
                &max_attempts,
                &offsets,
                &awaited,
            ],
        )
        .await?;
    Ok(ids)
}

/// No per-company cap: the cap given as `i64::MAX`. The claim statements then skip counting
/// processing rows, which would only ever compare below it.
pub const UNCAPPED: i64 = i64::MAX;
/// [`UNCAPPED`] as SQL text, for statements that are string constants.
macro_rules! uncapped {
    () => {
        "9223372036854775807"
    };
}

/// A CTE that makes its statement commit asynchronously (the claims, and the awaited mark of
/// [`await_job`]), for its own transaction only: `set_config(…, true)` lasts until the
/// (implicit) transaction ends, and its commit reads it. Joined into the UPDATE, so it runs
/// whenever a row is written.
macro_rules! async_commit {
    () => {
        "async_commit AS (SELECT set_config('synchronous_commit', 'off', true) AS off)"
    };
}

/// What both claim statements return, in this order (see [`claim`]).
macro_rules! claimed_columns {
    () => {
        "RETURNING j.id, j.request_id, j.company_id, j.user_context, j.kind, j.params,
            j.attempts, j.max_attempts, j.created_at, j.priority,
            greatest(j.created_at, j.run_at), j.retried_after"
    };
}

/// The lease a claim takes (`$2` worker, `$4` lease in ms).
macro_rules! take_lease {
    () => {
        concat!(
            "UPDATE jobs j
        SET state = 'processing', worker_id = $2::text, attempts = j.attempts + 1,
            started_at = now(), lease_expires_at = ",
            ms_from_now!("$4::float8"),
            ", updated_at = now()"
        )
    };
}

/// How many waiting rows past the batch's own size a capped claim looks at, in claim order
/// (due or not, whatever their company), before it gives up for this time (see
/// [`claim_batch`]).
pub const CLAIM_WINDOW: i64 = 1000;

/// A capped claim (see [`claim`]): of the waiting rows from claim order `$5` on, it looks at
/// the first `$6` (the window) and takes up to `$1` of them that are due and whose company is
/// below its cap, locking them one by one in claim order.
///
/// Walking the claimable rows until `$1` pass the cap, as this statement did before the window,
/// costs a walk of every waiting row when none passes: a company at its cap with a backlog of
/// 10,000 jobs made every claim of a worker with free slots walk those 10,000 rows (6 ms), and
/// each of that company's finished jobs sets off such a claim. The window bounds that work; the
/// rows beyond it are reached by later claims from a cursor (`next_after`, see [`Claim`]), which
/// starts at the claim order of the window's last row: several rows may share one (a bulk
/// enqueue gives each company's first job the same), so that one is looked at again.
///
/// The window is read without locks, and only the rows chosen from it are locked (a lock per
/// row looked at would write to each of those rows): each is locked by primary key, skipping
/// rows another claimer holds, and kept only if its newest version is still `waiting` and due
/// (a claimer that committed after this statement's snapshot was taken may have run it, and
/// a retry may have put it back with a later `run_at`). The state is checked outside the
/// locking subquery, whose `OFFSET 0` keeps the planner from moving the check into it: that
/// check would imply the predicate of the partial indexes over waiting rows, and on a table
/// without statistics the planner then walks one of those whole indexes for each row instead
/// of looking the row up by primary key.
///
/// It serves one-job claims too. A one-job variant that checked each candidate's company on
/// the spot (a probe of `jobs_processing` per row, as the one-job claim did before the window)
/// took 4 ms against this statement's 0.7 ms when the window held 1,001 rows of a company at its
/// cap, for 10-20 % fewer claims per second (pgbench, 4 clients) when the head was claimable.
///
/// The per-company cap counts rows already processing plus the rows this claim takes
/// (`row_number` per company), so one batch cannot push a company over its cap. Returns one row
/// even when it claims nothing (the job's columns then NULL), for the count of candidates and
/// the cursor: when the claim comes up short, the claim order of the window's last row, if the
/// window was full (more rows lie beyond it).
const CLAIM_SQL: &str = concat!(
    "WITH running AS MATERIALIZED (
         SELECT company_id, count(*) AS n FROM jobs
          WHERE state = 'processing'
          GROUP BY company_id
     ), candidates AS MATERIALIZED (
         SELECT s.id, s.company_id, s.priority, s.n
           FROM (SELECT w.id, w.company_id, w.priority, r.n
                   FROM (SELECT v.id, v.company_id, v.priority, v.run_at FROM jobs v
                          WHERE v.state = 'waiting' AND v.priority >= $5::int8
                          ORDER BY v.priority
                          LIMIT $6::int8) w,
                        LATERAL (SELECT coalesce((SELECT x.n FROM running x
                                                   WHERE x.company_id = w.company_id), 0) AS n) r
                  WHERE w.run_at <= now() AND r.n < $3::int8) s,
                LATERAL (SELECT k.state, k.run_at FROM jobs k
                          WHERE k.id = s.id
                          FOR UPDATE OF k SKIP LOCKED OFFSET 0) l
          WHERE l.state = 'waiting' AND l.run_at <= now()
          ORDER BY s.priority
          LIMIT $1::int8
     ), chosen AS (
         SELECT c.id FROM (
             SELECT c.id,
                    row_number() OVER (PARTITION BY c.company_id ORDER BY c.priority) + c.n AS slot
               FROM candidates c
         ) c WHERE c.slot <= $3::int8
     ), counted AS (
         SELECT count(*) AS n FROM candidates
     ), ",
    async_commit!(),
    ", claimed AS (
     ",
    take_lease!(),
    "
       FROM chosen, async_commit
      WHERE j.id = chosen.id
  ",
    claimed_columns!(),
    "
     ), next AS (
         SELECT CASE WHEN (SELECT count(*) FROM claimed) < $1::int8 THEN
                     (SELECT t.priority FROM jobs t
                       WHERE t.state = 'waiting' AND t.priority >= $5::int8
                       ORDER BY t.priority
                      OFFSET $6::int8 - 1 LIMIT 1) END AS after
     )
     SELECT claimed.*, counted.n, next.after FROM next CROSS JOIN counted LEFT JOIN claimed ON true"
);

/// A claim without a per-company cap, of any size: the claimable rows in claim order, with
/// no per-company count to take and no batch to number per company. (`$3` is still named, so
/// both claim statements take their first four parameters alike.)
const CLAIM_UNCAPPED_SQL: &str = concat!(
    "WITH candidate AS (
         SELECT j.id FROM jobs j
          WHERE j.state = 'waiting' AND j.run_at <= now() AND $3::int8 = ",
    uncapped!(),
    "
          ORDER BY j.priority
          LIMIT $1::int8
          FOR UPDATE OF j SKIP LOCKED
     ), ",
    async_commit!(),
    "
     ",
    take_lease!(),
    "
       FROM candidate, async_commit
      WHERE j.id = candidate.id
  ",
    claimed_columns!()
);

/// Claims up to `limit` jobs for `worker_id`: marks them `processing`, counts the attempt and
/// takes a lease of `lease`.
///
/// Races prevented: `FOR UPDATE SKIP LOCKED` makes concurrent claimers skip rows another
/// claimer is taking instead of waiting for it or taking the same row twice; the lock is taken
/// on the row's newest version, which must still be `waiting` (and due) — the uncapped claim
/// re-checks its conditions there before locking, the capped one right after (a row another
/// worker has claimed since may be locked for the rest of this statement, which only delays
/// that worker's heartbeat or completion) — and held until the UPDATE (same statement) has
/// written it, so nothing can change the row in between. The
/// UPDATE therefore does not repeat `state = 'waiting'`: that condition would let the planner
/// reach the locked rows by walking a whole partial index of waiting rows instead of by primary
/// key, and it does so when it builds the connection's plan on a nearly empty queue: such a
/// claim took 165 ms once 100,000 jobs were waiting, against 1 ms by primary key.
///
/// With a per-company cap, a claim looks at a window of [`CLAIM_WINDOW`] rows past `limit` in
/// claim order, so a company at its cap with a large backlog costs each claim a bounded walk
/// (see [`CLAIM_SQL`]); this function claims from the head of the queue, [`claim_batch`] from
/// anywhere.
///
/// The claim commits asynchronously (`synchronous_commit = off`): a claim lost in a database
/// crash only means the job runs again, which at-least-once delivery allows anyway, and it
/// saves a disk flush on the path from enqueue to start.
///
/// One statement in its own implicit transaction, prepared once per pooled connection: one
/// round trip and one protocol exchange. Its plan relies on the connection's
/// [`SESSION_OPTIONS`]. `max_processing_per_company` of [`UNCAPPED`] means no cap. Call it
/// outside a transaction block: inside one, its asynchronous commit would become that
/// transaction's.
pub async fn claim(
    client: &mut impl QueueConn,
    worker_id: &str,
    limit: i64,
    lease: Duration,
    max_processing_per_company: i64,
) -> Result<Vec<ClaimedJob>, tokio_postgres::Error> {
    claim_batch(
        client,
        worker_id,
        limit,
        lease,
        max_processing_per_company,
        None,
    )
    .await
    .map(|claim| claim.jobs)
}

/// What [`claim_batch`] did.
#[derive(Debug, Default)]
pub struct Claim {
    /// The claimed jobs, in claim order.
    pub jobs: Vec<ClaimedJob>,
    /// The per-company cap held back some of the batch's candidates: a capped batch is taken
    /// from the first `limit` claimable rows that pass the cap as it stood, and then cut where
    /// the batch itself fills a company's cap, so more may be claimable (the worker then claims
    /// again at once rather than waiting for a wake-up).
    pub cut_by_cap: bool,
    /// The claim came up short and its window was full: claimable rows may lie beyond it, from
    /// this claim order on (pass it as `from` to look there). Also set when the cap cut the
    /// batch short ([`Claim::cut_by_cap`]): rows of the window may then be left unexamined.
    pub next_after: Option<i64>,
}

/// [`claim`] of the rows from claim order `from` on (`None`: from the head of the queue),
/// saying what else may be claimable (see [`Claim`]). Without a per-company cap there is no
/// window: every claimable row can be taken, so a claim short of `limit` means none is left.
pub async fn claim_batch(
    client: &mut impl QueueConn,
    worker_id: &str,
    limit: i64,
    lease: Duration,
    max_processing_per_company: i64,
    from: Option<i64>,
) -> Result<Claim, tokio_postgres::Error> {
    let lease_ms = lease.as_millis() as f64;
    let params: [&(dyn ToSql + Sync); 4] =
        [&limit, &worker_id, &max_processing_per_company, &lease_ms];
    let mut claim = Claim::default();
    let rows = if max_processing_per_company == UNCAPPED {
        single_statement(client, CLAIM_UNCAPPED_SQL, &params).await?
    } else {
        let from = from.unwrap_or(i64::MIN);
        let window = limit.saturating_add(CLAIM_WINDOW);
        let rows = single_statement(
            client,
            CLAIM_SQL,
            &[params[0], params[1], params[2], params[3], &from, &window],
        )
        .await?;
        // One row even when nothing was claimed, its job columns NULL.
        if let Some(first) = rows.first() {
            claim.next_after = first.get(13);
            let candidates: i64 = first.get(12);
            let claimed: Vec<Row> = rows
                .into_iter()
                .filter(|r| r.get::<_, Option<Uuid>>(0).is_some())
                .collect();
            claim.cut_by_cap = candidates > claimed.len() as i64;
            claimed
        } else {
            rows
        }
    };
    let mut jobs: Vec<(i64, ClaimedJob)> = rows
        .iter()
        .map(|r| {
            (
                r.get(9),
                ClaimedJob {
                    id: r.get(0),
                    request_id: r.get(1),
                    company_id: r.get(2),
                    user_context: r.get(3),
                    kind: r.get(4),
                    params: r.get(5),
                    attempt: r.get(6),
                    max_attempts: r.get(7),
                    retried_after: r.get(11),
                    created_at: r.get(8),
                    ready_at: r.get(10),
                },
            )
        })
        .collect();
    jobs.sort_by_key(|(p, _)| *p);
    claim.jobs = jobs.into_iter().map(|(_, j)| j).collect();
    Ok(claim)
}

/// One finished attempt, for [`finish`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: Uuid,
    pub attempt: i32,
    /// The request that enqueued the job: the log lines about this outcome carry it (a late
    /// completion's warning is written after the job's own span has ended).
    pub request_id: String,
    pub result: Result<Value, crate::job::JobError>,
    /// For a retryable failure with attempts left: when to try again.
    pub retry_in: Duration,
}

/// What [`finish`] (or the rescuer) did to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub id: Uuid,
    /// Its state now: `done`, `error`, or `waiting` again for a retry.
    pub state: JobState,
    /// Whether a request may be waiting for it (see [`await_job`]): only then is a finished
    /// job announced.
    pub awaited: bool,
}

impl Finished {
    /// Whether waiting requests should hear of it: it reached `done` or `error` while one may
    /// be waiting.
    pub fn announced(&self) -> bool {
        self.awaited && self.state.is_finished()
    }
}

/// The ids of the jobs among `finished` to announce ([`Finished::announced`]).
pub fn announced_ids(finished: &[Finished]) -> Vec<Uuid> {
    finished
        .iter()
        .filter(|f| f.announced())
        .map(|f| f.id)
        .collect()
}

/// Writes many outcomes in one transaction: `done` with the result, `waiting` again (a retry
/// after `retry_in`) or `error`. Only rows still leased by `worker_id` at `attempt` change —
/// a worker whose lease expired and whose job was rescued (and maybe re-claimed) cannot
/// complete it a second time; its outcome is returned in `discarded`. Finished jobs get a
/// `job.finished` event in the outbox, committed with the state change, and those a request
/// may be waiting for ([`Finished::announced`]) a notification on [`CHANNEL_FINISHED`] right
/// after the commit.
pub async fn finish(
    client: &mut impl QueueConn,
    worker_id: &str,
    outcomes: &[Outcome],
) -> Result<(Vec<Finished>, Vec<Uuid>), tokio_postgres::Error> {
    let (finished, discarded) = finish_unannounced(client, worker_id, outcomes).await?;
    after_commit(announce_finished(client, &announced_ids(&finished)).await);
    Ok((finished, discarded))
}

/// One outcome's columns as the completion statements take them: `ok`, `result`, `error`,
/// `permanent`, `retry_ms`.
fn outcome_columns(o: &Outcome) -> (bool, Option<&Value>, Option<&str>, bool, i64) {
    let retry_ms = o.retry_in.as_millis() as i64;
    match &o.result {
        Ok(v) => (true, Some(v), None, false, retry_ms),
        Err(e) => (false, None, Some(e.message.as_str()), e.permanent, retry_ms),
    }
}

/// [`finish`] without the notification: the caller sends it for the [`Finished::announced`]
/// jobs with [`announce_finished`] (the worker sends those of concurrent completions together,
/// see `worker::Announcer`).
///
/// Waiters are told after the commit, not inside it: PostgreSQL holds its notification lock
/// through the commit of a notifying transaction, which would serialize every completion's
/// disk flush. A waiter whose job went back to `waiting` (a retry) just keeps waiting, and a
/// notification lost in a crash costs a waiter its timeout, never a result.
pub async fn finish_unannounced(
    client: &mut impl QueueConn,
    worker_id: &str,
    outcomes: &[Outcome],
) -> Result<(Vec<Finished>, Vec<Uuid>), tokio_postgres::Error> {
    let ids: Vec<Uuid> = outcomes.iter().map(|o| o.id).collect();
    // One statement in its own implicit transaction: the outcomes and their events commit
    // together.
    let rows = if let [one] = outcomes {
        // A single outcome (one-at-a-time workers) is an update by primary key, without the
        // batch statement's arrays and join.
        let (ok, result, error, permanent, retry_ms) = outcome_columns(one);
        single_statement(
            client,
            FINISH_ONE_SQL,
            &[
                &one.id,
                &one.attempt,
                &ok,
                &result,
                &error,
                &permanent,
                &retry_ms,
                &worker_id,
            ],
        )
        .await?
    } else {
        let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempt).collect();
        let n = outcomes.len();
        let (mut ok, mut results, mut errors, mut permanent, mut retry_ms) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (o, r, e, p, ms) in outcomes.iter().map(outcome_columns) {
            ok.push(o);
            results.push(r);
            errors.push(e);
            permanent.push(p);
            retry_ms.push(ms);
        }
        single_statement(
            client,
            FINISH_SQL,
            &[
                &ids, &attempts, &ok, &results, &errors, &permanent, &retry_ms, &worker_id,
            ],
        )
        .await?
    };
    let finished: Vec<Finished> = rows.iter().map(finished).collect();
    // Usually every outcome applied (the statement returns one row per applied outcome), and
    // there is nothing to look up.
    let discarded = if finished.len() == ids.len() {
        Vec::new()
    } else {
        let applied: std::collections::HashSet<Uuid> = finished.iter().map(|f| f.id).collect();
        ids.into_iter().filter(|id| !applied.contains(id)).collect()
    };
    Ok((finished, discarded))
}

/// The span a line about one job is written in, also by the rescuer or a stopping worker:
/// `request.id`, `company.id` (when known) and `job.id` sit under `span`, where the lines of the
/// request that enqueued the job, and of the job's own runs, have them.
pub fn job_span(request_id: &str, company_id: Option<Uuid>, job_id: Uuid) -> tracing::Span {
    let span = tracing::info_span!(
        "job",
        request.id = %request_id,
        company.id = tracing::field::Empty,
        job.id = %job_id,
    );
    if let Some(company) = company_id {
        span.record("company.id", tracing::field::display(company));
    }
    span
}

/// A job the rescuer or a stopping worker gave back, for the line it logs about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    pub id: Uuid,
    pub request_id: String,
    pub company_id: Uuid,
}

impl JobRef {
    fn from_row(row: &Row) -> JobRef {
        JobRef {
            id: row.get("id"),
            request_id: row.get("request_id"),
            company_id: row.get("company_id"),
        }
    }

    /// See [`job_span`].
    pub fn span(&self) -> tracing::Span {
        job_span(&self.request_id, Some(self.company_id), self.id)
    }
}

/// Jobs one rescue pass, release or lost-claim repair logs a line each for; beyond them one
/// line counts the rest (a pass after an outage may take back every job of the shard).
pub const LOGGED_EACH: usize = 100;

/// The SQL of the error the rescuer records on a job it takes from worker `$worker` (an SQL
/// expression).
macro_rules! rescue_error {
    ($worker:literal) => {
        concat!(
            "'lease expired: worker ' || ",
            $worker,
            " || ' stopped renewing it'"
        )
    };
}

/// Of the outcomes a retried [`finish_unannounced`] returned as discarded, those the try before
/// it wrote after all: that try's COMMIT went through, but its answer was lost with the
/// connection. Such a row still carries the outcome's attempt, is no longer `processing`, and
/// does not hold the error the rescuer writes when it takes a job from `worker_id`; the rest
/// were rescued meanwhile and are late completions. (A job written by the earlier try as a
/// retry that another worker has since claimed again is counted among the late ones.)
pub async fn written_earlier(
    client: &impl GenericClient,
    worker_id: &str,
    discarded: &[&Outcome],
) -> Result<Vec<Finished>, tokio_postgres::Error> {
    let ids: Vec<Uuid> = discarded.iter().map(|o| o.id).collect();
    let attempts: Vec<i32> = discarded.iter().map(|o| o.attempt).collect();
    let rows = client
        .query(WRITTEN_EARLIER_SQL, &[&ids, &attempts, &worker_id])
        .await?;
    Ok(rows.iter().map(finished).collect())
}

const WRITTEN_EARLIER_SQL: &str = concat!(
    "SELECT j.id, j.state, j.awaited_until > now() AS awaited
       FROM unnest($1::uuid[], $2::int4[]) AS x(id, attempt)
       JOIN jobs j ON j.id = x.id
      WHERE j.attempts = x.attempt AND j.state <> 'processing'
        AND j.error IS DISTINCT FROM ",
    rescue_error!("$3::text")
);

/// What the statements that finish jobs return of each row they changed (`updated`, the CTE
/// the events are written from), and select of it in the end: id, state and whether a request
/// may be waiting for it (its mark lies ahead of the completion's clock).
macro_rules! updated_columns {
    () => {
        "RETURNING j.id, j.state, j.company_id, j.kind, j.request_id, j.finished_at,
                 j.awaited_until > now() AS awaited"
    };
}
macro_rules! finished_columns {
    () => {
        "SELECT id, state, awaited FROM updated"
    };
}

/// A row of `finished_columns!`.
fn finished(row: &Row) -> Finished {
    Finished {
        id: row.get(0),
        state: JobState::parse(row.get::<_, &str>(1)).unwrap_or(JobState::Error),
        awaited: row.get(2),
    }
}

/// The `UPDATE … SET` that records one outcome, given the SQL of its parts (`ok`, `result`,
/// `error`, `permanent`, `retry_ms`): written once for the batch and the one-outcome
/// statements, so the two cannot drift apart.
macro_rules! record_outcome {
    ($ok:literal, $result:literal, $error:literal, $permanent:literal, $retry_ms:literal) => {
        concat!(
            "UPDATE jobs j SET
             state = CASE WHEN ",
            $ok,
            " THEN 'done'
                          WHEN ",
            $permanent,
            " OR j.attempts >= j.max_attempts THEN 'error'
                          ELSE 'waiting' END,
             result = CASE WHEN ",
            $ok,
            " THEN ",
            $result,
            " END,
             error = CASE WHEN ",
            $ok,
            " THEN NULL ELSE ",
            $error,
            " END,
             run_at = CASE WHEN ",
            $ok,
            " THEN j.run_at
                           ELSE ",
            ms_from_now!($retry_ms),
            " END,
             priority = CASE WHEN ",
            $ok,
            " THEN j.priority
                           ELSE greatest(j.priority, ",
            epoch_us!(ms_from_now!($retry_ms)),
            ") END,
             finished_at = CASE WHEN ",
            $ok,
            " OR ",
            $permanent,
            "
                                     OR j.attempts >= j.max_attempts
                                THEN now() END,
             worker_id = NULL, lease_expires_at = NULL, updated_at = now()"
        )
    };
}

/// The outcomes of [`finish`], as parallel arrays. The lease fence is `worker_id` and the
/// attempt: `worker_id` is set exactly while a row is `processing` (claim sets it; completion,
/// the rescuer and release clear it), so a row still carrying this worker and attempt is still
/// leased by this very attempt. (Spelling out `state = 'processing'` too would offer the
/// planner the `jobs_processing` index as the outer side of the join, see [`SESSION_OPTIONS`].)
const FINISH_SQL: &str = concat!(
    "WITH input AS (
         SELECT * FROM unnest($1::uuid[], $2::int4[], $3::bool[], $4::jsonb[], $5::text[],
                              $6::bool[], $7::int8[])
             AS x(id, attempt, ok, result, error, permanent, retry_ms)
     ), updated AS (
         ",
    record_outcome!("i.ok", "i.result", "i.error", "i.permanent", "i.retry_ms"),
    "
           FROM input i
          WHERE j.id = i.id AND j.worker_id = $8::text AND j.attempts = i.attempt
      ",
    updated_columns!(),
    "
     ), ",
    finished_events!(),
    "
     ",
    finished_columns!()
);

/// [`FINISH_SQL`] for one outcome.
const FINISH_ONE_SQL: &str = concat!(
    "WITH updated AS (
         ",
    record_outcome!("$3::bool", "$4::jsonb", "$5::text", "$6::bool", "$7::int8"),
    "
          WHERE j.id = $1::uuid AND j.worker_id = $8::text AND j.attempts = $2::int4
      ",
    updated_columns!(),
    "
     ), ",
    finished_event!(),
    "
     ",
    finished_columns!()
);

/// One notification per payload on [`CHANNEL_FINISHED`], committed asynchronously (see
/// [`NOTIFY_WAITING_SQL`]).
const NOTIFY_FINISHED_SQL: &str = "SELECT set_config('synchronous_commit', 'off', true),
            pg_notify('tenantry_jobs_finished', p) FROM unnest($1::text[]) p";

/// Wakes workers: a notification on [`CHANNEL_WAITING`], sent after the enqueuing transaction
/// committed.
///
/// A notification is delivered when its transaction commits, and a synchronous commit first
/// waits for its WAL to reach the disk — a flush that was a third to a half of the time from
/// enqueue to start on the benchmark VM. The notifying transaction writes no data, only the
/// news that some did commit (durably, in its own transaction), so it commits without waiting
/// for the flush: a crash can lose the notification, which the workers' fallback poll and
/// the waiters' timeouts already cover, never a job or a result. Run it in its own implicit
/// transaction only: inside another transaction it would make that one's commit asynchronous.
pub const NOTIFY_WAITING_SQL: &str = "SELECT set_config('synchronous_commit', 'off', true),
            pg_notify('tenantry_jobs_waiting', '')";

/// Comma-separated job ids, 200 per payload to stay under PostgreSQL's 8000-byte limit.
fn notify_payloads(ids: &[Uuid]) -> Vec<String> {
    const PER_PAYLOAD: usize = 200;
    ids.chunks(PER_PAYLOAD)
        .map(|chunk| {
            let mut payload = String::with_capacity(chunk.len() * 37);
            for (i, id) in chunk.iter().enumerate() {
                if i > 0 {
                    payload.push(',');
                }
                payload.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
            }
            payload
        })
        .collect()
}

/// Notifies waiters which jobs finished, 200 ids per payload to stay under PostgreSQL's
/// 8000-byte limit. Call it after the commit that finished them.
pub async fn announce_finished(
    conn: &impl QueueConn,
    ids: &[Uuid],
) -> Result<(), tokio_postgres::Error> {
    let payloads = notify_payloads(ids);
    if !payloads.is_empty() {
        let notify = conn.prepared(NOTIFY_FINISHED_SQL).await?;
        conn.pg().execute(&notify, &[&payloads]).await?;
    }
    Ok(())
}

/// Renews the leases of the jobs `worker_id` is running. (`worker_id` is set exactly while a
/// row is `processing`, so the statement need not say `state = 'processing'`, which would offer
/// the planner a walk of every processing row; see [`SESSION_OPTIONS`].)
///
/// Rows another transaction holds locked are skipped, not waited for: they are being completed,
/// rescued or released, which ends the lease anyway, and a completion that fails leaves its
/// row to the next beat, a third of a lease later. Never waiting is what keeps the heartbeat
/// out of deadlocks: it takes many rows in one statement, in index or heap order, while a
/// batched completion takes its rows in the order its outcomes came in, and release in yet
/// another; two of them each holding a row the other wants would cost one of them a second of
/// `deadlock_timeout` and an abort.
pub async fn heartbeat(
    client: &impl GenericClient,
    worker_id: &str,
    ids: &[Uuid],
    lease: Duration,
) -> Result<u64, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    client
        .execute(
            concat!(
                "WITH mine AS (
                     SELECT id FROM jobs WHERE id = ANY($2) AND worker_id = $1
                        FOR UPDATE SKIP LOCKED
                 )
                 UPDATE jobs j SET lease_expires_at = ",
                ms_from_now!("$3"),
                " FROM mine WHERE j.id = mine.id"
            ),
            &[&worker_id, &ids, &(lease.as_millis() as f64)],
        )
        .await
}

/// Expired leases back to `waiting` (or to `error` with no attempts left), with the events of
/// those that finished; see [`rescue_expired`].
const RESCUE_SQL: &str = concat!(
    "WITH expired AS (
                 -- The retry's backoff, as `worker::backoff` computes it for the attempt of
                 -- this round ($2 the base, $3 the cap, in ms; $2 <= $3): between
                 -- max(base, 3/4 hi) and hi = min(5/4 min(base 2^m, cap), cap), m = n - 1 <= 20.
                 SELECT id, worker_id,
                        CASE WHEN hi <= lo THEN lo ELSE lo + (hi - lo) * random() END AS ms
                   FROM (SELECT id, worker_id, hi, greatest(hi * 0.75, $2::float8) AS lo
                           FROM (SELECT id, worker_id,
                                        least(least($2::float8 * power(2, least(greatest(
                                                  attempts - retried_after, 1) - 1, 20)),
                                                  $3::float8) * 1.25, $3::float8) AS hi
                                   FROM jobs
                                  WHERE state = 'processing' AND lease_expires_at < now()
                                  LIMIT $1 FOR UPDATE SKIP LOCKED) capped) spread
             ), updated AS (
                 UPDATE jobs j SET
                     state = CASE WHEN j.attempts >= j.max_attempts THEN 'error' ELSE 'waiting' END,
                     error = ",
    rescue_error!("coalesce(j.worker_id, '?')"),
    ",
                     finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
                     run_at = ",
    ms_from_now!("expired.ms"),
    ",
                     priority = greatest(j.priority, ",
    epoch_us!(ms_from_now!("expired.ms")),
    "),
                     worker_id = NULL, lease_expires_at = NULL, updated_at = now()
                   FROM expired WHERE j.id = expired.id
              ",
    updated_columns!(),
    "
             ), ",
    finished_events!(),
    "
             SELECT u.id, u.state, u.awaited, u.request_id, u.company_id, e.worker_id
               FROM updated u JOIN expired e ON e.id = u.id"
);

/// Returns jobs whose lease expired (their worker died or hung) to `waiting`, or to `error`
/// when they have used their attempts; at most `limit` per call. Returns (rescued, dead).
///
/// A rescued job waits out the retry backoff of its attempt (`retry_base`, `retry_max`, as a
/// failed attempt does; zero for none), its claim order moved to the end of it: a job whose
/// handler brings its worker down (an abort, running out of memory) would otherwise be claimed
/// again at once and bring the next worker down, every job running there rescued with it.
///
/// Race prevented: `FOR UPDATE SKIP LOCKED` lets several rescuers run at once without
/// rescuing a job twice, and a worker completing at this very moment either commits first
/// (the row is no longer `processing`) or finds its lease gone and is discarded.
pub async fn rescue_expired(
    client: &mut tokio_postgres::Client,
    limit: i64,
    retry_base: Duration,
    retry_max: Duration,
) -> Result<(Vec<Uuid>, Vec<Uuid>), tokio_postgres::Error> {
    let max_ms = retry_max.as_secs_f64() * 1e3;
    let base_ms = (retry_base.as_secs_f64() * 1e3).min(max_ms);
    let tx = client.transaction().await?;
    tx.batch_execute(INDEX_ONLY_SETTINGS).await?;
    let rows = tx.query(RESCUE_SQL, &[&limit, &base_ms, &max_ms]).await?;
    let changed: Vec<Finished> = rows.iter().map(finished).collect();
    tx.commit().await?;
    let (mut rescued, mut dead) = (Vec::new(), Vec::new());
    for (i, (f, row)) in changed.iter().zip(&rows).enumerate() {
        let dead_lettered = f.state == JobState::Error;
        if dead_lettered {
            dead.push(f.id);
        } else {
            rescued.push(f.id);
        }
        if i >= LOGGED_EACH {
            continue;
        }
        // A line per job, in its span: the answer to "what happened to request X" when its
        // worker died.
        let worker_id: Option<&str> = row.get("worker_id");
        let _in_job = JobRef::from_row(row).span().entered();
        let worker_id = worker_id.unwrap_or("?");
        if dead_lettered {
            tracing::warn!(worker.id = %worker_id,
                "lease expired with no attempts left: the job is dead-lettered (its worker stopped renewing the lease)");
        } else {
            tracing::warn!(worker.id = %worker_id,
                "lease expired: the job is back to waiting for another attempt (its worker stopped renewing the lease)");
        }
    }
    if changed.len() > LOGGED_EACH {
        tracing::warn!(
            more = changed.len() - LOGGED_EACH,
            "lease expired: more jobs taken back than logged one by one"
        );
    }
    after_commit(announce_finished(client, &announced_ids(&changed)).await);
    Ok((rescued, dead))
}

/// Gives the jobs leased to worker `$1`, but for those in `$2`, back to `waiting`, without
/// counting the attempt. Rows another transaction holds locked are skipped, not waited for:
/// that is the worker's own completion still being written, a rescue of a lease that ran out
/// (the rescuer returns the job if the completion never commits), or a long poll marking its
/// job for a moment (a stopping worker tries again, see [`leased`]), and waiting for it could
/// outlast the stop. (The stopping worker's heartbeat, whose renewals lock rows too, is
/// stopped before its release.)
const RELEASE_SQL: &str = "UPDATE jobs j SET state = 'waiting', worker_id = NULL,
                                  lease_expires_at = NULL, attempts = greatest(attempts - 1, 0),
                                  run_at = now(), updated_at = now()
                            FROM (SELECT id FROM jobs
                                   WHERE worker_id = $1 AND state = 'processing'
                                     AND NOT (id = ANY($2::uuid[]))
                                     FOR UPDATE SKIP LOCKED) held
                           WHERE j.id = held.id
                       RETURNING j.id, j.request_id, j.company_id";

/// Gives jobs a stopping worker still holds back to `waiting`, without counting the
/// interrupted attempt, but for those in `lost`: jobs that ran and whose outcome the worker
/// gave up on writing, left to the rescuer, which counts their attempt.
pub async fn release(
    client: &impl GenericClient,
    worker_id: &str,
    lost: &[Uuid],
) -> Result<Vec<JobRef>, tokio_postgres::Error> {
    let rows = client.query(RELEASE_SQL, &[&worker_id, &lost]).await?;
    Ok(rows.iter().map(JobRef::from_row).collect())
}

/// How many jobs are leased to `worker_id`, but for those in `except`: what a stopping
/// worker's [`release`] skipped because another transaction held their rows.
pub async fn leased(
    client: &impl GenericClient,
    worker_id: &str,
    except: &[Uuid],
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM jobs
              WHERE worker_id = $1 AND state = 'processing' AND NOT (id = ANY($2::uuid[]))",
            &[&worker_id, &except],
        )
        .await?;
    Ok(row.get(0))
}

/// Gives back to `waiting`, without counting the attempt, the jobs leased to `worker_id` that
/// it does not hold (`held`: what it runs, what it has outcomes for that are not written yet,
/// and what ran and had its outcome given up on, which the rescuer returns counting the
/// attempt). A claim commits on the server even when its answer is lost with the connection; the
/// jobs it took are then leased to a worker that never heard of them, whose heartbeat does not
/// renew them, and the rescuer would count an attempt they never had (a job allowed one
/// attempt would go to the dead letters without having run). Only the worker's claim loop may
/// call this, between its claims: a job of a claim still on its way would be given back too.
/// A failed claim may also still be running on the server, to commit later: the loop calls
/// this before each claim for a lease after the failure.
pub async fn release_unheld(
    client: &mut tokio_postgres::Client,
    worker_id: &str,
    held: &[Uuid],
) -> Result<Vec<JobRef>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // The partial index of processing rows, not a walk of the whole table.
    tx.batch_execute(INDEX_ONLY_SETTINGS).await?;
    let rows = tx.query(RELEASE_SQL, &[&worker_id, &held]).await?;
    tx.commit().await?;
    Ok(rows.iter().map(JobRef::from_row).collect())
}

/// Deletes up to `limit` finished rows older than `retention` (`done` rows by when they
/// finished, `error_resolved` rows by when they were resolved; `error` rows stay until an
/// operator acts) and up to `limit` published outbox rows as old.
///
/// The outbox is pruned from its oldest rows by id (the primary key): of the first `limit`
/// rows, those published before the cutoff go. Ids follow insertion (commit order may differ a
/// little), so the oldest ids are where prunable rows are, and a pass reads at most `limit`
/// rows even when nothing is old enough (a filter on `published_at` alone has no index to use
/// and would read the whole outbox).
pub async fn prune(
    client: &mut tokio_postgres::Client,
    retention: Duration,
    limit: i64,
) -> Result<u64, tokio_postgres::Error> {
    let secs = retention.as_secs_f64();
    let tx = client.transaction().await?;
    tx.batch_execute(INDEX_ONLY_SETTINGS).await?;
    let jobs = tx
        .execute(
            "DELETE FROM jobs WHERE id IN (
                 SELECT id FROM jobs
                  WHERE state IN ('done', 'error_resolved')
                    AND finished_at < now() - $1 * interval '1 second'
                    AND (state = 'done' OR updated_at < now() - $1 * interval '1 second')
                  LIMIT $2)",
            &[&secs, &limit],
        )
        .await?;
    let outbox = tx
        .execute(
            "WITH head AS (SELECT id, published_at FROM outbox ORDER BY id LIMIT $2)
             DELETE FROM outbox o USING head h
              WHERE o.id = h.id AND h.published_at < now() - $1 * interval '1 second'",
            &[&secs, &limit],
        )
        .await?;
    tx.commit().await?;
    Ok(jobs + outbox)
}

/// A company's job, or `None` (also for another company's job id).
pub async fn get(
    conn: &impl QueueConn,
    company: Uuid,
    id: Uuid,
) -> Result<Option<JobRecord>, tokio_postgres::Error> {
    let stmt = conn.prepared(GET_SQL).await?;
    Ok(conn
        .pg()
        .query_opt(&stmt, &[&id, &company])
        .await?
        .map(|r| record(&r)))
}

/// Marks one company's unfinished job awaited for `$3` more milliseconds and returns it; no row
/// when the job is finished, missing, or already awaited that long (no write then). Committed
/// asynchronously (see [`NOTIFY_WAITING_SQL`]): the completion sees the mark as soon as it
/// commits, and a mark a database crash loses is written again by the waiter's next read (the
/// listener's reconnect wakes every waiter).
const AWAIT_SQL: &str = concat!(
    "WITH ",
    async_commit!(),
    "
     UPDATE jobs j
        SET awaited_until = ",
    ms_from_now!("$3::float8"),
    "
       FROM async_commit
      WHERE j.id = $1 AND j.company_id = $2 AND j.state IN ('waiting', 'processing')
        AND j.awaited_until < ",
    ms_from_now!("$3::float8"),
    "
  RETURNING ",
    record_columns!()
);

/// [`get`] for a request that is about to wait up to `wait` for the job to finish: an
/// unfinished job is first marked awaited until then, so that its completion is announced on
/// [`CHANNEL_FINISHED`] (a completion nobody is marked for sends no notification). Register
/// the waiter before calling it, then wait only if the job returned is unfinished.
///
/// Race prevented: the mark and the completion both update the job's row, so one of them
/// commits first. A completion after the mark updates the newest row version, sees the mark
/// and announces the job; a completion before it leaves a finished row, which the mark skips
/// and this function reads as it is. A job already awaited long enough is only read. Call it
/// outside a transaction block (its asynchronous commit would become that transaction's).
pub async fn await_job(
    conn: &impl QueueConn,
    company: Uuid,
    id: Uuid,
    wait: Duration,
) -> Result<Option<JobRecord>, tokio_postgres::Error> {
    let stmt = conn.prepared(AWAIT_SQL).await?;
    let marked = conn
        .pg()
        .query_opt(&stmt, &[&id, &company, &awaited_ms(wait)])
        .await?;
    match marked {
        Some(row) => Ok(Some(record(&row))),
        None => get(conn, company, id).await,
    }
}

/// Any job by id, for operators.
pub async fn get_any(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<JobRecord>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!("SELECT {RECORD_COLUMNS} FROM jobs WHERE id = $1"),
            &[&id],
        )
        .await?
        .map(|r| record(&r)))
}

/// Jobs for operators, newest first, optionally by state and company.
pub async fn list(
    client: &impl GenericClient,
    state: Option<JobState>,
    company: Option<Uuid>,
    limit: i64,
    payloads: bool,
) -> Result<Vec<JobRecord>, tokio_postgres::Error> {
    // Without payloads, `result` is `None` and `user_context` and `params` are JSON null.
    let columns = if payloads {
        RECORD_COLUMNS
    } else {
        SUMMARY_COLUMNS
    };
    // Dead letters through their own index (`jobs_dead`, which the literal state lets the
    // planner use); anything else newest first along the primary key (UUID v7 ids are in
    // creation order), which stops after `limit` matches instead of sorting the whole table,
    // seven days of finished jobs and more.
    let rows = if state == Some(JobState::Error) {
        client
            .query(
                &format!(
                    "SELECT {columns} FROM jobs
                      WHERE state = 'error' AND ($1::uuid IS NULL OR company_id = $1)
                      ORDER BY created_at DESC LIMIT $2"
                ),
                &[&company, &limit],
            )
            .await?
    } else {
        let state = state.map(JobState::as_str);
        client
            .query(
                &format!(
                    "SELECT {columns} FROM jobs
                      WHERE ($1::text IS NULL OR state = $1)
                        AND ($2::uuid IS NULL OR company_id = $2)
                      ORDER BY id DESC LIMIT $3"
                ),
                &[&state, &company, &limit],
            )
            .await?
    };
    Ok(rows.iter().map(record).collect())
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no job {0} on this shard")]
    NotFound(Uuid),
    #[error("job {id} is {state}; only jobs in error can be {verb}")]
    WrongState {
        id: Uuid,
        state: &'static str,
        verb: &'static str,
    },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// How many of a company's waiting jobs a retried job's fairness offset counts at most (see
/// `RETRY_SQL`); the offset of a job enqueued is bounded by `queue.max_waiting_per_company`.
pub const RETRY_OFFSET_CAP: i64 = 100_000;
/// [`RETRY_OFFSET_CAP`] as SQL text, for `RETRY_SQL`.
macro_rules! retry_offset_cap {
    () => {
        "100000"
    };
}

/// Dead letter → `waiting` with a fresh round of attempts (operator retry): as many as its
/// first round had (`max_attempts - retried_after`), on top of those it made. The count goes on
/// rather than starting again at 0 because it is also the lease token (see [`finish`]): a
/// worker whose slot still ran an old attempt, and which claimed the retried job again, would
/// otherwise take the same (worker, attempt) lease, and the old run's outcome would be accepted
/// as the new one's.
pub async fn retry(client: &impl GenericClient, id: Uuid) -> Result<JobRecord, OperatorError> {
    operator_transition(client, id, "retried", RETRY_SQL, &CHANNEL_WAITING).await
}

/// [`retry`]'s one statement. The job's claim order starts again from the queue's virtual
/// time, as a new job's does: the one it had may lie days back, and as the head of the
/// claimable rows it would pull the fairness base of every job enqueued while it waits (see
/// `virtual_now!`) back there too, ahead of the whole backlog. Like a new job it also gets its
/// company's fairness offset (a quantum per job of the company already waiting, counted up to
/// [`RETRY_OFFSET_CAP`]): an operator retrying a company's thousands of dead letters one by one
/// would otherwise give them all one claim order at the head, and every other company's next
/// job would land among them, behind more rows than a claim's window looks at. Workers are
/// notified in the same statement, so the notification goes out when the change commits.
const RETRY_SQL: &str = concat!(
    "WITH changed AS (
         UPDATE jobs SET state = 'waiting', max_attempts = attempts + max_attempts - retried_after,
                retried_after = attempts, run_at = now(), finished_at = NULL,
                priority = ",
    virtual_now!(),
    " + (SELECT count(*) FROM (SELECT 1 FROM jobs w
                                 WHERE w.company_id = jobs.company_id AND w.state = 'waiting'
                                 LIMIT ",
    retry_offset_cap!(),
    ") c) * ",
    fairness_quantum_us!(),
    ", updated_at = now()
          WHERE id = $1 AND state = 'error'
      RETURNING ",
    record_columns!(),
    "
     )
     SELECT ",
    record_columns!(),
    ", pg_notify($2::text, '') FROM changed"
);

/// Dead letter → `error_resolved` with the operator's note.
pub async fn resolve(
    client: &impl GenericClient,
    id: Uuid,
    note: &str,
) -> Result<JobRecord, OperatorError> {
    operator_transition(client, id, "resolved", RESOLVE_SQL, &note).await
}

const RESOLVE_SQL: &str = concat!(
    "UPDATE jobs SET state = 'error_resolved', resolution_note = $2, updated_at = now()
      WHERE id = $1 AND state = 'error'
  RETURNING ",
    record_columns!()
);

/// Runs an operator's transition of a dead letter (`$1` the job, `$2` its other parameter):
/// one statement that changes the row and returns it, so a change that committed is never
/// reported as failed because a later read did not get through. A job found in another state
/// is read again for the message; if it reached `error` in between, the transition is tried
/// once more.
async fn operator_transition(
    client: &impl GenericClient,
    id: Uuid,
    verb: &'static str,
    sql: &str,
    second: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<JobRecord, OperatorError> {
    let mut tries = 0;
    loop {
        tries += 1;
        if let Some(row) = client.query_opt(sql, &[&id, second]).await? {
            return Ok(record(&row));
        }
        let job = get_any(client, id)
            .await?
            .ok_or(OperatorError::NotFound(id))?;
        if job.view.state != JobState::Error || tries == 2 {
            return Err(OperatorError::WrongState {
                id,
                state: job.view.state.as_str(),
                verb,
            });
        }
    }
}

/// Waiting jobs on the shard, counted no further than `limit`.
pub async fn waiting_total(
    client: &impl GenericClient,
    limit: i64,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE state = 'waiting' LIMIT $1) t",
            &[&limit],
        )
        .await?
        .get(0))
}

/// Maintenance statements (rescue, prune, depth) walk partial indexes; without statistics (a
/// new or just-shifted table) the planner could pick a sequential scan of every finished row
/// instead, so inside their transactions sequential scans (and JIT) are off.
const INDEX_ONLY_SETTINGS: &str = "SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// The queue's depth by state and kind, for metrics: `waiting` and `processing`, and with
/// `dead_letters` also `error` (which is unbounded until operators resolve them, so the worker
/// counts it less often).
pub async fn depth(
    client: &mut tokio_postgres::Client,
    dead_letters: bool,
) -> Result<Vec<(String, String, i64)>, tokio_postgres::Error> {
    // Only the live queue and the dead letters: each arm walks its own partial index, so the
    // cost follows the queue's depth, not the days of finished rows kept for `retention`
    // (a GROUP BY over the whole table, every rescue interval, in every worker process, would
    // not). Sequential scans are ruled out so a table without statistics cannot bring them back.
    let tx = client.transaction().await?;
    tx.batch_execute(INDEX_ONLY_SETTINGS).await?;
    let rows = tx
        .query(
            "SELECT 'waiting', kind, count(*) FROM jobs WHERE state = 'waiting' GROUP BY kind
             UNION ALL
             SELECT 'processing', kind, count(*) FROM jobs WHERE state = 'processing' GROUP BY kind
             UNION ALL
             SELECT 'error', kind, count(*) FROM jobs WHERE state = 'error' AND $1 GROUP BY kind",
            &[&dead_letters],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// For tests and metrics: how long a job waited from becoming claimable (`ready_at`) to now.
pub fn enqueue_to_start(ready_at: DateTime<Utc>) -> Duration {
    (Utc::now() - ready_at).to_std().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fairness_quantum_is_the_same_in_sql_and_rust() {
        assert_eq!(
            fairness_quantum_us!().parse::<i64>().unwrap(),
            super::FAIRNESS_QUANTUM_US
        );
    }

    use super::*;

    #[test]
    fn a_retry_counts_its_company_s_waiting_jobs_up_to_its_cap() {
        assert!(RETRY_SQL.contains(&format!("LIMIT {RETRY_OFFSET_CAP})")));
    }

    #[test]
    fn no_cap_is_the_same_in_sql_and_rust() {
        assert_eq!(uncapped!().parse::<i64>().unwrap(), super::UNCAPPED);
    }

    #[test]
    fn notifications_go_to_their_channels() {
        assert!(NOTIFY_FINISHED_SQL.contains(&format!("'{CHANNEL_FINISHED}'")));
        assert!(NOTIFY_WAITING_SQL.contains(&format!("'{CHANNEL_WAITING}'")));
    }

    #[test]
    fn notification_payloads_hold_at_most_200_ids() {
        let ids: Vec<Uuid> = (0..401).map(|_| Uuid::now_v7()).collect();
        let p = notify_payloads(&ids);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|s| s.len() < 8000));
        assert_eq!(p[2], ids[400].to_string());
    }
}
