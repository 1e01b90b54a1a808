//! Fencing: a shard serves a company only while its placement here says `owned`. The check
//! runs inside the request's own transaction, so the write and the check commit together.

use std::time::Duration;

use actix_web::http::StatusCode;
use deadpool_postgres::GenericClient;
use tenantry_core::ApiError;
use uuid::Uuid;

/// Checks the company's placement for a read (writes take [`check_for_write`], which locks it).
///
/// `client` is a pooled connection or its transaction: the statement stays prepared for the
/// connection's lifetime, so every tenant-scoped request pays one round trip for it, not two
/// and a parse.
pub async fn check(client: &impl GenericClient, company: Uuid) -> Result<(), ApiError> {
    let stmt = client
        .prepare_cached("SELECT state FROM placements WHERE company_id = $1")
        .await?;
    let state: Option<String> = client
        .query_opt(&stmt, &[&company])
        .await?
        .map(|r| r.get(0));
    verdict(state.as_deref())
}

/// [`check`] with the lock, inside the transaction that will write: `FOR SHARE` on the
/// placement row, so a freeze (`FOR UPDATE` + `state = 'frozen'`) waits for in-flight writes to
/// commit and blocks new ones until it is done (row locks, not timing). Returns that
/// transaction's id (`pg_current_xact_id()`, which the row lock assigns anyway): should the
/// connection be lost during the COMMIT, `pg_xact_status` on another connection tells whether
/// the write took effect.
pub async fn check_for_write(
    tx: &impl GenericClient,
    company: Uuid,
) -> Result<Option<String>, ApiError> {
    let stmt = tx
        .prepare_cached(
            "SELECT state, pg_current_xact_id()::text FROM placements
              WHERE company_id = $1 FOR SHARE",
        )
        .await?;
    let row = tx.query_opt(&stmt, &[&company]).await?;
    let (state, xid) = match row {
        Some(r) => (Some(r.get::<_, String>(0)), Some(r.get::<_, String>(1))),
        None => (None, None),
    };
    verdict(state.as_deref())?;
    Ok(xid)
}

fn verdict(state: Option<&str>) -> Result<(), ApiError> {
    match state {
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
