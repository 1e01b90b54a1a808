//! `tenantry admin shard apply`: make the catalog and the shard databases match a shard-map
//! file. Every step is idempotent, so a second run changes nothing and says so, and a run that
//! died half-way is finished by running it again.

use anyhow::Context;
use serde::Serialize;
use tenantry_core::{config::DatabaseConfig, db, secret::DatabaseUrl};
use tenantry_migrate::{Phase, Target};

use crate::{
    catalog::{self, Change},
    file::ShardMapFile,
};

#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Create shard databases that do not exist yet.
    pub create_databases: bool,
}

/// What happened to one declared shard.
#[derive(Debug, Clone, Serialize)]
pub struct ShardOutcome {
    pub id: String,
    pub database_created: bool,
    pub migrations_applied: Vec<String>,
    pub schema_version: i64,
    #[serde(flatten)]
    pub catalog: Change,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub environment: String,
    pub shards: Vec<ShardOutcome>,
    /// Shards in the catalog that the file does not declare (left alone).
    pub undeclared: Vec<String>,
    pub map_version: i64,
}

impl ApplyReport {
    /// True when the run changed nothing anywhere.
    pub fn unchanged(&self) -> bool {
        self.shards.iter().all(|s| {
            !s.database_created && s.migrations_applied.is_empty() && s.catalog == Change::Unchanged
        })
    }
}

/// Prepares every declared shard database (create if asked, migrate the expand phase, record
/// its identity), then upserts the shards into the catalog in one transaction.
pub async fn apply(
    catalog_url: &DatabaseUrl,
    dbcfg: &DatabaseConfig,
    file: &ShardMapFile,
    opts: ApplyOptions,
) -> anyhow::Result<ApplyReport> {
    let mut cat = db::connect(catalog_url, dbcfg, "tenantry-admin")
        .await
        .context("connecting to the catalog")?;
    let cat_status =
        tenantry_migrate::status(&cat, &tenantry_migrate::embedded(Target::Catalog)).await?;
    if cat_status.version() == 0 {
        anyhow::bail!(
            "the catalog at {catalog_url} has no schema yet; run `tenantry admin migrate up` first"
        );
    }
    claim_environment(&cat, catalog_url, &file.environment).await?;

    let mut outcomes = Vec::new();
    for spec in &file.shards {
        let database_created = if opts.create_databases {
            db::ensure_database(&spec.database_url, dbcfg)
                .await
                .with_context(|| format!("creating the database of shard {}", spec.id))?
        } else {
            false
        };
        let mut client = db::connect(&spec.database_url, dbcfg, "tenantry-admin")
            .await
            .with_context(|| {
                format!(
                    "connecting to shard {} (pass --create-databases to create missing databases)",
                    spec.id
                )
            })?;
        let report = tenantry_migrate::up(
            &mut client,
            &tenantry_migrate::embedded(Target::Shard),
            Phase::Expand,
        )
        .await
        .with_context(|| format!("migrating shard {}", spec.id))?;
        claim_identity(&client, &spec.id).await?;
        outcomes.push(ShardOutcome {
            id: spec.id.clone(),
            database_created,
            migrations_applied: report.applied,
            schema_version: report.version,
            catalog: Change::Unchanged,
        });
    }

    let (changes, undeclared, map_version) = catalog::upsert_shards(&mut cat, &file.shards)
        .await
        .context("updating the catalog")?;
    for (outcome, (_, change)) in outcomes.iter_mut().zip(changes) {
        outcome.catalog = change;
    }
    Ok(ApplyReport {
        environment: file.environment.clone(),
        shards: outcomes,
        undeclared,
        map_version,
    })
}

/// Records the environment the catalog serves on its first apply, or checks that the file is
/// for that environment, before anything else is touched.
async fn claim_environment(
    cat: &tokio_postgres::Client,
    catalog_url: &DatabaseUrl,
    environment: &str,
) -> anyhow::Result<()> {
    let missing = "the catalog has no environment record (catalog migration 0004); run \
                   `tenantry admin migrate up` first";
    cat.execute(
        "INSERT INTO catalog_environment (environment) VALUES ($1)
         ON CONFLICT (singleton) DO NOTHING",
        &[&environment],
    )
    .await
    .context(missing)?;
    let recorded: String = cat
        .query_one("SELECT environment FROM catalog_environment", &[])
        .await
        .context(missing)?
        .get(0);
    if recorded != environment {
        anyhow::bail!(
            "the catalog at {catalog_url} serves environment {recorded:?}, and this shard map \
             is for {environment:?}: nothing was changed (check the catalog URL, or the file)"
        );
    }
    Ok(())
}

/// Records which shard a database is, or checks that it already is that shard.
async fn claim_identity(client: &tokio_postgres::Client, shard_id: &str) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO shard_identity (shard_id) VALUES ($1) ON CONFLICT (singleton) DO NOTHING",
            &[&shard_id],
        )
        .await
        .context("recording the shard identity")?;
    let owner: String = client
        .query_one("SELECT shard_id FROM shard_identity", &[])
        .await?
        .get(0);
    if owner != shard_id {
        anyhow::bail!(
            "the database declared for shard {shard_id} already belongs to shard {owner}; \
             check database_url in the shard map"
        );
    }
    Ok(())
}
