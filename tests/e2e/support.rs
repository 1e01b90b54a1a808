//! Running the binary from tests.

/// Reads a response body as the JSON error shape, or fails showing what came instead.
#[macro_export]
macro_rules! error_of {
    ($resp:ident) => {{
        let body = $resp.body().await.expect("body");
        serde_json::from_slice::<tenantry_core::error::ErrorBody>(&body).unwrap_or_else(|e| {
            panic!(
                "not the error shape ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })
    }};
}

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

pub const SECRET: &str = "e2e-test-secret-0123456789abcdef0123456789";

/// `tenantry` with a clean environment: no inherited `TENANTRY_*`, JSON logs.
pub fn tenantry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantry"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TENANTRY_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("TENANTRY_LOG__FORMAT", "json");
    cmd
}

/// Runs to completion and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run tenantry");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// A `tenantry serve` child process; killed when dropped.
pub struct Served {
    pub child: Child,
    pub addrs: Vec<(String, String)>,
    pub logs: mpsc::Receiver<String>,
}

impl Served {
    /// Starts `tenantry serve` and waits until `listeners` listeners have logged their address.
    pub fn start(cmd: &mut Command, listeners: usize) -> Served {
        Served::start_until(cmd, listeners, None)
    }

    /// Like [`Served::start`], and also waits for a log line containing `marker`.
    pub fn start_until(cmd: &mut Command, listeners: usize, marker: Option<&str>) -> Served {
        let mut child = cmd
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tenantry serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addrs = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        let mut marked = marker.is_none();
        while addrs.len() < listeners || !marked {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => l,
                Err(_) => {
                    // Not yet a `Served`, so nothing else would stop it.
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "tenantry serve did not start; its log:\n{}",
                        seen.join("\n")
                    )
                }
            };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let (Some(role), Some(listen)) = (v["role"].as_str(), v["listen"].as_str())
            {
                addrs.push((role.to_owned(), format!("http://{listen}")));
            }
            if marker.is_some_and(|m| line.contains(m)) {
                marked = true;
            }
            seen.push(line);
        }
        Served {
            child,
            addrs,
            logs: rx,
        }
    }

    pub fn url(&self, role: &str) -> String {
        self.addrs
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, u)| u.clone())
            .expect("role listening")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit and returns its code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything logged so far.
    pub fn drain_logs(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// Everything logged until the process closed its stderr (after it exited), waiting at most
    /// `limit` for the last lines to be read.
    pub fn logs_to_end(&self, limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.logs.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        lines
    }

    /// Stops the process (SIGTERM, exit 0 expected) and returns its JSON log lines.
    pub fn stop_and_read_logs(&mut self) -> Vec<serde_json::Value> {
        self.signal("TERM");
        assert_eq!(self.wait_exit(Duration::from_secs(10)), Some(0));
        self.logs_to_end(Duration::from_secs(5))
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// How many log lines have a message that starts with `message`.
pub fn log_count(lines: &[serde_json::Value], message: &str) -> usize {
    lines
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .count()
}

/// The first log line whose message starts with `message`, or a failure showing them all.
pub fn log_line<'a>(lines: &'a [serde_json::Value], message: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .unwrap_or_else(|| {
            let all: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
            panic!("no line {message:?} in:\n{}", all.join("\n"))
        })
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JWT minted by the binary itself.
pub fn token(args: &[&str]) -> String {
    let (code, out, err) = run(tenantry()
        .env("TENANTRY_AUTH__JWT_SECRET", SECRET)
        .args(["admin", "token"])
        .args(args));
    assert_eq!(code, 0, "{err}");
    out.trim().to_owned()
}

/// An HTTP client for tests (awc needs an actix system: use `#[actix_web::test]`).
/// How many messages wait in `queue` (ready, not yet delivered to a consumer).
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

pub fn http() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
}

/// A shard node: `api` and/or `threads` job slots on `shard_url`, the built-in kinds enabled,
/// the event relay off (tests that want it turn it on with their own exchange).
pub fn shard_node(shard_url: &str, api: bool, threads: usize) -> Command {
    let mut cmd = tenantry();
    cmd.env("TENANTRY_AUTH__JWT_SECRET", SECRET)
        .env("TENANTRY_SHARD__ID", "shard-1")
        .env("TENANTRY_SHARD__URL", shard_url)
        .env("TENANTRY_API__ENABLED", api.to_string())
        .env("TENANTRY_API__LISTEN", "127.0.0.1:0")
        .env("TENANTRY_WORKER__THREADS", threads.to_string())
        .env("TENANTRY_QUEUE__BUILTIN_KINDS", "[\"echo\", \"sleep\"]")
        .env("TENANTRY_QUEUE__POLL_INTERVAL", "200ms")
        .env("TENANTRY_RABBITMQ__RELAY_EVENTS", "false")
        .env("TENANTRY_HTTP__THREADS", "1")
        .env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "3s");
    cmd
}

