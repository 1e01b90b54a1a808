//! The queue library against real PostgreSQL, driven step by step (no sleeps where a single
//! step will do).

use std::time::Duration;

use serde_json::json;
use tenantry_core::db;
use tenantry_queue::{
    JobError, JobState, NewJob, Registry, Worker, WorkerOptions,
    listen::Listener,
    store::{self, EnqueueError, EnqueueLimits, Outcome},
};
use tenantry_testkit::{Schema, TestDb};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn job(company: Uuid, kind: &str, params: serde_json::Value, attempts: i32) -> NewJob {
    NewJob {
        company_id: company,
        request_id: format!("req-{}", Uuid::new_v4().simple()),
        user_context: json!({"user_id": "tester"}),
        kind: kind.into(),
        params,
        idempotency_key: None,
        max_attempts: attempts,
        awaited_for: Duration::ZERO,
    }
}

const LIMITS: EnqueueLimits = EnqueueLimits {
    max_waiting_per_company: 1_000_000,
    shard_full: false,
};

pub async fn enqueue(db: &TestDb, jobs: &[NewJob]) -> Vec<Uuid> {
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let ids = store::enqueue_many(&tx, jobs, LIMITS).await.unwrap();
    tx.commit().await.unwrap();
    ids
}

/// Enqueues one job (committed) and returns its id.
pub async fn enqueue_one(db: &TestDb, job: NewJob) -> Uuid {
    enqueue(db, &[job]).await[0]
}

