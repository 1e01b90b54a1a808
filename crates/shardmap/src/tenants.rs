//! Tenant placements in the catalog: looking a company up, creating one (an idempotent,
//! resumable state machine across the catalog and one shard), and changing where one lives.
//! Every change that gateways must hear about commits together with an outbox row and a map
//! version bump.

use serde::{Deserialize, Serialize};
use serde_json::json;
use tenantry_core::{config::DatabaseConfig, db, secret::DatabaseUrl};
use tokio_postgres::{Client, GenericClient, Transaction};
use uuid::Uuid;

/// The outbox topic (and RabbitMQ message `type`) of a placement change.
pub const TENANT_CHANGED: &str = "tenant.changed";

/// Where a company lives, as the catalog says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub shard_id: String,
    /// `provisioning`, `active`, `moving` or `deleted`.
    pub state: String,
    pub version: i64,
}

impl Placement {
    /// Requests are routed to `active` and `moving` tenants (a moving tenant is served by its
    /// source shard until the flip; the shard's fencing decides the rest).
    pub fn routable(&self) -> bool {
        self.state == "active" || self.state == "moving"
    }
}

/// The message gateways receive on the shard-map exchange when a placement changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantChanged {
    pub company_id: Uuid,
    #[serde(flatten)]
    pub placement: Placement,
    pub map_version: i64,
}

pub async fn lookup(
    client: &impl GenericClient,
    company: Uuid,
) -> Result<Option<Placement>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT shard_id, state, version FROM tenants WHERE id = $1",
            &[&company],
        )
        .await?
        .map(|r| Placement {
            shard_id: r.get(0),
            state: r.get(1),
            version: r.get(2),
        }))
}

/// Records a placement change's outbox row and bumps the map version, inside `tx`.
async fn publish_change(
    tx: &Transaction<'_>,
    company: Uuid,
    placement: &Placement,
) -> Result<(), tokio_postgres::Error> {
    let map_version: i64 = tx
        .query_one(
            "UPDATE shard_map_version SET version = version + 1 RETURNING version",
            &[],
        )
        .await?
        .get(0);
    let mut payload = serde_json::to_value(TenantChanged {
        company_id: company,
        placement: placement.clone(),
        map_version,
    })
    .unwrap_or_default();
    payload["type"] = json!(TENANT_CHANGED);
    tx.execute(
        "INSERT INTO outbox (topic, payload) VALUES ($1, $2)",
        &[&TENANT_CHANGED, &payload],
    )
    .await?;
    Ok(())
}

/// Points a company at `shard_id` in `state`, bumping its version, with the outbox row, in
/// one transaction: what a move's flip will do (today the gateway benchmark and tests call
/// it); the shard's own placement is the fence.
pub async fn set_placement(
    client: &mut Client,
    company: Uuid,
    shard_id: &str,
    state: &str,
) -> Result<Option<Placement>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // The map version's row first, as every writer of the shard map takes it (see `create`'s
    // step 3): after the tenant's row (and, through its trigger, its shard's count) it would
    // deadlock with an apply and a creation on that shard.
    tx.execute("SELECT 1 FROM shard_map_version FOR UPDATE", &[])
        .await?;
    let row = tx
        .query_opt(
            "UPDATE tenants SET shard_id = $2, state = $3, version = version + 1,
                    updated_at = now()
              WHERE id = $1 RETURNING shard_id, state, version",
            &[&company, &shard_id, &state],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let placement = Placement {
        shard_id: row.get(0),
        state: row.get(1),
        version: row.get(2),
    };
    publish_change(&tx, company, &placement).await?;
    tx.commit().await?;
    Ok(Some(placement))
}

/// What creating a company did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// This call created it.
    New { shard_id: String },
    /// It already existed with this name (or a repeat of this call finished it).
    /// `activated`: this call made it active (it was left `provisioning` by an earlier call).
    Existing { shard_id: String, activated: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("company {0} already exists with another name")]
    NameConflict(Uuid),
    #[error("company {0} was deleted; its id cannot be reused")]
    Deleted(Uuid),
    #[error("no shard accepts new companies")]
    NoShard,
    #[error("shard {shard} could not record the placement: {source:#}")]
    Shard {
        shard: String,
        source: anyhow::Error,
    },
    #[error(transparent)]
    Catalog(#[from] tokio_postgres::Error),
}

