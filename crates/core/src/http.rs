//! HTTP plumbing shared by every listener: request ids, the request log line, metrics, the
//! error-shape safety net, `/healthz`, `/readyz`, `/metrics`, and a server that drains
//! in-flight requests when the shutdown token fires.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use actix_web::{
    App, HttpRequest, HttpResponse, HttpServer, ResponseError,
    body::{BoxBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::{StatusCode, header},
    middleware::{Next, from_fn},
    web,
};
use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{config::HttpConfig, error::ApiError, metrics};

/// Header carrying the request id in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest long poll a request may ask for with `?wait=`.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// The longest `?wait=` duration text (`1m 30s 500ms`); plain seconds may be longer (leading
/// zeros).
pub const MAX_WAIT_TEXT: usize = 32;

/// Why a `?wait=` value is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadWait {
    /// Neither whole seconds nor a duration.
    NotADuration,
    /// Longer than [`MAX_WAIT`].
    TooLong,
}

/// A `?wait=` value: whole seconds (`5`) or a duration (`500ms`, `5s`), at most [`MAX_WAIT`].
/// The API refuses any other value; the gateway reads the same value, by the same rule, to
/// give a long poll time beyond its own upstream timeout.
pub fn parse_wait(s: &str) -> Result<Duration, BadWait> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            // humantime panics when its sum reaches exactly u64::MAX seconds with a second
            // carried from the nanoseconds (`18446744073709551615s1000000000ns`). Each number
            // counts at least nanoseconds, so one over 30 s of them is too long in any unit;
            // the rest are at most 3e10 years each, and 16 of them (in 32 characters) stay far
            // below u64::MAX seconds.
            if s.len() > MAX_WAIT_TEXT {
                return Err(BadWait::NotADuration);
            }
            let most = MAX_WAIT.as_nanos();
            if s.split(|c: char| !c.is_ascii_digit())
                .any(|n| n.parse::<u128>().is_ok_and(|n| n > most))
            {
                return Err(BadWait::TooLong);
            }
            humantime::parse_duration(s).map_err(|_| BadWait::NotADuration)?
        }
    };
    if d <= MAX_WAIT {
        Ok(d)
    } else {
        Err(BadWait::TooLong)
    }
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled on this task, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Accepts a client-supplied request id only if it is short and plain, so it can be logged and
/// echoed safely; otherwise a fresh UUID v7 is used.
pub fn accept_or_generate_request_id(given: Option<&str>) -> String {
    match given {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) =>
        {
            id.to_owned()
        }
        _ => uuid::Uuid::now_v7().to_string(),
    }
}

/// Something `/readyz` asks before saying the process can take traffic.
pub trait Probe: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// How long one `/readyz` verdict is given to every caller: the probes use the pools that serve
/// traffic (on a gateway, the catalog pool that routing reads from), and `/readyz` needs no
/// authentication, so a flood of probes must not turn into a flood of checks.
pub const READY_FOR: Duration = Duration::from_secs(1);

/// The probes that failed a readiness check: (name, error).
pub type Failures = Arc<Vec<(String, String)>>;

/// The probes `/readyz` asks, run by one caller at a time: callers that arrive while a check
/// runs wait for its verdict, and a verdict is reused for [`READY_FOR`]. Whatever the number
/// of callers, each probe runs at most once per [`READY_FOR`] (plus its own time).
pub struct Readiness {
    probes: Vec<Box<dyn Probe>>,
    /// When the last verdict was reached, and the probes that failed it (name, error).
    last: tokio::sync::Mutex<Option<(Instant, Failures)>>,
}

