//! The worker role: `worker.threads` job slots claiming from one shard's queue.
//!
//! One loop claims jobs in batches sized to the free slots (woken by NOTIFY, polling as a
//! fallback), each job runs in its own task with a span carrying `request.id`, `company.id`,
//! `shard.id` and `job.id`, and outcomes go to one completer that writes them in batches. A
//! heartbeat renews the leases of running jobs, a rescuer returns jobs of dead workers, and a
//! pruner deletes old finished rows.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::FutureExt;
use rand::Rng;
use serde_json::Value;
use tenantry_core::config::QueueConfig;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    job::{ClaimedJob, JobError, JobState, contains_nul, json_len},
    listen::Listener,
    metrics,
    store::{self, Outcome},
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Work of one kind. Register implementations in a [`Registry`].
pub trait Handler: Send + Sync + 'static {
    /// Checks params at the API's edge, before anything is enqueued (400 on `Err`).
    fn validate(&self, _params: &Value) -> Result<(), String> {
        Ok(())
    }

    /// Runs one attempt. `Err(JobError::permanent(..))` skips remaining attempts.
    fn run<'a>(&'a self, job: &'a ClaimedJob) -> BoxFuture<'a, Result<Value, JobError>>;
}

/// `echo`: returns its params. For diagnostics and benchmarks.
pub struct Echo;

impl Handler for Echo {
    fn run<'a>(&'a self, job: &'a ClaimedJob) -> BoxFuture<'a, Result<Value, JobError>> {
        Box::pin(async move { Ok(job.params.clone()) })
    }
}

/// `sleep`: `{"ms": n}` sleeps n milliseconds (at most `max`). `{"ms": n, "fail": "message"}`
/// fails after sleeping (retryable), for exercising retries.
pub struct Sleep {
    pub max: Duration,
}

impl Sleep {
    fn ms(params: &Value) -> Option<u64> {
        params.get("ms").and_then(Value::as_u64)
    }
}

impl Handler for Sleep {
    fn validate(&self, params: &Value) -> Result<(), String> {
        let ms = Sleep::ms(params).ok_or("sleep needs {\"ms\": <non-negative integer>}")?;
        if Duration::from_millis(ms) > self.max {
            return Err(format!(
                "sleep may last at most {} ms",
                self.max.as_millis()
            ));
        }
        match params.get("fail") {
            None | Some(Value::String(_)) => Ok(()),
            Some(_) => Err("\"fail\" must be a string".into()),
        }
    }

    fn run<'a>(&'a self, job: &'a ClaimedJob) -> BoxFuture<'a, Result<Value, JobError>> {
        Box::pin(async move {
            let ms = Sleep::ms(&job.params)
                .unwrap_or(0)
                .min(self.max.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            match job.params.get("fail").and_then(Value::as_str) {
                Some(msg) => Err(JobError::retryable(msg)),
                None => Ok(serde_json::json!({"slept_ms": ms})),
            }
        })
    }
}

/// Handlers by kind, and attempts per kind. The API validates against it; workers run from it.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
    attempts: HashMap<String, i32>,
}

impl Registry {
    /// The built-in kinds enabled in `queue.builtin_kinds`, with `queue.max_attempts`.
    pub fn from_config(q: &QueueConfig) -> Registry {
        let mut r = Registry::default();
        for kind in &q.builtin_kinds {
            match kind.as_str() {
                "echo" => r.register("echo", Echo),
                "sleep" => r.register("sleep", Sleep { max: q.sleep_max }),
                _ => {}
            }
        }
        r.attempts = q
            .max_attempts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        r
    }

    pub fn register(&mut self, kind: &str, handler: impl Handler) {
        self.handlers.insert(kind.to_owned(), Arc::new(handler));
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(kind)
    }

    /// Attempts for a kind (default 1).
    pub fn max_attempts(&self, kind: &str) -> i32 {
        self.attempts.get(kind).copied().unwrap_or(1)
    }

    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<_> = self.handlers.keys().cloned().collect();
        k.sort();
        k
    }
}

/// Settings of one worker process.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub shard_id: String,
    pub slots: usize,
    pub claim_batch: usize,
    pub complete_batch: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub max_processing_per_company: i64,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub rescue_interval: Duration,
    pub retention: Duration,
    pub prune_interval: Duration,
    pub grace: Duration,
    /// Largest result, as compact JSON, that a job may record (`queue.max_result_size`).
    pub max_result_size: u64,
    /// Longest one attempt may run (`queue.run_timeout`).
    pub run_timeout: Duration,
    /// How often the janitor counts the live queue for the depth gauges at most
    /// ([`DEPTH_INTERVAL`]; not a configuration key).
    pub depth_interval: Duration,
    /// How often the completer tries to write a batch of outcomes before it gives up and
    /// leaves the jobs to the rescuer ([`OUTCOME_TRIES`]; not a configuration key).
    pub outcome_tries: u32,
}

impl WorkerOptions {
    pub fn from_config(shard_id: &str, slots: usize, q: &QueueConfig, grace: Duration) -> Self {
        WorkerOptions {
            shard_id: shard_id.to_owned(),
            slots,
            claim_batch: q.claim_batch,
            complete_batch: q.complete_batch,
            lease: q.lease,
            poll_interval: q.poll_interval,
            max_processing_per_company: q.max_processing_per_company,
            retry_base: q.retry_base,
            retry_max: q.retry_max,
            rescue_interval: q.rescue_interval,
            retention: q.retention,
            prune_interval: q.prune_interval,
            grace,
            max_result_size: q.max_result_size.bytes(),
            run_timeout: q.run_timeout,
            depth_interval: DEPTH_INTERVAL,
            outcome_tries: OUTCOME_TRIES,
        }
    }
}

