//! Per-identity limits: a rate limit on setpoint writes, and a cap on open subscriptions.
//! Both are per replica; behind a load balancer the effective limit is the replica count times
//! these. An identity is a [`Subject`]: the same name from two kinds of credential is two.

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

#[derive(Clone)]
pub struct Limits {
    writes: Arc<DefaultKeyedRateLimiter<Subject>>,
    checks: Arc<AtomicU64>,
    clock: DefaultClock,
    subscriptions: Arc<Mutex<HashMap<Subject, usize>>>,
    max_subscriptions: usize,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        // Zero would mean "no writes at all", which nobody wants to configure by accident.
        let rate = NonZeroU32::new(config.write_rate_limit).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.write_burst).unwrap_or(rate);
        Self {
            writes: Arc::new(DefaultKeyedRateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            )),
            checks: Arc::default(),
            clock: DefaultClock::default(),
            subscriptions: Arc::default(),
            max_subscriptions: config.max_subscriptions_per_identity,
        }
    }

    /// Takes one write from `subject`'s budget, or says when the next one would pass.
    pub fn write(&self, subject: &Subject) -> Result<()> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            // Identities whose budget is full again carry no state worth keeping.
            self.writes.retain_recent();
            self.writes.shrink_to_fit();
        }
        self.writes.check_key(subject).map_err(|not_until| {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "writes").increment(1);
            Error::RateLimited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            }
        })
    }

    /// Counts an open subscription of `subject` until the returned guard is dropped.
    pub fn subscription(&self, subject: &Subject) -> Result<SubscriptionSlot> {
        let mut open = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(subject.clone()).or_default();
        if *count >= self.max_subscriptions {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "subscriptions").increment(1);
            return Err(Error::TooManyStreams {
                limit: self.max_subscriptions,
            });
        }
        *count += 1;
        Ok(SubscriptionSlot {
            subject: subject.clone(),
            subscriptions: Arc::clone(&self.subscriptions),
        })
    }
}

/// One open subscription, released on drop.
pub struct SubscriptionSlot {
    subject: Subject,
    subscriptions: Arc<Mutex<HashMap<Subject, usize>>>,
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        let mut open = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
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
            Err(Error::RateLimited { retry_after }) => {
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
