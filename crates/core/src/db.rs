//! PostgreSQL connections: bounded pools with timeouts, and one-off clients for the CLI.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::{config::DatabaseConfig, secret::DatabaseUrl};

/// How long data sent on a connection may stay unacknowledged before the kernel closes it
/// (`TCP_USER_TIMEOUT`, on Linux), unless the URL sets its own `tcp_user_timeout`.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses a URL and applies the process-wide connection settings.
pub fn pg_config(
    url: &DatabaseUrl,
    db: &DatabaseConfig,
    application_name: &str,
) -> anyhow::Result<tokio_postgres::Config> {
    pg_config_with(url, db, application_name, "")
}

/// [`pg_config`] plus `session_options` (`-c name=value …`), set on every connection at its
/// start (in the startup packet, so they cost no round trip). `database.statement_timeout`
/// comes first, then the options the URL carries (so a `statement_timeout` of its own wins:
/// PostgreSQL applies the last `-c` for a setting), then `session_options`.
pub fn pg_config_with(
    url: &DatabaseUrl,
    db: &DatabaseConfig,
    application_name: &str,
    session_options: &str,
) -> anyhow::Result<tokio_postgres::Config> {
    let mut cfg = tokio_postgres::Config::from_str(url.expose())
        .with_context(|| format!("parsing database URL {url}"))?;
    cfg.connect_timeout(db.connect_timeout);
    // TCP keepalives (unless the URL sets its own): a connection that a NAT or a dead peer
    // dropped without a reset is noticed within about 40 s (with the user timeout below: the
    // first unanswered probe after it ends the connection) instead of the kernel's two hours,
    // which matters most for the idle LISTEN connections that wake workers and waiters.
    if cfg.get_keepalives() && cfg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        cfg.keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
    }
    // And a bound on data sent and never acknowledged (unless the URL sets its own): keepalives
    // probe only an idle connection, so a statement sent on one that died silently (a failover
    // whose old host vanished, a dropped NAT entry) would otherwise wait for its answer until
    // the kernel gives up retransmitting, some 15 minutes, holding up whichever loop sent it:
    // the janitor's rescues, the finished notifications, a request. A statement that merely
    // runs long is not affected: the server's kernel acknowledges it at once.
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(application_name);
    }
    let mut options: Vec<String> = Vec::new();
    if !db.statement_timeout.is_zero() {
        options.push(format!(
            "-c statement_timeout={}",
            db.statement_timeout.as_millis()
        ));
    }
    if let Some(own) = cfg.get_options() {
        options.push(own.to_owned());
    }
    if !session_options.is_empty() {
        options.push(session_options.to_owned());
    }
    if !options.is_empty() {
        cfg.options(options.join(" "));
    }
    Ok(cfg)
}

/// A pool of at most `size` connections; waiting for a free connection or creating a new one
/// gives up after `database.connect_timeout`, so a dead database turns into errors, not hangs.
pub fn pool(
    url: &DatabaseUrl,
    size: usize,
    db: &DatabaseConfig,
    application_name: &str,
) -> anyhow::Result<Pool> {
    pool_with(url, size, db, application_name, "")
}

