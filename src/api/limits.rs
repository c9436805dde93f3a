//! Per-identity limits: rate limits on setpoint writes, reads and subscribes, and caps on open
//! subscriptions and concurrent reads.
//! Both are per replica; behind a load balancer the effective limit is the replica count times
//! these.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::LimitsConfig;
use crate::error::{Error, Result};
use crate::telemetry;

/// How many checks between sweeps of idle identities out of the rate limiter's map.
const SWEEP_EVERY: u64 = 4096;

/// A rate per identity: a token bucket for each, from `governor`.
#[derive(Clone)]
struct Rate {
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    checks: Arc<AtomicU64>,
    clock: DefaultClock,
    /// The metric's `limit` label.
    what: &'static str,
}

impl Rate {
    fn new(per_second: u32, burst: u32, what: &'static str) -> Self {
        // Zero would mean "never", which nobody wants to configure by accident.
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Self {
            limiter: Arc::new(DefaultKeyedRateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            )),
            checks: Arc::default(),
            clock: DefaultClock::default(),
            what,
        }
    }

    /// Takes one from `subject`'s budget, or says when the next one would pass.
    fn take(&self, subject: &str) -> Result<()> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            // Identities whose budget is full again carry no state worth keeping.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(&subject.to_owned())
            .map_err(|not_until| {
                metrics::counter!(telemetry::RATE_LIMITED, "limit" => self.what).increment(1);
                Error::RateLimited {
                    retry_after: not_until.wait_time_from(self.clock.now()),
                }
            })
    }
}

#[derive(Clone)]
pub struct Limits {
    writes: Rate,
    reads: Rate,
    reads_running: Arc<Mutex<HashMap<String, usize>>>,
    max_reads: usize,
    subscribes: Rate,
    subscriptions: Arc<Mutex<HashMap<String, usize>>>,
    max_subscriptions: usize,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            writes: Rate::new(config.write_rate_limit, config.write_burst, "writes"),
            reads: Rate::new(config.read_rate_limit, config.read_burst, "reads"),
            reads_running: Arc::default(),
            max_reads: config.max_reads_per_identity,
            subscribes: Rate::new(
                config.subscribe_rate_limit,
                config.subscribe_burst,
                "subscribes",
            ),
            subscriptions: Arc::default(),
            max_subscriptions: config.max_subscriptions_per_identity,
        }
    }

    /// Takes one write from `subject`'s budget, or says when the next one would pass.
    pub fn write(&self, subject: &str) -> Result<()> {
        self.writes.take(subject)
    }

    /// Takes one read from `subject`'s budget and counts it as running until the returned guard
    /// is dropped: one identity cannot hold more than its share of the database's connections.
    pub fn read(&self, subject: &str) -> Result<Slot> {
        self.reads.take(subject)?;
        let mut running = self.reads_running.lock().unwrap_or_else(|e| e.into_inner());
        let count = running.entry(subject.to_owned()).or_default();
        if *count >= self.max_reads {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "concurrent_reads").increment(1);
            return Err(Error::TooManyReads {
                limit: self.max_reads,
            });
        }
        *count += 1;
        Ok(Slot {
            subject: subject.to_owned(),
            counts: Arc::clone(&self.reads_running),
        })
    }

    /// Counts an open subscription of `subject` until the returned guard is dropped. Opening
    /// one takes from a budget of its own too: each may send a whole snapshot.
    pub fn subscription(&self, subject: &str) -> Result<Slot> {
        self.subscribes.take(subject)?;
        let mut open = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(subject.to_owned()).or_default();
        if *count >= self.max_subscriptions {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "subscriptions").increment(1);
            return Err(Error::TooManyStreams {
                limit: self.max_subscriptions,
            });
        }
        *count += 1;
        Ok(Slot {
            subject: subject.to_owned(),
            counts: Arc::clone(&self.subscriptions),
        })
    }
}

/// One open subscription or running read of an identity, released on drop.
pub struct Slot {
    subject: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.subject) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.subject);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeConfig;

    fn limits(rate: u32, burst: u32, subscriptions: usize) -> Limits {
        let mut config = ServeConfig::from_defaults().expect("defaults").limits;
        config.write_rate_limit = rate;
        config.write_burst = burst;
        config.max_subscriptions_per_identity = subscriptions;
        Limits::new(&config)
    }

    #[test]
    fn writes_are_limited_per_identity() {
        let limits = limits(1, 3, 1);
        for _ in 0..3 {
            limits.write("a").expect("within the burst");
        }
        match limits.write("a") {
            Err(Error::RateLimited { retry_after }) => {
                assert!(retry_after > std::time::Duration::ZERO);
                assert!(retry_after <= std::time::Duration::from_secs(1));
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        limits
            .write("b")
            .expect("another identity has its own budget");
    }

    #[test]
    fn subscriptions_are_counted_until_dropped() {
        let limits = limits(1, 1, 2);
        let first = limits.subscription("a").expect("1");
        let _second = limits.subscription("a").expect("2");
        assert!(matches!(
            limits.subscription("a"),
            Err(Error::TooManyStreams { limit: 2 })
        ));
        let _other = limits.subscription("b").expect("per identity");
        drop(first);
        let _third = limits.subscription("a").expect("a slot was freed");
    }
}
