//! The shared HTTP plumbing in-process: malformed and oversized bodies, a 500 that says
//! nothing internal.

use std::{sync::Arc, time::Duration};

use actix_web::{HttpResponse, web};
use tenantry_core::{
    ApiError,
    http::{HttpContext, Readiness, start_server},
};
use tokio_util::sync::CancellationToken;

#[derive(serde::Deserialize)]
struct Input {
    #[allow(dead_code)]
    kind: String,
}

async fn echo(body: web::Json<Input>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"kind": body.kind}))
}

async fn boom() -> Result<HttpResponse, ApiError> {
    Err(ApiError::internal(anyhow::anyhow!(
        "secret internal detail: connection to 10.0.0.7 refused"
    )))
}

/// Told when `/slow` has its request.
static SLOW_STARTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

async fn slow() -> HttpResponse {
    SLOW_STARTED.notify_one();
    tokio::time::sleep(Duration::from_secs(2)).await;
    HttpResponse::Ok().finish()
}

fn server(shutdown: CancellationToken) -> tenantry_core::http::RunningServer {
    let mut cfg = crate::support::dev_config();
    cfg.http.threads = 1;
    let ctx = HttpContext {
        role: "test",
        shard_id: None,
        probes: Arc::new(Readiness::new(vec![])),
        shutdown,
        body_limit: 1024 * 16,
        prefix_routes: &[],
    };
    start_server(
        ctx,
        "127.0.0.1:0".parse().unwrap(),
        &cfg.http,
        Duration::from_secs(5),
        |c| {
            c.route("/echo", web::post().to(echo))
                .route("/boom", web::get().to(boom))
                .route("/slow", web::get().to(slow));
        },
    )
    .unwrap()
}

#[actix_web::test]
async fn malformed_and_oversized_bodies_get_4xx_in_the_error_shape() {
    let token = CancellationToken::new();
    let srv = server(token.clone());
    let base = format!("http://{}", srv.addr);
    let c = crate::support::http();

    let mut r = c
        .post(format!("{base}/echo"))
        .content_type("application/json")
        .send_body("{\"kind\": ")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_of!(r).error.code, "invalid_json");

    let mut r = c
        .post(format!("{base}/echo"))
        .content_type("application/json")
        .send_body("{\"other\": 1}")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e = error_of!(r);
    assert!(
        e.error.message.contains("kind"),
        "says what is missing: {}",
        e.error.message
    );

    let big = format!("{{\"kind\": \"{}\"}}", "x".repeat(64 * 1024));
    let mut r = c
        .post(format!("{base}/echo"))
        .content_type("application/json")
        .send_body(big)
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_of!(r).error.code, "payload_too_large");

    let mut r = c
        .post(format!("{base}/echo"))
        .content_type("text/plain")
        .send_body("{\"kind\":\"a\"}")
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(error_of!(r).error.code, "unsupported_media_type");

    let mut r = c
        .post(format!("{base}/echo"))
        .content_type("application/json")
        .send_body("{\"kind\":\"a\"}")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.body().await;

    let mut r = c.get(format!("{base}/boom")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let e = error_of!(r);
    assert_eq!(
        (e.error.code.as_str(), e.error.message.as_str()),
        ("internal", "internal error")
    );
    token.cancel();
    srv.task.await.unwrap().unwrap();
}

/// Sends one HTTP/1.1 GET on `conn` and returns the response head, lower-cased.
async fn get_head(conn: &mut tokio::net::TcpStream, path: &str) -> String {
    use tokio::io::AsyncWriteExt;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_head(conn, path).await
}

/// The head of the next response on `conn`, lower-cased.
async fn read_head(conn: &mut tokio::net::TcpStream, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed before answering {path}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).to_lowercase()
}

#[actix_web::test]
async fn a_draining_listener_closes_each_connection_after_its_answer() {
    // A stopping node stops accepting connections and closes idle ones; a request it is still
    // serving gets its answer with `Connection: close`, so the client (a balancer) sends its
    // next request elsewhere rather than on a connection about to go away under it.
    let token = CancellationToken::new();
    let srv = server(token.clone());
    let mut busy = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let head = get_head(&mut busy, "/healthz").await;
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("connection: close"),
        "{head}"
    );
    {
        use tokio::io::AsyncWriteExt;
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), SLOW_STARTED.notified())
        .await
        .expect("/slow got its request");
    token.cancel();
    let head = read_head(&mut busy, "/slow").await;
    assert!(
        head.starts_with("http/1.1 200") && head.contains("connection: close"),
        "{head}"
    );
    srv.task.await.unwrap().unwrap();
}

/// A probe that counts its checks, each taking 200 ms, and fails.
struct Counting(Arc<std::sync::atomic::AtomicUsize>);

impl tenantry_core::http::Probe for Counting {
    fn name(&self) -> &str {
        "counting"
    }

    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err("down".into())
        })
    }
}

#[tokio::test]
async fn a_flood_of_readiness_calls_runs_each_probe_once_a_second() {
    // `/readyz` needs no authentication and its probes use the pools that serve traffic: a
    // flood of calls must not take every connection from them.
    let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ready = Arc::new(Readiness::new(vec![Box::new(Counting(checks.clone()))]));
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let ready = ready.clone();
            tokio::spawn(async move { ready.failures().await })
        })
        .collect();
    for call in calls {
        let failures = call.await.unwrap();
        assert_eq!(*failures, [("counting".to_string(), "down".to_string())]);
    }
    assert_eq!(checks.load(std::sync::atomic::Ordering::SeqCst), 1);
    tokio::time::sleep(tenantry_core::http::READY_FOR).await;
    ready.failures().await;
    assert_eq!(
        checks.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "a verdict is not kept longer than READY_FOR"
    );
}
