//! `tenantry admin shard apply`: make the catalog and the shard databases match a shard-map
//! file. Every step is idempotent, so a second run changes nothing and says so, and a run that
//! died half-way is finished by running it again.

use anyhow::Context;
use serde::Serialize;
use tenantry_core::{config::DatabaseConfig, db, secret::DatabaseUrl};
use tenantry_migrate::{Phase, Target};

use crate::{
    catalog::{self, Change},
    file::{ShardMapFile, ShardState},
};

#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// Create shard databases that do not exist yet (never one of a shard that skips them, see
    /// below, or holds companies).
    pub create_databases: bool,
    /// A shard already in the catalog with the same database URL whose database cannot be
    /// reached, or no longer exists, is not migrated, checked or created, and its catalog fields
    /// are applied all the same (so a dead shard can be taken out of placement with
    /// `accepting = false`), unless they would put it into placement or bring it back from
    /// retirement (then the apply fails).
    pub skip_unreachable: bool,
    /// How each shard's migration waits for locks, and who hears of it.
    pub lock: tenantry_migrate::LockWait,
}

/// What happened to one declared shard.
#[derive(Debug, Clone, Serialize)]
pub struct ShardOutcome {
    pub id: String,
    pub database_created: bool,
    pub migrations_applied: Vec<String>,
    /// `None` for a shard whose database was not looked at (skipped or retired): a 0 would
    /// read as a database without a schema, to a script as to `shard list --json`.
    pub schema_version: Option<i64>,
    /// Why its database was not migrated or checked (`skip_unreachable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Declared `retired`: its database is neither reached, created nor migrated (`migrate up`
    /// leaves retired shards out too, and their database may well be gone).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
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
    let known = catalog::list_shards(&cat)
        .await
        .context("reading the catalog's shards")?;
    check_environment(&cat, catalog_url, file, &known).await?;
    // The companies each moving shard (a new `database_url`) had when its database was
    // checked: it must still have exactly those when the catalog changes. Only those shards:
    // the fingerprint reads every company of a shard.
    let moving: Vec<&str> = file
        .shards
        .iter()
        .filter(|s| {
            known
                .iter()
                .any(|k| k.id == s.id && k.database_url != s.database_url)
        })
        .map(|s| s.id.as_str())
        .collect();
    let checked = if moving.is_empty() {
        Default::default()
    } else {
        catalog::companies_by_shard(&cat, Some(&moving))
            .await
            .context("reading the catalog's companies")?
    };
    let mut outcomes = Vec::new();
    for spec in &file.shards {
        // What the catalog has for this shard: how many companies (a shard with companies never
        // gets an empty database, its own must be restored) and whether its database moves (it
        // must then find its own data at the new URL).
        let current = known.iter().find(|k| k.id == spec.id);
        let same_url = current.is_some_and(|k| k.database_url == spec.database_url);
        let companies = match current {
            Some(k) if same_url => k.tenants,
            // Counted with the fingerprint the catalog's change is checked against (`checked`,
            // read after `known`): a company created on it in between must make it a moving
            // shard with companies, not one that gets a new, empty database.
            Some(_) => checked.get(&spec.id).map_or(0, |c| c.count),
            None => 0,
        };
        let moving = companies > 0 && !same_url;
        // A shard already in the catalog whose database may be skipped when it cannot be
        // reached or is gone (never created then: it is missing, not new).
        let skippable = opts.skip_unreachable && same_url;
        if spec.state == ShardState::Retired {
            // A retired shard holds no company (the upsert below refuses to retire one that
            // does), so its database has nothing to check; creating it would stamp an empty
            // database with the shard's id.
            outcomes.push(ShardOutcome {
                id: spec.id.clone(),
                database_created: false,
                migrations_applied: vec![],
                schema_version: None,
                skipped: None,
                retired: true,
                catalog: Change::Unchanged,
            });
            continue;
        }
        let reached = async {
            // Never for a shard already in the catalog that may be skipped: its database is
            // missing, not new (`skip_unreachable` applies its catalog fields without it).
            let created = if opts.create_databases && companies == 0 && !skippable {
                db::ensure_database(
                    &spec.database_url,
                    dbcfg,
                    tenantry_migrate::MIN_SERVER_VERSION,
                )
                .await
                .with_context(|| format!("creating the database of shard {}", spec.id))?
            } else {
                false
            };
            let client = db::connect(&spec.database_url, dbcfg, "tenantry-admin")
                .await
                .with_context(|| format!("connecting to shard {}", spec.id))?;
            anyhow::Ok((created, client))
        }
        .await;
        let (database_created, mut client) = match reached {
            Ok(r) => r,
            // A database that is gone counts as unreachable here too: the operator asked to
            // apply the catalog fields of a shard already in the catalog without its database
            // (to stop placing companies on it, say), and nothing is created.
            Err(e) if skippable => {
                // Only to take it out of placement, never to bring it (back) in: companies
                // would be created on a database nobody checked, and stay `provisioning`.
                if let Some(why) = current.and_then(|k| brought_back(k, spec)) {
                    anyhow::bail!(
                        "shard {}: {why}, but its database was not reached ({e:#}); \
                         --skip-unreachable applies only changes that keep a shard out of \
                         placement: make its database reachable first; the catalog was not \
                         changed",
                        spec.id
                    );
                }
                outcomes.push(ShardOutcome {
                    id: spec.id.clone(),
                    database_created: false,
                    migrations_applied: vec![],
                    schema_version: None,
                    skipped: Some(format!("{e:#}")),
                    retired: false,
                    catalog: Change::Unchanged,
                });
                continue;
            }
            Err(e) if missing_database(&e) => {
                if moving {
                    return Err(not_its_database(&spec.id, companies, None));
                }
                if companies > 0 {
                    return Err(e.context(format!(
                        "the database of shard {}, which has {companies} companies, does not \
                         exist: restore it (it is never created empty)",
                        spec.id
                    )));
                }
                return Err(e.context("pass --create-databases to create missing databases"));
            }
            Err(e) => {
                let hint = if same_url {
                    "pass --skip-unreachable to apply its catalog fields without it"
                } else {
                    "a shard new to the catalog, or with a new database_url, must be reachable"
                };
                return Err(e.context(hint));
            }
        };
        if moving {
            check_moved_database(&cat, &client, &spec.id, companies).await?;
        }
        let report = tenantry_migrate::up_with(
            &mut client,
            &tenantry_migrate::embedded(Target::Shard),
            Phase::Expand,
            opts.lock,
        )
        .await
        .with_context(|| format!("migrating shard {}", spec.id))?;
        claim_identity(&client, &spec.id).await?;
        outcomes.push(ShardOutcome {
            id: spec.id.clone(),
            database_created,
            migrations_applied: report.applied,
            schema_version: Some(report.version),
            skipped: None,
            retired: false,
            catalog: Change::Unchanged,
        });
    }

