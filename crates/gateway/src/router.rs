//! Company → shard routing: the shard table (endpoints, health, in-flight caps) and the
//! per-company cache in front of the catalog.
//!
//! The cache is bounded (`gateway.cache_capacity`, least recently used evicted) and loaded
//! lazily: a company costs memory only in gateways that served it recently. Reads are
//! lock-free (moka); concurrent misses for one company share one catalog query. Unknown
//! companies, and those provisioning or deleted, are remembered for `gateway.negative_ttl` in a
//! smaller cache of their own.
//!
//! Freshness: shard-map messages update or evict entries whose version is older
//! ([`Router::apply`]); on every (re)connection to RabbitMQ the whole cache is dropped, since
//! messages may have been missed, and so it is when a message's map version shows that some
//! before it were (the gateway's queue drops its oldest past 100,000); while disconnected, the
//! catalog's map version is read every `gateway.disconnected_ttl`, and the cache dropped when
//! it changed. None of this is needed for correctness — the shards fence every request — it
//! keeps 421s rare.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use actix_web::http::{
    Uri,
    uri::{Authority, PathAndQuery, Scheme},
};
use arc_swap::ArcSwap;
use deadpool_postgres::Pool;
use moka::{
    future::Cache,
    notification::RemovalCause,
    ops::compute::{CompResult, Op},
};
use tenantry_core::{
    ApiError,
    config::{DatabaseConfig, GatewayConfig},
};
use tenantry_shardmap::{
    catalog,
    tenants::{self, Placement, TenantChanged},
};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::metrics;

/// One base URL of a shard's API pool.
pub struct Endpoint {
    pub base: String,
    /// Scheme and authority, parsed once, when the base has no path of its own.
    origin: Option<(Scheme, Authority)>,
    healthy: AtomicBool,
}

impl Endpoint {
    fn new(url: &str) -> Self {
        let base = url.trim_end_matches('/').to_owned();
        let origin = base.parse::<Uri>().ok().and_then(|u| {
            let bare = u.path_and_query().is_none_or(|p| p.as_str() == "/");
            let parts = u.into_parts();
            match (bare, parts.scheme, parts.authority) {
                (true, Some(s), Some(a)) => Some((s, a)),
                _ => None,
            }
        });
        Self {
            base,
            origin,
            healthy: AtomicBool::new(true),
        }
    }

    /// The upstream URI for `path_and_query` at this endpoint.
    pub fn uri(&self, path_and_query: &PathAndQuery) -> Result<Uri, String> {
        match &self.origin {
            Some((scheme, authority)) => Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query(path_and_query.clone())
                .build()
                .map_err(|e| e.to_string()),
            None => format!("{}{path_and_query}", self.base)
                .parse()
                .map_err(|e: actix_web::http::uri::InvalidUri| e.to_string()),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The endpoint passed its health check.
    pub fn mark_up(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(endpoint = %self.base, "shard endpoint healthy again");
        }
    }

    /// The endpoint failed (`what`, for `cause`): said as a warning when it goes down, and
    /// only at debug while it stays down, since a shard whose endpoints are all down would
    /// otherwise cost a warning per endpoint per request (each tries them all) and per check.
    pub fn mark_down(&self, what: &str, cause: &dyn std::fmt::Display) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(endpoint = %self.base, error = %cause, "{what}; marked down");
        } else {
            tracing::debug!(endpoint = %self.base, error = %cause, "{what}; still down");
        }
    }
}

/// A shard's API pool as the gateway sees it.
pub struct ShardPool {
    pub id: String,
    pub version: i64,
    pub endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    /// Requests in flight to this shard (`gateway.max_in_flight_per_shard`).
    pub in_flight: Arc<Semaphore>,
}

impl ShardPool {
    /// Endpoints to try, in order: healthy ones round-robin, then the unhealthy ones as a
    /// last resort (a health check may lag behind a recovery).
    pub fn candidates(&self) -> Vec<Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let rotated = (0..n).map(|i| self.endpoints[(start + i) % n].clone());
        let (mut healthy, sick): (Vec<_>, Vec<_>) = rotated.partition(|e| e.healthy());
        healthy.extend(sick);
        healthy
    }
}

/// A company's route, as cached.
#[derive(Clone)]
struct Route {
    placement: Placement,
}

