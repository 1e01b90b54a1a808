//! Per-company rate limiting: a GCRA token bucket per company, one atomic per company, kept in
//! a bounded cache that forgets idle companies; and a per-company cap on requests in flight.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::sync::Cache;
use uuid::Uuid;

pub struct RateLimiter {
    /// Nanoseconds between requests at the sustained rate.
    interval: u64,
    /// How far ahead of now a company's theoretical arrival time may run (the burst).
    tolerance: u64,
    epoch: Instant,
    buckets: Cache<Uuid, Arc<AtomicU64>>,
}

impl RateLimiter {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32, capacity: u64) -> Option<Self> {
        if per_second == 0 {
            return None;
        }
        let interval = 1_000_000_000 / u64::from(per_second);
        let tolerance = interval * u64::from(burst.max(1) - 1);
        // A bucket idle for longer than the burst takes to refill is full: forget it.
        let idle = Duration::from_nanos(interval + tolerance) + Duration::from_secs(1);
        Some(Self {
            interval,
            tolerance,
            epoch: Instant::now(),
            buckets: Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(idle)
                .build(),
        })
    }

    /// Takes one request from `company`'s bucket, or says how long until one is available.
    pub fn check(&self, company: Uuid) -> Result<(), Duration> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let tat = self
            .buckets
            .get_with(company, || Arc::new(AtomicU64::new(0)));
        let mut current = tat.load(Ordering::Relaxed);
        loop {
            let start = current.max(now);
            if start - now > self.tolerance {
                return Err(Duration::from_nanos(start - now - self.tolerance));
            }
            match tat.compare_exchange_weak(
                current,
                start + self.interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }
}

/// How many requests of each company are in flight through this gateway, capped
/// (`gateway.max_in_flight_per_company`). The rate limit bounds how often a company sends, not
/// how long its requests last: long polls, slow uploads or answers it does not read would
/// otherwise let one company hold every in-flight slot of its shard. A company is counted
/// only while it has requests in flight, so the maps hold no more entries than there are
/// requests; they are split by company so the gateway's threads seldom wait for each other.
pub struct CompanyInFlight {
    max: usize,
    counts: [Mutex<HashMap<Uuid, usize>>; 16],
}

/// One request's place in its company's count, given back when dropped (it rides along with
/// the answer's stream until that has been sent).
pub struct InFlightSlot {
    of: Arc<CompanyInFlight>,
    company: Uuid,
}

impl CompanyInFlight {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn counts(&self, company: Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, usize>> {
        let shard = (company.as_u128() % self.counts.len() as u128) as usize;
        self.counts[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more request of `company`, or `None` at its cap.
    pub fn enter(self: &Arc<Self>, company: Uuid) -> Option<InFlightSlot> {
        let mut counts = self.counts(company);
        let n = counts.entry(company).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(InFlightSlot {
            of: self.clone(),
            company,
        })
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let mut counts = self.of.counts(self.company);
        if let Some(n) = counts.get_mut(&self.company) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.company);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refuses_with_the_time_to_wait() {
        let limiter = RateLimiter::new(10, 5, 100).unwrap();
        let a = Uuid::now_v7();
        for _ in 0..5 {
            assert!(limiter.check(a).is_ok());
        }
        let wait = limiter.check(a).unwrap_err();
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another company has its own bucket.
        assert!(limiter.check(Uuid::now_v7()).is_ok());
    }

    #[test]
    fn refills_at_the_rate() {
        let limiter = RateLimiter::new(1000, 1, 100).unwrap();
        let a = Uuid::now_v7();
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_err());
        std::thread::sleep(Duration::from_millis(3));
        assert!(limiter.check(a).is_ok());
    }

    #[test]
    fn a_company_at_its_in_flight_cap_waits_for_one_of_its_own_to_end() {
        let cap = Arc::new(CompanyInFlight::new(2));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = cap.enter(a).expect("under the cap");
        let second = cap.enter(a).expect("at the cap");
        assert!(cap.enter(a).is_none(), "over the cap");
        assert!(cap.enter(b).is_some(), "another company has its own count");
        drop(first);
        let third = cap.enter(a).expect("a place was given back");
        drop((second, third));
        assert!(
            cap.counts.iter().all(|m| m.lock().unwrap().is_empty()),
            "a company with nothing in flight is forgotten"
        );
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(RateLimiter::new(0, 10, 10).is_none());
    }
}
