//! Forwarding `/v1/companies/{company_id}/…` to the company's shard.
//!
//! Per request: authenticate (401), parse the company id (400), check the caller's role in the
//! company (403, before the company is even looked up, so a stranger learns nothing), refuse
//! unsafe paths (400), apply
//! the company's rate limit (429), check the body size (413), resolve the shard (404 for an
//! unknown company), take a slot of the shard's in-flight cap (503), then send to a healthy
//! endpoint round-robin — another endpoint if connecting fails — and stream the answer back.
//!
//! Replays: a body up to `gateway.retry_buffer` is held, so the request can be sent again
//! when the shard says the company is not there (421: reload the company from the catalog and
//! retry once) or is frozen for a move (503 `tenant_frozen`: hold and retry until
//! `gateway.freeze_wait`). Larger bodies are streamed once; if such a request meets a 421 the
//! caller gets 503 with `Retry-After` and sends it again.

use std::{
    cell::{Cell, RefCell},
    pin::Pin,
    rc::{Rc, Weak},
    time::{Duration, Instant},
};

use actix_web::{
    HttpRequest, HttpResponse, ResponseError,
    error::{ParseError, PayloadError},
    http::{
        Method, StatusCode, Uri,
        header::{self, HeaderMap, HeaderName, HeaderValue},
        uri::PathAndQuery,
    },
    web,
};
use awc::error::{ConnectError, SendRequestError};
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, stream};
use tenantry_core::{
    ApiError,
    auth::Caller,
    error::ErrorBody,
    http::{self, REQUEST_ID_HEADER, current_request_id},
};
use uuid::Uuid;

use crate::{
    Gateway, metrics,
    router::{Resolved, ShardPool},
    upstream::Upstreams,
};

/// The response header naming the shard that answered.
pub const SHARD_HEADER: &str = "x-tenantry-shard";

/// The largest request head a shard's listener reads (actix's buffer of 128 KiB), less room
/// for the few headers awc adds itself when it sends (`Host`, `Content-Length` or
/// `Transfer-Encoding`, `Accept-Encoding`, `Date`).
const SHARD_HEAD_LIMIT: usize = 128 * 1024 - 1024;
/// The most headers a shard's listener reads (actix's own limit), less the four awc may add.
const SHARD_HEADER_LIMIT: usize = 96 - 4;

/// A request whose head the gateway's additions (`X-Forwarded-For`, `X-Forwarded-Host`,
/// `traceparent`, `X-Request-Id`) push over what a shard's listener reads is refused here:
/// the shard would close the connection on it, which the caller would see as `502` (a POST's
/// body still being written) or a bare `431`, depending on timing.
fn check_head(upstream: &awc::ClientRequest) -> Result<(), ApiError> {
    let headers = upstream.headers();
    let line = upstream.get_method().as_str().len()
        + upstream
            .get_uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n".len();
    let size = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + ": \r\n".len())
        .sum::<usize>()
        + line;
    if size > SHARD_HEAD_LIMIT || headers.len() > SHARD_HEADER_LIMIT {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request's head is too large to forward: with the headers the gateway adds \
                 it may be at most {SHARD_HEAD_LIMIT} bytes and {SHARD_HEADER_LIMIT} headers"
            ),
        ));
    }
    Ok(())
}

/// Answers up to this size (with a `Content-Length`) are read whole before they are passed on.
const SMALL_ANSWER: u64 = 64 * 1024;

