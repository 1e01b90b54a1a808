#![doc = include_str!("../README.md")]

use std::{collections::BTreeMap, fmt, time::Duration};

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, error::SqlState};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// The table each database records its applied migrations in.
pub const TABLE: &str = "tenantry_schema_migrations";

/// Session advisory lock key ("tenantry migrate") so two runners never interleave.
const LOCK_KEY: i64 = 0x7465_6e61_6e74_7279;

/// Whether a step is safe while old code runs (`expand`) or only after every node runs the
/// new code (`contract`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Expand,
    Contract,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Expand => "expand",
            Phase::Contract => "contract",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "expand" => Ok(Phase::Expand),
            "contract" => Ok(Phase::Contract),
            o => Err(format!("unknown phase {o:?} (expected expand or contract)")),
        }
    }
}

/// Which database a migration set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Catalog,
    Shard,
}

/// One SQL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: i64,
    /// The file name, e.g. `0001_shards.sql`: what an operator looks for.
    pub file: String,
    pub phase: Phase,
    pub sql: String,
}

impl Migration {
    /// Parses `NNNN_description.sql` whose first line is `-- phase: expand|contract`.
    pub fn parse(file: &str, sql: &str) -> Result<Migration, MigrateError> {
        let bad = |reason: &str| MigrateError::BadFile {
            file: file.into(),
            reason: reason.into(),
        };
        let digits: String = file.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() || !file[digits.len()..].starts_with('_') || !file.ends_with(".sql") {
            return Err(bad("expected a name like 0001_description.sql"));
        }
        let version = digits
            .parse()
            .map_err(|_| bad("version number too large"))?;
        let phase = match sql.lines().next().map(str::trim) {
            Some("-- phase: expand") => Phase::Expand,
            Some("-- phase: contract") => Phase::Contract,
            _ => {
                return Err(bad(
                    "first line must be `-- phase: expand` or `-- phase: contract`",
                ));
            }
        };
        Ok(Migration {
            version,
            file: file.into(),
            phase,
            sql: sql.into(),
        })
    }

    /// SHA-256 of the file's text, hex.
    pub fn checksum(&self) -> String {
        Sha256::digest(self.sql.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The migrations compiled into this binary for `target`, in version order.
pub fn embedded(target: Target) -> Vec<Migration> {
    let files = match target {
        Target::Catalog => embedded::CATALOG,
        Target::Shard => embedded::SHARD,
    };
    // The build script already validated every name and header, so parsing cannot fail here.
    files
        .iter()
        .filter_map(|(f, sql)| Migration::parse(f, sql).ok())
        .collect()
}

/// A row of the migrations table.
#[derive(Debug, Clone)]
pub struct Applied {
    pub version: i64,
    pub file: String,
    pub phase: Phase,
    pub checksum: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "PostgreSQL {found} is too old: Tenantry needs {MIN_SERVER_VERSION_TEXT} or later \
         (its migrations use column compression, new in 14); nothing was applied"
    )]
    ServerTooOld { found: String },
    #[error(
        "the database is encoded {found}, not UTF8: text would be stored byte for byte \
         (SQL_ASCII) or refused with a 500 where it has no equivalent; create it with \
         `CREATE DATABASE … ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0` \
         (as `--create-databases` does), and move an existing one's data there with pg_dump \
         and pg_restore; nothing was applied"
    )]
    NotUtf8 { found: String },
    #[error("migration {file} is malformed: {reason}")]
    BadFile { file: String, reason: String },
    #[error(
        "migration {file} was edited after it was applied (checksum {applied} in the database, \
         {now} in the file); applied migrations are immutable: revert the edit and add a new \
         migration instead"
    )]
    Edited {
        file: String,
        applied: String,
        now: String,
    },
    #[error(
        "the database has migration {version} ({file}) that this binary does not know; \
         it was migrated by a newer tenantry"
    )]
    UnknownApplied { version: i64, file: String },
    #[error(
        "the database has {applied} as migration {version}, where this binary has {known}: it \
         holds another set of migrations (a catalog where a shard database was expected, or \
         the other way round); check the database URL"
    )]
    OtherMigrations {
        version: i64,
        applied: String,
        known: String,
    },
    #[error(
        "migration {file} is pending but the database already has version {applied_max}; \
         migrations must be applied in order: renumber it after {applied_max}"
    )]
    OutOfOrder { file: String, applied_max: i64 },
    #[error(
        "migration {file} could not take its locks within {timeout:?}, {tries} times: another \
         transaction holds them (see pg_stat_activity); nothing of it was applied, run it \
         again"
    )]
    LockTimeout {
        file: String,
        timeout: Duration,
        tries: u32,
    },
    #[error("migration {file} failed: {source}")]
    Sql {
        file: String,
        source: tokio_postgres::Error,
    },
    #[error("migration bookkeeping failed: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Where a database stands against a set of migrations.