/// [`pool`] whose connections start with `session_options` (see [`pg_config_with`]).
pub fn pool_with(
    url: &DatabaseUrl,
    size: usize,
    db: &DatabaseConfig,
    application_name: &str,
    session_options: &str,
) -> anyhow::Result<Pool> {
    let cfg = pg_config_with(url, db, application_name, session_options)?;
    let create_timeout = connect_limit(&cfg);
    let mgr = Manager::from_connect(
        cfg,
        ConnectOnHome(tokio::runtime::Handle::try_current().ok()),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .wait_timeout(Some(db.connect_timeout))
        .create_timeout(Some(create_timeout))
        .recycle_timeout(Some(db.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .with_context(|| format!("building connection pool for {url}"))
}

/// How a pool makes its connections: on the runtime the pool was built on (its "home"), not on
/// whichever runtime's task happened to need one. An HTTP listener's request handlers run on
/// per-thread runtimes that stop with the listener; a connection made there (its socket and
/// the task driving it) would die with them, in the middle of the statements other roles of
/// the process (the worker, the relays) still run on it while they drain.
struct ConnectOnHome(Option<tokio::runtime::Handle>);

impl deadpool_postgres::Connect for ConnectOnHome {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<
                        (tokio_postgres::Client, tokio::task::JoinHandle<()>),
                        tokio_postgres::Error,
                    >,
                > + Send
                + '_,
        >,
    > {
        let (cfg, here) = (pg_config.clone(), pg_config.clone());
        let home = self.0.clone();
        Box::pin(async move {
            let drive = |connection: tokio_postgres::Connection<_, _>| async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "pooled database connection closed");
                }
            };
            if let Some(home) = home {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let task = home.spawn(async move {
                    match cfg.connect(NoTls).await {
                        Ok((client, connection)) => {
                            if tx.send(Ok(client)).is_ok() {
                                drive(connection).await;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
                // The pool's create timeout (every pool here has one, `connect_limit`) drops
                // this future, and the connect goes with it: tokio-postgres's own timeout
                // covers the TCP connect only, and a server that accepts and then says nothing
                // would otherwise keep the task and its socket for ever.
                let task = tokio_util::task::AbortOnDropHandle::new(task);
                if let Ok(connected) = rx.await {
                    return connected.map(|client| (client, task.detach()));
                }
                // The home runtime is shutting down: connect here after all.
            }
            let (client, connection) = here.connect(NoTls).await?;
            Ok((client, tokio::spawn(drive(connection))))
        })
    }
}

/// One connection, its driver task spawned; for CLI commands and migrations.
pub async fn connect(
    url: &DatabaseUrl,
    db: &DatabaseConfig,
    application_name: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let cfg = pg_config(url, db, application_name)?;
    let (client, conn) = connect_raw(&cfg)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// Connects with `cfg` and hands back the connection for the caller to drive (a LISTEN
/// session reads its notifications from it). tokio-postgres's connect_timeout covers the TCP
/// connect only; a server that accepts and then says nothing would hold the startup handshake
/// for ever, so the whole connection is bounded too (see [`connect_limit`]).
pub async fn connect_raw(
    cfg: &tokio_postgres::Config,
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
)> {
    let limit = connect_limit(cfg);
    match tokio::time::timeout(limit, cfg.connect(NoTls)).await {
        Ok(connected) => Ok(connected?),
        Err(_) => anyhow::bail!("the server did not complete the connection within {limit:?}"),
    }
}

/// `cfg`'s connect timeout, 5 s when unset.
fn connect_timeout(cfg: &tokio_postgres::Config) -> Duration {
    cfg.get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(5))
}

/// The bound for a whole connection: `cfg`'s connect timeout once per host of a multi-host URL,
/// as they are tried in turn.
pub fn connect_limit(cfg: &tokio_postgres::Config) -> Duration {
    let hosts = u32::try_from(cfg.get_hosts().len().max(1)).unwrap_or(u32::MAX);
    connect_timeout(cfg).saturating_mul(hosts)
}

/// Runs `LISTEN` statements (`sql`) on a connection made with `cfg`, bounded by its connect
/// timeout: a server that took the connection and then stopped answering would otherwise hold
/// a LISTEN session that never hears anything.
pub async fn listen(
    client: &tokio_postgres::Client,
    cfg: &tokio_postgres::Config,
    sql: &str,
) -> anyhow::Result<()> {
    let limit = connect_timeout(cfg);
    tokio::time::timeout(limit, client.batch_execute(sql))
        .await
        .map_err(|_| anyhow::anyhow!("LISTEN got no answer within {limit:?}"))??;
    Ok(())
}

/// The database name in a URL, and the same URL pointing at the `postgres` maintenance
/// database of that server, for `CREATE DATABASE`.
pub fn maintenance_url(url: &DatabaseUrl) -> anyhow::Result<(String, DatabaseUrl)> {
    let raw = url.expose();
    let cfg = tokio_postgres::Config::from_str(raw)
        .with_context(|| format!("parsing database URL {url}"))?;
    let name = cfg
        .get_dbname()
        .with_context(|| format!("{url} names no database"))?
        .to_owned();
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (raw, None),
    };
    let cut = base
        .rfind('/')
        .filter(|&i| i > base.find("://").map_or(0, |s| s + 2));
    let Some(cut) = cut else {
        anyhow::bail!("{url}: expected postgres://host/dbname")
    };
    let mut maint = format!("{}/postgres", &base[..cut]);
    if let Some(q) = query {
        maint.push('?');
        maint.push_str(q);
    }
    Ok((name, DatabaseUrl::new(maint)))
}

/// Creates the database named in `url` unless it exists. Returns whether it was created.
/// A server older than `min_server_version` (`server_version_num`, the oldest the migrations
/// run on) gets no database: it would be left empty when the migrations then refuse it.
///
/// The database is encoded UTF8 (the migrations refuse any other): as the server's default
/// when that is UTF8, else from `template0` with the C locale, which suits any encoding (a
/// cluster made under `LANG=C` defaults to SQL_ASCII, which stores text byte for byte).
pub async fn ensure_database(
    url: &DatabaseUrl,
    db: &DatabaseConfig,
    min_server_version: i32,
) -> anyhow::Result<bool> {
    let (name, maint) = maintenance_url(url)?;
    let client = connect(&maint, db, "tenantry-admin").await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .context("looking up the database")?
        .is_some();
    if exists {
        return Ok(false);
    }
    let server = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .context("reading the server's version")?;
    let (number, version): (i32, String) = (server.get(0), server.get(1));
    if number < min_server_version {
        anyhow::bail!(
            "the server at {maint} runs PostgreSQL {version}, older than the migrations need \
             (server_version_num {number} < {min_server_version}): database {name} was not created"
        );
    }
    let default_utf8 = default_is_utf8(&client)
        .await
        .context("reading the server's default encoding")?;
    match client
        .batch_execute(&create_database_sql(&name, default_utf8))
        .await
    {
        Ok(()) => Ok(true),
        // Another process created it between our check and our CREATE: that is success too.
        // Usually 42P04; two CREATEs racing past the server's own check meet on the catalog's
        // unique index instead (23505).
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("creating database {name}")),
    }
}

/// Whether a plain `CREATE DATABASE` on `client`'s server makes a UTF8 database (it copies
/// `template1`; a server without one counts as not).
pub async fn default_is_utf8(
    client: &tokio_postgres::Client,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT pg_encoding_to_char(encoding) = 'UTF8' FROM pg_database
              WHERE datname = 'template1'",
            &[],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// The `CREATE DATABASE` of [`ensure_database`] on a server whose default encoding is UTF8 or
/// (`default_utf8` false) another.
pub fn create_database_sql(name: &str, default_utf8: bool) -> String {
    let mut sql = format!("CREATE DATABASE {}", quote_ident(name));
    if !default_utf8 {
        sql.push_str(" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    }
    sql
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_url_keeps_host_user_and_options() {
        let (name, m) = maintenance_url(&DatabaseUrl::new(
            "postgres://u:p@127.0.0.1:5432/tenantry_shard_1?sslmode=disable",
        ))
        .unwrap();
        assert_eq!(name, "tenantry_shard_1");
        assert_eq!(
            m.expose(),
            "postgres://u:p@127.0.0.1:5432/postgres?sslmode=disable"
        );
        assert!(maintenance_url(&DatabaseUrl::new("postgres://h")).is_err());
    }

    fn config(statement_timeout: Duration) -> DatabaseConfig {
        DatabaseConfig {
            connect_timeout: Duration::from_secs(5),
            statement_timeout,
        }
    }

    #[test]
    fn session_options_follow_the_url_and_the_statement_timeout() {
        let db = config(Duration::from_secs(30));
        let plain = DatabaseUrl::new("postgres://h/d");
        let cfg = pg_config_with(&plain, &db, "t", "-c jit=off").unwrap();
        assert_eq!(
            cfg.get_options(),
            Some("-c statement_timeout=30000 -c jit=off")
        );
        assert_eq!(
            pg_config(&plain, &db, "t").unwrap().get_options(),
            Some("-c statement_timeout=30000")
        );
        // A URL's own options keep the statement timeout (and can override it, coming later).
        let own = DatabaseUrl::new("postgres://h/d?options=-c%20work_mem%3D8MB");
        let cfg = pg_config_with(&own, &db, "t", "-c jit=off").unwrap();
        assert_eq!(
            cfg.get_options(),
            Some("-c statement_timeout=30000 -c work_mem=8MB -c jit=off")
        );
    }

    #[test]
    fn connections_keep_alive_unless_the_url_says_otherwise() {
        let db = config(Duration::ZERO);
        let cfg = pg_config(&DatabaseUrl::new("postgres://h/d"), &db, "t").unwrap();
        assert!(cfg.get_keepalives());
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(30));
        let own = DatabaseUrl::new("postgres://h/d?keepalives_idle=600");
        let cfg = pg_config(&own, &db, "t").unwrap();
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(600));
        let off = DatabaseUrl::new("postgres://h/d?keepalives=0");
        assert!(!pg_config(&off, &db, "t").unwrap().get_keepalives());
    }

    #[test]
    fn sent_data_left_unacknowledged_closes_a_connection_unless_the_url_says_otherwise() {
        let db = config(Duration::ZERO);
        let cfg = pg_config(&DatabaseUrl::new("postgres://h/d"), &db, "t").unwrap();
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        let own = DatabaseUrl::new("postgres://h/d?tcp_user_timeout=5");
        let cfg = pg_config(&own, &db, "t").unwrap();
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
