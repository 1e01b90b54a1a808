//! The job API and worker processes end to end: the 3-second boundary, idempotency,
//! backpressure, fencing, bad input, several workers, SIGKILL, graceful release, events.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tenantry_queue::{JobFinishedEvent, JobState, JobView};
use tenantry_testkit::{Schema, TestBroker, TestDb};
use uuid::Uuid;

use crate::{
    queue::{enqueue, enqueue_one, job},
    support::{
        Served, http, log_line, metric, own, queue_depth, run, send_and_stall, shard_node,
        slow_job_202_then_done, start_worker, tenantry, token, until_count, until_state,
    },
};

fn member_token(company: Uuid) -> String {
    token(&["--user", "u-1", "--company", &format!("{company}:member")])
}

#[actix_web::test]
async fn a_quick_job_answers_200_and_a_slow_one_202_then_done() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let node = Served::start(&mut shard_node(&db.url, true, 2), 1);
    let base = node.url("api");
    let auth = member_token(company);
    let c = http();

    let mut r = c
        .post(format!("{base}/v1/companies/{company}/jobs"))
        .bearer_auth(&auth)
        .send_json(&json!({"kind": "sleep", "params": {"ms": 100}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    crate::support::assert_job_shape(&body);
    assert!(body["error"].is_null() && !body["started_at"].is_null());
    let j: JobView = serde_json::from_value(body).unwrap();
    assert_eq!(
        (j.state, j.result),
        (JobState::Done, Some(json!({"slept_ms": 100})))
    );

    // The params limit (64 KiB) leaves out the whitespace between tokens: these are 70,000
    // bytes as sent and 60,011 as the job holds them.
    let blob = "x".repeat(60_000);
    let spaced = format!(
        r#"{{"kind":"echo","params":{{{}"blob"{}:"{blob}"}}}}"#,
        " ".repeat(5_000),
        "\n".repeat(5_000)
    );
    let mut r = c
        .post(format!("{base}/v1/companies/{company}/jobs"))
        .bearer_auth(&auth)
        .content_type("application/json")
        .send_body(spaced)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let j: JobView = r.json().limit(1 << 20).await.unwrap();
    assert_eq!(j.result, Some(json!({"blob": blob})));

    let done = slow_job_202_then_done(&base, company, &auth, 5000, "10s").await;

    // the job row carries who asked and the request id, for "what happened to request X"
    let row = db
        .client()
        .await
        .query_one(
            "SELECT user_context, request_id FROM jobs WHERE id = $1",
            &[&done.id],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Value>(0),
        json!({"user_id": "u-1", "role": "member"})
    );
    assert!(!row.get::<_, String>(1).is_empty());
}

#[actix_web::test]
async fn past_max_waiters_a_post_answers_at_once_and_a_long_poll_still_waits() {
    // With the process's waiter table full, a POST answers 202 at once (as documented). A long
    // poll used to answer at once too, with the unfinished job, which sends a client polling
    // "until finished" straight back in a tight loop; it now reads the job once a second.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let node = Served::start(
        shard_node(&db.url, true, 2).env("TENANTRY_QUEUE__MAX_WAITERS", "1"),
        1,
    );
    let base = node.url("api");
    let auth = member_token(company);
    let post = |ms: u64| {
        let (base, auth) = (base.clone(), auth.clone());
        async move {
            let mut r = http()
                .post(format!("{base}/v1/companies/{company}/jobs"))
                .bearer_auth(&auth)
                .send_json(&json!({"kind": "sleep", "params": {"ms": ms}}))
                .await
                .unwrap();
            (r.status(), r.json::<JobView>().await.unwrap())
        }
    };
    // The one waiter: a long poll on a job that outlasts the test's requests.
    let (status, long) = post(8000).await;
    assert_eq!(status, 202);
    let holder = {
        let (base, auth) = (base.clone(), auth.clone());
        tokio::task::spawn_local(async move {
            http()
                .get(format!(
                    "{base}/v1/companies/{company}/jobs/{}?wait=10s",
                    long.id
                ))
                .bearer_auth(&auth)
                .timeout(Duration::from_secs(15))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let (status, job) = post(1500).await;
    assert_eq!(status, 202, "no waiter to be had: 202 at once");
    assert_eq!(metric(&base, "tenantry_queue_waiting_requests").await, 1.0);
    assert_eq!(
        metric(&base, "tenantry_queue_listener_connected").await,
        1.0
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let mut r = http()
        .get(format!(
            "{base}/v1/companies/{company}/jobs/{}?wait=10s",
            job.id
        ))
        .bearer_auth(&auth)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 200);
    let read: JobView = r.json().await.unwrap();
    assert_eq!(read.state, JobState::Done, "after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "waited for the job: {took:?}"
    );
    holder.abort();
}

#[actix_web::test]
async fn bad_input_gets_a_clear_4xx_and_enqueues_nothing() {
    let db = TestDb::new(Schema::Shard).await;
    let (company, other) = (Uuid::now_v7(), Uuid::now_v7());
    own(&db, company, "owned").await;
    let node = Served::start(&mut shard_node(&db.url, true, 0), 1);
    let base = node.url("api");
    let jobs = format!("{base}/v1/companies/{company}/jobs");
    let member = member_token(company);
    let viewer = token(&["--user", "v", "--company", &format!("{company}:viewer")]);
    let c = http();
    let big = json!({"kind": "echo", "params": {"blob": "x".repeat(70_000)}}).to_string();
    let long_token = format!("{member}{}", "A".repeat(8192));

    // (case, url, token, body, status, error code)
    type Case<'a> = (&'a str, String, Option<&'a str>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown kind",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"mine-bitcoin","params":{}}"#.into(),
            400,
            "unknown_kind",
        ),
        (
            "array params",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"echo","params":[1,2]}"#.into(),
            400,
            "invalid_params",
        ),
        (
            "string params",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"echo","params":"x"}"#.into(),
            400,
            "invalid_params",
        ),
        (
            "bad sleep",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"sleep","params":{"ms":-5}}"#.into(),
            400,
            "invalid_params",
        ),
        (
            "sleep too long",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"sleep","params":{"ms":99999999}}"#.into(),
            400,
            "invalid_params",
        ),
        (
            "oversized params",
            jobs.clone(),
            Some(&member),
            big,
            413,
            "params_too_large",
        ),
        (
            "null params",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"echo","params":null}"#.into(),
            400,
            "invalid_params",
        ),
        (
            // 72,000 bytes as sent, 12,000 once parsed: the limit applies to the text.
            "params over the limit in escapes",
            jobs.clone(),
            Some(&member),
            format!(
                r#"{{"kind":"echo","params":{{"s":"{}"}}}}"#,
                r"\u0041".repeat(12_000)
            ),
            413,
            "params_too_large",
        ),
        (
            // Refused before it is parsed: as values, 1 MB of it would take some 30 MB.
            "params of half a million numbers",
            jobs.clone(),
            Some(&member),
            format!(
                r#"{{"kind":"echo","params":{{"a":[{}0]}}}}"#,
                "0,".repeat(500_000)
            ),
            413,
            "params_too_large",
        ),
        (
            "NUL in a params value",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"echo","params":{"s":["a\u0000b"]}}"#.into(),
            400,
            "invalid_params",
        ),
        (
            "NUL in a params key",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"echo","params":{"\u0000":1}}"#.into(),
            400,
            "invalid_params",
        ),
        (
            "malformed json",
            jobs.clone(),
            Some(&member),
            r#"{"kind": "#.into(),
            400,
            "invalid_json",
        ),
        (
            "unknown field",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"echo","priority":1}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "missing kind",
            jobs.clone(),
            Some(&member),
            r#"{"params":{}}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "kind not a string",
            jobs.clone(),
            Some(&member),
            r#"{"kind":1}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "kind of half a megabyte",
            jobs.clone(),
            Some(&member),
            json!({"kind": "k".repeat(500_000)}).to_string(),
            400,
            "unknown_kind",
        ),
        (
            "kind that clears a terminal",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"\u001b[2J"}"#.into(),
            400,
            "unknown_kind",
        ),
        (
            "kind given twice",
            jobs.clone(),
            Some(&member),
            r#"{"kind":"echo","kind":"sleep"}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "body over api.body_limit",
            jobs.clone(),
            Some(&member),
            json!({"kind": "echo", "params": {"blob": "x".repeat((1 << 20) + 1024)}}).to_string(),
            413,
            "payload_too_large",
        ),
        (
            "malformed company",
            format!("{base}/v1/companies/not-a-uuid/jobs"),
            Some(&member),
            r#"{"kind":"echo"}"#.into(),
            400,
            "invalid_id",
        ),
        (
            "company id of 60,000 characters",
            format!("{base}/v1/companies/{}/jobs", "a".repeat(60_000)),
            Some(&member),
            r#"{"kind":"echo"}"#.into(),
            400,
            "invalid_id",
        ),
        (
            "empty body",
            jobs.clone(),
            Some(&member),
            String::new(),
            400,
            "invalid_json",
        ),
        (
            "params nested 200 deep",
            jobs.clone(),
            Some(&member),
            format!(
                r#"{{"kind":"echo","params":{{"a":{}1{}}}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
            400,
            "invalid_json",
        ),
        (
            "garbage token",
            jobs.clone(),
            Some("not.a.jwt"),
            r#"{"kind":"echo"}"#.into(),
            401,
            "unauthorized",
        ),
        (
            "token over 8 KiB",
            jobs.clone(),
            Some(&long_token),
            r#"{"kind":"echo"}"#.into(),
            401,
            "unauthorized",
        ),
        (
            "no token",
            jobs.clone(),
            None,
            r#"{"kind":"echo"}"#.into(),
            401,
            "unauthorized",
        ),
        (
            "viewer writes",
            jobs.clone(),
            Some(&viewer),
            r#"{"kind":"echo"}"#.into(),
            403,
            "forbidden",
        ),
        (
            "other company",
            format!("{base}/v1/companies/{other}/jobs"),
            Some(&member),
            r#"{"kind":"echo"}"#.into(),
            403,
            "forbidden",
        ),
    ];
    for (name, url, auth, body, status, code) in cases {
        let mut req = c.post(url).content_type("application/json");
        if let Some(a) = auth {
            req = req.bearer_auth(a);
        }
        let mut r = req.send_body(body).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{name}");
        let error = error_of!(r).error;
        assert_eq!(error.code, code, "{name}");
        assert!(
            error.message.len() < 500 && !error.message.contains('\u{1b}'),
            "{name}: the answer does not echo the input back whole or raw: {}",
            error.message
        );
        if code == "payload_too_large" {
            assert!(
                error
                    .message
                    .contains("larger than the limit of 1048576 bytes"),
                "{name}: the answer says what the limit is: {}",
                error.message
            );
        }
    }
    for ct in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/jsonx",
    ] {
        let mut r = c
            .post(&jobs)
            .bearer_auth(&member)
            .content_type(ct)
            .send_body(r#"{"kind":"echo"}"#)
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{ct}");
        assert_eq!(error_of!(r).error.code, "unsupported_media_type", "{ct}");
    }
    let long_key = "k".repeat(201);
    for key in ["has spaces in it", "", "tab\there", long_key.as_str()] {
        let mut r = c
            .post(&jobs)
            .bearer_auth(&member)
            .insert_header(("idempotency-key", key))
            .send_json(&json!({"kind": "echo"}))
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{key:?}");
        assert_eq!(
            error_of!(r).error.code,
            "invalid_idempotency_key",
            "{key:?}"
        );
    }

    // One request, two keys: which would a retry repeat?
    let mut r = c
        .post(&jobs)
        .bearer_auth(&member)
        .append_header(("idempotency-key", "a"))
        .append_header(("idempotency-key", "b"))
        .send_json(&json!({"kind": "echo"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of!(r).error.code, "invalid_idempotency_key");
    // A request head beyond what the listener takes (128 KiB) is refused before any handler
    // runs, even with a valid token: a 4xx or a closed connection, and no job (counted below).
    // (A client of its own: the connection the listener drops must not go back to `c`'s pool,
    // where the next request would meet it reset.)
    let r = http()
        .post(&jobs)
        .bearer_auth(&member)
        .insert_header(("x-junk", "x".repeat(200 * 1024)))
        .send_json(&json!({"kind": "echo"}))
        .await;
    if let Ok(r) = r {
        assert!(
            r.status().is_client_error(),
            "a 200 KiB header: {}",
            r.status()
        );
    }

    // A credential of another scheme is refused as such, not read as a bearer token.
    let mut r = c
        .post(&jobs)
        .insert_header(("authorization", "Basic dTpw"))
        .send_json(&json!({"kind": "echo"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_of!(r).error.code, "unauthorized");
    // A token for another company reads none of this one's jobs, existing or not.
    let stranger = member_token(other);
    let mut r = c
        .get(format!("{jobs}/{}", Uuid::now_v7()))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_of!(r).error.code, "forbidden");

    for (url, status, code) in [
        (format!("{jobs}/not-a-uuid"), 400, "invalid_id"),
        (format!("{jobs}/{}", "b".repeat(60_000)), 400, "invalid_id"),
        (format!("{jobs}/%00"), 400, "invalid_id"),
        (format!("{jobs}/%FF%FE"), 400, "invalid_id"),
        (
            format!("{jobs}/{}?wait=1s&wait=30s", Uuid::now_v7()),
            400,
            "invalid_query",
        ),
        (format!("{jobs}/{}", Uuid::now_v7()), 404, "not_found"),
        (
            format!("{jobs}/{}?wait=forever", Uuid::now_v7()),
            400,
            "invalid_wait",
        ),
        (
            format!("{jobs}/{}?wait=31s", Uuid::now_v7()),
            400,
            "invalid_wait",
        ),
        (
            format!("{jobs}/{}?wait=-1", Uuid::now_v7()),
            400,
            "invalid_wait",
        ),
        (
            format!("{jobs}/{}?wait=99999999999999999999999", Uuid::now_v7()),
            400,
            "invalid_wait",
        ),
        (
            // A sum humantime would panic on.
            format!(
                "{jobs}/{}?wait=18446744073709551615s1000000000ns",
                Uuid::now_v7()
            ),
            400,
            "invalid_wait",
        ),
        (
            format!("{jobs}/{}?color=red", Uuid::now_v7()),
            400,
            "invalid_query",
        ),
    ] {
        let mut r = c.get(&url).bearer_auth(&member).send().await.unwrap();
        let shown = &url[..url.len().min(200)];
        assert_eq!(r.status().as_u16(), status, "{shown}");
        let error = error_of!(r).error;
        assert_eq!(error.code, code, "{shown}");
        assert!(error.message.len() < 500, "{shown}: {}", error.message);
        let r = c.head(&url).bearer_auth(&member).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "HEAD {shown}");
    }
    // A duration spelt longer than the API reads says so.
    let mut r = c
        .get(format!(
            "{jobs}/{}?wait={}",
            Uuid::now_v7(),
            "1s".repeat(17)
        ))
        .bearer_auth(&member)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let message = error_of!(r).error.message;
    assert!(message.contains("at most 32 characters"), "{message}");
    // Bytes that are not UTF-8 are malformed JSON; methods the routes do not serve are 405.
    let mut r = c
        .post(&jobs)
        .bearer_auth(&member)
        .content_type("application/json")
        .send_body(&b"{\"kind\":\"echo\",\"params\":{\"s\":\"\xff\xfe\"}}"[..])
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "not UTF-8");
    assert_eq!(error_of!(r).error.code, "invalid_json");
    let one = format!("{jobs}/{}", Uuid::now_v7());
    for (method, url) in [
        (actix_web::http::Method::GET, &jobs),
        (actix_web::http::Method::DELETE, &jobs),
        (actix_web::http::Method::PUT, &one),
        (actix_web::http::Method::DELETE, &one),
        (actix_web::http::Method::POST, &one),
    ] {
        let mut r = c
            .request(method.clone(), url)
            .bearer_auth(&member)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {url}");
        assert_eq!(
            error_of!(r).error.code,
            "method_not_allowed",
            "{method} {url}"
        );
    }
    let n = db.scalar("SELECT count(*) FROM jobs").await;
    assert_eq!(n, 0, "nothing was enqueued by bad requests");
}

#[actix_web::test]
async fn another_companys_job_is_not_found() {
    let db = TestDb::new(Schema::Shard).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    own(&db, a, "owned").await;
    own(&db, b, "owned").await;
    let id = enqueue_one(&db, job(a, "echo", json!({}), 1)).await;
    let node = Served::start(&mut shard_node(&db.url, true, 0), 1);
    let both = token(&[
        "--user",
        "u",
        "--company",
        &format!("{a}:admin"),
        "--company",
        &format!("{b}:admin"),
    ]);
    let mut r = http()
        .get(format!("{}/v1/companies/{b}/jobs/{id}", node.url("api")))
        .bearer_auth(&both)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_of!(r).error.code, "not_found");
    let r = http()
        .get(format!("{}/v1/companies/{a}/jobs/{id}", node.url("api")))
        .bearer_auth(&both)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // HEAD answers as GET does, without the body.
    for (company, status) in [(a, 200), (b, 404)] {
        let mut r = http()
            .head(format!(
                "{}/v1/companies/{company}/jobs/{id}",
                node.url("api")
            ))
            .bearer_auth(&both)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        assert!(r.body().await.unwrap().is_empty());
    }
}

