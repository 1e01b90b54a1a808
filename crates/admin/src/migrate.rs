//! `tenantry admin migrate status|up`.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use tenantry_core::{Config, db, secret::DatabaseUrl};
use tenantry_migrate::{Migration, Phase, Target};
use tenantry_shardmap::catalog;

use crate::table;

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Print, for the catalog and every shard: applied version, latest known, pending steps.
    /// Exits 1 (after printing) when a database cannot be read or has a problem. Retired
    /// shards are left out unless named with --shard.
    Status(StatusArgs),
    /// Apply pending migrations: the catalog, then every shard in the catalog (or one).
    /// Retired shards are left out unless named with --shard.
    Up(UpArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this shard (and not the catalog).
    #[arg(long, value_parser = crate::shard_arg)]
    shard: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// `expand` applies steps safe while old code runs and stops before the first contract
    /// step; `contract` applies everything (only after every node runs the new code).
    #[arg(long, default_value = "expand", value_parser = parse_phase)]
    phase: Phase,
    /// Only this shard (and not the catalog).
    #[arg(long, value_parser = crate::shard_arg)]
    shard: Option<String>,
    /// Create the catalog database first if it does not exist.
    #[arg(long)]
    create_databases: bool,
}

fn parse_phase(s: &str) -> Result<Phase, String> {
    s.parse()
}

/// One database to migrate or report on.
struct Db {
    label: String,
    url: DatabaseUrl,
    target: Target,
}

/// The databases to work on, and the retired shards left out (see [`databases`]).
struct Databases {
    work: Vec<Db>,
    retired: Vec<String>,
}

/// The catalog (unless `only_shard`) and the shards, in id order. A retired shard is left out
/// unless it is `only_shard`: its database may well be gone, and it would stop `up` (and fail
/// `status`) for every shard after it.
async fn databases(cfg: &Config, only_shard: Option<&str>) -> anyhow::Result<Databases> {
    let mut out = Vec::new();
    let mut retired = Vec::new();
    if only_shard.is_none() {
        out.push(Db {
            label: "catalog".into(),
            url: cfg.catalog.url.clone(),
            target: Target::Catalog,
        });
    }
    let client = db::connect(&cfg.catalog.url, &cfg.database, "tenantry-admin")
        .await
        .context("connecting to the catalog")?;
    let shards = match catalog::list_shards(&client).await {
        Ok(s) => s,
        // A catalog without schema has no shards yet; `up` creates the schema first.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Vec::new(),
        Err(e) => return Err(e).context("listing shards"),
    };
    if let Some(id) = only_shard
        && !shards.iter().any(|s| s.id == id)
    {
        anyhow::bail!("shard {id:?} is not in the catalog (see `tenantry admin shard list`)");
    }
    for s in shards {
        if only_shard.is_none() && s.state == "retired" {
            retired.push(s.id);
        } else if only_shard.is_none_or(|id| id == s.id) {
            out.push(Db {
                label: format!("shard {}", s.id),
                url: s.database_url,
                target: Target::Shard,
            });
        }
    }
    Ok(Databases { work: out, retired })
}

#[derive(Serialize)]
struct StatusRow {
    database: String,
    /// `None` when the database could not be read.
    applied: Option<i64>,
    latest: i64,
    /// `None` when the database could not be read.
    pending: Option<Vec<String>>,
    problem: Option<String>,
}

pub async fn run(cmd: MigrateCommand, cfg: &Config) -> anyhow::Result<()> {
    match cmd {
        MigrateCommand::Status(a) => status(cfg, a).await,
        MigrateCommand::Up(a) => up(cfg, a).await,
    }
}

