//! `POST /v1/companies/{company_id}/jobs` and `GET /v1/companies/{company_id}/jobs/{job_id}`.

use std::time::{Duration, Instant};

use actix_web::{
    HttpRequest, HttpResponse,
    http::{StatusCode, header},
    web,
};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json, value::RawValue};
use tenantry_core::{
    ApiError,
    auth::{Caller, Role},
    config::QueueConfig,
    http::{self, current_request_id},
    text::shorten,
};
use tenantry_queue::{
    JobRecord, NewJob, ShardQueue, WaitError, WhenFull,
    job::{contains_nul, json_len, json_text_len},
    metrics,
    store::{self, EnqueueError, EnqueueLimits, Enqueued},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::fence;

/// How far past `api.sync_wait` a job request may still be reading its job back before it
/// answers `202` with the job as written: the reads take a connection from the shard's pool,
/// which may be exhausted, and a gateway gives up on the request at `gateway.upstream_timeout`
/// (10 s by default), after which a client without an `Idempotency-Key` would send it again.
pub const LAST_READ_LIMIT: Duration = tenantry_core::config::SYNC_WAIT_LAST_READ;

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

pub struct JobsState {
    pub shard: ShardQueue,
    pub sync_wait: Duration,
    pub queue: QueueConfig,
    /// Fires three quarters into the grace period after the node began to stop: a request
    /// waiting for its job then answers with the job as it stands, instead of being cut off
    /// when the grace period ends (counted from the stop, so a request that reaches its wait
    /// late still ends in time).
    pub answer_now: CancellationToken,
}

impl JobsState {
    async fn stopping(&self) {
        self.answer_now.cancelled().await;
    }

    /// `Listener::wait_until_finished` on this node's shard.
    async fn wait(
        &self,
        record: JobRecord,
        deadline: Instant,
        enqueued_awaited: bool,
        when_full: WhenFull,
        cancel: &CancellationToken,
    ) -> Result<Option<JobRecord>, WaitError> {
        let shard = &self.shard;
        shard
            .listener
            .wait_until_finished(
                &shard.pool,
                record,
                deadline,
                enqueued_awaited,
                when_full,
                cancel,
            )
            .await
    }
}

pub fn configure(c: &mut web::ServiceConfig) {
    c.service(web::resource("/v1/companies/{company_id}/jobs").post(create))
        .service(
            web::resource("/v1/companies/{company_id}/jobs/{job_id}")
                .get(show)
                .head(show),
        );
}

fn parse_uuid(what: &'static str, s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError::bad_request(
            "invalid_id",
            format!("{what} {:?} is not a UUID", shorten(s, 64)),
        )
    })
}

/// The caller's role in the company; 403 without saying whether the company exists.
fn role(caller: &Caller, company: Uuid) -> Result<Role, ApiError> {
    tracing::Span::current().record("company.id", tracing::field::display(company));
    caller
        .0
        .role_in(company)
        .ok_or_else(|| ApiError::forbidden("your token does not grant access to this company"))
}

/// A job request's body. Its params stay text until they have passed the size limit (or, for
/// a keyed repeat of an earlier job, until they are found no more than six times its size:
/// see `earlier`): the body may be up to `api.body_limit` (1 MiB by default), and parsed into
/// a `Value` such text can take some 30 times its size (`[0,0,…]`: a 32-byte value per 2
/// bytes), for as long as the request lasts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob<'a> {
    kind: String,
    #[serde(default, borrow, deserialize_with = "present")]
    params: Option<&'a RawValue>,
}

/// `params` as sent, `null` included (which `Option` alone would take for a missing field).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The job a refused request with idempotency `key` created when an earlier version accepted
/// it: same company, key, kind and params, compared as a replay compares them (by the
/// database, from the params as parsed). `parsed`: the params, if the refusal came after
/// `check_params` passed them. Params it refused (for their length as sent, say) are checked
/// here again only when such a job exists, with a limit of six times its params (compact, as
/// `check_params` measures them; `\u0041` for `A` is six times as long): so a refusal for size
/// parses no more than six times a job this shard accepted. Params written out longer than that
/// (long runs of zeros in a number, a key repeated) are not matched.
async fn earlier(
    client: &tokio_postgres::Client,
    company: Uuid,
    key: &str,
    input: &CreateJob<'_>,
    parsed: Option<Value>,
) -> Result<Option<JobRecord>, ApiError> {
    let (record, same) = match store::by_key(client, company, key, parsed.as_ref()).await? {
        Some((record, _)) if record.view.kind != input.kind => return Ok(None),
        Some(found) => found,
        None => return Ok(None),
    };
    if parsed.is_some() {
        return Ok(same.then_some(record));
    }
    let Ok(params) = check_params(input, json_len(&record.params).saturating_mul(6)) else {
        return Ok(None);
    };
    Ok(
        match store::by_key(client, company, key, Some(&params)).await? {
            Some((record, true)) => Some(record),
            _ => None,
        },
    )
}

