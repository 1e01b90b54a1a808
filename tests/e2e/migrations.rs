//! The migration runner against real PostgreSQL: order, checksums, phases, atomicity.

use tenantry_migrate::{MigrateError, Migration, Phase};
use tenantry_testkit::{Schema, TestDb};

use crate::support::{run, tenantry};

fn m(file: &str, phase: &str, body: &str) -> Migration {
    Migration::parse(file, &format!("-- phase: {phase}\n{body}")).unwrap()
}

async fn tables(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn migrations_apply_in_version_order_and_only_once() {
    let db = TestDb::new(Schema::Empty).await;
    let set = vec![
        m("0001_a.sql", "expand", "CREATE TABLE a (id int);"),
        m(
            "0002_b.sql",
            "expand",
            "CREATE TABLE b (a_id int); INSERT INTO a VALUES (1);",
        ),
    ];
    let mut c = db.client().await;
    let r = tenantry_migrate::up(&mut c, &set, Phase::Expand)
        .await
        .unwrap();
    assert_eq!(r.applied, ["0001_a.sql", "0002_b.sql"]);
    assert_eq!(r.version, 2);
    let again = tenantry_migrate::up(&mut c, &set, Phase::Expand)
        .await
        .unwrap();
    assert!(again.applied.is_empty());
    let n: i64 = c
        .query_one("SELECT count(*) FROM a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "0002 ran once");
}

#[tokio::test]
async fn a_pending_migration_numbered_below_an_applied_one_is_refused() {
    let db = TestDb::new(Schema::Empty).await;
    let mut c = db.client().await;
    let first = vec![
        m("0001_a.sql", "expand", "SELECT 1;"),
        m("0003_c.sql", "expand", "SELECT 1;"),
    ];
    tenantry_migrate::up(&mut c, &first, Phase::Expand)
        .await
        .unwrap();
    let with_gap = vec![
        first[0].clone(),
        m("0002_b.sql", "expand", "CREATE TABLE late (x int);"),
        first[1].clone(),
    ];
    let err = tenantry_migrate::up(&mut c, &with_gap, Phase::Expand)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MigrateError::OutOfOrder { ref file, applied_max: 3 } if file == "0002_b.sql"),
        "{err}"
    );
    assert!(!tables(&db).await.contains(&"late".to_owned()));
}

#[tokio::test]
async fn an_edited_applied_migration_stops_the_runner_naming_the_file() {
    let db = TestDb::new(Schema::Empty).await;
    let mut c = db.client().await;
    tenantry_migrate::up(
        &mut c,
        &[m("0001_a.sql", "expand", "CREATE TABLE a (id int);")],
        Phase::Expand,
    )
    .await
    .unwrap();
    let edited = vec![
        m("0001_a.sql", "expand", "CREATE TABLE a (id bigint);"),
        m("0002_b.sql", "expand", "CREATE TABLE b (id int);"),
    ];
    let err = tenantry_migrate::up(&mut c, &edited, Phase::Expand)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MigrateError::Edited { ref file, .. } if file == "0001_a.sql"),
        "{err}"
    );
    assert!(err.to_string().contains("0001_a.sql"));
    assert!(
        !tables(&db).await.contains(&"b".to_owned()),
        "nothing after the refusal ran"
    );
}

#[tokio::test]
async fn contract_steps_wait_for_the_contract_phase_and_keep_order() {
    let db = TestDb::new(Schema::Empty).await;
    let mut c = db.client().await;
    let set = vec![
        m(
            "0001_add.sql",
            "expand",
            "CREATE TABLE t (old int, new int);",
        ),
        m(
            "0002_drop.sql",
            "contract",
            "ALTER TABLE t DROP COLUMN old;",
        ),
        m("0003_more.sql", "expand", "CREATE TABLE u (id int);"),
    ];
    let r = tenantry_migrate::up(&mut c, &set, Phase::Expand)
        .await
        .unwrap();
    assert_eq!(r.applied, ["0001_add.sql"]);
    assert_eq!(r.held_back.as_deref(), Some("0002_drop.sql"));
    assert!(
        !tables(&db).await.contains(&"u".to_owned()),
        "0003 waits behind the contract step"
    );
    let r = tenantry_migrate::up(&mut c, &set, Phase::Contract)
        .await
        .unwrap();
    assert_eq!(r.applied, ["0002_drop.sql", "0003_more.sql"]);
    let st = tenantry_migrate::status(&c, &set).await.unwrap();
    assert!(st.pending.is_empty());
    assert_eq!(st.applied[1].phase, Phase::Contract);
}

