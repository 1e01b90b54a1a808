//! The parts of `make bench-gateway` that wrk cannot measure (see scripts/bench-gateway.sh,
//! which sets the cluster up and runs this):
//!
//! ```text
//! gateway_bench invalidation CATALOG_URL COMPANY GATEWAY_URL... [--changes N]
//! gateway_bench memory CATALOG_URL GATEWAY_URL GATEWAY_PID [--tenants N] [--touch N]
//! ```
//!
//! `invalidation`: N times, move COMPANY to the other shard in the catalog (one transaction with
//! its outbox row, as a tenant move's flip does) and, from the moment the commit is
//! acknowledged, ask every gateway (a GET every 1 ms) which shard it routes the company to (the
//! `x-tenantry-shard` response header) until it names the new one. Both shards own the company,
//! so a stale route is answered, not corrected by a 421: this measures the RabbitMQ path only.
//! Prints p50/p99/max per gateway and over all.
//!
//! `memory`: inserts N tenants into the catalog, then touches the first T of them through the
//! gateway (GET, 32 at a time, each with its own token), printing the gateway's RSS before and
//! at checkpoints; with `gateway.cache_capacity` below T, RSS stays flat once the cache is full.
//!
//! Output lines are `name: value unit`. Tokens are signed with `BENCH_JWT_SECRET`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tenantry_core::auth::{Claims, Role, mint_hs256};
use tenantry_shardmap::tenants;
use uuid::Uuid;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    actix_rt::System::new().block_on(async move {
        match args.first().map(String::as_str) {
            Some("invalidation") => invalidation(&args[1..]).await,
            Some("memory") => memory(&args[1..]).await,
            _ => bail!("usage: gateway_bench invalidation|memory …  (see the source header)"),
        }
    })
}

fn flag(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} must be a number")),
        None => Ok(default),
    }
}

fn positional(args: &[String]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a.starts_with("--") {
            skip = true;
        } else {
            out.push(a.as_str());
        }
    }
    out
}