#[actix_web::test]
async fn a_repeat_that_a_newer_version_would_refuse_still_gets_its_job_back() {
    // A client repeats a keyed request (its answer was lost) while the shard rolls out a
    // version that no longer runs the kind, or takes smaller params. The job exists: the repeat
    // gets it back, not a refusal that tells its client it does not.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let auth = member_token(company);
    let post = |node: &Served, key: &str, body: Value| {
        http()
            .post(format!("{}/v1/companies/{company}/jobs", node.url("api")))
            .bearer_auth(&auth)
            .insert_header(("idempotency-key", key.to_owned()))
            .send_json(&body)
    };
    let small = json!({"kind": "echo", "params": {"n": 1}});
    let big = json!({"kind": "echo", "params": {"pad": "x".repeat(2000)}});
    let mut old = Served::start(&mut shard_node(&db.url, true, 1), 1);
    let mut r = post(&old, "k-small", small.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let small_id = r.json::<JobView>().await.unwrap().id;
    let mut r = post(&old, "k-big", big.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let big_id = r.json::<JobView>().await.unwrap().id;
    old.stop_and_read_logs();

    // A version without `echo`.
    let mut cmd = shard_node(&db.url, true, 1);
    cmd.env("TENANTRY_QUEUE__BUILTIN_KINDS", "[\"sleep\"]");
    let mut new = Served::start(&mut cmd, 1);
    let mut r = post(&new, "k-small", small.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.body().await);
    let replayed: JobView = r.json().await.unwrap();
    assert_eq!((replayed.id, replayed.state), (small_id, JobState::Done));
    // Anything but that repeat is refused as before: another key, other params.
    let mut r = post(&new, "k-other", small.clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of!(r).error.code, "unknown_kind");
    let mut r = post(&new, "k-small", json!({"kind": "echo", "params": {"n": 2}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of!(r).error.code, "unknown_kind");
    // Params the database cannot hold match no job: still the refusal, not a 500.
    let mut r = post(
        &new,
        "k-small",
        json!({"kind": "echo", "params": {"n": "\u{0}"}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of!(r).error.code, "invalid_params");
    // So does a kind the database cannot hold.
    let mut r = post(
        &new,
        "k-small",
        json!({"kind": "ec\u{0}ho", "params": {"n": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of!(r).error.code, "unknown_kind");
    new.stop_and_read_logs();

    // A version that takes params of 1 KiB at most.
    let mut cmd = shard_node(&db.url, true, 1);
    cmd.env("TENANTRY_QUEUE__MAX_PARAMS_SIZE", "1KiB");
    let mut newer = Served::start(&mut cmd, 1);
    let mut r = post(&newer, "k-big", big.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.body().await);
    assert_eq!(r.json::<JobView>().await.unwrap().id, big_id);
    let mut r = post(&newer, "k-big-2", big).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_of!(r).error.code, "params_too_large");
    newer.stop_and_read_logs();
    assert_eq!(
        db.scalar("SELECT count(*) FROM jobs").await,
        2,
        "no job was added"
    );
}

#[actix_web::test]
async fn a_repeated_idempotency_key_returns_the_original_job() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let node = Served::start(&mut shard_node(&db.url, true, 2), 1);
    let url = format!("{}/v1/companies/{company}/jobs", node.url("api"));
    let auth = member_token(company);
    let post = |params: Value| {
        http()
            .post(&url)
            .bearer_auth(&auth)
            .insert_header(("idempotency-key", "order-42"))
            .send_json(&json!({"kind": "echo", "params": params}))
    };
    let mut r1 = post(json!({"n": 1})).await.unwrap();
    assert_eq!(r1.status(), 200);
    let j1: JobView = r1.json().await.unwrap();
    let mut r2 = post(json!({"n": 1})).await.unwrap();
    assert_eq!(r2.status(), 200);
    let replay_request = r2
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let j2: JobView = r2.json().await.unwrap();
    assert_eq!(j1.id, j2.id, "the replay returns the original job");
    // The same key twice in one request (a proxy repeating it) is that one key.
    let mut twice = http()
        .post(&url)
        .bearer_auth(&auth)
        .append_header(("idempotency-key", "order-42"))
        .append_header(("idempotency-key", "order-42"))
        .send_json(&json!({"kind": "echo", "params": {"n": 1}}))
        .await
        .unwrap();
    assert_eq!(twice.status(), 200);
    assert_eq!(twice.json::<JobView>().await.unwrap().id, j1.id);
    let mut r3 = post(json!({"n": 2})).await.unwrap();
    assert_eq!(r3.status(), 422);
    assert_eq!(error_of!(r3).error.code, "idempotency_key_reused");
    let n = db.scalar("SELECT count(*) FROM jobs").await;
    assert_eq!(n, 1);
    // Another kind with the same params is another request too.
    let keyed = |kind: &str| {
        http()
            .post(&url)
            .bearer_auth(&auth)
            .insert_header(("idempotency-key", "order-44"))
            .send_json(&json!({"kind": kind, "params": {"ms": 1}}))
    };
    assert_eq!(keyed("echo").await.unwrap().status(), 200);
    let mut r4 = keyed("sleep").await.unwrap();
    assert_eq!(r4.status(), 422);
    assert_eq!(error_of!(r4).error.code, "idempotency_key_reused");
    db.client()
        .await
        .execute("DELETE FROM jobs WHERE idempotency_key = 'order-44'", &[])
        .await
        .unwrap();
    // Keys are per company: another company's same key is its own job.
    let other = Uuid::now_v7();
    own(&db, other, "owned").await;
    let mut r5 = http()
        .post(format!("{}/v1/companies/{other}/jobs", node.url("api")))
        .bearer_auth(member_token(other))
        .insert_header(("idempotency-key", "order-42"))
        .send_json(&json!({"kind": "echo", "params": {"n": 1}}))
        .await
        .unwrap();
    assert_eq!(r5.status(), 200);
    assert_ne!(r5.json::<JobView>().await.unwrap().id, j1.id);
    assert_eq!(db.scalar("SELECT count(*) FROM jobs").await, 2);
    db.client()
        .await
        .execute("DELETE FROM jobs WHERE company_id = $1", &[&other])
        .await
        .unwrap();

    // Params are compared by value, as the database holds them: it reads `1e2` back as 100,
    // and an identical repeat must still get its job back.
    let raw = |body: &'static str| {
        http()
            .post(&url)
            .bearer_auth(&auth)
            .insert_header(("idempotency-key", "order-43"))
            .content_type("application/json")
            .send_body(body)
    };
    let exponents = r#"{"kind": "echo", "params": {"n": 1e2, "big": 1e16}}"#;
    let mut first = raw(exponents).await.unwrap();
    assert_eq!(first.status(), 200);
    let first: JobView = first.json().await.unwrap();
    let mut again = raw(exponents).await.unwrap();
    assert_eq!(again.status(), 200, "{:?}", again.body().await);
    assert_eq!(again.json::<JobView>().await.unwrap().id, first.id);
    let mut other = raw(r#"{"kind": "echo", "params": {"n": 1e3, "big": 1e16}}"#)
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(error_of!(other).error.code, "idempotency_key_reused");
    let n = db.scalar("SELECT count(*) FROM jobs").await;
    assert_eq!(n, 2);

    // The replaying request's log leads to the job, and to the request that created it.
    let mut node = node;
    let lines = node.stop_and_read_logs();
    let replayed = lines
        .iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("idempotency key seen before"))
                && v["span"]["request.id"] == replay_request.as_str()
        })
        .unwrap_or_else(|| panic!("no replay line for {replay_request}: {lines:?}"));
    assert_eq!(replayed["job.id"], j1.id.to_string());
    let original = replayed["job.request_id"].as_str().unwrap();
    assert!(
        !original.is_empty() && original != replay_request,
        "{replayed}"
    );
}

#[actix_web::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let mut cmd = shard_node(&db.url, true, 0);
    cmd.env("TENANTRY_QUEUE__MAX_WAITING_PER_COMPANY", "3")
        .env("TENANTRY_QUEUE__MAX_WAITING_PER_SHARD", "4")
        .env("TENANTRY_API__SYNC_WAIT", "0s");
    let node = Served::start(&mut cmd, 1);
    let url = format!("{}/v1/companies/{company}/jobs", node.url("api"));
    let auth = member_token(company);
    let mut first = None;
    for i in 0..3 {
        let mut req = http().post(&url).bearer_auth(&auth);
        if i == 0 {
            req = req.insert_header(("idempotency-key", "first"));
        }
        let mut r = req.send_json(&json!({"kind": "echo"})).await.unwrap();
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await.unwrap();
        first.get_or_insert(body["id"].clone());
    }
    let mut r = http()
        .post(&url)
        .bearer_auth(&auth)
        .send_json(&json!({"kind": "echo"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_of!(r).error.code, "too_many_jobs");
    let n = db.scalar("SELECT count(*) FROM jobs").await;
    assert_eq!(n, 3, "the refused request left nothing behind");
    let counted =
        |event: &str| format!("tenantry_queue_events_total{{event=\"{event}\",shard=\"shard-1\"}}");
    let base = node.url("api");
    assert_eq!(metric(&base, &counted("refused_company")).await, 1.0);

    // The shard-wide cap (4) refuses other companies once the API's count of waiting jobs,
    // refreshed every second, has caught up with a backlog written past the API. Each try is a
    // new company, so none meets its own cap first.
    let filler: Vec<_> = (0..5)
        .map(|_| job(Uuid::now_v7(), "echo", json!({}), 1))
        .collect();
    enqueue(&db, &filler).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut accepted = 0;
    let refused = loop {
        let other = Uuid::now_v7();
        own(&db, other, "owned").await;
        let mut r = http()
            .post(format!("{}/v1/companies/{other}/jobs", node.url("api")))
            .bearer_auth(member_token(other))
            .send_json(&json!({"kind": "echo"}))
            .await
            .unwrap();
        if r.status() == 202 && std::time::Instant::now() < deadline {
            // Accepted only because the count was not refreshed yet.
            accepted += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        assert_eq!(r.status(), 429);
        assert!(r.headers().get("retry-after").is_some());
        break error_of!(r).error.code;
    };
    assert_eq!(refused, "queue_full");
    let n = db.scalar("SELECT count(*) FROM jobs").await;
    assert_eq!(n, 8 + accepted, "the refused request left nothing behind");
    assert_eq!(metric(&base, &counted("refused_shard")).await, 1.0);

    // While full, a request already accepted still gets its job back (its company is at its
    // own cap too), and a company this shard does not own still gets 421, so a gateway with a
    // stale route re-routes it instead of telling the client to wait.
    let mut r = http()
        .post(&url)
        .bearer_auth(&auth)
        .insert_header(("idempotency-key", "first"))
        .send_json(&json!({"kind": "echo"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let replayed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(Some(&replayed["id"]), first.as_ref());
    let stranger = Uuid::now_v7();
    let mut r = http()
        .post(format!("{}/v1/companies/{stranger}/jobs", node.url("api")))
        .bearer_auth(member_token(stranger))
        .send_json(&json!({"kind": "echo"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    assert_eq!(error_of!(r).error.code, "tenant_not_on_shard");
    let n = db.scalar("SELECT count(*) FROM jobs").await;
    assert_eq!(n, 8 + accepted, "neither wrote a job");
}

#[actix_web::test]
async fn a_shard_refuses_companies_it_does_not_own() {
    let db = TestDb::new(Schema::Shard).await;
    let (moved, frozen, unknown) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    own(&db, moved, "moved").await;
    own(&db, frozen, "frozen").await;
    let node = Served::start(&mut shard_node(&db.url, true, 0), 1);
    for (company, status, code) in [
        (moved, 421, "tenant_not_on_shard"),
        (unknown, 421, "tenant_not_on_shard"),
        (frozen, 503, "tenant_frozen"),
    ] {
        let mut r = http()
            .post(format!("{}/v1/companies/{company}/jobs", node.url("api")))
            .bearer_auth(member_token(company))
            .send_json(&json!({"kind": "echo"}))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        if status == 503 {
            assert!(r.headers().get("retry-after").is_some());
        }
        assert_eq!(error_of!(r).error.code, code);
        // A kind this shard does not run (its owner may, mid-rollout) is still sent back to
        // the gateway first.
        let mut r = http()
            .post(format!("{}/v1/companies/{company}/jobs", node.url("api")))
            .bearer_auth(member_token(company))
            .send_json(&json!({"kind": "report.render"}))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "unknown kind");
        assert_eq!(error_of!(r).error.code, code, "unknown kind");
        // So are params this shard refuses (its owner's checks and limits may differ).
        let oversized = "x".repeat(100 * 1024);
        for (what, body) in [
            ("not an object", json!({"kind": "echo", "params": [1]})),
            ("a NUL", json!({"kind": "echo", "params": {"s": "a\u{0}b"}})),
            (
                "too large",
                json!({"kind": "echo", "params": {"s": oversized}}),
            ),
            (
                "refused by sleep",
                json!({"kind": "sleep", "params": {"ms": "soon"}}),
            ),
        ] {
            let mut r = http()
                .post(format!("{}/v1/companies/{company}/jobs", node.url("api")))
                .bearer_auth(member_token(company))
                .send_json(&body)
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), status, "{what}");
            assert_eq!(error_of!(r).error.code, code, "{what}");
        }
    }
    let n = db.scalar("SELECT count(*) FROM jobs").await;
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_job_request_whose_body_stalls_gets_408_and_enqueues_nothing() {
    // A caller (or a gateway) that declares more body than it sends holds the handler, and
    // its connection, only for `http.body_timeout`; a body whose chunked encoding breaks is
    // 400 invalid_body. Neither leaves a job.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let mut cmd = shard_node(&db.url, true, 0);
    cmd.env("TENANTRY_HTTP__BODY_TIMEOUT", "1s");
    let node = Served::start(&mut cmd, 1);
    let addr = node.url("api").trim_start_matches("http://").to_owned();
    let head = |framing: &str| {
        format!(
            "POST /v1/companies/{company}/jobs HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n",
            member_token(company)
        )
        .into_bytes()
    };
    let body = br#"{"kind":"echo","params":{}}"#;
    let mut stalled = head(&format!("Content-Length: {}", body.len() + 100));
    stalled.extend_from_slice(body);
    let started = Instant::now();
    let answer = send_and_stall(&addr, stalled);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4));

    let mut broken = head("Transfer-Encoding: chunked");
    broken.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
    let answer = send_and_stall(&addr, broken);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_body"), "{answer}");
    assert_eq!(db.scalar("SELECT count(*) FROM jobs").await, 0);
    // The request's line says why, not only with which status.
    let mut node = node;
    let lines = node.stop_and_read_logs();
    let timed_out = lines
        .iter()
        .find(|v| v["message"] == "request" && v["http.status"] == 408)
        .unwrap_or_else(|| panic!("no request line for the 408: {lines:?}"));
    assert_eq!(timed_out["span"]["error.code"], "request_timeout");
}

#[tokio::test]
async fn a_failed_attempt_is_logged_with_the_request_id_of_its_job() {
    // "What happened to request X" reaches into the worker: the job's log lines carry the
    // request id of the call that created it.
    let db = TestDb::new(Schema::Shard).await;
    let mut worker = start_worker(&mut shard_node(&db.url, false, 1));
    let mut failing = job(Uuid::now_v7(), "no-such-kind", json!({}), 1);
    failing.request_id = "log-job-1".into();
    let id = enqueue_one(&db, failing).await;
    assert!(until_state(&db, id, "error", Duration::from_secs(10)).await);
    let lines = worker.stop_and_read_logs();
    // At the default level, with what the failure does to the job.
    let line = log_line(&lines, "job attempt failed; no attempts left");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["span"]["request.id"], "log-job-1");
    assert_eq!(line["span"]["job.id"], id.to_string());
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("no handler"))
    );
}

#[tokio::test]
async fn several_worker_processes_complete_thousands_of_jobs_exactly_once() {
    let db = TestDb::new(Schema::Shard).await;
    let companies: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let jobs: Vec<_> = (0..3000)
        .map(|i| job(companies[i % 5], "echo", json!({"i": i}), 3))
        .collect();
    enqueue(&db, &jobs).await;
    let mut workers: Vec<Served> = (0..3)
        .map(|_| {
            let mut cmd = shard_node(&db.url, false, 8);
            cmd.env("TENANTRY_QUEUE__CLAIM_BATCH", "16");
            start_worker(&mut cmd)
        })
        .collect();
    let open = until_count(
        &db,
        "SELECT count(*) FROM jobs WHERE state <> 'done'",
        0,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(open, 0, "every job finished");
    let c = db.client().await;
    let r = c
        .query_one(
            "SELECT count(*), max(attempts), min(attempts) FROM jobs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i32>(1), r.get::<_, i32>(2)),
        (3000, 1, 1),
        "each ran exactly once"
    );
    let events: i64 = c
        .query_one(
            "SELECT coalesce(sum(jsonb_array_length(events)), 0)::bigint FROM outbox",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 3000, "one job.finished event per job");
    let results_ok: i64 = c
        .query_one("SELECT count(*) FROM jobs WHERE result = params", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(results_ok, 3000);
    for w in &mut workers {
        w.signal("TERM");
        assert_eq!(w.wait_exit(Duration::from_secs(10)), Some(0));
    }
}

#[tokio::test]
async fn a_job_of_a_worker_killed_mid_job_is_rescued_and_completed_once() {
    let db = TestDb::new(Schema::Shard).await;
    // Long enough that the kill surely lands while it runs, even on a loaded machine.
    let mut sleeper = job(Uuid::now_v7(), "sleep", json!({"ms": 4000}), 3);
    sleeper.request_id = "killed-mid-job".into();
    let id = enqueue_one(&db, sleeper).await;
    let config = |cmd: &mut std::process::Command| {
        cmd.env("TENANTRY_QUEUE__LEASE", "2s")
            .env("TENANTRY_QUEUE__RESCUE_INTERVAL", "300ms");
    };
    let mut first = shard_node(&db.url, false, 1);
    config(&mut first);
    let mut victim = start_worker(&mut first);
    assert_eq!(
        until_count(
            &db,
            "SELECT count(*) FROM jobs WHERE state = 'processing'",
            1,
            Duration::from_secs(10)
        )
        .await,
        1
    );
    victim.signal("KILL");
    victim.wait_exit(Duration::from_secs(5));
    let mut second = shard_node(&db.url, false, 1);
    config(&mut second);
    let mut rescuer = start_worker(&mut second);
    assert_eq!(
        until_count(
            &db,
            "SELECT count(*) FROM jobs WHERE state = 'done'",
            1,
            Duration::from_secs(20)
        )
        .await,
        1
    );
    let r = db
        .client()
        .await
        .query_one("SELECT attempts, result FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(
        r.get::<_, i32>(0),
        2,
        "the killed attempt counted, the second completed"
    );
    assert_eq!(r.get::<_, Value>(1), json!({"slept_ms": 4000}));
    let events = db
        .scalar("SELECT coalesce(sum(jsonb_array_length(events)), 0)::bigint FROM outbox")
        .await;
    assert_eq!(events, 1, "finished once");

    // "What happened to request X": the rescue is logged in the job's span, under its request
    // id, and so is the second attempt's outcome.
    let lines = rescuer.stop_and_read_logs();
    let rescue = log_line(&lines, "lease expired: the job is back to waiting");
    assert_eq!(rescue["span"]["request.id"], "killed-mid-job");
    assert_eq!(rescue["span"]["job.id"], id.to_string());
    let done = log_line(&lines, "job done");
    assert_eq!(done["span"]["request.id"], "killed-mid-job");
}

#[tokio::test]
async fn graceful_shutdown_releases_claimed_jobs_back_to_waiting() {
    let db = TestDb::new(Schema::Shard).await;
    let mut long = job(Uuid::now_v7(), "sleep", json!({"ms": 20000}), 1);
    long.request_id = "released-at-stop".into();
    let id = enqueue_one(&db, long).await;
    let mut cmd = shard_node(&db.url, false, 1);
    cmd.env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "300ms");
    let mut w = start_worker(&mut cmd);
    assert_eq!(
        until_count(
            &db,
            "SELECT count(*) FROM jobs WHERE state = 'processing'",
            1,
            Duration::from_secs(10)
        )
        .await,
        1
    );
    let lines = w.stop_and_read_logs();
    let released = log_line(&lines, "released back to waiting");
    assert_eq!(released["span"]["request.id"], "released-at-stop");
    assert_eq!(released["span"]["job.id"], id.to_string());
    let r = db
        .client()
        .await
        .query_one(
            "SELECT state, attempts, worker_id FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "waiting");
    assert_eq!(
        r.get::<_, i32>(1),
        0,
        "the interrupted attempt does not count"
    );
    assert_eq!(r.get::<_, Option<String>>(2), None);
}

/// An events exchange on `broker` and a queue bound to `company`'s routing key:
/// (channel, exchange, queue).
async fn company_events(broker: &TestBroker, company: Uuid) -> (lapin::Channel, String, String) {
    use lapin::{options::*, types::FieldTable};
    let (exchange, queue) = (broker.exchange("events"), broker.queue("mine"));
    let ch = broker.conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        format!("company.{company}").as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (ch, exchange, queue)
}

#[tokio::test]
async fn job_finished_events_reach_rabbitmq_by_company() {
    use lapin::options::*;
    let db = TestDb::new(Schema::Shard).await;
    let broker = TestBroker::new().await;
    let company = Uuid::now_v7();
    let (ch, exchange, queue) = company_events(&broker, company).await;
    let [id, _other] = enqueue(
        &db,
        &[
            job(company, "echo", json!({}), 1),
            job(Uuid::now_v7(), "echo", json!({}), 1),
        ],
    )
    .await[..] else {
        panic!()
    };
    let mut cmd = shard_node(&db.url, false, 2);
    cmd.env("TENANTRY_RABBITMQ__RELAY_EVENTS", "true")
        .env("TENANTRY_RABBITMQ__EVENTS_EXCHANGE", &exchange);
    let _w = start_worker(&mut cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let event = loop {
        if let Some(msg) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            break serde_json::from_slice::<JobFinishedEvent>(&msg.delivery.data).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no event arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (event.job_id, event.company_id, event.state),
        (id, company, JobState::Done)
    );
    assert_eq!(event.kind_of_event, "job.finished");
    assert_eq!(
        until_count(
            &db,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            0,
            Duration::from_secs(10)
        )
        .await,
        0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(
        extra.is_none(),
        "only this company's events are routed to its key"
    );
    broker.cleanup().await;
}

/// A node relaying `db`'s events to `exchange` through an [`AlarmProxy`] in front of the
/// broker, with a grace period of 1 s.
///
/// [`AlarmProxy`]: tenantry_testkit::alarm::AlarmProxy
async fn relay_behind_an_alarm(
    db: &TestDb,
    exchange: &str,
) -> (tenantry_testkit::alarm::AlarmProxy, Served) {
    let (alarm, url) =
        tenantry_testkit::alarm::AlarmProxy::in_front_of(&tenantry_testkit::amqp_url()).await;
    let mut cmd = shard_node(&db.url, false, 1);
    cmd.env("TENANTRY_RABBITMQ__RELAY_EVENTS", "true")
        .env("TENANTRY_RABBITMQ__URL", &url)
        .env("TENANTRY_RABBITMQ__EVENTS_EXCHANGE", exchange)
        .env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "1s");
    (alarm, start_worker(&mut cmd))
}

/// An outbox row of one `job.finished` event for `company`, told apart by `n`.
fn outbox_event(company: Uuid, n: i32) -> String {
    format!(
        "INSERT INTO outbox (events) VALUES (jsonb_build_array(jsonb_build_object(
             'type', 'job.finished', 'company_id', '{company}', 'n', {n})))"
    )
}

#[tokio::test]
async fn while_rabbitmq_blocks_publishers_the_relay_holds_no_transaction_and_still_stops() {
    // During a memory or disk alarm RabbitMQ answers a connection's publish with
    // `connection.blocked` and reads nothing more from it, so the publish does not return. The
    // relay used to publish inside its batch's transaction, so it held that transaction (row
    // locks, vacuum's horizon) for as long as the alarm lasted, and a SIGTERM waited out the
    // grace period. It must give the batch up, wait outside any transaction, publish once the
    // alarm clears, and stop promptly meanwhile.
    let db = TestDb::new(Schema::Shard).await;
    let broker = TestBroker::new().await;
    let company = Uuid::now_v7();
    let (ch, exchange, queue) = company_events(&broker, company).await;
    let (alarm, mut served) = relay_behind_an_alarm(&db, &exchange).await;
    let event = |n: i32| outbox_event(company, n);
    let unpublished = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
    // Transactions of the node's connections open for over half a second.
    let held = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND xact_start IS NOT NULL
            AND xact_start < now() - interval '500 ms' AND pid <> pg_backend_pid()",
        db.name
    );
    db.exec(&event(1)).await;
    assert_eq!(
        until_count(&db, unpublished, 0, Duration::from_secs(10)).await,
        0
    );
    assert_eq!(queue_depth(&ch, &queue).await, 1);

    alarm.raise();
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.exec(&event(2)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        until_count(&db, unpublished, 1, Duration::from_secs(1)).await,
        1
    );
    assert_eq!(
        until_count(&db, &held, 0, Duration::from_secs(1)).await,
        0,
        "no transaction is held open while publishers are blocked"
    );
    alarm.clear();
    assert_eq!(
        until_count(&db, unpublished, 0, Duration::from_secs(10)).await,
        0,
        "published once the alarm clears"
    );
    // The given-up batch's publish went out when the alarm cleared, and its row again after:
    // at least once.
    assert!(queue_depth(&ch, &queue).await >= 2);

    // Blocked again, with an event waiting: SIGTERM stops the node within its grace period.
    alarm.raise();
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.exec(&event(3)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    served.signal("TERM");
    let code = served.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "the node stopped cleanly");
    let logs = served.logs_to_end(Duration::from_secs(5)).join("\n");
    assert!(logs.contains("RabbitMQ is blocking publishers"), "{logs}");
    assert!(
        !logs.contains("roles did not stop within the grace period"),
        "{logs}"
    );
    assert_eq!(
        until_count(&db, unpublished, 1, Duration::from_secs(1)).await,
        1
    );
    drop(alarm);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_connection_lost_while_rabbitmq_blocks_publishers_is_replaced() {
    // A broker restart is a common way out of a disk alarm. The relay, waiting out the alarm,
    // must see its connection gone and connect again, not take the dead connection (which
    // lapin leaves marked blocked) for one still blocked and give up every batch at once.
    let db = TestDb::new(Schema::Shard).await;
    let broker = TestBroker::new().await;
    let company = Uuid::now_v7();
    let (ch, exchange, queue) = company_events(&broker, company).await;
    let (alarm, mut served) = relay_behind_an_alarm(&db, &exchange).await;
    let event = |n: i32| outbox_event(company, n);
    let unpublished = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
    db.exec(&event(1)).await;
    assert_eq!(
        until_count(&db, unpublished, 0, Duration::from_secs(10)).await,
        0
    );
    alarm.raise();
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.exec(&event(2)).await;
    // The relay has tried to publish it, and waits out the alarm.
    let mut seen = Vec::new();
    let started = Instant::now();
    while !seen
        .iter()
        .any(|l: &String| l.contains("RabbitMQ is blocking publishers"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the relay never met the alarm: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen.extend(served.drain_logs());
    }
    assert_eq!(until_count(&db, unpublished, 1, Duration::ZERO).await, 1);
    // The broker goes away while it blocks the relay; the one it comes back as has no alarm.
    alarm.cut_connections();
    tokio::time::sleep(Duration::from_millis(300)).await;
    alarm.clear();
    assert_eq!(
        until_count(&db, unpublished, 0, Duration::from_secs(10)).await,
        0,
        "published on a new connection"
    );
    assert!(queue_depth(&ch, &queue).await >= 2);
    served.signal("TERM");
    assert_eq!(served.wait_exit(Duration::from_secs(10)), Some(0));
    seen.extend(served.logs_to_end(Duration::from_secs(5)));
    let logs = seen.join("\n");
    assert!(
        logs.contains("the connection closed while RabbitMQ blocked publishers"),
        "{logs}"
    );
    assert!(
        logs.matches("RabbitMQ is blocking publishers").count() < 5,
        "no loop over a dead connection: {logs}"
    );
    drop(alarm);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_company_queue_that_refuses_events_holds_up_only_its_own_events() {
    // Company A's queue is full and set to reject-publish, so RabbitMQ refuses (nacks) A's
    // event. B's events, one in the same outbox row (as in a completion batch) and one in the
    // next, must go out once each; A's event waits and is sent once A's queue has room again.
    use lapin::{BasicProperties, options::*, types::AMQPValue, types::FieldTable};
    let db = TestDb::new(Schema::Shard).await;
    let broker = TestBroker::new().await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (ch, exchange, b_queue) = company_events(&broker, b).await;
    let a_queue = broker.queue("full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        a_queue.as_str().into(),
        QueueDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        a_queue.as_str().into(),
        exchange.as_str().into(),
        format!("company.{a}").as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Fill A's queue.
    ch.basic_publish(
        "".into(),
        a_queue.as_str().into(),
        BasicPublishOptions::default(),
        b"filler",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let event = |company: Uuid, n: i32| {
        format!("jsonb_build_object('type', 'job.finished', 'company_id', '{company}', 'n', {n})")
    };
    db.exec(&format!(
        "INSERT INTO outbox (events) VALUES (jsonb_build_array({}, {}));
         INSERT INTO outbox (events) VALUES (jsonb_build_array({}))",
        event(a, 1),
        event(b, 1),
        event(b, 2)
    ))
    .await;
    let unpublished = |company: Uuid| {
        format!(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND events @> '[{{\"company_id\": \"{company}\"}}]'"
        )
    };
    // Two worker processes, two relays: the wait before a refused event is tried again must
    // hold for both, not just for the one RabbitMQ refused.
    let relay = || {
        let mut cmd = shard_node(&db.url, false, 1);
        cmd.env("TENANTRY_RABBITMQ__RELAY_EVENTS", "true")
            .env("TENANTRY_RABBITMQ__EVENTS_EXCHANGE", &exchange);
        start_worker(&mut cmd)
    };
    let _workers = [relay(), relay()];
    assert_eq!(
        until_count(&db, &unpublished(b), 0, Duration::from_secs(10)).await,
        0,
        "B's event went out past A's refused one"
    );
    assert_eq!(queue_depth(&ch, &b_queue).await, 2);
    // A's event is refused again at each try (1 s, then 2 s later) and waits in a row of its
    // own, so B's event that shared its row is not sent again.
    assert_eq!(
        until_count(&db, &unpublished(a), 0, Duration::from_millis(3500)).await,
        1,
        "A's event waits while A's queue is full"
    );
    assert_eq!(queue_depth(&ch, &b_queue).await, 2, "B's events, once each");
    let (tries, rows): (i32, i64) = {
        let c = db.client().await;
        let r = c
            .query_one(
                "SELECT (SELECT max(tries) FROM outbox), (SELECT count(*) FROM outbox)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(tries >= 2, "A's event was tried again: {tries} tries");
    assert!(
        rows <= 6,
        "about one try at 1 s, 2 s, 4 s…, whichever relay makes it: {rows} rows for {tries} tries"
    );
    // A's consumer takes the filler: the next try delivers A's event.
    let filler = ch
        .basic_get(a_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the filler");
    assert_eq!(filler.delivery.data, b"filler");
    assert_eq!(
        until_count(&db, &unpublished(a), 0, Duration::from_secs(15)).await,
        0,
        "A's event is published once its queue has room"
    );
    assert_eq!(queue_depth(&ch, &b_queue).await, 2, "B's events, once each");
    let event = ch
        .basic_get(a_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("A's event");
    let event: Value = serde_json::from_slice(&event.delivery.data).unwrap();
    assert_eq!(event["company_id"], a.to_string());
    assert_eq!(
        db.scalar("SELECT count(*) FROM outbox WHERE tries > 0")
            .await,
        0,
        "the rows that held A's refused event are deleted once it is published: the row it \
         came from keeps it"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn refused_events_wait_at_most_a_minute_however_often_they_were_refused() {
    // The requeue statement moves a batch's refused events to one row per refusal count of
    // the rows they came from, counts on from it, and caps the wait at 60 s, also after days
    // of refusals; events refused for the first time wait 1 s, whatever shares their batch.
    let db = TestDb::new(Schema::Shard).await;
    let c = db.client().await;
    let ids: Vec<i64> = c
        .query(
            "INSERT INTO outbox (events, tries) VALUES ('[]', 2), ('[]', 5000), ('[]', 0)
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let bodies: Vec<String> = (1..=4).map(|n| format!(r#"{{"n": {n}}}"#)).collect();
    let sources = vec![ids[0], ids[1], ids[0], ids[2]];
    let mut moved: Vec<(i32, Value, f64)> = Vec::new();
    for row in c
        .query(tenantry_queue::relay::REQUEUE_SQL, &[&bodies, &sources])
        .await
        .unwrap()
    {
        let (id, tries, n): (i64, i32, i32) = (row.get(0), row.get(1), row.get(2));
        let r = c
            .query_one(
                "SELECT events, extract(epoch FROM not_before - now())::float8 FROM outbox
                  WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let events: Value = r.get(0);
        assert_eq!(events.as_array().map(Vec::len), Some(n as usize));
        moved.push((tries, events, r.get(1)));
    }
    moved.sort_by_key(|(tries, _, _)| *tries);
    let waits: Vec<f64> = moved.iter().map(|(_, _, wait)| *wait).collect();
    let moved: Vec<(i32, Value)> = moved.into_iter().map(|(t, e, _)| (t, e)).collect();
    assert_eq!(
        moved,
        vec![
            (1, json!([{"n": 4}])),
            (3, json!([{"n": 1}, {"n": 3}])),
            (5001, json!([{"n": 2}])),
        ]
    );
    let near = |wait: f64, want: f64| (want - 2.0..=want + 1.0).contains(&wait);
    assert!(
        near(waits[0], 1.0) && near(waits[1], 4.0) && near(waits[2], 60.0),
        "1 s, 4 s and at most a minute: {waits:?}"
    );
}

#[tokio::test]
async fn a_relay_batch_reads_only_the_rows_within_its_message_cap() {
    // A shard outbox row holds a whole completion batch: a batch of rows of 1,800 events each
    // reads the events of the rows up to the one that reaches 5,000 events, not of every row
    // it locks.
    let db = TestDb::new(Schema::Shard).await;
    let mut c = db.client().await;
    let ids: Vec<i64> = c
        .query(
            "INSERT INTO outbox (events)
             SELECT (SELECT jsonb_agg(jsonb_build_object('company_id', 'c', 'n', e))
                       FROM generate_series(1, 1800) e)
               FROM generate_series(1, 6)
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let select = tenantry_queue::relay::SELECT_SQL;
    assert!(
        select.contains(&format!(
            "before < {}",
            tenantry_core::relay::MAX_BATCH_MESSAGES
        )),
        "the select's cap is the relay's"
    );
    let ids_of =
        |rows: Vec<tokio_postgres::Row>| -> Vec<i64> { rows.iter().map(|r| r.get(0)).collect() };
    let none: Vec<i64> = Vec::new();
    let tx = c.transaction().await.unwrap();
    let batch = ids_of(tx.query(select, &[&4i64, &none]).await.unwrap());
    assert_eq!(batch, ids[..3], "1,800 + 1,800 + 1,800 crosses 5,000");
    // Another relay skips the rows the first one locked (four: its row limit).
    let other = db.client().await;
    let next = ids_of(other.query(select, &[&100i64, &none]).await.unwrap());
    assert_eq!(next, ids[4..]);
    tx.rollback().await.unwrap();
    // Rows a relay holds back (refused, waiting) are left out, and the cap counts on after them.
    let held = vec![ids[0]];
    let batch = ids_of(other.query(select, &[&100i64, &held]).await.unwrap());
    assert_eq!(batch, ids[1..4]);
}

#[tokio::test]
async fn an_outbox_row_of_thousands_of_events_is_relayed_whole_with_the_rows_after_it() {
    // A relay batch stops at about 5,000 messages, after the row that crosses it: nothing of
    // that row or of the rows behind it may be lost or left unpublished.
    let db = TestDb::new(Schema::Shard).await;
    let broker = TestBroker::new().await;
    let company = Uuid::now_v7();
    let (ch, exchange, queue) = company_events(&broker, company).await;
    for n in [6000, 3, 2] {
        db.exec(&format!(
            "INSERT INTO outbox (events)
             SELECT jsonb_agg(jsonb_build_object('type', 'job.finished',
                                                 'company_id', '{company}', 'n', i))
               FROM generate_series(1, {n}) i"
        ))
        .await;
    }
    let mut cmd = shard_node(&db.url, false, 1);
    cmd.env("TENANTRY_RABBITMQ__RELAY_EVENTS", "true")
        .env("TENANTRY_RABBITMQ__EVENTS_EXCHANGE", &exchange);
    let _w = start_worker(&mut cmd);
    assert_eq!(
        until_count(
            &db,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            0,
            Duration::from_secs(30)
        )
        .await,
        0,
        "every row was published"
    );
    assert_eq!(queue_depth(&ch, &queue).await, 6005, "every event, once");
    broker.cleanup().await;
}

#[tokio::test]
async fn operators_list_show_retry_and_resolve_dead_letters() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let shard = TestDb::new(Schema::Shard).await;
    let dir = crate::cli::tempdir();
    let map = dir.join("map.toml");
    std::fs::write(&map, format!("environment = \"t\"\n[[shard]]\nid = \"s1\"\ndatabase_url = \"{}\"\nendpoints = [\"http://127.0.0.1:1\"]\n", shard.url)).unwrap();
    let env = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    assert_eq!(
        run(tenantry()
            .args(["admin", "shard", "apply"])
            .arg(&map)
            .envs(env.clone()))
        .0,
        0
    );
    // A second shard whose database is down; it sorts first, so every search meets it.
    catalog
        .exec("INSERT INTO shards (id, database_url) VALUES ('s0', 'postgres://postgres@127.0.0.1:1/down')")
        .await;
    let company = Uuid::now_v7();
    let id = enqueue_one(&shard, job(company, "no-such-kind", json!({"x": 1}), 1)).await;
    let mut c = shard.client().await;
    fail_one(&mut c).await;

    let admin = |args: &[&str]| run(tenantry().arg("admin").args(args).envs(env.clone()));
    let (code, out, err) = admin(&["jobs", "list", "--shard", "s1", "--state", "error"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id.to_string()) && out.contains("no handler"),
        "{out}"
    );
    let (code, out, err) = admin(&["jobs", "show", &id.to_string()]);
    assert_eq!(
        code, 0,
        "the shard that is down does not hide the job: {err}"
    );
    assert!(err.contains("skipping shard s0"), "{err}");
    for field in [
        "worker",
        "lease expires",
        "runnable from",
        "idempotency key",
        "retried after",
    ] {
        assert!(out.contains(field), "the table shows {field}: {out}");
    }
    assert!(
        out.contains("shard       s1") || out.contains("s1"),
        "{out}"
    );
    let (code, out, err) = admin(&["jobs", "list", "--shard", "s1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).expect("list --json prints JSON only");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(listed[0]["id"], id.to_string());
    assert_eq!(listed[0]["state"], "error");
    let (code, out, err) = admin(&["jobs", "show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).expect("show --json prints JSON only");
    assert_eq!(shown["id"], id.to_string());
    assert_eq!(shown["company_id"], company.to_string());
    assert_eq!(
        shown["shard"], "s1",
        "where it was found, as the table says"
    );
    assert!(
        shown["error"]
            .as_str()
            .is_some_and(|e| e.contains("no handler"))
    );
    let (code, _, err) = admin(&["jobs", "show", &id.to_string(), "--shard", "s0"]);
    assert_eq!(code, 1);
    assert!(err.contains("connecting to shard s0"), "{err}");
    let (code, out, err) = admin(&["jobs", "retry", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("back to waiting"), "{out}");
    let (code, out, err) = admin(&["jobs", "retry", &id.to_string()]);
    assert_eq!(code, 1, "a waiting job cannot be retried");
    assert!(out.is_empty(), "nothing claims it was retried: {out}");
    assert!(err.contains("only jobs in error"), "{err}");
    let (code, _, err) = admin(&["jobs", "resolve", &id.to_string(), "--note", "done by hand"]);
    assert_eq!(code, 1, "a waiting job cannot be resolved");
    assert!(err.contains("only jobs in error"), "{err}");
    fail_one(&mut c).await;
    // The table and the JSON say after which attempt an operator sent the job back.
    let (code, out, err) = admin(&["jobs", "show", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("attempt 1 (jobs retry)"), "{out}");
    let (_, out, _) = admin(&["jobs", "show", &id.to_string(), "--json"]);
    let shown: Value = serde_json::from_str(&out).expect("show --json prints JSON only");
    assert_eq!(
        (shown["retried_after"].clone(), shown["attempts"].clone()),
        (json!(1), json!(2))
    );
    let too_long = "x".repeat(2001);
    for note in ["   ", too_long.as_str()] {
        let (code, _, err) = admin(&["jobs", "resolve", &id.to_string(), "--note", note]);
        assert_eq!(code, 2, "a bad command line");
        assert!(err.contains("--note"), "{err}");
    }
    // 2000 characters is the limit, not 2000 bytes.
    let note = "é".repeat(2000);
    let (code, out, err) = admin(&[
        "jobs",
        "resolve",
        &id.to_string(),
        "--note",
        &note,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let rec: Value = serde_json::from_str(&out).expect("--json prints JSON only");
    assert_eq!(rec["state"], "error_resolved");
    assert_eq!(rec["resolution_note"], note.as_str());
    // hostile arguments
    assert_eq!(admin(&["jobs", "show", "not-a-uuid"]).0, 2);
    assert_eq!(
        admin(&["jobs", "list", "--shard", "s1", "--state", "exploded"]).0,
        2
    );
    assert_eq!(
        admin(&["jobs", "list", "--shard", "s1", "--limit", "100000"]).0,
        2
    );
    let (code, _, err) = admin(&["jobs", "list", "--shard", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("not in the catalog"), "{err}");
    // Repeated or conflicting flags, malformed ids, stray arguments: the command line is
    // refused (exit 2) before anything is read or changed.
    for args in [
        &["jobs", "list", "--shard", "s1", "--shard", "s0"][..],
        &["jobs", "list", "--shard", "s1", "--json", "--json"],
        &["jobs", "list", "--shard", "s1", "--company", "x"],
        &["jobs", "retry", "not-a-uuid"],
        &["jobs", "resolve", "not-a-uuid", "--note", "n"],
        &["shard", "list", "extra"],
    ] {
        let (code, out, err) = admin(args);
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    // A `--shard` that is no shard id (hostile, or 100,000 characters long) is refused with
    // the rule before any database is read, and not echoed whole.
    let huge = "s".repeat(100_000);
    for args in [
        &["migrate", "status", "--shard", "'; DROP TABLE shards; --"][..],
        &["migrate", "up", "--shard", &huge],
        &["jobs", "list", "--shard", &huge],
        &["jobs", "show", &id.to_string(), "--shard", "S1\u{1b}[2J"],
        &["jobs", "retry", &id.to_string(), "--shard", &huge],
        &["companies", "list", "--shard", &huge],
    ] {
        let (code, out, err) = admin(args);
        let shown = format!("{:?}", &args[..args.len() - 1]);
        assert_eq!(code, 2, "{shown}: {err}");
        assert!(out.is_empty(), "{shown}: {out}");
        assert!(
            err.contains("not a valid shard id") && err.len() < 2000 && !err.contains('\u{1b}'),
            "{shown}: {}",
            &err[..err.len().min(2000)]
        );
    }
    assert_eq!(admin(&["shard", "list"]).0, 0, "the catalog is intact");
    // A note that would drive the operator's terminal is kept as written and shown escaped.
    // So is a kind written by a caller of the library, which checks no kinds.
    let other = enqueue_one(&shard, job(company, "evil\u{1b}[2J", json!({}), 1)).await;
    fail_one(&mut c).await;
    let note = "\u{1b}[2J\u{1b}]0;owned\u{7}";
    let (code, out, err) = admin(&["jobs", "resolve", &other.to_string(), "--note", note]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("evil\\u{1b}[2J") && !out.contains('\u{1b}'),
        "{out:?}"
    );
    let (code, out, err) = admin(&["jobs", "show", &other.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains('\u{1b}') && !out.contains('\u{7}') && out.contains("\\u{1b}[2J"),
        "{out:?}"
    );
    let (_, out, _) = admin(&["jobs", "show", &other.to_string(), "--json"]);
    let shown: Value = serde_json::from_str(&out).expect("show --json prints JSON only");
    assert_eq!(
        shown["resolution_note"], note,
        "the note is kept as written"
    );
    let (code, _, err) = admin(&["jobs", "show", &Uuid::now_v7().to_string()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no job") && err.contains("could not read (see the warnings above): s0"),
        "{err}"
    );
}

#[actix_web::test]
async fn a_long_poll_marks_its_job_again_when_the_listener_reconnects() {
    // A long poll's mark commits asynchronously, so a database crash can lose it. The crash
    // also drops the process's LISTEN connection, whose reconnect wakes every waiting request:
    // its next read must mark the job again, or the completion goes unannounced and the poll
    // sits out its whole wait.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let node = Served::start(&mut shard_node(&db.url, true, 1), 1);
    let base = node.url("api");
    let auth = member_token(company);
    let mut r = http()
        .post(format!("{base}/v1/companies/{company}/jobs"))
        .bearer_auth(&auth)
        .send_json(&json!({"kind": "sleep", "params": {"ms": 10000}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: JobView = r.json().await.unwrap();
    let poll = actix_web::rt::spawn(async move {
        let polled = std::time::Instant::now();
        let mut r = http()
            .get(format!(
                "{base}/v1/companies/{company}/jobs/{}?wait=30s",
                job.id
            ))
            .bearer_auth(&auth)
            .timeout(Duration::from_secs(40))
            .send()
            .await
            .unwrap();
        (
            r.status(),
            r.json::<JobView>().await.unwrap(),
            polled.elapsed(),
        )
    });
    let marked = "SELECT count(*) FROM jobs WHERE awaited_until > now() + interval '15 seconds'";
    assert_eq!(
        until_count(&db, marked, 1, Duration::from_secs(10)).await,
        1
    );
    let c = db.client().await;
    let wiped = c
        .execute(
            "UPDATE jobs SET awaited_until = now() - interval '1 second'
              WHERE state IN ('waiting', 'processing')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(wiped, 1, "the job is still running when its mark is lost");
    let listening = "SELECT pid FROM pg_stat_activity
                      WHERE datname = current_database() AND query LIKE 'LISTEN%'";
    let old: Vec<i32> = c
        .query(listening, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(old.len(), 1, "the node's LISTEN connection");
    c.execute("SELECT pg_terminate_backend($1)", &[&old[0]])
        .await
        .unwrap();
    let reconnected = format!(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> {}",
        old[0]
    );
    assert_eq!(
        until_count(&db, &reconnected, 1, Duration::from_secs(10)).await,
        1,
        "the node listens again"
    );
    let running = "SELECT count(*) FROM jobs WHERE state = 'processing'";
    assert_eq!(
        db.scalar(running).await,
        1,
        "the job is still running when the listener reconnects"
    );
    let (status, done, elapsed) = poll.await.unwrap();
    assert_eq!((status.as_u16(), done.state), (200, JobState::Done));
    assert!(
        elapsed < Duration::from_secs(25),
        "the poll was woken by the completion ({elapsed:?}), not ended by its 30 s wait"
    );
}

/// Claims one job and records a permanent failure for it: a dead letter.
async fn fail_one(c: &mut tokio_postgres::Client) {
    use tenantry_queue::store;
    let claimed = store::claim(c, "w", 1, Duration::from_secs(30), 10)
        .await
        .unwrap();
    let o = store::Outcome {
        id: claimed[0].id,
        attempt: claimed[0].attempt,
        request_id: "test".into(),
        result: Err(tenantry_queue::JobError::permanent("no handler")),
        retry_in: Duration::ZERO,
    };
    store::finish(c, "w", &[o]).await.unwrap();
}

#[actix_web::test]
async fn sigterm_lets_an_in_flight_request_and_its_job_finish() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let mut node = Served::start(&mut shard_node(&db.url, true, 1), 1);
    let url = format!("{}/v1/companies/{company}/jobs", node.url("api"));
    let auth = member_token(company);
    let in_flight = actix_web::rt::spawn(async move {
        let mut r = http()
            .post(url)
            .bearer_auth(auth)
            .send_json(&json!({"kind": "sleep", "params": {"ms": 1500}}))
            .await
            .unwrap();
        let closes = r
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        (r.status(), r.json::<JobView>().await.unwrap(), closes)
    });
    assert_eq!(
        until_count(
            &db,
            "SELECT count(*) FROM jobs WHERE state = 'processing'",
            1,
            Duration::from_secs(10)
        )
        .await,
        1
    );
    node.signal("TERM");
    let (status, job, closes) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the request in flight was answered");
    // actix-server's graceful stop closes kept-alive connections once they are answered (and
    // idle ones at once), so a balancer's pooled connection cannot bring requests for the
    // whole grace period; the drain relies on it.
    assert!(
        closes,
        "a draining node closes the connection it answers on"
    );
    assert_eq!(
        job.state,
        JobState::Done,
        "the running job finished within the grace period"
    );
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(0));
}

#[actix_web::test]
async fn a_job_whose_read_back_is_stuck_is_answered_as_written_soon_after_the_wait() {
    // The job is written, but reading it back at the end of the synchronous wait hangs (here
    // behind a lock on the table; in life an exhausted pool or an overloaded database). The
    // request answers 202 with the job as written a second after its wait, not once the read
    // gets through: by then the gateway would have answered 504, and a client without an
    // Idempotency-Key would send the request again.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let mut cmd = shard_node(&db.url, true, 0);
    cmd.env("TENANTRY_API__SYNC_WAIT", "2s");
    let node = Served::start(&mut cmd, 1);
    let (url, auth) = (
        format!("{}/v1/companies/{company}/jobs", node.url("api")),
        member_token(company),
    );
    let started = std::time::Instant::now();
    let post = actix_web::rt::spawn(async move {
        let mut r = http()
            .post(url)
            .bearer_auth(auth)
            .send_json(&json!({"kind": "echo", "params": {}}))
            .await
            .unwrap();
        let job: JobView = r.json().await.unwrap();
        (r.status().as_u16(), job, started.elapsed())
    });
    let written = until_count(&db, "SELECT count(*) FROM jobs", 1, Duration::from_secs(5)).await;
    assert_eq!(written, 1, "the job was written");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (status, job, took) = tokio::time::timeout(Duration::from_secs(8), post)
        .await
        .expect("answered while the table was still locked")
        .unwrap();
    lock.rollback().await.unwrap();
    assert_eq!((status, job.state), (202, JobState::Waiting));
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_millis(4500),
        "the wait (2 s) and the last read's limit (1 s): {took:?}"
    );
    let logs = node.logs_to_end(Duration::from_millis(500)).join("\n");
    assert!(
        logs.contains("reading the job back ran past the synchronous wait"),
        "{logs}"
    );
}

#[actix_web::test]
async fn a_job_whose_commit_lost_its_connection_is_answered_as_created_not_as_a_failure() {
    // The connection drops while the COMMIT is under way, and the COMMIT takes effect: the
    // job exists, and a 503 would make the client send it again and create a second one.
    // First the COMMIT reaches the database as the connection drops; then it reaches it a
    // second after the shard noticed the loss, while the transaction is still in progress.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let (proxy, proxied) = tenantry_testkit::proxy::TcpProxy::in_front_of(&db.url).await;
    let mut cmd = shard_node(&proxied, true, 0);
    cmd.env("TENANTRY_API__SYNC_WAIT", "0s");
    let node = Served::start(&mut cmd, 1);
    let url = format!("{}/v1/companies/{company}/jobs", node.url("api"));
    let auth = member_token(company);

    let mut answered = Vec::new();
    for (n, delay) in [(1, Duration::ZERO), (2, Duration::from_secs(1))] {
        proxy.drop_answer_to(b"COMMIT\0", delay);
        let mut r = http()
            .post(&url)
            .bearer_auth(&auth)
            .send_json(&json!({"kind": "echo", "params": {"n": n}}))
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{delay:?}: {:?}", r.body().await);
        let j: JobView = r.json().await.unwrap();
        assert_eq!(
            r.headers().get("location").unwrap(),
            &format!("/v1/companies/{company}/jobs/{}", j.id)
        );
        answered.push(j.id);
    }
    let mut ids: Vec<Uuid> = db
        .client()
        .await
        .query("SELECT id FROM jobs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort();
    answered.sort();
    assert_eq!(ids, answered, "exactly the jobs that were answered");
    let logs = node.logs_to_end(Duration::from_millis(500)).join("\n");
    assert_eq!(
        logs.matches("the connection was lost during the commit, which took effect")
            .count(),
        2,
        "{logs}"
    );
}

#[actix_web::test]
async fn requests_waiting_for_their_jobs_answer_before_the_grace_period_ends() {
    // A job request inside its sync wait and a long poll both answer with the job as it stands
    // three quarters into the grace period (10 s) after SIGTERM, instead of being cut off
    // when it ends.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let waiting = enqueue_one(&db, job(company, "echo", json!({}), 1)).await;
    let mut cmd = shard_node(&db.url, true, 0);
    cmd.env("TENANTRY_API__SYNC_WAIT", "20s")
        .env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "10s");
    let mut node = Served::start(&mut cmd, 1);
    let base = node.url("api");
    let auth = member_token(company);
    let c = awc::Client::builder()
        .timeout(Duration::from_secs(40))
        .finish();
    let post = async {
        let mut r = c
            .post(format!("{base}/v1/companies/{company}/jobs"))
            .bearer_auth(&auth)
            .send_json(&json!({"kind": "echo"}))
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert!(r.headers().get("location").is_some());
        let j: JobView = r.json().await.unwrap();
        (j, std::time::Instant::now())
    };
    let poll = async {
        let mut r = c
            .get(format!(
                "{base}/v1/companies/{company}/jobs/{waiting}?wait=30s"
            ))
            .bearer_auth(&auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let j: JobView = r.json().await.unwrap();
        (j, std::time::Instant::now())
    };
    let stop = async {
        // Both are in their waits once both rows are marked awaited beyond their creation.
        until_count(
            &db,
            "SELECT count(*) FROM jobs WHERE awaited_until > created_at + interval '1 second'",
            2,
            Duration::from_secs(20),
        )
        .await;
        node.signal("TERM");
        std::time::Instant::now()
    };
    let ((posted, post_at), (polled, poll_at), termed) = tokio::join!(post, poll, stop);
    assert_eq!(posted.state, JobState::Waiting);
    assert_eq!((polled.id, polled.state), (waiting, JobState::Waiting));
    for at in [post_at, poll_at] {
        let after = at - termed;
        assert!(
            after > Duration::from_secs(7) && after < Duration::from_millis(9800),
            "answered {after:?} after SIGTERM: 7.5 s, before the grace period (10 s) ends"
        );
    }
    assert_eq!(node.wait_exit(Duration::from_secs(5)), Some(0));
    assert_eq!(db.scalar("SELECT count(*) FROM jobs").await, 2);
}

#[actix_web::test]
async fn a_result_over_the_size_limit_fails_its_own_job_and_no_other() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let mut cmd = shard_node(&db.url, true, 2);
    cmd.env("TENANTRY_QUEUE__MAX_RESULT_SIZE", "100B");
    let node = Served::start(&mut cmd, 1);
    let url = format!("{}/v1/companies/{company}/jobs", node.url("api"));
    let auth = member_token(company);
    let post = |params: Value| {
        let (url, auth) = (url.clone(), auth.clone());
        async move {
            let mut r = http()
                .post(url)
                .bearer_auth(auth)
                .send_json(&json!({"kind": "echo", "params": params}))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<JobView>().await.unwrap()
        }
    };
    let (big, small) = tokio::join!(
        post(json!({"blob": "x".repeat(200)})),
        post(json!({"n": 1}))
    );
    assert_eq!(big.state, JobState::Error);
    let message = big.error.unwrap_or_default();
    assert!(
        message.contains("over queue.max_result_size (100 bytes)"),
        "{message}"
    );
    assert_eq!(big.attempts, 1, "a permanent error: no retry");
    assert_eq!(small.state, JobState::Done);
    assert_eq!(small.result, Some(json!({"n": 1})));
}

#[actix_web::test]
async fn a_request_that_reaches_its_wait_after_the_stop_began_still_answers_in_time() {
    // A job request is held at its fence by a lock on its company's placement (as a freeze
    // would hold it) when SIGTERM arrives; the lock goes 3 s later, the job is written and the
    // request waits for it. It must still answer before the grace period (10 s) ends: three
    // quarters into it counted from the stop, not from when the request began to wait.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    own(&db, company, "owned").await;
    let mut cmd = shard_node(&db.url, true, 0);
    cmd.env("TENANTRY_API__SYNC_WAIT", "20s")
        .env("TENANTRY_SHUTDOWN__GRACE_PERIOD", "10s");
    let node = Served::start(&mut cmd, 1);
    let base = node.url("api");
    let auth = member_token(company);
    let mut holder = db.client().await;
    let lock = holder.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM placements WHERE company_id = $1 FOR UPDATE",
        &[&company],
    )
    .await
    .unwrap();
    let c = awc::Client::builder()
        .timeout(Duration::from_secs(40))
        .finish();
    let post = async {
        let mut r = c
            .post(format!("{base}/v1/companies/{company}/jobs"))
            .bearer_auth(&auth)
            .send_json(&json!({"kind": "echo"}))
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.body().await);
        std::time::Instant::now()
    };
    let stop = async {
        // The request is at its fence once PostgreSQL shows it waiting for the lock.
        until_count(
            &db,
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE '%placements%'",
            1,
            Duration::from_secs(20),
        )
        .await;
        node.signal("TERM");
        let termed = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        lock.commit().await.unwrap();
        termed
    };
    let (answered, termed) = tokio::join!(post, stop);
    let after = answered - termed;
    assert!(
        after > Duration::from_secs(7) && after < Duration::from_millis(9800),
        "answered {after:?} after SIGTERM: 7.5 s, before the grace period (10 s) ends"
    );
}