/// Largest error body read from a shard to tell a freeze from other 503s.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    caller: Caller,
    gw: web::Data<Gateway>,
    upstreams: web::Data<Upstreams>,
) -> Result<HttpResponse, ApiError> {
    let company = company_of(req.path())?;
    tracing::Span::current().record("company.id", tracing::field::display(company));

    let role = caller
        .0
        .role_in(company)
        .ok_or_else(|| ApiError::forbidden("your token does not grant access to this company"))?;
    let reads_only = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !reads_only && !role.may_write() {
        return Err(ApiError::forbidden(format!(
            "a {role} may only read in this company"
        )));
    }
    check_path(req.uri().path())?;

    if let Some(limiter) = &gw.limiter
        && let Err(wait) = limiter.check(company)
    {
        metrics::REFUSED.with_label_values(&["rate_limited"]).inc();
        return Err(ApiError::rate_limited(
            "too many requests for this company; slow down",
            wait,
        ));
    }
    // Held until the answer has been streamed back, like the shard's slot (see `send`).
    let Some(company_slot) = gw.company_in_flight.enter(company) else {
        metrics::REFUSED.with_label_values(&["company_busy"]).inc();
        return Err(ApiError::rate_limited(
            "too many requests of this company are in flight; wait for some to finish",
            Duration::from_secs(1),
        ));
    };

    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > gw.body_limit as u64) {
        return Err(ApiError::payload_too_large(gw.body_limit));
    }
    // The held part of the body is read before any shard is involved: a caller that trickles
    // it gets the same bound, and answer, as one whose streamed body stalls (see `send`).
    let mut body = tokio::time::timeout(
        gw.upstream_timeout,
        read_body(payload, gw.retry_buffer, gw.body_limit),
    )
    .await
    .map_err(|_| ApiError::body_timeout(gw.upstream_timeout))??;

    let started = Instant::now();
    let deadline = started + gw.freeze_wait;
    let mut resolved = bounded(&gw, gw.router.resolve(company)).await?;
    // The request's line names the shard it went to (after a 421's reload, the last one).
    tracing::Span::current().record("shard.id", resolved.pool.id.as_str());
    let mut reloaded = false;
    let mut pause = Duration::from_millis(20);
    // Tries the shard answered `tenant_frozen` to, and the request was held.
    let mut held = 0u32;
    let timeout = upstream_timeout(&req, &gw);
    loop {
        let client = upstreams.client(&resolved.pool.id, |id| gw.router.has_shard(id));
        let outcome = send(&req, &client, &gw, &resolved.pool, &mut body, timeout).await;
        let (mut res, permit) = match outcome {
            Ok(sent) => sent,
            Err(e) => {
                metrics::REQUESTS
                    .with_label_values(&[&resolved.pool.id, e.status_code().as_str()])
                    .inc();
                return Err(e);
            }
        };
        let status = res.status();
        if status == StatusCode::MISDIRECTED_REQUEST {
            // The shard does not own the company: our map is stale. Reload it and try once
            // more, wherever the catalog now says. The shard's slot is not needed for that.
            drop((res, permit));
            if reloaded {
                return Err(stale_map(&resolved));
            }
            if !body.replayable() {
                // Sent already, and too large to have been kept: the caller retries. The route
                // goes, so that retry reads the catalog instead of meeting this 421 again.
                gw.router.forget(company).await;
                return Err(stale_map(&resolved));
            }
            reloaded = true;
            metrics::RETRIES.with_label_values(&["misdirected"]).inc();
            let from = resolved.pool.id.clone();
            resolved = bounded(&gw, gw.router.reload(company)).await?;
            tracing::Span::current().record("shard.id", resolved.pool.id.as_str());
            tracing::info!(from = %from, to = %resolved.pool.id, "shard answered 421; retrying on the reloaded route");
            continue;
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Bounded in time too: a shard that sends the head and stalls must not hold the
            // caller, or its in-flight slot, past the upstream timeout.
            let Some(bytes) =
                tokio::time::timeout(gw.upstream_timeout, res.body().limit(ERROR_BODY_LIMIT))
                    .await
                    .ok()
                    .and_then(Result::ok)
            else {
                // Larger than an error body, broken off or stalled: the shard's headers (a JSON
                // content type, its Retry-After) with no body would break the error shape the
                // caller relies on; the gateway answers for it.
                metrics::REQUESTS
                    .with_label_values(&[&resolved.pool.id, "503"])
                    .inc();
                return Err(ApiError::unavailable(
                    "shard_unavailable",
                    "this company's shard is unavailable; retry shortly",
                    Duration::from_secs(1),
                ));
            };
            let frozen = serde_json::from_slice::<ErrorBody>(&bytes)
                .is_ok_and(|b| b.error.code == "tenant_frozen");
            let now = Instant::now();
            if frozen && body.replayable() && now + pause < deadline {
                metrics::RETRIES.with_label_values(&["frozen"]).inc();
                held += 1;
                // Held requests of a frozen company must not keep the shard's in-flight slots
                // from its other companies while they wait.
                drop((res, permit));
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
                resolved = bounded(&gw, gw.router.resolve(company)).await?;
                continue;
            }
            if frozen {
                // The request's line then says why it got the shard's 503.
                tracing::Span::current().record("error.code", "tenant_frozen");
                if held > 0 {
                    tracing::info!(
                        held_ms = started.elapsed().as_millis() as u64,
                        tries = held + 1,
                        "the company stayed frozen for a move past gateway.freeze_wait; passing the shard's 503 on"
                    );
                } else {
                    tracing::info!(
                        "the company is frozen for a move and the request could not be held (its body is too large to send again, or gateway.freeze_wait is too short); passing the shard's 503 on"
                    );
                }
            }
            return Ok(respond(&resolved.pool.id, status, res.headers(), None).body(bytes));
        }
        if held > 0 {
            tracing::info!(
                held_ms = started.elapsed().as_millis() as u64,
                tries = held + 1,
                "the company's move ended while the request was held; sent on"
            );
        }
        let length = res
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(small) = length.filter(|&n| n <= SMALL_ANSWER)
            && *req.method() != Method::HEAD
        {
            // Read whole, then answered: the slots go as soon as the shard is done, whether or
            // not the caller ever reads the answer, and a shard that stalls in the middle of
            // it gets a clean 504 rather than a cut-off body.
            let read =
                tokio::time::timeout(gw.upstream_timeout, res.body().limit(small as usize)).await;
            drop((permit, company_slot));
            let failed = match read {
                Ok(Ok(bytes)) => {
                    return Ok(respond(&resolved.pool.id, status, res.headers(), None).body(bytes));
                }
                Ok(Err(e)) => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the company's shard broke off its answer",
                )
                .with_source(anyhow::anyhow!("{e}")),
                Err(_) => {
                    metrics::STALLED
                        .with_label_values(&[&resolved.pool.id])
                        .inc();
                    ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        "the company's shard stopped sending its answer",
                    )
                }
            };
            metrics::REQUESTS
                .with_label_values(&[&resolved.pool.id, failed.status_code().as_str()])
                .inc();
            return Err(failed);
        }
        let head = respond(&resolved.pool.id, status, res.headers(), length);
        return Ok(stream_answer(
            head,
            res,
            (permit, company_slot),
            gw.upstream_timeout,
            resolved.pool.clone(),
        ));
    }
}

