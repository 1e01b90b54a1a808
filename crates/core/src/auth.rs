//! JWTs at the edge: the claims Tenantry reads, verification, and minting development tokens.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc};

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use anyhow::Context;

use crate::{ApiError, config::AuthConfig};

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

/// The signature algorithms Tenantry accepts, one per deployment (`auth.algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// Shared secret (`auth.jwt_secret`).
    HS256,
    /// RSA public key (`auth.public_key`, PEM).
    RS256,
    /// P-256 ECDSA public key (`auth.public_key`, PEM).
    ES256,
}

impl JwtAlgorithm {
    fn jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
        }
    }
}

/// Verifies tokens: one algorithm and one key, fixed at startup. A token signed with any
/// other algorithm is refused (no `alg: none`, no HS256-with-the-public-key confusion).
///
/// Verified tokens are remembered (by their exact text, for at most a minute, 8 MiB in all), so
/// a client sending the same token again costs a hash lookup instead of a signature check and
/// a JSON parse; the expiry is checked on every use all the same.
#[derive(Clone)]
pub struct JwtKey {
    algorithm: Algorithm,
    key: DecodingKey,
    verified: moka::sync::Cache<String, Arc<Claims>>,
}

/// Seconds of clock skew allowed on `exp`.
const LEEWAY: u64 = 5;

fn verified_cache() -> moka::sync::Cache<String, Arc<Claims>> {
    moka::sync::Cache::builder()
        .weigher(|token: &String, _| u32::try_from(token.len() + 256).unwrap_or(u32::MAX))
        .max_capacity(8 << 20)
        .time_to_live(std::time::Duration::from_secs(60))
        .build()
}

impl JwtKey {
    pub fn hs256(secret: &[u8]) -> Self {
        Self {
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
            verified: verified_cache(),
        }
    }

    /// The verification key `auth` configures: the HS256 secret, or the PEM public key file.
    pub fn from_config(auth: &AuthConfig) -> anyhow::Result<Self> {
        let key = match auth.algorithm {
            JwtAlgorithm::HS256 => DecodingKey::from_secret(auth.jwt_secret.expose().as_bytes()),
            JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(&read_pem(&auth.public_key)?)
                .context("auth.public_key is not an RSA public key in PEM")?,
            JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(&read_pem(&auth.public_key)?)
                .context("auth.public_key is not an EC public key in PEM")?,
        };
        Ok(Self {
            algorithm: auth.algorithm.jsonwebtoken(),
            key,
            verified: verified_cache(),
        })
    }

    /// [`JwtKey::verify`], remembering verified tokens.
    pub fn verify_cached(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        if let Some(claims) = self.verified.get(token) {
            // The clock jsonwebtoken checks `exp` against in `verify`.
            if claims.exp.saturating_add(LEEWAY) < jsonwebtoken::get_current_timestamp() {
                return Err(AuthError::Expired);
            }
            return Ok(claims);
        }
        let claims = Arc::new(self.verify(token)?);
        self.verified.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    /// Checks the signature, `exp` (5 s leeway) and that `sub` is present and plain: 1 to
    /// [`MAX_SUB_LEN`] bytes without control characters, since it is logged and stored with
    /// the jobs the caller creates.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = LEEWAY;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        check_sub(&claims.sub).map_err(AuthError::Invalid)?;
        Ok(claims)
    }
}

/// Whether `sub` is one a token may carry: 1 to [`MAX_SUB_LEN`] bytes without control
/// characters (it is logged and stored with the jobs the caller creates). `tenantry admin
/// token` checks its `--user` with it too, so it mints no token every listener would refuse.
pub fn check_sub(sub: &str) -> Result<(), String> {
    if sub.is_empty() || sub.len() > MAX_SUB_LEN || sub.chars().any(char::is_control) {
        return Err(format!(
            "sub must be 1 to {MAX_SUB_LEN} bytes without control characters"
        ));
    }
    Ok(())
}

fn read_pem(path: &str) -> anyhow::Result<Vec<u8>> {
    if path.is_empty() {
        anyhow::bail!("auth.public_key (a PEM file) is required for RS256 and ES256");
    }
    std::fs::read(path).with_context(|| format!("reading the key file {path}"))
}

/// Longest accepted `sub` claim, in bytes.
pub const MAX_SUB_LEN: usize = 256;

/// Verifies an HS256 token's signature and expiry.
pub fn verify_hs256(secret: &[u8], token: &str) -> Result<Claims, AuthError> {
    JwtKey::hs256(secret).verify(token)
}

