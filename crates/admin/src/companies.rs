//! `tenantry admin companies list|finish`: the catalog's companies, and creations a client left
//! half-way.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use tenantry_core::{Config, db};
use tenantry_shardmap::tenants::{self, Created};
use uuid::Uuid;

use crate::table;

#[derive(Debug, Subcommand)]
pub enum CompaniesCommand {
    /// List the catalog's companies, newest first.
    List(ListArgs),
    /// Finish the creation of a company left `provisioning` (its creator stopped half-way and
    /// never repeated the request): record its placement on its shard and make it active.
    Finish(FinishArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only companies in this state (provisioning, active, moving, deleted).
    #[arg(long, value_parser = ["provisioning", "active", "moving", "deleted"])]
    state: Option<String>,
    /// Only companies placed on this shard.
    #[arg(long, value_parser = crate::shard_arg)]
    shard: Option<String>,
    /// At most this many (1-1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
    limit: i64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct FinishArgs {
    /// The company id.
    id: Uuid,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct CompanyRow {
    id: Uuid,
    name: String,
    shard: String,
    state: String,
    created_at: String,
}

pub async fn run(cmd: CompaniesCommand, cfg: &Config) -> anyhow::Result<()> {
    match cmd {
        CompaniesCommand::List(a) => list(cfg, a).await,
        CompaniesCommand::Finish(a) => finish(cfg, a).await,
    }
}

async fn catalog(cfg: &Config) -> anyhow::Result<tokio_postgres::Client> {
    db::connect(&cfg.catalog.url, &cfg.database, "tenantry-admin")
        .await
        .context("connecting to the catalog")
}

async fn list(cfg: &Config, args: ListArgs) -> anyhow::Result<()> {
    let client = catalog(cfg).await?;
    let rows = client
        .query(
            "SELECT id, name, shard_id, state,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM tenants
              WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR shard_id = $2)
              ORDER BY created_at DESC, id DESC
              LIMIT $3",
            &[&args.state, &args.shard, &args.limit],
        )
        .await
        .context("listing companies")?;
    let rows: Vec<CompanyRow> = rows
        .iter()
        .map(|r| CompanyRow {
            id: r.get(0),
            name: r.get(1),
            shard: r.get(2),
            state: r.get(3),
            created_at: r.get(4),
        })
        .collect();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.state.clone(),
                c.shard.clone(),
                c.created_at.clone(),
                c.name.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        table::render(&["ID", "STATE", "SHARD", "CREATED", "NAME"], &cells)
    );
    Ok(())
}

#[derive(Debug, Serialize)]
struct Finished {
    id: Uuid,
    shard: String,
    /// `finished`: this command made it active; `already_active`: nothing was left to do.
    outcome: &'static str,
}

async fn finish(cfg: &Config, args: FinishArgs) -> anyhow::Result<()> {
    let mut client = catalog(cfg).await?;
    let row = client
        .query_opt("SELECT name, state FROM tenants WHERE id = $1", &[&args.id])
        .await
        .context("reading the company")?
        .with_context(|| format!("company {} is not in the catalog", args.id))?;
    let (name, state): (String, String) = (row.get(0), row.get(1));
    if state == "deleted" {
        anyhow::bail!(
            "company {} was deleted; there is nothing to finish",
            args.id
        );
    }
    // The creation's own steps, as the client's repeat would run them: each is idempotent,
    // and a concurrent repeat serializes on the company's row.
    let created = tenants::create(&mut client, &cfg.database, args.id, &name)
        .await
        .with_context(|| format!("finishing the creation of company {}", args.id))?;
    // This command finished it when it made it active; otherwise it was already done (maybe
    // by the client's own repeat since the company was read above).
    let (shard_id, finished) = match created {
        Created::New { shard_id } => (shard_id, true),
        Created::Existing {
            shard_id,
            activated,
        } => (shard_id, activated),
    };
    // Not finished here: read the state again for both outputs, as the one read above may be a
    // creation's that finished meanwhile.
    let state = if finished {
        state
    } else {
        client
            .query_one("SELECT state FROM tenants WHERE id = $1", &[&args.id])
            .await
            .context("reading the company")?
            .get(0)
    };
    let report = Finished {
        id: args.id,
        shard: shard_id,
        outcome: match (finished, state.as_str()) {
            (true, _) => "finished",
            // Moving to another shard, say: not active, and nothing for this command to do.
            (false, "active" | "provisioning") => "already_active",
            (false, _) => "nothing_to_do",
        },
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.outcome == "finished" {
        outln!(
            "company {}: created on shard {} and active",
            report.id,
            report.shard
        );
    } else {
        outln!(
            "company {}: already {state} on shard {}; nothing to do",
            report.id,
            report.shard
        );
    }
    Ok(())
}