/// A streamed answer's upstream body and the in-flight slots it holds, shared between the
/// stream and its watchdog (see [`stream_answer`]). Neither holds the borrow across an await.
struct Streaming<Res, Slots> {
    res: Option<Pin<Box<Res>>>,
    slots: Option<Slots>,
    /// Ended with the answer, rather than left to notice a whole `idle` later.
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

impl<Res, Slots> Drop for Streaming<Res, Slots> {
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
    }
}

/// The shard's answer body for the caller, streamed as it comes. The shard's in-flight slot
/// (and the company's, in `slots`) stays taken until it has been streamed. Two bounds keep it
/// from being held for as long as a connection lives:
/// - a shard that sends nothing for `idle` after its head has stalled: the answer is cut off
///   there (the caller sees a truncated body);
/// - a caller that takes nothing for `idle` (it stopped reading, and actix stopped asking the
///   stream for more, so the first bound's timer is not even running) loses the answer: a
///   watchdog drops the upstream body, and with it the shard connection, and the slots.
fn stream_answer<Res, Slots: 'static>(
    mut head: actix_web::HttpResponseBuilder,
    res: Res,
    slots: Slots,
    idle: Duration,
    shard: std::sync::Arc<ShardPool>,
) -> HttpResponse
where
    Res: futures_util::Stream<Item = Result<Bytes, PayloadError>> + 'static,
{
    let shared = Rc::new(RefCell::new(Streaming {
        res: Some(Box::pin(res)),
        slots: Some(slots),
        watchdog: None,
    }));
    let progress = Rc::new(Cell::new(Instant::now()));
    let request_id = current_request_id();
    let watchdog = actix_web::rt::spawn(watch_caller(
        Rc::downgrade(&shared),
        progress.clone(),
        idle,
        (shard.clone(), request_id.clone()),
    ));
    shared.borrow_mut().watchdog = Some(watchdog);
    // The shard and request ids ride along in the state, for the one log line of a cut.
    let state = (shared, progress, (shard, request_id));
    head.streaming(stream::unfold(Some(state), move |state| async move {
        let (shared, progress, ids) = state?;
        let taken = shared.borrow_mut().res.take();
        let Some(mut res) = taken else {
            // The watchdog took the answer away: the caller stopped reading it.
            let gone = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the caller stopped reading the answer",
            );
            return Some((Err(PayloadError::Io(gone)), None));
        };
        let next = tokio::time::timeout(idle, res.next()).await;
        shared.borrow_mut().res = Some(res);
        progress.set(Instant::now());
        match next {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some((shared, progress, ids)))),
            // The caller's answer ends broken; its request line says 200 (the head went out
            // first), so this line is what tells what happened to it.
            Ok(Some(Err(e))) => {
                let (shard, request_id) = ids;
                tracing::warn!(
                    shard.id = %shard.id,
                    request.id = request_id.as_deref().unwrap_or("-"),
                    error = %e,
                    "the shard's answer broke off while it was streamed"
                );
                Some((Err(e), None))
            }
            Ok(None) => None,
            Err(_) => {
                let (shard, request_id) = ids;
                metrics::STALLED.with_label_values(&[&shard.id]).inc();
                tracing::warn!(
                    shard.id = %shard.id,
                    request.id = request_id.as_deref().unwrap_or("-"),
                    idle_ms = idle.as_millis() as u64,
                    "the shard stopped sending its answer; cutting it off"
                );
                let stalled = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the shard stopped sending its answer",
                );
                Some((Err(PayloadError::Io(stalled)), None))
            }
        }
    }))
}

