//! The shared HTTP plumbing in-process: malformed and oversized bodies, a 500 that says
//! nothing internal.

use std::{sync::Arc, time::Duration};

use actix_web::{HttpResponse, web};
use tenantry_core::{
    ApiError,
    http::{HttpContext, start_server},
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

fn server(shutdown: CancellationToken) -> tenantry_core::http::RunningServer {
    let mut cfg = crate::support::dev_config();
    cfg.http.threads = 1;
    let ctx = HttpContext {
        role: "test",
        shard_id: None,
        probes: Arc::new(vec![]),
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
                .route("/boom", web::get().to(boom));
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
