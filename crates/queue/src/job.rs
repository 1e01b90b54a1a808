//! Job types: the wire shapes clients and operators see, and what a handler receives.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A job's lifecycle: `waiting` → `processing` → `done` | `error` → `error_resolved`.
/// `error` is the dead-letter state: an operator retries (back to `waiting`) or resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Waiting,
    Processing,
    Done,
    Error,
    ErrorResolved,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Processing => "processing",
            JobState::Done => "done",
            JobState::Error => "error",
            JobState::ErrorResolved => "error_resolved",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "waiting" => JobState::Waiting,
            "processing" => JobState::Processing,
            "done" => JobState::Done,
            "error" => JobState::Error,
            "error_resolved" => JobState::ErrorResolved,
            _ => return None,
        })
    }

    /// Finished: nothing more will happen without an operator.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Error | JobState::ErrorResolved
        )
    }
}

/// The job body of the HTTP API (`POST`/`GET …/jobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: Uuid,
    pub kind: String,
    pub state: JobState,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Everything about a job, for operators (`tenantry admin jobs show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    #[serde(flatten)]
    pub view: JobView,
    pub request_id: String,
    pub company_id: Uuid,
    pub user_context: Value,
    pub params: Value,
    pub worker_id: Option<String>,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    pub resolution_note: Option<String>,
    /// Attempts made before an operator last sent the job back with `jobs retry` (0 if never):
    /// `attempts` counts on across retries.
    pub retried_after: i32,
}

/// The `job.finished` event published on exchange `tenantry.events` with routing key
/// `company.<company_id>`, so a frontend that got 202 can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinishedEvent {
    /// Always `job.finished`.
    #[serde(rename = "type")]
    pub kind_of_event: String,
    pub company_id: Uuid,
    pub job_id: Uuid,
    pub job_kind: String,
    pub state: JobState,
    pub request_id: String,
    pub finished_at: DateTime<Utc>,
}

/// Exchange that job events are published to.
pub const EVENTS_EXCHANGE: &str = "tenantry.events";

/// Routing key of a company's events.
pub fn routing_key(company_id: Uuid) -> String {
    format!("company.{company_id}")
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub company_id: Uuid,
    pub request_id: String,
    pub user_context: Value,
    pub kind: String,
    pub params: Value,
    pub idempotency_key: Option<String>,
    pub max_attempts: i32,
    /// How long the enqueuing caller waits for the result right after its commit (the API's
    /// synchronous wait); zero when nobody does. A completion is announced to waiting requests
    /// only while one may still wait (see [`crate::store::await_job`]).
    pub awaited_for: std::time::Duration,
}

/// A claimed job, as its handler sees it. `attempt` is also the lease token: completion only
/// counts while the row still carries this worker and this attempt.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: Uuid,
    pub request_id: String,
    pub company_id: Uuid,
    pub user_context: Value,
    pub kind: String,
    pub params: Value,
    pub attempt: i32,
    pub max_attempts: i32,
    /// Attempts made before an operator last sent the job back (`jobs retry`): `attempt`
    /// counts on across such retries, and the retry backoff starts again after one.
    pub retried_after: i32,
    pub created_at: DateTime<Utc>,
    /// When this attempt became claimable: the enqueue, the end of a retry's backoff, or the
    /// moment an operator's retry, the rescuer or a stopping worker put it back.
    pub ready_at: DateTime<Utc>,
}

/// The length of `value` as compact JSON (what `to_string()` would produce), counted without
/// building the string: for the size limits on params and results.
pub fn json_len(value: &Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and a `Value` always serializes.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The length of the JSON text `text` without the whitespace between its tokens, counted
/// without parsing it: for a size limit applied to the text as sent. Escapes count as written
/// (`"\u0041"` is 8 bytes here, 3 once parsed). It is not a bound on the [`json_len`] of its
/// value: a number may be written back longer than it was sent (`1e2` as `100.0`).
pub fn json_text_len(text: &str) -> u64 {
    let (mut len, mut in_string, mut escaped) = (0u64, false, false);
    for b in text.bytes() {
        if in_string {
            len += 1;
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            len += 1;
            in_string = b == b'"';
        }
    }
    len
}

/// Whether `value` holds the character U+0000 in a string or an object key. PostgreSQL's
/// `jsonb` and `text` cannot store it, so such a value must be refused (or replaced) before it
/// reaches the database.
pub fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(fields) => fields
            .iter()
            .any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// A handler's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub message: String,
    /// Permanent errors skip the remaining attempts.
    pub permanent: bool,
}

impl JobError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_is_the_length_of_the_compact_json() {
        for v in [
            serde_json::json!({}),
            serde_json::json!({"a": [1, 2.5, "é\n\"x\""], "b": null, "c": {"d": true}}),
            serde_json::json!({"big": "x".repeat(70_000)}),
        ] {
            assert_eq!(json_len(&v), v.to_string().len() as u64);
        }
    }

    #[test]
    fn json_text_len_leaves_out_whitespace_between_tokens_only() {
        for (text, len) in [
            ("{}", 2),
            (" { \"a\" :\t[ 1 ,\r\n2 ] } ", 11),
            // Whitespace inside a string counts, and so does an escaped quote.
            (r#"{"a b":"c \" d\\"}"#, 18),
            (r#"{"\u0041":"x"}"#, 14),
        ] {
            assert_eq!(json_text_len(text), len, "{text}");
        }
        let v = serde_json::json!({"a": [1, 2.5, "é\n\"x\""], "b": null, "c": {"d": true}});
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        assert_eq!(json_text_len(&pretty), json_len(&v));
    }
}