#[tokio::test]
async fn a_failing_migration_leaves_nothing_behind() {
    let db = TestDb::new(Schema::Empty).await;
    let mut c = db.client().await;
    let set = vec![
        m("0001_ok.sql", "expand", "CREATE TABLE ok (id int);"),
        m(
            "0002_bad.sql",
            "expand",
            "CREATE TABLE half (id int); SELECT * FROM no_such_table;",
        ),
    ];
    let err = tenantry_migrate::up(&mut c, &set, Phase::Expand)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MigrateError::Sql { ref file, .. } if file == "0002_bad.sql"),
        "{err}"
    );
    assert!(
        !tables(&db).await.contains(&"half".to_owned()),
        "the failed step was rolled back"
    );
    let st = tenantry_migrate::status(&c, &set).await.unwrap();
    assert_eq!(st.version(), 1);
}

#[tokio::test]
async fn a_step_that_cannot_get_its_lock_gives_way_and_tries_again() {
    // A step altering a busy table must not queue every other statement on it behind a long
    // transaction: it waits a bounded time for its lock, rolls back, and tries again later.
    let db = TestDb::new(Schema::Empty).await;
    let mut c = db.client().await;
    let base = vec![m("0001_t.sql", "expand", "CREATE TABLE t (id int);")];
    tenantry_migrate::up(&mut c, &base, Phase::Expand)
        .await
        .unwrap();
    let mut set = base.clone();
    set.push(m(
        "0002_alter.sql",
        "expand",
        "ALTER TABLE t ADD COLUMN x int;",
    ));
    let lock = tenantry_migrate::LockWait {
        timeout: std::time::Duration::from_millis(100),
        tries: 3,
        pause: std::time::Duration::from_millis(20),
        ..tenantry_migrate::LOCK_WAIT
    };
    // Without a lock timeout the step would wait forever: fail instead of hanging.
    let bounded = std::time::Duration::from_secs(20);
    // A long transaction that has read the table holds a lock the ALTER conflicts with.
    let mut reader = db.client().await;
    let long = reader.transaction().await.unwrap();
    long.execute("SELECT * FROM t", &[]).await.unwrap();
    let err = tokio::time::timeout(
        bounded,
        tenantry_migrate::up_with(&mut c, &set, Phase::Expand, lock),
    )
    .await
    .expect("the step gave up within its tries")
    .unwrap_err();
    assert!(
        matches!(err, MigrateError::LockTimeout { ref file, tries: 3, .. } if file == "0002_alter.sql"),
        "{err}"
    );
    assert!(err.to_string().contains("run it again"), "{err}");
    let st = tenantry_migrate::status(&c, &set).await.unwrap();
    assert_eq!(st.version(), 1, "nothing of the step was applied");
    // ... and it left no lock request behind for other sessions to queue on.
    db.client()
        .await
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .unwrap();
    // The transaction ends after a try timed out and before the tries run out: the step goes
    // through.
    static RETRIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let patient = tenantry_migrate::LockWait {
        tries: 100,
        on_retry: |_, _, _| {
            RETRIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        },
        ..lock
    };
    let (report, ()) = tokio::join!(
        tokio::time::timeout(
            bounded,
            tenantry_migrate::up_with(&mut c, &set, Phase::Expand, patient)
        ),
        async {
            crate::support::until(
                bounded,
                || "the step never retried".to_string(),
                || RETRIES.load(std::sync::atomic::Ordering::SeqCst) > 0,
            )
            .await;
            long.commit().await.unwrap();
        }
    );
    assert_eq!(report.unwrap().unwrap().applied, ["0002_alter.sql"]);
}

