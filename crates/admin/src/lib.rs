#![doc = include_str!("../README.md")]

mod jobs;
mod migrate;
mod shard;
pub mod table;
mod token;

use clap::Subcommand;
use tenantry_core::Config;

/// `tenantry admin …`: the operator's commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Schema migrations of the catalog and the shards.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// Shards: apply the shard map as code, list what the catalog holds.
    #[command(subcommand)]
    Shard(shard::ShardCommand),
    /// Jobs on a shard: list, show, retry or resolve dead letters.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Mint a JWT signed with the configured key (for development and tests).
    Token(token::TokenArgs),
}

/// Runs an admin command. `cfg` was loaded by the binary; `dev` is the `--dev` switch.
pub async fn run(cmd: AdminCommand, cfg: &Config, dev: bool) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Migrate(c) => migrate::run(c, cfg).await,
        AdminCommand::Shard(c) => shard::run(c, cfg).await,
        AdminCommand::Jobs(c) => jobs::run(c, cfg).await,
        AdminCommand::Token(a) => token::run(a, cfg, dev),
    }
}