async fn state_of(db: &TestDb, id: Uuid) -> (String, i32) {
    let r = db
        .client()
        .await
        .query_one("SELECT state, attempts FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// A successful outcome of `attempt` whose result names the attempt.
fn ok_by(id: Uuid, attempt: i32) -> Outcome {
    Outcome {
        id,
        attempt,
        request_id: "test".into(),
        result: Ok(json!({"by": attempt})),
        retry_in: Duration::ZERO,
    }
}

/// Ends the lease of `id` now and runs the rescuer: (returned to waiting, dead-lettered).
async fn expire_and_rescue(c: &mut tokio_postgres::Client, id: Uuid) -> (Vec<Uuid>, Vec<Uuid>) {
    c.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    store::rescue_expired(c, 10, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap()
}

use crate::support::dev_config;

fn url_of(db: &TestDb) -> tenantry_core::secret::DatabaseUrl {
    tenantry_core::secret::DatabaseUrl::new(db.url.clone())
}

/// A pool like the shard's (see `store::pool`).
fn shard_pool(db: &TestDb, size: usize) -> deadpool_postgres::Pool {
    store::pool(&url_of(db), size, &dev_config().database, "test").unwrap()
}

/// A trigger that makes the database refuse every outcome `done` (`DROP TRIGGER refuse_done
/// ON jobs` lifts it): an outcome that cannot be written, as in an outage.
const REFUSE_DONE: &str = "CREATE FUNCTION refuse_done() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN RAISE EXCEPTION 'not now'; END $$;
    CREATE TRIGGER refuse_done BEFORE UPDATE ON jobs
        FOR EACH ROW WHEN (NEW.state = 'done') EXECUTE FUNCTION refuse_done();";

/// A shard pool of 4 connections reaching `db` through a proxy the test can cut or stall.
async fn proxied_pool(db: &TestDb) -> (tenantry_testkit::proxy::TcpProxy, deadpool_postgres::Pool) {
    let (proxy, through) = tenantry_testkit::proxy::TcpProxy::in_front_of(&db.url).await;
    let pool = store::pool(
        &tenantry_core::secret::DatabaseUrl::new(through),
        4,
        &dev_config().database,
        "test",
    )
    .unwrap();
    (proxy, pool)
}

/// A process's LISTEN connection, as a worker or an API node has.
fn listener(db: &TestDb, max_waiters: usize) -> Listener {
    let pg = db::pg_config(&url_of(db), &dev_config().database, "test").unwrap();
    Listener::start(pg, max_waiters, CancellationToken::new())
}

/// [`listener`], once its LISTEN is in place (and its connect-time wake-up stored).
async fn connected_listener(db: &TestDb, max_waiters: usize) -> Listener {
    let l = listener(db, max_waiters);
    let what = || "the listener did not connect within 10 s".to_string();
    crate::support::until(Duration::from_secs(10), what, || l.is_connected()).await;
    l
}

/// The built-in kinds `kinds`, as a shard's configuration enables them.
fn builtins(kinds: &[&str]) -> Registry {
    let mut queue = dev_config().queue;
    queue.builtin_kinds = kinds.iter().map(|k| k.to_string()).collect();
    Registry::from_config(&queue)
}

fn worker(db: &TestDb, max_per_company: i64) -> Worker {
    worker_with(db, max_per_company, builtins(&["echo", "sleep"]))
}

fn worker_with(db: &TestDb, max_per_company: i64, registry: Registry) -> Worker {
    worker_on(db, "shard-t", max_per_company, registry)
}

/// [`worker_with`] whose metrics carry the shard label `shard`.
fn worker_on(db: &TestDb, shard: &str, max_per_company: i64, registry: Registry) -> Worker {
    worker_from(db, registry, options(shard, max_per_company))
}

/// The tests' worker settings: 4 slots, short retry backoff.
fn options(shard: &str, max_per_company: i64) -> WorkerOptions {
    let mut queue = dev_config().queue;
    queue.retry_base = Duration::from_millis(200);
    queue.retry_max = Duration::from_millis(400);
    let mut opts = WorkerOptions::from_config(shard, 4, &queue, Duration::from_secs(1));
    opts.max_processing_per_company = max_per_company;
    opts
}

fn worker_from(db: &TestDb, registry: Registry, opts: WorkerOptions) -> Worker {
    Worker::new(shard_pool(db, 4), registry, opts, listener(db, 10))
}

/// A worker running in the background until [`Running::stop`].
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn spawn_worker(w: Worker) -> Running {
    let stop = CancellationToken::new();
    let task = tokio::spawn(w.run(stop.clone()));
    Running { stop, task }
}

impl Running {
    /// The worker's shutdown token, for what should stop with it.
    fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops the worker the way a shutdown does and waits until it has.
    async fn stop(self) {
        self.stop.cancel();
        self.join().await;
    }

    /// Waits until the worker has stopped (after its token was cancelled).
    async fn join(self) {
        self.task.await.unwrap().unwrap();
    }
}

/// A worker gone idle on an empty queue: its LISTEN connection was up before it started, so
/// it makes exactly two empty claims (its first, and one for the connect-time wake-up) and
/// then sleeps until a notification or its poll. Whatever is enqueued after this returns is
/// claimed only through one of those. (Its metrics get a shard label of their own, so the
/// claims of tests running alongside are not counted.)
async fn idle_worker(db: &TestDb, registry: Registry, mut opts: WorkerOptions) -> Running {
    opts.shard_id = format!("idle-{}", Uuid::now_v7());
    let claims = tenantry_queue::metrics::CLAIM_SECONDS.with_label_values(&[&opts.shard_id]);
    let wakes = connected_listener(db, 10).await;
    let running = spawn_worker(Worker::new(shard_pool(db, 4), registry, opts, wakes));
    let what = || {
        let n = claims.get_sample_count();
        format!("the worker made {n} claims in 10 s, not its two at start")
    };
    crate::support::until(Duration::from_secs(10), what, || {
        claims.get_sample_count() >= 2
    })
    .await;
    running
}

#[tokio::test]
async fn failed_attempts_back_off_then_dead_letter_with_the_error_kept() {
    let db = TestDb::new(Schema::Shard).await;
    // Backoffs of seconds, ended by moving run_at rather than by sleeping: no timing window.
    let mut opts = options("shard-t", 100);
    opts.retry_base = Duration::from_secs(4);
    opts.retry_max = Duration::from_secs(60);
    let w = worker_from(&db, builtins(&["sleep"]), opts);
    let end_backoff = || db.exec("UPDATE jobs SET run_at = now()");
    let id = enqueue_one(
        &db,
        job(
            Uuid::now_v7(),
            "sleep",
            json!({"ms": 0, "fail": "upstream said no"}),
            3,
        ),
    )
    .await;
    assert_eq!(
        w.try_claim_and_run_one().await.unwrap(),
        Some((id, JobState::Waiting))
    );
    let c = db.client().await;
    let backoff_s = || async {
        let row = c
            .query_one(
                "SELECT extract(epoch FROM run_at - now())::float8, error FROM jobs WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (row.get::<_, f64>(0), row.get::<_, String>(1))
    };
    let (first, error) = backoff_s().await;
    // 4 s × a jitter factor in [0.75, 1.25), less the time this took.
    assert!((2.0..5.0).contains(&first), "first backoff {first} s");
    assert_eq!(error, "upstream said no");
    assert_eq!(
        w.try_claim_and_run_one().await.unwrap(),
        None,
        "not claimable during backoff"
    );
    end_backoff().await;
    assert_eq!(
        w.try_claim_and_run_one().await.unwrap(),
        Some((id, JobState::Waiting))
    );
    let (second, _) = backoff_s().await;
    // 8 s × [0.75, 1.25): exponential.
    assert!((5.0..10.0).contains(&second), "second backoff {second} s");
    end_backoff().await;
    assert_eq!(
        w.try_claim_and_run_one().await.unwrap(),
        Some((id, JobState::Error))
    );
    assert_eq!(state_of(&db, id).await, ("error".into(), 3));
    let events = db.scalar("SELECT count(*) FROM outbox").await;
    assert_eq!(
        events, 1,
        "one job.finished event, for the final failure only"
    );
}

#[tokio::test]
async fn a_permanent_error_skips_the_remaining_attempts() {
    let db = TestDb::new(Schema::Shard).await;
    let w = worker(&db, 100);
    let id = enqueue_one(&db, job(Uuid::now_v7(), "no-such-kind", json!({}), 5)).await;
    assert_eq!(
        w.try_claim_and_run_one().await.unwrap(),
        Some((id, JobState::Error))
    );
    assert_eq!(state_of(&db, id).await, ("error".into(), 1));
}

#[tokio::test]
async fn a_late_completion_after_a_rescue_is_discarded_and_the_job_completes_once() {
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({"n": 1}), 3)).await;
    let mut c = db.client().await;
    let a = store::claim(&mut c, "worker-a", 1, Duration::from_secs(30), 100)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    // worker-a hangs; its lease runs out
    assert_eq!(expire_and_rescue(&mut c, id).await, (vec![id], vec![]));
    let b = store::claim(&mut c, "worker-b", 1, Duration::from_secs(30), 100)
        .await
        .unwrap();
    assert_eq!(b[0].attempt, 2);
    let (done, discarded) = store::finish(&mut c, "worker-a", &[ok_by(id, 1)])
        .await
        .unwrap();
    assert!(done.is_empty());
    assert_eq!(discarded, vec![id], "worker-a's completion is discarded");
    let (done, _) = store::finish(&mut c, "worker-b", &[ok_by(id, 2)])
        .await
        .unwrap();
    assert_eq!(done[0].state, JobState::Done);
    let r = c
        .query_one("SELECT result, attempts FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(r.get::<_, serde_json::Value>(0), json!({"by": 2}));
    assert_eq!(r.get::<_, i32>(1), 2);
    let (done, discarded) = store::finish(&mut c, "worker-b", &[ok_by(id, 2)])
        .await
        .unwrap();
    assert!(
        done.is_empty() && discarded == vec![id],
        "never completed twice"
    );
}

#[tokio::test]
async fn a_retried_dead_letter_backs_off_from_the_start_again() {
    // Eight attempts before an operator's retry: the next failure waits the first backoff
    // step (1 s), not the ninth (256 s).
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "panics", json!({}), 2)).await;
    db.exec(&format!(
        "UPDATE jobs SET state = 'error', attempts = 8, max_attempts = 8, finished_at = now()
          WHERE id = '{id}'"
    ))
    .await;
    let c = db.client().await;
    store::retry(&c, id).await.unwrap();
    let mut registry = Registry::default();
    registry.register("panics", PanicsEarly);
    let mut opts = options("shard-t", 100);
    opts.retry_base = Duration::from_secs(1);
    opts.retry_max = Duration::from_secs(3600);
    let w = worker_from(&db, registry, opts);
    assert_eq!(
        w.try_claim_and_run_one().await.unwrap(),
        Some((id, JobState::Waiting)),
        "a retryable failure with attempts left"
    );
    let r = c
        .query_one(
            "SELECT attempts, extract(epoch FROM run_at - now())::float8 FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (attempts, wait): (i32, f64) = (r.get(0), r.get(1));
    assert_eq!(attempts, 9);
    // The first step, 1 s with ±25 % jitter; neither none nor the ninth step.
    assert!((0.5..1.3).contains(&wait), "backs off {wait} s");
}

#[tokio::test]
async fn dead_letters_retried_one_by_one_queue_behind_each_other_like_new_jobs() {
    // An operator retries a company's dead letters in a loop. Each used to get the queue's
    // virtual time and nothing more, so they all shared one claim order at the head, and
    // another company's next job landed among them; like new jobs, each now gets its company's
    // fairness offset, and the other company's job comes right after the first.
    let db = TestDb::new(Schema::Shard).await;
    let (busy, other) = (Uuid::now_v7(), Uuid::now_v7());
    let dead = enqueue(
        &db,
        &(0..5)
            .map(|i| job(busy, "echo", json!({"i": i}), 1))
            .collect::<Vec<_>>(),
    )
    .await;
    db.exec(
        "UPDATE jobs SET state = 'error', attempts = 1, finished_at = now(),
                priority = priority - 86400 * 1000000::bigint",
    )
    .await;
    let c = db.client().await;
    for id in &dead {
        store::retry(&c, *id).await.unwrap();
    }
    let newcomer = enqueue_one(&db, job(other, "echo", json!({}), 1)).await;
    let order: Vec<Uuid> = c
        .query("SELECT id FROM jobs ORDER BY priority, id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order.len(), 6);
    assert!(
        order[..2].contains(&newcomer),
        "the other company's job is claimed second at the latest: {order:?}"
    );
    let priorities: Vec<i64> = c
        .query(
            "SELECT priority FROM jobs WHERE company_id = $1 ORDER BY priority",
            &[&busy],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        priorities.windows(2).all(|w| w[1] - w[0] >= 900_000),
        "a quantum apart: {priorities:?}"
    );
}

#[tokio::test]
async fn a_retried_week_old_dead_letter_does_not_pull_new_jobs_ahead_of_the_backlog() {
    // A dead letter from a week ago, retried while its company is at its cap (so it stays
    // waiting at the head of the queue): jobs enqueued meanwhile must still queue behind the
    // backlog that was already waiting, not a week back with the old dead letter.
    let db = TestDb::new(Schema::Shard).await;
    let dead = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    db.exec(&format!(
        "UPDATE jobs SET state = 'error', attempts = 1, finished_at = now(),
                priority = priority - 7 * 86400 * 1000000::bigint
          WHERE id = '{dead}'"
    ))
    .await;
    let backlog = enqueue(
        &db,
        &(0..3)
            .map(|i| job(Uuid::now_v7(), "echo", json!({"i": i}), 1))
            .collect::<Vec<_>>(),
    )
    .await;
    let c = db.client().await;
    let retried = store::retry(&c, dead).await.unwrap();
    assert_eq!(retried.view.state, JobState::Waiting);
    let newcomer = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;

    let priority = |id: Uuid| {
        let c = &c;
        async move {
            c.query_one("SELECT priority FROM jobs WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let first_of_backlog = priority(backlog[0]).await;
    assert!(
        priority(newcomer).await >= first_of_backlog,
        "the newcomer queues behind the backlog"
    );
    assert!(
        priority(dead).await >= first_of_backlog - 60 * 1_000_000,
        "the retried job's claim order starts from now, not a week back"
    );
}

#[tokio::test]
async fn an_operator_retry_never_hands_out_a_lease_an_old_run_still_holds() {
    // worker-a's run of attempt 1 hangs past its lease; the job dead-letters and an operator
    // retries it; worker-a itself claims it again. The hung run's outcome must not pass for
    // the new run's.
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 2)).await;
    let mut c = db.client().await;
    let lease = Duration::from_secs(30);
    let hung = store::claim(&mut c, "worker-a", 1, lease, 100)
        .await
        .unwrap()[0]
        .attempt;
    assert_eq!(expire_and_rescue(&mut c, id).await, (vec![id], vec![]));
    store::claim(&mut c, "worker-a", 1, lease, 100)
        .await
        .unwrap();
    assert_eq!(expire_and_rescue(&mut c, id).await, (vec![], vec![id]));
    let retried = store::retry(&c, id).await.unwrap();
    assert_eq!(retried.view.state, JobState::Waiting);
    assert_eq!(
        (retried.view.attempts, retried.max_attempts),
        (2, 4),
        "the count goes on, with as many attempts again as the first round had"
    );
    let again = store::claim(&mut c, "worker-a", 1, lease, 100)
        .await
        .unwrap()[0]
        .attempt;
    assert_eq!(again, 3);
    let (done, discarded) = store::finish(&mut c, "worker-a", &[ok_by(id, hung)])
        .await
        .unwrap();
    assert!(done.is_empty(), "the hung run's outcome is not recorded");
    assert_eq!(discarded, vec![id]);
    let (done, _) = store::finish(&mut c, "worker-a", &[ok_by(id, again)])
        .await
        .unwrap();
    assert_eq!(done[0].state, JobState::Done);
    let result: serde_json::Value = c
        .query_one("SELECT result FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(result, json!({"by": 3}));
    // A second retry grants the first round's two attempts again, not the grown allowance.
    c.execute(
        "UPDATE jobs SET state = 'error', finished_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let retried = store::retry(&c, id).await.unwrap();
    assert_eq!((retried.view.attempts, retried.max_attempts), (3, 5));
}

#[tokio::test]
async fn the_one_job_step_discards_and_counts_its_completion_when_its_lease_was_lost() {
    let db = TestDb::new(Schema::Shard).await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut registry = Registry::default();
    registry.register("gated", Gated(gate.clone()));
    // Its own shard label: the counters are process-wide and tests run side by side.
    let shard = format!("shard-late-{}", Uuid::new_v4().simple());
    let w = worker_on(&db, &shard, 100, registry);
    let id = enqueue_one(&db, job(Uuid::now_v7(), "gated", json!({}), 3)).await;
    let step = tokio::spawn(async move { w.try_claim_and_run_one().await.unwrap() });
    let mut c = db.client().await;
    assert!(
        crate::support::until_state(&db, id, "processing", Duration::from_secs(10)).await,
        "the step claimed the job"
    );
    // The step's handler is still held when its lease runs out and the job is rescued.
    assert_eq!(expire_and_rescue(&mut c, id).await, (vec![id], vec![]));
    gate.notify_one();
    assert_eq!(
        step.await.unwrap(),
        None,
        "the late outcome is not recorded"
    );
    assert_eq!(state_of(&db, id).await, ("waiting".into(), 1));
    let late = tenantry_queue::metrics::EVENTS
        .with_label_values(&[&shard, "late_completion"])
        .get();
    assert_eq!(late, 1, "the discarded completion is counted");
}

#[tokio::test]
async fn a_retried_completion_tells_what_its_lost_try_wrote_from_what_was_rescued() {
    // worker-a writes a batch of outcomes, and the COMMIT goes through but its answer is lost
    // with the connection. By the time worker-a writes the batch again, some of its other jobs
    // were rescued (one of them then finished by worker-b). The second try applies nothing;
    // what the first try wrote must not pass for a late completion.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let ids = enqueue(
        &db,
        &[
            job(company, "echo", json!({}), 3),
            job(company, "echo", json!({}), 3),
            job(company, "echo", json!({}), 3),
            job(company, "echo", json!({}), 1),
            job(company, "echo", json!({}), 3),
        ],
    )
    .await;
    let [written, taken_over, rescued, dead, retried] = ids[..] else {
        panic!("five jobs: {ids:?}")
    };
    let mut c = db.client().await;
    let lease = Duration::from_secs(30);
    let claimed = store::claim(&mut c, "worker-a", 5, lease, 100)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 5);
    let try_later = Outcome {
        id: retried,
        attempt: 1,
        request_id: "test".into(),
        result: Err(JobError::retryable("try later")),
        retry_in: Duration::from_secs(600),
    };
    // The try whose answer was lost.
    store::finish(&mut c, "worker-a", &[ok_by(written, 1), try_later.clone()])
        .await
        .unwrap();
    for id in [taken_over, rescued, dead] {
        expire_and_rescue(&mut c, id).await;
    }
    let b = store::claim(&mut c, "worker-b", 1, lease, 100)
        .await
        .unwrap();
    assert_eq!(b[0].id, taken_over);
    store::finish(&mut c, "worker-b", &[ok_by(taken_over, 2)])
        .await
        .unwrap();

    let outcomes = vec![
        ok_by(written, 1),
        ok_by(taken_over, 1),
        ok_by(rescued, 1),
        ok_by(dead, 1),
        try_later,
    ];
    let (finished, discarded) = store::finish(&mut c, "worker-a", &outcomes).await.unwrap();
    assert!(finished.is_empty(), "{finished:?}");
    assert_eq!(discarded.len(), 5);
    let unapplied: Vec<&Outcome> = outcomes.iter().collect();
    let mut earlier: Vec<(Uuid, JobState)> = store::written_earlier(&c, "worker-a", &unapplied)
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.id, f.state))
        .collect();
    earlier.sort_by_key(|(id, _)| *id);
    assert_eq!(
        earlier,
        vec![(written, JobState::Done), (retried, JobState::Waiting)],
        "the first try's two outcomes; the rescued, taken-over and dead-lettered jobs are late"
    );
}

#[tokio::test]
async fn an_outcome_whose_commit_answer_was_lost_counts_as_completed_not_as_late() {
    // The worker's connection drops as it sends an outcome; the database still gets it and
    // commits. The worker writes the outcome again on another connection and finds the job no
    // longer leased: it must count the job as completed, not warn of a late completion.
    let db = TestDb::new(Schema::Shard).await;
    let (proxy, pool) = proxied_pool(&db).await;
    // Its own shard label: the counters are process-wide and tests run side by side.
    let shard = format!("shard-lost-{}", Uuid::new_v4().simple());
    // Only the outcome carries the marker to the database: the echo job's result is its params.
    let marker = format!("lost-answer-{}", Uuid::new_v4().simple());
    proxy.drop_answer_to(marker.as_bytes(), Duration::ZERO);
    let running = spawn_worker(Worker::new(
        pool,
        builtins(&["echo"]),
        options(&shard, 100),
        listener(&db, 10),
    ));
    let id = enqueue_one(
        &db,
        job(Uuid::now_v7(), "echo", json!({"marker": marker}), 3),
    )
    .await;
    let event = |name: &str| {
        tenantry_queue::metrics::EVENTS
            .with_label_values(&[&shard, name])
            .get()
    };
    let what = || "the outcome was not accounted for within 10 s".to_string();
    crate::support::until(Duration::from_secs(10), what, || {
        event("completed") + event("late_completion") > 0
    })
    .await;
    assert_eq!(
        (event("completed"), event("late_completion")),
        (1, 0),
        "completed once, not late"
    );
    let r = db
        .client()
        .await
        .query_one(
            "SELECT state, attempts, result FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, i32>(1)),
        ("done".into(), 1)
    );
    assert_eq!(r.get::<_, serde_json::Value>(2), json!({"marker": marker}));
    running.stop().await;
}

#[tokio::test]
async fn a_claim_whose_answer_was_lost_gives_its_jobs_back_before_the_next_claim() {
    // The worker's connection drops as it sends a claim; the database still runs it and
    // commits. The job is leased to a worker that never heard of it: left so, its lease would
    // expire and the rescuer would count an attempt it never had, and a job allowed one attempt
    // would go to the dead letters without having run.
    let db = TestDb::new(Schema::Shard).await;
    let (proxy, pool) = proxied_pool(&db).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    let mut opts = options("shard-lost-claim", 100);
    // Far longer than the test waits: only the worker itself can give the job back in time.
    opts.lease = Duration::from_secs(120);
    let worker = Worker::new(pool, builtins(&["echo"]), opts, listener(&db, 10));
    // The claim is the first statement that carries the worker's id to the database.
    proxy.drop_answer_to(worker.id.as_bytes(), Duration::ZERO);
    let running = spawn_worker(worker);
    let started = std::time::Instant::now();
    loop {
        let (state, attempts) = state_of(&db, id).await;
        if state == "done" {
            assert_eq!(attempts, 1, "the lost claim's attempt is not counted");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the job is still {state} after 15 s (attempt {attempts})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

#[tokio::test]
async fn a_job_whose_outcome_was_given_up_on_is_left_to_the_rescuer_not_run_again() {
    // A job allowed one attempt runs, and its outcome cannot be written until the completer
    // gives up. A claim then fails, so the claim loop gives back the jobs it does not hold (those
    // of a claim whose answer was lost, which never ran) without counting their attempt. This
    // job ran: it must stay for the rescuer, which counts its attempt and dead-letters it,
    // not go back to waiting and run a second time.
    let db = TestDb::new(Schema::Shard).await;
    db.exec(REFUSE_DONE).await;
    db.exec(
        "CREATE TABLE refuse_claims (on_ boolean);
         CREATE FUNCTION refuse_claim() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM refuse_claims) THEN RAISE EXCEPTION 'not now'; END IF;
                 RETURN NEW;
             END $$;
         CREATE TRIGGER refuse_claim BEFORE UPDATE ON jobs
             FOR EACH ROW WHEN (NEW.state = 'processing' AND OLD.state = 'waiting')
             EXECUTE FUNCTION refuse_claim();",
    )
    .await;
    let mut opts = options("shard-lost-outcome", 100);
    opts.outcome_tries = 2;
    opts.lease = Duration::from_secs(5);
    opts.rescue_interval = Duration::from_millis(200);
    opts.poll_interval = Duration::from_millis(50);
    let running = spawn_worker(worker_from(&db, builtins(&["echo"]), opts));
    let ran = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    // Its outcome is refused twice, about 0.1 s apart, and given up on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(state_of(&db, ran).await, ("processing".into(), 1));
    // Claims fail for a moment, then the database takes everything again.
    db.exec("INSERT INTO refuse_claims VALUES (true)").await;
    let next = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.exec("DELETE FROM refuse_claims; DROP TRIGGER refuse_done ON jobs")
        .await;
    assert!(
        crate::support::until_state(&db, next, "done", Duration::from_secs(10)).await,
        "the claims go on: {:?}",
        state_of(&db, next).await
    );
    assert!(
        crate::support::until_state(&db, ran, "error", Duration::from_secs(15)).await,
        "the job that ran is dead-lettered once its lease runs out, not run again: {:?}",
        state_of(&db, ran).await
    );
    let r = db
        .client()
        .await
        .query_one("SELECT attempts, error FROM jobs WHERE id = $1", &[&ran])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i32>(0), 1);
    assert!(r.get::<_, String>(1).contains("lease expired"));
    running.stop().await;
}

#[tokio::test]
async fn a_running_job_keeps_its_lease_while_the_shared_pool_is_exhausted() {
    // The pool is shared with the claims, the completions and, in a process with the api role,
    // every request: busy for longer than a lease, it used to starve the heartbeat, and jobs
    // running fine were rescued to run again.
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "sleep", json!({"ms": 6000}), 3)).await;
    let pool = shard_pool(&db, 3);
    let mut opts = options("shard-t", 100);
    opts.lease = Duration::from_secs(3);
    let running = spawn_worker(Worker::new(
        pool.clone(),
        builtins(&["sleep"]),
        opts,
        listener(&db, 10),
    ));
    assert!(crate::support::until_state(&db, id, "processing", Duration::from_secs(10)).await);
    // Past the first renewal (a third of the lease), then every other connection is taken.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut taken = Vec::new();
    while let Ok(Ok(client)) = tokio::time::timeout(Duration::from_millis(300), pool.get()).await {
        taken.push(client);
    }
    assert!(!taken.is_empty());
    let mut c = db.client().await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            store::rescue_expired(&mut c, 10, Duration::ZERO, Duration::ZERO)
                .await
                .unwrap(),
            (vec![], vec![]),
            "the lease lapsed while the pool was busy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(taken);
    assert!(crate::support::until_state(&db, id, "done", Duration::from_secs(10)).await);
    assert_eq!(state_of(&db, id).await, ("done".into(), 1));
    running.stop().await;
}

#[tokio::test]
async fn a_running_job_keeps_its_lease_when_its_heartbeat_connection_dies_silently() {
    // The connection the heartbeat keeps dies without a word (a failover whose old host
    // vanished): a renewal sent on it would wait for the kernel to give up (30 s, by
    // `TCP_USER_TIMEOUT`; here the proxy's kernel acknowledges, so for ever), while every
    // lease ran out. It must give up on that connection and renew on another.
    let db = TestDb::new(Schema::Shard).await;
    let (proxy, pool) = proxied_pool(&db).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "sleep", json!({"ms": 7000}), 1)).await;
    let mut opts = options("shard-t", 100);
    opts.lease = Duration::from_secs(3);
    let running = spawn_worker(Worker::new(
        pool,
        builtins(&["sleep"]),
        opts,
        listener(&db, 10),
    ));
    assert!(crate::support::until_state(&db, id, "processing", Duration::from_secs(10)).await);
    // Past the first renewal (a third of the lease), every connection open now goes silent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.stall_open();
    let mut c = db.client().await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            store::rescue_expired(&mut c, 10, Duration::ZERO, Duration::ZERO)
                .await
                .unwrap(),
            (vec![], vec![]),
            "the lease lapsed while the heartbeat's connection hung"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.restore();
    assert!(crate::support::until_state(&db, id, "done", Duration::from_secs(15)).await);
    assert_eq!(state_of(&db, id).await, ("done".into(), 1));
    running.stop().await;
}

