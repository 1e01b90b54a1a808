//! The gateway against real shards, a real catalog and real RabbitMQ: company creation,
//! forwarding, the shard-map cache and its invalidation, fencing retries, limits and auth.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use tenantry_core::{
    auth::{Claims, Role, mint_hs256},
    secret::DatabaseUrl,
};
use tenantry_shardmap::{
    catalog,
    file::{ShardSpec, ShardState},
    tenants,
};
use tenantry_testkit::{TestBroker, TestCluster, TestDb, amqp_url, proxy::TcpProxy};
use uuid::Uuid;

use crate::support::{
    SECRET, Served, http, log_line, metric, own, queue_depth, send_and_stall, shard_node,
    slow_job_202_then_done, tenantry, token, until_metric,
};

const SHARD_HEADER: &str = "x-tenantry-shard";

/// Shard ids of the test cluster, by index.
fn shard_id(i: usize) -> String {
    format!("shard-{}", i + 1)
}

/// Two shard nodes (api + 1 job slot each) registered in a catalog, and a broker prefix.
struct Env {
    cluster: TestCluster,
    broker: TestBroker,
    exchange: String,
    nodes: Vec<Option<Served>>,
}

impl Env {
    async fn new(shards: usize) -> Env {
        let cluster = TestCluster::new(shards).await;
        let broker = TestBroker::new().await;
        let exchange = broker.exchange("shardmap");
        let mut nodes = Vec::new();
        let mut specs = Vec::new();
        for (i, db) in cluster.shards.iter().enumerate() {
            db.client()
                .await
                .execute(
                    "INSERT INTO shard_identity (shard_id) VALUES ($1)",
                    &[&shard_id(i)],
                )
                .await
                .unwrap();
            let node = Served::start(
                shard_node(&db.url, true, 1).env("TENANTRY_SHARD__ID", shard_id(i)),
                1,
            );
            specs.push(spec(&shard_id(i), &db.url, vec![node.url("api")]));
            nodes.push(Some(node));
        }
        register(&cluster.catalog, &specs).await;
        Env {
            cluster,
            broker,
            exchange,
            nodes,
        }
    }

    /// A gateway on this catalog and exchange; `extra` env overrides.
    fn gateway_cmd(&self, amqp: &str, extra: &[(&str, &str)]) -> Command {
        gateway_cmd(&self.cluster.catalog.url, amqp, &self.exchange, extra)
    }

    fn gateway(&self, extra: &[(&str, &str)]) -> Served {
        start_gateway(&mut self.gateway_cmd(&amqp_url(), extra))
    }

    fn shard(&self, i: usize) -> &TestDb {
        &self.cluster.shards[i]
    }

    async fn jobs_on(&self, i: usize, company: Uuid) -> i64 {
        self.shard(i)
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM jobs WHERE company_id = $1",
                &[&company],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// What a tenant move does at its flip: the target owns the company, the source says
    /// moved, and the catalog points at the target (with its outbox message).
    async fn move_company(&self, company: Uuid, from: usize, to: usize) {
        own(self.shard(to), company, "owned").await;
        own(self.shard(from), company, "moved").await;
        let mut c = self.cluster.catalog.client().await;
        tenants::set_placement(&mut c, company, &shard_id(to), "active")
            .await
            .unwrap()
            .expect("tenant exists");
    }
}

/// Whether the shard database holds an `owned` placement for `company` (0 or 1).
async fn owned(db: &TestDb, company: Uuid) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM placements WHERE company_id = $1 AND state = 'owned'",
            &[&company],
        )
        .await
        .unwrap()
        .get(0)
}

fn spec(id: &str, db_url: &str, endpoints: Vec<String>) -> ShardSpec {
    ShardSpec {
        id: id.into(),
        database_url: DatabaseUrl::new(db_url),
        endpoints,
        accepting: true,
        weight: 100,
        state: ShardState::Active,
    }
}

/// The database settings `tenants::create` is called with in these tests.
fn provisioning_cfg() -> tenantry_core::config::DatabaseConfig {
    tenantry_core::config::DatabaseConfig {
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(30),
    }
}

async fn register(catalog: &TestDb, specs: &[ShardSpec]) {
    let mut c = catalog.client().await;
    // Set-up vouches for every shard's companies (as `shard apply` does once it has checked
    // a moved database).
    let checked = catalog::companies_by_shard(&c, None).await.unwrap();
    catalog::upsert_shards(&mut c, specs, None, &checked)
        .await
        .unwrap();
}

fn gateway_cmd(catalog_url: &str, amqp: &str, exchange: &str, extra: &[(&str, &str)]) -> Command {
    let mut cmd = tenantry();
    cmd.env("TENANTRY_AUTH__JWT_SECRET", SECRET)
        .env("TENANTRY_GATEWAY__ENABLED", "true")
        .env("TENANTRY_GATEWAY__LISTEN", "127.0.0.1:0")
        .env("TENANTRY_GATEWAY__HEALTH_INTERVAL", "200ms")
        .env("TENANTRY_GATEWAY__BODY_LIMIT", "512KiB")
        .env("TENANTRY_CATALOG__URL", catalog_url)
        .env("TENANTRY_RABBITMQ__URL", amqp)
        .env("TENANTRY_RABBITMQ__SHARDMAP_EXCHANGE", exchange)
        .env("TENANTRY_HTTP__THREADS", "1")
        .env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "1s");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

fn start_gateway(cmd: &mut Command) -> Served {
    Served::start_until(cmd, 1, Some("subscribed to shard-map changes"))
}

fn creator_token() -> String {
    token(&["--user", "founder", "--scope", "companies:create"])
}

fn company_token(company: Uuid, role: &str) -> String {
    token(&["--user", "u1", "--company", &format!("{company}:{role}")])
}

/// Creates a company through `gw`; returns (status, body).
async fn create_company(gw: &str, id: Uuid, name: &str) -> (u16, Value) {
    post_company(gw, json!({"id": id, "name": name})).await
}

/// Posts `body` to `gw`'s company creation; returns (status, body).
async fn post_company(gw: &str, body: Value) -> (u16, Value) {
    let mut r = http()
        .post(format!("{gw}/v1/companies"))
        .bearer_auth(creator_token())
        .send_json(&body)
        .await
        .unwrap();
    (r.status().as_u16(), r.json::<Value>().await.unwrap())
}

/// Posts an echo job through `gw`; returns (status, answering shard).
async fn post_job(gw: &str, company: Uuid, auth: &str) -> (u16, String) {
    let r = http()
        .post(format!("{gw}/v1/companies/{company}/jobs"))
        .bearer_auth(auth)
        .send_json(&json!({"kind": "echo", "params": {"n": 1}}))
        .await
        .unwrap();
    let shard = r
        .headers()
        .get(SHARD_HEADER)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (r.status().as_u16(), shard)
}

/// Cached routes replaced by a newer placement: moves only once the route is applied (a
/// message count moves before, and also for stale messages).
const ROUTE_UPDATES: &str = "tenantry_gateway_cache_events_total{event=\"update\"}";
const MISDIRECTED: &str = "tenantry_gateway_retries_total{reason=\"misdirected\"}";

