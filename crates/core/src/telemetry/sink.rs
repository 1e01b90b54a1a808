//! Where JSON log lines go: a buffer in memory, written out in one `write` at a time by a
//! thread of its own.
//!
//! A line written straight to stderr costs a system call per line, which was about a twentieth
//! of the gateway's CPU per request. Here lines are gathered and written by the flush thread
//! every [`FLUSH_INTERVAL`], as soon as [`BUFFER_LIMIT`] bytes are waiting, at once for an
//! error, by [`Sink::flush`] when the process panics and by [`Sink::finish`] when it ends.
//! So an info or warning line
//! reaches the log at most [`FLUSH_INTERVAL`] late.
//!
//! Logging never waits for stderr's reader: a log shipper or container runtime that stops
//! reading for a while fills the pipe, and the flush thread's write then blocks, but the
//! threads that log (request handlers, the job workers' lease renewals) only append to the
//! buffer. Up to [`MAX_WAITING`] bytes wait meanwhile; lines past that are dropped and
//! counted, and the count is logged once the writes go through again. (Before the flush
//! thread runs, if it cannot be started, and once the process is ending ([`Sink::finish`]),
//! lines are written by the thread that logs them, as stderr itself would be; so are the
//! last lines at a panic or a second signal.)

use std::{
    io::Write,
    sync::{
        Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// The longest an info or debug line waits in memory.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Waiting bytes that trigger a write without waiting for the interval.
pub const BUFFER_LIMIT: usize = 64 * 1024;
/// Bytes of lines that may wait while a write is stuck; lines past them are dropped.
pub const MAX_WAITING: usize = 4 * 1024 * 1024;

pub struct Sink {
    waiting: Mutex<Waiting>,
    /// Taken before `waiting` by whoever writes, and held through the write, so batches go
    /// out in the order they were taken.
    out: Mutex<Out>,
    /// Wakes the flush thread when a write is due.
    due: Condvar,
    /// The flush thread runs: loggers only append.
    background: AtomicBool,
    /// The process is ending ([`Sink::finish`]): every line is written as it comes, since
    /// the flush thread may not get to it before the process exits.
    finished: AtomicBool,
}

struct Waiting {
    buf: Vec<u8>,
    /// Lines dropped since the last write, the buffer being full.
    dropped: u64,
    /// A write is due now (an error line, or `BUFFER_LIMIT` reached).
    due: bool,
}

struct Out {
    w: Box<dyn Write + Send>,
    /// The buffer being written; swapped with the waiting one.
    batch: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while holding the lock left at worst a partly copied line.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Sink {
            waiting: Mutex::new(Waiting {
                buf: Vec::with_capacity(BUFFER_LIMIT + 4096),
                dropped: 0,
                due: false,
            }),
            out: Mutex::new(Out {
                w: out,
                batch: Vec::with_capacity(BUFFER_LIMIT + 4096),
            }),
            due: Condvar::new(),
            background: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        }
    }

    /// Appends one complete line; `urgent` has it (and everything before it) written right
    /// away.
    pub fn write_line(&self, line: &[u8], urgent: bool) {
        let mut waiting = lock(&self.waiting);
        if waiting.buf.len() + line.len() > MAX_WAITING {
            waiting.dropped += 1;
            return;
        }
        waiting.buf.extend_from_slice(line);
        let finished = self.finished.load(Ordering::Acquire);
        if !urgent && !finished && waiting.buf.len() < BUFFER_LIMIT {
            return;
        }
        let wake = !std::mem::replace(&mut waiting.due, true);
        drop(waiting);
        if self.background.load(Ordering::Acquire) && !finished {
            // Once per due write: the flush thread checks `due` before it waits, so a wake-up
            // is not lost, and a stuck write does not cost a system call per line.
            if wake {
                self.due.notify_one();
            }
        } else {
            self.flush();
        }
    }

    /// Writes out everything waiting, and from then on every line as it comes: for the end of
    /// the process, when whatever is still logged (a late request's error, say) would
    /// otherwise wait for a flush thread that may not run again.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        self.flush();
    }

    /// Writes out everything waiting (waiting for a write under way to end first).
    pub fn flush(&self) {
        let mut out = lock(&self.out);
        let out = &mut *out;
        let dropped = {
            let mut waiting = lock(&self.waiting);
            waiting.due = false;
            std::mem::swap(&mut waiting.buf, &mut out.batch);
            std::mem::take(&mut waiting.dropped)
        };
        if out.batch.is_empty() && dropped == 0 {
            return;
        }
        // A log that cannot be written has nowhere to report that: the lines are dropped.
        let _ = out.w.write_all(&out.batch);
        if dropped > 0 {
            let _ = out.w.write_all(dropped_notice(dropped).as_bytes());
        }
        let _ = out.w.flush();
        out.batch.clear();
        // A stuck write's backlog is not kept as capacity for good.
        if out.batch.capacity() > 4 * BUFFER_LIMIT {
            out.batch = Vec::with_capacity(BUFFER_LIMIT + 4096);
        }
    }

    /// Starts the thread that writes waiting lines every [`FLUSH_INTERVAL`], and whenever a
    /// write is due.
    pub fn start_flusher(&'static self) {
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    {
                        let waiting = lock(&self.waiting);
                        if !waiting.due {
                            // Woken early (a write due, or spuriously) or not: a write either way.
                            drop(
                                self.due
                                    .wait_timeout(waiting, FLUSH_INTERVAL)
                                    .unwrap_or_else(|p| p.into_inner()),
                            );
                        }
                    }
                    self.flush();
                }
            });
        match spawned {
            Ok(_) => self.background.store(true, Ordering::Release),
            // Without the thread, lines still go out at BUFFER_LIMIT and at exit; say so.
            Err(_) => self.write_line(
                b"{\"level\":\"WARN\",\"message\":\"cannot start the log flush thread; info lines are written in 64 KiB batches\"}\n",
                true,
            ),
        }
    }
}