/// What this shard refuses in a job request's body (before any fence: see `create`): params
/// that are not an object, are over `limit` bytes (as sent, leaving out whitespace between
/// tokens, and as stored) or hold U+0000, a kind it does not run, and params its handler's
/// `validate` refuses. Returns the params, parsed; a refusal carries them too once parsed.
fn check_job(
    input: &CreateJob,
    registry: &tenantry_queue::Registry,
    limit: u64,
) -> Result<Value, (ApiError, Option<Value>)> {
    let parsed = check_params(input, limit).map_err(|e| (e, None))?;
    match check_kind(input, registry, &parsed, limit) {
        Ok(()) => Ok(parsed),
        Err(e) => Err((e, Some(parsed))),
    }
}

/// The params of a job request, parsed, unless refused before they could be (not an object,
/// over `limit` as sent, not JSON) or holding U+0000 (which a job record cannot hold).
fn check_params(input: &CreateJob, limit: u64) -> Result<Value, ApiError> {
    let params = match input.params {
        None => json!({}),
        Some(raw) => {
            if !raw.get().starts_with('{') {
                return Err(ApiError::bad_request(
                    "invalid_params",
                    "params must be a JSON object",
                ));
            }
            if json_text_len(raw.get()) > limit {
                return Err(too_large(limit));
            }
            serde_json::from_str(raw.get()).map_err(|e| {
                ApiError::bad_request("invalid_json", format!("invalid job request: {e}"))
            })?
        }
    };
    if contains_nul(&params) {
        return Err(ApiError::bad_request(
            "invalid_params",
            "params must not contain the character U+0000, which a job record cannot hold",
        ));
    }
    Ok(params)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "params_too_large",
        format!("params are larger than the limit of {limit} bytes"),
    )
}

/// The checks of parsed params and of the kind (see `check_job`).
fn check_kind(
    input: &CreateJob,
    registry: &tenantry_queue::Registry,
    params: &Value,
    limit: u64,
) -> Result<(), ApiError> {
    // Parsed, a number may be written back longer than sent (`1e2` as `100.0`).
    if json_len(params) > limit {
        return Err(too_large(limit));
    }
    let Some(handler) = registry.get(&input.kind) else {
        return Err(ApiError::bad_request(
            "unknown_kind",
            format!(
                "unknown job kind {:?}; this shard runs: {}",
                shorten(&input.kind, 64),
                registry.kinds().join(", ")
            ),
        ));
    };
    handler
        .validate(params)
        .map_err(|e| ApiError::bad_request("invalid_params", e))
}