#[tokio::test]
async fn a_running_job_keeps_its_lease_past_its_length_and_only_its_worker_renews_it() {
    // A 3 s lease renewed every second, and a 7 s job: without the heartbeat the rescuer would
    // take the job back after three seconds and it would run twice.
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "sleep", json!({"ms": 7000}), 3)).await;
    let mut opts = options("shard-t", 100);
    opts.lease = Duration::from_secs(3);
    let running = spawn_worker(worker_from(&db, builtins(&["sleep"]), opts));
    let mut c = db.client().await;
    let started = std::time::Instant::now();
    loop {
        let (state, attempts) = state_of(&db, id).await;
        if state == "done" {
            assert_eq!(attempts, 1, "the job ran once");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the job did not finish"
        );
        assert_eq!(
            store::rescue_expired(&mut c, 10, Duration::ZERO, Duration::ZERO)
                .await
                .unwrap(),
            (vec![], vec![]),
            "a renewed lease is never rescued ({state}, attempt {attempts})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;

    // The renewal is fenced by worker: another worker's heartbeat moves nothing.
    let other = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    store::claim(&mut c, "w", 1, Duration::from_secs(30), 100)
        .await
        .unwrap();
    let lease = Duration::from_secs(3600);
    assert_eq!(
        store::heartbeat(&c, "someone-else", &[other], lease)
            .await
            .unwrap(),
        0
    );
    assert_eq!(store::heartbeat(&c, "w", &[other], lease).await.unwrap(), 1);
    let left = lease_seconds(&c, other).await;
    assert!(left > 3000.0, "renewed to an hour: {left} s left");
}

#[tokio::test]
async fn a_failed_lease_renewal_is_tried_again_within_a_second_not_a_beat_later() {
    // A 30 s lease is renewed every 10 s. The worker reaches the database through a proxy the
    // test cuts before the first beat and restores a little after it: the beat that failed is
    // tried again within a second, so the lease is renewed about a second after the database is
    // back, not at the next beat, 10 s after the failure (leases run down in an outage, and the
    // janitor holds its rescue back one lease for exactly that renewal).
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "sleep", json!({"ms": 60_000}), 1)).await;
    let (proxy, pool) = proxied_pool(&db).await;
    let mut opts = options("shard-t", 100);
    opts.lease = Duration::from_secs(30);
    let started = std::time::Instant::now();
    let running = spawn_worker(Worker::new(
        pool,
        builtins(&["sleep"]),
        opts,
        listener(&db, 10),
    ));
    assert!(
        crate::support::until_state(&db, id, "processing", Duration::from_secs(5)).await,
        "the job was not claimed"
    );
    let c = db.client().await;
    let claimed = lease_expiry(&c, id).await;
    proxy.cut();
    // The first beat, 10 s after the worker started, fails; restored 1.5 s after it.
    tokio::time::sleep(Duration::from_millis(11_500).saturating_sub(started.elapsed())).await;
    assert_eq!(
        lease_expiry(&c, id).await,
        claimed,
        "no renewal went through the cut"
    );
    proxy.restore();
    let restored = std::time::Instant::now();
    while lease_expiry(&c, id).await == claimed {
        assert!(
            restored.elapsed() < Duration::from_secs(4),
            "4 s after the database came back the lease was not renewed yet"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

#[tokio::test]
async fn a_heartbeat_renews_around_a_row_another_transaction_holds_rather_than_waiting() {
    // A batched completion locks its rows in the order its outcomes came in; a heartbeat that
    // waited for one of them while holding another could deadlock with it.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let ids = enqueue(
        &db,
        &[
            job(company, "echo", json!({}), 1),
            job(company, "echo", json!({}), 1),
        ],
    )
    .await;
    let mut c = db.client().await;
    let claimed = store::claim(&mut c, "w", 2, Duration::from_secs(30), 100)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let (held, free) = (ids[0], ids[1]);
    let mut other = db.client().await;
    let tx = other.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", &[&held])
        .await
        .unwrap();

    let lease = Duration::from_secs(3600);
    let renewed = tokio::time::timeout(
        Duration::from_secs(5),
        store::heartbeat(&c, "w", &[held, free], lease),
    )
    .await
    .expect("the heartbeat waited for a locked row")
    .unwrap();
    assert_eq!(renewed, 1, "the row nobody holds is renewed");
    tx.commit().await.unwrap();
    let left = lease_seconds(&c, free).await;
    assert!(left > 3000.0, "renewed to an hour: {left} s left");
    assert!(
        lease_seconds(&c, held).await < 60.0,
        "the held row kept its lease"
    );
    // Released, it is renewed at the next beat.
    assert_eq!(
        store::heartbeat(&c, "w", &[held, free], lease)
            .await
            .unwrap(),
        2
    );
    assert!(lease_seconds(&c, held).await > 3000.0);
}

/// When the lease of `id` expires (seconds since the epoch).
async fn lease_expiry(c: &tokio_postgres::Client, id: Uuid) -> f64 {
    lease_figure(c, id, "lease_expires_at").await
}

/// Seconds left on the lease of `id`.
async fn lease_seconds(c: &tokio_postgres::Client, id: Uuid) -> f64 {
    lease_figure(c, id, "lease_expires_at - now()").await
}

/// The epoch of `expr` (a timestamp or an interval over job `id`'s row).
async fn lease_figure(c: &tokio_postgres::Client, id: Uuid, expr: &str) -> f64 {
    let sql = format!("SELECT extract(epoch FROM {expr})::float8 FROM jobs WHERE id = $1");
    c.query_one(&sql, &[&id]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_rescued_job_waits_out_its_retry_backoff_before_it_is_claimed_again() {
    // A handler that brings its worker down (an abort, memory) must not be claimed again at
    // once by the next worker, taking it down too.
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 3)).await;
    let later = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 3)).await;
    let mut c = db.client().await;
    store::claim(&mut c, "w", 1, Duration::from_millis(1), 100)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (base, max) = (Duration::from_secs(10), Duration::from_secs(60));
    let (rescued, dead) = store::rescue_expired(&mut c, 10, base, max).await.unwrap();
    assert_eq!((rescued, dead), (vec![id], vec![]));
    // The first attempt's backoff: between the base and 1¼ of it.
    let wait = lease_figure(&c, id, "run_at - now()").await;
    assert!((9.5..=12.6).contains(&wait), "run_at is {wait} s away");
    let claimed = store::claim(&mut c, "w2", 10, Duration::from_secs(30), 100)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![later],
        "only the job that is not backing off"
    );
}