/// Exponential backoff with jitter: d = base·2^(attempt-1), capped at `max`, then a random
/// delay between max(base, ¾·hi) and hi = min(1¼·d, max). It is always between `base` and
/// `max`, even the first retry is spread (over [base, 1¼·base]), and retries of jobs that
/// failed together spread below the cap (over [¾·max, max]) instead of piling up on it.
pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    let base = base.min(max);
    let exp = base.saturating_mul(1u32 << attempt.clamp(1, 31).saturating_sub(1).min(20) as u32);
    let hi = exp.min(max).mul_f64(1.25).min(max);
    let lo = hi.mul_f64(0.75).max(base);
    if hi <= lo {
        return lo;
    }
    lo + (hi - lo).mul_f64(rand::rng().random_range(0.0..=1.0))
}

/// A worker process's slots on one shard.
pub struct Worker {
    pub id: String,
    pool: Pool,
    registry: Registry,
    opts: WorkerOptions,
    listener: Listener,
    announcer: Announcer,
}

enum Announcement {
    Finished(Vec<Uuid>),
    Flush(oneshot::Sender<()>),
}

/// Sends the worker's finished notifications (the ids of jobs that reached `done` or `error`
/// while a request may wait for them, see [`store::Finished::announced`]) from one task, after
/// the completions committed: whatever completions land while one notification is being sent
/// go out together in the next, so under load concurrent slots share a notifying transaction
/// instead of each paying for one (a statement and a transaction per job when completing one
/// at a time), while an idle worker's single completion is sent at once. The queue holds only
/// ids between two sends. A failed send is logged; its waiters re-read their jobs at their
/// timeout.
struct Announcer {
    tx: mpsc::UnboundedSender<Announcement>,
}

impl Announcer {
    /// Must be called inside a Tokio runtime. The task ends when the worker is dropped.
    fn start(pool: Pool) -> Announcer {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut ids, mut flushed) = (Vec::new(), Vec::new());
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some(message) = next {
                    match message {
                        Announcement::Finished(more) => ids.extend(more),
                        Announcement::Flush(done) => flushed.push(done),
                    }
                    next = rx.try_recv().ok();
                }
                if !ids.is_empty() {
                    let sent = async {
                        let client = pool.get().await?;
                        Ok::<_, anyhow::Error>(store::announce_finished(&client, &ids).await?)
                    }
                    .await;
                    if let Err(e) = sent {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            jobs = ids.len(),
                            "finished notification failed; waiting requests re-read at their timeout"
                        );
                    }
                    ids.clear();
                }
                for done in flushed.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Announcer { tx }
    }

    fn finished(&self, finished: &[store::Finished]) {
        let ids = store::announced_ids(finished);
        if !ids.is_empty() {
            let _ = self.tx.send(Announcement::Finished(ids));
        }
    }

    /// Returns once everything announced before has been sent (or given up on).
    async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.tx.send(Announcement::Flush(done)).is_ok() {
            let _ = sent.await;
        }
    }
}

