//! Configuration: embedded defaults < `--config FILE` < `TENANTRY_*` environment, then
//! cross-field validation. Every field's default and meaning is in `config.default.toml`,
//! which is compiled into the binary and is the reference the README points at.

use std::{net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::{Deserialize, Serialize};

use crate::{
    secret::{DatabaseUrl, Secret},
    size::ByteSize,
};

/// The commented defaults file, compiled in.
pub const DEFAULTS_TOML: &str = include_str!("../config.default.toml");

/// Prefix of environment variables; `__` separates nested keys.
pub const ENV_PREFIX: &str = "TENANTRY_";

/// The HS256 key used with `--dev` when none is configured. It is public (it is in the source),
/// which is exactly why a process refuses to use it without `--dev`.
pub const DEV_JWT_SECRET: &str = "tenantry-development-key-do-not-use-in-production";

/// Shortest acceptable HS256 key, in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_JWT_SECRET_LEN: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub catalog: CatalogConfig,
    pub database: DatabaseConfig,
    pub gateway: GatewayConfig,
    pub api: ApiConfig,
    pub shard: ShardConfig,
    pub worker: WorkerConfig,
    pub queue: QueueConfig,
    pub rabbitmq: RabbitConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `auto` (default), `json` or `text`.
    pub format: LogFormat,
    /// EnvFilter directive; default `info`. `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `HS256` (default), `RS256` or `ES256`.
    pub algorithm: crate::auth::JwtAlgorithm,
    /// HS256 secret for JWTs; default empty (refused without `--dev`).
    pub jwt_secret: Secret,
    /// PEM public key file for RS256/ES256; default empty.
    pub public_key: String,
    /// PEM private key file, only for `admin token` with RS256/ES256; default empty.
    pub private_key: String,
    /// Audiences a token's `aud` must name one of; empty (default): `aud` is not checked.
    pub audience: Vec<String>,
    /// The `iss` a token must carry; empty (default): not checked.
    pub issuer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// Catalog database URL; default `postgres://postgres@127.0.0.1:5432/tenantry_catalog`.
    pub url: DatabaseUrl,
    /// Connections to the catalog; default 8.
    pub pool_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connect timeout; default 5s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Statement timeout on every connection; default 30s, 0s = none.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Run the gateway role; default false.
    pub enabled: bool,
    /// Listen address; default 127.0.0.1:8080.
    pub listen: SocketAddr,
    /// Request body limit; default 1MiB.
    pub body_limit: ByteSize,
    /// Time for a shard to answer (response head); default 10s, then 504.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Time to connect to a shard endpoint before trying the next; default 1s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a request for a frozen (moving) company is held and retried; default 2s.
    #[serde(with = "humantime_serde")]
    pub freeze_wait: Duration,
    /// Requests in flight to one shard before 503; default 512.
    pub max_in_flight_per_shard: usize,
    /// Requests of one company in flight through this gateway before 429; default 64.
    pub max_in_flight_per_company: usize,
    /// Connections to one shard's endpoints per listener thread; default 256.
    pub upstream_connections: usize,
    /// Requests per second per company; default 100, 0 = no limit.
    pub rate_limit: u32,
    /// Burst above the rate; default 200.
    pub rate_burst: u32,
    /// Companies kept in the routing cache; default 100000.
    pub cache_capacity: u64,
    /// How long an unknown company is remembered as unknown; default 2s.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// While RabbitMQ is unreachable, how often the catalog's map version is read (the routing
    /// cache is dropped when it changed); default 1s.
    #[serde(with = "humantime_serde")]
    pub disconnected_ttl: Duration,
    /// Active health checks of shard endpoints; default 2s.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Bodies up to this size are kept to be replayed on 421/freeze retries; default 64KiB.
    pub retry_buffer: ByteSize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Run the shard API role; default false.
    pub enabled: bool,
    /// Listen address; default 127.0.0.1:8081.
    pub listen: SocketAddr,
    /// Request body limit; default 1MiB.
    pub body_limit: ByteSize,
    /// How long a job request waits for its result before 202; default 3s.
    #[serde(with = "humantime_serde")]
    pub sync_wait: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Shard served by this node; default empty.
    pub id: String,
    /// Shard database URL; default empty.
    pub url: DatabaseUrl,
    /// Connections to the shard; default 16.
    pub pool_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Job slots; default 0 (no worker role).
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Lease of a running job; default 30s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Fallback poll; default 1s.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most jobs per claim; default 100.
    pub claim_batch: usize,
    /// Most completions per transaction; default 500.
    pub complete_batch: usize,
    /// Per-company cap on processing jobs; default 32.
    pub max_processing_per_company: i64,
    /// Per-company cap on waiting jobs; default 10000.
    pub max_waiting_per_company: i64,
    /// Per-shard cap on waiting jobs; default 200000.
    pub max_waiting_per_shard: i64,
    /// Params size limit; default 64KiB.
    pub max_params_size: ByteSize,
    /// Result size limit; default 1MiB.
    pub max_result_size: ByteSize,
    /// First retry delay; default 1s.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest retry delay; default 10m.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Rescuer period; default 5s.
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Duration,
    /// Retention of finished rows; default 7d.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Pruning period; default 1m.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Concurrent result waiters per process; default 10000.
    pub max_waiters: usize,
    /// Built-in kinds enabled; default none.
    pub builtin_kinds: Vec<String>,
    /// Cap of the sleep kind; default 60s.
    #[serde(with = "humantime_serde")]
    pub sleep_max: Duration,
    /// Longest one attempt of a job may run before it is stopped and fails; default 1h.
    #[serde(with = "humantime_serde")]
    pub run_timeout: Duration,
    /// Attempts per kind; default empty (1 each).
    pub max_attempts: std::collections::BTreeMap<String, i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitConfig {
    /// AMQP URL; default amqp://guest:guest@127.0.0.1:5672/%2f (password redacted in output).
    pub url: DatabaseUrl,
    /// Relay the shard outbox from the worker role; default true.
    pub relay_events: bool,
    /// Exchange for job events; default tenantry.events.
    pub events_exchange: String,
    /// Fan-out exchange for shard-map changes; default tenantry.shardmap.
    pub shardmap_exchange: String,
    /// Relay the catalog outbox from the gateway role; default true.
    pub relay_shardmap: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Worker threads per listener; default 0 = one per core.
    pub threads: usize,
    /// Concurrent connections per listener thread; default 10000.
    pub max_connections: usize,
    /// Time allowed for the request head; default 5s.
    #[serde(with = "humantime_serde")]
    pub client_request_timeout: Duration,
    /// Time allowed for a request body the listener reads whole, once its head is in; default
    /// 10s.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Grace period for in-flight work after SIGTERM/SIGINT; default 10s.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

/// Whether insecure settings (no JWT key, the public development key) are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Production: refuse insecure settings.
    Strict,
    /// `--dev`: allow them, filling in the development key.
    Dev,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    #[error("configuration file {0} is not a regular file")]
    NotAFile(String),
    #[error("configuration file {0} is {1} bytes; at most 1 MiB")]
    TooLarge(String, u64),
    #[error("{}", without_excerpts(.0))]
    Parse(Box<figment::Error>),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    #[error(
        "refusing to start with an insecure configuration: {0}. Set auth.jwt_secret \
         (TENANTRY_AUTH__JWT_SECRET) to a random key of at least {MIN_JWT_SECRET_LEN} bytes, \
         or pass --dev for local development"
    )]
    Insecure(String),
}