impl Readiness {
    pub fn new(probes: Vec<Box<dyn Probe>>) -> Readiness {
        Readiness {
            probes,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The probes that fail (name, error), each given 2 s; empty when ready. The check runs in
    /// a task of its own, so a caller that goes away (its client gave up) does not throw away
    /// a check the callers behind it wait for.
    pub async fn failures(self: &Arc<Self>) -> Failures {
        // A fresh verdict, nobody checking: no task needed.
        if let Ok(last) = self.last.try_lock()
            && let Some((at, failures)) = last.as_ref()
            && at.elapsed() < READY_FOR
        {
            return failures.clone();
        }
        let this = self.clone();
        match tokio::spawn(async move { this.check().await }).await {
            Ok(failures) => failures,
            Err(e) => Arc::new(vec![("readiness".to_owned(), format!("check failed: {e}"))]),
        }
    }

    async fn check(&self) -> Failures {
        let mut last = self.last.lock().await;
        if let Some((at, failures)) = last.as_ref()
            && at.elapsed() < READY_FOR
        {
            return failures.clone();
        }
        let mut failures = Vec::new();
        for probe in &self.probes {
            let outcome = tokio::time::timeout(Duration::from_secs(2), probe.check()).await;
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push((probe.name().to_owned(), e)),
                Err(_) => failures.push((probe.name().to_owned(), "timed out after 2s".into())),
            }
        }
        for (name, e) in &failures {
            tracing::warn!(probe = %name, error = %e, "readiness probe failed");
        }
        let failures = Arc::new(failures);
        *last = Some((Instant::now(), failures.clone()));
        failures
    }
}

/// A PostgreSQL pool is ready when it can run `SELECT 1`.
pub struct PgProbe {
    pub name: String,
    pub pool: deadpool_postgres::Pool,
}

impl Probe for PgProbe {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        })
    }
}

/// What every listener knows about itself.
#[derive(Clone)]
pub struct HttpContext {
    /// `gateway` or `api`: the `role` label of metrics and logs.
    pub role: &'static str,
    /// The shard this listener serves, for the `shard.id` log field.
    pub shard_id: Option<String>,
    pub probes: Arc<Readiness>,
    /// Cancelled when shutdown starts: `/readyz` then answers 503 so balancers stop sending.
    pub shutdown: CancellationToken,
    pub body_limit: usize,
    /// `(path prefix, route label)` for requests a handler serves without a resource pattern,
    /// which actix reports as unmatched: the gateway forwards everything under
    /// `/v1/companies/` from a scope's default service, and its main traffic would otherwise
    /// share the `route` label of real 404s. (A prefix test costs less per request than
    /// marking each one in a middleware of its own.)
    pub prefix_routes: &'static [(&'static str, &'static str)],
}

async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    let ctx = req
        .app_data::<web::Data<HttpContext>>()
        .map(|d| d.get_ref().clone());
    let role = ctx.as_ref().map(|c| c.role).unwrap_or("http");
    let shard = ctx.as_ref().and_then(|c| c.shard_id.clone());
    let request_id = accept_or_generate_request_id(
        req.headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let span = tracing::info_span!(
        "request",
        request.id = %request_id,
        role,
        shard.id = shard.as_deref(),
        company.id = tracing::field::Empty,
        error.code = tracing::field::Empty,
    );

    // Dropped unfinished (the grace period ended), the request still leaves a line under its
    // id: written by whichever comes first, the drop of its handling or the listener's end.
    let unfinished = Unfinished::register(InFlight {
        role,
        span: span.clone(),
        method: crate::text::shorten(req.method().as_str(), LOGGED_METHOD_MAX),
        path: crate::text::shorten(req.path(), LOGGED_PATH_MAX),
        started,
    });
    let res = REQUEST_ID
        .scope(request_id.clone(), next.call(req).instrument(span.clone()))
        .await;
    let Some(InFlight { method, path, .. }) = unfinished.answered() else {
        // The listener's end logged it as abandoned meanwhile; its answer goes nowhere.
        return res.map(ServiceResponse::map_into_boxed_body);
    };
    let mut res = match res {
        Ok(res) => res.map_into_boxed_body(),
        Err(e) => return Err(e),
    };
    if res.status().is_client_error() || res.status().is_server_error() {
        res = REQUEST_ID
            .scope(
                request_id.clone(),
                async { ensure_error_shape(res) }.instrument(span.clone()),
            )
            .await;
    }
    if let Ok(v) = header::HeaderValue::from_str(&request_id) {
        res.headers_mut()
            .insert(header::HeaderName::from_static(REQUEST_ID_HEADER), v);
    }

    let status = res.status().as_u16();
    let route: std::borrow::Cow<'static, str> = match res.request().match_pattern() {
        Some(pattern) => pattern.into(),
        None => ctx
            .as_ref()
            .and_then(|c| c.prefix_routes.iter().find(|(p, _)| path.starts_with(p)))
            .map_or("unmatched", |(_, label)| label)
            .into(),
    };
    let elapsed = started.elapsed();
    metrics::http_observe(role, &route, status, elapsed);
    let _enter = span.enter();
    let duration_ms = elapsed.as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(http.method = %method, http.path = %path, http.status = status, duration_ms, "request");
    } else {
        tracing::info!(http.method = %method, http.path = %path, http.status = status, duration_ms, "request");
    }
    Ok(res)
}