impl Worker {
    /// Must be called inside a Tokio runtime (it starts the task that sends the worker's
    /// finished notifications).
    pub fn new(pool: Pool, registry: Registry, opts: WorkerOptions, listener: Listener) -> Worker {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        let id = format!(
            "{host}-{}-{}",
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        Worker {
            id,
            announcer: Announcer::start(pool.clone()),
            pool,
            registry,
            opts,
            listener,
        }
    }

    /// Runs one job end to end if one is claimable: claim 1, run, record. The single step, for
    /// tests that drive the queue deterministically. With a per-company cap it looks only at
    /// the window of the queue's head (see `store::CLAIM_WINDOW`): a job further back gives
    /// `None` while the companies ahead of it are at their cap.
    pub async fn try_claim_and_run_one(&self) -> anyhow::Result<Option<(Uuid, JobState)>> {
        let mut client = self.pool.get().await.context("shard pool")?;
        let jobs = store::claim(
            &mut client,
            &self.id,
            1,
            self.opts.lease,
            self.opts.max_processing_per_company,
        )
        .await
        .context("claiming a job")?;
        let Some(job) = jobs.into_iter().next() else {
            return Ok(None);
        };
        let outcome = [run_job(&self.registry, &self.opts, job).await];
        let (finished, discarded) = store::finish_unannounced(&mut client, &self.id, &outcome)
            .await
            .context("recording the outcome")?;
        drop(client);
        self.recorded(&outcome, &finished, &discarded);
        Ok(finished.first().map(|f| (f.id, f.state)))
    }

    /// Accounts for committed outcomes: announces the finished jobs, counts them, and logs the
    /// discarded late completions (`discarded`, of the outcomes in `batch`). Returns how many
    /// went back to `waiting` for a retry.
    fn recorded(&self, batch: &[Outcome], finished: &[store::Finished], discarded: &[Uuid]) -> u64 {
        self.announcer.finished(finished);
        let count = |state| finished.iter().filter(|f| f.state == state).count() as u64;
        let (ok, dead, retried) = (
            count(JobState::Done),
            count(JobState::Error),
            count(JobState::Waiting),
        );
        let shard = &self.opts.shard_id;
        metrics::count(shard, "completed", ok);
        metrics::count(shard, "dead_lettered", dead);
        metrics::count(shard, "retried", retried);
        metrics::count(shard, "late_completion", discarded.len() as u64);
        let late = batch.iter().filter(|o| discarded.contains(&o.id));
        for o in late.take(store::LOGGED_EACH) {
            let _in_job = store::job_span(&o.request_id, None, o.id).entered();
            tracing::warn!(job.attempt = o.attempt, worker.id = %self.id,
                "late completion discarded: the lease expired and the job was rescued");
        }
        if discarded.len() > store::LOGGED_EACH {
            tracing::warn!(
                worker.id = %self.id,
                more = discarded.len() - store::LOGGED_EACH,
                "more late completions discarded than logged one by one"
            );
        }
        retried
    }

    /// Warns when the pool's connections lack [`store::SESSION_OPTIONS`] (a pool not built by
    /// [`store::pool`]): claims would then be planned from the table's statistics.
    async fn check_session_options(&self) {
        let Ok(client) = self.pool.get().await else {
            return; // the claim loop reports an unreachable database
        };
        if let Ok(false) = store::has_session_options(&client).await {
            tracing::warn!(
                worker.id = %self.id,
                "the shard pool's connections lack the queue's session options \
                 (build it with tenantry_queue::store::pool); claims may be slow"
            );
        }
    }

    /// Runs until `shutdown`; then stops claiming, lets running jobs finish within the grace
    /// period and returns the rest to `waiting`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.opts.slots));
        let running: Arc<Mutex<InFlight>> = Arc::default();
        let (out_tx, out_rx) = mpsc::channel::<Outcome>(this.opts.slots.max(1) * 2);
        let background = CancellationToken::new();

        let completer = tokio::spawn(complete_loop(this.clone(), out_rx, running.clone()));
        let heartbeat = tokio::spawn(heartbeat_loop(
            this.clone(),
            running.clone(),
            background.clone(),
        ));
        let janitor = tokio::spawn(janitor_loop(this.clone(), background.clone()));
        // When the stop is asked for: `tenantry serve` counts the grace period (and the 2 s it
        // allows past it) from then, not from when the claim loop gets round to stopping.
        let stop_asked = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::Instant::now()
            })
        };
        tracing::info!(worker.id = %this.id, shard.id = %this.opts.shard_id, slots = this.opts.slots, kinds = ?this.registry.kinds(), "worker started");
        this.check_session_options().await;

        let mut tasks = tokio::task::JoinSet::new();
        let mut failures = 0u32;
        // Refill in strides: a claim per freed slot would cost a round trip each and walk the
        // index entries of just-claimed rows again and again. The stride only holds back the
        // refill that finishing jobs ask for: once the loop has slept (until a NOTIFY, a freed
        // slot or the poll), it claims for whatever slots are free, or a slot or two below the
        // stride would stay idle while jobs wait, for as long as the running jobs take.
        let stride = (this.opts.claim_batch.min(this.opts.slots) / 4).max(1);
        let mut woken = false;
        // A capped claim looks at a bounded window of the queue's head (see
        // `store::CLAIM_SQL`). When that window was full and gave too few jobs (companies at
        // their cap fill it), the loop also looks once past it, from `after`, which moves on
        // through the queue from one such look to the next and starts over at its end: a row
        // far back in claim order is reached within a lap of the cursor, (waiting rows) /
        // CLAIM_WINDOW wake-ups, and no claim walks the whole backlog of a company at its
        // cap. A look that found work stays where it is for the next one.
        let mut after: Option<i64> = None;
        let mut look_further = false;
        // A claim that failed may have committed and lost only its answer, or still be running
        // on the server: until a lease has passed since the last failure, the jobs this worker
        // holds without knowing are given back before a claim (see `store::release_unheld`):
        // before the first claim after the failure, then at most every third of a lease (such
        // a job's lease lasts a whole one), not before every claim.
        let mut unheld_until: Option<Instant> = None;
        let mut unheld_next = Instant::now();
        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits().min(this.opts.claim_batch);
            let busy = slots.available_permits() < this.opts.slots;
            if free == 0 || (busy && free < stride && !woken) {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = this.listener.work_available() => {}
                    _ = tokio::time::sleep(this.opts.poll_interval) => {}
                }
                woken = true;
                continue;
            }
            woken = false;
            let from = if look_further { after } else { None };
            look_further = false;
            // The wait for a connection (up to `database.connect_timeout`) gives way to a
            // shutdown, which must not lose that time from the grace period the drain and the
            // release need. The claim statement itself is not abandoned: dropped mid-statement
            // it would still commit on the server, possibly after the release, leaving its jobs
            // processing under a stopped worker until the rescuer took them (attempt counted).
            let client = tokio::select! {
                client = this.pool.get() => client,
                _ = shutdown.cancelled() => break,
            };
            let claimed = async {
                let mut client = client?;
                if let Some(until) = unheld_until
                    && Instant::now() >= unheld_next
                {
                    unheld_next = Instant::now() + this.opts.lease / 3;
                    let held = running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .held(Instant::now());
                    let given_back = store::release_unheld(&mut client, &this.id, &held).await?;
                    log_each(&given_back, |job| {
                        let _in_job = job.span().entered();
                        tracing::warn!(worker.id = %this.id, "a claim's answer was lost with its connection; gave its job back to waiting");
                    });
                    if Instant::now() >= until {
                        unheld_until = None;
                    }
                }
                // The claim statement's own time, not the wait for a connection.
                let started = Instant::now();
                let claimed = store::claim_batch(
                    &mut client,
                    &this.id,
                    free as i64,
                    this.opts.lease,
                    this.opts.max_processing_per_company,
                    from,
                )
                .await?;
                metrics::CLAIM_SECONDS
                    .with_label_values(&[&this.opts.shard_id])
                    .observe(started.elapsed().as_secs_f64());
                Ok::<_, anyhow::Error>(claimed)
            }
            .await;
            let store::Claim {
                jobs,
                cut_by_cap,
                next_after,
            } = match claimed {
                Ok(claimed) => {
                    failures = 0;
                    claimed
                }
                Err(e) => {
                    failures += 1;
                    unheld_until = Some(Instant::now() + this.opts.lease);
                    unheld_next = Instant::now();
                    let wait = backoff(
                        failures as i32,
                        Duration::from_millis(100),
                        Duration::from_secs(5),
                    );
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_ms = wait.as_millis() as u64,
                        "claim failed"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            };
            let got = jobs.len();
            // Whether the claim saw its whole window: it neither filled the free slots nor was
            // cut short by the cap (which leaves rows of its window unexamined).
            let saw_all = got < free && !cut_by_cap;
            match from {
                // A look past the head that saw its whole window moves the cursor on. `None`:
                // it reached the end of the queue; the next starts over. A window that did not
                // get past its first claim order (all its rows share it) is left behind, or the
                // cursor would stay there. A look that found work stays where it is.
                Some(start) if saw_all => {
                    after = next_after.map(|p| if p == start { p.saturating_add(1) } else { p });
                }
                // The head's window was full: look past it (from where the last look stopped,
                // if that lies beyond). Not full: the claim saw every waiting row.
                None if saw_all => {
                    after = next_after.map(|head| after.map_or(head, |a| a.max(head)));
                    look_further = after.is_some();
                }
                _ => {}
            }
            for job in jobs {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                // From when this attempt became claimable: a retry's backoff, or the days a
                // dead letter waited for an operator, are not the queue's delay.
                metrics::ENQUEUE_TO_START_SECONDS
                    .with_label_values(&[&this.opts.shard_id, &job.kind])
                    .observe(store::enqueue_to_start(job.ready_at).as_secs_f64());
                running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add(job.id);
                let (this, running, out_tx, slots) =
                    (this.clone(), running.clone(), out_tx.clone(), slots.clone());
                tasks.spawn(async move {
                    let id = job.id;
                    let outcome = run_job(&this.registry, &this.opts, job).await;
                    // Sending waits when the completer is behind: backpressure, not growth.
                    // The heartbeat keeps renewing the job's lease until the completer has
                    // written its outcome (or given up on it): a completion held up longer
                    // than a lease would otherwise find the job rescued and be discarded.
                    if out_tx.send(outcome).await.is_err() {
                        running.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                    }
                    drop(permit);
                    // The claim loop refills only a stride at a time: waking it for every
                    // finished job would only send it back to sleep.
                    if slots.available_permits() >= stride {
                        this.listener.wake_worker();
                    }
                });
            }
            // A capped claim takes its batch from the first `free` claimable rows and then drops
            // those over their company's cap, so a batch cut short that way need not mean an
            // empty queue: claim again at once (the companies now at their cap are passed over).
            if look_further {
                // Look past the window at once, also for fewer slots than a stride.
                woken = true;
            } else if got < free && !cut_by_cap {
                // Nothing more claimable right now: sleep until a NOTIFY, a freed slot or the poll.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = this.listener.work_available() => {}
                    _ = tokio::time::sleep(this.opts.poll_interval) => {}
                }
                woken = true;
            } else if cut_by_cap {
                // Claim again for the slots still free, also when they are fewer than a stride.
                woken = true;
            }
        }

        tracing::info!(worker.id = %this.id, running = tasks.len(), "worker stopping; letting running jobs finish");
        let asked = stop_asked
            .await
            .unwrap_or_else(|_| tokio::time::Instant::now());
        let drained = tokio::time::timeout_at(asked + this.opts.grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(worker.id = %this.id, abandoned = tasks.len(), "grace period over; releasing unfinished jobs");
            tasks.shutdown().await;
        }
        // What is left must fit in the time `serve` allows a role past the grace period: a
        // role still running then is abandoned, and a worker abandoned before its release would
        // leave its unfinished jobs to the rescuer, which counts their attempt (a job allowed
        // one goes to the dead letters). So the completer gets a part of it, the release what
        // it needs in any case, and outcomes still unwritten by then are given back with the
        // unfinished jobs (they run again: at least once).
        let end = tokio::time::Instant::now().max(asked + this.opts.grace) + STOP_BOOKKEEPING;
        // The heartbeat and the janitor stop first: a renewal locks the rows it renews, and the
        // release skips locked rows (see `store::release`), so a renewal at that moment would
        // leave its jobs leased to this stopped worker.
        background.cancel();
        let mut heartbeat = heartbeat;
        if tokio::time::timeout_at(end - STOP_RELEASE, &mut heartbeat)
            .await
            .is_err()
        {
            heartbeat.abort();
        }
        drop(out_tx);
        let mut completer = completer;
        if tokio::time::timeout_at(end - STOP_RELEASE, &mut completer)
            .await
            .is_err()
        {
            completer.abort();
            tracing::warn!(worker.id = %this.id, "outcomes still unwritten at the end of the grace period; their jobs are given back to waiting");
        }
        // Jobs whose outcome was given up on earlier ran: they are left to the rescuer, which
        // counts the attempt, as the give-up said.
        let lost = running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lost_ids(Instant::now());
        // What was given back, kept whatever happens to a later try.
        let mut jobs = Vec::new();
        let released = tokio::time::timeout_at(end, async {
            let client = Detaching(Some(this.pool.get().await?));
            // The release skips rows another transaction holds locked (see `store::release`):
            // a long poll marking its job, a rescue, or this worker's completion cut off above.
            // Those locks end soon, or with their connection; whatever is still leased to this
            // worker then is tried again while the time lasts.
            let mut locked;
            loop {
                jobs.extend(store::release(&***client, &this.id, &lost).await?);
                locked = store::leased(&***client, &this.id, &lost).await?;
                if locked == 0 || tokio::time::Instant::now() + 2 * STOP_RELEASE_RETRY >= end {
                    break;
                }
                tokio::time::sleep(STOP_RELEASE_RETRY).await;
            }
            client.done();
            if locked > 0 {
                anyhow::bail!("{locked} job rows stayed locked by other transactions");
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
        log_each(&jobs, |job| {
            let _in_job = job.span().entered();
            tracing::info!(worker.id = %this.id, "released back to waiting: the worker stopped before the job finished");
        });
        if !jobs.is_empty() {
            tracing::info!(worker.id = %this.id, jobs = jobs.len(), "released unfinished jobs back to waiting");
        }
        // Their leases expire and the rescuer returns them.
        if let Err(e) = released {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not release (all) unfinished jobs"
            );
        }
        let mut janitor = janitor;
        let stopped = tokio::time::timeout_at(end + STOP_FLUSH, async {
            this.announcer.flush().await;
            let _ = (&mut janitor).await;
        })
        .await;
        if stopped.is_err() {
            janitor.abort();
            tracing::warn!(worker.id = %this.id, "finished notifications or the janitor still busy; stopping without them");
        }
        tracing::info!(worker.id = %this.id, "worker stopped");
        Ok(())
    }
}

