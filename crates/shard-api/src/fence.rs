//! Fencing: a shard serves a company only while its placement here says `owned`. The check
//! runs inside the request's own transaction, so the write and the check commit together.

use std::time::Duration;

use actix_web::http::StatusCode;
use deadpool_postgres::GenericClient;
use tenantry_core::ApiError;
use uuid::Uuid;

/// Checks the company's placement. `lock` takes `FOR SHARE` on the placement row: a freeze
/// (`FOR UPDATE` + `state = 'frozen'`) then waits for in-flight writes to commit and blocks
/// new ones until it is done — row locks, not timing.
///
/// `client` is a pooled connection or its transaction: the statement stays prepared for the
/// connection's lifetime, so every tenant-scoped request pays one round trip for it, not two
/// and a parse.
pub async fn check(client: &impl GenericClient, company: Uuid, lock: bool) -> Result<(), ApiError> {
    let sql = if lock {
        "SELECT state FROM placements WHERE company_id = $1 FOR SHARE"
    } else {
        "SELECT state FROM placements WHERE company_id = $1"
    };
    let stmt = client.prepare_cached(sql).await?;
    let state: Option<String> = client
        .query_opt(&stmt, &[&company])
        .await?
        .map(|r| r.get(0));
    match state.as_deref() {
        Some("owned") => Ok(()),
        Some("frozen") => Err(ApiError::unavailable(
            "tenant_frozen",
            "this company is being moved; retry shortly",
            Duration::from_secs(1),
        )),
        _ => Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "tenant_not_on_shard",
            "this company is not served by this shard",
        )),
    }
}