    // The environment is recorded in the transaction that changes the catalog's shards: a run
    // that failed on the way (an unreachable or mistyped database, a failed update) leaves the
    // catalog as it found it.
    let environment = file.environment.as_str();
    let (changes, undeclared, map_version) =
        match catalog::upsert_shards(&mut cat, &file.shards, Some(environment), &checked).await {
            Ok(done) => done,
            Err(catalog::UpsertError::OtherEnvironment(recorded)) => anyhow::bail!(
                "the catalog at {catalog_url} now serves environment {recorded:?}, recorded by \
                 another apply while this one ran, and this shard map is for {environment:?}: \
                 the catalog's shards were not changed (the shard databases this run prepared \
                 are left as they are)"
            ),
            Err(e @ catalog::UpsertError::RetiringWithCompanies(_)) => anyhow::bail!(
                "{e}: a retired shard is left out of migrations, so retire a shard only once \
                 it holds no company (set accepting = false first, so no new company is placed \
                 there); the catalog's shards were not changed (the shard databases this run \
                 prepared are left as they are)"
            ),
            Err(e @ catalog::UpsertError::CompaniesChangedWhileMoving(_)) => anyhow::bail!(
                "{e}: their new databases were checked for the companies counted before; the \
                 catalog's shards were not changed, run the apply again"
            ),
            Err(catalog::UpsertError::Db(e)) => {
                return Err(anyhow::Error::new(e).context("updating the catalog"));
            }
        };
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

/// Before anything is written to it: the new database of a shard that has companies must
/// already be that shard's (restored or copied from its old database). A fresh or mistyped
/// database would be claimed, and the companies' requests would find nothing there.
async fn check_moved_database(
    cat: &tokio_postgres::Client,
    client: &tokio_postgres::Client,
    shard_id: &str,
    tenants: i64,
) -> anyhow::Result<()> {
    let owner: Option<String> = match client
        .query_opt("SELECT shard_id FROM shard_identity", &[])
        .await
    {
        Ok(row) => row.map(|r| r.get(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e).context("reading the new database's shard identity"),
    };
    if owner.as_deref() != Some(shard_id) {
        return Err(not_its_database(shard_id, tenants, owner.as_deref()));
    }
    // Another environment's database for a shard of the same id says the same: it must also
    // hold every one of this shard's companies. All of them, not a sample: ids are the
    // clients' choice, and a company activated on the old database after it was copied may
    // have any. (A company still `provisioning` may have no placement yet; the one step that
    // activates it writes its placement to the URL it then re-checks, see `tenants::create`.)
    let (mut after, mut checked, mut missing) = (uuid::Uuid::nil(), 0usize, 0i64);
    loop {
        let ids: Vec<uuid::Uuid> = cat
            .query(
                "SELECT id FROM tenants
                  WHERE shard_id = $1 AND state NOT IN ('deleted', 'provisioning') AND id > $2
                  ORDER BY id LIMIT 10000",
                &[&shard_id, &after],
            )
            .await
            .context("reading the shard's companies")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(last) = ids.last() else { break };
        after = *last;
        let held: i64 = client
            .query_one(
                "SELECT count(*) FROM placements WHERE company_id = ANY($1)",
                &[&ids],
            )
            .await
            .context("reading the new database's placements")?
            .get(0);
        checked += ids.len();
        missing += ids.len() as i64 - held;
    }
    if missing > 0 {
        anyhow::bail!(
            "shard {shard_id} has {tenants} companies and its database_url changes, but the \
             database at the new URL lacks {missing} of the {checked} active ones (another \
             environment's shard {shard_id}, or a copy older than a company's creation?): \
             restore or copy the shard's own database there first; the catalog was not changed"
        );
    }
    Ok(())
}

/// How applying `spec` over `current` would put a shard into placement (new companies created
/// on it), or back into service from retirement, if it would.
fn brought_back(
    current: &catalog::ShardRow,
    spec: &crate::file::ShardSpec,
) -> Option<&'static str> {
    let placing = |accepting: bool, state: &str| accepting && state == "active";
    if current.state == "retired" && spec.state != ShardState::Retired {
        Some("the file brings it back from retirement")
    } else if placing(spec.accepting, spec.state.as_str())
        && !placing(current.accepting, &current.state)
    {
        Some("the file puts it into placement (accepting and active)")
    } else {
        None
    }
}

fn not_its_database(shard_id: &str, tenants: i64, owner: Option<&str>) -> anyhow::Error {
    anyhow::anyhow!(
        "shard {shard_id} has {tenants} companies and its database_url changes, but the \
         database at the new URL is not shard {shard_id}'s (it records {}): restore or copy the \
         shard's database there first, or check the URL for a typo; the catalog was not changed",
        owner.map_or_else(|| "no shard".to_owned(), |o| format!("shard {o}"))
    )
}

/// Whether connecting failed because the database does not exist (SQLSTATE 3D000).
fn missing_database(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|p| p.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME))
}