/// Signs claims with HS256.
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// Signs claims with the configured algorithm: the HS256 secret, or for RS256/ES256 the PEM
/// private key in `auth.private_key` (only `tenantry admin token` needs it).
pub fn mint(auth: &AuthConfig, claims: &Claims) -> anyhow::Result<String> {
    let key = match auth.algorithm {
        JwtAlgorithm::HS256 => EncodingKey::from_secret(auth.jwt_secret.expose().as_bytes()),
        alg => {
            if auth.private_key.is_empty() {
                anyhow::bail!(
                    "auth.private_key (a PEM file) is required to mint {alg:?} tokens; \
                     gateways and shards only need auth.public_key"
                );
            }
            let pem = std::fs::read(&auth.private_key)
                .with_context(|| format!("reading the key file {}", auth.private_key))?;
            match alg {
                JwtAlgorithm::RS256 => EncodingKey::from_rsa_pem(&pem)
                    .context("auth.private_key is not an RSA private key in PEM")?,
                _ => EncodingKey::from_ec_pem(&pem)
                    .context("auth.private_key is not an EC private key in PEM (PKCS#8)")?,
            }
        }
    };
    Ok(jsonwebtoken::encode(
        &Header::new(auth.algorithm.jsonwebtoken()),
        claims,
        &key,
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

/// An authenticated caller: extracting it answers 401 for a missing, malformed, forged or
/// expired token.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Claims>);

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
    match key.verify_cached(token) {
        Ok(claims) => Ok(Caller(claims)),
        Err(AuthError::Expired) => Err(ApiError::unauthorized("token has expired")),
        Err(AuthError::Invalid(_)) => Err(ApiError::unauthorized("token is invalid")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
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
    fn remembered_tokens_still_expire_and_forged_ones_are_never_remembered() {
        let key = JwtKey::hs256(&b"k".repeat(32));
        let token = mint_hs256(b"k".repeat(32).as_slice(), &claims()).unwrap();
        let first = key.verify_cached(&token).unwrap();
        let again = key.verify_cached(&token).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the second use is a cache hit");
        let forged = mint_hs256(b"x".repeat(32).as_slice(), &claims()).unwrap();
        assert!(key.verify_cached(&forged).is_err());
        assert!(key.verify_cached(&forged).is_err());
        // A remembered token past its expiry (plus leeway) is refused.
        let mut old = claims();
        old.exp = now() - 60;
        key.verified.insert("old-token".into(), Arc::new(old));
        assert!(matches!(
            key.verify_cached("old-token"),
            Err(AuthError::Expired)
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
    fn signed_tokens_with_an_empty_oversized_or_control_character_subject_are_refused() {
        let long = "u".repeat(MAX_SUB_LEN + 1);
        for sub in ["", "a\u{0}b", "line\nbreak", "esc\u{1b}[2J", long.as_str()] {
            let claims = Claims {
                sub: sub.into(),
                exp: now() + 600,
                iat: 0,
                companies: BTreeMap::new(),
                scope: String::new(),
            };
            let token = mint_hs256(b"k", &claims).unwrap();
            assert!(
                matches!(verify_hs256(b"k", &token), Err(AuthError::Invalid(_))),
                "{sub:?}"
            );
        }
        let fine = Claims {
            sub: "u".repeat(MAX_SUB_LEN),
            exp: now() + 600,
            iat: 0,
            companies: BTreeMap::new(),
            scope: String::new(),
        };
        let token = mint_hs256(b"k", &fine).unwrap();
        assert!(verify_hs256(b"k", &token).is_ok());
    }

    fn keys(alg: JwtAlgorithm, name: &str) -> AuthConfig {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/keys");
        AuthConfig {
            algorithm: alg,
            jwt_secret: crate::secret::Secret::new("k".repeat(32)),
            public_key: format!("{dir}/{name}-public.pem"),
            private_key: format!("{dir}/{name}-private.pem"),
        }
    }

    fn claims() -> Claims {
        Claims {
            sub: "u1".into(),
            exp: now() + 60,
            iat: now(),
            companies: [(Uuid::now_v7(), Role::Admin)].into(),
            scope: String::new(),
        }
    }

    #[test]
    fn rs256_and_es256_tokens_verify_with_the_public_key_only_for_their_algorithm() {
        for (alg, name) in [
            (JwtAlgorithm::RS256, "rs256"),
            (JwtAlgorithm::ES256, "es256"),
        ] {
            let auth = keys(alg, name);
            let key = JwtKey::from_config(&auth).unwrap();
            let token = mint(&auth, &claims()).unwrap();
            assert_eq!(key.verify(&token).unwrap().sub, "u1", "{alg:?}");
            // An HS256 token (even one signed with the public key's bytes) is refused.
            let hs = mint_hs256(b"k".repeat(32).as_slice(), &claims()).unwrap();
            assert!(
                matches!(key.verify(&hs), Err(AuthError::Invalid(_))),
                "{alg:?}"
            );
            let pem = std::fs::read(&auth.public_key).unwrap();
            let confused = mint_hs256(&pem, &claims()).unwrap();
            assert!(
                matches!(key.verify(&confused), Err(AuthError::Invalid(_))),
                "{alg:?}"
            );
        }
        // A token of the other asymmetric algorithm is refused too.
        let es = mint(&keys(JwtAlgorithm::ES256, "es256"), &claims()).unwrap();
        let rs_key = JwtKey::from_config(&keys(JwtAlgorithm::RS256, "rs256")).unwrap();
        assert!(rs_key.verify(&es).is_err());
    }

    #[test]
    fn missing_or_wrong_key_files_are_clear_errors() {
        let mut auth = keys(JwtAlgorithm::RS256, "rs256");
        auth.public_key = "/nonexistent/key.pem".into();
        let err = JwtKey::from_config(&auth).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/key.pem"), "{err}");
        let mut auth = keys(JwtAlgorithm::ES256, "es256");
        auth.public_key = auth.public_key.replace("es256", "rs256");
        let err = format!("{:#}", JwtKey::from_config(&auth).err().unwrap());
        assert!(err.contains("not an EC public key"), "{err}");
        let mut auth = keys(JwtAlgorithm::ES256, "es256");
        auth.private_key = String::new();
        let err = mint(&auth, &claims()).unwrap_err().to_string();
        assert!(err.contains("auth.private_key"), "{err}");
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
