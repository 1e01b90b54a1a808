//! `tenantry admin token`: mint a JWT with the configured key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use tenantry_core::{
    Config,
    auth::{Claims, Role, mint, parse_company_grant},
};
use uuid::Uuid;

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    user: String,
    /// A company and the user's role there, `UUID:admin|member|viewer`; repeatable.
    #[arg(long = "company", value_parser = parse_company_grant)]
    companies: Vec<(Uuid, Role)>,
    /// Space-separated scopes, e.g. "companies:create shardmap:read".
    #[arg(long, default_value = "")]
    scope: String,
    /// Lifetime, e.g. 1h, 30m, 7d (at most 30d).
    #[arg(long, default_value = "1h", value_parser = humantime_duration)]
    ttl: Duration,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d: Duration = s
        .parse::<humantime_serde::re::humantime::Duration>()
        .map_err(|e| e.to_string())?
        .into();
    if d.is_zero() || d > Duration::from_secs(30 * 86_400) {
        return Err("ttl must be between 1s and 30d".into());
    }
    Ok(d)
}

pub fn run(args: TokenArgs, cfg: &Config, _dev: bool) -> anyhow::Result<()> {
    if args.user.trim().is_empty() || args.user.len() > 200 {
        anyhow::bail!("--user must be 1 to 200 characters");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let claims = Claims {
        sub: args.user,
        iat: now,
        exp: now + args.ttl.as_secs(),
        companies: args.companies.into_iter().collect(),
        scope: args.scope,
    };
    outln!("{}", mint(&cfg.auth, &claims)?);
    Ok(())
}