/// How long a stopping worker's bookkeeping after its grace period may take, so that it ends
/// before `tenantry serve` abandons its roles (2 s after the grace period): writing the
/// outcomes it has, then giving back the jobs it still holds ([`STOP_RELEASE`] of it), then
/// [`STOP_FLUSH`] more for the finished notifications and the background tasks.
const STOP_BOOKKEEPING: Duration = Duration::from_millis(1250);
/// The part of [`STOP_BOOKKEEPING`] kept for giving back unfinished jobs.
const STOP_RELEASE: Duration = Duration::from_millis(750);
/// How often a stopping worker tries again to give back jobs whose rows were locked.
const STOP_RELEASE_RETRY: Duration = Duration::from_millis(50);
/// After [`STOP_BOOKKEEPING`].
const STOP_FLUSH: Duration = Duration::from_millis(250);

/// The request ids of a batch's first outcomes, for a line about the whole batch: enough to
/// find a request's job in it, without a line as long as the batch.
fn request_ids(batch: &[Outcome]) -> String {
    const SHOWN: usize = 20;
    let mut ids: Vec<&str> = batch
        .iter()
        .take(SHOWN)
        .map(|o| o.request_id.as_str())
        .collect();
    if batch.len() > SHOWN {
        ids.push("…");
    }
    ids.join(",")
}

