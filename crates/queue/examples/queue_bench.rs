//! `make bench-queue`: the queue's figures on one shard database, measured the way
//! `../shared/bench/peers/graphile-worker-bench.sh` measures graphile-worker, so the two can
//! stand side by side.
//!
//!   queue_bench ADMIN_DSN        (env: N=20000, C=10, BATCH=500, LAT_N=200, LAT_WARMUP=20,
//!                                 PHASES=tp,tpb,lat to run a subset)
//!
//! Each phase gets a fresh database (created from ADMIN_DSN, dropped at the end, also when a
//! phase fails):
//!  enqueue_bulk        N no-op jobs by one `enqueue_many` in one transaction; N / its time.
//!  throughput          C tasks, each looping over the worker's one-job step
//!                      (`Worker::try_claim_and_run_one`: claim 1, run, record 1 in its own
//!                      transaction) on a pool of C + 2 connections (as the peer's
//!                      maxPoolSize) — no batching.
//!                      Window = first handler start → last outcome committed.
//!  throughput_batched  the worker role (`Worker::run`) with BATCH slots, claims of up to BATCH
//!                      and completions batched up to BATCH. Same window.
//!  latency_p50/p99     idle worker (C slots, LISTEN/NOTIFY); LAT_N jobs enqueued one at a time
//!                      (own transaction, then the after-commit NOTIFY), each after a random
//!                      20-120 ms pause. Sample = handler start − enqueue commit acknowledged.
//! Every job also gets its job.finished event written to the outbox, as in production.

