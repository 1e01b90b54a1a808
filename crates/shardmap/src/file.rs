//! The shard map as code: `shard-map/<environment>.toml`.

use std::{collections::BTreeSet, io::Read, path::Path};

use serde::{Deserialize, Serialize};
use tenantry_core::{config::validate_shard_id, secret::DatabaseUrl, text::shorten};

/// Largest shard-map file accepted; a real one is a few KiB.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// API endpoints a shard may list.
pub const MAX_ENDPOINTS: usize = 100;
/// Most shards one file may declare.
pub const MAX_SHARDS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMapFile {
    /// Name of the environment, e.g. `local`, `staging`, `prod`.
    pub environment: String,
    #[serde(default, rename = "shard")]
    pub shards: Vec<ShardSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    Active,
    Draining,
    Retired,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Active => "active",
            ShardState::Draining => "draining",
            ShardState::Retired => "retired",
        }
    }
}

fn yes() -> bool {
    true
}
fn default_weight() -> i32 {
    100
}
fn active() -> ShardState {
    ShardState::Active
}

/// One `[[shard]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSpec {
    pub id: String,
    pub database_url: DatabaseUrl,
    pub endpoints: Vec<String>,
    #[serde(default = "yes")]
    pub accepting: bool,
    #[serde(default = "default_weight")]
    pub weight: i32,
    #[serde(default = "active")]
    pub state: ShardState,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    // `cause`, not `source`: the message already ends with it, and an error chain printed
    // in full (`{:#}`) would repeat it.
    #[error("cannot read shard map {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("shard map {path} is over the limit of {MAX_FILE_BYTES} bytes (at least {size})")]
    TooLarge { path: String, size: u64 },
    #[error("shard map {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("shard map {path} is not valid:\n  - {}", .problems.join("\n  - "))]
    Invalid { path: String, problems: Vec<String> },
}

/// The host and port of an endpoint (what follows `http://`, up to its path): a host, and a
/// port that is a number when given. No user info: it would be sent to no one.
fn check_authority(rest: &str) -> Result<(), &'static str> {
    // (A query or fragment is refused before this.)
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err("user info is not allowed");
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, tail)) => match tail.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err("an IPv6 host's ']' must be followed by ':port' or nothing"),
            },
            None => return Err("an IPv6 host is missing its ']'"),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("it names no host");
    }
    if host.contains([']', '[']) {
        return Err("its host is not a name or an address");
    }
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err("its port is not a number from 0 to 65535");
    }
    Ok(())
}

