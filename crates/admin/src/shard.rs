//! `tenantry admin shard apply|list`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use tenantry_core::{Config, db};
use tenantry_shardmap::{ApplyOptions, ShardMapFile, catalog};

use crate::table;

#[derive(Debug, Subcommand)]
pub enum ShardCommand {
    /// Make the catalog and the shard databases match a shard-map file (idempotent).
    Apply(ApplyArgs),
    /// List the shards in the catalog.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The shard-map file, e.g. shard-map/local.toml.
    file: PathBuf,
    /// Create shard databases that do not exist yet.
    #[arg(long)]
    create_databases: bool,
    /// Apply the catalog fields (accepting, state, weight, endpoints) of a shard already in
    /// the catalog whose database cannot be reached, without migrating or checking it.
    #[arg(long)]
    skip_unreachable: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: ShardCommand, cfg: &Config) -> anyhow::Result<()> {
    match cmd {
        ShardCommand::Apply(a) => apply(cfg, a).await,
        ShardCommand::List(a) => list(cfg, a).await,
    }
}

async fn apply(cfg: &Config, args: ApplyArgs) -> anyhow::Result<()> {
    let file = ShardMapFile::load(&args.file)?;
    let report = tenantry_shardmap::apply(
        &cfg.catalog.url,
        &cfg.database,
        &file,
        ApplyOptions {
            create_databases: args.create_databases,
            skip_unreachable: args.skip_unreachable,
            lock: crate::migrate::said_lock_wait(),
        },
    )
    .await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for s in &report.shards {
        let mut what = Vec::new();
        if let Some(why) = &s.skipped {
            errln!(
                "warning: shard {}: its database was not migrated or checked: {why}",
                s.id
            );
            what.push("database unreachable, skipped".to_owned());
        }
        if s.retired {
            what.push("retired, database left alone".to_owned());
        }
        if s.database_created {
            what.push("created database".to_owned());
        }
        if !s.migrations_applied.is_empty() {
            what.push(format!("applied {}", s.migrations_applied.join(", ")));
        }
        match &s.catalog {
            catalog::Change::Created => what.push("added to the catalog".into()),
            catalog::Change::Updated { fields } => {
                what.push(format!("updated in the catalog ({})", fields.join(", ")))
            }
            catalog::Change::Unchanged => {}
        }
        if what.is_empty() {
            what.push("unchanged".into());
        }
        match s.schema_version {
            None => outln!("shard {}: {}", s.id, what.join("; ")),
            Some(version) => outln!(
                "shard {}: {} (schema version {version})",
                s.id,
                what.join("; ")
            ),
        }
    }
    for id in &report.undeclared {
        outln!(
            "shard {id}: in the catalog but not in {}; left alone",
            args.file.display()
        );
    }
    let skipped = report.shards.iter().filter(|s| s.skipped.is_some()).count();
    if report.unchanged() && skipped > 0 {
        // It could not look at those databases: "nothing to change" would claim it had.
        outln!(
            "{}: nothing changed; {skipped} shard database(s) not checked (shard map version {})",
            file.environment,
            report.map_version
        );
    } else if report.unchanged() {
        outln!(
            "{}: nothing to change (shard map version {})",
            file.environment,
            report.map_version
        );
    } else {
        outln!(
            "{}: applied (shard map version {})",
            file.environment,
            report.map_version
        );
    }
    Ok(())
}

async fn list(cfg: &Config, args: ListArgs) -> anyhow::Result<()> {
    let client = db::connect(&cfg.catalog.url, &cfg.database, "tenantry-admin")
        .await
        .context("connecting to the catalog")?;
    let shards = catalog::list_shards(&client)
        .await
        .context("listing shards")?;
    // Each shard's schema version, or why it could not be read.
    let mut versions: Vec<Result<i64, String>> = Vec::new();
    let known = tenantry_migrate::embedded(tenantry_migrate::Target::Shard);
    for s in &shards {
        let v = match db::connect(&s.database_url, &cfg.database, "tenantry-admin").await {
            Ok(c) => match tenantry_migrate::status(&c, &known).await {
                Ok(st) => Ok(st.version()),
                Err(e) => Err(format!("error: {}", tenantry_core::error::chain(&e))),
            },
            Err(e) => {
                errln!("warning: shard {}: {e:#}", s.id);
                Err("unreachable".to_owned())
            }
        };
        versions.push(v);
    }
    if args.json {
        let rows: Vec<_> = shards
            .iter()
            .zip(&versions)
            .map(|(s, v)| {
                // A number, or null with the reason in `problem`: a string here would sort
                // after every number in a filter such as `.schema_version >= 5`.
                serde_json::json!({
                    "id": s.id, "state": s.state, "accepting": s.accepting, "weight": s.weight,
                    "tenants": s.tenants, "schema_version": v.as_ref().ok(),
                    "problem": v.as_ref().err(), "endpoints": s.endpoints,
                    "version": s.version,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = shards
        .iter()
        .zip(versions)
        .map(|(s, v)| {
            vec![
                s.id.clone(),
                s.state.clone(),
                if s.accepting { "yes" } else { "no" }.into(),
                s.tenants.to_string(),
                v.map_or_else(|problem| problem, |v| v.to_string()),
                s.endpoints.join(","),
            ]
        })
        .collect();
    if rows.is_empty() {
        outln!(
            "no shards in the catalog; declare them in shard-map/*.toml and run `tenantry admin shard apply`"
        );
    } else {
        out!(
            "{}",
            table::render(
                &["ID", "STATE", "ACCEPTING", "TENANTS", "SCHEMA", "ENDPOINTS"],
                &rows
            )
        );
    }
    Ok(())
}