async fn create(
    req: HttpRequest,
    caller: Caller,
    path: web::Path<String>,
    http::Body(body): http::Body,
    state: web::Data<JobsState>,
) -> Result<HttpResponse, ApiError> {
    let company = parse_uuid("company_id", &path)?;
    if !role(&caller, company)?.may_write() {
        return Err(ApiError::forbidden("viewers cannot create jobs"));
    }
    let input: CreateJob = http::json_body(&req, &body, "job request")?;
    let registry = &state.shard.registry;
    let started = Instant::now();
    let idempotency_key = idempotency_key(&req)?;
    let params = match check_job(&input, registry, state.queue.max_params_size.bytes()) {
        Ok(params) => params,
        Err((refusal, parsed)) => {
            // Shards may run different kinds, checks and limits for a while (a rollout): a
            // request a stale route sent here must get the 421 that makes the gateway try the
            // company's own shard, not a refusal that shard may not give.
            let client = state.shard.pool.get().await?;
            fence::check(&client, company).await?;
            // And a repeat of a request this shard accepted before a rollout changed what it
            // accepts (a kind dropped, a limit lowered) gets its job back, as any repeat does,
            // not a refusal that would tell its client the job does not exist.
            let Some(key) = &idempotency_key else {
                return Err(refusal);
            };
            return match earlier(&client, company, key, &input, parsed).await? {
                Some(record) => {
                    drop(client);
                    answer(&state, company, Enqueued::Replayed(record), started).await
                }
                None => Err(refusal),
            };
        }
    };
    let shard_id = &state.shard.shard_id;

    let job = NewJob {
        company_id: company,
        request_id: current_request_id().unwrap_or_default(),
        user_context: json!({"user_id": caller.0.sub, "role": caller.0.role_in(company)}),
        max_attempts: registry.max_attempts(&input.kind),
        kind: input.kind,
        params,
        idempotency_key,
        // This request waits for it until `sync_wait` after `started`; the mark counts from
        // the start of the enqueuing transaction, which is later, so it outlasts the wait.
        awaited_for: state.sync_wait,
    };
    let mut client = state.shard.pool.get().await?;
    // A full shard is refused after the fence (a company this shard does not own gets 421, so
    // the gateway re-routes it) and, inside `enqueue`, after an idempotency key's replay (a
    // request already accepted gets its job back even while the queue is full). Without a key
    // there is nothing to replay, and the refusal takes no transaction or row lock: those are
    // the shard's to spare while it is overloaded.
    let shard_full = state.shard.waiting_estimate() >= state.queue.max_waiting_per_shard;
    if shard_full && job.idempotency_key.is_none() {
        fence::check(&client, company).await?;
        metrics::count(shard_id, "refused_shard", 1);
        return Err(queue_full());
    }
    let tx = client.transaction().await?;
    let xid = fence::check_for_write(&tx, company).await?;
    let limits = EnqueueLimits {
        max_waiting_per_company: state.queue.max_waiting_per_company,
        shard_full,
    };
    let enqueued = match store::enqueue(&tx, &job, limits).await {
        Ok(e) => e,
        Err(EnqueueError::CompanyFull { limit, .. }) => {
            metrics::count(shard_id, "refused_company", 1);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_jobs",
                format!("this company already has {limit} waiting jobs; retry later"),
            )
            .with_retry_after(Duration::from_secs(2)));
        }
        Err(EnqueueError::ShardFull) => {
            metrics::count(shard_id, "refused_shard", 1);
            return Err(queue_full());
        }
        Err(EnqueueError::IdempotencyConflict) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request",
            ));
        }
        Err(EnqueueError::Db(e)) => return Err(e.into()),
        // Only bulk enqueue refuses keys; this is a single enqueue.
        Err(e @ EnqueueError::KeyInBulk) => return Err(anyhow::Error::from(e).into()),
    };
    if let Err(e) = tx.commit().await {
        drop(client);
        settle_lost_commit(&state, xid.as_deref(), &enqueued, e).await?;
    } else {
        drop(client);
    }
    answer(&state, company, enqueued, started).await
}

/// Answers a job request whose job is written (`Created`) or was found under its key
/// (`Replayed`): waits for the job until `api.sync_wait` after `started`, then `200` with the
/// finished job or `202` with the job as it stands.
async fn answer(
    state: &web::Data<JobsState>,
    company: Uuid,
    enqueued: Enqueued,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    match &enqueued {
        Enqueued::Created(r) => {
            state.shard.notifier.poke();
            tracing::info!(job.id = %r.view.id, job.kind = %r.view.kind, "job enqueued");
        }
        // The link from this request to the job, and to the request that created it.
        Enqueued::Replayed(r) => tracing::info!(
            job.id = %r.view.id,
            job.kind = %r.view.kind,
            job.request_id = %r.request_id,
            "idempotency key seen before: answering with the job it created"
        ),
    }
    // A replayed job was marked awaited by the request that created it, not for this one.
    let enqueued_awaited = matches!(enqueued, Enqueued::Created(_));
    let record = enqueued.record().clone();
    let deadline = started + state.sync_wait;
    // In a task of its own, ended through `cancel` once this request is answered or gone
    // (its client left, the limit below passed, the node's stop answered it): a query under
    // way then finishes and hands its connection back to the pool idle, where dropping it
    // half way would leave the next user of that connection waiting behind it, and nothing
    // new is started.
    let cancel = CancellationToken::new();
    let _cancel_when_done = cancel.clone().drop_guard();
    let wait = spawn_wait(
        state,
        record.clone(),
        deadline,
        enqueued_awaited,
        WhenFull::Answer,
        cancel.clone(),
    );
    let limit = tokio::time::Instant::from_std(deadline + LAST_READ_LIMIT);
    let waited = tokio::select! {
        joined = tokio::time::timeout_at(limit, wait) => match joined {
            Ok(Ok(waited)) => waited,
            Ok(Err(panicked)) => {
                tracing::error!(job.id = %record.view.id, error = %panicked, "waiting for the job failed; answering with the job as written");
                Ok(Some(record.clone()))
            }
            Err(_) => {
                tracing::warn!(
                    job.id = %record.view.id,
                    "reading the job back ran past the synchronous wait; answering with the job as written"
                );
                Ok(Some(record.clone()))
            }
        },
        () = state.stopping() => {
            tracing::info!(job.id = %record.view.id, "node stopping; answering before the job has finished");
            Ok(Some(record.clone()))
        }
    };
    Ok(respond(company, &after_enqueue(record, waited)?))
}