/// Drops a streamed answer's upstream body and slots once its caller has taken nothing for
/// `idle`; ends when the answer does (the stream, and with it `shared`, is gone).
async fn watch_caller<Res, Slots>(
    shared: Weak<RefCell<Streaming<Res, Slots>>>,
    progress: Rc<Cell<Instant>>,
    idle: Duration,
    (shard, request_id): (std::sync::Arc<ShardPool>, Option<String>),
) {
    let mut wake = progress.get() + idle;
    loop {
        tokio::time::sleep_until(wake.into()).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if progress.get().elapsed() < idle {
            wake = progress.get() + idle;
            continue;
        }
        let mut streaming = shared.borrow_mut();
        let Some(res) = streaming.res.take() else {
            // Out of the cell, the body is being read from the shard (the caller asked for
            // more), whose stall the stream's own timer bounds: look again an `idle` later.
            wake = Instant::now() + idle;
            continue;
        };
        drop((res, streaming.slots.take()));
        metrics::ABANDONED.with_label_values(&[&shard.id]).inc();
        tracing::warn!(
            shard.id = %shard.id,
            request.id = request_id.as_deref().unwrap_or("-"),
            idle_ms = idle.as_millis() as u64,
            "the caller stopped reading its answer; cutting it off"
        );
        return;
    }
}

/// The company id of `/v1/companies/{company_id}[/…]`.
fn company_of(path: &str) -> Result<Uuid, ApiError> {
    let rest = path
        .strip_prefix("/v1/companies/")
        .filter(|r| !r.is_empty())
        .ok_or_else(|| ApiError::not_found(format!("no route for {path}")))?;
    let id = rest.split('/').next().unwrap_or_default();
    Uuid::parse_str(id).map_err(|_| {
        ApiError::bad_request("invalid_id", "the company id in the path is not a UUID")
    })
}

fn stale_map(resolved: &Resolved) -> ApiError {
    metrics::REQUESTS
        .with_label_values(&[&resolved.pool.id, "503"])
        .inc();
    ApiError::unavailable(
        "shard_map_stale",
        "this company's shard changed while the request was routed; send it again",
        Duration::from_secs(1),
    )
}

/// The response head for the caller: the shard's status and end-to-end headers.
fn respond(
    shard: &str,
    status: StatusCode,
    upstream: &HeaderMap,
    length: Option<u64>,
) -> actix_web::HttpResponseBuilder {
    metrics::REQUESTS
        .with_label_values(&[shard, status.as_str()])
        .inc();
    let mut builder = HttpResponse::build(status);
    let hop = connection_tokens(upstream);
    for (name, value) in upstream {
        if is_hop_by_hop(name, &hop)
            || name == header::CONTENT_LENGTH
            || name.as_str() == REQUEST_ID_HEADER
        {
            continue;
        }
        builder.append_header((name.clone(), value.clone()));
    }
    if let Ok(v) = HeaderValue::from_str(shard) {
        builder.insert_header((HeaderName::from_static(SHARD_HEADER), v));
    }
    if let Some(n) = length {
        builder.no_chunking(n);
    }
    builder
}

