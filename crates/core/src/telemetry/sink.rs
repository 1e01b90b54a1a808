//! Where JSON log lines go: a buffer in memory, written out in one `write` at a time.
//!
//! A line written straight to stderr costs a system call per line, which was about a twentieth
//! of the gateway's CPU per request. Here lines are gathered and written when
//! [`BUFFER_LIMIT`] bytes are waiting, every [`FLUSH_INTERVAL`] (a background thread), at
//! once for an error, and by [`Sink::flush`] when the process ends or panics. So an info or
//! warning line reaches the log at most [`FLUSH_INTERVAL`] late, and memory stays bounded: a
//! writer that blocks (a full pipe) blocks logging, as stderr itself would.

use std::{
    io::Write,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

/// The longest an info or debug line waits in memory.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Waiting bytes that trigger a write without waiting for the interval.
pub const BUFFER_LIMIT: usize = 64 * 1024;

pub struct Sink {
    state: Mutex<State>,
}

struct State {
    buf: Vec<u8>,
    out: Box<dyn Write + Send>,
}

impl State {
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        // A log that cannot be written has nowhere to report that: the lines are dropped.
        let _ = self.out.write_all(&self.buf);
        let _ = self.out.flush();
        self.buf.clear();
    }
}

impl Sink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Sink {
            state: Mutex::new(State {
                buf: Vec::with_capacity(BUFFER_LIMIT + 4096),
                out,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left at worst a partly copied line.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one complete line; `urgent` writes it (and everything before it) right away.
    pub fn write_line(&self, line: &[u8], urgent: bool) {
        let mut state = self.state();
        state.buf.extend_from_slice(line);
        if urgent || state.buf.len() >= BUFFER_LIMIT {
            state.flush();
        }
    }

    /// Writes out everything waiting.
    pub fn flush(&self) {
        self.state().flush();
    }

    /// Starts the thread that writes waiting lines every [`FLUSH_INTERVAL`].
    pub fn start_flusher(&'static self) {
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_INTERVAL);
                    self.flush();
                }
            });
        if spawned.is_err() {
            // Without the thread, lines still go out at BUFFER_LIMIT and at exit; say so.
            self.write_line(
                b"{\"level\":\"WARN\",\"message\":\"cannot start the log flush thread; info lines are written in 64 KiB batches\"}\n",
                true,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::SharedWriter;

    #[test]
    fn lines_wait_until_flushed_unless_urgent_or_the_buffer_is_full() {
        let out = SharedWriter::default();
        let sink = Sink::new(Box::new(out.clone()));
        sink.write_line(b"a\n", false);
        assert!(out.bytes().is_empty(), "an info line waits");
        sink.write_line(b"b\n", true);
        assert_eq!(
            &out.bytes()[..],
            b"a\nb\n",
            "an urgent line writes all, in order"
        );

        let line = vec![b'x'; 1000];
        for _ in 0..(BUFFER_LIMIT / 1000) {
            sink.write_line(&line, false);
        }
        assert_eq!(
            out.bytes().len(),
            4,
            "below the limit nothing more is written"
        );
        sink.write_line(&line, false);
        assert_eq!(
            out.bytes().len(),
            4 + 1000 * (BUFFER_LIMIT / 1000 + 1),
            "reaching the limit writes everything"
        );
        sink.write_line(b"c\n", false);
        sink.flush();
        assert!(out.bytes().ends_with(b"c\n"));
    }
}
