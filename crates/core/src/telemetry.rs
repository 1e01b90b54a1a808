//! Logging: JSON lines in production, readable text on a terminal. Span fields (`request.id`,
//! `company.id`, `shard.id`) ride along on every line logged inside a request or a job.
//!
//! JSON lines are buffered (see [`sink`]): an info or warning line reaches stderr within
//! 100 ms, an error at once; [`flush`] writes what is waiting (at a panic), and [`finish`]
//! does so when the process ends and has every later line written as it comes.

mod json;
mod sink;

use std::{
    io::IsTerminal,
    sync::{Arc, OnceLock},
};

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub use sink::{BUFFER_LIMIT, FLUSH_INTERVAL};

use crate::config::{LogConfig, LogFormat};

/// The buffered stderr of the JSON format, once installed.
static SINK: OnceLock<Arc<sink::Sink>> = OnceLock::new();

/// Installs the global subscriber. A second call (tests) is a no-op.
pub fn init(cfg: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&cfg.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        let sink = SINK.get_or_init(|| Arc::new(sink::Sink::new(Box::new(std::io::stderr()))));
        if registry
            .with(json::JsonLayer::new(sink.clone()))
            .try_init()
            .is_ok()
        {
            flush_on_panic();
            sink.start_flusher();
        }
    } else {
        // Already installed (several roles in one test process): keep the first.
        let _ = registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init();
    }
}

/// Writes out buffered log lines.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush();
    }
}

/// Writes out buffered log lines, and from then on every line as it is logged: call when the
/// process is about to exit (tasks and threads still running may log after it).
pub fn finish() {
    if let Some(sink) = SINK.get() {
        sink.finish();
    }
}

/// A panic's own message goes straight to stderr: write the lines logged before it first.
fn flush_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::prelude::*;

    use super::{json::JsonLayer, sink::Sink};

    /// Runs `f` with the JSON layer as the thread's subscriber; returns the parsed lines.
    pub(crate) fn logged(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = SharedWriter::default();
        let sink = Arc::new(Sink::new(Box::new(out.clone())));
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(sink.clone()));
        tracing::subscriber::with_default(subscriber, f);
        sink.flush();
        let text = String::from_utf8(out.bytes()).expect("JSON lines are UTF-8");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// A writer whose bytes tests can read back.
    #[derive(Clone, Default)]
    pub(crate) struct SharedWriter(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl SharedWriter {
        pub(crate) fn bytes(&self) -> Vec<u8> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    impl std::io::Write for SharedWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