/// Sends the request to the first endpoint of `pool` that accepts a connection; returns the
/// answer with the slot of the shard's in-flight cap it holds. `timeout` is the request's
/// [`upstream_timeout`].
async fn send(
    req: &HttpRequest,
    client: &awc::Client,
    gw: &Gateway,
    pool: &ShardPool,
    body: &mut Body,
    timeout: Duration,
) -> Result<
    (
        awc::ClientResponse<impl futures_util::Stream<Item = Result<Bytes, PayloadError>> + use<>>,
        tokio::sync::OwnedSemaphorePermit,
    ),
    ApiError,
> {
    let Ok(permit) = pool.in_flight.clone().try_acquire_owned() else {
        metrics::REFUSED.with_label_values(&["shard_busy"]).inc();
        return Err(ApiError::unavailable(
            "shard_busy",
            "too many requests are in flight to this company's shard; retry shortly",
            Duration::from_secs(1),
        ));
    };
    let candidates = pool.candidates();
    if candidates.is_empty() {
        return Err(ApiError::unavailable(
            "shard_unavailable",
            "this company's shard has no API endpoints",
            Duration::from_secs(1),
        ));
    }
    let root = PathAndQuery::from_static("/");
    let path_and_query = req.uri().path_and_query().unwrap_or(&root);
    let mut last_error = None;
    for endpoint in candidates {
        // The caller's path was checked already; what fails here is its join with the
        // endpoint's configured base (too long, say): the gateway's problem, not the caller's.
        let uri = endpoint.uri(path_and_query).map_err(|e| {
            tracing::error!(endpoint = %endpoint.base, error = %e, "the request's path cannot be joined to the shard endpoint's URL");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the request cannot be forwarded to this company's shard",
            )
        })?;
        let upstream = build(req, client, timeout, uri);
        check_head(&upstream)?;
        let started = Instant::now();
        let result = match body.take() {
            // No body: one write of the head (an empty body would be a second write).
            Some(Sendable::Full(bytes)) if bytes.is_empty() => upstream.send().await,
            Some(Sendable::Full(bytes)) => upstream.send_body(bytes).await,
            Some(Sendable::Stream(s)) => upstream.send_stream(s).await,
            None => break,
        };
        match result {
            Ok(res) => {
                metrics::UPSTREAM_SECONDS
                    .with_label_values(&[&pool.id])
                    .observe(started.elapsed().as_secs_f64());
                return Ok((res, permit));
            }
            // The connection was lost before an answer's head: the endpoint may already have
            // received the request, so only a request that may be repeated goes to the next
            // endpoint. Another attempt at a POST could create a second job.
            Err(e) if connection_lost(&e, !body.replayable()) && body.fault().is_none() => {
                endpoint.mark_down("shard endpoint lost the connection before answering", &e);
                if !req.method().is_idempotent() {
                    tracing::warn!(endpoint = %endpoint.base, error = %e, "shard endpoint lost the connection before answering; not repeating a non-idempotent request");
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "bad_gateway",
                        "the company's shard closed the connection before answering; the \
                         request may have been received, so it was not sent again",
                    ));
                }
                metrics::RETRIES.with_label_values(&["connect"]).inc();
                last_error = Some(e.to_string());
                continue;
            }
            Err(SendRequestError::Connect(e)) => {
                endpoint.mark_down("cannot connect to shard endpoint", &e);
                metrics::RETRIES.with_label_values(&["connect"]).inc();
                last_error = Some(e.to_string());
                continue;
            }
            // The time ran out while the caller was still sending its body: the caller is
            // slow, not the shard.
            Err(SendRequestError::Timeout) if body.still_arriving() => {
                return Err(ApiError::body_timeout(timeout));
            }
            Err(SendRequestError::Timeout) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the company's shard did not answer within {} ms",
                        timeout.as_millis()
                    ),
                ));
            }
            Err(e) => {
                match body.fault() {
                    Some(Fault::TooLarge) => {
                        return Err(ApiError::payload_too_large(gw.body_limit));
                    }
                    Some(Fault::Broken) => return Err(ApiError::broken_body()),
                    None => {}
                }
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the company's shard failed to answer",
                )
                .with_source(anyhow::anyhow!("{}: {e}", endpoint.base)));
            }
        }
    }
    Err(ApiError::unavailable(
        "shard_unavailable",
        "this company's shard is not reachable; retry shortly",
        Duration::from_secs(1),
    )
    .with_source(anyhow::anyhow!(
        "shard {}: {}",
        pool.id,
        last_error.unwrap_or_else(|| "request body could not be replayed".into())
    )))
}

