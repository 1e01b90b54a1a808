//! Reading and writing the shard map in the catalog database.

use serde::Serialize;
use serde_json::json;
use tokio_postgres::{Client, GenericClient};

use crate::file::{ShardSpec, ShardState};

/// A shard as the catalog knows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShardRow {
    pub id: String,
    /// Redacted when serialized.
    pub database_url: tenantry_core::secret::DatabaseUrl,
    pub state: String,
    pub accepting: bool,
    pub weight: i32,
    pub version: i64,
    pub endpoints: Vec<String>,
    pub tenants: i64,
}

/// The columns of a [`ShardRow`] but its tenant count, from shards `s`.
macro_rules! shard_columns {
    () => {
        "s.id, s.database_url, s.state, s.accepting, s.weight, s.version,
         coalesce((SELECT array_agg(e.url ORDER BY e.url COLLATE \"C\") FROM shard_endpoints e
                   WHERE e.shard_id = s.id), '{}') AS endpoints"
    };
}

/// All shards with their endpoints (in byte order, as `apply` sorts a file's: the catalog's own
/// collation may be a linguistic one) and tenant counts, by id.
pub async fn list_shards(
    client: &impl GenericClient,
) -> Result<Vec<ShardRow>, tokio_postgres::Error> {
    shards(
        client,
        concat!(
            "SELECT ",
            shard_columns!(),
            ",
                (SELECT count(*) FROM tenants t
                  WHERE t.shard_id = s.id AND t.state <> 'deleted') AS tenants
               FROM shards s ORDER BY s.id"
        ),
    )
    .await
}

/// The companies a shard holds (not deleted), as the check of a moved database saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Companies {
    pub count: i64,
    /// md5 of the ids and states in order: another set of companies of the same size differs,
    /// and so does a company activated meanwhile (its placement may be in the old database).
    pub fingerprint: String,
}

const COMPANIES_SQL: &str = "SELECT shard_id, count(*),
                                    md5(string_agg(id::text || ' ' || state, ',' ORDER BY id))
                               FROM tenants
                              WHERE state <> 'deleted' AND ($1::text[] IS NULL OR shard_id = ANY($1))
                              GROUP BY shard_id";

/// Each shard's [`Companies`] (`only`: these shards; `None`: all); a shard without companies
/// has no entry.
pub async fn companies_by_shard(
    client: &impl GenericClient,
    only: Option<&[&str]>,
) -> Result<std::collections::HashMap<String, Companies>, tokio_postgres::Error> {
    let only: Option<Vec<&str>> = only.map(<[&str]>::to_vec);
    Ok(client
        .query(COMPANIES_SQL, &[&only])
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                Companies {
                    count: r.get(1),
                    fingerprint: r.get(2),
                },
            )
        })
        .collect())
}

/// [`list_shards`] without the tenant counts (`tenants` is 0), which cost a walk of every
/// tenant: what routing reads, at startup and on every change of the shard map.
pub async fn list_shards_uncounted(
    client: &impl GenericClient,
) -> Result<Vec<ShardRow>, tokio_postgres::Error> {
    shards(
        client,
        concat!(
            "SELECT ",
            shard_columns!(),
            ", 0::int8 AS tenants FROM shards s ORDER BY s.id"
        ),
    )
    .await
}

async fn shards(
    client: &impl GenericClient,
    sql: &str,
) -> Result<Vec<ShardRow>, tokio_postgres::Error> {
    let rows = client.query(sql, &[]).await?;
    Ok(rows
        .into_iter()
        .map(|r| ShardRow {
            id: r.get(0),
            database_url: tenantry_core::secret::DatabaseUrl::new(r.get::<_, String>(1)),
            state: r.get(2),
            accepting: r.get(3),
            weight: r.get(4),
            version: r.get(5),
            endpoints: r.get(6),
            tenants: r.get(7),
        })
        .collect())
}

/// The shard map's current version.
pub async fn map_version(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT version FROM shard_map_version", &[])
        .await?
        .get(0))
}

/// What applying one declared shard did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Created,
    Updated { fields: Vec<String> },
    Unchanged,
}

/// Why [`upsert_shards`] changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum UpsertError {
    /// The catalog serves another environment (recorded by another apply meanwhile).
    #[error("the catalog serves environment {0:?}")]
    OtherEnvironment(String),
    /// Shards the map retires that still hold companies (provisioning or active), with how
    /// many each.
    #[error("shards to retire still hold companies: {}", held(.0))]
    RetiringWithCompanies(Vec<(String, i64)>),
    /// Shards whose `database_url` the map changes and whose companies changed in number since
    /// the apply checked their new database (id, companies then, companies now).
    #[error("{}", moved_meanwhile(.0))]
    CompaniesChangedWhileMoving(Vec<(String, i64, i64)>),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