/// Calls `log` for each of `jobs` up to [`store::LOGGED_EACH`], then says how many more.
fn log_each(jobs: &[store::JobRef], log: impl Fn(&store::JobRef)) {
    jobs.iter().take(store::LOGGED_EACH).for_each(log);
    if jobs.len() > store::LOGGED_EACH {
        tracing::info!(
            more = jobs.len() - store::LOGGED_EACH,
            "more jobs given back than logged one by one"
        );
    }
}

/// Runs one attempt in its own task (a panicking handler fails the attempt, not the worker).
async fn run_job(registry: &Registry, opts: &WorkerOptions, job: ClaimedJob) -> Outcome {
    let span = tracing::info_span!(
        "job",
        request.id = %job.request_id,
        company.id = %job.company_id,
        shard.id = %opts.shard_id,
        job.id = %job.id,
        job.kind = %job.kind,
        job.attempt = job.attempt,
    );
    let (id, attempt, max_attempts, kind, request_id) = (
        job.id,
        job.attempt,
        job.max_attempts,
        job.kind.clone(),
        job.request_id.clone(),
    );
    // The backoff grows with the attempts of this round: an operator's retry starts a new one.
    let round_attempt = job.attempt - job.retried_after;
    let started = Instant::now();
    let result = match registry.get(&job.kind).cloned() {
        None => Err(JobError::permanent(format!(
            "no handler for kind {:?} on this worker",
            job.kind
        ))),
        Some(handler) => {
            // Caught here rather than by running the handler in a task of its own: a job
            // already runs in its slot's task, and one more spawn was one more wake-up on the
            // way from claim to start.
            // `run` is called inside the caught future: a handler may panic while building
            // its future as well as while it runs.
            // An attempt that outlives `run_timeout` is dropped there: a handler awaiting a call
            // without a timeout would otherwise hold its slot (and its lease, which the
            // heartbeat renews) until the process restarts.
            let run = AssertUnwindSafe(async { handler.run(&job).await }.instrument(span.clone()));
            match tokio::time::timeout(opts.run_timeout, run.catch_unwind()).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(JobError::retryable(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                ))),
                Err(_) => Err(JobError::retryable(format!(
                    "stopped after running longer than queue.run_timeout ({})",
                    humantime::format_duration(opts.run_timeout)
                ))),
            }
        }
    };
    let result = storable(result, opts.max_result_size);
    let elapsed = started.elapsed();
    metrics::RUN_SECONDS
        .with_label_values(&[&opts.shard_id, &kind])
        .observe(elapsed.as_secs_f64());
    let _e = span.enter();
    let retry_in = backoff(round_attempt, opts.retry_base, opts.retry_max);
    let duration_ms = elapsed.as_secs_f64() * 1e3;
    // At info, so that the default level answers what became of a request's job. What this
    // attempt's outcome does to the job, as the completion will write it (unless the lease
    // ran out meanwhile: then the late completion is discarded, and logged as such).
    match &result {
        Ok(_) => tracing::info!(duration_ms, "job done"),
        Err(e) if e.permanent || attempt >= max_attempts => {
            tracing::info!(duration_ms, error = %e.message, permanent = e.permanent, max_attempts,
                "job attempt failed; no attempts left: the job goes to the dead letters (error)")
        }
        Err(e) => {
            tracing::info!(duration_ms, error = %e.message, retry_in_ms = retry_in.as_millis() as u64, max_attempts,
            "job attempt failed; it will be tried again")
        }
    }
    Outcome {
        id,
        attempt,
        request_id,
        result,
        retry_in,
    }
}

/// Longest error message kept in a job's record (and its event); longer ones are cut.
const MAX_ERROR_MESSAGE: usize = 4096;

/// An outcome the job record can hold. PostgreSQL cannot store U+0000, and an outcome it refuses
/// would fail the whole completion batch it is written in, so a result holding one fails its
/// attempt for good instead, and an error message has it replaced. Error messages are cut to
/// [`MAX_ERROR_MESSAGE`] bytes.
fn storable(result: Result<Value, JobError>, max_len: u64) -> Result<Value, JobError> {
    match result {
        Ok(value) if contains_nul(&value) => Err(JobError::permanent(
            "the handler's result contains the character U+0000, which a job record cannot hold",
        )),
        // Refused here, it fails its own job; written, it could fail the whole completion
        // batch (a jsonb value or a statement's parameters have size limits).
        Ok(value) if json_len(&value) > max_len => Err(JobError::permanent(format!(
            "the handler's result is {} bytes as JSON, over queue.max_result_size ({max_len} bytes)",
            json_len(&value)
        ))),
        Ok(value) => Ok(value),
        Err(mut e) => {
            if e.message.contains('\0') {
                e.message = e.message.replace('\0', "\u{FFFD}");
            }
            if e.message.len() > MAX_ERROR_MESSAGE {
                let mut cut = MAX_ERROR_MESSAGE - '…'.len_utf8();
                while !e.message.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.message.truncate(cut);
                e.message.push('…');
            }
            Err(e)
        }
    }
}