/// Whether `e` says the connection to the endpoint was lost, after it was made and before an
/// answer's head arrived: closed in an orderly way (awc reports a close after the request was
/// written as a failed connect too) or reset (the endpoint's process died with the request
/// unread, or a firewall cut the connection), while the request was being written or while
/// its answer was awaited. An answer that arrived but could not be read is not one.
///
/// A write that failed while a `streamed` body was still being sent is not one either: a
/// healthy shard answers some requests (401, 413, 408) without reading their whole body, and
/// closes the connection on the rest of it a second later, which fails a caller's upload still
/// under way. That shard is not down, and the caller gets `502` as before.
fn connection_lost(e: &SendRequestError, streamed: bool) -> bool {
    match e {
        SendRequestError::Connect(ConnectError::Disconnected)
        | SendRequestError::Response(ParseError::Io(_)) => true,
        SendRequestError::Send(_) => !streamed,
        _ => false,
    }
}

/// How long the shard may take to send its response head: `gateway.upstream_timeout`, plus, for
/// a GET or HEAD, the long poll it asks for with `?wait=` (at most [`http::MAX_WAIT`], as the API
/// allows), so a long poll is not cut off at the gateway's own limit. A `wait` the API will
/// refuse adds nothing, and only reads long-poll.
fn upstream_timeout(req: &HttpRequest, gw: &Gateway) -> Duration {
    #[derive(serde::Deserialize)]
    struct LongPoll {
        wait: Option<String>,
    }
    // Most requests ask for no long poll: they are not parsed for one.
    let reads = matches!(*req.method(), Method::GET | Method::HEAD);
    if !reads || !req.query_string().contains("wait=") {
        return gw.upstream_timeout;
    }
    let wait = web::Query::<LongPoll>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.into_inner().wait)
        .and_then(|w| http::parse_wait(&w).ok())
        .unwrap_or_default();
    gw.upstream_timeout + wait
}

/// The upstream request: method, end-to-end headers, request id, trace context, forwarding
/// headers.
fn build(
    req: &HttpRequest,
    client: &awc::Client,
    timeout: Duration,
    url: Uri,
) -> awc::ClientRequest {
    let mut upstream = client.request(req.method().clone(), url).timeout(timeout);
    let hop = connection_tokens(req.headers());
    for (name, value) in req.headers() {
        if is_hop_by_hop(name, &hop)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name.as_str() == REQUEST_ID_HEADER
            || name.as_str() == "traceparent"
            || name.as_str() == "x-forwarded-for"
            // Set below from the caller's Host only: a caller's own would pass for the
            // gateway's when it sent no Host (HTTP/1.0).
            || name.as_str() == "x-forwarded-host"
            // The gateway's server answered the caller's `100-continue` itself; upstream it
            // would make the shard connection wait for a continue that never comes.
            || name == header::EXPECT
        {
            continue;
        }
        upstream = upstream.append_header((name.clone(), value.clone()));
    }
    if let Some(id) = current_request_id() {
        upstream = upstream.insert_header((REQUEST_ID_HEADER, id));
    }
    upstream = upstream.insert_header((
        "traceparent",
        traceparent(
            req.headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        ),
    ));
    let peer = req.peer_addr().map(|a| a.ip().to_string());
    // Every line of it, in order, as one list (several lines mean the same as one joined with
    // commas; a balancer may add its own line rather than extend the caller's).
    let prior: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .collect();
    let prior = (!prior.is_empty()).then(|| prior.join(", "));
    let forwarded_for = match (prior, peer) {
        (Some(prior), Some(peer)) => Some(format!("{prior}, {peer}")),
        (None, Some(peer)) => Some(peer),
        (Some(prior), None) => Some(prior),
        (None, None) => None,
    };
    if let Some(v) = forwarded_for {
        upstream = upstream.insert_header(("x-forwarded-for", v));
    }
    if let Some(host) = req.headers().get(header::HOST) {
        upstream = upstream.insert_header(("x-forwarded-host", host.clone()));
    }
    upstream
}