impl ShardMapFile {
    pub fn load(path: &Path) -> Result<ShardMapFile, FileError> {
        // As typed on the command line: shown cut short, its control characters escaped, so a
        // pasted path neither floods nor drives the operator's terminal.
        let p = tenantry_core::text::escape_controls(&tenantry_core::text::shorten(
            &path.display().to_string(),
            200,
        ));
        let meta = std::fs::metadata(path).map_err(|cause| FileError::Io {
            path: p.clone(),
            cause,
        })?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(FileError::TooLarge {
                path: p,
                size: meta.len(),
            });
        }
        // The size check above cannot see into a pipe, /dev/stdin or a /proc file (they report
        // 0 bytes): the read itself stops one byte past the limit.
        let mut text = String::new();
        let io = |cause| FileError::Io {
            path: p.clone(),
            cause,
        };
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(FileError::TooLarge {
                path: p,
                size: text.len() as u64,
            });
        }
        Self::parse(&p, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<ShardMapFile, FileError> {
        let file: ShardMapFile = toml::from_str(text).map_err(|e| FileError::Parse {
            path: path.into(),
            message: tenantry_core::text::without_source_excerpts(&e.to_string()),
        })?;
        let problems = file.problems();
        if problems.is_empty() {
            Ok(file)
        } else {
            Err(FileError::Invalid {
                path: path.into(),
                problems,
            })
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        // As the catalog records it (at most 200 characters), and printed in messages.
        if self.environment.trim().is_empty()
            || self.environment.chars().count() > 200
            || self.environment.chars().any(char::is_control)
        {
            p.push("environment must be 1 to 200 characters without control characters".into());
        }
        if self.shards.is_empty() {
            p.push("declare at least one [[shard]]".into());
        }
        if self.shards.len() > MAX_SHARDS {
            p.push(format!(
                "{} shards declared; at most {MAX_SHARDS}",
                self.shards.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for s in &self.shards {
            // Quoted in the messages: cut short (the file may hold anything up to 1 MiB).
            let id = shorten(&s.id, 64);
            if let Err(e) = validate_shard_id(&s.id) {
                p.push(e);
            }
            if !seen.insert(&s.id) {
                p.push(format!("shard {id:?} is declared twice"));
            }
            if s.database_url.expose().chars().any(char::is_control) {
                // Printed on operators' terminals (escaped, but still a typo to refuse).
                p.push(format!(
                    "shard {id:?}: database_url contains a control character"
                ));
            } else if !(s.database_url.expose().starts_with("postgres://")
                || s.database_url.expose().starts_with("postgresql://"))
            {
                p.push(format!(
                    "shard {id:?}: database_url must be a postgres:// URL"
                ));
            } else if let Err(e) = tenantry_core::db::maintenance_url(&s.database_url) {
                p.push(format!("shard {id:?}: {e}"));
            }
            if s.endpoints.is_empty() {
                p.push(format!("shard {id:?}: list at least one API endpoint"));
            }
            // Each is health-checked every `gateway.health_interval` by every gateway.
            if s.endpoints.len() > MAX_ENDPOINTS {
                p.push(format!(
                    "shard {id:?}: at most {MAX_ENDPOINTS} API endpoints ({} listed)",
                    s.endpoints.len()
                ));
            }
            for e in &s.endpoints {
                let shown = shorten(e, 200);
                if e.starts_with("https://") {
                    // The gateway's HTTP client is built without TLS (shard APIs sit on the
                    // private network), so such a shard could never be reached.
                    p.push(format!(
                        "shard {id:?}: endpoint {shown:?}: the gateway reaches shard APIs over plain \
                         http:// only (it has no TLS client)"));
                } else if !e.starts_with("http://")
                    || e.len() > 2048
                    || e.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    p.push(format!(
                        "shard {id:?}: endpoint {shown:?} is not an http:// URL"
                    ));
                } else if e.contains(['?', '#']) {
                    // The gateway appends each request's path to the endpoint.
                    p.push(format!(
                        "shard {id:?}: endpoint {shown:?}: a base URL takes no query or fragment"
                    ));
                } else if let Err(why) = check_authority(&e["http://".len()..]) {
                    p.push(format!("shard {id:?}: endpoint {shown:?}: {why}"));
                }
            }
            if !(1..=10_000).contains(&s.weight) {
                p.push(format!("shard {id:?}: weight must be between 1 and 10000"));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
environment = "test"
[[shard]]
id = "shard-1"
database_url = "postgres://postgres@127.0.0.1:5432/s1"
endpoints = ["http://127.0.0.1:8101"]
"#;

    #[test]
    fn a_minimal_file_parses_with_defaults() {
        let f = ShardMapFile::parse("t", GOOD).unwrap();
        assert_eq!(f.shards[0].weight, 100);
        assert!(f.shards[0].accepting);
        assert_eq!(f.shards[0].state, ShardState::Active);
    }

    #[test]
    fn hostile_files_are_refused_with_the_reason() {
        let long_environment = GOOD.replacen(
            "environment = \"test\"",
            &format!("environment = \"{}\"", "e".repeat(201)),
            1,
        );
        let nul_environment =
            GOOD.replacen("environment = \"test\"", "environment = \"a\\u0000b\"", 1);
        assert_ne!(long_environment, GOOD);
        for (text, needle) in [
            ("environment = \"x\"\n", "at least one"),
            (long_environment.as_str(), "environment must be 1 to 200"),
            (nul_environment.as_str(), "environment must be 1 to 200"),
            ("this is not toml", "not valid"),
            (&format!("{GOOD}color = \"blue\"\n"), "color"),
            (
                &GOOD.replace("shard-1", "Shard One"),
                "not a valid shard id",
            ),
            (
                &GOOD.replace("postgres://postgres@127.0.0.1:5432/s1", "mysql://x/y"),
                "postgres://",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "ftp://x"),
                "not an http:// URL",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "https://127.0.0.1:8101"),
                "no TLS client",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://"),
                "names no host",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://127.0.0.1:api"),
                "port is not a number",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://127.0.0.1:70000/x"),
                "port is not a number",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://user:pw@127.0.0.1:8101"),
                "user info",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://[::1:8101"),
                "missing its ']'",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://[::1]junk"),
                "followed by ':port' or nothing",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://a:80:90"),
                "port is not a number",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://a]:80"),
                "not a name or an address",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://127.0.0.1:8101?x=1"),
                "no query or fragment",
            ),
            (
                &GOOD.replace("http://127.0.0.1:8101", "http://127.0.0.1:8101/api#top"),
                "no query or fragment",
            ),
            (
                &GOOD.replace(
                    "\"http://127.0.0.1:8101\"",
                    &vec!["\"http://127.0.0.1:8101\""; 101].join(", "),
                ),
                "at most 100 API endpoints (101 listed)",
            ),
            (&format!("{GOOD}weight = 0\n"), "weight"),
            (
                &GOOD.replace("5432/s1", "5432/s1\\u001b]0;owned\\u0007"),
                "database_url contains a control character",
            ),
            (
                &GOOD.replace("8101", "8101\\u001b[2J"),
                "not an http:// URL",
            ),
            (
                &format!("{GOOD}{}", GOOD.replace("environment = \"test\"", "")),
                "declared twice",
            ),
        ] {
            let err = ShardMapFile::parse("t", text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}\n=> {err}");
        }
        // A syntax error names its line, without quoting it: it may hold a password.
        let unterminated = GOOD.replace("postgres@127.0.0.1:5432/s1\"", "postgres:s3cret@db/s1");
        let err = ShardMapFile::parse("t", &unterminated)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 5") && !err.contains("s3cret"), "{err}");
        // A huge id or endpoint is named in every message about it, not echoed whole.
        let huge = "x".repeat(100_000);
        let text = GOOD
            .replace("\"shard-1\"", &format!("\"{huge}\""))
            .replace("8101\"", &format!("8101/ {huge}\""));
        let err = ShardMapFile::parse("t", &text).unwrap_err().to_string();
        assert!(
            err.contains("not a valid shard id") && err.contains("not an http:// URL"),
            "{}",
            &err[..err.len().min(2000)]
        );
        assert!(err.len() < 2000, "{} bytes", err.len());
        for fine in [
            "http://127.0.0.1:8101/",
            "http://shard-1.internal",
            "http://[::1]:8101",
            "http://[::1]",
            "http://[::1]/api",
            "http://shard-1.internal:8101/api/",
        ] {
            let text = GOOD.replace("http://127.0.0.1:8101", fine);
            assert!(ShardMapFile::parse("t", &text).is_ok(), "{fine}");
        }
    }
}