#[tokio::test]
async fn migrate_up_says_while_a_step_waits_for_a_lock() {
    // Catalog step 0002 adds a trigger to `outbox`, which needs a lock that a transaction
    // writing to the outbox holds. The operator sees the retries instead of a silent command.
    let catalog = TestDb::new(Schema::Empty).await;
    let mut c = catalog.client().await;
    let all = tenantry_migrate::embedded(tenantry_migrate::Target::Catalog);
    tenantry_migrate::up(&mut c, &all[..1], Phase::Expand)
        .await
        .unwrap();
    let writer = c.transaction().await.unwrap();
    writer
        .execute("LOCK TABLE outbox IN ROW EXCLUSIVE MODE", &[])
        .await
        .unwrap();
    let mut child = tenantry()
        .args(["admin", "migrate", "up"])
        .env("TENANTRY_CATALOG__URL", &catalog.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // Blocking here is fine: the lock stays held on the server whatever this task does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut stderr_lines = Vec::new();
    let retry = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("trying again") => break line,
            Ok(line) => stderr_lines.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no retry reported within 20 s; stderr: {stderr_lines:?}");
            }
        }
    };
    assert!(retry.contains("0002_outbox_notify.sql"), "{retry}");
    writer.commit().await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    reader.join().unwrap();
    stderr_lines.extend(rx.try_iter());
    assert!(out.status.success(), "{stderr_lines:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("catalog: applied 0002_outbox_notify.sql"),
        "{stdout}"
    );
}