async fn catalog(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the catalog")?;
    actix_rt::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn token(companies: &[Uuid]) -> anyhow::Result<String> {
    let secret = std::env::var("BENCH_JWT_SECRET").context("BENCH_JWT_SECRET is not set")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    mint_hs256(
        secret.as_bytes(),
        &Claims {
            sub: "bench".into(),
            exp: now + 3600,
            iat: now,
            companies: companies.iter().map(|c| (*c, Role::Viewer)).collect(),
            scope: String::new(),
        },
    )
}

fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

async fn invalidation(args: &[String]) -> anyhow::Result<()> {
    let changes = flag(args, "--changes", 1000)?;
    let pos = positional(args);
    let [url, company, gateways @ ..] = pos.as_slice() else {
        bail!("usage: gateway_bench invalidation CATALOG_URL COMPANY GATEWAY_URL...");
    };
    if gateways.is_empty() {
        bail!("name at least one gateway");
    }
    let company: Uuid = company.parse().context("COMPANY must be a UUID")?;
    let mut db = catalog(url).await?;
    let auth = token(&[company])?;
    let http = client();
    let probe = |gw: &str| {
        let req = http
            .get(format!("{gw}/v1/companies/{company}/jobs/{}", Uuid::nil()))
            .bearer_auth(&auth);
        async move {
            let res = req.send().await.ok()?;
            res.headers()
                .get("x-tenantry-shard")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }
    };
    let mut current = tenants::lookup(&db, company)
        .await?
        .context("COMPANY is not in the catalog")?
        .shard_id;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); gateways.len()];
    for i in 0..changes {
        let target = if current == "shard-1" {
            "shard-2"
        } else {
            "shard-1"
        };
        // Every gateway routes by the current placement before the change.
        for gw in gateways.iter() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while probe(gw).await.as_deref() != Some(current.as_str()) {
                if Instant::now() > deadline {
                    bail!("{gw} does not route {company} to {current} (change {i})");
                }
                actix_rt::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tenants::set_placement(&mut db, company, target, "active").await?;
        let committed = Instant::now();
        let waits = gateways.iter().map(|gw| {
            let probe = &probe;
            async move {
                loop {
                    if probe(gw).await.as_deref() == Some(target) {
                        return Some(committed.elapsed().as_secs_f64() * 1000.0);
                    }
                    if committed.elapsed() > Duration::from_secs(10) {
                        return None;
                    }
                    actix_rt::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        for (g, ms) in futures_util::future::join_all(waits)
            .await
            .into_iter()
            .enumerate()
        {
            samples[g].push(ms.with_context(|| {
                format!("{} never routed by change {i} within 10 s", gateways[g])
            })?);
        }
        current = target.to_owned();
    }
    let mut all = Vec::new();
    for (g, s) in samples.iter_mut().enumerate() {
        s.sort_by(f64::total_cmp);
        println!(
            "invalidation_gw{}_p50: {:.2} ms",
            g + 1,
            percentile(s, 50.0)
        );
        println!(
            "invalidation_gw{}_p99: {:.2} ms",
            g + 1,
            percentile(s, 99.0)
        );
        all.extend_from_slice(s);
    }
    all.sort_by(f64::total_cmp);
    println!("invalidation_changes: {changes} n");
    println!("invalidation_p50: {:.2} ms", percentile(&all, 50.0));
    println!("invalidation_p99: {:.2} ms", percentile(&all, 99.0));
    println!(
        "invalidation_max: {:.2} ms",
        all.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

async fn memory(args: &[String]) -> anyhow::Result<()> {
    let tenants_n = flag(args, "--tenants", 1_000_000)?;
    let touch = flag(args, "--touch", 100_000)?;
    let pos = positional(args);
    let [url, gw, pid] = pos.as_slice() else {
        bail!("usage: gateway_bench memory CATALOG_URL GATEWAY_URL GATEWAY_PID");
    };
    let pid: u32 = pid.parse().context("GATEWAY_PID must be a number")?;
    let db = catalog(url).await?;
    let started = Instant::now();
    db.execute(
        "INSERT INTO tenants (id, name, shard_id, state)
         SELECT gen_random_uuid(), 'bench ' || i, 'shard-' || (1 + i % 2), 'active'
           FROM generate_series(1, $1::bigint) AS i",
        &[&(tenants_n as i64)],
    )
    .await?;
    eprintln!(
        "gateway_bench: inserted {tenants_n} tenants in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ids: Vec<Uuid> = db
        .query(
            "SELECT id FROM tenants WHERE name LIKE 'bench %' LIMIT $1",
            &[&(touch as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!("memory_catalog_tenants: {tenants_n} n");
    println!(
        "memory_rss_before: {:.1} MiB",
        rss_kib(pid)? as f64 / 1024.0
    );
    let http = client();
    let checkpoints = [touch / 10, touch / 5, touch / 2, touch];
    let started = Instant::now();
    let mut done = 0usize;
    let mut failures = 0usize;
    for chunk in ids.chunks(touch.div_ceil(10).max(1)) {
        let mut requests = futures_util::stream::iter(chunk.iter().map(|id| {
            let req = token(&[*id]).map(|t| {
                http.get(format!("{gw}/v1/companies/{id}/ping"))
                    .bearer_auth(t)
            });
            async move {
                match req {
                    Ok(r) => r.send().await.map(|r| r.status().as_u16()).unwrap_or(0),
                    Err(_) => 0,
                }
            }
        }))
        .buffer_unordered(32);
        while let Some(status) = requests.next().await {
            // The shard has no such route: 404 means the gateway routed it there.
            if status != 404 {
                failures += 1;
            }
            done += 1;
        }
        if checkpoints.contains(&done) || done == ids.len() {
            println!(
                "memory_rss_after_{done}: {:.1} MiB",
                rss_kib(pid)? as f64 / 1024.0
            );
        }
    }
    println!(
        "memory_touch_rate: {:.0} req/s",
        done as f64 / started.elapsed().as_secs_f64()
    );
    println!("memory_touch_unrouted: {failures} n");
    Ok(())
}