/// A parse error without the lines of the file it quotes (`2 | jwt_secret = "…"` and the caret
/// under it): the line at fault may well hold a secret, and the error goes to the terminal and
/// the logs. The line and column it names are kept.
fn without_excerpts(e: &figment::Error) -> String {
    crate::text::without_source_excerpts(&e.to_string())
}

/// The largest configuration file read (1 MiB; a real one is a few kilobytes).
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Parse(Box::new(e))
    }
}

/// The layered sources, without extraction: defaults < file < environment.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut f = Figment::from(Toml::string(DEFAULTS_TOML));
    if let Some(path) = file {
        f = f.merge(Toml::file_exact(path));
    }
    // Every key sits in a section (`TENANTRY_GATEWAY__LISTEN`), so a variable without `__` is
    // not one of ours: Kubernetes adds `TENANTRY_GATEWAY_SERVICE_HOST`, `…_PORT` and the like
    // for a Service named `tenantry-gateway`, and refusing those as unknown keys would stop
    // every pod from starting.
    f.merge(
        Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains("__"))
            .split("__"),
    )
}

/// How far past `api.sync_wait` a job request may still be reading its job back before it
/// answers `202` with the job as written (the shard API's `LAST_READ_LIMIT`).
pub const SYNC_WAIT_LAST_READ: Duration = Duration::from_secs(1);