#[derive(Debug, Clone)]
pub struct Status {
    pub applied: Vec<Applied>,
    pub pending: Vec<Migration>,
}

impl Status {
    /// Highest applied version, 0 for a fresh database.
    pub fn version(&self) -> i64 {
        self.applied.iter().map(|a| a.version).max().unwrap_or(0)
    }

    /// The first pending step that `up` in the expand phase would apply, if any: what code
    /// built with these migrations may need before it serves (contract steps come after every
    /// node runs it).
    pub fn expand_pending(&self) -> Option<&Migration> {
        self.pending.first().filter(|m| m.phase == Phase::Expand)
    }

    /// Problems that make `up` refuse: edited files, unknown or out-of-order versions.
    pub fn check(&self, known: &[Migration]) -> Result<(), MigrateError> {
        let by_version: BTreeMap<i64, &Migration> = known.iter().map(|m| (m.version, m)).collect();
        for a in &self.applied {
            match by_version.get(&a.version) {
                None => {
                    return Err(MigrateError::UnknownApplied {
                        version: a.version,
                        file: a.file.clone(),
                    });
                }
                // Files are never renamed: another name is another set of migrations, whose
                // checksums differ too, and "revert the edit" would mislead.
                Some(m) if m.file != a.file => {
                    return Err(MigrateError::OtherMigrations {
                        version: a.version,
                        applied: a.file.clone(),
                        known: m.file.clone(),
                    });
                }
                Some(m) if m.checksum() != a.checksum => {
                    return Err(MigrateError::Edited {
                        file: m.file.clone(),
                        applied: short(&a.checksum),
                        now: short(&m.checksum()),
                    });
                }
                Some(_) => {}
            }
        }
        let max = self.version();
        if let Some(m) = self.pending.iter().find(|m| m.version < max) {
            return Err(MigrateError::OutOfOrder {
                file: m.file.clone(),
                applied_max: max,
            });
        }
        Ok(())
    }
}

fn short(checksum: &str) -> String {
    checksum.chars().take(12).collect()
}

async fn ensure_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                version    bigint PRIMARY KEY,
                file       text NOT NULL,
                phase      text NOT NULL CHECK (phase IN ('expand', 'contract')),
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"
        ))
        .await
}

/// Reads what is applied (without creating anything) and what of `known` is pending.
pub async fn status(client: &Client, known: &[Migration]) -> Result<Status, MigrateError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
        .await?
        .get(0);
    let mut applied = Vec::new();
    if exists {
        for row in client
            .query(
                &format!("SELECT version, file, phase, checksum FROM {TABLE} ORDER BY version"),
                &[],
            )
            .await?
        {
            let phase: String = row.get(2);
            applied.push(Applied {
                version: row.get(0),
                file: row.get(1),
                phase: phase.parse().unwrap_or(Phase::Expand),
                checksum: row.get(3),
            });
        }
    }
    let done: std::collections::BTreeSet<i64> = applied.iter().map(|a| a.version).collect();
    let pending = known
        .iter()
        .filter(|m| !done.contains(&m.version))
        .cloned()
        .collect();
    Ok(Status { applied, pending })
}