fn moved_meanwhile(shards: &[(String, i64, i64)]) -> String {
    let each: Vec<String> = shards
        .iter()
        .map(|(id, then, now)| format!("{id} ({then} companies when checked, {now} now)"))
        .collect();
    format!(
        "companies were created on or removed from shards whose database_url changes while \
         this apply ran: {}",
        each.join(", ")
    )
}

fn held(shards: &[(String, i64)]) -> String {
    shards
        .iter()
        .map(|(id, n)| format!("{id} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Upserts declared shards in one transaction. Each created or changed shard bumps its own
/// version and the map version and leaves an outbox row, all committed together, so the
/// catalog and what gateways will hear about it cannot disagree. Shards in the catalog but not
/// in `specs` are returned, untouched: removing a shard is a drain, never a side effect.
/// With `environment`, the same transaction records it as the catalog's (on its first apply)
/// or finds it already recorded, and changes nothing when another one is.
pub async fn upsert_shards(
    client: &mut Client,
    specs: &[ShardSpec],
    environment: Option<&str>,
    checked: &std::collections::HashMap<String, Companies>,
) -> Result<(Vec<(String, Change)>, Vec<String>, i64), UpsertError> {
    let tx = client.transaction().await?;
    // Serializes concurrent appliers: the second waits here, then sees the first's result and
    // finds nothing to change.
    let mut version: i64 = tx
        .query_one("SELECT version FROM shard_map_version FOR UPDATE", &[])
        .await?
        .get(0);
    if let Some(environment) = environment {
        tx.execute(
            "INSERT INTO catalog_environment (environment) VALUES ($1)
             ON CONFLICT (singleton) DO NOTHING",
            &[&environment],
        )
        .await?;
        let recorded: String = tx
            .query_one("SELECT environment FROM catalog_environment", &[])
            .await?
            .get(0);
        if recorded != environment {
            return Err(UpsertError::OtherEnvironment(recorded));
        }
    }
    // A shard is retired only once it holds no company: `migrate up` leaves retired shards
    // out, and a company left on one would be served from a schema that falls behind. The
    // shard rows are locked before the count, so a creation choosing one of them (which takes
    // its row `FOR SHARE`) has either committed and is counted, or waits and then finds it
    // retired.
    let retiring: Vec<&str> = specs
        .iter()
        .filter(|s| s.state == ShardState::Retired)
        .map(|s| s.id.as_str())
        .collect();
    if !retiring.is_empty() {
        tx.execute(
            "SELECT 1 FROM shards WHERE id = ANY($1) AND state <> 'retired' FOR UPDATE",
            &[&retiring],
        )
        .await?;
    }
    // Read after the lock, so its counts are the ones the retirement is judged by.
    let existing = list_shards(&tx).await?;
    let held: Vec<(String, i64)> = existing
        .iter()
        .filter(|s| retiring.contains(&s.id.as_str()) && s.state != "retired" && s.tenants > 0)
        .map(|s| (s.id.clone(), s.tenants))
        .collect();
    if !held.is_empty() {
        return Err(UpsertError::RetiringWithCompanies(held));
    }
    // A shard whose database moves keeps its companies only if the new database holds them
    // (the apply checked that, for the companies it saw, in `checked`). A company created
    // meanwhile has its placement in the old database alone, so the move is refused unless
    // the shard has the very same companies (not only as many); its row is locked first, as
    // for a retirement.
    let moving: Vec<&str> = specs
        .iter()
        .filter(|spec| {
            existing
                .iter()
                .any(|cur| cur.id == spec.id && cur.database_url != spec.database_url)
        })
        .map(|spec| spec.id.as_str())
        .collect();
    if !moving.is_empty() {
        tx.execute(
            "SELECT 1 FROM shards WHERE id = ANY($1) FOR UPDATE",
            &[&moving],
        )
        .await?;
        let now = companies_by_shard(&tx, Some(&moving)).await?;
        let mut changed = Vec::new();
        for id in &moving {
            let (then, now) = (checked.get(*id), now.get(*id));
            if then != now {
                let count = |c: Option<&Companies>| c.map_or(0, |c| c.count);
                changed.push((id.to_string(), count(then), count(now)));
            }
        }
        if !changed.is_empty() {
            return Err(UpsertError::CompaniesChangedWhileMoving(changed));
        }
    }
    let mut changes = Vec::new();
    for spec in specs {
        // As the gateway reads them: `http://a/` and `http://a` are one endpoint.
        let mut endpoints: Vec<String> = spec
            .endpoints
            .iter()
            .map(|e| e.trim_end_matches('/').to_owned())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        let change = match existing.iter().find(|s| s.id == spec.id) {
            None => Change::Created,
            Some(cur) => {
                let mut fields = Vec::new();
                if cur.database_url != spec.database_url {
                    fields.push("database_url".to_owned());
                }
                if cur.state != spec.state.as_str() {
                    fields.push("state".into());
                }
                if cur.accepting != spec.accepting {
                    fields.push("accepting".into());
                }
                if cur.weight != spec.weight {
                    fields.push("weight".into());
                }
                if cur.endpoints != endpoints {
                    fields.push("endpoints".into());
                }
                if fields.is_empty() {
                    Change::Unchanged
                } else {
                    Change::Updated { fields }
                }
            }
        };
        if change != Change::Unchanged {
            version += 1;
            let shard_version: i64 = tx
                .query_one(
                    "INSERT INTO shards (id, database_url, state, accepting, weight)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (id) DO UPDATE SET
                        database_url = excluded.database_url, state = excluded.state,
                        accepting = excluded.accepting, weight = excluded.weight,
                        version = shards.version + 1, updated_at = now()
                     RETURNING version",
                    &[
                        &spec.id,
                        &spec.database_url.expose(),
                        &spec.state.as_str(),
                        &spec.accepting,
                        &spec.weight,
                    ],
                )
                .await?
                .get(0);
            tx.execute(
                "DELETE FROM shard_endpoints WHERE shard_id = $1",
                &[&spec.id],
            )
            .await?;
            for url in &endpoints {
                tx.execute(
                    "INSERT INTO shard_endpoints (shard_id, url) VALUES ($1, $2)",
                    &[&spec.id, url],
                )
                .await?;
            }
            let payload = json!({
                "type": "shard.changed",
                "shard_id": spec.id,
                "shard_version": shard_version,
                "map_version": version,
            });
            tx.execute(
                "INSERT INTO outbox (topic, payload) VALUES ('shardmap', $1)",
                &[&payload],
            )
            .await?;
        }
        changes.push((spec.id.clone(), change));
    }
    tx.execute("UPDATE shard_map_version SET version = $1", &[&version])
        .await?;
    tx.commit().await?;
    let undeclared = existing
        .into_iter()
        .filter(|s| !specs.iter().any(|d| d.id == s.id))
        .map(|s| s.id)
        .collect();
    Ok((changes, undeclared, version))
}

/// The catalog's outbox relay: publishes every shard-map change, in order, to the fan-out
/// `exchange`. Several gateways each run one; `FOR UPDATE` (not SKIP LOCKED) makes a second
/// relay wait for the first and then skip what it published, so the order holds (unless
/// RabbitMQ refuses a message, whose row then waits while later ones go out), and a crash
/// between publish and commit only repeats messages: they carry versions, and gateways go by
/// those, not by the order.
pub fn relay(
    pool: deadpool_postgres::Pool,
    amqp_url: String,
    exchange: String,
    wake: std::sync::Arc<tokio::sync::Notify>,
) -> tenantry_core::relay::Relay {
    tenantry_core::relay::Relay {
        name: "shard-map relay",
        pool,
        amqp_url,
        exchange,
        kind: lapin::ExchangeKind::Fanout,
        select: "SELECT id, payload FROM outbox
                  WHERE published_at IS NULL AND id <> ALL($2::int8[])
                  ORDER BY id LIMIT $1 FOR UPDATE",
        messages: |row| {
            let payload: serde_json::Value = row.try_get(1)?;
            Ok(vec![tenantry_core::relay::Message {
                routing_key: String::new(),
                body: serde_json::to_vec(&payload)?,
            }])
        },
        wake,
        poll: std::time::Duration::from_secs(1),
        // One message per row: a refused row itself waits.
        requeue: None,
        spent: None,
        // Published changes are kept a day (for operators), then deleted 1000 at a time.
        prune: Some(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox
                  WHERE published_at < now() - interval '1 day'
                  ORDER BY id LIMIT 1000)",
        ),
    }
}

/// The channel the catalog notifies on when outbox rows commit (migration 0002).
pub const OUTBOX_CHANNEL: &str = "tenantry_shardmap_outbox";
