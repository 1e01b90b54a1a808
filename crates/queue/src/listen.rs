//! LISTEN/NOTIFY: one listening connection per process wakes the worker loop and every
//! request waiting for a job's result, so thousands of waiting requests share one connection
//! and nobody polls. Plus the [`Notifier`], which sends the "work is waiting" notification after
//! the enqueuing transaction committed, coalescing bursts into one.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_postgres::Pool;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    job::JobRecord,
    store::{self, CHANNEL_FINISHED, CHANNEL_WAITING, NOTIFY_WAITING_SQL},
};

/// Why [`Listener::wait_until_finished`] could not read the job.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// The API answers as it does for the pool's and the database's own errors.
impl From<WaitError> for tenantry_core::ApiError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Pool(e) => e.into(),
            WaitError::Db(e) => e.into(),
        }
    }
}

struct Inner {
    waiters: Mutex<HashMap<Uuid, Vec<oneshot::Sender<()>>>>,
    count: AtomicUsize,
    max_waiters: usize,
    /// When the last "waiters full" warning was written, in whole seconds of the clock: at
    /// most one a second, however many requests meet the full table.
    full_warned: AtomicU64,
    /// Wakes the worker loop: there may be claimable jobs.
    work: Notify,
    connected: AtomicBool,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<oneshot::Sender<()>>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `n` removed waiters off the count (and its gauge).
    fn uncount(&self, n: usize) {
        self.count.fetch_sub(n, Ordering::Relaxed);
        crate::metrics::WAITING_REQUESTS.sub(n as i64);
    }

    fn finished(&self, id: Uuid) {
        if let Some(senders) = self.lock().remove(&id) {
            self.uncount(senders.len());
            for s in senders {
                let _ = s.send(());
            }
        }
    }

    /// Wakes everyone: after a reconnect we may have missed notifications, so every waiter
    /// re-reads its job and the worker loop claims.
    fn wake_all(&self) {
        let all: Vec<_> = self.lock().drain().collect();
        for (_, senders) in all {
            self.uncount(senders.len());
            for s in senders {
                let _ = s.send(());
            }
        }
        self.work.notify_one();
    }
}

/// The process's LISTEN connection. Cheap to clone.
#[derive(Clone)]
pub struct Listener {
    inner: Arc<Inner>,
}

/// A registration for one job's completion. Register *before* reading the job's state, so a
/// completion between the read and the wait cannot be missed.
pub struct Waiter {
    id: Uuid,
    rx: Option<oneshot::Receiver<()>>,
    inner: Arc<Inner>,
}

impl Waiter {
    /// Waits until the job is reported finished (or the listener reconnected), or `timeout`.
    /// Returns false on timeout. Either way, read the job again to know its state.
    pub async fn wait(mut self, timeout: Duration) -> bool {
        match self.rx.take() {
            Some(rx) => matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(()))),
            None => false,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut map = self.inner.lock();
        if let Some(senders) = map.get_mut(&self.id) {
            let before = senders.len();
            senders.retain(|s| !s.is_closed());
            self.inner.uncount(before - senders.len());
            if senders.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

impl Listener {
    /// Starts listening on the shard database `pg` until `shutdown`; reconnects with backoff.
    pub fn start(
        pg: tokio_postgres::Config,
        max_waiters: usize,
        shutdown: CancellationToken,
    ) -> Listener {
        let inner = Arc::new(Inner {
            waiters: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            max_waiters,
            full_warned: AtomicU64::new(0),
            work: Notify::new(),
            connected: AtomicBool::new(false),
        });
        tokio::spawn(listen_loop(pg, inner.clone(), shutdown));
        Listener { inner }
    }

    /// Registers interest in a job's completion; `None` when the process already has
    /// `max_waiters` waiting requests (answer without waiting instead).
    pub fn wait_for(&self, id: Uuid) -> Option<Waiter> {
        if self.inner.count.load(Ordering::Relaxed) >= self.inner.max_waiters {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let last = self.inner.full_warned.load(Ordering::Relaxed);
            if last != now
                && self
                    .inner
                    .full_warned
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    job.id = %id,
                    max_waiters = self.inner.max_waiters,
                    "queue.max_waiters requests already wait for results: this one answers without \
                     waiting, or reads its job once a second (logged at most once a second)"
                );
            }
            return None;
        }
        let (tx, rx) = oneshot::channel();
        // Counted under the lock, as removals are: a wake-up between the two cannot subtract
        // a waiter that was not counted yet.
        let mut waiters = self.inner.lock();
        waiters.entry(id).or_default().push(tx);
        self.inner.count.fetch_add(1, Ordering::Relaxed);
        crate::metrics::WAITING_REQUESTS.inc();
        drop(waiters);
        Some(Waiter {
            id,
            rx: Some(rx),
            inner: self.inner.clone(),
        })
    }