/// A readiness probe's verdict on `client`'s database (the `what`: shard, catalog) for code
/// built with `known`: an error naming the first step it needs and the database lacks
/// ([`Status::expand_pending`]), and `command`, which applies it. A node of that code must not
/// serve before.
pub async fn schema_ready(
    client: &Client,
    known: &[Migration],
    what: &str,
    command: &str,
) -> Result<(), String> {
    let status = status(client, known)
        .await
        .map_err(|e| format!("reading the {what}'s migrations: {e}"))?;
    match status.expand_pending() {
        None => Ok(()),
        Some(m) => Err(format!(
            "{what} schema behind this version: {} is not applied (run `{command}`)",
            m.file
        )),
    }
}

/// What one `up` did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub applied: Vec<String>,
    /// The first pending contract step, when `up` ran in the expand phase and stopped there.
    pub held_back: Option<String>,
    pub version: i64,
}

/// How long a migration may wait for a lock, and how often it tries.
///
/// A step that alters a busy table (the job queue) needs that table's exclusive lock; waiting
/// for it behind a long transaction would queue every other statement on the table behind the
/// step, stopping the service until that transaction ends. So a step waits at most `timeout`
/// for each lock, and after a lock timeout it is rolled back and tried again after `pause`, up
/// to `tries` times in all (at least once; a `timeout` under a millisecond counts as one, since
/// PostgreSQL reads 0 as no limit). `on_retry` hears of each retry: the file, the tries so far
/// and the timeout. `on_busy` hears once that another runner holds the migration lock and this
/// one waits for it (as long as that takes).
#[derive(Debug, Clone, Copy)]
pub struct LockWait {
    pub timeout: Duration,
    pub tries: u32,
    pub pause: Duration,
    pub on_retry: fn(&str, u32, Duration),
    pub on_busy: fn(),
}

/// What [`up`] uses: other statements on a table wait at most 2 s at a time for a step, and a
/// step gives up after about 30 s; retries are logged as warnings.
pub const LOCK_WAIT: LockWait = LockWait {
    timeout: Duration::from_secs(2),
    tries: 10,
    pause: Duration::from_secs(1),
    on_retry: log_retry,
    on_busy: log_busy,
};

fn log_busy() {
    tracing::warn!("another migration runner holds this database's migration lock; waiting for it");
}

fn log_retry(file: &str, tries: u32, timeout: Duration) {
    tracing::warn!(
        migration = %file,
        tries,
        "migration waited {timeout:?} for a lock another transaction holds; rolled back, trying again"
    );
}

/// Applies pending migrations in version order, each in its own transaction together with its
/// bookkeeping row. In the `expand` phase it stops before the first `contract` step (later
/// steps may depend on it, so order wins over phase); in the `contract` phase it applies all.
/// Locks are waited for as [`LOCK_WAIT`] says.
pub async fn up(
    client: &mut Client,
    known: &[Migration],
    phase: Phase,
) -> Result<Report, MigrateError> {
    up_with(client, known, phase, LOCK_WAIT).await
}

/// The oldest PostgreSQL the migrations run on (`server_version_num`), and its name.
pub const MIN_SERVER_VERSION: i32 = 140000;
const MIN_SERVER_VERSION_TEXT: &str = "PostgreSQL 14";

/// Whether a server of `server_version_num` can take the migrations: shard step 0003 sets a
/// column's compression, which PostgreSQL 13 cannot even parse.
pub fn server_supported(server_version_num: i32) -> bool {
    server_version_num >= MIN_SERVER_VERSION
}

/// [`up`] with its own [`LockWait`]. Refuses a server older than [`MIN_SERVER_VERSION`], and a
/// database not encoded UTF8, before touching anything.
pub async fn up_with(
    client: &mut Client,
    known: &[Migration],
    phase: Phase,
    lock: LockWait,
) -> Result<Report, MigrateError> {
    // No statement_timeout for the runner (a connection's default, `database.statement_timeout`,
    // would cut off a long step, or the wait for another runner, after 30 s); each step's locks
    // are bounded by `lock` instead. RESET puts the connection's own default back.
    let version = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'),
                    current_setting('server_encoding')",
            &[],
        )
        .await?;
    if !server_supported(version.get(0)) {
        return Err(MigrateError::ServerTooOld {
            found: version.get(1),
        });
    }
    // Names, params and results are UTF-8; the database must store them so (its length checks
    // count characters, and every character has an equivalent).
    let encoding: String = version.get(2);
    if encoding != "UTF8" {
        return Err(MigrateError::NotUtf8 { found: encoding });
    }
    client.batch_execute("SET statement_timeout = 0").await?;
    let result = locked(client, known, phase, lock).await;
    let reset = client.batch_execute("RESET statement_timeout").await;
    let report = result?;
    reset?;
    Ok(report)
}