impl Route {
    /// A route for `placement`, if it is one: only routable placements are cached as routes.
    /// A provisioning or deleted company is remembered as unknown instead, for
    /// `gateway.negative_ttl`: a placement loaded while its activation message went by (a
    /// message for an uncached company changes nothing) would otherwise answer 404 for as long
    /// as it stayed cached.
    fn fresh(placement: Placement) -> Option<Route> {
        placement.routable().then_some(Route { placement })
    }
}

/// The answer to "where does this company live".
pub struct Resolved {
    pub placement: Placement,
    pub pool: Arc<ShardPool>,
}

pub struct Router {
    catalog: Pool,
    routes: Cache<Uuid, Route>,
    unknown: Cache<Uuid, ()>,
    shards: ArcSwap<HashMap<String, Arc<ShardPool>>>,
    /// Held while the shard table is read and stored, so a read taken earlier can never be
    /// stored over a later one (the bus, a request meeting an unknown shard and the startup
    /// load all re-read it).
    reloading: tokio::sync::Mutex<()>,
    /// Shard-table reads started so far, and whether the last one failed: a request that
    /// waited its turn behind a read that started after it arrived does not read the table
    /// again.
    reads_started: AtomicU64,
    last_reload_failed: AtomicBool,
    /// The newest placement each company's messages carried lately (see [`Router::load`] and
    /// [`heard_for`]).
    heard: Cache<Uuid, Placement>,
    /// Whether the shard table has been read from the catalog at least once.
    shards_loaded: AtomicBool,
    connected: AtomicBool,
    /// The catalog's shard-map version the cache is known to be current with: read when the
    /// subscription starts (after the flush) and while disconnected, raised by each message;
    /// 0 when not known.
    map_version: AtomicI64,
    disconnected_ttl: Duration,
    max_in_flight: usize,
}

impl Router {
    /// `heard_for`: see [`heard_for`].
    pub fn new(catalog: Pool, cfg: &GatewayConfig, heard_for: Duration) -> Self {
        let routes = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .eviction_listener(|_, _, cause| {
                if cause == RemovalCause::Size {
                    metrics::CACHE.with_label_values(&["eviction"]).inc();
                }
            })
            .build();
        // Least recently heard evicted first: the default policy admits a new key only if it is
        // used more often than the one it would evict, and a placement is heard once.
        let heard = Cache::builder()
            .max_capacity(HEARD_CAPACITY)
            .time_to_live(heard_for)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        // Not subscribed until the first connection is: an alert on 0 also covers a first
        // connection that never comes.
        metrics::BUS_CONNECTED.set(0);
        let unknown = Cache::builder()
            .max_capacity((cfg.cache_capacity / 10).max(1000))
            .time_to_live(cfg.negative_ttl)
            .build();
        Self {
            catalog,
            routes,
            unknown,
            shards: ArcSwap::from_pointee(HashMap::new()),
            reloading: tokio::sync::Mutex::new(()),
            reads_started: AtomicU64::new(0),
            heard,
            last_reload_failed: AtomicBool::new(false),
            shards_loaded: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            map_version: AtomicI64::new(0),
            disconnected_ttl: cfg.disconnected_ttl,
            max_in_flight: cfg.max_in_flight_per_shard,
        }
    }

    pub fn catalog(&self) -> &Pool {
        &self.catalog
    }

    /// Where `company` lives: from the cache, else the catalog. Unknown, provisioning and
    /// deleted companies are 404.
    pub async fn resolve(&self, company: Uuid) -> Result<Resolved, ApiError> {
        if let Some(route) = self.routes.get(&company).await {
            metrics::CACHE.with_label_values(&["hit"]).inc();
            return self.pool_for(company, route.placement).await;
        }
        if self.unknown.contains_key(&company) {
            metrics::CACHE.with_label_values(&["negative_hit"]).inc();
            return Err(unknown_company());
        }
        metrics::CACHE.with_label_values(&["miss"]).inc();
        let placement = self.load(company).await?;
        self.pool_for(company, placement).await
    }

    /// Drops `company`'s cached route: the next request reads it from the catalog.
    pub async fn forget(&self, company: Uuid) {
        self.routes.invalidate(&company).await;
    }

    /// Reads `company` from the catalog, bypassing (and refreshing) the cache: after a 421.
    pub async fn reload(&self, company: Uuid) -> Result<Resolved, ApiError> {
        self.routes.invalidate(&company).await;
        let placement = self.load(company).await?;
        self.pool_for(company, placement).await
    }