/// The COMMIT of a job request failed. If the connection was lost on the way, the commit may
/// have happened all the same, and an error would make the client send the request again — a
/// second job, without an `Idempotency-Key`. So the transaction's fate is asked of the
/// database on another connection (`pg_xact_status` of the id the fence read): committed, the
/// request goes on as committed (`Ok`); aborted, the failure is returned (a 503, whose retry is
/// right); still in progress (the COMMIT is still running on the server), asked again until
/// `SETTLE_WAIT` has passed. When the fate stays unknown, the failure is returned and the
/// uncertainty logged. A replayed job existed before this transaction, so its request goes on
/// whatever the commit did.
async fn settle_lost_commit(
    state: &JobsState,
    xid: Option<&str>,
    enqueued: &Enqueued,
    e: tokio_postgres::Error,
) -> Result<(), ApiError> {
    let id = enqueued.record().view.id;
    if matches!(enqueued, Enqueued::Replayed(_)) {
        return Ok(());
    }
    if !tenantry_core::error::connection_lost(&e) {
        return Err(e.into());
    }
    let Some(xid) = xid else {
        return Err(e.into());
    };
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        let status = match state.shard.pool.get().await {
            Ok(c) => c
                .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid])
                .await
                .map(|r| r.get::<_, Option<String>>(0)),
            Err(pool) => {
                tracing::warn!(job.id = %id, error = %pool, "the commit's connection was lost and no other connection is available; the job may exist");
                return Err(e.into());
            }
        };
        match status.as_ref().map(Option::as_deref) {
            Ok(Some("committed")) => {
                tracing::warn!(job.id = %id, error = %e, "the connection was lost during the commit, which took effect; answering with the job");
                return Ok(());
            }
            Ok(Some("aborted")) => return Err(e.into()),
            Ok(Some(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(other) => {
                tracing::warn!(job.id = %id, status = ?other, "the commit's connection was lost and its outcome is still unknown; the job may exist");
                return Err(e.into());
            }
            Err(read) => {
                tracing::warn!(job.id = %id, error = %read, "the commit's connection was lost and its outcome could not be read; the job may exist");
                return Err(e.into());
            }
        }
    }
}

/// How long a request whose COMMIT lost its connection waits for the outcome to be known.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// What a job request answers with once its job is committed, given how waiting for it went.
/// A failure to read it again (the pool or the database) is not the request's failure: the job
/// exists and will run, and an error would tell the client to send it again, creating a second
/// job when it has no idempotency key. So it is logged, and the request gets the job as written
/// (`202` with its `Location`).
fn after_enqueue(
    written: JobRecord,
    waited: Result<Option<JobRecord>, WaitError>,
) -> Result<JobRecord, ApiError> {
    match waited {
        Ok(Some(read)) => Ok(read),
        Ok(None) => Err(ApiError::not_found("no such job")),
        Err(e) => {
            tracing::warn!(
                job.id = %written.view.id,
                error = %e,
                "could not wait for the job after enqueuing it; answering with the job as written"
            );
            Ok(written)
        }
    }
}

fn queue_full() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "queue_full",
        "this shard's job queue is full; retry later",
    )
    .with_retry_after(Duration::from_secs(5))
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let mut values = req.headers().get_all("idempotency-key");
    let Some(v) = values.next() else {
        return Ok(None);
    };
    // Two different keys for one request: which one a retry would repeat is anyone's guess.
    // (The same key twice, as a proxy may repeat it, is one key.)
    if values.any(|other| other != v) {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be sent once (or repeated with the same value)",
        ));
    }
    let key = v.to_str().ok().filter(|k| {
        !k.is_empty()
            && k.len() <= MAX_IDEMPOTENCY_KEY
            && k.bytes().all(|b| (0x21..0x7f).contains(&b))
    });
    key.map(|k| Some(k.to_owned())).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )
    })
}

