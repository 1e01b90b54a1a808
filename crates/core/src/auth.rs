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
    key: DecodingKey,
    validation: Validation,
    verified: moka::sync::Cache<String, Arc<Claims>>,
}

/// What a token must satisfy besides its signature: `exp` and `sub` present, `exp` and (when
/// present) `nbf` with [`LEEWAY`], and `aud` / `iss` where `auth.audience` / `auth.issuer` ask
/// for them. jsonwebtoken refuses every token with an `aud` unless audiences are set, so with
/// none configured `aud` is not checked at all: identity providers always put one there.
fn validation(algorithm: Algorithm, audience: &[String], issuer: &str) -> Validation {
    let mut v = Validation::new(algorithm);
    v.leeway = LEEWAY;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(audience);
        required.push("aud");
    }
    if !issuer.is_empty() {
        v.set_issuer(&[issuer]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

/// Seconds of clock skew allowed on `exp` and `nbf`.
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
            key: DecodingKey::from_secret(secret),
            validation: validation(Algorithm::HS256, &[], ""),
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
            key,
            validation: validation(auth.algorithm.jsonwebtoken(), &auth.audience, &auth.issuer),
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

    /// Checks the signature, `exp` and `nbf` (5 s leeway), `aud` and `iss` where configured,
    /// and that `sub` is present and plain: 1 to [`MAX_SUB_LEN`] bytes without control
    /// characters, since it is logged and stored with the jobs the caller creates.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                // Fixed phrases: the library's own text can quote the token's contents.
                AuthError::Invalid(match e.kind() {
                    K::ExpiredSignature => return AuthError::Expired,
                    K::InvalidAudience => "its aud is not an audience this service accepts".into(),
                    K::InvalidIssuer => "its iss is not the issuer this service accepts".into(),
                    K::ImmatureSignature => "it is not valid yet (nbf)".into(),
                    K::MissingRequiredClaim(c) => format!("it has no {c} claim"),
                    K::InvalidSignature => "its signature does not verify".into(),
                    K::InvalidAlgorithm => {
                        "it is signed with another algorithm than this service accepts".into()
                    }
                    _ => "it is not a well-formed JWT with the claims this service reads".into(),
                })
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
    /// The claims with the audience and issuer the verifiers are configured to ask for.
    #[derive(Serialize)]
    struct Minted<'a> {
        #[serde(flatten)]
        claims: &'a Claims,
        #[serde(skip_serializing_if = "Option::is_none")]
        aud: Option<&'a str>,
        #[serde(skip_serializing_if = "str::is_empty")]
        iss: &'a str,
    }
    let minted = Minted {
        claims,
        aud: auth.audience.first().map(String::as_str),
        iss: &auth.issuer,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(auth.algorithm.jsonwebtoken()),
        &minted,
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

/// The longest bearer token looked at: far above any real JWT, and it bounds the work (and the
/// verified-token cache's keys) a caller can make the edge do.
pub const MAX_TOKEN_LEN: usize = 8192;

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
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be `Bearer <token>`"))?;
    if token.len() > MAX_TOKEN_LEN {
        return Err(ApiError::unauthorized(format!(
            "token is longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    match key.verify_cached(token) {
        Ok(claims) => Ok(Caller(claims)),
        Err(AuthError::Expired) => Err(ApiError::unauthorized("token has expired")),
        Err(AuthError::Invalid(why)) => {
            Err(ApiError::unauthorized(format!("token is invalid: {why}")))
        }
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
            audience: Vec::new(),
            issuer: String::new(),
        }
    }

    /// An HS256 token with exactly these claims (the key of [`keys`]).
    fn token_with(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&b"k".repeat(32)),
        )
        .unwrap()
    }

    fn refusal(key: &JwtKey, token: &str) -> String {
        match key.verify(token) {
            Err(AuthError::Invalid(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn audience_and_issuer_are_checked_only_where_configured() {
        let exp = now() + 60;
        // An identity provider's token carries `aud` and `iss`: without `auth.audience` and
        // `auth.issuer` neither is looked at (jsonwebtoken alone would refuse every such token).
        let idp = token_with(serde_json::json!({
            "sub": "auth0|u1", "exp": exp, "aud": ["https://api.example", "other"],
            "iss": "https://login.example/"
        }));
        let open = JwtKey::from_config(&keys(JwtAlgorithm::HS256, "rs256")).unwrap();
        assert_eq!(open.verify(&idp).unwrap().sub, "auth0|u1");
        let mut auth = keys(JwtAlgorithm::HS256, "rs256");
        auth.audience = vec!["https://api.example".into()];
        auth.issuer = "https://login.example/".into();
        let strict = JwtKey::from_config(&auth).unwrap();
        assert_eq!(strict.verify(&idp).unwrap().sub, "auth0|u1");
        let single = token_with(serde_json::json!({
            "sub": "u", "exp": exp, "aud": "https://api.example", "iss": "https://login.example/"
        }));
        assert!(strict.verify(&single).is_ok(), "aud as one string");
        let cases = [
            (
                serde_json::json!({"sub": "u", "exp": exp, "aud": "https://evil.example",
                                   "iss": "https://login.example/"}),
                "aud is not an audience",
            ),
            (
                serde_json::json!({"sub": "u", "exp": exp, "iss": "https://login.example/"}),
                "no aud claim",
            ),
            (
                serde_json::json!({"sub": "u", "exp": exp, "aud": "https://api.example",
                                   "iss": "https://evil.example/"}),
                "iss is not the issuer",
            ),
            (
                serde_json::json!({"sub": "u", "exp": exp, "aud": "https://api.example"}),
                "no iss claim",
            ),
        ];
        for (claims, phrase) in cases {
            let why = refusal(&strict, &token_with(claims.clone()));
            assert!(why.contains(phrase), "{claims}: {why}");
        }
        // What `tenantry admin token` mints with this configuration passes it.
        let minted = mint(&auth, &claims()).unwrap();
        assert_eq!(strict.verify(&minted).unwrap().sub, "u1");
        // A token minted without them (another deployment's `admin token`) does not.
        let bare = refusal(&strict, &mint_hs256(&b"k".repeat(32), &claims()).unwrap());
        assert!(bare.starts_with("it has no "), "{bare}");
    }

    #[test]
    fn a_token_not_valid_yet_is_refused_and_the_reason_never_quotes_the_token() {
        let key = JwtKey::hs256(&b"k".repeat(32));
        let later =
            token_with(serde_json::json!({"sub": "u", "exp": now() + 600, "nbf": now() + 300}));
        assert!(refusal(&key, &later).contains("not valid yet"));
        let soon =
            token_with(serde_json::json!({"sub": "u", "exp": now() + 600, "nbf": now() + 2}));
        assert!(key.verify(&soon).is_ok(), "within the leeway");
        // A claim of the wrong type: serde's text would quote it.
        let odd = token_with(serde_json::json!({"sub": "u", "exp": now() + 600,
                                                "scope": "\u{1b}[2Jsecret-ish"}));
        assert!(key.verify(&odd).is_ok());
        let bad = token_with(serde_json::json!({"sub": "u", "exp": now() + 600,
                                                "companies": "\u{1b}[2Jquoted"}));
        let why = refusal(&key, &bad);
        assert!(!why.contains("quoted"), "{why}");
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