    /// One catalog query per company however many requests miss at once.
    ///
    /// A `tenant.changed` message that arrives while the query is under way finds nothing
    /// cached to update ([`Router::apply`] leaves absent entries absent). So every message's
    /// placement is also kept a while in `heard` (see [`heard_for`]: longer than a load can
    /// take), and a load goes by the newer of what it read and what was heard: once before
    /// storing its route, and once after, for a message heard in between (which `apply`
    /// records before it looks at the cache, so one of the two sees it).
    async fn load(&self, company: Uuid) -> Result<Placement, ApiError> {
        let (catalog, heard) = (&self.catalog, &self.heard);
        let loaded = self
            .routes
            .try_get_with(company, async move {
                let client = catalog.get().await.map_err(ApiError::from)?;
                let read = tenants::lookup(&**client, company).await?;
                newer(read, heard.get(&company).await)
                    .and_then(Route::fresh)
                    .ok_or_else(unknown_company)
            })
            .await;
        let (answer, stored) = match loaded {
            Ok(route) => (Ok(route.placement.clone()), route.placement.version),
            Err(e) if e.code() == "not_found" => {
                self.unknown.insert(company, ()).await;
                (Err(unknown_company()), 0)
            }
            Err(e) => return Err(shared_error(&e)),
        };
        match self.heard.get(&company).await {
            // A routable placement heard after a read that found none (or an unroutable one):
            // forget the company was unknown, so the next request reads it again.
            Some(h) if h.version > stored && (stored > 0 || h.routable()) => {
                self.apply_placement(company, h.clone()).await;
                match stored > 0 && h.routable() {
                    true => Ok(h),
                    false => Err(unknown_company()),
                }
            }
            _ => answer,
        }
    }

    async fn pool_for(&self, company: Uuid, placement: Placement) -> Result<Resolved, ApiError> {
        if !placement.routable() {
            return Err(unknown_company());
        }
        if let Some(pool) = self.shards.load().get(&placement.shard_id).cloned() {
            return Ok(Resolved { placement, pool });
        }
        // A shard this gateway has not heard of yet: re-read the shard table once, unless a
        // reload that brought it finished while this request waited for its turn (requests
        // for a new shard, or all those arriving before the first load, would each read the
        // table again in turn).
        self.reload_shards_for(Some(&placement.shard_id))
            .await
            .map_err(|e| {
                ApiError::unavailable(
                    "catalog_unavailable",
                    "the shard map could not be read; try again shortly",
                    Duration::from_secs(1),
                )
                .with_source(e)
            })?;
        match self.shards.load().get(&placement.shard_id).cloned() {
            Some(pool) => Ok(Resolved { placement, pool }),
            None => Err(ApiError::unavailable(
                "shard_unavailable",
                format!("company {company}'s shard is not in the shard map"),
                Duration::from_secs(1),
            )),
        }
    }

    /// Re-reads shards and endpoints from the catalog. A shard whose version did not change
    /// keeps its pool object: its health state and in-flight count carry over.
    pub async fn reload_shards(&self) -> anyhow::Result<()> {
        self.reload_shards_for(None).await
    }

    /// [`Router::reload_shards`], skipped if shard `wanted` is in the table by the time this
    /// call's turn comes, or if a read of the table started after this call did and so
    /// finished while it waited (that read's outcome is this call's): requests for a shard the
    /// catalog does not know, or arriving while the catalog is slow to fail, would otherwise
    /// each read it in turn, each waiting as long. A call without `wanted` (a `shard.changed`
    /// message) always reads it.
    async fn reload_shards_for(&self, wanted: Option<&str>) -> anyhow::Result<()> {
        let arrived = self.reads_started.load(Ordering::Acquire);
        let _one_at_a_time = self.reloading.lock().await;
        if wanted.is_some_and(|id| self.has_shard(id)) {
            return Ok(());
        }
        if wanted.is_some() && self.reads_started.load(Ordering::Acquire) != arrived {
            return match self.last_reload_failed.load(Ordering::Acquire) {
                true => Err(anyhow::anyhow!("the shard table could not be read")),
                false => Ok(()),
            };
        }
        self.reads_started.fetch_add(1, Ordering::AcqRel);
        // Failed until it is known to have worked: a read dropped half way (the request that
        // made it gave up at `gateway.upstream_timeout`) must not leave the calls that waited
        // for it a success it never had.
        self.last_reload_failed.store(true, Ordering::Release);
        let read = self.read_shards().await;
        self.last_reload_failed
            .store(read.is_err(), Ordering::Release);
        read
    }

