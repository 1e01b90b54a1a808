//! `tenantry admin token`: mint a JWT with the configured key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use tenantry_core::{
    Config,
    auth::{Claims, Role, check_sub, mint, parse_company_grant},
};
use uuid::Uuid;

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (`sub`): 1 to 256 bytes, not blank, without control characters.
    #[arg(long, value_parser = parse_user)]
    user: String,
    /// A company and the user's role there, `UUID:admin|member|viewer`; repeatable.
    #[arg(long = "company", value_parser = parse_company_grant)]
    companies: Vec<(Uuid, Role)>,
    /// Space-separated scopes, e.g. "companies:create shardmap:read" (at most 1000 bytes,
    /// without control characters).
    #[arg(long, default_value = "", value_parser = parse_scope)]
    scope: String,
    /// Lifetime, e.g. 1h, 30m, 7d (at most 30d).
    #[arg(long, default_value = "1h", value_parser = humantime_duration)]
    ttl: Duration,
}

fn parse_user(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("--user must not be blank".into());
    }
    check_sub(s).map_err(|e| format!("--user: {e}"))?;
    Ok(s.to_owned())
}

fn parse_scope(s: &str) -> Result<String, String> {
    if s.len() > 1000 || s.chars().any(char::is_control) {
        return Err("--scope must be at most 1000 bytes without control characters".into());
    }
    Ok(s.to_owned())
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d: Duration = s
        .parse::<humantime_serde::re::humantime::Duration>()
        .map_err(|e| e.to_string())?
        .into();
    if d < Duration::from_secs(1) || d > Duration::from_secs(30 * 86_400) {
        return Err("ttl must be between 1s and 30d".into());
    }
    Ok(d)
}

pub fn run(args: TokenArgs, cfg: &Config, _dev: bool) -> anyhow::Result<()> {
    // Each company one role: a second, other grant would silently replace the first.
    let mut companies = std::collections::BTreeMap::new();
    for (id, role) in args.companies {
        if companies
            .insert(id, role)
            .is_some_and(|before| before != role)
        {
            return Err(crate::UsageError(format!(
                "--company {id} is given more than once, with different roles"
            ))
            .into());
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let claims = Claims {
        sub: args.user,
        iat: now,
        exp: now + args.ttl.as_secs(),
        companies,
        scope: args.scope,
    };
    outln!("{}", mint(&cfg.auth, &claims)?);
    Ok(())
}
