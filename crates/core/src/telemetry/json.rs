//! The JSON log format: one object per line,
//!
//! ```text
//! {"timestamp":"2026-11-23T14:43:29.265948Z","level":"INFO","message":"request",
//!  "http.status":200,…,"target":"tenantry_core::http",
//!  "span":{"request.id":"…","role":"gateway","company.id":"…","name":"request"}}
//! ```
//!
//! the shape tracing-subscriber's JSON formatter prints (event fields flattened, the current
//! span's fields under `span`), written directly into a reused buffer. Unlike it, `span` also
//! holds the fields of the spans around the current one (the innermost value of a name wins),
//! so a line logged in a span of its own inside a request still names the request. tracing-subscriber
//! stores a span's fields as a JSON text and parses it back for every line logged inside the
//! span; here they are kept rendered and copied, which made a request's log line about a
//! third as expensive.

use std::{cell::RefCell, fmt::Write as _, sync::Arc};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

use super::sink::Sink;

/// Writes every enabled event as a JSON line to `sink`; errors are written at once, other
/// lines within the sink's flush interval.
pub struct JsonLayer {
    sink: Arc<Sink>,
}

impl JsonLayer {
    pub fn new(sink: Arc<Sink>) -> Self {
        JsonLayer { sink }
    }
}

/// A span's fields, each rendered as `"name":value`, in the order first recorded.
struct SpanFields(Vec<(&'static str, String)>);

impl SpanFields {
    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| *n == name)
    }

    fn set(&mut self, name: &'static str, value: String) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

struct SpanVisitor<'a>(&'a mut SpanFields);

impl SpanVisitor<'_> {
    fn put(&mut self, field: &Field, render: impl FnOnce(&mut String)) {
        let mut value = String::new();
        render(&mut value);
        self.0.set(field.name(), value);
    }
}

impl Visit for SpanVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |out| string(out, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |out| {
            let _ = write!(out, "{value}");
        });
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |out| {
            let _ = write!(out, "{value}");
        });
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, |out| float(out, value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |out| {
            out.push_str(if value { "true" } else { "false" })
        });
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, |out| debug(out, value));
    }
}

/// Appends an event's fields as `"name":value,` pairs.
struct EventVisitor<'a>(&'a mut String);

impl EventVisitor<'_> {
    fn key(&mut self, field: &Field) -> &mut String {
        string(self.0, field.name());
        self.0.push(':');
        self.0
    }
}

impl Visit for EventVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        string(self.key(field), value);
        self.0.push(',');
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        let _ = write!(self.key(field), "{value},");
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        let _ = write!(self.key(field), "{value},");
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let _ = write!(self.key(field), "{value},");
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let _ = write!(self.key(field), "{value},");
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        float(self.key(field), value);
        self.0.push(',');
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field)
            .push_str(if value { "true," } else { "false," });
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        debug(self.key(field), value);
        self.0.push(',');
    }
}

/// A JSON string literal.
fn string(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f | 0x7f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// A `Debug` value as a JSON string (the message, `%display` and `?debug` fields).
fn debug(out: &mut String, value: &dyn std::fmt::Debug) {
    thread_local! {
        static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut s) => {
            s.clear();
            let _ = write!(s, "{value:?}");
            string(out, &s);
        }
        // A Debug impl that logs while being formatted: use a fresh buffer.
        Err(_) => string(out, &format!("{value:?}")),
    });
}

/// JSON has no NaN or infinity: those are written as `null`.
fn float(out: &mut String, value: f64) {
    if value.is_finite() {
        let _ = write!(out, "{value}");
    } else {
        out.push_str("null");
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for the current time.
pub(super) fn timestamp(out: &mut String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_micros(out, now.as_secs(), now.subsec_micros());
}

fn rfc3339_micros(out: &mut String, secs: u64, micros: u32) {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut fields = SpanFields(Vec::new());
            attrs.record(&mut SpanVisitor(&mut fields));
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<SpanFields>() {
                Some(fields) => values.record(&mut SpanVisitor(fields)),
                None => {
                    let mut fields = SpanFields(Vec::new());
                    values.record(&mut SpanVisitor(&mut fields));
                    ext.insert(fields);
                }
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let write = |line: &mut String| {
            line.clear();
            self.render(line, event, &ctx);
            let level = *event.metadata().level();
            // Only an error is written at once: warnings come one per request under overload
            // (every 503 or 504), when a write per line is what the process can least afford.
            // They follow within FLUSH_INTERVAL.
            self.sink.write_line(line.as_bytes(), level == Level::ERROR);
        };
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                write(&mut line);
                // Keep the buffer, but not one grown by a huge line.
                if line.capacity() > 64 * 1024 {
                    *line = String::new();
                }
            }
            // An event logged while rendering another one (from a Debug impl).
            Err(_) => write(&mut String::new()),
        });
    }
}