    /// Reads the shard table and stores it (under `reloading`).
    async fn read_shards(&self) -> anyhow::Result<()> {
        let client = self.catalog.get().await?;
        let rows = catalog::list_shards_uncounted(&**client).await?;
        let current = self.shards.load();
        let mut next = HashMap::with_capacity(rows.len());
        for row in rows {
            let pool = match current.get(&row.id) {
                Some(p) if p.version == row.version => p.clone(),
                _ => Arc::new(ShardPool {
                    endpoints: row
                        .endpoints
                        .iter()
                        .map(|url| {
                            let old = current
                                .get(&row.id)
                                .and_then(|p| p.endpoints.iter().find(|e| &e.base == url).cloned());
                            old.unwrap_or_else(|| Arc::new(Endpoint::new(url)))
                        })
                        .collect(),
                    id: row.id.clone(),
                    version: row.version,
                    next: AtomicUsize::new(0),
                    in_flight: current
                        .get(&row.id)
                        .map(|p| p.in_flight.clone())
                        .unwrap_or_else(|| Arc::new(Semaphore::new(self.max_in_flight))),
                }),
            };
            next.insert(row.id, pool);
        }
        self.shards.store(Arc::new(next));
        self.shards_loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the shard table has been read at least once (see `ShardTableProbe`).
    pub fn shards_loaded(&self) -> bool {
        self.shards_loaded.load(Ordering::Acquire)
    }

    /// Whether `shard` is in the shard table.
    pub fn has_shard(&self, shard: &str) -> bool {
        self.shards.load().contains_key(shard)
    }

    /// Every endpoint of every shard, for the health checker.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.shards
            .load()
            .values()
            .flat_map(|p| p.endpoints.iter().cloned())
            .collect()
    }

    /// A placement-change message: a newer version replaces the cached entry, or removes it
    /// when the company is no longer routable; absent entries stay absent (they will be loaded
    /// fresh when needed).
    pub async fn apply(&self, msg: TenantChanged) {
        let company = msg.company_id;
        // First, for a load under way (see `load`): the newest placement heard.
        let version = msg.placement.version;
        let heard = msg.placement.clone();
        self.heard
            .entry(company)
            .and_compute_with(|cur| async move {
                match cur {
                    Some(e) if e.value().version >= version => Op::Nop,
                    _ => Op::Put(heard),
                }
            })
            .await;
        self.apply_placement(company, msg.placement).await;
    }

    /// [`Router::apply`]'s change to the cache.
    async fn apply_placement(&self, company: Uuid, placement: Placement) {
        self.unknown.invalidate(&company).await;
        let outcome = self
            .routes
            .entry(company)
            .and_compute_with(|cur| async move {
                match cur {
                    Some(e) if e.value().placement.version < placement.version => {
                        Route::fresh(placement).map_or(Op::Remove, Op::Put)
                    }
                    _ => Op::Nop,
                }
            })
            .await;
        if matches!(
            outcome,
            CompResult::ReplacedWith(_) | CompResult::Removed(_)
        ) {
            metrics::CACHE.with_label_values(&["update"]).inc();
        }
    }

    /// A company this gateway just created: forget that it was unknown.
    pub async fn forget_unknown(&self, company: Uuid) {
        self.unknown.invalidate(&company).await;
    }

    /// Drops every cached route and unknown company: each is read from the catalog again.
    pub fn flush(&self) {
        self.routes.invalidate_all();
        self.unknown.invalidate_all();
        metrics::CACHE.with_label_values(&["flush"]).inc();
    }

    /// Connected to RabbitMQ (again): anything cached may have missed messages. The map
    /// version is unknown until [`Router::known_version`] records the catalog's.
    pub fn on_connected(&self) {
        self.flush();
        self.map_version.store(0, Ordering::Release);
        self.connected.store(true, Ordering::Release);
        metrics::BUS_CONNECTED.set(1);
    }