#[actix_web::test]
async fn companies_are_created_once_under_concurrent_repeats_and_spread_over_shards() {
    let env = Env::new(2).await;
    let gw = env.gateway(&[]);
    let base = gw.url("gateway");
    let id = Uuid::now_v7();
    let attempts = (0..8).map(|_| create_company(&base, id, "Acme"));
    let results = futures_util::future::join_all(attempts).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let existing = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, existing), (1, 7), "{results:?}");
    let shard = results[0].1["shard"].as_str().unwrap().to_owned();
    assert!(results.iter().all(|(_, b)| b["shard"] == shard.as_str()
        && b["id"] == id.to_string()
        && b["name"] == "Acme"));
    // Exactly one placement, on the chosen shard, and the catalog says active.
    let placements = [owned(env.shard(0), id).await, owned(env.shard(1), id).await];
    let on = if shard == "shard-1" { 0 } else { 1 };
    assert_eq!(placements[on], 1);
    assert_eq!(placements[1 - on], 0);
    let c = env.cluster.catalog.client().await;
    let placement = tenants::lookup(&c, id).await.unwrap().unwrap();
    assert_eq!(
        (placement.shard_id.as_str(), placement.state.as_str()),
        (shard.as_str(), "active")
    );

    // The same id with another name is a conflict; the next company goes to the emptier shard.
    let (status, body) = create_company(&base, id, "Not Acme").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "company_exists");
    let (status, second) = create_company(&base, Uuid::now_v7(), "Globex").await;
    assert_eq!(status, 201);
    assert_ne!(second["shard"], shard.as_str(), "fewest tenants wins");

    // Without an id the gateway picks one.
    let mut r = http()
        .post(format!("{base}/v1/companies"))
        .bearer_auth(creator_token())
        .send_json(&json!({"name": "Initech"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body = r.json::<Value>().await.unwrap();
    assert!(Uuid::parse_str(body["id"].as_str().unwrap()).is_ok());

    // The new company is routed to its shard, with our request id on the job row.
    let mut r = http()
        .post(format!("{base}/v1/companies/{id}/jobs?x=1"))
        .bearer_auth(company_token(id, "member"))
        .insert_header(("x-request-id", "e2e-gateway-req-1"))
        .send_json(&json!({"kind": "echo", "params": {"hello": "world"}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get(SHARD_HEADER).unwrap(), shard.as_str());
    assert_eq!(
        r.headers().get("x-request-id").unwrap(),
        "e2e-gateway-req-1"
    );
    let job = r.json::<Value>().await.unwrap();
    assert_eq!(job["result"], json!({"hello": "world"}));
    let request_id: String = env
        .shard(on)
        .client()
        .await
        .query_one("SELECT request_id FROM jobs WHERE company_id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(request_id, "e2e-gateway-req-1");
    let r = http()
        .get(format!(
            "{base}/v1/companies/{id}/jobs/{}",
            job["id"].as_str().unwrap()
        ))
        .bearer_auth(company_token(id, "viewer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "viewers read");
}

#[actix_web::test]
async fn company_creation_refuses_bad_input() {
    let env = Env::new(1).await;
    let gw = env.gateway(&[]);
    let base = gw.url("gateway");
    let url = format!("{base}/v1/companies");
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("not json", "{".into(), 400, "invalid_json"),
        ("no name", "{}".into(), 400, "invalid_json"),
        (
            "unknown field",
            r#"{"name":"a","plan":"gold"}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "blank name",
            r#"{"name":"   "}"#.into(),
            400,
            "invalid_name",
        ),
        (
            "long name",
            json!({"name": "x".repeat(201)}).to_string(),
            400,
            "invalid_name",
        ),
        (
            "control chars",
            json!({"name": "a\u{7}b"}).to_string(),
            400,
            "invalid_name",
        ),
        (
            "a right-to-left override",
            json!({"name": "Acme\u{202e}gpj.exe"}).to_string(),
            400,
            "invalid_name",
        ),
        (
            "nothing visible",
            json!({"name": "\u{200b}\u{3164}"}).to_string(),
            400,
            "invalid_name",
        ),
        (
            "only joiners, a braille blank and a variation selector",
            json!({"name": "\u{200d}\u{2800}\u{200c}\u{fe0f}"}).to_string(),
            400,
            "invalid_name",
        ),
        (
            "id not a uuid",
            r#"{"id":"nope","name":"a"}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "name not a string",
            r#"{"name":42}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "oversized",
            json!({"name": "a", "pad": "x".repeat(600 * 1024)}).to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (what, body, status, code) in cases {
        let mut r = http()
            .post(&url)
            .bearer_auth(creator_token())
            .content_type("application/json")
            .send_body(body)
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{what}");
        let error = error_of!(r).error;
        assert_eq!(error.code, code, "{what}");
        // Nothing was created under an id the client did not send: none is named.
        assert_eq!(error.company_id, None, "{what}");
        if status == 413 {
            assert!(
                error.message.contains("larger than the limit of"),
                "{what}: the answer says what the limit is: {}",
                error.message
            );
        }
    }
    let mut r = http()
        .post(&url)
        .bearer_auth(creator_token())
        .content_type("text/plain")
        .send_body(r#"{"name":"a"}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(error_of!(r).error.code, "unsupported_media_type");
    let mut r = http()
        .post(&url)
        .bearer_auth(token(&["--user", "u"]))
        .send_json(&json!({"name": "a"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "missing scope");
    assert_eq!(error_of!(r).error.code, "forbidden");
    // Without the scope the body is not looked at: a malformed one is still 403.
    let mut r = http()
        .post(&url)
        .bearer_auth(token(&["--user", "u"]))
        .content_type("text/plain")
        .send_body("{not json")
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "missing scope, malformed body");
    assert_eq!(error_of!(r).error.code, "forbidden");
    let r = http()
        .post(&url)
        .send_json(&json!({"name": "a"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let n: i64 = env
        .cluster
        .catalog
        .client()
        .await
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing was created by bad requests");
    // Bytes that are not UTF-8 are malformed JSON; a body streamed past the limit without a
    // length is refused like a declared one; the wrong method is 405. Nothing is created.
    let mut r = http()
        .post(&url)
        .bearer_auth(creator_token())
        .content_type("application/json")
        .send_body(&b"{\"name\":\"caf\xe9\"}"[..])
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "not UTF-8");
    assert_eq!(error_of!(r).error.code, "invalid_json");
    let pad = json!({"name": "a", "pad": "x".repeat(600 * 1024)}).to_string();
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = pad
        .as_bytes()
        .chunks(16 * 1024)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let r = http()
        .post(&url)
        .bearer_auth(creator_token())
        .content_type("application/json")
        .send_stream(futures_util::stream::iter(chunks))
        .await;
    // A 413, or the connection closed on a client still sending.
    if let Ok(mut r) = r {
        assert_eq!(r.status(), 413, "streamed past the limit");
        let error = error_of!(r).error;
        assert_eq!(error.code, "payload_too_large");
        assert!(
            error.message.contains("larger than the limit of"),
            "{}",
            error.message
        );
    }
    for (method, path) in [
        (actix_web::http::Method::GET, "/v1/companies"),
        (actix_web::http::Method::PUT, "/v1/companies"),
        (actix_web::http::Method::POST, "/v1/shard-map/version"),
        (actix_web::http::Method::DELETE, "/v1/shard-map/version"),
    ] {
        let mut r = http()
            .request(method.clone(), format!("{base}{path}"))
            .bearer_auth(creator_token())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(
            error_of!(r).error.code,
            "method_not_allowed",
            "{method} {path}"
        );
    }
    let n = env
        .cluster
        .catalog
        .scalar("SELECT count(*) FROM tenants")
        .await;
    assert_eq!(n, 0, "nothing was created by bad requests");
    // A deleted company's id is never given out again, to its old name or another; and there
    // is nothing for an operator to finish.
    let gone = Uuid::now_v7();
    env.cluster
        .catalog
        .client()
        .await
        .execute(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ($1, 'Gone Ltd', 'shard-1', 'deleted')",
            &[&gone],
        )
        .await
        .unwrap();
    for name in ["Gone Ltd", "New Ltd"] {
        let mut r = http()
            .post(&url)
            .bearer_auth(creator_token())
            .send_json(&json!({"id": gone, "name": name}))
            .await
            .unwrap();
        assert_eq!(r.status(), 409, "{name}");
        let error = error_of!(r).error;
        assert_eq!(error.code, "company_exists");
        assert!(error.message.contains("deleted"), "{}", error.message);
    }
    let (code, out, err) = crate::support::run(
        tenantry()
            .env("TENANTRY_CATALOG__URL", &env.cluster.catalog.url)
            .args(["admin", "companies", "finish", &gone.to_string()]),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("deleted"), "{err}");
    let state = env
        .cluster
        .catalog
        .client()
        .await
        .query_one("SELECT state FROM tenants WHERE id = $1", &[&gone])
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(state, "deleted");
    // A company created before such names were refused, and left half-way, can still be
    // finished under its name; its name is not given to another id.
    let old = Uuid::now_v7();
    let hidden = "Old\u{00ad}Timer";
    env.cluster
        .catalog
        .client()
        .await
        .execute(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ($1, $2, 'shard-1', 'provisioning')",
            &[&old, &hidden],
        )
        .await
        .unwrap();
    let r = http()
        .post(&url)
        .bearer_auth(creator_token())
        .send_json(&json!({"id": old, "name": hidden}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the old creation is finished");
    let mut r = http()
        .post(&url)
        .bearer_auth(creator_token())
        .send_json(&json!({"id": Uuid::now_v7(), "name": hidden}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of!(r).error.code, "invalid_name");
    // A body sent without a Content-Type is read as JSON, as the jobs endpoint does; only
    // another declared type is 415.
    let r = http()
        .post(&url)
        .bearer_auth(creator_token())
        .send_body(json!({"name": "No Type"}).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "a body without a Content-Type");
}

fn mint(claims: &Claims, secret: &str) -> String {
    mint_hs256(secret.as_bytes(), claims).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[actix_web::test]
async fn the_edge_authenticates_and_authorizes_every_tenant_request() {
    let env = Env::new(1).await;
    let gw = env.gateway(&[]);
    let base = gw.url("gateway");
    let company = Uuid::now_v7();
    assert_eq!(create_company(&base, company, "Acme").await.0, 201);
    let jobs = format!("{base}/v1/companies/{company}/jobs");
    let claims = |companies: Vec<(Uuid, Role)>, exp: u64| Claims {
        sub: "u1".into(),
        exp,
        iat: now(),
        companies: companies.into_iter().collect(),
        scope: String::new(),
    };
    let valid = claims(vec![(company, Role::Member)], now() + 60);
    let stranger = Uuid::now_v7();
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("no token", None, 401),
        ("garbage", Some("not.a.jwt".into()), 401),
        (
            "forged",
            Some(mint(&valid, "another-secret-another-secret-0123456789")),
            401,
        ),
        (
            "expired",
            Some(mint(
                &claims(vec![(company, Role::Member)], now() - 600),
                SECRET,
            )),
            401,
        ),
        (
            "another company",
            Some(mint(
                &claims(vec![(stranger, Role::Admin)], now() + 60),
                SECRET,
            )),
            403,
        ),
        (
            "viewer writing",
            Some(mint(
                &claims(vec![(company, Role::Viewer)], now() + 60),
                SECRET,
            )),
            403,
        ),
    ];
    for (what, auth, status) in cases {
        let mut req = http().post(&jobs);
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let mut r = req
            .send_json(&json!({"kind": "echo", "params": {}}))
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{what}");
        let code = error_of!(r).error.code;
        assert_eq!(
            code,
            if status == 401 {
                "unauthorized"
            } else {
                "forbidden"
            },
            "{what}"
        );
    }
    // A company that does not exist answers exactly like one that exists but is not granted.
    let mut a = http()
        .get(format!(
            "{base}/v1/companies/{stranger}/jobs/{}",
            Uuid::now_v7()
        ))
        .bearer_auth(mint(&valid, SECRET))
        .send()
        .await
        .unwrap();
    let mut b = http()
        .get(format!(
            "{base}/v1/companies/{}/jobs/{}",
            Uuid::now_v7(),
            Uuid::now_v7()
        ))
        .bearer_auth(mint(&valid, SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (403, 403));
    assert_eq!(error_of!(a).error.message, error_of!(b).error.message);
    // The shard map is for operators.
    let r = http()
        .get(format!("{base}/v1/shard-map/version"))
        .bearer_auth(mint(&valid, SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Nothing above reached the shard.
    assert_eq!(env.jobs_on(0, company).await, 0);
}

#[actix_web::test]
async fn malformed_ids_unknown_companies_internal_paths_and_oversized_bodies_get_4xx() {
    let env = Env::new(1).await;
    let gw = env.gateway(&[]);
    let base = gw.url("gateway");
    let company = Uuid::now_v7();
    assert_eq!(create_company(&base, company, "Acme").await.0, 201);
    let unknown = Uuid::now_v7();
    let auth = token(&[
        "--user",
        "u1",
        "--company",
        &format!("{company}:admin"),
        "--company",
        &format!("{unknown}:admin"),
        "--company",
        "00000000-0000-0000-0000-000000000000:admin",
    ]);
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("{base}/v1/companies/not-a-uuid/jobs"),
            400,
            "invalid_id",
        ),
        (
            format!("{base}/v1/companies/{company}x/jobs"),
            400,
            "invalid_id",
        ),
        (
            format!("{base}/v1/companies/{unknown}/jobs"),
            404,
            "not_found",
        ),
        (format!("{base}/internal/placements"), 404, "not_found"),
        (
            format!("{base}/v1/companies/{company}/%2e%2e/%2e%2e/internal/placements"),
            400,
            "invalid_path",
        ),
        (
            format!("{base}/v1/companies/{company}/jobs%2F..%2Finternal"),
            400,
            "invalid_path",
        ),
    ];
    for (url, status, code) in cases {
        let mut r = http()
            .post(&url)
            .bearer_auth(&auth)
            .send_json(&json!({"kind": "echo", "params": {}}))
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{url}");
        assert_eq!(error_of!(r).error.code, code, "{url}");
    }
    // Over the gateway's body limit (512KiB here): with a length, and streamed without one.
    let jobs = format!("{base}/v1/companies/{company}/jobs");
    let big = json!({"kind": "echo", "params": {"pad": "x".repeat(600 * 1024)}}).to_string();
    let mut r = http()
        .post(&jobs)
        .bearer_auth(&auth)
        .content_type("application/json")
        .send_body(big.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_of!(r).error.code, "payload_too_large");
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = big
        .as_bytes()
        .chunks(16 * 1024)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let r = http()
        .post(&jobs)
        .bearer_auth(&auth)
        .content_type("application/json")
        .send_stream(futures_util::stream::iter(chunks))
        .await;
    // The gateway refuses mid-stream: a 413, or the connection closed on a client still sending.
    if let Ok(mut r) = r {
        assert_eq!(r.status(), 413);
        assert_eq!(error_of!(r).error.code, "payload_too_large");
    }
    // Under the gateway's limit but over the retry buffer: streamed to the shard, which
    // applies its own params limit.
    let mid = json!({"kind": "echo", "params": {"pad": "x".repeat(100 * 1024)}});
    let mut r = http()
        .post(&jobs)
        .bearer_auth(&auth)
        .send_json(&mid)
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        error_of!(r).error.code,
        "params_too_large",
        "the shard answered"
    );
    // A head with nearly as many headers as a listener takes: the headers the gateway adds
    // must not push it over the shard's limit into a 5xx for the caller's input.
    for extra in [88, 92, 94, 100] {
        let mut req = http().post(&jobs).bearer_auth(&auth);
        for i in 0..extra {
            req = req.insert_header((format!("x-h-{i}"), "v"));
        }
        match req.send_json(&json!({"kind": "echo", "params": {}})).await {
            Ok(r) => assert!(
                r.status().is_success() || r.status().is_client_error(),
                "{extra} headers: {}",
                r.status()
            ),
            // Refused by the gateway's own listener, which closes the connection.
            Err(e) => assert!(extra > 90, "{extra} headers: {e}"),
        }
    }
    assert!(
        env.jobs_on(0, company).await <= 4,
        "only requests answered 2xx enqueued"
    );
    // The same for a head whose size nears the limit (128 KiB), in steps finer than what the
    // gateway adds: one long header, the gateway's own additions pushing the forwarded head
    // past what the shard takes: 2xx below the shard's limit, the gateway's own JSON 431
    // between the two limits, its listener's bare 431 above its own. (A shard closing on a
    // POST's head used to show as a 502 now and then.)
    let before = env.jobs_on(0, company).await;
    let (mut answered, mut refused_here) = (0, 0);
    for size in (129_500..131_200).step_by(25) {
        let r = http()
            .post(&jobs)
            .bearer_auth(&auth)
            .insert_header(("x-junk", "j".repeat(size - 600)))
            .send_json(&json!({"kind": "echo", "params": {}}))
            .await;
        if let Ok(mut r) = r {
            let status = r.status();
            assert!(
                status.is_success() || status == 431,
                "a head of about {size} bytes: {status}"
            );
            answered += i64::from(status.is_success());
            // The gateway's own refusal, in the error shape (its listener's bare 431 has no
            // body, for heads over its own limit).
            let body = r.body().await.unwrap_or_default();
            if status == 431 && !body.is_empty() {
                let error: tenantry_core::error::ErrorBody = serde_json::from_slice(&body).unwrap();
                assert_eq!(error.error.code, "headers_too_large");
                refused_here += 1;
            }
        }
    }
    assert!(
        refused_here > 0,
        "some heads fit the gateway but not, with its additions, the shard"
    );
    assert!(answered > 0, "heads below the shard's limit are forwarded");
    assert_eq!(
        env.jobs_on(0, company).await,
        before + answered,
        "only requests answered 2xx enqueued"
    );
}

#[actix_web::test]
async fn placement_changes_reach_both_gateways_through_rabbitmq() {
    let env = Env::new(2).await;
    let (g1, g2) = (env.gateway(&[]), env.gateway(&[]));
    let (b1, b2) = (g1.url("gateway"), g2.url("gateway"));
    let company = Uuid::now_v7();
    let (_, created) = create_company(&b1, company, "Acme").await;
    let from = if created["shard"] == "shard-1" { 0 } else { 1 };
    let to = 1 - from;
    let auth = company_token(company, "member");
    for b in [&b1, &b2] {
        assert_eq!(post_job(b, company, &auth).await, (200, shard_id(from)));
    }
    let before = [
        metric(&b1, ROUTE_UPDATES).await,
        metric(&b2, ROUTE_UPDATES).await,
    ];
    env.move_company(company, from, to).await;
    for (b, seen) in [(&b1, before[0]), (&b2, before[1])] {
        assert!(
            until_metric(b, ROUTE_UPDATES, seen + 1.0, Duration::from_secs(10)).await > seen,
            "{b} heard of the change and applied it"
        );
    }
    for b in [&b1, &b2] {
        assert_eq!(
            post_job(b, company, &auth).await,
            (200, shard_id(to)),
            "{b}"
        );
        assert_eq!(
            metric(b, MISDIRECTED).await,
            0.0,
            "{b} routed by the message"
        );
    }
    assert_eq!(env.jobs_on(from, company).await, 2);
    assert_eq!(env.jobs_on(to, company).await, 2);
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn with_rabbitmq_unreachable_a_stale_route_never_writes_to_the_old_shard() {
    let env = Env::new(2).await;
    let rabbit: SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let proxy = TcpProxy::start(rabbit).await;
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let mut gw = start_gateway(&mut env.gateway_cmd(
        &amqp,
        &[
            ("TENANTRY_GATEWAY__DISCONNECTED_TTL", "30s"),
            ("TENANTRY_GATEWAY__RETRY_BUFFER", "1KiB"),
        ],
    ));
    let base = gw.url("gateway");
    let company = Uuid::now_v7();
    let (_, created) = create_company(&base, company, "Acme").await;
    let from = if created["shard"] == "shard-1" { 0 } else { 1 };
    let to = 1 - from;
    let auth = company_token(company, "member");
    assert_eq!(post_job(&base, company, &auth).await, (200, shard_id(from)));

    // RabbitMQ goes away; the company moves; the gateway's cached route is now wrong.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.move_company(company, from, to).await;
    assert_eq!(
        post_job(&base, company, &auth).await,
        (200, shard_id(to)),
        "421 from the old shard, reload, retry on the new one"
    );
    assert_eq!(metric(&base, MISDIRECTED).await, 1.0);
    assert_eq!(
        env.jobs_on(from, company).await,
        1,
        "no write on the old shard"
    );
    assert_eq!(env.jobs_on(to, company).await, 1);

    // RabbitMQ comes back: the gateway resubscribes, and messages route again.
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut resubscribed = false;
    while !resubscribed && Instant::now() < deadline {
        resubscribed = gw
            .drain_logs()
            .iter()
            .any(|l| l.contains("subscribed to shard-map changes"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resubscribed, "the gateway reconnected");
    assert_eq!(
        metric(&base, "tenantry_gateway_bus_reconnects_total").await,
        1.0
    );
    assert_eq!(post_job(&base, company, &auth).await, (200, shard_id(to)));
    let seen = metric(&base, ROUTE_UPDATES).await;
    env.move_company(company, to, from).await;
    assert!(
        until_metric(&base, ROUTE_UPDATES, seen + 1.0, Duration::from_secs(10)).await > seen,
        "the move back was applied from its message"
    );
    assert_eq!(post_job(&base, company, &auth).await, (200, shard_id(from)));
    assert_eq!(metric(&base, MISDIRECTED).await, 1.0, "no new 421");

    // Stale again, with a body too large to hold for a retry: the 421 cannot be retried on
    // the spot, but the stale route must go, or every retry the 503 invites meets it again.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.move_company(company, from, to).await;
    let big = || async {
        http()
            .post(format!("{base}/v1/companies/{company}/jobs"))
            .bearer_auth(&auth)
            .send_json(&json!({"kind": "echo", "params": {"pad": "x".repeat(4096)}}))
            .await
            .unwrap()
    };
    let mut r = big().await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_of!(r).error.code, "shard_map_stale");
    let r = big().await;
    assert_eq!(r.status(), 200, "the retry goes where the catalog says");
    assert_eq!(
        r.headers().get(SHARD_HEADER).unwrap(),
        shard_id(to).as_str()
    );
    assert_eq!(
        env.jobs_on(from, company).await,
        2,
        "no write on the old shard"
    );
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn a_stopped_shard_fails_only_its_own_companies() {
    let mut env = Env::new(2).await;
    let gw = env.gateway(&[("TENANTRY_GATEWAY__CONNECT_TIMEOUT", "300ms")]);
    let base = gw.url("gateway");
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (_, ca) = create_company(&base, a, "A").await;
    let (_, cb) = create_company(&base, b, "B").await;
    assert_ne!(ca["shard"], cb["shard"]);
    let b_index = if cb["shard"] == "shard-1" { 0 } else { 1 };
    env.nodes[b_index] = None; // killed
    let (ta, tb) = (company_token(a, "member"), company_token(b, "member"));
    for _ in 0..3 {
        let started = Instant::now();
        let mut r = http()
            .post(format!("{base}/v1/companies/{b}/jobs"))
            .bearer_auth(&tb)
            .send_json(&json!({"kind": "echo", "params": {}}))
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        assert_eq!(error_of!(r).error.code, "shard_unavailable");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            post_job(&base, a, &ta).await.0,
            200,
            "the other shard serves"
        );
    }
}

/// One shard, a gateway (`extra`: env overrides) in front of it, and a company created through
/// it: (environment, gateway, its URL, the company, a member's token).
async fn one_company(extra: &[(&str, &str)]) -> (Env, Served, String, Uuid, String) {
    let env = Env::new(1).await;
    let gw = env.gateway(extra);
    let base = gw.url("gateway");
    let company = Uuid::now_v7();
    assert_eq!(create_company(&base, company, "Acme").await.0, 201);
    let auth = company_token(company, "member");
    (env, gw, base, company, auth)
}

#[actix_web::test]
async fn a_slow_job_answers_202_with_a_location_that_long_polls_through_the_gateway() {
    // The shard waits api.sync_wait (3 s) before its 202; the gateway's own timeout (5 s) is
    // shorter than the long poll that follows, which it must let run its course.
    let (_env, _gw, base, company, auth) =
        one_company(&[("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "5s")]).await;
    slow_job_202_then_done(&base, company, &auth, 9000, "15s").await;
}

/// What the stand-in shard received: (path and query, headers, body length) per request.
type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>, usize)>>>;

/// A stand-in shard API: records what it receives; `/hang` never answers in time, `/stall`
/// (`/stall503`) sends a 200 (503) head and a first chunk and then nothing, `/slow`
/// answers after 1.5 s.
struct FakeShard {
    url: String,
    seen: Seen,
    _server: actix_web::dev::ServerHandle,
}

impl FakeShard {
    /// Waits until `n` requests whose path ends with `suffix` have reached it (at most 10 s).
    async fn until_seen(&self, suffix: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = || {
            let seen = self.seen.lock().unwrap();
            seen.iter()
                .filter(|(uri, _, _)| uri.ends_with(suffix))
                .count()
        };
        while seen() < n {
            assert!(
                Instant::now() < deadline,
                "{n} requests for …{suffix} never reached the shard"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn fake_shard() -> FakeShard {
    let seen: Seen = Default::default();
    let record = web::Data::new(seen.clone());
    let server = HttpServer::new(move || {
        App::new().app_data(record.clone()).default_service(web::to(
            |req: HttpRequest, body: web::Bytes, seen: web::Data<Seen>| async move {
                // Recorded on arrival (the gateway's own health checks are not), so a test can
                // wait for a request to be in flight.
                if req.path() != "/readyz" {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    let uri = req.uri().to_string();
                    seen.lock().unwrap().push((uri, headers, body.len()));
                }
                if req.path().ends_with("/hang") {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                }
                if req.path().ends_with("/slow") {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                if req.path().ends_with("/big") {
                    // More than the sockets between a caller and the shard can buffer.
                    return HttpResponse::Ok().body(vec![b'b'; 32 << 20]);
                }
                if req.path().ends_with("/stall") || req.path().ends_with("/stall503") {
                    // The head and a first chunk, then nothing for 20 s.
                    use futures_util::StreamExt as _;
                    let body = futures_util::stream::once(async {
                        Ok::<_, actix_web::Error>(web::Bytes::from_static(b"{\"partial\":"))
                    })
                    .chain(futures_util::stream::once(async {
                        tokio::time::sleep(Duration::from_secs(20)).await;
                        Ok(web::Bytes::from_static(b"1}"))
                    }));
                    return if req.path().ends_with("/stall503") {
                        HttpResponse::ServiceUnavailable().streaming(body)
                    } else {
                        HttpResponse::Ok().streaming(body)
                    };
                }
                HttpResponse::Ok()
                    .insert_header(("x-upstream", "yes"))
                    .insert_header(("proxy-authenticate", "Basic"))
                    .json(json!({"bytes": body.len()}))
            },
        ))
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    FakeShard {
        url: format!("http://{addr}"),
        seen,
        _server: handle,
    }
}

/// A gateway in front of a stand-in shard that holds `companies` (`extra`: env overrides).
struct FakeEnv {
    fake: FakeShard,
    catalog: TestDb,
    broker: TestBroker,
    gw: Served,
    base: String,
}

async fn fake_env(companies: &[Uuid], extra: &[(&str, &str)]) -> FakeEnv {
    fake_env_via(companies, &amqp_url(), extra).await
}

/// [`fake_env`] whose gateway reaches RabbitMQ at `amqp` (say, through a proxy).
async fn fake_env_via(companies: &[Uuid], amqp: &str, extra: &[(&str, &str)]) -> FakeEnv {
    let fake = fake_shard().await;
    let catalog = one_shard_catalog(vec![fake.url.clone()], companies[0]).await;
    for c in &companies[1..] {
        catalog
            .client()
            .await
            .execute(
                "INSERT INTO tenants (id, name, shard_id, state) VALUES ($1, 'Fake', 'shard-1', 'active')",
                &[c],
            )
            .await
            .unwrap();
    }
    let (broker, gw) = gateway_via(&catalog.url, amqp, extra).await;
    let base = gw.url("gateway");
    FakeEnv {
        fake,
        catalog,
        broker,
        gw,
        base,
    }
}

/// A catalog whose one shard, `shard-1`, has the API `endpoints`, with `company` placed on it.
async fn one_shard_catalog(endpoints: Vec<String>, company: Uuid) -> TestDb {
    let catalog = TestDb::new(tenantry_testkit::Schema::Catalog).await;
    register(
        &catalog,
        &[spec("shard-1", "postgres://nowhere/x", endpoints)],
    )
    .await;
    catalog
        .client()
        .await
        .execute(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ($1, 'Fake', 'shard-1', 'active')",
            &[&company],
        )
        .await
        .unwrap();
    catalog
}

#[actix_web::test]
async fn forwarding_keeps_path_query_and_end_to_end_headers_and_streams_large_bodies() {
    let company = Uuid::now_v7();
    let env = fake_env(&[company], &[]).await;
    let (fake, broker, base) = (&env.fake, &env.broker, env.base.clone());
    let auth = company_token(company, "admin");
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut r = http()
        .get(format!(
            "{base}/v1/companies/{company}/things/a.b?q=1&r=%20x"
        ))
        .bearer_auth(&auth)
        .insert_header(("x-request-id", "trace-me-1"))
        .insert_header(("traceparent", trace))
        .insert_header(("x-custom", "kept"))
        .append_header(("x-forwarded-for", "203.0.113.7"))
        .append_header(("x-forwarded-for", "198.51.100.2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("x-upstream").unwrap(), "yes");
    assert!(
        r.headers().get("proxy-authenticate").is_none(),
        "hop-by-hop headers of the shard's answer are dropped"
    );
    assert_eq!(r.headers().get(SHARD_HEADER).unwrap(), "shard-1");
    assert_eq!(r.headers().get("x-request-id").unwrap(), "trace-me-1");
    let _ = r.body().await.unwrap();
    let (uri, headers, _) = fake.seen.lock().unwrap()[0].clone();
    assert_eq!(
        uri,
        format!("/v1/companies/{company}/things/a.b?q=1&r=%20x")
    );
    let h = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h("x-request-id").as_deref(), Some("trace-me-1"));
    assert_eq!(h("x-custom").as_deref(), Some("kept"));
    assert_eq!(
        h("authorization"),
        Some(format!("Bearer {auth}")),
        "the shard re-verifies"
    );
    // Every line the caller's side sent, in order, then the gateway's peer.
    assert_eq!(
        h("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 198.51.100.2, 127.0.0.1")
    );
    assert_eq!(
        headers
            .iter()
            .filter(|(k, _)| k == "x-forwarded-for")
            .count(),
        1
    );
    let tp = h("traceparent").unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "a new parent id for this hop: {tp}"
    );

    // Headers the caller names in `Connection` are for the gateway alone (awc manages its own
    // Connection header, so this request is written by hand).
    let addr = base.trim_start_matches("http://").to_owned();
    let raw = format!(
        "GET /v1/companies/{company}/hop HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\
         Connection: close, x-hop\r\nX-Hop: dropped\r\nKeep-Alive: timeout=5\r\nX-Also: kept\r\n\r\n"
    );
    let answer = send_raw(&addr, &raw);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_, headers, _) = fake.seen.lock().unwrap()[1].clone();
    assert!(headers.iter().any(|(k, v)| k == "x-also" && v == "kept"));
    assert!(
        !headers
            .iter()
            .any(|(k, _)| k == "x-hop" || k == "keep-alive"),
        "{headers:?}"
    );

    // `Expect: 100-continue` is the gateway's to answer (sent on to the shard with no body to
    // follow, it made the shard connection fail and the caller get 503), and every `Proxy-*`
    // header is hop-by-hop.
    let raw = format!(
        "GET /v1/companies/{company}/expect HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\
         Connection: close\r\nExpect: 100-continue\r\nProxy-Foo: dropped\r\n\r\n"
    );
    let answer = send_raw(&addr, &raw);
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    let (_, headers, _) = fake.seen.lock().unwrap()[2].clone();
    assert!(
        !headers
            .iter()
            .any(|(k, _)| k == "expect" || k == "proxy-foo"),
        "{headers:?}"
    );

    // A body over the retry buffer (64KiB) is streamed through intact.
    let body = vec![b'z'; 200 * 1024];
    let mut r = http()
        .put(format!("{base}/v1/companies/{company}/blob"))
        .bearer_auth(&auth)
        .send_body(body)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], 200 * 1024);

    // A chunked body that turns malformed is the caller's fault: 400 `invalid_body`, whether it
    // breaks within the held 64 KiB or after the gateway has begun streaming it to the shard.
    for valid in [1024, 66 * 1024] {
        let raw = format!(
            "PUT /v1/companies/{company}/broken HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\
             Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n{valid:x}\r\n{}\r\nzz\r\n\r\n",
            "b".repeat(valid)
        );
        let answer = send_raw(&addr, &raw);
        assert!(answer.starts_with("HTTP/1.1 400"), "{valid}: {answer}");
        assert!(answer.contains("invalid_body"), "{valid}: {answer}");
    }
    assert!(
        fake.seen
            .lock()
            .unwrap()
            .iter()
            .all(|(uri, _, _)| !uri.ends_with("/broken")),
        "the shard's handler never saw a request whose body broke"
    );
    broker.cleanup().await;
}

/// Sends `raw` (a whole HTTP/1.1 request that asks to close the connection) to `addr` from a
/// blocking thread and returns everything the server wrote back.
fn send_raw(addr: &str, raw: &str) -> String {
    let (addr, raw) = (addr.to_owned(), raw.to_owned());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .join()
    .unwrap()
}

/// An endpoint that reads each request in full and closes the connection without answering,
/// as a shard node killed mid-request does; counts the `/v1/` requests it took in. With
/// `reset`, it closes with a TCP reset, as a host whose process died with the request unread
/// (or whose connection a firewall cut) does, rather than with an orderly close.
fn closing_endpoint(reset: bool) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn);
                let (mut first, mut length) = (String::new(), 0usize);
                if r.read_line(&mut first).is_err() {
                    return;
                }
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = r.read_exact(&mut body);
                if first
                    .split(' ')
                    .nth(1)
                    .is_some_and(|p| p.starts_with("/v1/"))
                {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                if reset {
                    socket2::SockRef::from(r.get_ref())
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
            });
        }
    });
    (url, hits)
}

#[actix_web::test]
async fn a_post_is_not_sent_again_after_an_endpoint_closed_the_connection_but_a_get_is() {
    closed_before_answering(false).await;
}

#[actix_web::test]
async fn a_post_is_not_sent_again_after_an_endpoint_reset_the_connection_but_a_get_is() {
    closed_before_answering(true).await;
}

async fn closed_before_answering(reset: bool) {
    // Both endpoints of the shard take the request in and close without answering. A POST may
    // have been acted on (a job created), so it goes to one endpoint only; a GET goes to both.
    let company = Uuid::now_v7();
    let (a, a_hits) = closing_endpoint(reset);
    let (b, b_hits) = closing_endpoint(reset);
    let hits = || {
        a_hits.load(std::sync::atomic::Ordering::SeqCst)
            + b_hits.load(std::sync::atomic::Ordering::SeqCst)
    };
    let catalog = one_shard_catalog(vec![a, b], company).await;
    let (broker, gw) = gateway_on(&catalog.url, &[]).await;
    let base = gw.url("gateway");
    let auth = company_token(company, "admin");

    let mut r = http()
        .post(format!("{base}/v1/companies/{company}/jobs"))
        .bearer_auth(&auth)
        .send_json(&json!({"kind": "echo", "params": {}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let e = error_of!(r);
    assert_eq!(e.error.code, "bad_gateway");
    assert!(
        e.error.message.contains("may have been received"),
        "the caller learns why it was not sent again: {}",
        e.error.message
    );
    assert_eq!(hits(), 1, "the POST reached one endpoint only");

    assert_eq!(
        get_a_job(&base, company, &auth).await,
        503,
        "no endpoint answered the GET"
    );
    assert_eq!(hits(), 3, "the GET was tried on both endpoints");
    broker.cleanup().await;
}

/// The status of a GET of some job of `company` through the gateway at `base`.
async fn get_a_job(base: &str, company: Uuid, auth: &str) -> awc::http::StatusCode {
    http()
        .get(format!(
            "{base}/v1/companies/{company}/jobs/{}",
            Uuid::now_v7()
        ))
        .bearer_auth(auth)
        .send()
        .await
        .unwrap()
        .status()
}

#[actix_web::test]
async fn a_shard_whose_endpoints_are_down_costs_no_warning_per_request_and_endpoint() {
    // Each request to a shard whose endpoints all refuse tries every endpoint (the health
    // check may lag behind a recovery). Saying so at every try made each request several
    // warnings more during an outage; an endpoint going down is said once.
    let company = Uuid::now_v7();
    let refusing = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let catalog = one_shard_catalog(vec![refusing(), refusing()], company).await;
    let (broker, mut gw) = gateway_on(&catalog.url, &[]).await;
    let base = gw.url("gateway");
    let auth = company_token(company, "admin");
    for _ in 0..5 {
        assert_eq!(get_a_job(&base, company, &auth).await, 503);
    }
    let lines = gw.stop_and_read_logs();
    let count = |start: &str| crate::support::log_count(&lines, start);
    let requests = lines.iter().filter(|v| v["message"] == "request").count();
    assert_eq!(requests, 5, "each request still has its line");
    // Each endpoint went down once: said once, by the request or the health check that found
    // it first.
    let down =
        count("cannot connect to shard endpoint") + count("shard endpoint failed its health check");
    assert_eq!(down, 2, "once per endpoint, not per request");
    broker.cleanup().await;
}

#[actix_web::test]
async fn one_company_cannot_hold_every_slot_of_its_shard() {
    // The rate limit bounds how often a company sends, not how long its requests last: long
    // polls, slow uploads or unread answers would otherwise let it take all of its shard's
    // in-flight slots from the shard's other companies.
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let env = fake_env(
        &[a, b],
        &[
            ("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "3s"),
            ("TENANTRY_GATEWAY__MAX_IN_FLIGHT_PER_COMPANY", "2"),
        ],
    )
    .await;
    let base = env.base.clone();
    let (auth_a, auth_b) = (company_token(a, "admin"), company_token(b, "admin"));
    let hanging: Vec<_> = (0..2)
        .map(|_| {
            let (url, auth) = (format!("{base}/v1/companies/{a}/hang"), auth_a.clone());
            actix_web::rt::spawn(async move {
                http()
                    .get(url)
                    .bearer_auth(auth)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    env.fake.until_seen("/hang", 2).await;
    let quick = |company: Uuid, auth: &str| {
        http()
            .get(format!("{base}/v1/companies/{company}/quick"))
            .bearer_auth(auth)
            .send()
    };
    let mut r = quick(a, &auth_a).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(error_of!(r).error.code, "rate_limited");
    assert_eq!(
        quick(b, &auth_b).await.unwrap().status(),
        200,
        "the shard's other companies are served"
    );
    for h in hanging {
        assert_eq!(h.await.unwrap(), 504);
    }
    assert_eq!(
        quick(a, &auth_a).await.unwrap().status(),
        200,
        "its places are given back once its requests end"
    );
}

#[actix_web::test]
async fn a_hanging_shard_answers_504_on_time_and_its_in_flight_cap_sheds_load() {
    let company = Uuid::now_v7();
    let env = fake_env(
        &[company],
        &[
            ("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "700ms"),
            ("TENANTRY_GATEWAY__MAX_IN_FLIGHT_PER_SHARD", "1"),
        ],
    )
    .await;
    let (broker, base) = (&env.broker, env.base.clone());
    let auth = company_token(company, "admin");
    let hang = format!("{base}/v1/companies/{company}/hang");
    let started = Instant::now();
    let mut r = http().get(&hang).bearer_auth(&auth).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    assert_eq!(error_of!(r).error.code, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // While one request hangs, the shard's single slot is taken: the next is refused at once.
    let (h2, a2) = (hang.clone(), auth.clone());
    let hanging = actix_web::rt::spawn(async move {
        http()
            .get(h2)
            .bearer_auth(a2)
            .send()
            .await
            .unwrap()
            .status()
    });
    // Wait until the second hanging request has reached the shard (and holds its slot).
    env.fake.until_seen("/hang", 2).await;
    let started = Instant::now();
    let mut r = http()
        .get(format!("{base}/v1/companies/{company}/quick"))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_of!(r).error.code, "shard_busy");
    assert!(
        started.elapsed() < Duration::from_millis(650),
        "refused at once, not after the upstream timeout"
    );
    assert_eq!(hanging.await.unwrap(), 504);

    // A long poll (`?wait=`) is given its wait on top of the upstream timeout; a wait the API
    // would refuse (not a duration, over 30 s) is given nothing.
    let slow = format!("{base}/v1/companies/{company}/slow");
    let started = Instant::now();
    let r = http()
        .get(format!("{slow}?wait=2s"))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a long poll outlives gateway.upstream_timeout"
    );
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // So does a HEAD long poll.
    let r = http()
        .head(format!("{slow}?wait=2s"))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a HEAD long poll outlives it too");
    // (The last is a sum humantime would panic on, dropping the connection unanswered.)
    for query in [
        "",
        "?wait=31s",
        "?wait=soon",
        "?wait=18446744073709551615s1000000000ns",
    ] {
        let r = http()
            .get(format!("{slow}{query}"))
            .bearer_auth(&auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504, "{query:?}");
    }
    // Only reads long-poll: a write's ?wait= buys no time.
    let r = http()
        .post(format!("{slow}?wait=2s"))
        .bearer_auth(&auth)
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(r.status(), 504);

    // A body too large to hold for a replay (over `gateway.retry_buffer`, 64 KiB) is streamed
    // to the shard; a shard that takes it whole and then hangs is answered 504 on time too.
    let big = vec![b' '; 100 * 1024];
    let started = Instant::now();
    let mut r = http()
        .post(&hang)
        .bearer_auth(&auth)
        .insert_header(("content-type", "application/json"))
        .send_body(big)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    assert_eq!(error_of!(r).error.code, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let streamed = env
        .fake
        .seen
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(uri, _, _)| uri.ends_with("/hang"))
        .map(|(_, _, len)| *len);
    assert_eq!(streamed, Some(100 * 1024), "the shard got the whole body");

    // A shard that sends its head and then stalls has its answer cut off after the upstream
    // timeout, and gives its slot back then, not when the caller gives up.
    let addr = base.trim_start_matches("http://").to_owned();
    let raw = format!(
        "GET /v1/companies/{company}/stall HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\
         Connection: close\r\n\r\n"
    );
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || send_raw(&addr, &raw)),
    )
    .await
    .expect("the stalled answer ends within the upstream timeout, not after 20 s")
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("partial"), "{answer}");
    assert!(
        !answer.ends_with("0\r\n\r\n"),
        "a cut-off answer has no last chunk, so the caller can tell: {answer:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    let quick = || async {
        http()
            .get(format!("{base}/v1/companies/{company}/quick"))
            .bearer_auth(&auth)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(quick().await, 200, "the shard's one slot is free again");
    // The same for a 503 whose body stalls (the gateway reads it to tell a frozen company):
    // the caller gets the 503 within the upstream timeout, and the slot comes back.
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        http()
            .get(format!("{base}/v1/companies/{company}/stall503"))
            .bearer_auth(&auth)
            .send(),
    )
    .await
    .expect("a stalled 503 is answered within the upstream timeout, not after 20 s")
    .unwrap();
    assert_eq!(r.status(), 503);
    // In the error shape, not the shard's headers with an empty body.
    let mut r = r;
    assert_eq!(error_of!(r).error.code, "shard_unavailable");
    assert_eq!(
        metric(
            &base,
            "tenantry_gateway_answers_stalled_total{shard=\"shard-1\"}"
        )
        .await,
        1.0,
        "the cut-off answer was counted"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(quick().await, 200, "the shard's one slot is free again");
    broker.cleanup().await;
}

#[actix_web::test]
async fn a_hanging_shard_ties_up_only_its_own_connections() {
    // Two shards. The first stops answering and takes every connection the gateway may open to
    // it; requests to the second must still go through at once.
    let (slow_co, other_co) = (Uuid::now_v7(), Uuid::now_v7());
    let (hanging, healthy) = (fake_shard().await, fake_shard().await);
    let catalog = one_shard_catalog(vec![hanging.url.clone()], slow_co).await;
    register(
        &catalog,
        &[spec(
            "shard-2",
            "postgres://nowhere/y",
            vec![healthy.url.clone()],
        )],
    )
    .await;
    catalog
        .client()
        .await
        .execute(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ($1, 'Other', 'shard-2', 'active')",
            &[&other_co],
        )
        .await
        .unwrap();
    let (broker, gw) = gateway_on(
        &catalog.url,
        &[
            ("TENANTRY_GATEWAY__UPSTREAM_CONNECTIONS", "2"),
            ("TENANTRY_GATEWAY__MAX_IN_FLIGHT_PER_SHARD", "8"),
            ("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "30s"),
        ],
    )
    .await;
    let base = gw.url("gateway");
    let mut stuck = Vec::new();
    for _ in 0..3 {
        let (url, auth) = (
            format!("{base}/v1/companies/{slow_co}/hang"),
            company_token(slow_co, "admin"),
        );
        stuck.push(actix_web::rt::spawn(async move {
            let _ = awc::Client::builder()
                .timeout(Duration::from_secs(30))
                .finish()
                .get(url)
                .bearer_auth(auth)
                .send()
                .await;
        }));
    }
    // Both of the hanging shard's connections are taken once it has two requests in hand.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hanging.seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hanging.seen.lock().unwrap().len(), 2);

    let other_auth = company_token(other_co, "admin");
    let started = Instant::now();
    let r = http()
        .get(format!("{base}/v1/companies/{other_co}/quick"))
        .bearer_auth(other_auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get(SHARD_HEADER).unwrap(), "shard-2");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the other shard answered at once, not when a connection came free: {:?}",
        started.elapsed()
    );
    for s in stuck {
        s.abort();
    }
    broker.cleanup().await;
}

#[actix_web::test]
async fn a_company_over_its_rate_gets_429_and_others_do_not() {
    let (company, other) = (Uuid::now_v7(), Uuid::now_v7());
    let env = fake_env(
        &[company, other],
        &[
            ("TENANTRY_GATEWAY__RATE_LIMIT", "1"),
            ("TENANTRY_GATEWAY__RATE_BURST", "2"),
        ],
    )
    .await;
    let (broker, base) = (&env.broker, env.base.clone());
    let auth = company_token(company, "admin");
    let get = |c: Uuid, auth: String| {
        let url = format!("{base}/v1/companies/{c}/x");
        async move { http().get(url).bearer_auth(auth).send().await.unwrap() }
    };
    // Three at once, so they arrive within the second that refills one token.
    let mut answers = futures_util::future::join_all([
        get(company, auth.clone()),
        get(company, auth.clone()),
        get(company, auth.clone()),
    ])
    .await;
    answers.sort_by_key(|r| r.status());
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [200, 200, 429], "a burst of two, then refused");
    let r = &mut answers[2];
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_of!(r).error.code, "rate_limited");
    assert_eq!(
        get(other, company_token(other, "viewer")).await.status(),
        200,
        "another company has its own budget"
    );
    broker.cleanup().await;
}

#[actix_web::test]
async fn a_frozen_company_is_held_until_the_freeze_ends_or_the_wait_runs_out() {
    let (env, mut gw, base, company, auth) =
        one_company(&[("TENANTRY_GATEWAY__FREEZE_WAIT", "1500ms")]).await;
    own(env.shard(0), company, "frozen").await;
    let (b, a) = (base.clone(), auth.clone());
    let held = actix_web::rt::spawn(async move { post_job(&b, company, &a).await });
    // Unfreeze once the gateway has met the freeze and is holding the request.
    let frozen = "tenantry_gateway_retries_total{reason=\"frozen\"}";
    assert!(until_metric(&base, frozen, 1.0, Duration::from_secs(10)).await >= 1.0);
    own(env.shard(0), company, "owned").await;
    assert_eq!(
        held.await.unwrap().0,
        200,
        "the freeze showed up as latency"
    );

    own(env.shard(0), company, "frozen").await;
    let started = Instant::now();
    let mut r = http()
        .post(format!("{base}/v1/companies/{company}/jobs"))
        .bearer_auth(&auth)
        .send_json(&json!({"kind": "echo", "params": {}}))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_of!(r).error.code, "tenant_frozen");
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(
        env.jobs_on(0, company).await,
        1,
        "only the first job was written"
    );
    // Both holds are in the gateway's log, and the 503's request line says why.
    let lines = gw.stop_and_read_logs();
    log_line(
        &lines,
        "the company's move ended while the request was held",
    );
    let gave_up = log_line(&lines, "the company stayed frozen for a move");
    assert_eq!(gave_up["span"]["error.code"], "tenant_frozen");
    let answered = lines
        .iter()
        .find(|v| v["message"] == "request" && v["http.status"] == 503)
        .unwrap_or_else(|| panic!("no request line for the 503: {lines:?}"));
    assert_eq!(answered["span"]["error.code"], "tenant_frozen");
}

#[actix_web::test]
async fn es256_tokens_from_admin_token_are_accepted_at_the_edge_and_hs256_ones_refused() {
    let company = Uuid::now_v7();
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/keys");
    let public = format!("{keys}/es256-public.pem");
    let private = format!("{keys}/es256-private.pem");
    // As behind an identity provider: tokens must name this API and come from this issuer.
    let (audience, issuer) = (
        r#"["https://api.tenantry.test"]"#,
        "https://login.tenantry.test/",
    );
    let env = fake_env(
        &[company],
        &[
            ("TENANTRY_AUTH__ALGORITHM", "ES256"),
            ("TENANTRY_AUTH__PUBLIC_KEY", &public),
            ("TENANTRY_AUTH__AUDIENCE", audience),
            ("TENANTRY_AUTH__ISSUER", issuer),
        ],
    )
    .await;
    let (broker, base) = (&env.broker, env.base.clone());
    let token = |audience: &str, issuer: &str| {
        let (code, token, err) = crate::support::run(
            tenantry()
                .env("TENANTRY_AUTH__ALGORITHM", "ES256")
                .env("TENANTRY_AUTH__PUBLIC_KEY", &public)
                .env("TENANTRY_AUTH__PRIVATE_KEY", &private)
                .env("TENANTRY_AUTH__AUDIENCE", audience)
                .env("TENANTRY_AUTH__ISSUER", issuer)
                .args(["admin", "token", "--user", "u1", "--company"])
                .arg(format!("{company}:viewer")),
        );
        assert_eq!(code, 0, "{err}");
        token.trim().to_owned()
    };
    let es256 = token(audience, issuer);
    let url = format!("{base}/v1/companies/{company}/x");
    let r = http().get(&url).bearer_auth(&es256).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http()
        .get(&url)
        .bearer_auth(company_token(company, "viewer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an HS256 token is refused");
    // Signed with the right key, but for another audience or by another issuer.
    for (aud, iss, why) in [
        (
            r#"["https://other.test"]"#,
            issuer,
            "aud is not an audience",
        ),
        ("[]", issuer, "no aud claim"),
        (audience, "https://evil.test/", "iss is not the issuer"),
    ] {
        let mut r = http()
            .get(&url)
            .bearer_auth(token(aud, iss))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{why}");
        let message = error_of!(r).error.message;
        assert!(message.contains(why), "{message}");
    }
    broker.cleanup().await;
}

#[actix_web::test]
async fn repeating_a_creation_that_stopped_half_way_finishes_it() {
    let catalog = TestDb::new(tenantry_testkit::Schema::Catalog).await;
    let shard = TestDb::new(tenantry_testkit::Schema::Shard).await;
    let missing = TestDb::reserve(); // a database that does not exist (yet)
    register(
        &catalog,
        &[spec(
            "shard-1",
            &missing.url,
            vec!["http://127.0.0.1:9".into()],
        )],
    )
    .await;
    let (broker, gw) = gateway_on(&catalog.url, &[]).await;
    let base = gw.url("gateway");
    let id = Uuid::now_v7();
    let (status, body) = create_company(&base, id, "Acme").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shard_unavailable");
    let c = catalog.client().await;
    let placement = tenants::lookup(&c, id).await.unwrap().unwrap();
    assert_eq!(placement.state, "provisioning");
    // Not routable until it is active.
    let r = http()
        .get(format!("{base}/v1/companies/{id}/jobs/{}", Uuid::now_v7()))
        .bearer_auth(company_token(id, "admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A client that sent no id is told the one the gateway chose, to repeat the request with
    // (without it, a repeat would create a second company).
    let (status, body) = post_company(&base, json!({"name": "Nameless"})).await;
    assert_eq!(status, 503, "{body}");
    let chosen: Uuid = body["error"]["company_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no company_id in {body}"));
    let placement = tenants::lookup(&c, chosen).await.unwrap().unwrap();
    assert_eq!(placement.state, "provisioning");

    // The operator fixes the shard's address; the clients repeat the same requests.
    register(
        &catalog,
        &[spec(
            "shard-1",
            &shard.url,
            vec!["http://127.0.0.1:9".into()],
        )],
    )
    .await;
    let (status, body) = create_company(&base, id, "Acme").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["shard"], "shard-1");
    let placement = tenants::lookup(&c, id).await.unwrap().unwrap();
    assert_eq!(placement.state, "active");
    assert_eq!(owned(&shard, id).await, 1);
    let (status, body) = create_company(&base, chosen, "Nameless").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(owned(&shard, chosen).await, 1);
    assert!(!missing.exists().await);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_creation_is_not_activated_once_its_shard_database_has_moved_under_it() {
    // The creation wrote its placement to the shard's database, whose move (`shard apply`
    // with a new database_url) commits before the company is activated: active, it would be
    // missing from the database its requests now go to.
    let catalog = TestDb::new(tenantry_testkit::Schema::Catalog).await;
    let (old, new) = (
        TestDb::new(tenantry_testkit::Schema::Shard).await,
        TestDb::new(tenantry_testkit::Schema::Shard).await,
    );
    let endpoints = || vec!["http://127.0.0.1:9".to_owned()];
    register(&catalog, &[spec("shard-1", &old.url, endpoints())]).await;
    let dbcfg = provisioning_cfg();
    // The placement's insert waits behind a lock in the old database while the move commits.
    let mut holder = old.client().await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE placements IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let id = Uuid::now_v7();
    let mut c = catalog.client().await;
    let cfg = dbcfg.clone();
    let creating = tokio::spawn(async move {
        let created = tenants::create(&mut c, &cfg, id, "Moving Ltd").await;
        (created, c)
    });
    let waiting = crate::support::until_count(
        &old,
        "SELECT count(*) FROM pg_stat_activity
          WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO placements%'",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(waiting, 1, "the placement's insert waits for the lock");
    let only = ["shard-1"];
    let before = catalog::companies_by_shard(&catalog.client().await, Some(&only[..]))
        .await
        .unwrap();
    register(&catalog, &[spec("shard-1", &new.url, endpoints())]).await;
    lock.rollback().await.unwrap();
    let (created, mut c) = creating.await.unwrap();
    let err = created.unwrap_err().to_string();
    assert!(err.contains("its database moved"), "{err}");
    assert_eq!(
        tenants::lookup(&c, id).await.unwrap().unwrap().state,
        "provisioning"
    );
    // The repeat writes the placement where the shard now is, and activates it. A move checked
    // against the companies as they were before would see that the activation changed them.
    let repeat = tenants::create(&mut c, &dbcfg, id, "Moving Ltd")
        .await
        .unwrap();
    assert_eq!(
        repeat,
        tenants::Created::Existing {
            shard_id: "shard-1".into(),
            activated: true
        }
    );
    assert_eq!((owned(&old, id).await, owned(&new, id).await), (1, 1));
    let after = catalog::companies_by_shard(&c, Some(&only[..]))
        .await
        .unwrap();
    assert_eq!(before["shard-1"].count, after["shard-1"].count);
    assert_ne!(before["shard-1"], after["shard-1"], "the activation shows");
}

#[tokio::test]
async fn a_creation_activating_while_an_apply_changes_its_shard_does_not_deadlock() {
    // `shard apply` locks the map version's row, then the shard's; the activation must take
    // them in that order too, or each waits for the other until PostgreSQL aborts one.
    let catalog = TestDb::new(tenantry_testkit::Schema::Catalog).await;
    let shard = TestDb::new(tenantry_testkit::Schema::Shard).await;
    register(
        &catalog,
        &[spec(
            "shard-1",
            &shard.url,
            vec!["http://127.0.0.1:9".into()],
        )],
    )
    .await;
    // An apply under way: it holds the map version's row.
    let mut applier = catalog.client().await;
    let apply = applier.transaction().await.unwrap();
    apply
        .execute("SELECT 1 FROM shard_map_version FOR UPDATE", &[])
        .await
        .unwrap();
    let id = Uuid::now_v7();
    let mut c = catalog.client().await;
    let dbcfg = provisioning_cfg();
    let creating =
        tokio::spawn(async move { tenants::create(&mut c, &dbcfg, id, "Racing Ltd").await });
    let waiting = crate::support::until_count(
        &catalog,
        "SELECT count(*) FROM pg_stat_activity
          WHERE wait_event_type = 'Lock' AND datname = current_database()",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(waiting, 1, "the activation waits for the apply");
    // The apply goes on to the shard's row, and commits.
    apply
        .execute(
            "UPDATE shards SET accepting = false, version = version + 1 WHERE id = 'shard-1'",
            &[],
        )
        .await
        .unwrap();
    apply.commit().await.unwrap();
    let created = creating.await.unwrap().unwrap();
    assert_eq!(
        created,
        tenants::Created::New {
            shard_id: "shard-1".into()
        }
    );
    let c = catalog.client().await;
    assert_eq!(
        tenants::lookup(&c, id).await.unwrap().unwrap().state,
        "active"
    );
}

#[tokio::test]
async fn an_operator_lists_and_finishes_a_creation_its_client_left_half_way() {
    // The client got a 503 and never repeated its request: the company stays `provisioning`,
    // unroutable, until an operator finishes it with the creation's own (idempotent) steps.
    let catalog = TestDb::new(tenantry_testkit::Schema::Catalog).await;
    let shard = TestDb::new(tenantry_testkit::Schema::Shard).await;
    let missing = TestDb::reserve();
    let endpoints = || vec!["http://127.0.0.1:9".to_owned()];
    register(&catalog, &[spec("shard-1", &missing.url, endpoints())]).await;
    let id = Uuid::now_v7();
    let dbcfg = provisioning_cfg();
    let mut c = catalog.client().await;
    assert!(
        tenants::create(&mut c, &dbcfg, id, "Half-way Ltd")
            .await
            .is_err()
    );
    let admin = |args: &[&str]| {
        crate::support::run(
            tenantry()
                .env("TENANTRY_CATALOG__URL", &catalog.url)
                .args(["admin", "companies"])
                .args(args),
        )
    };
    let (code, out, err) = admin(&["list", "--state", "provisioning"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ID") && out.contains(&id.to_string()),
        "{out}"
    );
    assert!(
        out.contains("provisioning") && out.contains("Half-way Ltd"),
        "{out}"
    );
    let (code, _, err) = admin(&["finish", &id.to_string()]);
    assert_eq!(code, 1, "the shard is still unreachable");
    assert!(err.contains("could not record the placement"), "{err}");

    register(&catalog, &[spec("shard-1", &shard.url, endpoints())]).await;
    let (code, out, err) = admin(&["finish", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created on shard shard-1 and active"), "{out}");
    assert_eq!(
        tenants::lookup(&c, id).await.unwrap().unwrap().state,
        "active"
    );
    assert_eq!(owned(&shard, id).await, 1);
    let (code, out, _) = admin(&["finish", &id.to_string(), "--json"]);
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["outcome"], "already_active", "{out}");
    let (code, out, _) = admin(&["list", "--shard", "shard-1", "--json"]);
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["state"], "active", "{out}");

    // Hostile input: usage errors exit 2, an unknown company 1, nothing changes.
    for args in [
        &["finish", "not-a-uuid"][..],
        &["finish"],
        &["list", "--state", "bogus"],
        &["list", "--limit", "0"],
        &["list", "--limit", "1001"],
        &["list", "--json", "--json"],
    ] {
        let (code, _, err) = admin(args);
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    let (code, _, err) = admin(&["finish", &Uuid::now_v7().to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not in the catalog"), "{err}");
    let (code, out, err) = admin(&["list", "--shard", "'; DROP TABLE tenants; --"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        out.is_empty() && err.contains("not a valid shard id"),
        "{out}{err}"
    );
    assert_eq!(
        tenants::lookup(&c, id).await.unwrap().unwrap().state,
        "active"
    );
}

#[actix_web::test]
async fn the_shard_map_subscription_leaves_what_it_has_not_taken_in_the_broker() {
    // The gateway's subscription takes at most PREFETCH unacknowledged messages; the rest stay
    // in its queue (bounded by x-max-length) rather than piling up in the gateway's memory.
    use lapin::{Connection, ConnectionProperties};
    use tenantry_gateway::bus;
    let broker = TestBroker::new().await;
    let exchange = broker.exchange("shardmap");
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    // Subscribed and never read, as a gateway busy with something else.
    let (queue, _consumer) = bus::subscribe(&channel, &exchange).await.unwrap();
    let extra = 100;
    let messages: Vec<Value> = (0..usize::from(bus::PREFETCH) + extra)
        .map(|i| json!({"type": "shard.changed", "n": i}))
        .collect();
    publish(&exchange, &messages).await;
    let waiting = || async { queue_depth(&channel, &queue).await as usize };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = waiting().await;
    while seen != extra && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = waiting().await;
    }
    // And it stays there: nothing more is pushed to a consumer that has not acknowledged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (seen, waiting().await),
        (extra, extra),
        "messages left in the broker"
    );
    let _ = conn.close(200, "done".into()).await;
    broker.cleanup().await;
}

#[actix_web::test]
async fn a_company_seen_while_provisioning_is_reachable_once_active_even_without_a_message() {
    // A request during provisioning must not leave a 404 cached for good: the activation
    // message can pass while that lookup is in flight (and a message for a company the cache
    // does not hold changes nothing), so here it is not sent at all.
    let company = Uuid::now_v7();
    let fake = fake_shard().await;
    let catalog = one_shard_catalog(vec![fake.url.clone()], company).await;
    let set_state = |state: &'static str| {
        let catalog = &catalog;
        async move {
            catalog
                .client()
                .await
                .execute(
                    "UPDATE tenants SET state = $2 WHERE id = $1",
                    &[&company, &state],
                )
                .await
                .unwrap();
        }
    };
    set_state("provisioning").await;
    let (broker, gw) =
        gateway_on(&catalog.url, &[("TENANTRY_GATEWAY__NEGATIVE_TTL", "300ms")]).await;
    let url = format!("{}/v1/companies/{company}/quick", gw.url("gateway"));
    let auth = company_token(company, "admin");
    assert_eq!(
        until_status(&url, &auth, 404).await,
        404,
        "provisioning is not routable yet"
    );
    set_state("active").await;
    assert_eq!(
        until_status(&url, &auth, 200).await,
        200,
        "reachable within gateway.negative_ttl of its activation"
    );
    broker.cleanup().await;
}

/// Publishes `messages` to the fan-out `exchange`, as the catalog relay does.
async fn publish(exchange: &str, messages: &[Value]) {
    use lapin::{BasicProperties, Connection, ConnectionProperties, options::BasicPublishOptions};
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    for m in messages {
        channel
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                m.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    let _ = conn.close(200, "published".into()).await;
}

#[actix_web::test]
async fn a_gateway_acknowledges_what_it_applied_and_so_keeps_receiving() {
    // With a prefetch limit, a message left unacknowledged would stop delivery after PREFETCH.
    let company = Uuid::now_v7();
    let env = fake_env(&[company], &[]).await;
    let exchange = env.broker.exchange("shardmap");
    let n = 3 * usize::from(tenantry_gateway::bus::PREFETCH);
    let messages: Vec<Value> = (0..n).map(|i| json!({"type": "noise", "n": i})).collect();
    publish(&exchange, &messages).await;
    let series = "tenantry_gateway_map_messages_total{type=\"unknown\"}";
    assert_eq!(
        until_metric(&env.base, series, n as f64, Duration::from_secs(10)).await,
        n as f64
    );
    env.broker.cleanup().await;
}

const FLUSHES: &str = "tenantry_gateway_cache_events_total{event=\"flush\"}";
const MISSES: &str = "tenantry_gateway_cache_events_total{event=\"miss\"}";
const CONNECTED: &str = "tenantry_gateway_bus_connected";

#[actix_web::test]
async fn a_gap_in_map_versions_drops_the_cache() {
    // The gateway's queue drops its oldest messages when it falls behind; the next message's
    // map version then skips some, and the routes they changed may be stale.
    let company = Uuid::now_v7();
    let env = fake_env(&[company], &[]).await;
    let exchange = env.broker.exchange("shardmap");
    let version: i64 = env
        .catalog
        .client()
        .await
        .query_one("SELECT version FROM shard_map_version", &[])
        .await
        .unwrap()
        .get(0);
    let url = format!("{}/v1/companies/{company}/quick", env.base);
    let auth = company_token(company, "admin");
    let get = || async {
        http()
            .get(&url)
            .bearer_auth(&auth)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(get().await, 200);
    let (flushes, misses) = (
        metric(&env.base, FLUSHES).await,
        metric(&env.base, MISSES).await,
    );
    let noise = "tenantry_gateway_map_messages_total{type=\"unknown\"}";
    let heard = |n: f64| until_metric(&env.base, noise, n, Duration::from_secs(10));
    // The next version, and one already known: nothing was missed.
    publish(
        &exchange,
        &[
            json!({"type": "noise", "map_version": version + 1}),
            json!({"type": "noise", "map_version": version}),
        ],
    )
    .await;
    assert_eq!(heard(2.0).await, 2.0);
    assert_eq!(get().await, 200);
    assert_eq!(metric(&env.base, FLUSHES).await, flushes, "no flush");
    assert_eq!(
        metric(&env.base, MISSES).await,
        misses,
        "the route stayed cached"
    );
    // Two versions skipped.
    publish(
        &exchange,
        &[json!({"type": "noise", "map_version": version + 4})],
    )
    .await;
    assert_eq!(heard(3.0).await, 3.0);
    assert_eq!(metric(&env.base, FLUSHES).await, flushes + 1.0);
    assert_eq!(get().await, 200);
    assert_eq!(
        metric(&env.base, MISSES).await,
        misses + 1.0,
        "the route was read again"
    );
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn a_placement_change_heard_while_the_route_is_being_read_is_applied_to_it() {
    // A request misses the cache and reads the company's route from the catalog; a message
    // with a newer placement arrives before that read is stored. The message must win over
    // the read, not be dropped because nothing was cached when it came. (Here the message is
    // ahead of the catalog itself, so the test can tell which one the gateway went by.)
    let company = Uuid::now_v7();
    let env = fake_env(
        &[company],
        &[("TENANTRY_RABBITMQ__RELAY_SHARDMAP", "false")],
    )
    .await;
    let base = env.base.clone();
    let exchange = env.broker.exchange("shardmap");
    let version: i64 = env
        .catalog
        .client()
        .await
        .query_one("SELECT version FROM shard_map_version", &[])
        .await
        .unwrap()
        .get(0);
    // The read is held up behind a lock on the catalog's tenants.
    let mut c = env.catalog.client().await;
    let lock = c.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let misses = metric(&base, MISSES).await;
    let (url, auth) = (
        format!("{base}/v1/companies/{company}/quick"),
        company_token(company, "admin"),
    );
    let first = actix_web::rt::spawn(async move {
        http()
            .get(url)
            .bearer_auth(auth)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(
        until_metric(&base, MISSES, misses + 1.0, Duration::from_secs(10)).await,
        misses + 1.0,
        "the request missed the cache and is reading the catalog"
    );
    // The change: the company is deleted (a newer version than the one being read).
    publish(
        &exchange,
        &[
            json!({"type": "tenant.changed", "company_id": company, "shard_id": "shard-1",
                 "state": "deleted", "version": 2, "map_version": version + 1}),
        ],
    )
    .await;
    let heard = "tenantry_gateway_map_messages_total{type=\"tenant.changed\"}";
    assert_eq!(
        until_metric(&base, heard, 1.0, Duration::from_secs(10)).await,
        1.0
    );
    lock.rollback().await.unwrap();
    assert_eq!(
        first.await.unwrap(),
        404,
        "the deletion heard during the read wins over the active row it read"
    );
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn with_rabbitmq_unreachable_routes_are_read_again_only_when_the_shard_map_changed() {
    // While disconnected the gateway reads the catalog's map version every
    // gateway.disconnected_ttl, not every cached route: one query per interval however many
    // companies it serves.
    let company = Uuid::now_v7();
    let (proxy, env) =
        fake_env_behind_proxy(company, &[("TENANTRY_GATEWAY__DISCONNECTED_TTL", "200ms")]).await;
    let (base, catalog) = (env.base.clone(), &env.catalog);
    let url = format!("{base}/v1/companies/{company}/quick");
    let auth = company_token(company, "admin");
    let get = || async {
        http()
            .get(&url)
            .bearer_auth(&auth)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(get().await, 200);
    assert_eq!(metric(&base, CONNECTED).await, 1.0, "subscribed");
    proxy.cut();
    // Noticed at once when the broker's side closes (within the AMQP heartbeat otherwise):
    // nothing below holds before.
    until_gauge(&env, CONNECTED, 0.0, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (flushes, misses) = (metric(&base, FLUSHES).await, metric(&base, MISSES).await);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(get().await, 200);
    }
    assert_eq!(
        metric(&base, MISSES).await,
        misses,
        "an unchanged shard map leaves cached routes alone"
    );
    assert_eq!(metric(&base, FLUSHES).await, flushes);
    // The company is deleted: the map version moves, and the route goes within a few polls.
    catalog
        .exec(&format!(
            "UPDATE tenants SET state = 'deleted', version = version + 1 WHERE id = '{company}';
             UPDATE shard_map_version SET version = version + 1"
        ))
        .await;
    let status = until_status(&url, &auth, 404).await;
    assert_eq!(status, 404, "gateway log: {:?}", env.gw.drain_logs());
    assert_eq!(metric(&base, FLUSHES).await, flushes + 1.0);
    proxy.restore();
    until_gauge(&env, CONNECTED, 1.0, Duration::from_secs(15)).await;
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn a_broker_that_vanished_without_closing_is_noticed_within_the_heartbeat() {
    // A failover whose old host is gone: no FIN, no RST, the connection just goes silent.
    // RabbitMQ's default heartbeat (60 s) left the gateway believing itself subscribed for two
    // minutes, serving cached routes without reading the catalog's map version.
    let (proxy, env) = fake_env_behind_proxy(Uuid::now_v7(), &[]).await;
    let reconnects = "tenantry_gateway_bus_reconnects_total";
    assert_eq!(metric(&env.base, CONNECTED).await, 1.0);
    let before = metric(&env.base, reconnects).await;
    proxy.silence_open();
    let started = Instant::now();
    until_gauge(&env, CONNECTED, 0.0, Duration::from_secs(40)).await;
    // Twice the heartbeat without a frame from the broker, give or take one.
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A new connection gets through (only the old ones are silent): subscribed again.
    assert_eq!(
        until_metric(&env.base, reconnects, before + 1.0, Duration::from_secs(15)).await,
        before + 1.0
    );
    assert_eq!(metric(&env.base, CONNECTED).await, 1.0);
    proxy.restore();
    env.broker.cleanup().await;
}

/// [`fake_env_via`] for `company`, with the gateway's RabbitMQ connections going through a
/// proxy the test can cut or silence.
async fn fake_env_behind_proxy(company: Uuid, extra: &[(&str, &str)]) -> (TcpProxy, FakeEnv) {
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let env = fake_env_via(&[company], &amqp, extra).await;
    (proxy, env)
}

/// Polls the gateway's `series` until it is `want`; past `limit`, fails with what the gateway
/// logged meanwhile.
async fn until_gauge(env: &FakeEnv, series: &str, want: f64, limit: Duration) {
    let (deadline, mut logs) = (Instant::now() + limit, Vec::new());
    while metric(&env.base, series).await != want {
        logs.extend(env.gw.drain_logs());
        assert!(Instant::now() < deadline, "{series} not {want}: {logs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn requests_for_a_shard_missing_from_the_table_share_one_failed_read_of_it() {
    // A company's route names a shard the gateway's table lacks, and reading the table fails
    // slowly (here behind a lock, with a 1 s statement timeout). A request shares the outcome
    // of a read that started after it arrived, so it waits for two reads at most (the one under
    // way when it came, and the next); they do not each read the table again in turn, the
    // last one waiting for all the others.
    let company = Uuid::now_v7();
    let env = fake_env(
        &[company],
        &[
            ("TENANTRY_RABBITMQ__RELAY_SHARDMAP", "false"),
            ("TENANTRY_DATABASE__STATEMENT_TIMEOUT", "1s"),
        ],
    )
    .await;
    let (base, catalog) = (env.base.clone(), &env.catalog);
    let exchange = env.broker.exchange("shardmap");
    let url = format!("{base}/v1/companies/{company}/quick");
    let auth = company_token(company, "admin");
    let get = |url: String, auth: String| async move {
        let started = Instant::now();
        let status = http()
            .get(url)
            .bearer_auth(auth)
            .send()
            .await
            .unwrap()
            .status();
        (status.as_u16(), started.elapsed())
    };
    assert_eq!(get(url.clone(), auth.clone()).await.0, 200);
    // A message moves the cached route to a shard the table does not have.
    let version: i64 = catalog
        .client()
        .await
        .query_one("SELECT version FROM shard_map_version", &[])
        .await
        .unwrap()
        .get(0);
    let updates = metric(&base, ROUTE_UPDATES).await;
    publish(
        &exchange,
        &[
            json!({"type": "tenant.changed", "company_id": company, "shard_id": "shard-9",
                 "state": "active", "version": 100, "map_version": version + 1}),
        ],
    )
    .await;
    assert!(
        until_metric(&base, ROUTE_UPDATES, updates + 1.0, Duration::from_secs(10)).await > updates
    );
    let mut c = catalog.client().await;
    let lock = c.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE shards IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let requests: Vec<_> = (0..6)
        .map(|_| actix_web::rt::spawn(get(url.clone(), auth.clone())))
        .collect();
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.unwrap());
    }
    lock.rollback().await.unwrap();
    for (status, took) in &answers {
        assert_eq!(*status, 503, "{answers:?}");
        assert!(
            *took < Duration::from_millis(3500),
            "two failed reads (1 s each) and overhead, not one read per request (6 s): \
             {answers:?}"
        );
    }
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn a_shard_change_heard_while_the_catalog_is_unreachable_is_applied_once_it_is_back() {
    // The gateway reaches the catalog through a proxy that the test cuts. A `shard.changed`
    // that arrives meanwhile cannot be applied at once; it must be applied when the catalog
    // returns, not acknowledged and forgotten.
    let company = Uuid::now_v7();
    let (old, new) = (fake_shard().await, fake_shard().await);
    let catalog = one_shard_catalog(vec![old.url.clone()], company).await;
    let (proxy, proxied) = TcpProxy::in_front_of(&catalog.url).await;
    let broker = TestBroker::new().await;
    let exchange = broker.exchange("shardmap");
    let gw = start_gateway(&mut gateway_cmd(
        &proxied,
        &amqp_url(),
        &exchange,
        // No catalog relay in this gateway: the test sends the one message itself.
        &[("TENANTRY_RABBITMQ__RELAY_SHARDMAP", "false")],
    ));
    let base = gw.url("gateway");
    let auth = company_token(company, "admin");
    let get = |path: &'static str| {
        let (url, auth) = (
            format!("{base}/v1/companies/{company}/{path}"),
            auth.clone(),
        );
        async move {
            http()
                .get(url)
                .bearer_auth(auth)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get("before").await, 200);
    assert_eq!(old.seen.lock().unwrap().len(), 1);

    // The shard's API moves to the new endpoint while the gateway cannot read the catalog.
    proxy.cut();
    register(
        &catalog,
        &[spec(
            "shard-1",
            "postgres://nowhere/x",
            vec![new.url.clone()],
        )],
    )
    .await;
    publish(
        &exchange,
        &[json!({"type": "shard.changed", "shard_id": "shard-1"})],
    )
    .await;
    let series = "tenantry_gateway_map_messages_total{type=\"shard.changed\"}";
    assert_eq!(
        until_metric(&base, series, 1.0, Duration::from_secs(10)).await,
        1.0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    while new.seen.lock().unwrap().is_empty() && Instant::now() < deadline {
        assert_eq!(get("after").await, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !new.seen.lock().unwrap().is_empty(),
        "requests reach the new endpoint once the catalog is back"
    );
    broker.cleanup().await;
}

#[actix_web::test]
async fn a_deleted_company_answers_404_and_returns_when_reactivated_even_without_a_message() {
    let company = Uuid::now_v7();
    let env = fake_env(&[company], &[("TENANTRY_GATEWAY__NEGATIVE_TTL", "300ms")]).await;
    let url = format!("{}/v1/companies/{company}/quick", env.base);
    let auth = company_token(company, "admin");
    assert_eq!(
        until_status(&url, &auth, 200).await,
        200,
        "cached as a route"
    );
    // The catalog's relay publishes the deletion; the gateway drops the cached route rather
    // than caching the deleted placement.
    let mut c = env.catalog.client().await;
    tenants::set_placement(&mut c, company, "shard-1", "deleted")
        .await
        .unwrap()
        .expect("tenant exists");
    assert_eq!(
        until_status(&url, &auth, 404).await,
        404,
        "a deleted company is not routed"
    );
    assert_eq!(
        until_metric(&env.base, ROUTE_UPDATES, 1.0, Duration::from_secs(5)).await,
        1.0
    );
    // Reactivated without a message (as when one is lost): a cached deleted placement would
    // answer 404 until evicted; a company remembered as unknown is read again after
    // gateway.negative_ttl.
    let reached = env.fake.seen.lock().unwrap().len();
    c.execute(
        "UPDATE tenants SET state = 'active', version = version + 1 WHERE id = $1",
        &[&company],
    )
    .await
    .unwrap();
    assert_eq!(
        until_status(&url, &auth, 200).await,
        200,
        "routed again once reactivated"
    );
    assert_eq!(env.fake.seen.lock().unwrap().len(), reached + 1);
    env.broker.cleanup().await;
}

/// GETs `url` until it answers `want` (at most 5 s); returns the last status.
async fn until_status(url: &str, auth: &str, want: u16) -> u16 {
    let status = || async {
        http()
            .get(url)
            .bearer_auth(auth)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = status().await;
    while last != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = status().await;
    }
    last
}

/// A gateway on `catalog_url` with a shard-map exchange of its own; `extra` env overrides.
async fn gateway_on(catalog_url: &str, extra: &[(&str, &str)]) -> (TestBroker, Served) {
    gateway_via(catalog_url, &amqp_url(), extra).await
}

/// [`gateway_on`], reaching RabbitMQ at `amqp`.
async fn gateway_via(
    catalog_url: &str,
    amqp: &str,
    extra: &[(&str, &str)],
) -> (TestBroker, Served) {
    let broker = TestBroker::new().await;
    let gw = start_gateway(&mut gateway_cmd(
        catalog_url,
        amqp,
        &broker.exchange("shardmap"),
        extra,
    ));
    (broker, gw)
}

#[actix_web::test]
async fn a_request_cut_off_by_the_end_of_the_grace_period_still_leaves_a_line_under_its_id() {
    // The gateway stops while a request waits on a shard that never answers: when the grace
    // period ends the request is dropped unanswered, and "what happened to request X" must
    // still find a line.
    let company = Uuid::now_v7();
    let hanging = fake_shard().await;
    let catalog = one_shard_catalog(vec![hanging.url.clone()], company).await;
    let (broker, mut gw) = gateway_on(
        &catalog.url,
        &[
            ("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "30s"),
            ("TENANTRY_SHUTDOWN__GRACE_PERIOD", "1s"),
        ],
    )
    .await;
    let (url, auth) = (
        format!("{}/v1/companies/{company}/hang", gw.url("gateway")),
        company_token(company, "admin"),
    );
    let cut = actix_web::rt::spawn(async move {
        awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish()
            .get(url)
            .bearer_auth(auth)
            .insert_header(("x-request-id", "cut-at-stop-1"))
            .send()
            .await
            .is_err()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while hanging.seen.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hanging.seen.lock().unwrap().len(), 1);
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(8)), Some(0));
    assert!(cut.await.unwrap(), "the request got no answer");
    let lines = gw.logs_to_end(Duration::from_secs(2));
    let line = lines
        .iter()
        .find(|l| l.contains("request abandoned"))
        .unwrap_or_else(|| panic!("no line for the cut-off request: {lines:#?}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["span"]["request.id"], "cut-at-stop-1");
    assert_eq!(v["http.path"], format!("/v1/companies/{company}/hang"));
    broker.cleanup().await;
}

#[actix_web::test]
async fn a_caller_too_slow_to_send_its_body_gets_408_not_504() {
    // The caller sends part of its body and stops. The time runs out while the gateway still
    // waits for the caller, not for the shard: 408 request_timeout, not 504, whether it
    // stalls within the first 64 KiB (which the gateway reads before it involves a shard) or
    // after them (while the gateway streams the body to the shard).
    let company = Uuid::now_v7();
    let env = fake_env(&[company], &[("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "1s")]).await;
    let addr = env.base.trim_start_matches("http://").to_owned();
    let auth = company_token(company, "admin");
    for (declared, sent) in [(200 * 1024, 100 * 1024), (1000, 13)] {
        let mut request = format!(
            "PUT /v1/companies/{company}/echo HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
        )
        .into_bytes();
        request.extend(std::iter::repeat_n(b'a', sent));
        let started = Instant::now();
        let answer = send_and_stall(&addr, request);
        let took = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 408"), "{sent}: {answer}");
        assert!(answer.contains("request_timeout"), "{sent}: {answer}");
        assert!(took < Duration::from_secs(4), "{sent}: {took:?}");
    }
    assert!(
        env.fake
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|(uri, _, _)| !uri.ends_with("/echo")),
        "the shard never saw either request"
    );
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn a_caller_that_stops_reading_a_large_answer_lets_go_of_its_slots() {
    // Two callers of one company ask for an answer larger than the sockets can buffer, and
    // never read it: the gateway stops being asked for more of it. Their in-flight slots must
    // not stay taken for as long as the connections live, or the company (and, with enough
    // companies, the shard) is refused for good.
    let company = Uuid::now_v7();
    let env = fake_env(
        &[company],
        &[
            ("TENANTRY_GATEWAY__MAX_IN_FLIGHT_PER_COMPANY", "2"),
            // Long enough that the first check below surely sees both slots taken.
            ("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "3s"),
        ],
    )
    .await;
    let addr = env.base.trim_start_matches("http://").to_owned();
    let auth = company_token(company, "admin");
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            write!(
                s,
                "GET /v1/companies/{company}/big HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\r\n"
            )
            .unwrap();
            s
        })
        .collect();
    env.fake.until_seen("/big", 2).await;
    let url = format!("{}/v1/companies/{company}/x", env.base);
    let mut r = http().get(&url).bearer_auth(&auth).send().await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "both slots are taken while the answers start"
    );
    assert_eq!(error_of!(r).error.code, "rate_limited");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http().get(&url).bearer_auth(&auth).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            Instant::now() < deadline,
            "the slots stayed taken by callers not reading"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first cut frees a slot for the request above; the second follows within moments
    // (its head went out a little later).
    let abandoned = r#"tenantry_gateway_answers_abandoned_total{shard="shard-1"}"#;
    assert_eq!(
        until_metric(&env.base, abandoned, 2.0, Duration::from_secs(10)).await,
        2.0,
        "both answers were cut off"
    );
    drop(held);
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn a_stalled_catalog_costs_a_cache_miss_a_503_within_the_upstream_timeout() {
    // A company not cached yet needs a catalog read. A catalog that accepts connections and
    // never answers must not hold the caller (and its company's in-flight slot) for its
    // pool's and statements' timeouts, some 40 s, but for `gateway.upstream_timeout`.
    let company = Uuid::now_v7();
    let fake = fake_shard().await;
    let catalog = one_shard_catalog(vec![fake.url.clone()], company).await;
    let (proxy, through) = TcpProxy::in_front_of(&catalog.url).await;
    let (broker, gw) = gateway_via(
        &through,
        &amqp_url(),
        &[("TENANTRY_GATEWAY__UPSTREAM_TIMEOUT", "1s")],
    )
    .await;
    let url = format!("{}/v1/companies/{company}/things", gw.url("gateway"));
    let auth = company_token(company, "admin");
    proxy.stall();
    let started = Instant::now();
    let mut r = http()
        .get(&url)
        .bearer_auth(&auth)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_of!(r).error.code, "catalog_unavailable");
    assert!(took < Duration::from_secs(5), "{took:?}");
    proxy.restore();
    // Once the catalog answers again, so does the company.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http().get(&url).bearer_auth(&auth).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {}", r.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.cleanup().await;
}

#[actix_web::test]
async fn a_company_creation_whose_body_stalls_gets_408_and_creates_nothing() {
    // The gateway reads a creation's body whole: a caller that declares more than it sends
    // holds the handler, and its connection, only for `http.body_timeout`.
    let env = fake_env(&[Uuid::now_v7()], &[("TENANTRY_HTTP__BODY_TIMEOUT", "1s")]).await;
    let addr = env.base.trim_start_matches("http://").to_owned();
    let id = Uuid::now_v7();
    let body = format!(r#"{{"id":"{id}","name":"Stalled"}}"#);
    let mut request = format!(
        "POST /v1/companies HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        creator_token(),
        body.len() + 100
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    let started = Instant::now();
    let answer = send_and_stall(&addr, request);
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    let created = env
        .catalog
        .scalar(&format!("SELECT count(*) FROM tenants WHERE id = '{id}'"))
        .await;
    assert_eq!(created, 0);
    env.broker.cleanup().await;
}

#[actix_web::test]
async fn company_creations_stuck_on_a_silent_shard_leave_routing_its_catalog_connections() {
    // The only shard's database accepts connections and never answers. Creations must give
    // up on their own, and while they hang they must not take every catalog connection:
    // routing (a cache miss reads the catalog) keeps working.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let catalog = TestDb::new(tenantry_testkit::Schema::Catalog).await;
    register(
        &catalog,
        &[spec(
            "shard-1",
            &format!(
                "postgres://postgres@{}/silent",
                silent.local_addr().unwrap()
            ),
            vec!["http://127.0.0.1:9".into()],
        )],
    )
    .await;
    let (broker, gw) = gateway_on(
        &catalog.url,
        &[
            ("TENANTRY_CATALOG__POOL_SIZE", "2"),
            ("TENANTRY_DATABASE__CONNECT_TIMEOUT", "2s"),
        ],
    )
    .await;
    let base = gw.url("gateway");
    let started = Instant::now();
    let creations: Vec<_> = (0..3)
        .map(|i| {
            let base = base.clone();
            actix_web::rt::spawn(async move {
                let mut r = awc::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .finish()
                    .post(format!("{base}/v1/companies"))
                    .bearer_auth(creator_token())
                    .send_json(&json!({"name": format!("Stuck {i}")}))
                    .await
                    .unwrap();
                let code = r.json::<Value>().await.unwrap()["error"]["code"].clone();
                (r.status().as_u16(), code, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stranger = Uuid::now_v7();
    let asked = Instant::now();
    let mut r = http()
        .get(format!("{base}/v1/companies/{stranger}/jobs"))
        .bearer_auth(company_token(stranger, "admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "{:?}", r.body().await);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    for c in creations {
        let (status, code, took) = c.await.unwrap();
        assert_eq!(status, 503, "{code}");
        assert!(
            code == "shard_unavailable" || code == "creations_busy",
            "{code}"
        );
        assert!(took < Duration::from_secs(12), "{took:?}");
    }
    broker.cleanup().await;
}