#[tokio::test]
async fn concurrent_runners_apply_each_migration_once() {
    let db = TestDb::new(Schema::Empty).await;
    let set = vec![
        m(
            "0001_a.sql",
            "expand",
            "CREATE TABLE a (id int); SELECT pg_sleep(0.2);",
        ),
        m("0002_b.sql", "expand", "INSERT INTO a VALUES (1);"),
    ];
    let (mut c1, mut c2) = (db.client().await, db.client().await);
    let (r1, r2) = tokio::join!(
        tenantry_migrate::up(&mut c1, &set, Phase::Expand),
        tenantry_migrate::up(&mut c2, &set, Phase::Expand)
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(r1.applied.len() + r2.applied.len(), 2);
    let n: i64 = c1
        .query_one("SELECT count(*) FROM a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Runs `cmd` with its standard output (`stdout`) or standard error closed before it writes,
/// as a reader that went away (`… | head -0`) leaves it, and returns what it wrote to the other.
fn closed_stdout(cmd: &mut std::process::Command, stdout: bool) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    match stdout {
        true => drop(child.stdout.take()),
        false => drop(child.stderr.take()),
    }
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn an_admin_command_whose_reader_stops_reading_exits_quietly() {
    // `tenantry admin … | head -0`: the pipe is closed before the command prints (it reads the
    // catalog first), and the command must neither panic nor report a failure.
    let catalog = TestDb::new(Schema::Empty).await;
    let out = closed_stdout(
        tenantry()
            .args(["admin", "migrate", "status"])
            .env("TENANTRY_CATALOG__URL", &catalog.url),
        true,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[tokio::test]
async fn migrate_up_whose_reader_stops_reading_still_migrates_every_shard() {
    // `migrate up | head -1`: the output stops after the catalog's line. It used to end the
    // command there, leaving every shard unmigrated and exiting 0.
    let catalog = TestDb::new(Schema::Catalog).await;
    let shards = [
        TestDb::new(Schema::Empty).await,
        TestDb::new(Schema::Empty).await,
    ];
    catalog
        .exec(&format!(
            "INSERT INTO shards (id, database_url) VALUES ('shard-a', '{}'), ('shard-b', '{}')",
            shards[0].url, shards[1].url
        ))
        .await;
    let out = closed_stdout(
        tenantry()
            .args(["admin", "migrate", "up"])
            .env("TENANTRY_CATALOG__URL", &catalog.url),
        true,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let latest = tenantry_migrate::embedded(tenantry_migrate::Target::Shard).len() as i64;
    for shard in &shards {
        let applied: i64 = shard
            .client()
            .await
            .query_one("SELECT count(*) FROM tenantry_schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(applied, latest, "{}", shard.name);
    }
    // `shard list 2>&1 | head -1`-like: a warning for a shard it cannot reach meets a closed
    // standard error. The warning is lost; the exit code is the command's, not a panic's 101.
    catalog
        .exec(
            "INSERT INTO shards (id, database_url) VALUES ('shard-c', 'postgres://postgres@127.0.0.1:1/none')",
        )
        .await;
    let out = closed_stdout(
        tenantry()
            .args(["admin", "shard", "list"])
            .env("TENANTRY_CATALOG__URL", &catalog.url)
            .env("TENANTRY_DATABASE__CONNECT_TIMEOUT", "1s"),
        false,
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{listed}");
    assert!(
        listed.contains("shard-c") && listed.contains("unreachable"),
        "{listed}"
    );
    // In JSON the version is a number or null, the reason apart: a string would sort after
    // every number in a filter such as `.schema_version >= 5`.
    let (code, out, err) = run(tenantry()
        .args(["admin", "shard", "list", "--json"])
        .env("TENANTRY_CATALOG__URL", &catalog.url)
        .env("TENANTRY_DATABASE__CONNECT_TIMEOUT", "1s"));
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["schema_version"], latest, "{out}");
    assert!(rows[0]["problem"].is_null(), "{out}");
    assert!(rows[2]["schema_version"].is_null(), "{out}");
    assert_eq!(rows[2]["problem"], "unreachable", "{out}");
}

#[tokio::test]
async fn migrate_status_fails_on_a_shard_it_cannot_read_and_both_commands_leave_retired_ones_out() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let shard = TestDb::new(Schema::Shard).await;
    let gone = "postgres://postgres@127.0.0.1:1/gone";
    catalog
        .exec(&format!(
            "INSERT INTO shards (id, database_url) VALUES ('shard-a', '{}'), ('shard-b', '{gone}');
             INSERT INTO shards (id, database_url, state) VALUES ('shard-c', '{gone}', 'retired')",
            shard.url
        ))
        .await;
    let env = [
        ("TENANTRY_CATALOG__URL", catalog.url.clone()),
        ("TENANTRY_DATABASE__CONNECT_TIMEOUT", "1s".to_owned()),
    ];
    // A shard that cannot be read is a failed check, not "nothing pending".
    let (code, out, err) = run(tenantry()
        .args(["admin", "migrate", "status"])
        .envs(env.clone()));
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("1 of 3 databases could not be read"), "{err}");
    let row = out
        .lines()
        .find(|l| l.contains("shard shard-b"))
        .unwrap_or_default();
    assert!(
        row.contains("unreachable") && row.matches('?').count() >= 2,
        "applied and pending unknown: {out}"
    );
    assert!(
        out.contains("retired shards, not checked: shard-c"),
        "{out}"
    );
    let (code, out, _) = run(tenantry()
        .args(["admin", "migrate", "status", "--json"])
        .envs(env.clone()));
    assert_eq!(code, 1);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3, "{out}");
    assert!(rows[2]["pending"].is_null(), "{out}");
    // Not 0: a monitor computing latest - applied would see a fresh, unmigrated database.
    assert!(rows[2]["applied"].is_null(), "{out}");
    assert_eq!(rows[1]["pending"], serde_json::json!([]), "{out}");
    assert_eq!(rows[1]["applied"], rows[1]["latest"], "{out}");
    // `migrate status | grep -q …` under pipefail: the reader went away, the problem still
    // fails the command.
    let out = closed_stdout(
        tenantry()
            .args(["admin", "migrate", "status"])
            .envs(env.clone()),
        true,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1 of 3 databases could not be read"), "{err}");
    // Retired, shard-b no longer stops `up` or fails `status`; named, it is still tried.
    catalog
        .exec("UPDATE shards SET state = 'retired' WHERE id = 'shard-b'")
        .await;
    let (code, out, err) = run(tenantry()
        .args(["admin", "migrate", "up"])
        .envs(env.clone()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("shard shard-b: retired, not migrated"),
        "{out}"
    );
    let (code, _, err) = run(tenantry()
        .args(["admin", "migrate", "status"])
        .envs(env.clone()));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(tenantry()
        .args(["admin", "migrate", "up", "--shard", "shard-b"])
        .envs(env.clone()));
    assert_eq!(code, 1, "{err}");
}

#[tokio::test]
async fn migrate_status_and_up_report_per_database() {
    let catalog = TestDb::new(Schema::Empty).await;
    let env = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    let (code, out, err) = run(tenantry()
        .args(["admin", "migrate", "status"])
        .envs(env.clone()));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("DATABASE")
            && out.contains("catalog")
            && out.contains("0001_shard_map.sql (expand)"),
        "{out}"
    );
    let (code, out, err) = run(tenantry()
        .args(["admin", "migrate", "up"])
        .envs(env.clone()));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("catalog: applied 0001_shard_map.sql"), "{out}");
    let (code, out, _) = run(tenantry()
        .args(["admin", "migrate", "status", "--json"])
        .envs(env.clone()));
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["pending"].as_array().unwrap().len(), 0, "{out}");
    let (code, out, _) = run(tenantry()
        .args(["admin", "migrate", "up"])
        .envs(env.clone()));
    assert_eq!(code, 0);
    assert!(out.contains("catalog: up to date"), "{out}");
    // hostile arguments
    let (code, _, err) = run(tenantry()
        .args(["admin", "migrate", "up", "--phase", "sideways"])
        .envs(env.clone()));
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(tenantry()
        .args([
            "admin",
            "migrate",
            "up",
            "--shard",
            "'; DROP TABLE shards; --",
        ])
        .envs(env.clone()));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a valid shard id"), "{err}");
    let (code, _, err) = run(tenantry()
        .args(["admin", "migrate", "up", "--shard", "no-such-shard"])
        .envs(env.clone()));
    assert_eq!(code, 1);
    assert!(err.contains("not in the catalog"), "{err}");
    let (code, _, err) = run(tenantry().args(["admin", "migrate", "status"]).env(
        "TENANTRY_CATALOG__URL",
        "postgres://postgres@127.0.0.1:1/none",
    ));
    assert_eq!(code, 1);
    assert!(err.contains("connecting to the catalog"), "{err}");
    // A database error names the database's own message, not just "db error".
    catalog
        .exec("ALTER TABLE tenantry_schema_migrations RENAME COLUMN checksum TO sum")
        .await;
    let (_, out, err) = run(tenantry()
        .args(["admin", "migrate", "status"])
        .envs(env.clone()));
    assert!(
        out.contains("column \"checksum\" does not exist"),
        "{out}{err}"
    );
}

#[tokio::test]
async fn a_runner_waits_for_another_past_its_statement_timeout_and_is_not_cut_off() {
    // The runner's connection carries a statement_timeout (as `database.statement_timeout`
    // gives every connection). Waiting for another runner's lock, and a step that runs longer,
    // must outlast it; the connection's own setting is back afterwards.
    let db = TestDb::new(Schema::Empty).await;
    let mut cfg: tokio_postgres::Config = db.url.parse().unwrap();
    cfg.options("-c statement_timeout=300");
    let (mut c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let other = db.client().await;
    other
        .execute("SELECT pg_advisory_lock(x'74656e616e747279'::int8)", &[])
        .await
        .unwrap();
    static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let lock = tenantry_migrate::LockWait {
        on_busy: || TOLD.store(true, std::sync::atomic::Ordering::SeqCst),
        ..tenantry_migrate::LOCK_WAIT
    };
    let set = vec![m(
        "0001_slow.sql",
        "expand",
        "CREATE TABLE t (id int); SELECT pg_sleep(0.6);",
    )];
    let (report, ()) = tokio::join!(
        tenantry_migrate::up_with(&mut c, &set, Phase::Expand, lock),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(800)).await;
            other
                .execute("SELECT pg_advisory_unlock(x'74656e616e747279'::int8)", &[])
                .await
                .unwrap();
        }
    );
    assert_eq!(report.unwrap().applied, ["0001_slow.sql"]);
    assert!(
        TOLD.load(std::sync::atomic::Ordering::SeqCst),
        "the wait was told"
    );
    let timeout: String = c
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "300ms");
}

#[tokio::test]
async fn a_server_too_old_for_the_migrations_gets_no_new_database() {
    // This server is new enough: asking for a newer one stands in for an old server, on which
    // `--create-databases` would otherwise leave an empty database the migrations then refuse.
    let db = TestDb::reserve();
    let url = tenantry_core::secret::DatabaseUrl::new(db.url.clone());
    let cfg = crate::support::dev_config().database;
    let err = tenantry_core::db::ensure_database(&url, &cfg, i32::MAX)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("was not created"), "{err:#}");
    assert!(!db.exists().await);
    let min = tenantry_migrate::MIN_SERVER_VERSION;
    assert!(
        tenantry_core::db::ensure_database(&url, &cfg, min)
            .await
            .unwrap()
    );
    assert!(db.exists().await);
    assert!(
        !tenantry_core::db::ensure_database(&url, &cfg, min)
            .await
            .unwrap(),
        "once"
    );
}