/// Checks that the file is for the environment the catalog serves, before anything else is
/// touched (the catalog's first apply records it, with its shards: see `upsert_shards`).
async fn check_environment(
    cat: &tokio_postgres::Client,
    catalog_url: &DatabaseUrl,
    file: &ShardMapFile,
    known: &[catalog::ShardRow],
) -> anyhow::Result<()> {
    let environment = file.environment.as_str();
    let missing = "the catalog has no environment record (catalog migration 0004); run \
                   `tenantry admin migrate up` first";
    let recorded: Option<String> = cat
        .query_opt("SELECT environment FROM catalog_environment", &[])
        .await
        .context(missing)?
        .map(|r| r.get(0));
    // A catalog from before the record (it has shards, no environment yet) is claimed only by
    // a file that agrees with it on every shard both name: a file for another environment
    // would not (its databases are elsewhere).
    if recorded.is_none() {
        let differing: Vec<&str> = file
            .shards
            .iter()
            .filter(|f| {
                known
                    .iter()
                    .any(|k| k.id == f.id && k.database_url != f.database_url)
            })
            .map(|f| f.id.as_str())
            .collect();
        if !differing.is_empty() {
            anyhow::bail!(
                "the catalog at {catalog_url} has no environment recorded yet, and this shard \
                 map ({environment:?}) gives other databases for shard(s) {}: is it this \
                 catalog's map? Apply its own map first, or record the environment by hand \
                 (INSERT INTO catalog_environment (environment) VALUES ('…')); nothing was \
                 changed",
                differing.join(", ")
            );
        }
    }
    if let Some(recorded) = recorded
        && recorded != environment
    {
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
