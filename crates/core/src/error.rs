//! The one error type of every HTTP role, and the one JSON shape clients see:
//!
//! ```json
//! {"error": {"code": "snake_case_code", "message": "what went wrong", "request_id": "…"}}
//! ```
//!
//! A company creation's 5xx also carries `company_id`, the id the company was being created
//! under (the gateway's choice when the client sent none), to repeat the request with.
//!
//! Layering: handlers and libraries return `ApiError` (or an error that converts into it);
//! the conversion to a response happens once, here. Client errors (4xx) are logged at debug
//! level by the request log line; server errors (5xx) are logged here, with their full cause
//! chain, exactly once — and the client only learns that something failed, and the request id
//! to quote when asking what.

use std::{fmt, time::Duration};

use actix_web::{
    HttpResponse, ResponseError,
    http::{StatusCode, header},
};
use serde::{Deserialize, Serialize};

use crate::http::current_request_id;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub request_id: String,
    /// The company a creation's 5xx concerned (see [`ApiError::with_company`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<uuid::Uuid>,
}

/// An error on its way to becoming an HTTP response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
    /// The cause of a 5xx, logged but never sent.
    source: Option<anyhow::Error>,
    company_id: Option<uuid::Uuid>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            source: None,
            company_id: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 408: the caller did not send its whole body within `limit`.
    pub fn body_timeout(limit: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms",
                limit.as_millis()
            ),
        )
    }

    /// 400: the caller's body broke off or its chunked encoding is malformed; the request is
    /// the caller's to fix or send again.
    pub fn broken_body() -> Self {
        Self::bad_request(
            "invalid_body",
            "the request body broke off or its chunked encoding is malformed",
        )
    }

    /// 429 `rate_limited` with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>, retry: Duration) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).with_retry_after(retry)
    }

    /// 503 with `Retry-After`: a dependency is down or the server is full.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry: Duration) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message).with_retry_after(retry)
    }

    /// A 500: the client sees "internal error"; the cause goes to the log.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        );
        e.source = Some(cause.into());
        e
    }

    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// Keeps a cause for the log of a 5xx other than 500 (e.g. a 503 on a dead database).
    pub fn with_source(mut self, cause: impl Into<anyhow::Error>) -> Self {
        self.source = Some(cause.into());
        self
    }

    /// Names the company in the body: the one a creation was making, whose id a client that
    /// sent none needs to repeat the request rather than create another company.
    pub fn with_company(mut self, id: uuid::Uuid) -> Self {
        self.company_id = Some(id);
        self
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn body(&self, request_id: String) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message.clone(),
                request_id,
                company_id: self.company_id,
            },
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let request_id = current_request_id().unwrap_or_default();
        // On the request's span, so that its log line says why a request was refused, not
        // only with which status (429 `rate_limited` or 401 `unauthorized` alike).
        tracing::Span::current().record("error.code", self.code);
        // A 503 is a refusal the caller is told to retry (a database or shard out of reach, an
        // overload): a warning, with its cause, as a 5xx without one. Under an outage there is
        // one per request, and an error is written out at once (see `telemetry::sink`), which
        // is the last thing an overloaded process should do per request. Anything else with a
        // cause (a 500, a 502) is an error.
        if self.status.is_server_error() {
            // (A `None` cause writes no field.)
            let cause = self.source.as_ref().map(|c| format!("{c:#}"));
            if cause.is_some() && self.status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(
                    error.code = self.code,
                    error.cause = cause.as_deref(),
                    "request failed: {}",
                    self.message
                );
            } else {
                tracing::warn!(
                    error.code = self.code,
                    error.cause = cause.as_deref(),
                    "request failed: {}",
                    self.message
                );
            }
        }
        let mut resp = HttpResponse::build(self.status);
        if let Some(d) = self.retry_after {
            // Retry-After is in whole seconds; never advertise 0, which invites a hot loop.
            resp.insert_header((
                header::RETRY_AFTER,
                d.as_secs_f64().ceil().max(1.0).to_string(),
            ));
        }
        resp.json(self.body(request_id))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::unavailable(
            "database_unavailable",
            "the database is not reachable; try again shortly",
            Duration::from_secs(1),
        )
        .with_source(e)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        // A lost connection, or the database refusing for a passing reason (see
        // [`is_transient`]), means "unavailable, try again": the statement's transaction was
        // rolled back. Anything else (a constraint the code should have checked, a parameter
        // that failed to serialize) is a bug: a 500, logged.
        if is_transient(&e) {
            ApiError::unavailable(
                "database_unavailable",
                "the database could not serve the request just now; try again shortly",
                Duration::from_secs(1),
            )
            .with_source(e)
        } else {
            ApiError::internal(e)
        }
    }
}