/// The W3C trace context for the shard: the caller's trace id and flags with a new parent id
/// (this hop), or a new trace when the caller sent none or a malformed one.
pub fn traceparent(given: Option<&str>) -> String {
    let span = &Uuid::new_v4().simple().to_string()[..16];
    if let Some(tp) = given {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if parts.len() >= 4
            && hex(parts[0], 2)
            && parts[0] != "ff"
            && hex(parts[1], 32)
            && parts[1].bytes().any(|b| b != b'0')
            && hex(parts[2], 16)
            && hex(parts[3], 2)
        {
            return format!("00-{}-{span}-{}", parts[1], parts[3]);
        }
    }
    format!("00-{}-{span}-01", Uuid::new_v4().simple())
}

/// Header names listed in `Connection`, which are hop-by-hop for this message.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// RFC 9110 §7.6.1: connection-specific headers are not forwarded.
fn is_hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    name.as_str().starts_with("proxy-")
        || matches!(
            name.as_str(),
            "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
        )
        || listed.iter().any(|t| t == name.as_str())
}

/// Refuses paths that could be resolved to something outside the company on the shard: dot
/// segments (plain or percent-encoded) and encoded slashes or backslashes. It runs on every
/// request, so it reads the bytes in place instead of building lowercased copies.
fn check_path(path: &str) -> Result<(), ApiError> {
    let bytes = path.as_bytes();
    let encoded = |i: usize, hi: u8, lo: u8| {
        bytes.get(i) == Some(&b'%')
            && bytes.get(i + 1) == Some(&hi)
            && bytes
                .get(i + 2)
                .is_some_and(|b| b.to_ascii_lowercase() == lo)
    };
    let separator = path.contains('\\')
        || (0..bytes.len()).any(|i| encoded(i, b'2', b'f') || encoded(i, b'5', b'c'));
    if separator || path.split('/').any(is_dot_segment) {
        return Err(ApiError::bad_request(
            "invalid_path",
            "the path contains dot segments or encoded separators",
        ));
    }
    Ok(())
}

/// `.` or `..`, with any dot written as `%2e`/`%2E`.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// A request body: held whole when small (replayable), streamed when large.
enum Body {
    Held(Bytes),
    Streaming {
        stream: Option<BodyStream>,
        fault: Rc<Cell<Option<Fault>>>,
        /// The shard's side asked for more and the caller had nothing yet: while this holds,
        /// the caller is the one being waited for (otherwise the shard is not reading). Any
        /// answer from the caller's side, a chunk, an error or its end, clears it.
        starved: Rc<Cell<bool>>,
    },
}

/// Why the caller's streamed body failed while it was being forwarded: the shard's send then
/// fails too, and the caller is told about its own body rather than given a 502.
#[derive(Clone, Copy)]
enum Fault {
    /// It grew past `gateway.body_limit`.
    TooLarge,
    /// The caller's connection broke or sent malformed chunked encoding.
    Broken,
}

type BodyStream = stream::LocalBoxStream<'static, Result<Bytes, PayloadError>>;

enum Sendable {
    Full(Bytes),
    Stream(BodyStream),
}

impl Body {
    fn replayable(&self) -> bool {
        matches!(self, Body::Held(_))
    }

    fn take(&mut self) -> Option<Sendable> {
        match self {
            Body::Held(b) => Some(Sendable::Full(b.clone())),
            Body::Streaming { stream, .. } => stream.take().map(Sendable::Stream),
        }
    }

    fn fault(&self) -> Option<Fault> {
        match self {
            Body::Held(_) => None,
            Body::Streaming { fault, .. } => fault.get(),
        }
    }

    /// A streamed body that is waiting for its caller: no fault, and the last read of it
    /// found nothing to pass on (not even its end).
    fn still_arriving(&self) -> bool {
        match self {
            Body::Held(_) => false,
            Body::Streaming { fault, starved, .. } => fault.get().is_none() && starved.get(),
        }
    }
}

/// A route lookup, bounded by `gateway.upstream_timeout`: a cache miss reads the catalog,
/// and a catalog that stalls (its pool's wait, connect and statement timeouts add up to some
/// 40 s) must not hold the caller, or its company's in-flight slot, longer than a shard may.
async fn bounded(
    gw: &Gateway,
    lookup: impl std::future::Future<Output = Result<Resolved, ApiError>>,
) -> Result<Resolved, ApiError> {
    tokio::time::timeout(gw.upstream_timeout, lookup)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::unavailable(
                "catalog_unavailable",
                "the shard map could not be read in time; try again shortly",
                Duration::from_secs(1),
            ))
        })
}