/// The line that says how many lines were dropped.
fn dropped_notice(dropped: u64) -> String {
    let mut line = String::from("{\"timestamp\":\"");
    super::json::timestamp(&mut line);
    line.push_str(&format!(
        "\",\"level\":\"WARN\",\"message\":\"log lines dropped: stderr was not read fast enough\",\"lines_dropped\":{dropped}}}\n"
    ));
    line
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

    /// A writer that blocks until opened, as a pipe nobody reads does; says when a write began.
    #[derive(Clone)]
    struct Gate {
        state: std::sync::Arc<(Mutex<(bool, bool)>, Condvar)>,
        out: SharedWriter,
    }

    impl Gate {
        fn until_writing(&self) {
            let (m, cv) = &*self.state;
            let (g, waited) = cv
                .wait_timeout_while(lock(m), Duration::from_secs(30), |g| !g.1)
                .unwrap_or_else(|p| p.into_inner());
            assert!(!waited.timed_out() && g.1, "the flush thread never wrote");
        }

        fn open(&self) {
            let (m, cv) = &*self.state;
            lock(m).0 = true;
            cv.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            // Bounded, so that a sink writing from the logging thread itself fails the test
            // (its line missing) rather than hanging it.
            let (m, cv) = &*self.state;
            let mut g = lock(m);
            g.1 = true;
            cv.notify_all();
            let (g, waited) = cv
                .wait_timeout_while(g, Duration::from_secs(30), |g| !g.0)
                .unwrap_or_else(|p| p.into_inner());
            if waited.timed_out() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            drop(g);
            self.out.write(b)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_reader_holds_up_no_logger_and_the_lines_past_the_bound_are_counted() {
        let out = SharedWriter::default();
        let gate = Gate {
            state: Default::default(),
            out: out.clone(),
        };
        let sink: &'static Sink = Box::leak(Box::new(Sink::new(Box::new(gate.clone()))));
        sink.start_flusher();
        sink.write_line(b"first\n", true);
        gate.until_writing();
        // The flush thread is stuck writing "first". Logging goes on without waiting for it.
        let line = [&[b'x'; 1023][..], b"\n"].concat();
        let fits = MAX_WAITING / line.len();
        let (done, logged) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..fits + 100 {
                sink.write_line(&line, false);
            }
            sink.write_line(b"an error\n", true);
            let _ = done.send(());
        });
        logged
            .recv_timeout(Duration::from_secs(30))
            .expect("logging waited for the stuck writer");
        gate.open();
        sink.flush();
        let text = String::from_utf8(out.bytes()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "first");
        assert_eq!(
            lines.len(),
            1 + fits + 1,
            "the lines that fit, then the count"
        );
        assert!(lines[1..=fits].iter().all(|l| l.len() == 1023));
        let notice: serde_json::Value = serde_json::from_str(lines[fits + 1]).unwrap();
        assert_eq!(notice["level"], "WARN");
        assert_eq!(notice["lines_dropped"], 101, "100 lines and the error");
        assert!(notice["timestamp"].is_string());
    }

    #[test]
    fn after_finish_every_line_is_written_as_it_comes() {
        let out = SharedWriter::default();
        let sink: &'static Sink = Box::leak(Box::new(Sink::new(Box::new(out.clone()))));
        sink.start_flusher();
        sink.write_line(b"a\n", false);
        sink.finish();
        assert_eq!(&out.bytes()[..], b"a\n");
        sink.write_line(b"late\n", false);
        assert_eq!(
            &out.bytes()[..],
            b"a\nlate\n",
            "written by the logging thread itself"
        );
    }
}