/// [`JobsState::wait`] in a task of its own, in the request's span (its lines name the
/// request), ended through `cancel`.
fn spawn_wait(
    state: &web::Data<JobsState>,
    record: JobRecord,
    deadline: Instant,
    enqueued_awaited: bool,
    when_full: WhenFull,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<Result<Option<JobRecord>, WaitError>> {
    let state = state.clone();
    actix_web::rt::spawn(
        async move {
            state
                .wait(record, deadline, enqueued_awaited, when_full, &cancel)
                .await
        }
        .instrument(tracing::Span::current()),
    )
}

/// A long poll: waits for the job to finish, until `deadline` (see
/// `Listener::wait_until_finished`; past `queue.max_waiters` it reads the job once a second).
///
/// In a task of its own, ended through `cancel` once the request is answered or gone (its
/// client left, the node's stop answered it), as a job request's wait is (see `create`): a
/// read under way then finishes and hands its connection back to the pool idle, rather than
/// being dropped half way with the connection still busy.
async fn wait_until_finished(
    state: &web::Data<JobsState>,
    record: JobRecord,
    deadline: Instant,
    enqueued_awaited: bool,
) -> Result<JobRecord, ApiError> {
    // A plain GET (no `?wait=`), or a job already finished: nothing to wait for.
    if record.view.state.is_finished() || Instant::now() >= deadline {
        return Ok(record);
    }
    let cancel = CancellationToken::new();
    let _cancel_when_done = cancel.clone().drop_guard();
    let waited = spawn_wait(
        state,
        record,
        deadline,
        enqueued_awaited,
        WhenFull::Poll,
        cancel,
    )
    .await
    .map_err(|panicked| {
        ApiError::internal(anyhow::anyhow!("waiting for the job failed: {panicked}"))
    })?;
    waited?.ok_or_else(|| ApiError::not_found("no such job"))
}

fn respond(company: Uuid, record: &JobRecord) -> HttpResponse {
    if record.view.state.is_finished() {
        HttpResponse::Ok().json(&record.view)
    } else {
        HttpResponse::Accepted()
            .insert_header((
                header::LOCATION,
                format!("/v1/companies/{company}/jobs/{}", record.view.id),
            ))
            .json(&record.view)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    wait: Option<String>,
}

fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    http::parse_wait(s).map_err(|bad| {
        let message = match bad {
            http::BadWait::NotADuration => {
                format!(
                    "wait {:?} is not a duration like 5s or 500ms (of at most {} characters)",
                    shorten(s, 64),
                    http::MAX_WAIT_TEXT
                )
            }
            http::BadWait::TooLong => format!(
                "wait may be at most {}",
                humantime::format_duration(http::MAX_WAIT)
            ),
        };
        ApiError::bad_request("invalid_wait", message)
    })
}

async fn show(
    caller: Caller,
    path: web::Path<(String, String)>,
    query: web::Query<ShowQuery>,
    state: web::Data<JobsState>,
) -> Result<HttpResponse, ApiError> {
    let (company, job) = path.into_inner();
    let company = parse_uuid("company_id", &company)?;
    role(&caller, company)?;
    let job = parse_uuid("job_id", &job)?;
    let wait = query
        .wait
        .as_deref()
        .map(parse_wait)
        .transpose()?
        .unwrap_or_default();
    let client = state.shard.pool.get().await?;
    fence::check(&client, company).await?;
    let record = store::get(&client, company, job)
        .await?
        .ok_or_else(|| ApiError::not_found("no such job for this company"))?;
    drop(client);
    let record = tokio::select! {
        waited = wait_until_finished(&state, record.clone(), Instant::now() + wait, false) => waited?,
        () = state.stopping() => record,
    };
    Ok(HttpResponse::Ok().json(&record.view))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written() -> JobRecord {
        serde_json::from_value(json!({
            "id": "01900000-0000-7000-8000-0000000000aa", "kind": "echo", "state": "waiting",
            "result": null, "error": null, "attempts": 0,
            "created_at": "2026-12-06T20:00:00Z", "started_at": null, "finished_at": null,
            "request_id": "r", "company_id": "01900000-0000-7000-8000-0000000000bb",
            "user_context": {}, "params": {}, "worker_id": null, "max_attempts": 1,
            "run_at": "2026-12-06T20:00:00Z", "lease_expires_at": null,
            "idempotency_key": null, "resolution_note": null, "retried_after": 0
        }))
        .expect("a job record")
    }

    #[test]
    fn a_job_written_but_not_read_again_is_answered_as_written_not_as_an_error() {
        let timeout = deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait);
        let answer = after_enqueue(written(), Err(WaitError::Pool(timeout)));
        assert_eq!(answer.ok(), Some(written()), "202 with the job, not 503");

        let mut done = written();
        done.view.state = tenantry_queue::JobState::Done;
        let read = after_enqueue(written(), Ok(Some(done.clone())));
        assert_eq!(read.ok(), Some(done), "what the wait read is the answer");
        let gone = after_enqueue(written(), Ok(None));
        assert!(
            gone.is_err(),
            "a job gone by the time it was read is not found"
        );
    }
}