/// Starts a worker-only shard node and waits until its worker runs.
pub fn start_worker(cmd: &mut Command) -> Served {
    Served::start_until(cmd, 0, Some("worker started"))
}

/// Records `company` as owned by the shard database at `url` (what company creation does).
pub async fn own(db: &tenantry_testkit::TestDb, company: uuid::Uuid, state: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO placements (company_id, state) VALUES ($1, $2)
             ON CONFLICT (company_id) DO UPDATE SET state = excluded.state",
            &[&company, &state],
        )
        .await
        .unwrap();
}

/// Polls `done` every 5 ms until it holds; panics with `what()` if `limit` passes first.
pub async fn until(limit: Duration, what: impl FnOnce() -> String, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `sql` (one bigint) until it returns `want` or `limit` passes; returns the last value.
pub async fn until_count(
    db: &tenantry_testkit::TestDb,
    sql: &str,
    want: i64,
    limit: Duration,
) -> i64 {
    let c = db.client().await;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let n: i64 = c.query_one(sql, &[]).await.unwrap().get(0);
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until job `id` is in `state`, at most `limit`; whether it got there.
pub async fn until_state(
    db: &tenantry_testkit::TestDb,
    id: uuid::Uuid,
    state: &str,
    limit: Duration,
) -> bool {
    let sql = format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND state = '{state}'");
    until_count(db, &sql, 1, limit).await == 1
}

/// The job body clients rely on: exactly these fields, each present (null when unset), so
/// neither a missing one nor an internal column (params, user context, worker) goes unnoticed.
pub fn assert_job_shape(body: &serde_json::Value) {
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {body}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attempts",
            "created_at",
            "error",
            "finished_at",
            "id",
            "kind",
            "result",
            "started_at",
            "state"
        ],
        "{body}"
    );
}

/// Posts a `sleep` job of `ms` to `base` (a shard API or a gateway) for `company`, which must
/// outlast `api.sync_wait`: checks the `202`, its `Location` naming the job and the job still
/// `waiting`/`processing`, then long-polls that location with `?wait=` and checks the job
/// finished, the poll woken by its completion before `wait` ran out. Returns the finished job.
pub async fn slow_job_202_then_done(
    base: &str,
    company: uuid::Uuid,
    auth: &str,
    ms: u64,
    wait: &str,
) -> tenantry_queue::JobView {
    use tenantry_queue::{JobState, JobView};
    let mut r = http()
        .post(format!("{base}/v1/companies/{company}/jobs"))
        .bearer_auth(auth)
        .send_json(&serde_json::json!({"kind": "sleep", "params": {"ms": ms}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r
        .headers()
        .get("location")
        .expect("a 202 says where the job is")
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_job_shape(&body);
    assert!(body["finished_at"].is_null() && body["result"].is_null() && body["error"].is_null());
    let j: JobView = serde_json::from_value(body).unwrap();
    assert!(matches!(j.state, JobState::Waiting | JobState::Processing));
    assert_eq!(location, format!("/v1/companies/{company}/jobs/{}", j.id));
    let polled = std::time::Instant::now();
    let mut r = http()
        .get(format!("{base}{location}?wait={wait}"))
        .bearer_auth(auth)
        .timeout(Duration::from_secs(40))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The job outlasted the POST's wait, so only the long poll asked to hear of it.
    assert!(
        polled.elapsed() < tenantry_core::http::parse_wait(wait).unwrap(),
        "the long poll was woken by the job's completion, not ended by its timeout"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_job_shape(&body);
    assert!(body["error"].is_null());
    let done: JobView = serde_json::from_value(body).unwrap();
    assert_eq!(done.state, JobState::Done);
    assert!(done.finished_at.is_some() && done.started_at.is_some());
    done
}

/// A counter from `/metrics` (0 when absent).
pub async fn metric(base: &str, series: &str) -> f64 {
    let mut r = http().get(format!("{base}/metrics")).send().await.unwrap();
    let body = r.body().limit(4 << 20).await.unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub async fn until_metric(base: &str, series: &str, at_least: f64, limit: Duration) -> f64 {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let v = metric(base, series).await;
        if v >= at_least || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The built-in configuration in development mode, as the tests' processes start from.
pub fn dev_config() -> tenantry_core::Config {
    use tenantry_core::{Config, config::Mode};
    Config::from_figment(tenantry_core::config::figment(None), Mode::Dev).unwrap()
}

/// Writes `request` (a head and part of its body) to `addr`, sends nothing more, and returns
/// what the server wrote back before it closed the connection (or 5 s passed).
pub fn send_and_stall(addr: &str, request: Vec<u8>) -> String {
    let addr = addr.to_owned();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&request).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .join()
    .unwrap()
}
