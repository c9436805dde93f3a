//! Per-identity limits: rate limits on setpoint writes, reads and subscribes, and caps on open
//! subscriptions and running reads. All are per replica; behind a load balancer the effective
//! limit is the replica count times these. An identity is a [`Subject`]: the same name from two
//! kinds of credential is two.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::LimitsConfig;
use crate::domain::Subject;
use crate::error::{Error, Result};
use crate::telemetry;

/// How many checks between sweeps of idle identities out of the rate limiter's map.
const SWEEP_EVERY: u64 = 4096;

/// A rate per identity: a token bucket for each, from `governor`.
#[derive(Clone)]
struct Rate {
    limiter: Arc<DefaultKeyedRateLimiter<Subject>>,
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

    /// Takes `n` from `subject`'s budget at once, or says when they would pass.
    fn take_n(&self, subject: &Subject, n: NonZeroU32) -> Result<()> {
        let limited = |retry_after| {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => self.what).increment(1);
            Error::RateLimited {
                limit: self.what,
                retry_after,
            }
        };
        match self.limiter.check_key_n(subject, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(limited(not_until.wait_time_from(self.clock.now()))),
            // More than the burst: never at once.
            Err(_) => Err(limited(std::time::Duration::MAX)),
        }
    }

    /// Takes one from `subject`'s budget, or says when the next one would pass.
    fn take(&self, subject: &Subject) -> Result<()> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            // Identities whose budget is full again carry no state worth keeping.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(subject).map_err(|not_until| {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => self.what).increment(1);
            Error::RateLimited {
                limit: self.what,
                retry_after: not_until.wait_time_from(self.clock.now()),
            }
        })
    }
}

/// How many of something each identity holds at once, at most `max`.
#[derive(Clone)]
struct AtOnce {
    held: Arc<Mutex<HashMap<Subject, usize>>>,
    max: usize,
    /// The metric's `limit` label.
    what: &'static str,
}

impl AtOnce {
    fn new(max: usize, what: &'static str) -> Self {
        Self {
            held: Arc::default(),
            max,
            what,
        }
    }

    /// One more for `subject` until the slot is dropped; `None` when it holds `max` already.
    fn hold(&self, subject: &Subject) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(subject.clone()).or_default();
        if *count >= self.max {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => self.what).increment(1);
            return None;
        }
        *count += 1;
        Some(Slot {
            subject: subject.clone(),
            held: Arc::clone(&self.held),
        })
    }
}

#[derive(Clone)]
pub struct Limits {
    writes: Rate,
    reads: Rate,
    reads_running: AtOnce,
    subscribes: Rate,
    subscriptions: AtOnce,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            writes: Rate::new(config.write_rate_limit, config.write_burst, "writes"),
            reads: Rate::new(config.read_rate_limit, config.read_burst, "reads"),
            reads_running: AtOnce::new(config.max_reads_per_identity, "concurrent_reads"),
            subscribes: Rate::new(
                config.subscribe_rate_limit,
                config.subscribe_burst,
                "subscribes",
            ),
            subscriptions: AtOnce::new(config.max_subscriptions_per_identity, "subscriptions"),
        }
    }

    /// Takes one write from `subject`'s budget, or says when the next one would pass.
    pub fn write(&self, subject: &Subject) -> Result<()> {
        self.writes.take(subject)
    }

    /// Takes `n` writes from `subject`'s budget at once (a batch).
    pub fn writes(&self, subject: &Subject, n: NonZeroU32) -> Result<()> {
        self.writes.take_n(subject, n)
    }

    /// Takes one read from `subject`'s budget and counts it as running until the returned slot
    /// is dropped: one identity cannot hold more than its share of the database's connections.
    pub fn read(&self, subject: &Subject) -> Result<Slot> {
        self.reads.take(subject)?;
        self.reads_running.hold(subject).ok_or(Error::TooManyReads {
            limit: self.reads_running.max,
        })
    }

    /// Counts an open subscription of `subject` until the returned slot is dropped. Opening one
    /// takes from a budget of its own too: each may send a whole snapshot.
    pub fn subscription(&self, subject: &Subject) -> Result<Slot> {
        self.subscribes.take(subject)?;
        self.subscriptions
            .hold(subject)
            .ok_or(Error::TooManyStreams {
                limit: self.subscriptions.max,
            })
    }
}

/// One open subscription or running read of an identity, released on drop.
pub struct Slot {
    subject: Subject,
    held: Arc<Mutex<HashMap<Subject, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.subject) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.subject);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeConfig;
    use crate::domain::CredentialKind;

    fn limits(rate: u32, burst: u32, subscriptions: usize) -> Limits {
        let mut config = ServeConfig::from_defaults().expect("defaults").limits;
        config.write_rate_limit = rate;
        config.write_burst = burst;
        config.max_subscriptions_per_identity = subscriptions;
        Limits::new(&config)
    }

    fn jwt(name: &str) -> Subject {
        Subject {
            kind: CredentialKind::Jwt,
            name: name.into(),
        }
    }

    #[test]
    fn writes_are_limited_per_identity() {
        let limits = limits(1, 3, 1);
        for _ in 0..3 {
            limits.write(&jwt("a")).expect("within the burst");
        }
        match limits.write(&jwt("a")) {
            Err(Error::RateLimited { limit, retry_after }) => {
                assert_eq!(limit, "writes");
                assert!(retry_after > std::time::Duration::ZERO);
                assert!(retry_after <= std::time::Duration::from_secs(1));
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        limits
            .write(&jwt("b"))
            .expect("another identity has its own budget");
    }

    #[test]
    fn subscriptions_are_counted_until_dropped() {
        let limits = limits(1, 1, 2);
        let first = limits.subscription(&jwt("a")).expect("1");
        let _second = limits.subscription(&jwt("a")).expect("2");
        assert!(matches!(
            limits.subscription(&jwt("a")),
            Err(Error::TooManyStreams { limit: 2 })
        ));
        let _other = limits.subscription(&jwt("b")).expect("per identity");
        drop(first);
        let _third = limits.subscription(&jwt("a")).expect("a slot was freed");
    }

    #[test]
    fn the_same_name_from_another_kind_of_credential_is_another_identity() {
        let limits = limits(1, 1, 1);
        let kinds = [
            CredentialKind::Jwt,
            CredentialKind::StaticToken,
            CredentialKind::Certificate,
        ];
        let subjects = kinds.map(|kind| Subject {
            kind,
            name: "CN=gw".into(),
        });
        let _slots: Vec<_> = subjects
            .iter()
            .map(|subject| {
                limits.write(subject).expect("a budget of its own");
                limits.subscription(subject).expect("a slot of its own")
            })
            .collect();
        assert!(limits.write(&subjects[0]).is_err());
        assert!(limits.subscription(&subjects[2]).is_err());
    }
}
