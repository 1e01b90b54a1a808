//! Per-company rate limiting: a GCRA token bucket per company, one atomic per company, kept in
//! a bounded cache that forgets idle companies.

use std::{
    sync::{
        Arc,
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
    fn zero_means_no_limit() {
        assert!(RateLimiter::new(0, 10, 10).is_none());
    }
}