async fn locked(
    client: &mut Client,
    known: &[Migration],
    phase: Phase,
    lock: LockWait,
) -> Result<Report, MigrateError> {
    // A session lock rather than a transaction lock: it must cover several transactions. Tried
    // rather than waited for, so the operator hears why the command is waiting.
    let mut told = false;
    while !client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?
        .get::<_, bool>(0)
    {
        if !told {
            (lock.on_busy)();
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let result = up_locked(client, known, phase, lock).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let report = result?;
    unlock?;
    Ok(report)
}

async fn up_locked(
    client: &mut Client,
    known: &[Migration],
    phase: Phase,
    lock: LockWait,
) -> Result<Report, MigrateError> {
    ensure_table(client).await?;
    let st = status(client, known).await?;
    st.check(known)?;
    let mut report = Report {
        version: st.version(),
        ..Report::default()
    };
    for m in &st.pending {
        if m.phase == Phase::Contract && phase == Phase::Expand {
            report.held_back = Some(m.file.clone());
            break;
        }
        let mut tries = 1;
        while let Err(e) = apply(client, m, lock.timeout).await {
            let locked = matches!(&e, MigrateError::Sql { source, .. }
                if source.code() == Some(&SqlState::LOCK_NOT_AVAILABLE));
            if !locked {
                return Err(e);
            }
            if tries >= lock.tries.max(1) {
                return Err(MigrateError::LockTimeout {
                    file: m.file.clone(),
                    timeout: lock.timeout,
                    tries,
                });
            }
            (lock.on_retry)(&m.file, tries, lock.timeout);
            tries += 1;
            tokio::time::sleep(lock.pause).await;
        }
        tracing::info!(migration = %m.file, phase = %m.phase, "applied migration");
        report.applied.push(m.file.clone());
        report.version = m.version;
    }
    Ok(report)
}

/// Applies one migration and its bookkeeping row in one transaction, waiting at most
/// `lock_timeout` for each lock.
async fn apply(
    client: &mut Client,
    m: &Migration,
    lock_timeout: Duration,
) -> Result<(), MigrateError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        lock_timeout.as_millis().max(1)
    ))
    .await?;
    tx.batch_execute(&m.sql)
        .await
        .map_err(|source| MigrateError::Sql {
            file: m.file.clone(),
            source,
        })?;
    tx.execute(
        &format!("INSERT INTO {TABLE} (version, file, phase, checksum) VALUES ($1, $2, $3, $4)"),
        &[&m.version, &m.file, &m.phase.as_str(), &m.checksum()],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_and_headers_are_validated() {
        assert!(Migration::parse("0001_a.sql", "-- phase: expand\nselect 1").is_ok());
        let c = Migration::parse("0002_b.sql", "-- phase: contract\n").unwrap();
        assert_eq!((c.version, c.phase), (2, Phase::Contract));
        assert!(Migration::parse("one_a.sql", "-- phase: expand\n").is_err());
        assert!(Migration::parse("0001_a.sql", "select 1").is_err());
        assert!(Migration::parse("0001_a.txt", "-- phase: expand\n").is_err());
    }

    #[test]
    fn servers_before_14_are_refused_with_the_version_they_run() {
        assert!(!server_supported(130_016));
        assert!(server_supported(140_000));
        assert!(server_supported(150_020));
        let e = MigrateError::ServerTooOld {
            found: "13.16".into(),
        }
        .to_string();
        assert!(
            e.contains("13.16") && e.contains("PostgreSQL 14 or later"),
            "{e}"
        );
    }

    #[test]
    fn embedded_sets_are_ordered_and_start_with_expand() {
        for t in [Target::Catalog, Target::Shard] {
            let ms = embedded(t);
            assert!(!ms.is_empty());
            assert!(ms.windows(2).all(|w| w[0].version < w[1].version));
            assert_eq!(ms[0].phase, Phase::Expand);
        }
    }
}