/// `e` and its causes on one line, each cause that its predecessors' text does not already
/// show: tokio-postgres's own text is only "db error", the database's message is its cause.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let t = cause.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        next = cause.source();
    }
    text
}

/// Whether `e` is a lost connection or a refusal that the same request can expect to pass on
/// a retry: the SQLSTATE classes 08 (connection exception), 40 (transaction rollback:
/// serialization failure, deadlock), 53 (insufficient resources: too many connections, disk
/// full) and 57P0x (an administrator or a crash shut the server down, or it is starting up),
/// plus 57014 (a statement or lock wait ran into `statement_timeout`), 55P03 (lock not
/// available) and 25006 (a failover left the connection on a read-only standby).
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    connection_lost(e) || e.code().is_some_and(|c| transient_sqlstate(c.code()))
}

/// Whether the connection went away under `e`: a statement sent then may or may not have
/// taken effect.
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

fn transient_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53"))
        || code.starts_with("57P")
        || matches!(code, "57014" | "55P03" | "25006")
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::internal(e)
    }
}

#[cfg(test)]
mod tests {
    use actix_web::body::MessageBody;

    use super::*;

    #[test]
    fn a_chain_shows_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner detail")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("db error")]
        struct Middle(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("bookkeeping failed: {0}")]
        struct Outer(#[source] Middle);
        assert_eq!(
            chain(&Outer(Middle(Inner))),
            "bookkeeping failed: db error: inner detail"
        );
    }

    #[test]
    fn passing_database_refusals_are_transient_and_bugs_are_not() {
        for code in [
            "08006", "08001", "40001", "40P01", "53300", "53100", "57P01", "57P03", "57014",
            "55P03", "25006",
        ] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "23514", "42P01", "22P02", "XX000", "57000", ""] {
            assert!(!transient_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn a_500_reveals_nothing_internal() {
        let e = ApiError::internal(anyhow::anyhow!("password authentication failed for user x"));
        let resp = e.error_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = resp.into_body().try_into_bytes().expect("sized body");
        let body: ErrorBody = serde_json::from_slice(&body).expect("error shape");
        assert_eq!(body.error.code, "internal");
        assert_eq!(body.error.message, "internal error");
    }

    #[test]
    fn a_temporary_refusal_is_a_warning_and_a_failure_an_error() {
        let lines = crate::telemetry::testing::logged(|| {
            ApiError::unavailable("database_unavailable", "retry", Duration::from_secs(1))
                .with_source(anyhow::anyhow!("connection refused"))
                .error_response();
            ApiError::internal(anyhow::anyhow!("a bug")).error_response();
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["error.code"], "database_unavailable");
        assert_eq!(lines[0]["error.cause"], "connection refused");
        assert_eq!(lines[1]["level"], "ERROR");
        assert_eq!(lines[1]["error.cause"], "a bug");
    }

    #[test]
    fn retry_after_is_whole_seconds_and_never_zero() {
        let resp =
            ApiError::unavailable("busy", "busy", Duration::from_millis(10)).error_response();
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let resp =
            ApiError::unavailable("busy", "busy", Duration::from_millis(2100)).error_response();
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "3");
    }
}