/// The characters of a request's path its log line keeps, and of its method: the HTTP stack
/// takes paths of up to 64 KiB and methods as long as the request head, and a line per request
/// of that size, from any caller, authenticated or not, would let one flood the log. Longer
/// ones end in "…".
pub const LOGGED_PATH_MAX: usize = 512;
pub const LOGGED_METHOD_MAX: usize = 32;

/// A request whose answer is not out yet.
struct InFlight {
    role: &'static str,
    span: tracing::Span,
    method: String,
    path: String,
    started: Instant,
}

impl InFlight {
    fn abandoned(&self) {
        let _enter = self.span.enter();
        tracing::warn!(
            http.method = %self.method,
            http.path = %self.path,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request abandoned before its answer (the server stopped)"
        );
    }
}

/// Every request of this process whose answer is not out yet, by a number of its own, in
/// shards so that listener threads rarely wait for each other.
static IN_FLIGHT: LazyLock<[Mutex<HashMap<u64, InFlight>>; 16]> =
    LazyLock::new(|| std::array::from_fn(|_| Mutex::default()));
static NEXT_REQUEST: AtomicU64 = AtomicU64::new(0);

fn in_flight(n: u64) -> std::sync::MutexGuard<'static, HashMap<u64, InFlight>> {
    IN_FLIGHT[(n % 16) as usize]
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A request's entry in [`IN_FLIGHT`]: removed when the request has its answer; if its handling
/// is dropped first, the entry is logged as abandoned. A forced stop may drop handlers only
/// after the process has begun to exit, so [`log_abandoned`] also logs whatever a stopped
/// listener left behind; the entry goes to whichever takes it first, so the line appears once.
struct Unfinished(u64);

impl Unfinished {
    fn register(entry: InFlight) -> Unfinished {
        let n = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
        in_flight(n).insert(n, entry);
        Unfinished(n)
    }

    /// The request has its answer: its entry back, unless the listener's end took it.
    fn answered(self) -> Option<InFlight> {
        let entry = in_flight(self.0).remove(&self.0);
        std::mem::forget(self);
        entry
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let entry = in_flight(self.0).remove(&self.0);
        if let Some(entry) = entry {
            entry.abandoned();
        }
    }
}

/// Logs the requests of `role` still without an answer: called when its listener has stopped.
fn log_abandoned(role: &str) {
    for shard in IN_FLIGHT.iter() {
        let left: Vec<InFlight> = {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, e)| e.role == role)
                .map(|(n, _)| *n)
                .collect();
            ids.iter().filter_map(|n| map.remove(n)).collect()
        };
        for entry in &left {
            entry.abandoned();
        }
    }
}

