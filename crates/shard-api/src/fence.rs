//! Fencing: a shard serves a company only while its placement here says `owned`. The check
//! runs inside the request's own transaction, so the write and the check commit together.

use std::time::Duration;

use actix_web::http::StatusCode;
use tenantry_core::ApiError;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// Checks the company's placement. `lock` takes `FOR SHARE` on the placement row: a freeze
/// (`FOR UPDATE` + `state = 'frozen'`) then waits for in-flight writes to commit and blocks
/// new ones until it is done — row locks, not timing.
pub async fn check(client: &impl GenericClient, company: Uuid, lock: bool) -> Result<(), ApiError> {
    let sql = if lock {
        "SELECT state FROM placements WHERE company_id = $1 FOR SHARE"
    } else {
        "SELECT state FROM placements WHERE company_id = $1"
    };
    let state: Option<String> = client.query_opt(sql, &[&company]).await?.map(|r| r.get(0));
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