/// Reads up to `hold` bytes; a body that ends within them is held, a longer one continues as a
/// stream that fails (and flags it) once it exceeds `limit`.
async fn read_body(mut payload: web::Payload, hold: usize, limit: usize) -> Result<Body, ApiError> {
    let mut prefix = BytesMut::new();
    while prefix.len() <= hold {
        let Some(chunk) = payload.next().await else {
            return Ok(Body::Held(prefix.freeze()));
        };
        let chunk = chunk.map_err(|e| match e {
            PayloadError::Overflow => ApiError::payload_too_large(limit),
            other => ApiError::broken_body().with_source(anyhow::anyhow!("{other}")),
        })?;
        prefix.extend_from_slice(&chunk);
        if prefix.len() > limit {
            return Err(ApiError::payload_too_large(limit));
        }
    }
    let fault = Rc::new(Cell::new(None));
    let flag = fault.clone();
    let mut seen = prefix.len();
    let tail = payload.map(move |chunk| {
        let chunk = chunk.inspect_err(|_| flag.set(Some(Fault::Broken)))?;
        seen += chunk.len();
        if seen > limit {
            flag.set(Some(Fault::TooLarge));
            return Err(PayloadError::Overflow);
        }
        Ok(chunk)
    });
    let starved = Rc::new(Cell::new(false));
    let hungry = starved.clone();
    let mut tail = Box::pin(tail);
    let watched = stream::poll_fn(move |cx| {
        let polled = futures_util::Stream::poll_next(tail.as_mut(), cx);
        hungry.set(polled.is_pending());
        polled
    });
    let stream = stream::once(async move { Ok(prefix.freeze()) }).chain(watched);
    Ok(Body::Streaming {
        stream: Some(Box::pin(stream)),
        fault,
        starved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_company_id_is_the_segment_after_companies() {
        let id = "0190a0a0-0000-7000-8000-000000000000";
        for path in [
            format!("/v1/companies/{id}"),
            format!("/v1/companies/{id}/"),
            format!("/v1/companies/{id}/jobs/x"),
        ] {
            assert_eq!(company_of(&path).unwrap().to_string(), id, "{path}");
        }
        assert_eq!(
            company_of("/v1/companies/nope/jobs").unwrap_err().code(),
            "invalid_id"
        );
        assert_eq!(
            company_of(&format!("/v1/companies/{id}x"))
                .unwrap_err()
                .code(),
            "invalid_id"
        );
        assert_eq!(
            company_of("/v1/companies/").unwrap_err().code(),
            "not_found"
        );
        assert_eq!(
            company_of("/v1/companiesx").unwrap_err().code(),
            "not_found"
        );
    }

    #[test]
    fn traceparent_keeps_the_callers_trace_and_replaces_the_parent() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = traceparent(Some(given));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(parts[2], "00f067aa0ba902b7");
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let tp = traceparent(Some(bad));
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts.len(), 4, "{tp}");
            assert_eq!(parts[1].len(), 32);
            assert!(!bad.contains(parts[1]), "{bad} → {tp}");
        }
    }

    #[test]
    fn dot_segments_and_encoded_separators_are_refused() {
        let c = "/v1/companies/0190a0a0-0000-7000-8000-000000000000";
        assert!(check_path(&format!("{c}/jobs")).is_ok());
        assert!(check_path(&format!("{c}/jobs/x.y")).is_ok());
        for bad in [
            format!("{c}/../../internal/x"),
            format!("{c}/%2e%2E/internal"),
            format!("{c}/.%2e/internal"),
            format!("{c}/jobs%2F..%2Finternal"),
            format!("{c}/./jobs"),
            format!("{c}/jobs%5cx"),
        ] {
            assert!(check_path(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hop_by_hop_headers_include_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        let listed = connection_tokens(&h);
        assert!(is_hop_by_hop(
            &HeaderName::from_static("x-secret-hop"),
            &listed
        ));
        assert!(is_hop_by_hop(&header::TRANSFER_ENCODING, &listed));
        assert!(!is_hop_by_hop(&header::AUTHORIZATION, &listed));
    }
}