/// The message a panic carried (`panic!("…")` gives a `&str` or a `String`).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string payload")
}

/// Completion batches written at once. A batch's commit waits for its disk flush; with a
/// second batch in flight the next outcomes are written meanwhile instead of queueing behind
/// that flush, so completion keeps up with claims. (Each outcome is in exactly one batch, so
/// concurrent batches never touch the same row.)
const CONCURRENT_COMPLETIONS: usize = 2;

/// Writes outcomes in batches: whatever has arrived, up to `complete_batch`, in one
/// transaction, up to [`CONCURRENT_COMPLETIONS`] batches at a time. A failed write is retried
/// (the outcomes are kept) until it succeeds or the leases expire and the rescuer takes over.
/// Returns once every outcome received has been written (or given up on).
async fn complete_loop(
    this: Arc<Worker>,
    mut rx: mpsc::Receiver<Outcome>,
    running: Arc<Mutex<InFlight>>,
) {
    let mut writers = tokio::task::JoinSet::new();
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(this.opts.complete_batch);
        batch.push(first);
        while batch.len() < this.opts.complete_batch {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        if writers.len() >= CONCURRENT_COMPLETIONS {
            writers.join_next().await;
        }
        writers.spawn(write_outcomes(this.clone(), batch, running.clone()));
    }
    while writers.join_next().await.is_some() {}
}

/// Writes one batch of outcomes, trying again with backoff; then takes its jobs out of the
/// heartbeat's set (written, or given up on: the rescuer returns those, counting the attempt
/// that ran, so they stay held for `store::release_unheld` until it could have). The set is
/// left however the task ends, also by a panic or an abort: a job kept there would have its
/// lease renewed for as long as the worker lives, and never be rescued.
async fn write_outcomes(this: Arc<Worker>, batch: Vec<Outcome>, running: Arc<Mutex<InFlight>>) {
    struct Leave<'a>(&'a Mutex<InFlight>, &'a [Outcome]);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            let mut running = self.0.lock().unwrap_or_else(|p| p.into_inner());
            for o in self.1 {
                running.remove(o.id);
            }
        }
    }
    let _leave = Leave(&running, &batch);
    if !try_write_outcomes(&this, &batch).await {
        // Their rows stay leased to this worker until the lease runs out and a rescue pass
        // (every `rescue_interval`, in any worker) returns them; twice that, for a slow pass.
        let until = Instant::now() + 2 * (this.opts.lease + this.opts.rescue_interval);
        let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
        running.lost(batch.iter().map(|o| o.id), until);
    }
}

