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
    /// Starts `tenantry serve` and waits until `roles` listeners have logged their address.
    pub fn start(cmd: &mut Command, listeners: usize) -> Served {
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
        let mut seen = Vec::new();
        while addrs.len() < listeners {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => l,
                Err(_) => panic!(
                    "tenantry serve did not start; its log:\n{}",
                    seen.join("\n")
                ),
            };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let (Some(role), Some(listen)) = (v["role"].as_str(), v["listen"].as_str())
            {
                addrs.push((role.to_owned(), format!("http://{listen}")));
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
pub fn http() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
}
