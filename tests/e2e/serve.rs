//! `tenantry serve` as a process: roles, readiness, auth at the edge, the error shape,
//! graceful shutdown.

use std::time::Duration;

use tenantry_testkit::{Schema, TestBroker, TestDb};

use crate::support::{SECRET, Served, http, run, tenantry, token};

/// A gateway on `catalog`, with its own shard-map exchange on `broker` (removed with it).
fn gateway(catalog: &TestDb, broker: &TestBroker) -> std::process::Command {
    let mut cmd = tenantry();
    cmd.env("TENANTRY_AUTH__JWT_SECRET", SECRET)
        .env(
            "TENANTRY_RABBITMQ__SHARDMAP_EXCHANGE",
            broker.exchange("shardmap"),
        )
        .env("TENANTRY_CATALOG__URL", &catalog.url)
        .env("TENANTRY_GATEWAY__ENABLED", "true")
        .env("TENANTRY_GATEWAY__LISTEN", "127.0.0.1:0")
        .env("TENANTRY_HTTP__THREADS", "1")
        .env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "3s");
    cmd
}

#[actix_web::test]
async fn gateway_serves_health_and_the_shard_map_to_operators_only() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let broker = TestBroker::new().await;
    let served = Served::start(&mut gateway(&catalog, &broker), 1);
    let base = served.url("gateway");
    let c = http();

    let resp = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = c.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut resp = c.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(resp.body().await.unwrap().to_vec()).unwrap();
    assert!(text.contains("tenantry_http_requests_total"), "{text}");

    let operator = token(&["--user", "op", "--scope", "shardmap:read"]);
    let mut resp = c
        .get(format!("{base}/v1/shard-map/version"))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["version"], 0);
    assert_eq!(v["shards"], serde_json::json!([]));

    // the auth matrix at the edge, every answer in the error shape
    let plain = token(&["--user", "u"]);
    let expired = {
        use tenantry_core::auth::{Claims, mint_hs256};
        mint_hs256(
            SECRET.as_bytes(),
            &Claims {
                sub: "u".into(),
                exp: 1,
                iat: 0,
                companies: Default::default(),
                scope: "shardmap:read".into(),
            },
        )
        .unwrap()
    };
    let forged = {
        let (code, out, _) = run(tenantry()
            .args(["admin", "token", "--user", "op", "--scope", "shardmap:read"])
            .env(
                "TENANTRY_AUTH__JWT_SECRET",
                "some-other-key-some-other-key-some-other",
            ));
        assert_eq!(code, 0);
        out.trim().to_owned()
    };
    for (auth, status, code) in [
        (None, 401, "unauthorized"),
        (Some("Basic dXNlcjpwYXNz".to_owned()), 401, "unauthorized"),
        (Some("Bearer not.a.jwt".to_owned()), 401, "unauthorized"),
        (Some(format!("Bearer {expired}")), 401, "unauthorized"),
        (Some(format!("Bearer {forged}")), 401, "unauthorized"),
        (Some(format!("Bearer {plain}")), 403, "forbidden"),
    ] {
        let mut req = c
            .get(format!("{base}/v1/shard-map/version"))
            .insert_header(("x-request-id", "req-abc.123"));
        if let Some(a) = &auth {
            req = req.insert_header(("authorization", a.as_str()));
        }
        let mut resp = req.send().await.unwrap();
        assert_eq!(resp.status(), status, "{auth:?}");
        assert_eq!(resp.headers().get("x-request-id").unwrap(), "req-abc.123");
        let e = error_of!(resp);
        assert_eq!(e.error.code, code);
        assert_eq!(
            e.error.request_id, "req-abc.123",
            "the id the client sent comes back"
        );
    }

    // Forwarded requests (here refused at the edge) have a route label of their own, apart
    // from real 404s.
    let resp = c
        .get(format!("{base}/v1/companies/{}/jobs", uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let mut resp = c.get(format!("{base}/metrics")).send().await.unwrap();
    let text = String::from_utf8(resp.body().await.unwrap().to_vec()).unwrap();
    assert!(
        text.contains(r#"route="/v1/companies/{company_id}/…",status="401""#),
        "{text}"
    );

    // unknown route, wrong method, hostile request id: still the one shape
    let mut resp = c.get(format!("{base}/v1/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let e = error_of!(resp);
    assert_eq!(e.error.code, "not_found");
    assert!(
        !e.error.request_id.is_empty(),
        "an id is generated when absent"
    );
    let mut resp = c.post(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(error_of!(resp).error.code, "method_not_allowed");
    let mut resp = c
        .get(format!("{base}/nope"))
        .insert_header(("x-request-id", "a b\"<script>"))
        .send()
        .await
        .unwrap();
    let e = error_of!(resp);
    assert!(
        !e.error.request_id.contains('<'),
        "hostile ids are replaced: {}",
        e.error.request_id
    );

    // Probes with a head over the listener's limit: refused (a 4xx or a closed connection),
    // and the process still answers.
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let r = http()
            .get(format!("{base}{probe}"))
            .insert_header(("x-junk", "x".repeat(200 * 1024)))
            .send()
            .await;
        if let Ok(r) = r {
            assert!(r.status().is_client_error(), "{probe}: {}", r.status());
        }
    }
    // Made-up paths share one `route` label: no path text becomes a metric series.
    for i in 0..50 {
        let r = c
            .get(format!("{base}/probe-{i}-%3Cscript%3E"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let mut resp = c.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(resp.body().await.unwrap().to_vec()).unwrap();
    assert!(!text.contains("probe-"), "a path became a label");
    assert!(text.contains(r#"route="unmatched""#), "{text}");
}

#[actix_web::test]
async fn readyz_fails_in_the_error_shape_when_the_catalog_is_unreachable() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let broker = TestBroker::new().await;
    let mut cmd = gateway(&catalog, &broker);
    cmd.env(
        "TENANTRY_CATALOG__URL",
        "postgres://postgres@127.0.0.1:5432/tenantry_t_does_not_exist",
    )
    .env("TENANTRY_DATABASE__CONNECT_TIMEOUT", "500ms");
    let served = Served::start(&mut cmd, 1);
    let mut resp = http()
        .get(format!("{}/readyz", served.url("gateway")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let e = error_of!(resp);
    assert_eq!(e.error.code, "not_ready");
    assert!(e.error.message.contains("catalog"), "{}", e.error.message);
    assert!(
        !e.error.message.contains("does_not_exist"),
        "no internals: {}",
        e.error.message
    );
    let resp = http()
        .get(format!("{}/healthz", served.url("gateway")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "alive even when not ready");
}

#[actix_web::test]
async fn sigterm_stops_gracefully_with_exit_code_zero() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let shard = TestDb::new(Schema::Shard).await;
    shard
        .exec("INSERT INTO shard_identity (shard_id) VALUES ('shard-1')")
        .await;
    let broker = TestBroker::new().await;
    let mut cmd = gateway(&catalog, &broker);
    cmd.env("TENANTRY_API__ENABLED", "true")
        .env("TENANTRY_API__LISTEN", "127.0.0.1:0")
        .env("TENANTRY_SHARD__ID", "shard-1")
        .env("TENANTRY_SHARD__URL", &shard.url);
    let mut served = Served::start(&mut cmd, 2);
    let api = served.url("api");
    let resp = http()
        .get(format!("{api}/readyz"))
        .insert_header(("x-request-id", "log-me-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    served.signal("TERM");
    let code = served.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    let lines = served.logs_to_end(Duration::from_secs(5));
    let logs = lines.join("\n");
    assert!(
        logs.contains("shutdown requested") && logs.contains("tenantry stopped"),
        "the lines still buffered at exit are written: {logs}"
    );
    // The gateway role waits for its shard-map subscription and catalog relay, which end with
    // the shutdown, not for the grace period.
    assert!(
        !logs.contains("did not stop within the grace period"),
        "every role and background task stopped: {logs}"
    );
    // "What happened to request X": its line names it, with the outcome, as one JSON object.
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    let line = parsed
        .iter()
        .find(|v| v["span"]["request.id"] == "log-me-1")
        .unwrap_or_else(|| panic!("no line for request log-me-1: {logs}"));
    assert_eq!(line["message"], "request");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["http.method"], "GET");
    assert_eq!(line["http.path"], "/readyz");
    assert_eq!(line["http.status"], 200);
    assert_eq!(line["span"]["role"], "api");
    assert_eq!(line["span"]["shard.id"], "shard-1");
    assert!(line["duration_ms"].is_number() && line["timestamp"].is_string());
    assert!(
        http().get(format!("{api}/healthz")).send().await.is_err(),
        "no longer accepting"
    );
}

#[actix_web::test]
async fn a_shard_node_is_not_ready_until_its_database_has_every_expand_step_it_embeds() {
    // A rollout starts the new version after `migrate up`; a node started before it (or after
    // a `migrate up` that failed) must not take traffic whose statements need what it lacks.
    let (shard, mut c, last) = migrated_but_the_last(tenantry_migrate::Target::Shard).await;
    shard
        .exec("INSERT INTO shard_identity (shard_id) VALUES ('shard-1')")
        .await;
    let served = Served::start(&mut crate::support::shard_node(&shard.url, true, 0), 1);
    let ready = format!("{}/readyz", served.url("api"));
    ready_only_once_migrated(
        served,
        &ready,
        &mut c,
        tenantry_migrate::Target::Shard,
        &last,
    )
    .await;
}

#[actix_web::test]
async fn a_gateway_is_not_ready_until_the_catalog_has_every_expand_step_it_embeds() {
    // As for a shard node: company creation reads what catalog migration 0005 adds.
    let (catalog, mut c, last) = migrated_but_the_last(tenantry_migrate::Target::Catalog).await;
    let broker = TestBroker::new().await;
    let served = Served::start(&mut gateway(&catalog, &broker), 1);
    let ready = format!("{}/readyz", served.url("gateway"));
    ready_only_once_migrated(
        served,
        &ready,
        &mut c,
        tenantry_migrate::Target::Catalog,
        &last,
    )
    .await;
    broker.cleanup().await;
}

/// A database with every embedded migration of `target` but the last, a client to it, and
/// the migration left out.
async fn migrated_but_the_last(
    target: tenantry_migrate::Target,
) -> (TestDb, tokio_postgres::Client, tenantry_migrate::Migration) {
    let db = TestDb::new(Schema::Empty).await;
    let mut all = tenantry_migrate::embedded(target);
    let last = all.pop().expect("migrations");
    let mut c = db.client().await;
    tenantry_migrate::up(&mut c, &all, tenantry_migrate::Phase::Expand)
        .await
        .unwrap();
    (db, c, last)
}

/// `/readyz` at `ready` answers 503 until `last` is applied through `c`, then 200; the node's
/// log names the missing step and the command that applies it.
async fn ready_only_once_migrated(
    mut served: Served,
    ready: &str,
    c: &mut tokio_postgres::Client,
    target: tenantry_migrate::Target,
    last: &tenantry_migrate::Migration,
) {
    let mut resp = http().get(ready).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_of!(resp).error.code, "not_ready");
    let all = tenantry_migrate::embedded(target);
    tenantry_migrate::up(c, &all, tenantry_migrate::Phase::Expand)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http().get(ready).send().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "ready once migrated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = served.stop_and_read_logs();
    assert!(
        lines.iter().any(|l| l["error"]
            .as_str()
            .is_some_and(|e| e.contains(&last.file) && e.contains("admin migrate up"))),
        "the log says which step is missing: {lines:?}"
    );
}

#[actix_web::test]
async fn a_shard_node_pointed_at_another_shards_database_is_not_ready() {
    let shard = TestDb::new(Schema::Shard).await;
    shard
        .exec("INSERT INTO shard_identity (shard_id) VALUES ('shard-1')")
        .await;
    let mut cmd = tenantry();
    cmd.args(["--dev"])
        .env("TENANTRY_API__ENABLED", "true")
        .env("TENANTRY_API__LISTEN", "127.0.0.1:0")
        .env("TENANTRY_SHARD__ID", "shard-2")
        .env("TENANTRY_SHARD__URL", &shard.url);
    let served = Served::start(&mut cmd, 1);
    let mut resp = http()
        .get(format!("{}/readyz", served.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_of!(resp).error.code, "not_ready");
}

#[test]
fn serve_with_no_role_enabled_says_what_to_set() {
    let (code, _, err) = run(tenantry().args(["--dev", "serve"]));
    assert_eq!(code, 1);
    assert!(err.contains("no role is enabled"), "{err}");
}

#[test]
fn serve_reports_a_taken_port_and_exits_non_zero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, _, err) = run(tenantry()
        .args(["--dev", "serve"])
        .env("TENANTRY_GATEWAY__ENABLED", "true")
        .env("TENANTRY_GATEWAY__LISTEN", format!("127.0.0.1:{port}")));
    assert_eq!(code, 1);
    assert!(err.contains("binding the gateway listener"), "{err}");
}

#[actix_web::test]
async fn a_relay_stuck_connecting_to_a_silent_broker_stops_at_once_on_sigterm() {
    // The event relay's broker accepts the connection and then says nothing: the relay hangs in
    // its connect, for up to its 30 s broker timeout. SIGTERM must stop it there, not leave the
    // process to be abandoned once the grace period (1 s + 2 s) is over.
    let shard = TestDb::new(Schema::Shard).await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broker = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
    let mut cmd = crate::support::shard_node(&shard.url, false, 1);
    cmd.env("TENANTRY_RABBITMQ__RELAY_EVENTS", "true")
        .env("TENANTRY_RABBITMQ__URL", &broker)
        .env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "1s");
    let mut served = crate::support::start_worker(&mut cmd);
    // The relay is in its connect once the broker has its connection.
    silent.set_nonblocking(true).unwrap();
    let started = std::time::Instant::now();
    let _held = loop {
        match silent.accept() {
            Ok((conn, _)) => break conn,
            Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the relay never connected"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    served.signal("TERM");
    assert_eq!(served.wait_exit(Duration::from_secs(10)), Some(0));
    let logs = served.logs_to_end(Duration::from_secs(5)).join("\n");
    assert!(logs.contains("tenantry stopped"), "{logs}");
    assert!(
        !logs.contains("roles did not stop within the grace period"),
        "{logs}"
    );
    drop(silent);
}

/// A runtime of its own (a process's main one), and a shard-style pool built on it.
fn pool_on_a_runtime(
    url: &str,
    connect_timeout: Duration,
) -> (tokio::runtime::Runtime, deadpool_postgres::Pool) {
    let home = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let db = tenantry_core::config::DatabaseConfig {
        connect_timeout,
        statement_timeout: Duration::from_secs(30),
    };
    let url = tenantry_core::secret::DatabaseUrl::new(url);
    let pool = home
        .block_on(async { tenantry_core::db::pool(&url, 2, &db, "tenantry-test") })
        .unwrap();
    (home, pool)
}

#[test]
fn a_pooled_connection_outlives_the_listener_runtime_that_asked_for_it() {
    // An HTTP listener's handlers run on per-thread runtimes that stop with the listener. A
    // pooled connection made for one of them used to live on that runtime, so a role still
    // draining (the worker, a relay) lost the statement it was running on that connection.
    let (home, pool) = pool_on_a_runtime(&tenantry_testkit::pg_admin_url(), Duration::from_secs(5));
    let listener = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let taken = listener.block_on(async {
        let c = pool.get().await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
        c
    });
    drop(listener);
    home.block_on(async move {
        taken
            .simple_query("SELECT 1")
            .await
            .expect("the connection still works once that runtime has stopped");
    });
}

#[test]
fn a_pooled_connect_to_a_server_that_never_answers_lets_go_of_its_socket() {
    // The pool connects on its home runtime in a task of its own; when the caller's create
    // timeout gives up on a server that accepted and then said nothing, that task (and its
    // socket) must go too, or every attempt would leave one behind.
    use std::io::Read;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://postgres@{}/none", silent.local_addr().unwrap());
    let (home, pool) = pool_on_a_runtime(&url, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let got = home.block_on(pool.get());
    assert!(got.is_err(), "nothing answers");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (mut socket, _) = silent.accept().unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // The startup packet, then the end of the stream once the connect was given up.
    let mut buf = [0u8; 1024];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the abandoned connect still holds its socket: {e}"),
        }
    }
    drop(home);
}

/// A shard database for shard-1 and a node serving its API (no worker).
async fn api_node() -> (TestDb, Served) {
    let shard = TestDb::new(Schema::Shard).await;
    shard
        .exec("INSERT INTO shard_identity (shard_id) VALUES ('shard-1')")
        .await;
    let mut cmd = crate::support::shard_node(&shard.url, true, 0);
    let served = Served::start(&mut cmd, 1);
    (shard, served)
}

#[actix_web::test]
async fn a_failing_count_of_waiting_jobs_is_logged_once_and_so_is_its_recovery() {
    // The shard-wide cap reads a count of waiting jobs refreshed every second. Refreshes that
    // fail must be said (the cap then works from a stale count), but once, not every second.
    let (shard, mut served) = api_node().await;
    let admin = tenantry_testkit::admin_client().await;
    let allow = |yes: bool| {
        format!(
            "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS {yes}",
            shard.name
        )
    };
    admin.batch_execute(&allow(false)).await.unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&shard.name],
        )
        .await
        .unwrap();
    // Refreshes fail (one a second; the refused connections fail at once).
    tokio::time::sleep(Duration::from_secs(4)).await;
    admin.batch_execute(&allow(true)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = served.stop_and_read_logs();
    let said = |start: &str| crate::support::log_count(&lines, start);
    let failed = crate::support::log_line(&lines, "counting the shard's waiting jobs failed");
    assert_eq!(failed["level"], "WARN");
    // Refused, or cut off by the termination on a connection the pool still held.
    assert!(
        failed["error"].as_str().is_some_and(|e| {
            e.contains("not currently accepting connections") || e.contains("terminat")
        }),
        "{failed}"
    );
    assert_eq!(said("counting the shard's waiting jobs failed"), 1);
    assert_eq!(said("counting the shard's waiting jobs works again"), 1);
}

#[actix_web::test]
async fn a_huge_path_or_method_is_shortened_in_the_request_line() {
    // Any caller, unauthenticated too, chooses a request's path (up to 64 KiB) and method; the
    // line each request leaves must not copy them whole.
    let (_shard, mut served) = api_node().await;
    let addr = served.url("api").trim_start_matches("http://").to_owned();
    let send = |method: &str, path: &str, id: &str| {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
        );
        crate::support::send_and_stall(&addr, head.into_bytes())
    };
    let answer = send("GET", &format!("/{}", "p".repeat(60_000)), "long-path");
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    let answer = send(&"M".repeat(20_000), "/v1/x", "long-method");
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    let lines = served.stop_and_read_logs();
    let line = |id: &str| {
        lines
            .iter()
            .find(|v| v["span"]["request.id"] == id && v["message"] == "request")
            .unwrap_or_else(|| panic!("no request line for {id}"))
            .clone()
    };
    let path = line("long-path")["http.path"].as_str().unwrap().to_owned();
    assert_eq!(path.chars().count(), 513, "512 characters and the ellipsis");
    assert!(path.starts_with("/ppp") && path.ends_with('…'), "{path}");
    let method = line("long-method")["http.method"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(method, format!("{}…", "M".repeat(32)));
    for l in &lines {
        assert!(
            l.to_string().len() < 4096,
            "a line of {} bytes",
            l.to_string().len()
        );
    }
}