use std::{
    collections::HashMap,
    str::FromStr,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use rand::Rng;
use serde_json::{Value, json};
use tenantry_queue::{
    ClaimedJob, Handler, JobError, Listener, NewJob, Notifier, Registry, Worker, WorkerOptions,
    store::{self, EnqueueLimits},
    worker::BoxFuture,
};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A poisoned lock only means another task panicked mid-update of a plain value.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

static STARTS: LazyLock<Mutex<HashMap<i64, tokio::sync::oneshot::Sender<Instant>>>> =
    LazyLock::new(Default::default);
static RAN: AtomicUsize = AtomicUsize::new(0);
static FIRST: LazyLock<Mutex<Option<Instant>>> = LazyLock::new(Default::default);

struct Noop;
impl Handler for Noop {
    fn run<'a>(&'a self, job: &'a ClaimedJob) -> BoxFuture<'a, Result<Value, JobError>> {
        Box::pin(async move {
            let now = Instant::now();
            lock(&FIRST).get_or_insert(now);
            RAN.fetch_add(1, Ordering::Relaxed);
            if let Some(i) = job.params.get("lat").and_then(Value::as_i64)
                && let Some(tx) = lock(&STARTS).remove(&i)
            {
                let _ = tx.send(now);
            }
            Ok(Value::Null)
        })
    }
}

fn db_url(admin: &str, name: &str) -> anyhow::Result<String> {
    let (base, q) = admin.split_once('?').map_or((admin, ""), |(b, q)| (b, q));
    let cut = base.rfind('/').context("the DSN must name a database")?;
    let q = if q.is_empty() {
        String::new()
    } else {
        format!("?{q}")
    };
    Ok(format!("{}/{name}{q}", &base[..cut]))
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

async fn fresh_db(
    admin: &tokio_postgres::Client,
    admin_url: &str,
    name: &str,
) -> anyhow::Result<String> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = db_url(admin_url, name)?;
    let mut c = connect(&url).await?;
    tenantry_migrate::up(
        &mut c,
        &tenantry_migrate::embedded(tenantry_migrate::Target::Shard),
        tenantry_migrate::Phase::Contract,
    )
    .await?;
    c.batch_execute("CHECKPOINT").await.ok();
    Ok(url)
}

/// A pool like the shard's: every connection starts with the queue's session options.
fn pool(url: &str, size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let mut cfg = tokio_postgres::Config::from_str(url)?;
    cfg.options(store::SESSION_OPTIONS);
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Ok(deadpool_postgres::Pool::builder(mgr)
        .max_size(size)
        .build()?)
}

fn jobs(n: usize, key: &str) -> Vec<NewJob> {
    let company = Uuid::now_v7();
    (0..n)
        .map(|i| NewJob {
            company_id: company,
            request_id: format!("bench-{i}"),
            user_context: json!({}),
            kind: "noop".into(),
            params: json!({ key: i }),
            idempotency_key: None,
            max_attempts: 1,
            awaited_for: Duration::ZERO,
        })
        .collect()
}

const LIMITS: EnqueueLimits = EnqueueLimits {
    max_waiting_per_company: i64::MAX,
    shard_full: false,
};

async fn enqueue_all(url: &str, n: usize) -> anyhow::Result<f64> {
    let mut c = connect(url).await?;
    let batch = jobs(n, "i");
    let t = Instant::now();
    let tx = c.transaction().await?;
    store::enqueue_many(&tx, &batch, LIMITS).await?;
    tx.commit().await?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Polls, on a connection opened before the window (as the peer's admin connection is).
async fn until_all_done(c: &tokio_postgres::Client) -> anyhow::Result<()> {
    loop {
        // Waiting or processing rows left (through their partial indexes, not a scan of the
        // whole table every 5 ms).
        let open: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'waiting')
                     OR EXISTS (SELECT 1 FROM jobs WHERE state = 'processing')",
                &[],
            )
            .await?
            .get(0);
        if !open {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reset() {
    RAN.store(0, Ordering::Relaxed);
    *lock(&FIRST) = None;
}

fn opts(slots: usize, batch: usize) -> WorkerOptions {
    WorkerOptions {
        shard_id: "bench".into(),
        slots,
        claim_batch: batch,
        complete_batch: batch,
        lease: Duration::from_secs(60),
        poll_interval: Duration::from_millis(500),
        max_processing_per_company: i64::MAX,
        retry_base: Duration::from_secs(1),
        retry_max: Duration::from_secs(10),
        rescue_interval: Duration::from_secs(60),
        retention: Duration::from_secs(86_400),
        prune_interval: Duration::from_secs(3600),
        grace: Duration::from_secs(5),
        max_result_size: 1 << 20,
        run_timeout: Duration::from_secs(3600),
        depth_interval: tenantry_queue::worker::DEPTH_INTERVAL,
        outcome_tries: tenantry_queue::worker::OUTCOME_TRIES,
    }
}

async fn one_by_one(url: &str, n: usize, c: usize) -> anyhow::Result<f64> {
    reset();
    // The worker's own one-job step (claim 1, run, record 1 in its own transaction), from C
    // tasks at once, on a pool of C + 2 connections (the peer's maxPoolSize; the two spare
    // ones carry the worker's finished notifications): production's code path, without
    // batching.
    let stop = CancellationToken::new();
    let listener = Listener::start(tokio_postgres::Config::from_str(url)?, 10, stop.clone());
    let worker = Arc::new(Worker::new(
        pool(url, c + 2)?,
        registry(),
        opts(c, 1),
        listener,
    ));
    let mut tasks = Vec::new();
    for _ in 0..c {
        let worker = worker.clone();
        tasks.push(tokio::spawn(async move {
            while worker.try_claim_and_run_one().await?.is_some() {}
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let first = lock(&FIRST).context("no job ran")?;
    let rate = n as f64 / first.elapsed().as_secs_f64();
    stop.cancel();
    assert_eq!(RAN.load(Ordering::Relaxed), n, "every job ran once");
    Ok(rate)
}

fn registry() -> Registry {
    let mut r = Registry::default();
    r.register("noop", Noop);
    r
}

async fn batched(url: &str, n: usize, batch: usize) -> anyhow::Result<f64> {
    reset();
    let stop = CancellationToken::new();
    let listener = Listener::start(tokio_postgres::Config::from_str(url)?, 10, stop.clone());
    let worker = Worker::new(pool(url, 4)?, registry(), opts(batch, batch), listener);
    let admin = connect(url).await?;
    let handle = tokio::spawn(worker.run(stop.clone()));
    while RAN.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    until_all_done(&admin).await?;
    let first = lock(&FIRST).context("no job ran")?;
    let rate = n as f64 / first.elapsed().as_secs_f64();
    stop.cancel();
    handle.await??;
    Ok(rate)
}

async fn latency(url: &str, c: usize, samples: usize, warmup: usize) -> anyhow::Result<Vec<f64>> {
    let stop = CancellationToken::new();
    let p = pool(url, c + 2)?;
    let listener = Listener::start(tokio_postgres::Config::from_str(url)?, 10, stop.clone());
    let notifier = Notifier::start(p.clone(), stop.clone());
    let worker = Worker::new(p, registry(), opts(c, c), listener);
    let handle = tokio::spawn(worker.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut producer = connect(url).await?;
    let company = Uuid::now_v7();
    let mut out = Vec::new();
    for i in 0..(warmup + samples) as i64 {
        let pause = rand::rng().random_range(20..120);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&STARTS).insert(i, tx);
        let job = NewJob {
            company_id: company,
            request_id: format!("lat-{i}"),
            user_context: json!({}),
            kind: "noop".into(),
            params: json!({"lat": i}),
            idempotency_key: None,
            max_attempts: 1,
            awaited_for: Duration::ZERO,
        };
        let t = producer.transaction().await?;
        store::enqueue(&t, &job, LIMITS).await?;
        t.commit().await?;
        let ack = Instant::now();
        notifier.poke();
        let started = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .map_err(|_| anyhow::anyhow!("latency job {i} did not start within 10 s"))??;
        if i as usize >= warmup {
            out.push(started.saturating_duration_since(ack).as_secs_f64() * 1e3);
        }
    }
    stop.cancel();
    handle.await??;
    Ok(out)
}

fn pct(xs: &[f64], q: f64) -> f64 {
    let mut a = xs.to_vec();
    a.sort_by(f64::total_cmp);
    a[((q * a.len() as f64).ceil() as usize).max(1) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin_url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let sizes = Sizes {
        n: env("N", 20_000),
        c: env("C", 10),
        batch: env("BATCH", 500),
        lat_n: env("LAT_N", 200),
        warm: env("LAT_WARMUP", 20),
    };
    let admin = connect(&admin_url).await?;
    let tag = std::process::id();
    let names = [
        format!("tqbench_{tag}_tp"),
        format!("tqbench_{tag}_tpb"),
        format!("tqbench_{tag}_lat"),
    ];

    // PHASES (default "tp,tpb,lat") runs a subset, for profiling one phase at a time.
    let phases = std::env::var("PHASES").unwrap_or_else(|_| "tp,tpb,lat".into());
    eprintln!(
        "tenantry-bench: N={} C={} BATCH={} LAT_N={} PHASES={phases}",
        sizes.n, sizes.c, sizes.batch, sizes.lat_n
    );
    // The databases go even when a phase fails, so a failed run leaves nothing behind.
    let result = phases_run(&admin, &admin_url, &names, &phases, sizes).await;
    for name in &names {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .ok();
    }
    result
}

/// The run's sizes, from the environment: N jobs, C slots one-by-one, BATCH, LAT_N samples
/// after LAT_WARMUP unmeasured ones.
#[derive(Clone, Copy)]
struct Sizes {
    n: usize,
    c: usize,
    batch: usize,
    lat_n: usize,
    warm: usize,
}

/// Runs the phases named in `phases` (comma-separated), each in its own fresh database.
async fn phases_run(
    admin: &tokio_postgres::Client,
    admin_url: &str,
    names: &[String; 3],
    phases: &str,
    Sizes {
        n,
        c,
        batch,
        lat_n,
        warm,
    }: Sizes,
) -> anyhow::Result<()> {
    let run = |p: &str| phases.split(',').any(|x| x.trim() == p);
    if run("tp") {
        let tp = fresh_db(admin, admin_url, &names[0]).await?;
        let enqueue_rate = enqueue_all(&tp, n).await?;
        connect(&tp).await?.batch_execute("CHECKPOINT").await.ok();
        let plain = one_by_one(&tp, n, c).await?;
        eprintln!(
            "tenantry-bench: one-by-one {plain:.0} jobs/s; bulk enqueue {enqueue_rate:.0} jobs/s"
        );
        println!("enqueue_bulk: {enqueue_rate:.0} jobs/s");
        println!("throughput: {plain:.0} jobs/s");
    }
    if run("tpb") {
        let tpb = fresh_db(admin, admin_url, &names[1]).await?;
        enqueue_all(&tpb, n).await?;
        connect(&tpb).await?.batch_execute("CHECKPOINT").await.ok();
        let fast = batched(&tpb, n, batch).await?;
        eprintln!("tenantry-bench: batched {fast:.0} jobs/s");
        println!("throughput_batched: {fast:.0} jobs/s");
    }
    if run("lat") {
        let lat = fresh_db(admin, admin_url, &names[2]).await?;
        let samples = latency(&lat, c, lat_n, warm).await?;
        eprintln!(
            "tenantry-bench: latency from commit ack: min {:.2} p50 {:.2} p99 {:.2} max {:.2} ms",
            pct(&samples, 0.0),
            pct(&samples, 0.5),
            pct(&samples, 0.99),
            pct(&samples, 1.0)
        );
        println!("latency_p50: {:.2} ms", pct(&samples, 0.5));
        println!("latency_p99: {:.2} ms", pct(&samples, 0.99));
    }
    Ok(())
}