/// Returns false if it gave up.
async fn try_write_outcomes(this: &Worker, batch: &[Outcome]) -> bool {
    let mut attempt = 0;
    loop {
        let retried = attempt > 0;
        let written = async {
            let mut client = Detaching(Some(this.pool.get().await?));
            let (mut finished, mut discarded) =
                store::finish_unannounced(&mut *client, &this.id, batch).await?;
            if retried && !discarded.is_empty() {
                // The try before may have committed and lost only its answer: what it wrote
                // is not a late completion (see `store::written_earlier`).
                let unapplied: HashSet<Uuid> = discarded.iter().copied().collect();
                let unapplied: Vec<&Outcome> =
                    batch.iter().filter(|o| unapplied.contains(&o.id)).collect();
                let earlier = store::written_earlier(&***client, &this.id, &unapplied).await?;
                let written: HashSet<Uuid> = earlier.iter().map(|f| f.id).collect();
                discarded.retain(|id| !written.contains(id));
                finished.extend(earlier);
            }
            client.done();
            Ok::<_, anyhow::Error>((finished, discarded))
        }
        .await;
        match written {
            Ok((finished, discarded)) => {
                if this.recorded(batch, &finished, &discarded) > 0 {
                    this.listener.wake_worker();
                }
                return true;
            }
            Err(e) => {
                attempt += 1;
                let wait = backoff(attempt, Duration::from_millis(100), Duration::from_secs(5));
                tracing::warn!(
                    error = format!("{e:#}"),
                    jobs = batch.len(),
                    request.ids = %request_ids(batch),
                    retry_in_ms = wait.as_millis() as u64,
                    "recording outcomes failed"
                );
                if attempt >= this.opts.outcome_tries as i32 {
                    for o in batch.iter().take(store::LOGGED_EACH) {
                        let _in_job = store::job_span(&o.request_id, None, o.id).entered();
                        tracing::warn!(
                            job.attempt = o.attempt,
                            "giving up on recording this job's outcome; the rescuer will return the job"
                        );
                    }
                    tracing::error!(
                        jobs = batch.len(),
                        "giving up on recording outcomes; the rescuer will return these jobs"
                    );
                    return false;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A pooled connection that goes back to the pool only once [`Detaching::done`] says its
/// statements ended. Dropped before that, by an abort mid-statement (a stopping worker's
/// completer cut off at its deadline), it is taken out of the pool and closed instead: handed
/// back, its statement still running (say, waiting for a lock), it would make the next user
/// (the stop's release) queue behind that statement.
struct Detaching(Option<deadpool_postgres::Object>);

impl Detaching {
    /// Back to the pool, as usual.
    fn done(mut self) {
        self.0.take();
    }

    /// The connection, its statements ended, to be kept (and later handed back as usual).
    fn keep(mut self) -> deadpool_postgres::Object {
        self.0
            .take()
            .expect("a Detaching holds its connection until consumed")
    }
}

impl std::ops::Deref for Detaching {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        // Present from creation until `done` or the drop, which both consume it.
        self.0
            .as_ref()
            .expect("a Detaching holds its connection until consumed")
    }
}

impl std::ops::DerefMut for Detaching {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0
            .as_mut()
            .expect("a Detaching holds its connection until consumed")
    }
}

impl Drop for Detaching {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The jobs this worker holds leases for, for the heartbeat: those its slots are running and
/// those whose outcome the completer has not written yet, with how many runs of each. A job
/// can run twice in one worker: its lease expired (say the heartbeat could not reach the
/// database), the rescuer returned it to `waiting`, and this worker claimed it again while the
/// first run was still going. The second run's lease must be renewed after the first run ends.
///
/// Also, until when, the jobs whose outcome the completer gave up on: they ran, so they are
/// left to the rescuer, which counts the attempt. Their leases are not renewed, but
/// `store::release_unheld` must not take them for jobs of a claim whose answer was lost (which
/// never ran) and give them back without counting it: a job allowed one attempt would run
/// again instead of failing.
#[derive(Debug, Default)]
struct InFlight {
    running: HashMap<Uuid, usize>,
    lost: HashMap<Uuid, Instant>,
}

impl InFlight {
    fn add(&mut self, id: Uuid) {
        // Claimed again (rescued, then claimed by this worker): a new attempt, to be held
        // while it runs, released at a stop like any other.
        self.lost.remove(&id);
        *self.running.entry(id).or_default() += 1;
    }

    fn remove(&mut self, id: Uuid) {
        if let Some(n) = self.running.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&id);
            }
        }
    }

    /// `ids` ran and their outcome was given up on; held for `release_unheld` until `until`.
    fn lost(&mut self, ids: impl IntoIterator<Item = Uuid>, until: Instant) {
        // Those whose time is up go here too: `held` runs only after a failed claim.
        let now = Instant::now();
        self.lost.retain(|_, until| *until > now);
        self.lost.extend(ids.into_iter().map(|id| (id, until)));
    }

    /// The jobs given up on whose time is not up at `now`.
    fn lost_ids(&mut self, now: Instant) -> Vec<Uuid> {
        self.lost.retain(|_, until| *until > now);
        self.lost.keys().copied().collect()
    }

    /// What the heartbeat renews.
    fn ids(&self) -> Vec<Uuid> {
        self.running.keys().copied().collect()
    }

    /// What `release_unheld` must leave alone at `now`: the running jobs and the lost ones
    /// (forgotten once their time is up). An id in both is harmless to the statement.
    fn held(&mut self, now: Instant) -> Vec<Uuid> {
        let mut held = self.lost_ids(now);
        held.extend(self.running.keys());
        held
    }
}

/// The smallest pool the heartbeat keeps a connection of while jobs run (see `heartbeat_loop`).
pub const HEARTBEAT_HOLDS_FROM: usize = 3;

async fn heartbeat_loop(this: Arc<Worker>, running: Arc<Mutex<InFlight>>, stop: CancellationToken) {
    let period = this.opts.lease / 3;
    // After a failed renewal, try again soon rather than a whole period later: the leases are
    // running out, and once the database is back, every renewal counts (see `janitor_loop`).
    let soon = period.min(Duration::from_secs(1));
    let mut wait = period;
    // While jobs run, the heartbeat keeps the connection it renews their leases on: the pool
    // is shared with the claims, the completions and (in a process with the api role) every
    // request, and a pool busy for a lease would otherwise let the leases of jobs running fine
    // expire, to be rescued and run again (or dead-lettered). Given back once nothing runs,
    // and on an error (the next renewal takes another). Only from a pool of at least
    // `HEARTBEAT_HOLDS_FROM`: from a smaller one it would starve the completions, and the jobs
    // it renews would never finish.
    let hold = this.pool.status().max_size >= HEARTBEAT_HOLDS_FROM;
    let mut held: Option<deadpool_postgres::Object> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = period;
        let ids = running.lock().unwrap_or_else(|p| p.into_inner()).ids();
        if ids.is_empty() {
            held = None;
            continue;
        }
        // The statement is bounded: a connection that died silently (a failover whose old host
        // vanished, a dropped NAT entry) does not fail a renewal sent on it until the kernel
        // gives up on it (after `tenantry_core::db::TCP_USER_TIMEOUT`, 30 s, or the
        // `tcp_user_timeout` a URL sets), and by then the leases would have run out.
        // Cut off after a period (a renewal is one small UPDATE: a database that slow has the
        // leases at risk anyway), its connection is closed rather than handed back, and so are
        // the pool's idle ones (dead the same way, most likely); the next renewal follows at
        // once, on a new connection. Waiting for a pool connection is not cut off this way:
        // its own timeout fails it, and the next renewal comes soon.
        let renewed = async {
            let client = Detaching(Some(match held.take() {
                Some(client) => client,
                None => this.pool.get().await?,
            }));
            let sent = store::heartbeat(&***client, &this.id, &ids, this.opts.lease);
            match tokio::time::timeout(period, sent).await {
                Ok(done) => done?,
                Err(_) => return Ok(None),
            };
            Ok::<_, anyhow::Error>(Some(client.keep()))
        }
        .await;
        match renewed {
            Ok(Some(client)) => held = hold.then_some(client),
            Ok(None) => {
                let closed = this.pool.retain(|_, _| false).removed.len();
                tracing::warn!(
                    jobs = ids.len(),
                    idle_connections_closed = closed,
                    "lease renewal got no answer within {period:?}; trying again on a new connection"
                );
                wait = Duration::ZERO;
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    jobs = ids.len(),
                    retry_in_ms = soon.as_millis() as u64,
                    "lease renewal failed"
                );
                wait = soon;
            }
        }
    }
}

/// How often the janitor counts the live queue for the depth gauges at most: each count reads
/// every waiting and processing row (up to `queue.max_waiting_per_shard`), in every worker
/// process, so not at every rescue pass.
pub const DEPTH_INTERVAL: Duration = Duration::from_secs(15);

/// How often the completer tries to write a batch of outcomes: with its backoff between tries
/// (from 100 ms, doubling to 5 s, spread by a quarter), for about a minute, long enough to
/// ride out a failover.
pub const OUTCOME_TRIES: u32 = 20;