#[tokio::test]
async fn a_database_not_encoded_utf8_is_refused_before_any_migration() {
    // A cluster made under LANG=C defaults to SQL_ASCII: there a 200-character name of "é"
    // is 400 bytes to the length checks, and a LATIN1 database refuses "株式会社" with a 500.
    let db = TestDb::reserve();
    tenantry_testkit::admin_client()
        .await
        .batch_execute(&format!(
            "CREATE DATABASE {} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
            db.name
        ))
        .await
        .unwrap();
    let mut c = db.client().await;
    let set = vec![m("0001_a.sql", "expand", "CREATE TABLE a (id int);")];
    let err = tenantry_migrate::up(&mut c, &set, Phase::Expand)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::NotUtf8 { found } if found == "SQL_ASCII"),
        "{err}"
    );
    assert!(err.to_string().contains("ENCODING 'UTF8'"), "{err}");
    assert!(tables(&db).await.is_empty(), "nothing was applied");
}

#[tokio::test]
async fn the_create_statement_for_a_server_whose_default_is_not_utf8_makes_a_utf8_database() {
    // This server's default is UTF8; the statement for one whose default is not (SQL_ASCII
    // under LANG=C, LATIN1 under a Latin-1 locale) is run here as it would be run there.
    let db = TestDb::reserve();
    let admin = tenantry_testkit::admin_client().await;
    admin
        .batch_execute(&tenantry_core::db::create_database_sql(&db.name, false))
        .await
        .unwrap();
    let row = admin
        .query_one(
            "SELECT pg_encoding_to_char(encoding), datcollate FROM pg_database WHERE datname = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("UTF8".into(), "C".into())
    );
    let mut c = db.client().await;
    let set = vec![m("0001_a.sql", "expand", "CREATE TABLE a (id int);")];
    tenantry_migrate::up(&mut c, &set, Phase::Expand)
        .await
        .unwrap();
}