async fn status(cfg: &Config, args: StatusArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let Databases { work, retired } = databases(cfg, args.shard.as_deref()).await?;
    for d in work {
        let known = tenantry_migrate::embedded(d.target);
        let latest = known.last().map_or(0, |m| m.version);
        let row = match db::connect(&d.url, &cfg.database, "tenantry-admin").await {
            Err(e) => StatusRow {
                database: d.label,
                applied: None,
                latest,
                pending: None,
                problem: Some(format!("unreachable: {e:#}")),
            },
            Ok(client) => match tenantry_migrate::status(&client, &known).await {
                Err(e) => StatusRow {
                    database: d.label,
                    applied: None,
                    latest,
                    pending: None,
                    problem: Some(tenantry_core::error::chain(&e)),
                },
                Ok(st) => StatusRow {
                    database: d.label,
                    applied: Some(st.version()),
                    latest,
                    pending: Some(st.pending.iter().map(describe).collect()),
                    problem: st
                        .check(&known)
                        .err()
                        .map(|e| tenantry_core::error::chain(&e)),
                },
            },
        };
        rows.push(row);
    }
    let problems = rows.iter().filter(|r| r.problem.is_some()).count();
    let verdict = match problems {
        0 => Ok(()),
        n => Err(anyhow::anyhow!(
            "{n} of {} databases could not be read or have a problem (see PROBLEM)",
            rows.len()
        )),
    };
    // The verdict wins over a reader that went away (`migrate status | grep -q …` under
    // pipefail): a problem found is reported by the exit code, printed or not.
    match (print_status(&rows, &retired, args.json), verdict) {
        (_, Err(problems)) => Err(problems),
        (printed, Ok(())) => printed,
    }
}

fn print_status(rows: &[StatusRow], retired: &[String], json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let pending = match &r.pending {
                None => "?".to_owned(),
                Some(p) if p.is_empty() => "-".to_owned(),
                Some(p) => p.join(", "),
            };
            vec![
                r.database.clone(),
                r.applied.map_or("?".to_owned(), |v| v.to_string()),
                r.latest.to_string(),
                pending,
                r.problem.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out!(
        "{}",
        table::render(
            &["DATABASE", "APPLIED", "LATEST", "PENDING", "PROBLEM"],
            &cells
        )
    );
    if !retired.is_empty() {
        outln!("retired shards, not checked: {}", retired.join(", "));
    }
    Ok(())
}

fn describe(m: &Migration) -> String {
    format!("{} ({})", m.file, m.phase)
}

async fn up(cfg: &Config, args: UpArgs) -> anyhow::Result<()> {
    if args.create_databases
        && db::ensure_database(
            &cfg.catalog.url,
            &cfg.database,
            tenantry_migrate::MIN_SERVER_VERSION,
        )
        .await?
    {
        note!("catalog: created database");
    }
    // The catalog goes first: listing shards needs its schema.
    if args.shard.is_none() {
        migrate_one(
            cfg,
            "catalog",
            &cfg.catalog.url,
            Target::Catalog,
            args.phase,
        )
        .await?;
    }
    let Databases { work, retired } = databases(cfg, args.shard.as_deref()).await?;
    for d in work.into_iter().filter(|d| d.target == Target::Shard) {
        migrate_one(cfg, &d.label, &d.url, d.target, args.phase).await?;
    }
    for id in retired {
        note!("shard {id}: retired, not migrated (name it with --shard to migrate it)");
    }
    Ok(())
}

/// [`tenantry_migrate::LOCK_WAIT`], said on standard error: while a step waits for a lock, or
/// another runner holds a database's migration lock, the command would otherwise look hung (for
/// up to 30 s, or as long as that runner takes).
pub(crate) fn said_lock_wait() -> tenantry_migrate::LockWait {
    tenantry_migrate::LockWait {
        on_retry: |file, tries, timeout| {
            errln!(
                "{file}: waited {timeout:?} for a lock another transaction holds; \
                 rolled back, trying again (try {} follows)",
                tries + 1
            )
        },
        on_busy: || {
            errln!(
                "another migration runner holds this database's migration lock; waiting for it \
                 to finish"
            )
        },
        ..tenantry_migrate::LOCK_WAIT
    }
}

async fn migrate_one(
    cfg: &Config,
    label: &str,
    url: &DatabaseUrl,
    target: Target,
    phase: Phase,
) -> anyhow::Result<()> {
    let mut client = db::connect(url, &cfg.database, "tenantry-admin")
        .await
        .with_context(|| format!("connecting to {label}"))?;
    let known = tenantry_migrate::embedded(target);
    let report = tenantry_migrate::up_with(&mut client, &known, phase, said_lock_wait())
        .await
        .with_context(|| format!("migrating {label}"))?;
    if report.applied.is_empty() {
        note!("{label}: up to date at version {}", report.version);
    } else {
        note!(
            "{label}: applied {}; now at version {}",
            report.applied.join(", "),
            report.version
        );
    }
    if let Some(file) = report.held_back {
        note!(
            "{label}: {file} is a contract step and was not applied; run \
             `tenantry admin migrate up --phase contract` once every node runs the new code"
        );
    }
    Ok(())
}