#[tokio::test]
async fn an_expired_lease_on_the_last_attempt_dead_letters_the_job() {
    let db = TestDb::new(Schema::Shard).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    let mut c = db.client().await;
    store::claim(&mut c, "w", 1, Duration::from_millis(1), 100)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (rescued, dead) = store::rescue_expired(&mut c, 10, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((rescued.len(), dead), (0, vec![id]));
    let err: String = c
        .query_one("SELECT error FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(err.contains("lease expired"), "{err}");
}

/// The plan of the statement prepared on `c` whose text matches `like`, run with `args`.
async fn prepared_plan(c: &tokio_postgres::Client, like: &str, args: &str) -> Vec<String> {
    let names = c
        .query(
            "SELECT name FROM pg_prepared_statements WHERE statement LIKE $1",
            &[&like],
        )
        .await
        .unwrap();
    let [name] = &names[..] else {
        panic!("{} prepared statements match {like}", names.len())
    };
    let name: String = name.get(0);
    c.query(&format!("EXPLAIN EXECUTE {name}({args})"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether every scan of `table` (as `alias`) in `plan` uses `index`, and there is one.
fn scans_use(plan: &[String], table: &str, index: &str) -> bool {
    let on = format!(" on {table} ");
    let scans: Vec<&String> = plan
        .iter()
        .filter(|l| l.contains(" Scan ") && l.contains(&on))
        .collect();
    !scans.is_empty() && scans.iter().all(|l| l.contains(&format!("using {index} ")))
}

#[tokio::test]
async fn statements_planned_on_an_empty_queue_stay_right_once_it_fills() {
    // A pooled connection plans each statement once, at its first execution, from what the
    // table looks like then. A worker or API process that starts on an empty queue must not
    // keep plans that walk every waiting row once a burst arrives.
    let db = TestDb::new(Schema::Shard).await;
    // No ANALYZE in between to replan them by luck.
    db.exec("ALTER TABLE jobs SET (autovacuum_enabled = off)")
        .await;
    let pool = shard_pool(&db, 1);
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let one = job(Uuid::now_v7(), "echo", json!({}), 1);
    store::enqueue(&tx, &one, LIMITS).await.unwrap();
    store::enqueue_many(&tx, &[one.clone(), one], LIMITS)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // The two claim statements: uncapped, and capped (one job or a batch).
    let lease = Duration::from_secs(30);
    let uncapped = "%$3::int8 = 9223372036854775807%";
    let capped = "%row_number()%";
    for (limit, cap) in [(10, store::UNCAPPED), (1, 5), (10, 5)] {
        let claimed = store::claim(&mut c, "w", limit, lease, cap).await.unwrap();
        assert!(claimed.is_empty());
    }
    let backlog: Vec<_> = (0..5000)
        .map(|i| job(Uuid::now_v7(), "echo", json!({"i": i}), 1))
        .collect();
    enqueue(&db, &backlog).await;

    let window = format!("{}", 10 + store::CLAIM_WINDOW);
    let plans = [
        (uncapped, "10, 'w', 5, 30000".to_string()),
        (capped, format!("10, 'w', 5, 30000, {}, {window}", i64::MIN)),
    ];
    for (like, args) in &plans {
        let plan = prepared_plan(&c, like, args).await;
        // `jobs j` is the UPDATE's target; the uncapped claim reads its candidates as
        // `jobs j_1`, the capped one locks its own by `jobs k`.
        assert!(
            scans_use(&plan, "jobs j", "jobs_pkey"),
            "the claimed rows are reached by primary key:\n{}",
            plan.join("\n")
        );
    }
    let plan = prepared_plan(&c, capped, &plans[1].1).await;
    // The candidates in claim order, locked as they are taken: a sort between the window and
    // the LIMIT would lock every row of the window that passes the cap.
    let candidates: Vec<&String> = plan
        .iter()
        .skip_while(|l| !l.contains("CTE candidates"))
        .skip(1)
        .take_while(|l| !l.contains("CTE "))
        .collect();
    assert!(
        scans_use(&plan, "jobs k", "jobs_pkey")
            && scans_use(&plan, "jobs v", "jobs_claimable")
            && scans_use(&plan, "jobs t", "jobs_claimable")
            && !candidates.is_empty()
            && !candidates.iter().any(|l| l.contains("Sort")),
        "a capped claim reads its window and cursor from the head of the claimable rows, in \
         claim order, and locks its candidates by primary key:\n{}",
        plan.join("\n")
    );
    // One job, and many in one statement.
    let enqueues = [
        (
            "INSERT INTO jobs%VALUES%",
            "gen_random_uuid(), 'r', gen_random_uuid(), '{}', 'echo', '{}', 1, NULL, 0, 0",
        ),
        ("INSERT INTO jobs%unnest%", &["'{}'"; 9].join(", ")),
    ];
    for (like, args) in enqueues {
        let plan = prepared_plan(&c, like, args).await;
        assert!(
            scans_use(&plan, "jobs h", "jobs_claimable")
                && plan.iter().any(|l| l.contains("Limit")),
            "an enqueue reads only the head of the claimable jobs:\n{}",
            plan.join("\n")
        );
    }
}

#[tokio::test]
async fn a_small_company_is_not_starved_by_a_big_backlog() {
    let db = TestDb::new(Schema::Shard).await;
    let (big, small) = (Uuid::now_v7(), Uuid::now_v7());
    let backlog: Vec<_> = (0..10_000)
        .map(|i| job(big, "echo", json!({"i": i}), 1))
        .collect();
    enqueue(&db, &backlog).await;
    let mine = enqueue_one(&db, job(small, "echo", json!({}), 1)).await;
    let mut c = db.client().await;
    let first = store::claim(&mut c, "w", 4, Duration::from_secs(30), 100)
        .await
        .unwrap();
    assert!(
        first.iter().any(|j| j.id == mine),
        "the small company's job is among the first claimed: {:?}",
        first.iter().map(|j| j.company_id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_newcomer_is_not_queued_behind_a_backlog_that_fell_behind_the_clock() {
    // A backlog worked off slower than one job per fairness quantum: its claim order lies hours
    // in the past. New jobs of other companies (one by one and in bulk) must still go first.
    let db = TestDb::new(Schema::Shard).await;
    let (big, one, bulk) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let backlog: Vec<_> = (0..500)
        .map(|i| job(big, "echo", json!({"i": i}), 1))
        .collect();
    enqueue(&db, &backlog).await;
    db.exec("UPDATE jobs SET priority = priority - 10 * 3600 * 1000000::bigint")
        .await;
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let single = match store::enqueue(&tx, &job(one, "echo", json!({}), 1), LIMITS)
        .await
        .unwrap()
    {
        store::Enqueued::Created(r) => r.view.id,
        other => panic!("{other:?}"),
    };
    tx.commit().await.unwrap();
    let many = enqueue_one(&db, job(bulk, "echo", json!({}), 1)).await;
    let first = store::claim(&mut c, "w", 4, Duration::from_secs(30), 100)
        .await
        .unwrap();
    let ids: Vec<_> = first.iter().map(|j| j.id).collect();
    assert!(
        ids.contains(&single) && ids.contains(&many),
        "both newcomers are among the first four claimed: {:?}",
        first.iter().map(|j| j.company_id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_retry_waiting_out_its_backoff_holds_back_neither_the_claim_head_nor_new_jobs() {
    // A retry keeps its place only from the end of its backoff: until then it is not the head
    // of the claimable index, and new jobs are stamped from the clock, not from its old place.
    let db = TestDb::new(Schema::Shard).await;
    let retried = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 3)).await;
    // Enqueued an hour ago.
    db.exec("UPDATE jobs SET priority = priority - 3600 * 1000000::bigint")
        .await;
    let mut c = db.client().await;
    let claimed = store::claim(&mut c, "w", 1, Duration::from_secs(30), 100)
        .await
        .unwrap();
    let failed = Outcome {
        id: retried,
        attempt: claimed[0].attempt,
        request_id: "test".into(),
        result: Err(JobError::retryable("try later")),
        retry_in: Duration::from_secs(600),
    };
    store::finish(&mut c, "w", &[failed]).await.unwrap();
    let behind_its_backoff = db
        .scalar(&format!(
            "SELECT count(*) FROM jobs WHERE id = '{retried}' AND state = 'waiting'
                AND priority >= (extract(epoch FROM run_at) * 1e6)::bigint
                AND run_at > now() + interval '9 minutes'"
        ))
        .await;
    assert_eq!(behind_its_backoff, 1);
    let fresh = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    let from_the_clock = db
        .scalar(&format!(
            "SELECT count(*) FROM jobs WHERE id = '{fresh}'
                AND priority > (extract(epoch FROM now() - interval '1 minute') * 1e6)::bigint"
        ))
        .await;
    assert_eq!(
        from_the_clock, 1,
        "a new job is not stamped from the retry's old place"
    );
}

#[tokio::test]
async fn a_pooled_transaction_keeps_the_enqueue_statements_prepared() {
    // Each POST /jobs enqueues in a pooled connection's transaction: after the first, its
    // statements cost one round trip each, with no parsing or planning.
    let db = TestDb::new(Schema::Shard).await;
    let pool = shard_pool(&db, 1);
    let mut client = pool.get().await.unwrap();
    let company = Uuid::now_v7();
    let mut cached = Vec::new();
    for i in 0..3 {
        let mut one = job(company, "echo", json!({"i": i}), 1);
        one.idempotency_key = Some(format!("key-{i}"));
        let tx = client.transaction().await.unwrap();
        store::enqueue(&tx, &one, LIMITS).await.unwrap();
        tx.commit().await.unwrap();
        cached.push(client.statement_cache.size());
    }
    assert!(
        cached[0] >= 3,
        "key lookup, waiting count and insert are cached: {cached:?}"
    );
    assert!(
        cached.windows(2).all(|w| w[0] == w[1]),
        "and reused: {cached:?}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM jobs").await, 3);
}

/// Ten waiting jobs of company `a` and one of company `b`.
async fn ten_and_one() -> (TestDb, Uuid, Uuid) {
    let db = TestDb::new(Schema::Shard).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let mut jobs: Vec<_> = (0..10).map(|_| job(a, "echo", json!({}), 1)).collect();
    jobs.push(job(b, "echo", json!({}), 1));
    enqueue(&db, &jobs).await;
    (db, a, b)
}

#[tokio::test]
async fn the_per_company_cap_bounds_concurrent_processing() {
    let (db, a, b) = ten_and_one().await;
    let mut c = db.client().await;
    let claimed = store::claim(&mut c, "w", 10, Duration::from_secs(30), 3)
        .await
        .unwrap();
    let of_a = claimed.iter().filter(|j| j.company_id == a).count();
    assert_eq!(of_a, 3, "one batch cannot exceed the cap");
    assert!(claimed.iter().any(|j| j.company_id == b));
    let more = store::claim(&mut c, "w", 10, Duration::from_secs(30), 3)
        .await
        .unwrap();
    assert!(
        more.is_empty(),
        "a is at its cap and b has nothing left: {more:?}"
    );
}

#[tokio::test]
async fn a_batch_cut_short_by_the_cap_is_topped_up_at_once_not_at_the_next_poll() {
    // A company at the head of the queue fills a claim's candidates; the cap (2) keeps two of
    // them, and the other company's job must be claimed right after, not at the next poll
    // (30 s here) or when the capped jobs finish (20 s).
    small_job_behind_a_capped_backlog(20, 100, Duration::from_secs(30)).await;
}

/// A worker with four slots, a per-company cap of 2 and `poll`, gone idle; then a big
/// company's `backlog` of long jobs (20 s), a small company's one job `behind` seconds of claim
/// order after the head (pushed back in the transaction that enqueues it, so no claim can take
/// it from the head first), and a NOTIFY. The small job must run within 10 s while the big
/// company stays at its cap.
async fn small_job_behind_a_capped_backlog(backlog: i64, behind: i64, poll: Duration) {
    let db = TestDb::new(Schema::Shard).await;
    let (big, small) = (Uuid::now_v7(), Uuid::now_v7());
    let mut opts = options("shard-t", 2);
    opts.slots = 4;
    opts.poll_interval = poll;
    let running = idle_worker(&db, builtins(&["echo", "sleep"]), opts).await;

    let backlog: Vec<_> = (0..backlog)
        .map(|_| job(big, "sleep", json!({"ms": 20_000}), 1))
        .collect();
    enqueue(&db, &backlog).await;
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let mine = store::enqueue(&tx, &job(small, "echo", json!({}), 1), LIMITS)
        .await
        .unwrap()
        .record()
        .view
        .id;
    tx.execute(
        "UPDATE jobs SET priority = priority + $2 * 1000000::bigint WHERE id = $1",
        &[&mine, &behind],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    db.exec(&format!(
        "SELECT pg_notify('{}', '')",
        store::CHANNEL_WAITING
    ))
    .await;
    assert!(
        crate::support::until_state(&db, mine, "done", Duration::from_secs(10)).await,
        "the small company's job ran while the big one was at its cap"
    );
    let processing = db
        .scalar("SELECT count(*) FROM jobs WHERE state = 'processing'")
        .await;
    assert_eq!(processing, 2, "the big company stays at its cap");
    running.stop().await;
}

/// The shared buffers (pages) the prepared statement matching `like` touches when run with
/// `args`, in a transaction that is rolled back.
async fn pages_touched(c: &mut tokio_postgres::Client, like: &str, args: &str) -> u64 {
    let name: String = c
        .query_one(
            "SELECT name FROM pg_prepared_statements WHERE statement LIKE $1",
            &[&like],
        )
        .await
        .unwrap()
        .get(0);
    let tx = c.transaction().await.unwrap();
    let plan: serde_json::Value = tx
        .query_one(
            &format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}({args})"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    let top = &plan[0]["Plan"];
    ["Shared Hit Blocks", "Shared Read Blocks"]
        .iter()
        .map(|k| top[*k].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn a_company_at_its_cap_costs_a_claim_a_bounded_look_not_a_walk_of_its_backlog() {
    // With free slots and one company at its cap, every claim used to walk all of that
    // company's waiting rows to find nothing, and each of its finished jobs set off another.
    let db = TestDb::new(Schema::Shard).await;
    let big = Uuid::now_v7();
    let backlog: Vec<_> = (0..20_000)
        .map(|i| job(big, "echo", json!({"i": i}), 1))
        .collect();
    enqueue(&db, &backlog).await;
    db.exec("VACUUM ANALYZE jobs").await;
    let pool = shard_pool(&db, 1);
    let mut c = pool.get().await.unwrap();
    let lease = Duration::from_secs(30);
    let first = store::claim(&mut c, "w", 10, lease, 2).await.unwrap();
    assert_eq!(first.len(), 2, "the cap lets two start");
    let more = store::claim_batch(&mut c, "w", 10, lease, 2, None)
        .await
        .unwrap();
    assert!(more.jobs.is_empty(), "the company is at its cap");
    assert!(
        more.next_after.is_some(),
        "the claim says that rows lie beyond its window"
    );
    assert!(
        store::claim(&mut c, "w", 1, lease, 2)
            .await
            .unwrap()
            .is_empty()
    );
    // A batch, and one job: one statement (a one-job statement that checked each row's
    // company on the spot cost several times as much here, a probe per row).
    let statements = c
        .query_one(
            // (Spelled so that this query does not match itself.)
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%SKIP' || ' LOCKED%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(
        statements, 1,
        "capped claims of one and of ten share a statement"
    );
    for limit in [10, 1] {
        let window = limit + store::CLAIM_WINDOW;
        let args = format!("{limit}, 'w', 2, 30000, {}, {window}", i64::MIN);
        let pages = pages_touched(&mut c, "%row_number()%", &args).await;
        // A window's rows lie on about 40 pages; the backlog on about 800.
        assert!(
            pages < 200,
            "a capped claim of {limit} touched {pages} pages: it walked the backlog"
        );
    }
}

#[tokio::test]
async fn a_look_past_the_window_takes_in_the_rows_that_share_its_last_claim_order() {
    // Claim orders are not unique (a bulk enqueue gives each company's first job the same
    // one): a row sharing the window's last claim order but lying past it must not be skipped
    // by the look that starts there.
    let db = TestDb::new(Schema::Shard).await;
    let (big, small) = (Uuid::now_v7(), Uuid::now_v7());
    let backlog: Vec<_> = (0..2 * store::CLAIM_WINDOW)
        .map(|_| job(big, "echo", json!({}), 1))
        .collect();
    enqueue(&db, &backlog).await;
    let mut c = db.client().await;
    let lease = Duration::from_secs(30);
    assert_eq!(
        store::claim(&mut c, "w", 2, lease, 2).await.unwrap().len(),
        2
    );
    let head = store::claim_batch(&mut c, "w", 10, lease, 2, None)
        .await
        .unwrap();
    assert!(head.jobs.is_empty(), "the big company is at its cap");
    let last = head.next_after.expect("the window was full");
    let mine = enqueue_one(&db, job(small, "echo", json!({}), 1)).await;
    db.exec(&format!(
        "UPDATE jobs SET priority = {last} WHERE id = '{mine}'"
    ))
    .await;
    let look = store::claim_batch(&mut c, "w", 10, lease, 2, Some(last))
        .await
        .unwrap();
    assert_eq!(
        look.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![mine],
        "the look from the window's last claim order takes the row that shares it"
    );
}

#[tokio::test]
async fn a_job_behind_a_capped_backlog_larger_than_a_claims_window_is_still_claimed() {
    // The window bounds each claim; the worker looks past it from a cursor that moves on at
    // each wake-up (the poll, 100 ms here), so a job of another company far back in claim
    // order (a retry that came due behind a backlog) still starts while the big company stays
    // at its cap.
    let backlog = 3 * store::CLAIM_WINDOW;
    small_job_behind_a_capped_backlog(backlog, backlog + 100, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_slot_left_below_the_refill_stride_still_takes_a_job_when_one_is_announced() {
    // Eight slots claim in strides of two when jobs finish; with seven long jobs running, the
    // one free slot must take a new job when its NOTIFY comes, not when a long job ends (20 s)
    // or at the next poll (30 s here).
    let db = TestDb::new(Schema::Shard).await;
    let mut opts = options("shard-t", 100);
    opts.slots = 8;
    opts.claim_batch = 100;
    opts.poll_interval = Duration::from_secs(30);
    let running = idle_worker(&db, builtins(&["echo", "sleep"]), opts).await;
    let notify = format!("SELECT pg_notify('{}', '')", store::CHANNEL_WAITING);

    let company = Uuid::now_v7();
    let long: Vec<_> = (0..7)
        .map(|_| job(company, "sleep", json!({"ms": 20_000}), 1))
        .collect();
    enqueue(&db, &long).await;
    db.exec(&notify).await;
    let started = std::time::Instant::now();
    loop {
        let processing = db
            .scalar("SELECT count(*) FROM jobs WHERE state = 'processing'")
            .await;
        if processing == 7 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the seven long jobs did not all start within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let short = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    db.exec(&notify).await;
    assert!(
        crate::support::until_state(&db, short, "done", Duration::from_secs(10)).await,
        "the free slot took the announced job while the long ones ran"
    );
    running.stop().await;
}

#[tokio::test]
async fn one_at_a_time_claims_respect_the_per_company_cap_too() {
    // A claim of one job takes its own statement (no batch to number per company).
    let (db, a, b) = ten_and_one().await;
    let mut c = db.client().await;
    let mut claimed = Vec::new();
    loop {
        let one = store::claim(&mut c, "w", 1, Duration::from_secs(30), 3)
            .await
            .unwrap();
        assert!(one.len() <= 1, "a claim of one took {}", one.len());
        match one.into_iter().next() {
            Some(j) => claimed.push(j.company_id),
            None => break,
        }
    }
    assert_eq!(
        claimed.iter().filter(|c| **c == a).count(),
        3,
        "{claimed:?}"
    );
    assert_eq!(
        claimed.iter().filter(|c| **c == b).count(),
        1,
        "{claimed:?}"
    );
    let processing: i64 = c
        .query_one("SELECT count(*) FROM jobs WHERE state = 'processing'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(processing, 4);
}

#[tokio::test]
async fn without_a_cap_claims_take_every_waiting_job_of_a_company() {
    let (db, _, _) = ten_and_one().await;
    let mut c = db.client().await;
    let one = store::claim(&mut c, "w", 1, Duration::from_secs(30), store::UNCAPPED)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    let rest = store::claim(&mut c, "w", 20, Duration::from_secs(30), store::UNCAPPED)
        .await
        .unwrap();
    assert_eq!(rest.len(), 10, "the other nine of a and b's one");
    assert_eq!(
        db.scalar("SELECT count(*) FROM jobs WHERE state = 'processing'")
            .await,
        11
    );
}

#[tokio::test]
async fn the_shard_pool_plans_statistics_free_and_claims_commit_asynchronously() {
    let (db, _, _) = ten_and_one().await;
    let pool = shard_pool(&db, 1);
    let mut c = pool.get().await.unwrap();
    assert!(store::has_session_options(&c).await.unwrap());
    assert!(
        !store::has_session_options(&db.client().await)
            .await
            .unwrap()
    );
    for limit in [1, 5] {
        // Inside an open transaction block the claim's SET LOCAL outlives the statement, so
        // it can be read: the commit that follows a claim does not wait for a disk flush.
        c.batch_execute("BEGIN").await.unwrap();
        let claimed = store::claim(&mut c, "w", limit, Duration::from_secs(30), 10)
            .await
            .unwrap();
        assert_eq!(claimed.len() as i64, limit);
        assert_eq!(synchronous_commit(&c).await, "off", "claim of {limit}");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    assert_eq!(
        synchronous_commit(&c).await,
        "on",
        "the session's other transactions stay durable"
    );
}

async fn synchronous_commit(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_setting('synchronous_commit')", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn bulk_enqueue_refuses_idempotency_keys_rather_than_drop_them() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let mut keyed = job(company, "echo", json!({}), 1);
    keyed.idempotency_key = Some("order-1".into());
    let err = store::enqueue_many(&tx, &[job(company, "echo", json!({}), 1), keyed], LIMITS)
        .await
        .unwrap_err();
    assert!(matches!(err, EnqueueError::KeyInBulk), "{err}");
    tx.commit().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM jobs").await, 0);
}

#[tokio::test]
async fn backpressure_refuses_the_whole_batch_and_writes_nothing() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let jobs: Vec<_> = (0..6).map(|_| job(company, "echo", json!({}), 1)).collect();
    let err = store::enqueue_many(
        &tx,
        &jobs,
        EnqueueLimits {
            max_waiting_per_company: 5,
            shard_full: false,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, EnqueueError::CompanyFull { limit: 5, .. }),
        "{err}"
    );
    drop(tx);
    let n: i64 = c
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// A shard with two finished jobs of one company: an `echo` (done) and a job of an unknown
/// kind (dead-lettered); returns the database, the company and the two job ids.
async fn one_done_one_dead() -> (TestDb, Uuid, Vec<Uuid>) {
    let db = TestDb::new(Schema::Shard).await;
    let w = worker(&db, 100);
    let company = Uuid::now_v7();
    let ids = enqueue(
        &db,
        &[
            job(company, "echo", json!({}), 1),
            job(company, "no-such-kind", json!({}), 1),
        ],
    )
    .await;
    w.try_claim_and_run_one().await.unwrap();
    w.try_claim_and_run_one().await.unwrap();
    (db, company, ids)
}

#[tokio::test]
async fn depth_counts_the_live_queue_and_dead_letters_by_kind_not_the_history() {
    let (db, company, _) = one_done_one_dead().await;
    enqueue(
        &db,
        &[
            job(company, "echo", json!({}), 1),
            job(company, "echo", json!({}), 1),
            job(company, "sleep", json!({"ms": 1}), 1),
        ],
    )
    .await;
    let mut c = db.client().await;
    let mut depth = store::depth(&mut c, true).await.unwrap();
    depth.sort();
    let expect = |s: &str, k: &str, n: i64| (s.to_owned(), k.to_owned(), n);
    assert_eq!(
        depth,
        vec![
            expect("error", "no-such-kind", 1),
            expect("waiting", "echo", 2),
            expect("waiting", "sleep", 1),
        ]
    );
    // Without the dead letters (counted less often: nothing bounds them).
    let mut live = store::depth(&mut c, false).await.unwrap();
    live.sort();
    assert_eq!(live, depth[1..].to_vec());
}

#[tokio::test]
async fn finished_rows_are_pruned_after_retention_but_dead_letters_stay() {
    let (db, _, ids) = one_done_one_dead().await;
    let mut c = db.client().await;
    c.execute(
        "UPDATE jobs SET finished_at = now() - interval '8 days'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        store::prune(&mut c, Duration::from_secs(7 * 86_400), 1000)
            .await
            .unwrap(),
        1
    );
    let left: Vec<Uuid> = c
        .query("SELECT id FROM jobs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        vec![ids[1]],
        "the error row stays until an operator acts"
    );

    // A dead letter that failed long ago but was resolved today keeps its note for the
    // retention, counted from the resolution.
    let week = Duration::from_secs(7 * 86_400);
    store::resolve(&c, ids[1], "handled by hand").await.unwrap();
    assert_eq!(store::prune(&mut c, week, 1000).await.unwrap(), 0);
    c.execute(
        "UPDATE jobs SET updated_at = now() - interval '8 days'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(store::prune(&mut c, week, 1000).await.unwrap(), 1);

    // Published events older than the retention go; recent and unpublished ones stay.
    c.batch_execute(
        "DELETE FROM outbox;
         INSERT INTO outbox (events, published_at) VALUES
             ('[]', now() - interval '8 days'), ('[]', NULL),
             ('[]', now() - interval '8 days'), ('[]', now());",
    )
    .await
    .unwrap();
    assert_eq!(store::prune(&mut c, week, 1000).await.unwrap(), 2);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 2);
}

#[test]
fn backoff_grows_exponentially_with_jitter_and_a_ceiling() {
    use tenantry_queue::worker::backoff;
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(10);
    for _ in 0..100 {
        let b1 = backoff(1, base, max);
        let b4 = backoff(4, base, max);
        // Never below the base, even with the jitter: [base, 1.25 base] for the first retry.
        assert!(b1 >= base && b1 <= Duration::from_millis(125), "{b1:?}");
        // 800 ms doubled three times from 100 ms: [0.9375, 1.25] of it.
        assert!(
            b4 >= Duration::from_millis(750) && b4 <= Duration::from_millis(1000),
            "{b4:?}"
        );
        // At the cap: spread over [0.75, 1] of it.
        let top = backoff(30, base, max);
        assert!(top >= max.mul_f64(0.75) && top <= max, "{top:?}");
    }
}

#[test]
fn job_errors_say_whether_to_retry() {
    assert!(JobError::permanent("x").permanent);
    assert!(!JobError::retryable("x").permanent);
}

#[tokio::test]
async fn every_waiter_is_woken_when_many_jobs_finish_at_once() {
    // The worker sends the finished notifications of concurrent completions together; none
    // may be lost in the merge.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let jobs: Vec<_> = (0..40)
        .map(|i| job(company, "echo", json!({"i": i}), 1))
        .collect();
    let ids = enqueue(&db, &jobs).await;
    let api = connected_listener(&db, 100).await;
    let waiters: Vec<_> = ids.iter().map(|id| api.wait_for(*id).unwrap()).collect();
    let c = db.client().await;
    for id in &ids {
        store::await_job(&c, company, *id, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let running = spawn_worker(worker(&db, 100));
    for (id, w) in ids.iter().zip(waiters) {
        assert!(
            w.wait(Duration::from_secs(20)).await,
            "job {id} finished unannounced"
        );
        assert_eq!(state_of(&db, *id).await.0, "done");
    }
    running.stop().await;
}

#[tokio::test]
async fn only_jobs_a_request_may_wait_for_are_announced() {
    // Every API process of the shard receives every finished notification, so one is sent
    // only for a job a request may still be waiting for: marked when enqueued (the API's
    // synchronous wait) or by a later long poll (`await_job`), and not once the mark ran out.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let mut jobs: Vec<_> = (0..5)
        .map(|i| job(company, "echo", json!({"i": i}), 1))
        .collect();
    jobs[1].awaited_for = Duration::from_secs(60);
    let ids = enqueue(&db, &jobs).await;
    let (nobody, at_enqueue, long_poll, ran_out, last) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    let api = connected_listener(&db, 100).await;
    let mut waiters: std::collections::HashMap<Uuid, _> = ids
        .iter()
        .map(|id| (*id, api.wait_for(*id).unwrap()))
        .collect();
    let mut c = db.client().await;
    for id in [long_poll, ran_out, last] {
        let r = store::await_job(&c, company, id, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.view.id, r.view.state), (id, JobState::Waiting));
    }
    // A mark that already reaches further is left as it is: no new row version.
    let mark = "SELECT xmin::text FROM jobs WHERE id = $1";
    let long: String = c.query_one(mark, &[&last]).await.unwrap().get(0);
    let r = store::await_job(&c, company, last, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.view.id, r.view.state), (last, JobState::Waiting));
    let still: String = c.query_one(mark, &[&last]).await.unwrap().get(0);
    assert_eq!(long, still);
    c.execute(
        "UPDATE jobs SET awaited_until = now() - interval '1 second' WHERE id = $1",
        &[&ran_out],
    )
    .await
    .unwrap();
    // One at a time, in enqueue order: the notifications arrive in the order of the commits.
    for id in &ids {
        let claimed = store::claim(&mut c, "w", 1, Duration::from_secs(30), store::UNCAPPED)
            .await
            .unwrap();
        assert_eq!(claimed[0].id, *id);
        let (done, _) = store::finish(&mut c, "w", &[ok_by(*id, 1)]).await.unwrap();
        assert_eq!(done[0].state, JobState::Done);
        assert_eq!(done[0].awaited, [at_enqueue, long_poll, last].contains(id));
    }
    let last_waiter = waiters.remove(&last).unwrap();
    assert!(
        last_waiter.wait(Duration::from_secs(20)).await,
        "the last job was announced"
    );
    // Everything announced before it has arrived by now.
    for (id, heard) in [
        (nobody, false),
        (at_enqueue, true),
        (long_poll, true),
        (ran_out, false),
    ] {
        let waiter = waiters.remove(&id).unwrap();
        assert_eq!(waiter.wait(Duration::ZERO).await, heard, "job {id}");
    }
    // A finished job is read as it is, and not marked again.
    let before: String = c.query_one(mark, &[&nobody]).await.unwrap().get(0);
    let r = store::await_job(&c, company, nobody, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.view.state, JobState::Done);
    let after: String = c.query_one(mark, &[&nobody]).await.unwrap().get(0);
    assert_eq!(before, after);
    // Another company's job is not found, and not marked.
    assert!(
        store::await_job(&c, Uuid::now_v7(), last, Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
}

struct Panics;
impl tenantry_queue::Handler for Panics {
    fn run<'a>(
        &'a self,
        _job: &'a tenantry_queue::ClaimedJob,
    ) -> tenantry_queue::worker::BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(async { panic!("the handler's own bug") })
    }
}

/// Finishes (with `null`) only when its gate is opened.
struct Gated(std::sync::Arc<tokio::sync::Notify>);
impl tenantry_queue::Handler for Gated {
    fn run<'a>(
        &'a self,
        _job: &'a tenantry_queue::ClaimedJob,
    ) -> tenantry_queue::worker::BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(async move {
            self.0.notified().await;
            Ok(serde_json::Value::Null)
        })
    }
}

/// Panics before it has a future to return.
struct PanicsEarly;
impl tenantry_queue::Handler for PanicsEarly {
    fn run<'a>(
        &'a self,
        _job: &'a tenantry_queue::ClaimedJob,
    ) -> tenantry_queue::worker::BoxFuture<'a, Result<serde_json::Value, JobError>> {
        panic!("the handler's set-up bug")
    }
}

#[tokio::test]
async fn operator_listings_show_the_newest_jobs_first_and_stop_at_the_limit() {
    // `tenantry admin jobs list` reads through these: newest first along the primary key (UUID
    // v7, creation order), dead letters newest first by creation time.
    let db = TestDb::new(Schema::Shard).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let mut ids = Vec::new();
    for i in 0..6 {
        let company = if i % 2 == 0 { a } else { b };
        ids.push(enqueue_one(&db, job(company, "echo", json!({"i": i}), 1)).await);
    }
    let c = db.client().await;
    let listed = |rows: Vec<tenantry_queue::JobRecord>| -> Vec<Uuid> {
        rows.iter().map(|r| r.view.id).collect()
    };
    let newest: Vec<Uuid> = ids.iter().rev().take(3).copied().collect();
    let full = store::list(&c, None, None, 3, true).await.unwrap();
    assert_eq!(full[0].params, json!({"i": 5}));
    assert_eq!(listed(full), newest);
    // The table's listing leaves the payloads in the database (up to queue.max_result_size
    // a row), and only them.
    let summary = store::list(&c, None, None, 3, false).await.unwrap();
    assert!(
        summary
            .iter()
            .all(|r| r.params.is_null() && r.user_context.is_null() && r.view.result.is_none()),
        "{summary:?}"
    );
    assert_eq!(summary[0].view.kind, "echo");
    assert_eq!(listed(summary), newest);
    let of_b: Vec<Uuid> = ids.iter().rev().step_by(2).copied().collect();
    assert_eq!(
        listed(store::list(&c, None, Some(b), 10, true).await.unwrap()),
        of_b,
        "the company's jobs only, newest first"
    );
    assert_eq!(
        listed(
            store::list(&c, Some(JobState::Waiting), Some(a), 2, true)
                .await
                .unwrap()
        ),
        vec![ids[4], ids[2]]
    );
    // Three dead letters, created an hour, two hours and three hours ago: newest first.
    for (n, id) in ids.iter().take(3).enumerate() {
        db.exec(&format!(
            "UPDATE jobs SET state = 'error', error = 'x', finished_at = now(),
                    created_at = now() - interval '{} hours' WHERE id = '{id}'",
            3 - n
        ))
        .await;
    }
    assert_eq!(
        listed(
            store::list(&c, Some(JobState::Error), None, 2, false)
                .await
                .unwrap()
        ),
        vec![ids[2], ids[1]]
    );
    assert_eq!(
        listed(
            store::list(&c, Some(JobState::Error), Some(a), 10, true)
                .await
                .unwrap()
        ),
        vec![ids[2], ids[0]]
    );
}

#[tokio::test]
async fn a_finished_job_keeps_its_lease_until_its_outcome_is_written() {
    // The database refuses the outcome of a job that ran fine for longer than a lease (here a
    // trigger; in life a failover or a completer far behind). Its lease must still be renewed
    // meanwhile: otherwise the rescuer dead-letters the job as "lease expired" and the outcome,
    // once the database takes it, is discarded as late.
    let db = TestDb::new(Schema::Shard).await;
    db.exec(REFUSE_DONE).await;
    let mut opts = options("shard-t", 100);
    opts.lease = Duration::from_secs(2);
    opts.rescue_interval = Duration::from_millis(200);
    let running = spawn_worker(worker_from(&db, builtins(&["echo"]), opts));
    let id = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    // Two and a half leases with the outcome refused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        state_of(&db, id).await.0,
        "processing",
        "the job is still leased"
    );
    db.exec("DROP TRIGGER refuse_done ON jobs").await;
    assert!(
        crate::support::until_state(&db, id, "done", Duration::from_secs(10)).await,
        "the outcome was written once the database took it: {:?}",
        state_of(&db, id).await
    );
    running.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_fails_its_attempt_not_the_worker() {
    let db = TestDb::new(Schema::Shard).await;
    let mut registry = Registry::default();
    registry.register("panics", Panics);
    registry.register("panics_early", PanicsEarly);
    let w = worker_with(&db, 100, registry);
    for (kind, message) in [
        ("panics", "handler panicked: the handler's own bug"),
        ("panics_early", "handler panicked: the handler's set-up bug"),
    ] {
        let id = enqueue_one(&db, job(Uuid::now_v7(), kind, json!({}), 2)).await;
        let ran = w.try_claim_and_run_one().await.unwrap();
        assert_eq!(
            ran,
            Some((id, JobState::Waiting)),
            "{kind}: retried, like any failure"
        );
        let error: String = db
            .client()
            .await
            .query_one("SELECT error FROM jobs WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(error, message);
    }
}

/// Returns what PostgreSQL cannot store: a result holding U+0000, or (`{"fail": true}`) an
/// error message holding it and longer than a record keeps.
struct Unstorable;
impl tenantry_queue::Handler for Unstorable {
    fn run<'a>(
        &'a self,
        job: &'a tenantry_queue::ClaimedJob,
    ) -> tenantry_queue::worker::BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(async move {
            if job.params["fail"] == true {
                Err(JobError::permanent(format!("nul\0{}", "é".repeat(5000))))
            } else {
                Ok(json!({"s": "a\0b"}))
            }
        })
    }
}

#[tokio::test]
async fn an_outcome_postgresql_cannot_store_fails_its_own_job_not_its_completion_batch() {
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let mut jobs = vec![
        job(company, "unstorable", json!({}), 3),
        job(company, "unstorable", json!({"fail": true}), 3),
    ];
    jobs.extend((0..6).map(|i| job(company, "echo", json!({"i": i}), 1)));
    let ids = enqueue(&db, &jobs).await;
    let mut registry = Registry::default();
    registry.register("unstorable", Unstorable);
    registry.register("echo", tenantry_queue::worker::Echo);
    let running = spawn_worker(worker_with(&db, 100, registry));
    let settled = crate::support::until_count(
        &db,
        "SELECT count(*) FROM jobs WHERE state IN ('done', 'error')",
        8,
        Duration::from_secs(20),
    )
    .await;
    running.stop().await;
    assert_eq!(settled, 8, "every job was recorded");
    let c = db.client().await;
    let error_of = |id: Uuid| {
        let c = &c;
        async move {
            let row = c
                .query_one(
                    "SELECT state, attempts, error FROM jobs WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            (
                row.get::<_, String>(0),
                row.get::<_, i32>(1),
                row.get::<_, String>(2),
            )
        }
    };
    let (state, attempts, error) = error_of(ids[0]).await;
    assert_eq!(
        (state.as_str(), attempts),
        ("error", 1),
        "no retry: it cannot get better"
    );
    assert!(error.contains("U+0000"), "{error}");
    let (state, _, error) = error_of(ids[1]).await;
    assert_eq!(state, "error");
    assert!(error.starts_with("nul\u{FFFD}éé"), "{error:.40}");
    assert!(
        error.len() <= 4096 && error.ends_with('…'),
        "{}",
        error.len()
    );
    for id in &ids[2..] {
        assert_eq!(state_of(&db, *id).await.0, "done");
    }
}

#[tokio::test]
async fn a_rolled_back_enqueue_leaves_no_job_singly_or_in_bulk() {
    // A job exists exactly when the caller's write commits.
    let db = TestDb::new(Schema::Shard).await;
    let company = Uuid::now_v7();
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    store::enqueue(&tx, &job(company, "echo", json!({}), 1), LIMITS)
        .await
        .unwrap();
    let bulk: Vec<_> = (0..3)
        .map(|i| job(company, "echo", json!({"i": i}), 1))
        .collect();
    store::enqueue_many(&tx, &bulk, LIMITS).await.unwrap();
    let count = "SELECT count(*) FROM jobs";
    let inside: i64 = tx.query_one(count, &[]).await.unwrap().get(0);
    assert_eq!(inside, 4);
    assert_eq!(
        db.scalar(count).await,
        0,
        "nobody else sees them before the commit"
    );
    tx.rollback().await.unwrap();
    let after: i64 = c.query_one(count, &[]).await.unwrap().get(0);
    assert_eq!(after, 0, "nothing is left of a rolled-back enqueue");
}

/// Counts the notifications on `channel` from now on (the client must be kept).
async fn count_notifications(
    db: &TestDb,
    channel: &str,
) -> (
    tokio_postgres::Client,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = n.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = m {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    (client, n)
}

/// Waits until `n` jobs are `done`, at most `limit`.
async fn until_done(db: &TestDb, n: i64, limit: Duration) {
    let done = "SELECT count(*) FROM jobs WHERE state = 'done'";
    let got = crate::support::until_count(db, done, n, limit).await;
    assert_eq!(got, n, "jobs done within {limit:?}");
}

#[tokio::test]
async fn the_notifier_wakes_an_idle_worker_and_coalesces_a_burst() {
    let db = TestDb::new(Schema::Shard).await;
    // A worker that would not poll for a minute: only the notification can wake it.
    let mut opts = options("shard-t", 100);
    opts.poll_interval = Duration::from_secs(60);
    let running = idle_worker(&db, builtins(&["echo"]), opts).await;
    let notifier = tenantry_queue::Notifier::start(shard_pool(&db, 2), running.token());
    let (_listening, heard) = count_notifications(&db, store::CHANNEL_WAITING).await;

    // A bulk enqueue and a burst of pokes for it: a notification or two, never one per row or
    // per poke.
    let bulk: Vec<_> = (0..1000)
        .map(|i| job(Uuid::now_v7(), "echo", json!({"i": i}), 1))
        .collect();
    enqueue(&db, &bulk).await;
    for _ in 0..200 {
        notifier.poke();
    }
    until_done(&db, 1000, Duration::from_secs(20)).await;
    let n = heard.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2).contains(&n),
        "{n} notifications for one bulk enqueue"
    );
    running.stop().await;
}

#[tokio::test]
async fn the_fallback_poll_runs_a_job_whose_notification_was_lost() {
    let db = TestDb::new(Schema::Shard).await;
    let mut opts = options("shard-t", 100);
    opts.poll_interval = Duration::from_millis(300);
    let running = idle_worker(&db, builtins(&["echo"]), opts).await;
    // Committed, and nobody notifies.
    let id = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    until_done(&db, 1, Duration::from_secs(10)).await;
    assert_eq!(state_of(&db, id).await, ("done".into(), 1));
    running.stop().await;
}

/// Counts how many of its jobs run at once.
#[derive(Default)]
struct Overlap {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}
struct Overlapping(std::sync::Arc<Overlap>);
impl tenantry_queue::Handler for Overlapping {
    fn run<'a>(
        &'a self,
        _job: &'a tenantry_queue::ClaimedJob,
    ) -> tenantry_queue::worker::BoxFuture<'a, Result<serde_json::Value, JobError>> {
        use std::sync::atomic::Ordering::SeqCst;
        Box::pin(async move {
            let now = self.0.now.fetch_add(1, SeqCst) + 1;
            self.0.most.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.0.now.fetch_sub(1, SeqCst);
            Ok(serde_json::Value::Null)
        })
    }
}

#[tokio::test]
async fn a_worker_runs_no_more_jobs_at_once_than_it_has_slots() {
    // Claims are sized to the free slots: 20 waiting jobs, 3 slots, claims of up to 500.
    let db = TestDb::new(Schema::Shard).await;
    let jobs: Vec<_> = (0..20)
        .map(|i| job(Uuid::now_v7(), "overlap", json!({"i": i}), 1))
        .collect();
    enqueue(&db, &jobs).await;
    let overlap = std::sync::Arc::new(Overlap::default());
    let mut registry = Registry::default();
    registry.register("overlap", Overlapping(overlap.clone()));
    let queue = dev_config().queue;
    let opts = WorkerOptions::from_config("shard-t", 3, &queue, Duration::from_secs(1));
    assert!(opts.claim_batch > 3);
    let running = spawn_worker(worker_from(&db, registry, opts));
    until_done(&db, 20, Duration::from_secs(20)).await;
    running.stop().await;
    assert_eq!(
        overlap.most.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "three slots, all busy, never more"
    );
}

#[tokio::test]
async fn a_stopping_worker_claims_nothing_new_while_its_running_job_finishes() {
    let db = TestDb::new(Schema::Shard).await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut registry = Registry::default();
    registry.register("gated", Gated(gate.clone()));
    registry.register("echo", tenantry_queue::worker::Echo);
    let mut opts = options("shard-t", 100);
    opts.grace = Duration::from_secs(10);
    let running = spawn_worker(worker_from(&db, registry, opts));
    let held = enqueue_one(&db, job(Uuid::now_v7(), "gated", json!({}), 1)).await;
    db.exec(&format!("NOTIFY {}", store::CHANNEL_WAITING)).await;
    assert!(crate::support::until_state(&db, held, "processing", Duration::from_secs(10)).await);
    running.token().cancel();
    // While the running job finishes, new work arrives and is announced; the gate opens only
    // once the announcement was delivered (to this test's own LISTEN connection, and so to
    // the worker's about as soon) and the worker had time to act on it.
    let (_listening, heard) = count_notifications(&db, store::CHANNEL_WAITING).await;
    let late = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    db.exec(&format!("NOTIFY {}", store::CHANNEL_WAITING)).await;
    let what = || "the NOTIFY never arrived".to_string();
    crate::support::until(Duration::from_secs(10), what, || {
        heard.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.notify_one();
    running.join().await;
    assert_eq!(state_of(&db, held).await, ("done".into(), 1));
    assert_eq!(
        state_of(&db, late).await,
        ("waiting".into(), 0),
        "the stopping worker never claimed it"
    );
}

#[tokio::test]
async fn a_stopping_worker_whose_outcome_is_stuck_still_gives_back_its_unfinished_job_in_time() {
    // `tenantry serve` abandons a role 2 s after the grace period. A completion that cannot
    // finish (here held up by a lock on the outbox) must not keep the worker from giving back
    // the job it abandoned at the end of the grace period: left leased to a stopped worker, the
    // rescuer would count the attempt and a job allowed one would go to the dead letters.
    let db = TestDb::new(Schema::Shard).await;
    let opts = options("shard-t", 100);
    let grace = opts.grace;
    let running = spawn_worker(worker_from(&db, builtins(&["echo", "sleep"]), opts));
    let long = enqueue_one(&db, job(Uuid::now_v7(), "sleep", json!({"ms": 60000}), 1)).await;
    db.exec(&format!("NOTIFY {}", store::CHANNEL_WAITING)).await;
    assert!(crate::support::until_state(&db, long, "processing", Duration::from_secs(10)).await);
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE outbox IN SHARE MODE")
        .await
        .unwrap();
    let quick = enqueue_one(&db, job(Uuid::now_v7(), "echo", json!({}), 1)).await;
    db.exec(&format!("NOTIFY {}", store::CHANNEL_WAITING)).await;
    let what = || "the quick job's completion never started waiting for the lock".to_string();
    let waiting_for_lock = || async {
        // A completion (not the rescuer, which writes to the outbox too) waiting for it.
        db.scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE l.relation = 'outbox'::regclass AND NOT l.granted
                AND a.query NOT LIKE 'WITH expired%'",
        )
        .await
    };
    let started = std::time::Instant::now();
    while waiting_for_lock().await == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", what());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopping = std::time::Instant::now();
    // Bounded, so that a worker waiting for its completion fails the test rather than hang it.
    tokio::time::timeout(grace + Duration::from_secs(5), running.stop())
        .await
        .expect("the worker did not stop");
    let took = stopping.elapsed();
    // `tenantry serve` abandons a role 2 s after the grace period.
    assert!(
        took < grace + Duration::from_secs(2),
        "stopping took {took:?} with a grace period of {grace:?}"
    );
    assert_eq!(
        state_of(&db, long).await,
        ("waiting".into(), 0),
        "the abandoned job was given back, its attempt not counted"
    );
    // Its completion waits for the outbox's lock before it touches the job's row, so the job is
    // given back too: its outcome was never written, and it runs again (at least once). The
    // completion, should it still go on, is fenced off by the lease it no longer holds.
    assert_eq!(state_of(&db, quick).await, ("waiting".into(), 0));
    lock.rollback().await.unwrap();
}

#[tokio::test]
async fn a_stopping_worker_gives_back_a_job_whose_row_was_locked_for_a_moment() {
    // At the end of the grace period the release skips rows another transaction holds
    // locked rather than wait for them. A long poll marking its job locks the row for a
    // moment: the release must try again once it is free, or the job stays leased to the
    // stopped worker and the rescuer counts an attempt it never finished.
    let db = TestDb::new(Schema::Shard).await;
    let opts = options("shard-t", 100);
    let grace = opts.grace;
    let running = spawn_worker(worker_from(&db, builtins(&["sleep"]), opts));
    let long = enqueue_one(&db, job(Uuid::now_v7(), "sleep", json!({"ms": 60000}), 1)).await;
    db.exec(&format!("NOTIFY {}", store::CHANNEL_WAITING)).await;
    assert!(crate::support::until_state(&db, long, "processing", Duration::from_secs(10)).await);
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", &[&long])
        .await
        .unwrap();
    let stopping = tokio::spawn(running.stop());
    // Past the grace period, when the release first runs, and well before its end.
    tokio::time::sleep(grace + Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the worker did not stop")
        .unwrap();
    assert_eq!(
        state_of(&db, long).await,
        ("waiting".into(), 0),
        "given back once its row was free, its attempt not counted"
    );
}

#[tokio::test]
async fn finished_rows_are_pruned_in_batches_of_the_given_size() {
    let db = TestDb::new(Schema::Shard).await;
    let jobs: Vec<_> = (0..5)
        .map(|_| job(Uuid::now_v7(), "echo", json!({}), 1))
        .collect();
    enqueue(&db, &jobs).await;
    db.exec("UPDATE jobs SET state = 'done', finished_at = now() - interval '8 days'")
        .await;
    let mut c = db.client().await;
    let week = Duration::from_secs(7 * 86_400);
    let mut passes = Vec::new();
    for _ in 0..4 {
        passes.push(store::prune(&mut c, week, 2).await.unwrap());
    }
    assert_eq!(passes, [2, 2, 1, 0]);
}

#[test]
fn built_in_kinds_are_off_unless_configured_and_attempts_are_per_kind() {
    let mut queue = dev_config().queue;
    assert!(
        Registry::from_config(&queue).kinds().is_empty(),
        "echo and sleep are diagnostics: off by default"
    );
    queue.builtin_kinds = vec!["echo".into(), "sleep".into()];
    queue.max_attempts.insert("sleep".into(), 3);
    let r = Registry::from_config(&queue);
    assert_eq!(r.kinds(), ["echo", "sleep"]);
    assert_eq!((r.max_attempts("sleep"), r.max_attempts("echo")), (3, 1));
}

/// Keeps what the worker hands its handler.
struct Captures(std::sync::Arc<std::sync::Mutex<Option<tenantry_queue::ClaimedJob>>>);
impl tenantry_queue::Handler for Captures {
    fn run<'a>(
        &'a self,
        job: &'a tenantry_queue::ClaimedJob,
    ) -> tenantry_queue::worker::BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(async move {
            *self.0.lock().unwrap() = Some(job.clone());
            Ok(serde_json::Value::Null)
        })
    }
}

#[tokio::test]
async fn a_handler_gets_the_jobs_company_caller_params_and_request_id() {
    let db = TestDb::new(Schema::Shard).await;
    let seen = std::sync::Arc::default();
    let mut registry = Registry::default();
    registry.register("capture", Captures(std::sync::Arc::clone(&seen)));
    let w = worker_with(&db, 100, registry);
    let company = Uuid::now_v7();
    let mut new = job(company, "capture", json!({"n": 7}), 1);
    new.user_context = json!({"user_id": "u-1", "role": "member"});
    let id = enqueue_one(&db, new.clone()).await;
    w.try_claim_and_run_one().await.unwrap();
    let got = seen.lock().unwrap().take().expect("the handler ran");
    assert_eq!(got.id, id);
    assert_eq!(got.company_id, company);
    assert_eq!(got.user_context, new.user_context);
    assert_eq!(got.params, json!({"n": 7}));
    assert_eq!(got.request_id, new.request_id);
    assert_eq!((got.kind.as_str(), got.attempt), ("capture", 1));
}

#[tokio::test]
async fn the_worker_counts_completions_retries_dead_letters_rescues_and_run_times() {
    let db = TestDb::new(Schema::Shard).await;
    // Its own shard label: the metrics are process-wide and tests run side by side.
    let shard = format!("shard-metrics-{}", Uuid::new_v4().simple());
    let mut registry = Registry::default();
    registry.register("echo", tenantry_queue::worker::Echo);
    registry.register("panics", PanicsEarly);
    let mut opts = options(&shard, 100);
    opts.rescue_interval = Duration::from_millis(100);
    let company = Uuid::now_v7();
    let ids = enqueue(
        &db,
        &[
            job(company, "echo", json!({}), 1),
            job(company, "panics", json!({}), 2),
            job(company, "panics", json!({}), 1),
        ],
    )
    .await;
    // A job whose worker died: its lease ran out a minute ago.
    db.exec(&format!(
        "UPDATE jobs SET state = 'processing', worker_id = 'dead', attempts = 1,
                lease_expires_at = now() - interval '1 minute', max_attempts = 3
          WHERE id = '{}'",
        ids[0]
    ))
    .await;
    let running = spawn_worker(worker_from(&db, registry, opts));
    let event = |name: &str| {
        tenantry_queue::metrics::EVENTS
            .with_label_values(&[&shard, name])
            .get()
    };
    let started = std::time::Instant::now();
    while !(event("completed") == 1 && event("dead_lettered") == 2 && event("retried") == 1) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "completed {}, dead-lettered {}, retried {}, rescued {}",
            event("completed"),
            event("dead_lettered"),
            event("retried"),
            event("rescued")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
    // The rescued echo job ran and completed; the panicking job with two attempts was retried
    // once and then dead-lettered, the one with a single attempt dead-lettered at once.
    assert_eq!(event("rescued"), 1);
    assert_eq!(state_of(&db, ids[0]).await, ("done".into(), 2));
    let runs = |kind: &str| {
        tenantry_queue::metrics::RUN_SECONDS
            .with_label_values(&[&shard, kind])
            .get_sample_count()
    };
    assert_eq!((runs("echo"), runs("panics")), (1, 3));
    let starts = tenantry_queue::metrics::ENQUEUE_TO_START_SECONDS
        .with_label_values(&[&shard, "panics"])
        .get_sample_count();
    assert_eq!(starts, 3, "each attempt's start is timed");
    let claims = tenantry_queue::metrics::CLAIM_SECONDS
        .with_label_values(&[&shard])
        .get_sample_count();
    assert!(claims >= 1);
}

/// Listens on a local port, accepts connections and never says anything; returns the port.
fn silent_server() -> u16 {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().flatten() {
            held.push(conn);
        }
    });
    port
}

#[tokio::test]
async fn a_connection_to_several_silent_hosts_is_given_up_once_each_has_had_its_timeout() {
    // tokio-postgres's connect_timeout covers the TCP connect only, and hosts are tried in
    // turn: the whole connection is bounded by the timeout once per host, not for ever (and not
    // by a single host's share, which would cut off a URL's later hosts).
    let (one, two) = (silent_server(), silent_server());
    let url = tenantry_core::secret::DatabaseUrl::new(format!(
        "postgres://postgres@127.0.0.1:{one},127.0.0.1:{two}/nowhere"
    ));
    let mut config = dev_config().database;
    config.connect_timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let err = db::connect(&url, &config, "test").await.unwrap_err();
    let err = format!("{err:#}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(err.contains("within 600ms"), "{err}");
}

#[tokio::test]
async fn a_listen_connection_to_a_server_that_never_answers_is_given_up_and_tried_again() {
    // A server (or a paused pooler) that accepts TCP and then says nothing must not hold the
    // LISTEN session's connect for ever: it is given up after connect_timeout and tried again,
    // so waiters and workers are not left without wake-ups until the process restarts.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(conn);
        }
    });
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(addr.port())
        .user("postgres")
        .dbname("nowhere")
        .connect_timeout(Duration::from_millis(300));
    let stop = CancellationToken::new();
    let listener = Listener::start(pg, 10, stop.clone());
    crate::support::until(
        Duration::from_secs(10),
        || "the LISTEN session never tried a second connection".into(),
        || accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2,
    )
    .await;
    assert!(!listener.is_connected());
    stop.cancel();
}

#[tokio::test]
async fn a_database_outage_longer_than_a_lease_does_not_dead_letter_the_jobs_running_through_it() {
    // Every lease runs out while the database is away, the heartbeats with it. Once it is
    // back, the rescuer must give the heartbeats time to renew rather than take back (and with
    // one attempt, dead-letter) the jobs that ran on all along.
    let db = TestDb::new(Schema::Shard).await;
    let (proxy, through) = tenantry_testkit::proxy::TcpProxy::in_front_of(&db.url).await;
    let mut opts = options("shard-outage", 100);
    opts.lease = Duration::from_secs(2);
    opts.rescue_interval = Duration::from_millis(100);
    let mut dbcfg = dev_config().database;
    dbcfg.connect_timeout = Duration::from_millis(500);
    let pool = store::pool(
        &tenantry_core::secret::DatabaseUrl::new(through),
        4,
        &dbcfg,
        "test",
    )
    .unwrap();
    let running = spawn_worker(Worker::new(
        pool,
        builtins(&["echo", "sleep"]),
        opts,
        listener(&db, 10),
    ));
    let id = enqueue_one(&db, job(Uuid::now_v7(), "sleep", json!({"ms": 5000}), 1)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state_of(&db, id).await.0 != "processing" {
        assert!(std::time::Instant::now() < deadline, "the job started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expired: bool = db
        .client()
        .await
        .query_one(
            "SELECT lease_expires_at < now() FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(expired, "the lease ran out during the outage");
    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let state = loop {
        let (state, attempts) = state_of(&db, id).await;
        if state != "processing" && state != "waiting" {
            break (state, attempts);
        }
        assert!(std::time::Instant::now() < deadline, "the job finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        state,
        ("done".to_owned(), 1),
        "ran once, through the outage"
    );
    running.stop().await;
}

/// Never finishes: a handler awaiting a call that has no timeout of its own.
struct Hangs;
impl tenantry_queue::Handler for Hangs {
    fn run<'a>(
        &'a self,
        _job: &'a tenantry_queue::ClaimedJob,
    ) -> tenantry_queue::worker::BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn an_attempt_that_outruns_run_timeout_is_stopped_and_fails_freeing_its_slot() {
    // The heartbeat renews a running job's lease for as long as its handler runs, so without a
    // deadline a hung handler held its slot and its company's share of the cap for good.
    let db = TestDb::new(Schema::Shard).await;
    let mut registry = builtins(&["echo"]);
    registry.register("hangs", Hangs);
    let mut opts = options("shard-hang", 100);
    opts.slots = 1;
    opts.run_timeout = Duration::from_millis(300);
    let running = spawn_worker(worker_from(&db, registry, opts));
    let company = Uuid::now_v7();
    let hung = enqueue_one(&db, job(company, "hangs", json!({}), 1)).await;
    let next = enqueue_one(&db, job(company, "echo", json!({}), 1)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state_of(&db, next).await.0 != "done" || state_of(&db, hung).await.0 != "error" {
        assert!(
            std::time::Instant::now() < deadline,
            "the one slot was freed: {:?} {:?}",
            state_of(&db, hung).await,
            state_of(&db, next).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error: String = db
        .client()
        .await
        .query_one(
            "SELECT error FROM jobs WHERE id = $1 AND state = 'error'",
            &[&hung],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        error,
        "stopped after running longer than queue.run_timeout (300ms)"
    );
    running.stop().await;
}

#[tokio::test]
async fn the_dead_letter_gauge_follows_the_prune_passes_not_just_the_first_count() {
    // Dead letters are counted less often than the live queue (nothing bounds them): at the
    // first depth count after each prune. A dead letter made after the worker's first count
    // must show up once a prune has run.
    let db = TestDb::new(Schema::Shard).await;
    let shard = "shard-dead-gauge";
    let mut opts = options(shard, 100);
    opts.rescue_interval = Duration::from_millis(100);
    opts.prune_interval = Duration::from_secs(1);
    opts.depth_interval = Duration::from_millis(100);
    let running = spawn_worker(worker_from(&db, builtins(&["echo"]), opts));
    let gauge = |kind: &str| {
        tenantry_queue::metrics::DEPTH
            .with_label_values(&[shard, "error", kind])
            .get()
    };
    // The worker's first counts are in before the dead letter exists.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = enqueue_one(&db, job(Uuid::now_v7(), "no-such-kind", json!({}), 1)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gauge("no-such-kind") != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gauge never counted the dead letter: {:?}",
            state_of(&db, id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}
