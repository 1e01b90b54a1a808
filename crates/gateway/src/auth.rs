//! Authentication at the edge: `Authorization: Bearer <JWT>` becomes a [`Caller`].

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
use tenantry_core::{
    ApiError,
    auth::{AuthError, Claims, verify_hs256},
    secret::Secret,
};

/// The key tokens are verified with.
#[derive(Clone)]
pub struct JwtKey(pub Secret);

/// An authenticated caller: extracting it answers 401 for a missing, malformed, forged or
/// expired token.
#[derive(Debug, Clone)]
pub struct Caller(pub Claims);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Caller, ApiError> {
    let key = req
        .app_data::<web::Data<JwtKey>>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("JwtKey missing from app data")))?;
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 8192)
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be `Bearer <token>`"))?;
    match verify_hs256(key.0.expose().as_bytes(), token) {
        Ok(claims) => Ok(Caller(claims)),
        Err(AuthError::Expired) => Err(ApiError::unauthorized("token has expired")),
        Err(AuthError::Invalid(_)) => Err(ApiError::unauthorized("token is invalid")),
    }
}