/// Turns any error response that is not already in the JSON error shape (framework errors such
/// as 405, malformed JSON or an oversized body) into it, so clients see one shape only.
fn ensure_error_shape(res: ServiceResponse<BoxBody>) -> ServiceResponse<BoxBody> {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let status = res.status();
    let detail = res.response().error().map(|e| e.to_string());
    let err = match status {
        StatusCode::NOT_FOUND => ApiError::not_found("no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            status,
            "method_not_allowed",
            "method not allowed on this resource",
        ),
        // A body read whole (`web::Bytes`) past the listener's limit: actix's own message
        // ("A payload reached size limit.") does not say what the limit is.
        StatusCode::PAYLOAD_TOO_LARGE => match res.request().app_data::<web::Data<HttpContext>>() {
            Some(ctx) => ApiError::payload_too_large(ctx.body_limit),
            None => ApiError::new(
                status,
                "payload_too_large",
                detail.unwrap_or_else(|| "request body is too large".into()),
            ),
        },
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "unsupported_media_type",
            "send the body as application/json",
        ),
        s if s.is_client_error() => ApiError::new(
            s,
            "bad_request",
            detail.unwrap_or_else(|| s.canonical_reason().unwrap_or("bad request").into()),
        ),
        s => {
            let e = ApiError::new(s, "internal", "internal error");
            match detail {
                Some(d) => e.with_source(anyhow::anyhow!(d)),
                None => e,
            }
        }
    };
    let (req, _) = res.into_parts();
    ServiceResponse::new(req, err.error_response())
}

/// A JSON request body: `what` (say "job request") parsed from `body`. A body declared as
/// anything but JSON (`application/json` or a `+json` type; curl's `-d` sends a form type) is
/// refused with `415`, rather than guessed at; one without a Content-Type is read as JSON.
/// Malformed JSON, or JSON of the wrong shape, is `400 invalid_json`.
pub fn json_body<'a, T: serde::Deserialize<'a>>(
    req: &HttpRequest,
    body: &'a [u8],
    what: &str,
) -> Result<T, ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("send the {what} as application/json"),
            ));
        }
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid {what}: {e}")))
}

/// How a listener reads a whole body ([`Body`]): its size limit and the time it may take.
#[derive(Debug, Clone, Copy)]
struct BodyRead {
    limit: usize,
    timeout: Duration,
}

/// A request body read whole, within the listener's body limit (`413 payload_too_large`) and
/// `http.body_timeout` (`408 request_timeout`): a caller that declares a body and trickles or
/// stalls it cannot hold a handler, and its connection, for longer. A body that breaks off or
/// whose chunked encoding is malformed is `400 invalid_body`.
pub struct Body(pub web::Bytes);

impl actix_web::FromRequest for Body {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Body, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let read = req.app_data::<BodyRead>().copied().unwrap_or(BodyRead {
            limit: 1 << 20,
            timeout: Duration::from_secs(10),
        });
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            match tokio::time::timeout(read.timeout, bytes).await {
                Err(_) => Err(ApiError::body_timeout(read.timeout)),
                Ok(Ok(bytes)) => Ok(Body(bytes)),
                Ok(Err(e))
                    if e.as_response_error().status_code() == StatusCode::PAYLOAD_TOO_LARGE =>
                {
                    Err(ApiError::payload_too_large(read.limit))
                }
                Ok(Err(e)) => Err(ApiError::broken_body().with_source(anyhow::anyhow!("{e}"))),
            }
        })
    }
}

/// Extractor settings that turn malformed input into the error shape with a useful message.
fn configure_extractors(cfg: &mut web::ServiceConfig, body_limit: usize, body_timeout: Duration) {
    cfg.app_data(BodyRead {
        limit: body_limit,
        timeout: body_timeout,
    })
    .app_data(
        web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(move |err, _req| {
                use actix_web::error::JsonPayloadError as J;
                let api = match &err {
                    J::Overflow { .. } | J::OverflowKnownLength { .. } => {
                        ApiError::payload_too_large(body_limit)
                    }
                    J::ContentType => ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        "send the body as application/json",
                    ),
                    other => ApiError::bad_request("invalid_json", other.to_string()),
                };
                actix_web::error::InternalError::from_response(err, api.error_response()).into()
            }),
    )
    .app_data(web::PayloadConfig::default().limit(body_limit))
    .app_data(web::PathConfig::default().error_handler(|err, _req| {
        let api = ApiError::bad_request("invalid_path", err.to_string());
        actix_web::error::InternalError::from_response(err, api.error_response()).into()
    }))
    .app_data(web::QueryConfig::default().error_handler(|err, _req| {
        let api = ApiError::bad_request("invalid_query", err.to_string());
        actix_web::error::InternalError::from_response(err, api.error_response()).into()
    }));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "alive"}))
}

