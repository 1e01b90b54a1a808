//! The gateway's routes: its own endpoints, and the tenant routes it forwards.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use tenantry_core::ApiError;
use tenantry_shardmap::catalog;

use tenantry_core::auth::Caller;

use crate::OPERATOR_SCOPE;

/// The `route` label of forwarded requests in `tenantry_http_requests_total`.
pub const FORWARDED_ROUTE: &str = "/v1/companies/{company_id}/…";

pub fn configure(c: &mut web::ServiceConfig) {
    c.service(web::resource("/v1/shard-map/version").get(shard_map_version))
        .service(
            // A static prefix and the company id parsed by hand: actix's dynamic segments match
            // with a regex engine, which cost a sixth of the gateway's CPU under load.
            web::scope("/v1/companies")
                .service(web::resource("").post(crate::companies::create))
                // Everything under a company goes to its shard, path and query unchanged.
                .default_service(web::to(crate::forward::forward)),
        );
}

/// The public view of a shard: never its database URL.
#[derive(Serialize)]
struct ShardView {
    id: String,
    state: String,
    accepting: bool,
    weight: i32,
    version: i64,
    tenants: i64,
    endpoints: Vec<String>,
}

#[derive(Serialize)]
struct MapVersion {
    version: i64,
    shards: Vec<ShardView>,
}

/// `GET /v1/shard-map/version` (scope `shardmap:read`): the catalog's shard-map version and
/// shards, for operators checking what gateways should be routing by.
async fn shard_map_version(
    caller: Caller,
    gw: web::Data<crate::Gateway>,
) -> Result<HttpResponse, ApiError> {
    if !caller.0.has_scope(OPERATOR_SCOPE) {
        return Err(ApiError::forbidden(format!(
            "this endpoint needs the {OPERATOR_SCOPE} scope"
        )));
    }
    let client = gw.router.catalog().get().await?;
    let version = catalog::map_version(&**client).await?;
    let shards = catalog::list_shards(&**client)
        .await?
        .into_iter()
        .map(|s| ShardView {
            id: s.id,
            state: s.state,
            accepting: s.accepting,
            weight: s.weight,
            version: s.version,
            tenants: s.tenants,
            endpoints: s.endpoints,
        })
        .collect();
    Ok(HttpResponse::Ok().json(MapVersion { version, shards }))
}