    /// Resolves when workers should look for jobs (a NOTIFY arrived, or a reconnect).
    pub async fn work_available(&self) {
        self.inner.work.notified().await
    }

    /// Wakes the worker loop from inside the process (a slot freed up).
    pub fn wake_worker(&self) {
        self.inner.work.notify_one()
    }

    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    pub fn waiting_requests(&self) -> usize {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// Waits for `job` (as last read) to finish, until `deadline`, without polling, and
    /// returns it as read last: finished, or not when the deadline came first (`None`: it no
    /// longer exists). With the process's `max_waiters` requests already waiting there is no
    /// waiter to be had, and `when_full` says what to do (see [`WhenFull`]).
    ///
    /// Each round registers the waiter, then reads, then waits, so a completion between the
    /// read and the wait still wakes it. Completions nobody is marked for are not announced
    /// ([`store::await_job`]), so the first read marks the job awaited until the deadline,
    /// unless `enqueued_awaited` (it was enqueued with an `awaited_for` that outlasts this
    /// wait). A later read that finds it unfinished marks it again: a mark commits
    /// asynchronously, and when a database crash loses it, the reconnect of this LISTEN
    /// connection wakes every waiter. Rounds after the first read plainly first, since a wake
    /// is almost always the completion.
    ///
    /// `cancel` ends the wait early, with the job as last read, at the next point where that
    /// leaves nothing half done: while waiting for a connection or for a wake, never in the
    /// middle of a query (a query dropped half way would hand its connection back to the pool
    /// still busy).
    pub async fn wait_until_finished(
        &self,
        pool: &Pool,
        mut job: JobRecord,
        deadline: Instant,
        enqueued_awaited: bool,
        when_full: WhenFull,
        cancel: &CancellationToken,
    ) -> Result<Option<JobRecord>, WaitError> {
        let (company, id) = (job.company_id, job.view.id);
        if job.view.state.is_finished() || Instant::now() >= deadline {
            return Ok(Some(job));
        }
        // After a wake, or the timeout, the next round reads the job once more.
        let mut first = true;
        loop {
            let Some(waiter) = self.wait_for(id) else {
                // What `job` holds predates the last wake unless this is the first round.
                return without_waiter(pool, job, deadline, !first, when_full, cancel).await;
            };
            let client = tokio::select! {
                client = pool.get() => client?,
                () = cancel.cancelled() => return Ok(Some(job)),
            };
            let mark_for = deadline.saturating_duration_since(Instant::now());
            let read = if first && !enqueued_awaited && !mark_for.is_zero() {
                store::await_job(&client, company, id, mark_for).await?
            } else {
                let read = store::get(&client, company, id).await?;
                let unfinished = read.as_ref().is_some_and(|r| !r.view.state.is_finished());
                match !first && unfinished && !mark_for.is_zero() {
                    true => store::await_job(&client, company, id, mark_for).await?,
                    false => read,
                }
            };
            drop(client);
            first = false;
            let Some(read) = read else {
                return Ok(None);
            };
            job = read;
            let left = deadline.saturating_duration_since(Instant::now());
            if job.view.state.is_finished() || left.is_zero() {
                break;
            }
            tokio::select! {
                _ = waiter.wait(left) => {}
                () = cancel.cancelled() => break,
            }
        }
        Ok(Some(job))
    }
}

/// What a wait does when the process already has `max_waiters` requests waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Return the job as it is at once (a POST's synchronous wait: the answer is a `202`).
    Answer,
    /// Read the job once every [`FULL_POLL`] until it finishes or the deadline comes (a long
    /// poll: answering at once would send its client straight back, in a tight loop).
    Poll,
}

/// How often a wait without a waiter reads its job (see [`WhenFull::Poll`]).
pub const FULL_POLL: Duration = Duration::from_secs(1);

