//! JWTs at the edge: the claims Tenantry reads, verification, and minting development tokens.

use std::{collections::BTreeMap, fmt, str::FromStr};

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ApiError, secret::Secret};

/// A caller's role in one company.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Member,
    Admin,
}

impl Role {
    /// Viewers read; members and admins also write.
    pub fn may_write(self) -> bool {
        self >= Role::Member
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "unknown role {other:?} (expected admin, member or viewer)"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        })
    }
}

/// The claims of a Tenantry token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
    /// Company UUID → the caller's role there.
    #[serde(default)]
    pub companies: BTreeMap<Uuid, Role>,
    /// Space-separated scopes, e.g. `companies:create`.
    #[serde(default)]
    pub scope: String,
}

impl Claims {
    pub fn role_in(&self, company: Uuid) -> Option<Role> {
        self.companies.get(&company).copied()
    }

    pub fn has_scope(&self, wanted: &str) -> bool {
        self.scope.split_ascii_whitespace().any(|s| s == wanted)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token has expired")]
    Expired,
    #[error("token is invalid: {0}")]
    Invalid(String),
}

/// Verifies an HS256 token's signature and expiry.
pub fn verify_hs256(secret: &[u8], token: &str) -> Result<Claims, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })
}

/// Signs claims with HS256.
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// Parses `UUID:role`, the company argument of `tenantry admin token`.
pub fn parse_company_grant(s: &str) -> Result<(Uuid, Role), String> {
    let (id, role) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected COMPANY_UUID:ROLE, e.g. 0190…:admin"))?;
    let id = Uuid::parse_str(id).map_err(|e| format!("{id:?} is not a UUID: {e}"))?;
    Ok((id, role.parse()?))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn minted_tokens_verify_and_carry_roles_and_scopes() {
        let company = Uuid::now_v7();
        let claims = Claims {
            sub: "u1".into(),
            exp: now() + 60,
            iat: now(),
            companies: [(company, Role::Viewer)].into(),
            scope: "companies:create other".into(),
        };
        let token = mint_hs256(b"k".repeat(32).as_slice(), &claims).unwrap();
        let back = verify_hs256(b"k".repeat(32).as_slice(), &token).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.role_in(company), Some(Role::Viewer));
        assert!(!Role::Viewer.may_write());
        assert!(back.has_scope("companies:create"));
        assert!(!back.has_scope("companies"));
        assert!(matches!(
            verify_hs256(b"other-key-other-key-other-key-xx", &token),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let claims = Claims {
            sub: "u".into(),
            exp: now() - 600,
            iat: 0,
            companies: BTreeMap::new(),
            scope: String::new(),
        };
        let token = mint_hs256(b"k", &claims).unwrap();
        assert!(matches!(
            verify_hs256(b"k", &token),
            Err(AuthError::Expired)
        ));
    }

    #[test]
    fn company_grants_parse_strictly() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse_company_grant(&format!("{id}:member")),
            Ok((id, Role::Member))
        );
        assert!(parse_company_grant("nope").is_err());
        assert!(parse_company_grant(&format!("{id}:owner")).is_err());
        assert!(parse_company_grant("123:admin").is_err());
    }
}