/// Rescues expired leases, prunes old rows and refreshes the depth gauges.
///
/// After a pass that could not reach the database (no connection, or the rescue statement
/// failed), no lease is rescued for one `queue.lease`: every worker's heartbeat was cut off too, so once the
/// database is back every running job's lease may lie in the past, and rescuing them then
/// would dead-letter (or run twice) jobs that are running fine. The heartbeats retry within a
/// second and renew them first; a worker that really died is rescued a lease later.
async fn janitor_loop(this: Arc<Worker>, stop: CancellationToken) {
    let shard = this.opts.shard_id.clone();
    let mut last_prune = Instant::now();
    let mut rescue_from = Instant::now();
    // The depth gauges: the live queue at most every `depth_interval`, the dead letters (which
    // nothing bounds until operators resolve them) with the prune pass; the last figures of
    // the dead letters are kept for the passes in between.
    let mut last_depth: Option<Instant> = None;
    // `None`: to be counted at the next depth count (at first, and after each prune).
    let mut dead_letters: Option<Vec<(String, String, i64)>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(this.opts.rescue_interval) => {}
        }
        // Whether this pass failed to reach the database (as opposed to a prune or a count
        // that failed on a database that answers, which must not hold the rescue back).
        let mut unreached = false;
        let pass = async {
            let mut client = this.pool.get().await.inspect_err(|_| unreached = true)?;
            let (rescued, dead) = if Instant::now() >= rescue_from {
                store::rescue_expired(&mut client, 1000, this.opts.retry_base, this.opts.retry_max)
                    .await
                    .inspect_err(|_| unreached = true)?
            } else {
                (Vec::new(), Vec::new())
            };
            if !rescued.is_empty() || !dead.is_empty() {
                tracing::warn!(
                    rescued = rescued.len(),
                    dead_lettered = dead.len(),
                    "rescued jobs with expired leases"
                );
                metrics::count(&shard, "rescued", rescued.len() as u64);
                metrics::count(&shard, "dead_lettered", dead.len() as u64);
                this.listener.wake_worker();
            }
            if last_prune.elapsed() >= this.opts.prune_interval {
                last_prune = Instant::now();
                let mut total = 0;
                // Small batches keep each delete short, so it never holds up claims for long;
                // and a pass stops after one rescue interval, so a large backlog of prunable
                // rows (after retention was lowered, say) does not hold up the rescue: the
                // next pass goes on with it.
                let budget = Instant::now() + this.opts.rescue_interval;
                loop {
                    let n = store::prune(&mut client, this.opts.retention, 1000).await?;
                    total += n;
                    if n < 1000 || stop.is_cancelled() {
                        break;
                    }
                    if Instant::now() >= budget {
                        last_prune = Instant::now()
                            .checked_sub(this.opts.prune_interval)
                            .unwrap_or(last_prune);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if total > 0 {
                    tracing::info!(rows = total, "pruned finished jobs and published events");
                }
                dead_letters = None;
            }
            // Reset only once the new figures are in: a failed count keeps the last ones.
            if last_depth.is_none_or(|t| t.elapsed() >= this.opts.depth_interval) {
                let mut depth = store::depth(&mut client, dead_letters.is_none()).await?;
                last_depth = Some(Instant::now());
                match &dead_letters {
                    None => {
                        dead_letters =
                            Some(depth.iter().filter(|d| d.0 == "error").cloned().collect())
                    }
                    Some(dead) => depth.extend(dead.iter().cloned()),
                }
                metrics::DEPTH.reset();
                for (state, kind, n) in depth {
                    metrics::DEPTH
                        .with_label_values(&[&shard, &state, &kind])
                        .set(n);
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match pass {
            Err(e) if unreached => {
                rescue_from = Instant::now() + this.opts.lease;
                tracing::warn!(
                    error = format!("{e:#}"),
                    rescue_held_ms = this.opts.lease.as_millis() as u64,
                    "queue maintenance could not reach the database; no lease is rescued until \
                     the heartbeats have had one lease to renew theirs"
                );
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "queue maintenance failed"),
            Ok(()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_run_twice_in_one_worker_stays_in_flight_until_both_runs_end() {
        let (job, other) = (Uuid::now_v7(), Uuid::now_v7());
        let mut in_flight = InFlight::default();
        in_flight.add(job);
        in_flight.add(other);
        // Rescued and claimed again by this worker while its first run goes on.
        in_flight.add(job);
        in_flight.remove(job);
        let mut ids = in_flight.ids();
        ids.sort();
        assert_eq!(
            ids,
            vec![job, other],
            "the second run's lease is still renewed"
        );
        in_flight.remove(job);
        in_flight.remove(other);
        assert!(in_flight.ids().is_empty());
        // A removal with nothing in flight (never expected) changes nothing.
        in_flight.remove(job);
        assert!(in_flight.ids().is_empty());
    }

    #[test]
    fn a_job_whose_outcome_was_given_up_on_is_held_from_release_but_not_renewed() {
        let (lost, running) = (Uuid::now_v7(), Uuid::now_v7());
        let now = Instant::now();
        let mut in_flight = InFlight::default();
        in_flight.add(lost);
        in_flight.add(running);
        in_flight.remove(lost);
        in_flight.lost([lost], now + Duration::from_secs(60));
        assert_eq!(
            in_flight.ids(),
            vec![running],
            "its lease is left to run out"
        );
        let mut held = in_flight.held(now);
        held.sort();
        assert_eq!(held, vec![lost, running], "not given back uncounted");
        assert_eq!(
            in_flight.held(now + Duration::from_secs(61)),
            vec![running],
            "forgotten once the rescuer has had its time"
        );
        assert!(in_flight.lost.is_empty());
        // Claimed again by this worker after a rescue: a new attempt, held while it runs and
        // no longer once it has ended.
        in_flight.lost([lost], now + Duration::from_secs(60));
        in_flight.add(lost);
        assert_eq!(in_flight.held(now).len(), 2);
        in_flight.remove(lost);
        assert_eq!(in_flight.held(now), vec![running]);
    }
}