impl Config {
    /// Loads, validates and (in [`Mode::Strict`]) refuses insecure settings.
    pub fn load(file: Option<&Path>, mode: Mode) -> Result<Config, ConfigError> {
        if let Some(path) = file {
            // As typed on the command line: shown cut short, its control characters escaped.
            let shown = || {
                crate::text::escape_controls(&crate::text::shorten(
                    &path.display().to_string(),
                    200,
                ))
            };
            let Ok(meta) = std::fs::metadata(path) else {
                return Err(ConfigError::MissingFile(shown()));
            };
            if !meta.is_file() {
                return Err(ConfigError::NotAFile(shown()));
            }
            // figment reads the whole file: a wrong path (a log, a dump) must not be read into
            // memory to find out.
            if meta.len() > MAX_CONFIG_FILE {
                return Err(ConfigError::TooLarge(shown(), meta.len()));
            }
        }
        Self::from_figment(figment(file), mode)
    }

    pub fn from_figment(figment: Figment, mode: Mode) -> Result<Config, ConfigError> {
        let mut cfg: Config = figment.extract()?;
        cfg.validate()?;
        cfg.apply_mode(mode)?;
        Ok(cfg)
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let shard_role = self.api.enabled || self.worker.threads > 0;
        if shard_role {
            if self.shard.id.is_empty() {
                problems.push("shard.id must be set when api.enabled or worker.threads > 0".into());
            } else if let Err(e) = validate_shard_id(&self.shard.id) {
                problems.push(format!("shard.id: {e}"));
            }
            if self.shard.url.is_empty() {
                problems
                    .push("shard.url must be set when api.enabled or worker.threads > 0".into());
            }
        }
        if self.gateway.enabled && self.catalog.url.is_empty() {
            problems.push("catalog.url must be set when gateway.enabled".into());
        }
        if self.gateway.enabled
            && self.api.enabled
            && self.gateway.listen == self.api.listen
            && self.api.listen.port() != 0
        {
            problems.push(format!(
                "gateway.listen and api.listen are both {}; give each role its own address",
                self.api.listen
            ));
        }
        for (key, v, max) in [
            ("catalog.pool_size", self.catalog.pool_size, 1000),
            ("shard.pool_size", self.shard.pool_size, 1000),
            ("http.max_connections", self.http.max_connections, 1_000_000),
        ] {
            if v == 0 || v > max {
                problems.push(format!("{key} must be between 1 and {max}, got {v}"));
            }
        }
        // Half the catalog pool (at least one connection) serves company creations: with one
        // connection in all, a creation would take the one routing needs.
        if self.gateway.enabled && self.catalog.pool_size == 1 {
            problems.push(
                "catalog.pool_size must be at least 2 when gateway.enabled (company creations \
                 hold up to half of the pool; routing needs the rest)"
                    .into(),
            );
        }
        let plain =
            |v: &str| !v.trim().is_empty() && v.len() <= 1000 && !v.chars().any(char::is_control);
        if self.auth.audience.len() > 100 || !self.auth.audience.iter().all(|a| plain(a)) {
            problems.push(
                "auth.audience must be at most 100 entries, each 1 to 1000 bytes without control \
                 characters"
                    .into(),
            );
        }
        if !self.auth.issuer.is_empty() && !plain(&self.auth.issuer) {
            problems.push(
                "auth.issuer must be empty or 1 to 1000 bytes without control characters".into(),
            );
        }
        let q = &self.queue;
        for (key, v, min, max) in [
            ("queue.claim_batch", q.claim_batch as i64, 1, 10_000),
            ("queue.complete_batch", q.complete_batch as i64, 1, 10_000),
            (
                "queue.max_processing_per_company",
                q.max_processing_per_company,
                1,
                1_000_000,
            ),
            (
                "queue.max_waiting_per_company",
                q.max_waiting_per_company,
                1,
                100_000_000,
            ),
            (
                "queue.max_waiting_per_shard",
                q.max_waiting_per_shard,
                1,
                1_000_000_000,
            ),
            ("queue.max_waiters", q.max_waiters as i64, 0, 1_000_000),
        ] {
            if v < min || v > max {
                problems.push(format!("{key} must be between {min} and {max}, got {v}"));
            }
        }
        let g = &self.gateway;
        for (key, v, min, max) in [
            (
                "gateway.max_in_flight_per_shard",
                g.max_in_flight_per_shard as i64,
                1,
                1_000_000,
            ),
            (
                "gateway.max_in_flight_per_company",
                g.max_in_flight_per_company as i64,
                1,
                1_000_000,
            ),
            (
                "gateway.upstream_connections",
                g.upstream_connections as i64,
                1,
                100_000,
            ),
            ("gateway.rate_limit", g.rate_limit as i64, 0, 1_000_000),
            ("gateway.rate_burst", g.rate_burst as i64, 1, 10_000_000),
            (
                "gateway.cache_capacity",
                g.cache_capacity as i64,
                1,
                100_000_000,
            ),
        ] {
            if v < min || v > max {
                problems.push(format!("{key} must be between {min} and {max}, got {v}"));
            }
        }
        if g.retry_buffer.bytes() > g.body_limit.bytes() {
            problems.push("gateway.retry_buffer must not exceed gateway.body_limit".into());
        }
        if self.auth.algorithm != crate::auth::JwtAlgorithm::HS256 {
            if self.auth.public_key.is_empty() {
                problems.push(format!(
                    "auth.public_key (a PEM file) must be set when auth.algorithm = {:?}",
                    self.auth.algorithm
                ));
            } else if !Path::new(&self.auth.public_key).is_file() {
                problems.push(format!(
                    "auth.public_key: {} is not a readable file",
                    self.auth.public_key
                ));
            } else if let Err(e) = crate::auth::JwtKey::from_config(&self.auth) {
                // A file that is not the key `serve` needs: say so here, not at start-up.
                problems.push(format!("{}: {e:#}", self.auth.public_key));
            }
        }
        for kind in &q.builtin_kinds {
            if kind != "echo" && kind != "sleep" {
                problems.push(format!(
                    "queue.builtin_kinds: unknown built-in kind {kind:?} (expected echo or sleep)"
                ));
            }
        }
        for (kind, n) in &q.max_attempts {
            if !(1..=100).contains(n) {
                problems.push(format!(
                    "queue.max_attempts.{kind} must be between 1 and 100, got {n}"
                ));
            }
        }
        for (key, size) in [
            ("queue.max_params_size", q.max_params_size),
            ("queue.max_result_size", q.max_result_size),
        ] {
            if size.bytes() < 64 || size.bytes() > 16 << 20 {
                problems.push(format!("{key} must be between 64B and 16MiB, got {size}"));
            }
        }
        // A completion batch sends its results as one parameter, which PostgreSQL caps at 1 GB.
        let batch_bytes = (q.complete_batch as u64).saturating_mul(q.max_result_size.bytes());
        if batch_bytes > 512 << 20 {
            problems.push(format!(
                "queue.complete_batch ({}) times queue.max_result_size ({}) must not exceed \
                 512MiB, or one completion batch could be too large to write",
                q.complete_batch, q.max_result_size
            ));
        }
        if q.retry_base > q.retry_max {
            problems.push("queue.retry_base must not exceed queue.retry_max".into());
        }
        if self.worker.threads > 1024 {
            problems.push(format!(
                "worker.threads must be at most 1024, got {}",
                self.worker.threads
            ));
        }
        if self.http.threads > 256 {
            problems.push(format!(
                "http.threads must be at most 256, got {}",
                self.http.threads
            ));
        }
        for (key, size) in [
            ("gateway.body_limit", self.gateway.body_limit),
            ("api.body_limit", self.api.body_limit),
        ] {
            if size.bytes() < 1024 || size.bytes() > 1 << 30 {
                problems.push(format!("{key} must be between 1KiB and 1GiB, got {size}"));
            }
        }
        let within = |key: &str, d: Duration, min: Duration, max: Duration, p: &mut Vec<String>| {
            if d < min || d > max {
                p.push(format!(
                    "{key} must be between {} and {}, got {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max),
                    humantime::format_duration(d)
                ));
            }
        };
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        within(
            "api.sync_wait",
            self.api.sync_wait,
            ms(0),
            s(30),
            &mut problems,
        );
        // Both roles in one configuration (the local cluster, a single-node set-up): a job
        // request must answer before the gateway gives up on it, or its 504 invites a second
        // job from a client without an Idempotency-Key.
        if self.gateway.enabled
            && self.api.enabled
            && self.api.sync_wait + SYNC_WAIT_LAST_READ >= self.gateway.upstream_timeout
        {
            problems.push(format!(
                "api.sync_wait ({}) plus the {} a job request may spend reading its job back \
                 must stay below gateway.upstream_timeout ({}), or the gateway answers 504 \
                 while the job exists",
                humantime::format_duration(self.api.sync_wait),
                humantime::format_duration(SYNC_WAIT_LAST_READ),
                humantime::format_duration(self.gateway.upstream_timeout)
            ));
        }
        within(
            "shutdown.grace_period",
            self.shutdown.grace_period,
            ms(0),
            s(3600),
            &mut problems,
        );
        within(
            "database.connect_timeout",
            self.database.connect_timeout,
            ms(100),
            s(300),
            &mut problems,
        );
        within(
            "database.statement_timeout",
            self.database.statement_timeout,
            ms(0),
            s(86_400),
            &mut problems,
        );
        for (key, d, min, max) in [
            // A lease shorter than a second gets running jobs rescued and run again; a zero
            // poll interval makes an idle worker claim without pause.
            ("queue.lease", q.lease, s(1), s(86_400)),
            ("queue.poll_interval", q.poll_interval, ms(10), s(3600)),
            ("queue.rescue_interval", q.rescue_interval, ms(100), s(3600)),
            ("queue.prune_interval", q.prune_interval, s(1), s(86_400)),
            ("queue.retention", q.retention, s(60), s(3650 * 86_400)),
            ("queue.retry_base", q.retry_base, ms(1), s(86_400)),
            ("queue.retry_max", q.retry_max, ms(1), s(7 * 86_400)),
            ("queue.sleep_max", q.sleep_max, ms(0), s(3600)),
            ("queue.run_timeout", q.run_timeout, ms(100), s(7 * 86_400)),
            (
                "gateway.upstream_timeout",
                g.upstream_timeout,
                ms(10),
                s(600),
            ),
            ("gateway.connect_timeout", g.connect_timeout, ms(10), s(60)),
            ("gateway.freeze_wait", g.freeze_wait, ms(0), s(60)),
            ("gateway.negative_ttl", g.negative_ttl, ms(0), s(3600)),
            (
                "gateway.disconnected_ttl",
                g.disconnected_ttl,
                ms(0),
                s(3600),
            ),
            (
                "gateway.health_interval",
                g.health_interval,
                ms(100),
                s(600),
            ),
        ] {
            within(key, d, min, max, &mut problems);
        }
        within(
            "http.client_request_timeout",
            self.http.client_request_timeout,
            ms(100),
            s(300),
            &mut problems,
        );
        within(
            "http.body_timeout",
            self.http.body_timeout,
            ms(100),
            s(300),
            &mut problems,
        );
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.log.level
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn apply_mode(&mut self, mode: Mode) -> Result<(), ConfigError> {
        if self.auth.algorithm != crate::auth::JwtAlgorithm::HS256 {
            // Asymmetric keys: nothing public to refuse; the key file was checked in validate.
            return Ok(());
        }
        let secret = self.auth.jwt_secret.expose();
        let problem = if secret.is_empty() {
            Some("auth.jwt_secret is not set".to_owned())
        } else if secret == DEV_JWT_SECRET {
            Some("auth.jwt_secret is the public development key".to_owned())
        } else if secret.len() < MIN_JWT_SECRET_LEN {
            Some(format!(
                "auth.jwt_secret is shorter than {MIN_JWT_SECRET_LEN} bytes"
            ))
        } else {
            None
        };
        match (problem, mode) {
            (None, _) => Ok(()),
            (Some(p), Mode::Strict) => Err(ConfigError::Insecure(p)),
            (Some(_), Mode::Dev) => {
                if secret.is_empty() {
                    self.auth.jwt_secret = Secret::new(DEV_JWT_SECRET);
                }
                Ok(())
            }
        }
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# could not render configuration: {e}\n"))
    }
}

/// Shard ids are short, lowercase, DNS-label-like names: `shard-1`, `eu-2`.
pub fn validate_shard_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a valid shard id (1-63 characters of a-z, 0-9 and '-', not starting \
             or ending with '-')",
            crate::text::shorten(id, 64)
        ))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment's own large error