async fn readyz(ctx: web::Data<HttpContext>) -> Result<HttpResponse, ApiError> {
    if ctx.shutdown.is_cancelled() {
        return Err(ApiError::unavailable(
            "shutting_down",
            "this instance is draining for shutdown",
            std::time::Duration::from_secs(1),
        ));
    }
    let failures = ctx.probes.failures().await;
    if failures.is_empty() {
        return Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})));
    }
    // Which dependency is down is operational information, not a secret; the errors are logged.
    let names: Vec<_> = failures.iter().map(|(n, _)| n.as_str()).collect();
    Err(ApiError::unavailable(
        "not_ready",
        format!("dependencies not reachable: {}", names.join(", ")),
        std::time::Duration::from_secs(1),
    ))
}

async fn metrics_endpoint() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics::render())
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// A listener that is bound and serving; `task` ends after a graceful stop.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Binds `listen` and serves the role's routes plus `/healthz`, `/readyz` and `/metrics`.
/// When `ctx.shutdown` fires, the listener stops accepting and in-flight requests get `grace`
/// to finish.
pub fn start_server<F>(
    ctx: HttpContext,
    listen: SocketAddr,
    http: &HttpConfig,
    grace: std::time::Duration,
    routes: F,
) -> anyhow::Result<RunningServer>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let data = web::Data::new(ctx.clone());
    let (body_limit, body_timeout) = (ctx.body_limit, http.body_timeout);
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(|c| configure_extractors(c, body_limit, body_timeout))
            .wrap(from_fn(request_context))
            .service(web::resource("/healthz").get(healthz))
            .service(web::resource("/readyz").get(readyz))
            .service(web::resource("/metrics").get(metrics_endpoint))
            .configure(routes.clone())
            .default_service(web::to(not_found))
    })
    .disable_signals()
    .max_connections(http.max_connections)
    .client_request_timeout(http.client_request_timeout)
    // Whole seconds, rounded up: a grace of 300ms must not become 0 and drop every request.
    .shutdown_timeout(grace.as_secs() + u64::from(grace.subsec_nanos() > 0));
    if http.threads > 0 {
        server = server.workers(http.threads);
    }
    let server = server
        .bind(listen)
        .with_context(|| format!("binding the {} listener to {listen}", ctx.role))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("listener has no address")?;
    let running = server.run();
    let handle = running.handle();
    let shutdown = ctx.shutdown.clone();
    let role = ctx.role;
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!(role, "stopping listener; draining in-flight requests");
        handle.stop(true).await;
    });
    let task = tokio::spawn(async move {
        running
            .await
            .with_context(|| format!("{role} listener failed"))?;
        log_abandoned(role);
        tracing::info!(role, "listener stopped");
        Ok(())
    });
    Ok(RunningServer { addr, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_read_or_refused_never_a_panic() {
        assert_eq!(parse_wait("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_wait("0005"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_wait("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_wait("1s 500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_wait("30000000000ns"), Ok(MAX_WAIT));
        assert_eq!(parse_wait("30000000001ns"), Err(BadWait::TooLong));
        assert_eq!(parse_wait("31s"), Err(BadWait::TooLong));
        assert_eq!(parse_wait("forever"), Err(BadWait::NotADuration));
        // humantime panics on the first: u64::MAX seconds and a second carried from the
        // nanoseconds.
        assert_eq!(
            parse_wait("18446744073709551615s1000000000ns"),
            Err(BadWait::NotADuration)
        );
        assert_eq!(
            parse_wait("18446744073709551615s999ms"),
            Err(BadWait::TooLong)
        );
        assert_eq!(parse_wait(&"1s".repeat(17)), Err(BadWait::NotADuration));
    }
}
