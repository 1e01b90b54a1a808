//! The test harness: every test gets its own freshly migrated PostgreSQL databases (cloned from
//! a template database, so it takes milliseconds) and its own RabbitMQ names, and everything is
//! dropped when the test's handles go out of scope — also when the test panics. Tests can
//! therefore run in parallel and leave nothing behind.
//!
//! Where a service is unreachable, the harness fails with one line that says how to start it.
//!
//! Environment: `TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, a
//! superuser or a role with CREATEDB) and `TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). Not `TENANTRY_*`, which the binary reads as
//! configuration.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a harness failing loudly is the point

pub mod alarm;
pub mod proxy;

use std::{str::FromStr, time::Duration};

use lapin::{Connection, ConnectionProperties, options::*, types::FieldTable};
use sha2_free::hash;
use tenantry_migrate::{Phase, Target};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

/// Prefix of every database the harness creates.
pub const DB_PREFIX: &str = "tenantry_t_";

pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A URL for database `name` on the test server.
pub fn db_url(name: &str) -> String {
    let admin = pg_admin_url();
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b.to_owned(), format!("?{q}")),
        None => (admin.clone(), String::new()),
    };
    let cut = base.rfind('/').expect("TEST_PG_URL must name a database");
    format!("{}/{name}{query}", &base[..cut])
}

/// Connects to the test server's maintenance database, or fails the test with one line.
pub async fn admin_client() -> Client {
    connect(&pg_admin_url()).await
}

pub async fn connect(url: &str) -> Client {
    let mut cfg = tokio_postgres::Config::from_str(url).expect("valid TEST_PG_URL");
    cfg.connect_timeout(Duration::from_secs(5));
    match cfg.connect(NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url} ({e}); start it with `make services`, which \
             finds the cluster on port 5432 (or install it) and says what it did"
        ),
    }
}

/// Which schema a test database starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// No tables at all.
    Empty,
    /// All catalog migrations (both phases) applied.
    Catalog,
    /// All shard migrations (both phases) applied.
    Shard,
}

/// A database that exists for the lifetime of this value.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new(schema: Schema) -> TestDb {
        let name = format!("{DB_PREFIX}{}", Uuid::new_v4().simple());
        let admin = admin_client().await;
        let sql = match schema {
            Schema::Empty => create_database_sql(&admin, &name).await,
            Schema::Catalog => format!(
                "CREATE DATABASE {name} TEMPLATE {}",
                template(Target::Catalog).await
            ),
            Schema::Shard => format!(
                "CREATE DATABASE {name} TEMPLATE {}",
                template(Target::Shard).await
            ),
        };
        create_with_retry(&admin, &sql).await;
        TestDb {
            url: db_url(&name),
            name,
        }
    }

    /// A unique database name that does not exist yet (for code under test to create); it is
    /// dropped with this value like any other test database.
    pub fn reserve() -> TestDb {
        let name = format!("{DB_PREFIX}{}", Uuid::new_v4().simple());
        TestDb {
            url: db_url(&name),
            name,
        }
    }

    pub async fn exists(&self) -> bool {
        admin_client()
            .await
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .is_some()
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Runs statements without parameters (test set-up).
    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The single `bigint` a query without parameters returns (a count, usually).
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}

/// `CREATE DATABASE name`, encoded UTF8 as the migrations need, whatever the server's
/// default, as `--create-databases` makes them.
async fn create_database_sql(admin: &Client, name: &str) -> String {
    let utf8 = tenantry_core::db::default_is_utf8(admin).await.unwrap();
    tenantry_core::db::create_database_sql(name, utf8)
}

/// `CREATE DATABASE … TEMPLATE` fails while another session is connected to the template
/// (a parallel test building it); a short retry rides that out.
async fn create_with_retry(admin: &Client, sql: &str) {
    let mut last = None;
    for _ in 0..50 {
        match admin.batch_execute(sql).await {
            Ok(()) => return,
            Err(e) if e.to_string().contains("is being accessed by other users") => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{sql}: {e}"),
        }
    }
    panic!("{sql}: {last:?}");
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee, so drop the database from a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let admin = admin_client().await;
                if let Err(e) = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                {
                    eprintln!("harness: could not drop {name}: {e}");
                }
            });
        })
        .join();
    }
}