/// Creates company `id` named `name`:
///
/// 1. catalog: insert the tenant as `provisioning` on the shard with the fewest tenants per
///    unit of weight among those accepting new tenants (counted in `shard_live_tenants`, kept
///    by a trigger; catalog migration `0005`), or find the existing row, whose row
///    stays locked `FOR SHARE` until this commits, so `shard apply` cannot retire it between
///    the choice and the insert (see `catalog::upsert_shards`);
/// 2. shard: insert its placement as `owned` (a no-op if present);
/// 3. catalog: mark it `active`, bump its version, write the outbox row, unless the shard's
///    `database_url` changed since step 2 read it (then [`CreateError::Shard`]: repeat).
///
/// Every step is idempotent, so repeating the call (same id and name) finishes a creation that
/// died half-way; concurrent repeats serialize on the tenant row and agree on one shard.
pub async fn create(
    catalog: &mut Client,
    dbcfg: &DatabaseConfig,
    id: Uuid,
    name: &str,
) -> Result<Created, CreateError> {
    // Step 1.
    let tx = catalog.transaction().await?;
    let inserted = tx
        .query_opt(
            "WITH choice AS (
                 SELECT s.id FROM shards s
                  WHERE s.accepting AND s.state = 'active'
                  ORDER BY coalesce((SELECT c.live FROM shard_live_tenants c
                                      WHERE c.shard_id = s.id), 0)::float8
                           / s.weight, s.id
                  LIMIT 1 FOR SHARE OF s)
             INSERT INTO tenants (id, name, shard_id, state)
             SELECT $1, $2, choice.id, 'provisioning' FROM choice
             ON CONFLICT (id) DO NOTHING
             RETURNING shard_id",
            &[&id, &name],
        )
        .await?;
    let (shard_id, new) = match inserted {
        Some(row) => (row.get::<_, String>(0), true),
        None => {
            let row = tx
                .query_opt(
                    "SELECT name, shard_id, state FROM tenants WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?;
            let Some(row) = row else {
                // Not inserted and not there: no shard was eligible.
                return Err(CreateError::NoShard);
            };
            let (existing_name, shard_id, state): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            // A deleted company's id is refused as such, whatever name comes with it: "exists
            // with another name" would send the caller looking for a company that is gone.
            if state == "deleted" {
                return Err(CreateError::Deleted(id));
            }
            if existing_name != name {
                return Err(CreateError::NameConflict(id));
            }
            match state.as_str() {
                "provisioning" => {}
                _ => {
                    return Ok(Created::Existing {
                        shard_id,
                        activated: false,
                    });
                }
            }
            (shard_id, false)
        }
    };
    tx.commit().await?;

    // Step 2.
    let url: String = catalog
        .query_one(
            "SELECT database_url FROM shards WHERE id = $1",
            &[&shard_id],
        )
        .await?
        .get(0);
    let shard_err = |source: anyhow::Error| CreateError::Shard {
        shard: shard_id.clone(),
        source,
    };
    let shard = db::connect(&DatabaseUrl::new(url.clone()), dbcfg, "tenantry-provision")
        .await
        .map_err(shard_err)?;
    shard
        .execute(
            "INSERT INTO placements (company_id, state, epoch) VALUES ($1, 'owned', 1)
             ON CONFLICT (company_id) DO NOTHING",
            &[&id],
        )
        .await
        .map_err(|e| shard_err(e.into()))?;
    drop(shard);

    // Step 3, only while the shard's database is still the one step 2 wrote to: a move of it
    // (`shard apply` with a new `database_url`) committed since would leave the company active
    // with its placement in the old database alone. The map version's row is locked first, as
    // every change of the shard table locks it first (`catalog::upsert_shards`; the activation
    // below updates it anyway, and a lock on the shard's row before it would deadlock with an
    // apply): so a move either waits for this activation and then refuses (it compares the
    // shard's companies and their states before and after its check of the new database) or
    // commits first, and the company stays `provisioning` for a repeat to finish at the new URL.
    let tx = catalog.transaction().await?;
    let now: Option<String> = tx
        .query_one(
            "SELECT s.database_url FROM shard_map_version v
               LEFT JOIN shards s ON s.id = $1
                FOR UPDATE OF v",
            &[&shard_id],
        )
        .await?
        .get(0);
    if now.as_deref() != Some(url.as_str()) {
        return Err(shard_err(anyhow::anyhow!(
            "its database moved while the company was being created; repeat to create it there"
        )));
    }
    let activated = tx
        .query_opt(
            "UPDATE tenants SET state = 'active', version = version + 1, updated_at = now()
              WHERE id = $1 AND state = 'provisioning'
              RETURNING shard_id, state, version",
            &[&id],
        )
        .await?;
    let activated = match activated {
        None => false,
        Some(row) => {
            let placement = Placement {
                shard_id: row.get(0),
                state: row.get(1),
                version: row.get(2),
            };
            publish_change(&tx, id, &placement).await?;
            true
        }
    };
    tx.commit().await?;
    tracing::info!(company.id = %id, shard.id = %shard_id, new, "company created");
    Ok(if new {
        Created::New { shard_id }
    } else {
        Created::Existing {
            shard_id,
            activated,
        }
    })
}