/// A wait past `max_waiters` (see [`WhenFull`]): `stale` when `job` was read before the last
/// wake, which was most likely its completion, so it is read again before it is returned.
/// `cancel` stops it as it stops the wait with a waiter: while waiting for a connection or
/// for the next read, never inside a query.
async fn without_waiter(
    pool: &Pool,
    mut job: JobRecord,
    deadline: Instant,
    mut stale: bool,
    when_full: WhenFull,
    cancel: &CancellationToken,
) -> Result<Option<JobRecord>, WaitError> {
    let (company, id) = (job.company_id, job.view.id);
    loop {
        if stale {
            let client = tokio::select! {
                client = pool.get() => client?,
                () = cancel.cancelled() => return Ok(Some(job)),
            };
            match store::get(&client, company, id).await? {
                Some(read) => job = read,
                None => return Ok(None),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if when_full == WhenFull::Answer || job.view.state.is_finished() || left.is_zero() {
            return Ok(Some(job));
        }
        tokio::select! {
            () = tokio::time::sleep(left.min(FULL_POLL)) => {}
            () = cancel.cancelled() => return Ok(Some(job)),
        }
        stale = true;
    }
}

async fn listen_loop(pg: tokio_postgres::Config, inner: Arc<Inner>, shutdown: CancellationToken) {
    tenantry_core::shutdown::reconnecting(
        "queue LISTEN",
        &shutdown,
        Duration::from_millis(100),
        Duration::from_secs(5),
        || async {
            let result = listen_once(&pg, &inner, &shutdown).await;
            inner.connected.store(false, Ordering::Relaxed);
            crate::metrics::LISTENER_CONNECTED.set(0);
            // Nobody is woken by notifications now: waiters re-read, the worker polls.
            inner.wake_all();
            match result {
                // Only a shutdown ends the loop; a connection that simply closed is retried.
                Ok(()) if !shutdown.is_cancelled() => {
                    Err(anyhow::anyhow!("the LISTEN connection closed"))
                }
                other => other,
            }
        },
    )
    .await
}

async fn listen_once(
    pg: &tokio_postgres::Config,
    inner: &Arc<Inner>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut conn) = tenantry_core::db::connect_raw(pg).await?;
    // The connection must be polled for LISTEN itself to complete, so a driver task polls it
    // and forwards notifications; the channel is bounded, so a flood slows the connection
    // rather than growing memory.
    let (tx, mut rx) =
        mpsc::channel::<Result<tokio_postgres::Notification, tokio_postgres::Error>>(4096);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(Ok(n)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
                None => break,
            }
        }
    });
    let result = async {
        tenantry_core::db::listen(
            &client,
            pg,
            &format!("LISTEN {CHANNEL_WAITING}; LISTEN {CHANNEL_FINISHED}"),
        )
        .await?;
        inner.connected.store(true, Ordering::Relaxed);
        crate::metrics::LISTENER_CONNECTED.set(1);
        // Anything that happened before LISTEN took effect was missed: look again.
        inner.wake_all();
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = rx.recv() => m,
            };
            match msg {
                Some(Ok(n)) if n.channel() == CHANNEL_FINISHED => {
                    for id in n
                        .payload()
                        .split(',')
                        .filter_map(|s| Uuid::parse_str(s).ok())
                    {
                        inner.finished(id);
                    }
                }
                Some(Ok(_)) => inner.work.notify_one(),
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    drop(client);
    result
}

/// Sends `NOTIFY tenantry_jobs_waiting` after enqueuing transactions commit. Pokes that arrive
/// while a notification is being sent are coalesced into one more, so a burst of 1,000
/// enqueues costs a handful of notifications, and an isolated one is sent at once.
#[derive(Clone)]
pub struct Notifier {
    pending: Arc<AtomicBool>,
    signal: Arc<Notify>,
}

impl Notifier {
    pub fn start(pool: Pool, shutdown: CancellationToken) -> Notifier {
        let n = Notifier {
            pending: Arc::new(AtomicBool::new(false)),
            signal: Arc::new(Notify::new()),
        };
        let (pending, signal) = (n.pending.clone(), n.signal.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = signal.notified() => {}
                }
                while pending.swap(false, Ordering::AcqRel) {
                    let sent = async {
                        let client = pool.get().await.map_err(|e| e.to_string())?;
                        let notify = client
                            .prepare_cached(NOTIFY_WAITING_SQL)
                            .await
                            .map_err(|e| e.to_string())?;
                        client
                            .execute(&notify, &[])
                            .await
                            .map_err(|e| e.to_string())
                    }
                    .await;
                    if let Err(e) = sent {
                        // Workers also poll, so a lost notification costs latency, not jobs.
                        tracing::warn!(error = %e, "could not notify workers");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        n
    }

    /// Call after the transaction that enqueued jobs has committed.
    pub fn poke(&self) {
        self.pending.store(true, Ordering::Release);
        self.signal.notify_one();
    }
}