/// The template database for a migration set, built once per distinct set of migrations (its
/// name carries their hash, so editing a migration builds a new template).
async fn template(target: Target) -> String {
    let migrations = tenantry_migrate::embedded(target);
    let digest = hash(
        migrations
            .iter()
            .map(|m| m.checksum())
            .collect::<Vec<_>>()
            .join(",")
            .as_bytes(),
    );
    let kind = match target {
        Target::Catalog => "catalog",
        Target::Shard => "shard",
    };
    let name = format!("tenantry_tpl_{kind}_{digest:016x}");
    let admin = admin_client().await;
    // Serialize template builders across test processes.
    admin
        .execute("SELECT pg_advisory_lock(7461)", &[])
        .await
        .unwrap();
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some();
    if !exists {
        let building = format!("{name}_building");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&create_database_sql(&admin, &building).await)
            .await
            .unwrap();
        {
            let mut c = connect(&db_url(&building)).await;
            tenantry_migrate::up(&mut c, &migrations, Phase::Contract)
                .await
                .unwrap();
        }
        // Renaming needs the builder's connection gone; the rename makes the template appear
        // complete or not at all.
        admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{building}';
                 ALTER DATABASE {building} RENAME TO {name};
                 ALTER DATABASE {name} WITH IS_TEMPLATE true"
            ))
            .await
            .unwrap();
        // Templates of earlier migration sets of this kind are dropped, but for the newest of
        // them (a checkout one migration behind may be testing against it on this server
        // right now), and unless one is being cloned at this moment (then it stays for the
        // next time).
        let stale = admin
            .query(
                "SELECT datname FROM pg_database
                  WHERE datname LIKE $1 AND datname <> $2 AND datname NOT LIKE '%\\_building'
                  ORDER BY oid DESC OFFSET 1",
                &[&format!("tenantry\\_tpl\\_{kind}\\_%"), &name],
            )
            .await
            .unwrap();
        for row in stale {
            let old: String = row.get(0);
            // (DROP DATABASE cannot share a query string with another statement.)
            let unmarked = admin
                .batch_execute(&format!("ALTER DATABASE {old} WITH IS_TEMPLATE false"))
                .await;
            if unmarked.is_ok() {
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {old}"))
                    .await;
            }
        }
    }
    admin
        .execute("SELECT pg_advisory_unlock(7461)", &[])
        .await
        .unwrap();
    name
}

/// A catalog and `n` shard databases, all migrated.
pub struct TestCluster {
    pub catalog: TestDb,
    pub shards: Vec<TestDb>,
}

impl TestCluster {
    pub async fn new(shards: usize) -> TestCluster {
        let catalog = TestDb::new(Schema::Catalog).await;
        let mut s = Vec::new();
        for _ in 0..shards {
            s.push(TestDb::new(Schema::Shard).await);
        }
        TestCluster { catalog, shards: s }
    }
}

/// RabbitMQ names private to one test: every exchange and queue declared through it carries a
/// unique prefix and is deleted when it is dropped.
pub struct TestBroker {
    pub prefix: String,
    pub conn: Connection,
    exchanges: std::sync::Mutex<Vec<String>>,
    queues: std::sync::Mutex<Vec<String>>,
}

impl TestBroker {
    pub async fn new() -> TestBroker {
        let url = amqp_url();
        let conn = match tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!(
                "RabbitMQ is not reachable at {url} ({e}); start it with `make services` \
                 (or `rabbitmq-server -detached`)"
            ),
            Err(_) => {
                panic!("RabbitMQ at {url} did not answer within 5s; start it with `make services`")
            }
        };
        TestBroker {
            prefix: format!("t.{}.", Uuid::new_v4().simple()),
            conn,
            exchanges: Default::default(),
            queues: Default::default(),
        }
    }

    /// A name unique to this test; remembered for deletion.
    pub fn exchange(&self, name: &str) -> String {
        let full = format!("{}{name}", self.prefix);
        self.exchanges.lock().unwrap().push(full.clone());
        full
    }

    pub fn queue(&self, name: &str) -> String {
        let full = format!("{}{name}", self.prefix);
        self.queues.lock().unwrap().push(full.clone());
        full
    }

    /// Deletes every remembered exchange and queue.
    pub async fn cleanup(&self) {
        let (queues, exchanges) = self.take_names();
        delete_names(&self.conn, queues, exchanges).await;
    }

    fn take_names(&self) -> (Vec<String>, Vec<String>) {
        let queues = self.queues.lock().unwrap().drain(..).collect();
        let exchanges = self.exchanges.lock().unwrap().drain(..).collect();
        (queues, exchanges)
    }

    /// Whether an exchange exists (a passive declare fails when it does not).
    pub async fn exchange_exists(&self, name: &str) -> bool {
        let Ok(ch) = self.conn.create_channel().await else {
            return false;
        };
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let (queues, exchanges) = self.take_names();
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let url = amqp_url();
        // Drop runs outside any runtime guarantee: delete from a thread with its own runtime
        // and connection.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await
                else {
                    return;
                };
                delete_names(&conn, queues, exchanges).await;
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

/// Deletes queues, then exchanges; a name already gone is not an error.
async fn delete_names(conn: &Connection, queues: Vec<String>, exchanges: Vec<String>) {
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in exchanges {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

mod sha2_free {
    /// FNV-1a: enough to name a template after its migrations' checksums.
    pub fn hash(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
        h
    }
}