mod tests {
    use figment::Jail;

    use super::*;

    fn load_in_jail(jail: &Jail, file: Option<&str>, mode: Mode) -> Result<Config, ConfigError> {
        let path = file.map(|f| jail.directory().join(f));
        Config::load(path.as_deref(), mode)
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    #[test]
    fn defaults_load_in_dev_mode_and_fill_the_dev_key() {
        Jail::expect_with(|jail| {
            let cfg = load_in_jail(jail, None, Mode::Dev).expect("defaults are valid");
            assert!(!cfg.gateway.enabled);
            assert_eq!(cfg.api.sync_wait, Duration::from_secs(3));
            assert_eq!(cfg.api.body_limit, ByteSize(1 << 20));
            assert_eq!(cfg.auth.jwt_secret.expose(), DEV_JWT_SECRET);
            Ok(())
        });
    }

    #[test]
    fn file_overrides_defaults_and_environment_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                &format!(
                    "[auth]\njwt_secret = \"{SECRET}\"\n[gateway]\nenabled = true\nlisten = \"127.0.0.1:9000\"\n[worker]\nthreads = 2\n[shard]\nid = \"shard-1\"\nurl = \"postgres://x@h/db\"\n"
                ),
            )?;
            jail.set_env("TENANTRY_GATEWAY__LISTEN", "127.0.0.1:9100");
            jail.set_env("TENANTRY_API__SYNC_WAIT", "250ms");
            let cfg = load_in_jail(jail, Some("t.toml"), Mode::Strict).expect("valid");
            assert!(cfg.gateway.enabled, "from file");
            assert_eq!(cfg.worker.threads, 2, "from file");
            assert_eq!(cfg.gateway.listen.port(), 9100, "env beats file");
            assert_eq!(
                cfg.api.sync_wait,
                Duration::from_millis(250),
                "env beats default"
            );
            assert_eq!(cfg.shard.pool_size, 16, "default kept");
            Ok(())
        });
    }

    #[test]
    fn a_file_that_does_not_parse_is_named_without_quoting_its_lines() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                "[auth]\njwt_secret = \"Zk\\qPsecret-0123456789abcdef0123456789\"\n",
            )?;
            let err = load_in_jail(jail, Some("t.toml"), Mode::Dev)
                .unwrap_err()
                .to_string();
            assert!(err.contains("line 2") && err.contains("t.toml"), "{err}");
            assert!(!err.contains("qPsecret"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn variables_without_a_section_are_not_ours_and_are_left_alone() {
        Jail::expect_with(|jail| {
            // What Kubernetes sets for a Service named `tenantry-gateway`.
            jail.set_env("TENANTRY_GATEWAY_SERVICE_HOST", "10.0.0.7");
            jail.set_env("TENANTRY_GATEWAY_PORT", "tcp://10.0.0.7:8080");
            jail.set_env("TENANTRY_GATEWAY__LISTEN", "127.0.0.1:9100");
            let cfg = load_in_jail(jail, None, Mode::Dev).expect("loads");
            assert_eq!(cfg.gateway.listen.port(), 9100);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[gateway]\nenabeld = true\n")?;
            let err = load_in_jail(jail, Some("t.toml"), Mode::Dev)
                .unwrap_err()
                .to_string();
            assert!(err.contains("enabeld"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TENANTRY_WORKER__THREDS", "3");
            let err = load_in_jail(jail, None, Mode::Dev).unwrap_err().to_string();
            assert!(err.contains("threds"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_rejected_with_their_key() {
        for (file, needle) in [
            ("[api]\nsync_wait = \"three seconds\"\n", "sync_wait"),
            ("[gateway]\nbody_limit = \"lots\"\n", "body_limit"),
            ("[gateway]\nlisten = \"not-an-address\"\n", "listen"),
            ("[worker]\nthreads = -1\n", "threads"),
            ("[log]\nformat = \"xml\"\n", "format"),
            ("[api]\nsync_wait = \"5m\"\n", "api.sync_wait"),
            (
                "[api]\nenabled = true\nsync_wait = \"9s\"\n[gateway]\nenabled = true\n\
                 [shard]\nid = \"shard-1\"\nurl = \"postgres://x@h/d\"\n",
                "api.sync_wait (9s) plus the 1s a job request may spend reading its job back must \
                 stay below gateway.upstream_timeout (10s)",
            ),
            ("[worker]\nthreads = 2\n", "shard.id must be set"),
            (
                "[api]\nenabled = true\n[shard]\nid = \"Shard_1\"\nurl = \"postgres://x@h/d\"\n",
                "shard.id",
            ),
            ("[catalog]\npool_size = 0\n", "catalog.pool_size"),
            (
                "[gateway]\nenabled = true\n[catalog]\npool_size = 1\n",
                "catalog.pool_size must be at least 2 when gateway.enabled",
            ),
            ("[auth]\naudience = [\"\"]\n", "auth.audience"),
            ("[auth]\naudience = [\"api\\u001b\"]\n", "auth.audience"),
            ("[auth]\nissuer = \"https://x\\n\"\n", "auth.issuer"),
            ("[queue]\nlease = \"0s\"\n", "queue.lease must be between"),
            ("[queue]\npoll_interval = \"0s\"\n", "queue.poll_interval"),
            (
                "[queue]\nrescue_interval = \"0s\"\n",
                "queue.rescue_interval",
            ),
            ("[queue]\nprune_interval = \"0s\"\n", "queue.prune_interval"),
            ("[queue]\nretention = \"1s\"\n", "queue.retention"),
            (
                "[gateway]\nretry_buffer = \"2MiB\"\n",
                "gateway.retry_buffer must not exceed",
            ),
            (
                "[gateway]\nupstream_timeout = \"1ms\"\n",
                "gateway.upstream_timeout",
            ),
            ("[gateway]\ncache_capacity = 0\n", "gateway.cache_capacity"),
            (
                "[gateway]\nmax_in_flight_per_shard = 0\n",
                "max_in_flight_per_shard",
            ),
            ("[auth]\nalgorithm = \"none\"\n", "algorithm"),
            ("[auth]\nalgorithm = \"RS256\"\n", "auth.public_key"),
            (
                "[auth]\nalgorithm = \"ES256\"\npublic_key = \"/nonexistent.pem\"\n",
                "/nonexistent.pem is not a readable file",
            ),
            (
                "[queue]\ncomplete_batch = 1000\nmax_result_size = \"1MiB\"\n",
                "must not exceed 512MiB",
            ),
            (
                "[auth]\nalgorithm = \"ES256\"\npublic_key = \"not-a-key.pem\"\n",
                "not-a-key.pem: auth.public_key is not an EC public key in PEM",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.create_file("not-a-key.pem", "hello, I am not a key\n")?;
                jail.create_file("t.toml", file)?;
                let err = load_in_jail(jail, Some("t.toml"), Mode::Dev)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(needle), "{file:?}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error_not_silently_ignored() {
        Jail::expect_with(|jail| {
            let err = load_in_jail(jail, Some("nope.toml"), Mode::Dev).unwrap_err();
            assert!(matches!(err, ConfigError::MissingFile(_)), "{err}");
            // A directory or a device is named as such, not as missing.
            jail.create_dir("conf.d")?;
            let err = load_in_jail(jail, Some("conf.d"), Mode::Dev).unwrap_err();
            assert!(matches!(err, ConfigError::NotAFile(_)), "{err}");
            let err = Config::load(Some(Path::new("/dev/zero")), Mode::Dev).unwrap_err();
            assert!(matches!(err, ConfigError::NotAFile(_)), "{err}");
            Ok(())
        });
    }

    #[test]
    fn strict_mode_refuses_missing_default_or_short_keys() {
        for (secret, needle) in [
            ("", "not set"),
            (DEV_JWT_SECRET, "development key"),
            ("short", "shorter"),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env("TENANTRY_AUTH__JWT_SECRET", secret);
                let err = load_in_jail(jail, None, Mode::Strict).unwrap_err();
                assert!(matches!(err, ConfigError::Insecure(_)), "{err}");
                assert!(err.to_string().contains(needle), "{err}");
                Ok(())
            });
        }
    }

    #[test]
    fn printed_configuration_redacts_secrets() {
        Jail::expect_with(|jail| {
            jail.set_env("TENANTRY_AUTH__JWT_SECRET", SECRET);
            jail.set_env("TENANTRY_CATALOG__URL", "postgres://app:pw-in-url@db/cat");
            let cfg = load_in_jail(jail, None, Mode::Strict).expect("valid");
            let out = cfg.to_redacted_toml();
            assert!(!out.contains(SECRET), "{out}");
            assert!(!out.contains("pw-in-url"), "{out}");
            assert!(out.contains("[gateway]"), "{out}");
            assert!(out.contains("jwt_secret = \"[redacted]\""), "{out}");
            // what is printed is itself a valid configuration file
            let reparsed: Result<Config, _> = Figment::from(Toml::string(&out)).extract::<Config>();
            assert!(reparsed.is_ok(), "{out}\n{reparsed:?}");
            Ok(())
        });
    }
}