#[tokio::test]
async fn operators_creating_one_database_at_once_all_succeed() {
    // Two `--create-databases` runs for one new shard: CREATE DATABASEs racing past the
    // server's own check meet on its catalog's unique index (23505), not as 42P04.
    // Ten rounds of twelve, as the race is narrow: without the 23505 case this failed in each
    // of three runs.
    let cfg = crate::support::dev_config().database;
    let min = tenantry_migrate::MIN_SERVER_VERSION;
    for _ in 0..10 {
        let db = TestDb::reserve();
        let url = tenantry_core::secret::DatabaseUrl::new(db.url.clone());
        let runs = futures_util::future::join_all(
            (0..12).map(|_| tenantry_core::db::ensure_database(&url, &cfg, min)),
        )
        .await;
        let created: Vec<bool> = runs
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{e:#}")))
            .collect();
        assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
        assert!(db.exists().await);
    }
}

#[tokio::test]
async fn a_shard_pointed_at_the_catalog_database_is_named_as_such_not_as_an_edit() {
    // The two sets of migrations share version numbers; the check used to report the first
    // step as "edited after it was applied: revert the edit", sending the operator after a
    // file nobody touched.
    let catalog = TestDb::new(Schema::Catalog).await;
    catalog
        .exec(&format!(
            "INSERT INTO shards (id, database_url) VALUES ('shard-x', '{}')",
            catalog.url
        ))
        .await;
    let (code, out, err) = run(tenantry()
        .args(["admin", "migrate", "status", "--shard", "shard-x", "--json"])
        .env("TENANTRY_CATALOG__URL", &catalog.url));
    assert_eq!(code, 1, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let problem = rows[0]["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("0001_shard_map.sql as migration 1")
            && problem.contains("another set of migrations")
            && !problem.contains("edited"),
        "{out}"
    );
}

#[tokio::test]
async fn live_tenant_counts_start_from_the_existing_companies_and_follow_every_write() {
    // A creation chooses its shard by these counts (catalog 0005) instead of counting every
    // tenant of every shard: they must equal that count after any write, including writes
    // made before the migration and by hand.
    let db = TestDb::new(Schema::Empty).await;
    let mut c = db.client().await;
    let all = tenantry_migrate::embedded(tenantry_migrate::Target::Catalog);
    let (before, _) = all.split_at(all.iter().position(|m| m.version == 5).unwrap());
    tenantry_migrate::up(&mut c, before, Phase::Expand)
        .await
        .unwrap();
    db.exec(
        "INSERT INTO shards (id, database_url) VALUES ('s1', 'postgres://x/1'), ('s2', 'postgres://x/2');
         INSERT INTO tenants (id, name, shard_id, state) VALUES
           (gen_random_uuid(), 'a', 's1', 'active'), (gen_random_uuid(), 'b', 's1', 'active'),
           (gen_random_uuid(), 'c', 's2', 'deleted'), ('00000000-0000-4000-8000-000000000001', 'd', 's2', 'provisioning')",
    )
    .await;
    tenantry_migrate::up(&mut c, &all, Phase::Expand)
        .await
        .unwrap();
    let pairs = |sql: &'static str| async {
        let rows = db.client().await.query(sql, &[]).await.unwrap();
        rows.iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect::<Vec<(String, i64)>>()
    };
    let counted = || async {
        let kept =
            pairs("SELECT shard_id, live FROM shard_live_tenants WHERE live <> 0 ORDER BY 1").await;
        let walked = pairs(
            "SELECT shard_id, count(*) FROM tenants WHERE state <> 'deleted' GROUP BY 1 ORDER BY 1",
        )
        .await;
        assert_eq!(kept, walked);
        kept
    };
    assert_eq!(counted().await, [("s1".into(), 2), ("s2".into(), 1)]);
    let d = "'00000000-0000-4000-8000-000000000001'";
    for write in [
        "INSERT INTO tenants (id, name, shard_id, state) VALUES (gen_random_uuid(), 'e', 's2', 'provisioning')".to_owned(),
        format!("UPDATE tenants SET state = 'active' WHERE id = {d}"),
        format!("UPDATE tenants SET shard_id = 's1', state = 'moving' WHERE id = {d}"),
        format!("UPDATE tenants SET state = 'deleted' WHERE id = {d}"),
        format!("UPDATE tenants SET state = 'active' WHERE id = {d}"),
        "UPDATE tenants SET name = 'renamed'".to_owned(),
        "DELETE FROM tenants WHERE name = 'renamed' AND shard_id = 's2'".to_owned(),
        // Several shards in one statement each way.
        "INSERT INTO tenants (id, name, shard_id, state) VALUES
           (gen_random_uuid(), 'f', 's2', 'active'), (gen_random_uuid(), 'g', 's1', 'active')"
            .to_owned(),
        "UPDATE tenants SET shard_id = CASE shard_id WHEN 's1' THEN 's2' ELSE 's1' END".to_owned(),
    ] {
        db.exec(&write).await;
        counted().await;
    }
    assert_eq!(counted().await, [("s1".into(), 1), ("s2".into(), 4)]);
    db.exec("TRUNCATE tenants").await;
    assert_eq!(counted().await, []);
}