impl JsonLayer {
    fn render<S>(&self, line: &mut String, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let meta = event.metadata();
        line.push_str("{\"timestamp\":\"");
        timestamp(line);
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push_str("\",");
        event.record(&mut EventVisitor(line));
        line.push_str("\"target\":");
        string(line, meta.target());
        if let Some(leaf) = ctx.event_span(event) {
            line.push_str(",\"span\":{");
            // The fields of every span the event is in, innermost first: a handler's own span
            // inside a job's span still logs the job's request id. A name an inner span
            // already gave is skipped, so each key appears once and the innermost value wins.
            for (depth, span) in leaf.scope().enumerate() {
                let ext = span.extensions();
                let Some(fields) = ext.get::<SpanFields>() else {
                    continue;
                };
                for (name, value) in &fields.0 {
                    let shadowed = leaf.scope().take(depth).any(|inner| {
                        inner
                            .extensions()
                            .get::<SpanFields>()
                            .is_some_and(|f| f.has(name))
                    });
                    if shadowed || *name == "name" {
                        continue;
                    }
                    string(line, name);
                    line.push(':');
                    line.push_str(value);
                    line.push(',');
                }
            }
            line.push_str("\"name\":");
            string(line, leaf.name());
            line.push('}');
        }
        line.push_str("}\n");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};
    use tracing_subscriber::prelude::*;

    use super::*;
    use crate::telemetry::testing::{SharedWriter, logged};

    #[test]
    fn only_an_error_is_written_at_once() {
        let out = SharedWriter::default();
        let sink = Arc::new(Sink::new(Box::new(out.clone())));
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("an info line");
            tracing::warn!("a warning, one per request under overload");
            assert!(
                out.bytes().is_empty(),
                "info and warnings wait for the flusher"
            );
            tracing::error!("an error");
            let text = String::from_utf8(out.bytes()).unwrap();
            assert_eq!(
                text.lines().count(),
                3,
                "an error writes everything: {text}"
            );
        });
    }

    #[test]
    fn an_event_inside_a_span_carries_the_span_fields_including_ones_recorded_later() {
        let lines = logged(|| {
            let span = tracing::info_span!(
                "request",
                request.id = %"req-1",
                role = "gateway",
                shard.id = Option::<&str>::None,
                company.id = tracing::field::Empty,
            );
            let _in = span.enter();
            tracing::Span::current().record("company.id", "c-1");
            tracing::info!(
                http.status = 200u16,
                duration_ms = 1.5,
                ok = true,
                n = -3i64,
                "request"
            );
        });
        assert_eq!(lines.len(), 1);
        let l = &lines[0];
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["message"], "request");
        assert_eq!(l["http.status"], 200);
        assert_eq!(l["duration_ms"], 1.5);
        assert_eq!(l["ok"], true);
        assert_eq!(l["n"], -3);
        assert_eq!(l["target"], module_path!());
        assert_eq!(
            l["span"],
            json!({"request.id": "req-1", "role": "gateway", "company.id": "c-1", "name": "request"})
        );
        let ts = l["timestamp"].as_str().unwrap();
        let parsed = chrono::DateTime::parse_from_rfc3339(ts).unwrap();
        let age = chrono::Utc::now().signed_duration_since(parsed);
        assert!(age.num_seconds().abs() < 5, "timestamp {ts} is now");
    }

    #[test]
    fn hostile_values_stay_one_valid_json_line() {
        let nasty = "quote\" backslash\\ newline\n tab\t bell\u{7} del\u{7f} é 🦀 }{";
        let lines = logged(|| {
            let span = tracing::info_span!("job", kind = nasty);
            let _in = span.enter();
            tracing::warn!(value = nasty, debug = ?nasty, nan = f64::NAN, "{nasty}");
            tracing::error!(error = %std::io::Error::other(nasty), "failed");
        });
        assert_eq!(
            lines.len(),
            2,
            "a newline in a value does not split the line"
        );
        assert_eq!(lines[0]["value"], nasty);
        assert_eq!(lines[0]["message"], nasty);
        assert_eq!(lines[0]["debug"], format!("{nasty:?}"));
        assert_eq!(lines[0]["nan"], Value::Null);
        assert_eq!(lines[0]["span"]["kind"], nasty);
        assert_eq!(lines[1]["error"], nasty);
        assert_eq!(lines[1]["level"], "ERROR");
    }

    #[test]
    fn an_event_in_a_nested_span_carries_the_outer_spans_fields_each_name_once() {
        let out = SharedWriter::default();
        let sink = Arc::new(Sink::new(Box::new(out.clone())));
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let job = tracing::info_span!("job", request.id = "req-7", job.kind = "outer");
            let _job = job.enter();
            let handler = tracing::info_span!("fetch", job.kind = "inner", url = "u", name = "n");
            let _handler = handler.enter();
            tracing::info!("fetched");
        });
        sink.flush();
        let text = String::from_utf8(out.bytes()).unwrap();
        assert_eq!(text.matches("\"job.kind\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"name\"").count(), 1, "{text}");
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(
            line["span"],
            json!({"request.id": "req-7", "job.kind": "inner", "url": "u", "name": "fetch"})
        );
    }

    #[test]
    fn an_event_outside_any_span_has_no_span_object() {
        let lines = logged(|| tracing::info!("plain"));
        assert_eq!(lines[0]["message"], "plain");
        assert!(lines[0].get("span").is_none());
    }

    #[test]
    fn timestamps_match_chrono_across_the_calendar() {
        for secs in [
            0u64,
            59,
            86_399,
            951_782_400,   // 2000-02-29
            1_709_251_199, // 2024-02-29 23:59:59
            1_795_444_978,
            4_102_444_800, // 2100-01-01
            253_402_300_799,
        ] {
            let mut ours = String::new();
            rfc3339_micros(&mut ours, secs, 123_456);
            let theirs = chrono::DateTime::from_timestamp(secs as i64, 123_456_000)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(ours, theirs, "{secs}");
        }
    }
}