    pub fn on_disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        metrics::BUS_CONNECTED.set(0);
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// How often the catalog's map version is read while RabbitMQ is unreachable (at least
    /// every 50 ms, also for a `gateway.disconnected_ttl` of 0).
    pub fn disconnected_poll(&self) -> Duration {
        self.disconnected_ttl.max(Duration::from_millis(50))
    }

    /// The catalog's current shard-map version.
    pub async fn catalog_version(&self) -> anyhow::Result<i64> {
        let client = self.catalog.get().await?;
        Ok(catalog::map_version(&**client).await?)
    }

    /// The map version the cache is known to be current with (0: not known).
    pub fn known_version(&self) -> i64 {
        self.map_version.load(Ordering::Acquire)
    }

    /// Records that the cache is current with the catalog's map version `version`.
    pub fn set_known_version(&self, version: i64) {
        self.map_version.fetch_max(version, Ordering::AcqRel);
    }

    /// A message of map version `version` was applied: whether messages between the last known
    /// version and it went missing (then the cache should be dropped). Versions go up by one
    /// per change, and the catalog's relay publishes them in order.
    pub fn heard_version(&self, version: i64) -> bool {
        let known = self.map_version.fetch_max(version, Ordering::AcqRel);
        known > 0 && version > known + 1
    }
}

/// How long a message's placement is kept for the loads under way when it came: longer than a
/// load can take (a pool wait and a connect, each within `database.connect_timeout`, and a
/// query within `database.statement_timeout`), and at least a minute; without a statement
/// timeout, as if it were an hour.
pub fn heard_for(db: &DatabaseConfig) -> Duration {
    let query = match db.statement_timeout.is_zero() {
        true => Duration::from_secs(3600),
        false => db.statement_timeout,
    };
    (db.connect_timeout * 2 + query + Duration::from_secs(10)).max(Duration::from_secs(60))
}

/// Placements heard kept at most: as many messages as a gateway's queue holds.
const HEARD_CAPACITY: u64 = crate::bus::MAX_QUEUED as u64;

/// The newer of a placement read from the catalog and one heard in a message. A company the
/// catalog does not hold stays unknown whatever was heard.
fn newer(read: Option<Placement>, heard: Option<Placement>) -> Option<Placement> {
    match (read, heard) {
        (Some(r), Some(h)) if h.version > r.version => Some(h),
        (read, _) => read,
    }
}

fn unknown_company() -> ApiError {
    ApiError::not_found("no such company")
}

/// `try_get_with` shares one error among all waiters; rebuild an owned one.
fn shared_error(e: &Arc<ApiError>) -> ApiError {
    tracing::warn!(error = ?e, "catalog lookup failed");
    if e.code() == "database_unavailable" {
        ApiError::unavailable(
            "catalog_unavailable",
            "the shard map could not be read; try again shortly",
            Duration::from_secs(1),
        )
    } else {
        ApiError::internal(anyhow::anyhow!("catalog lookup failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_heard_outlast_the_longest_load_the_database_settings_allow() {
        let db = |connect: u64, statement: u64| DatabaseConfig {
            connect_timeout: Duration::from_secs(connect),
            statement_timeout: Duration::from_secs(statement),
        };
        let secs = |d: Duration| d.as_secs();
        assert_eq!(secs(heard_for(&db(5, 30))), 60, "the defaults: a minute");
        assert_eq!(secs(heard_for(&db(5, 120))), 140);
        assert_eq!(secs(heard_for(&db(300, 30))), 640);
        assert_eq!(
            secs(heard_for(&db(5, 0))),
            3620,
            "no statement timeout: an hour"
        );
    }

    #[test]
    fn upstream_uris_keep_path_and_query_and_any_base_path() {
        let pq = PathAndQuery::from_static("/v1/companies/x/jobs?wait=1s&a=%20b");
        let bare = Endpoint::new("http://127.0.0.1:8101/");
        assert!(bare.origin.is_some());
        assert_eq!(
            bare.uri(&pq).unwrap().to_string(),
            "http://127.0.0.1:8101/v1/companies/x/jobs?wait=1s&a=%20b"
        );
        let prefixed = Endpoint::new("http://shard-1.internal:80/api");
        assert!(prefixed.origin.is_none());
        assert_eq!(
            prefixed.uri(&pq).unwrap().to_string(),
            "http://shard-1.internal:80/api/v1/companies/x/jobs?wait=1s&a=%20b"
        );
    }
}
