//! Equipment protection: how soon a heater may be switched again (minimum on and off times),
//! how long it may run (maximum run time, then a cooldown), and how often its command is
//! repeated for heaters that lose their state (keep-alive). Pure: every function takes the
//! instant it is asked about, and the holds come from the last command's own time, so they
//! survive restarts and changes of the replica that decides.

use chrono::{DateTime, TimeDelta, Utc};

use super::control::HeaterCommand;

/// A heater's limits; zero durations (and `None`) mean none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Protection {
    /// After ON, no OFF before this long (unless safety needs it).
    pub min_on: TimeDelta,
    /// After OFF, no ON before this long.
    pub min_off: TimeDelta,
    /// ON at most this long at a stretch; then OFF for `cooldown`.
    pub max_run: Option<TimeDelta>,
    /// After an OFF forced by `max_run`, no ON before this long (at least `min_off`).
    pub cooldown: TimeDelta,
    /// The current command is sent again this long after the last one, for heaters that lose
    /// their state.
    pub keep_alive: Option<TimeDelta>,
}

/// The last command sent to a heater, as far as its holds go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switched {
    pub command: HeaterCommand,
    /// When it was decided.
    pub at: DateTime<Utc>,
    /// Whether it was the OFF of a maximum run (its hold is the cooldown).
    pub forced_off: bool,
}

/// The last command a heater was sent, as its holds and keep-alive count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSent {
    /// When the heater was switched to it: its hold counts from here.
    pub switched_at: DateTime<Utc>,
    /// When it was last sent, first or again (keep-alive): the next repeat counts from here.
    pub sent_at: DateTime<Utc>,
    /// Whether it was the OFF of a maximum run.
    pub forced_off: bool,
}

/// The limit that shaped a command: held it back, forced it, or repeated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    MinOnTime,
    MinOffTime,
    MaxRunTime,
    RunCooldown,
    KeepAlive,
}

/// What may happen to a switch the rule wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Send it now.
    Now,
    /// Not before this instant: the last command's hold lasts until then.
    After(DateTime<Utc>),
}

impl Protection {
    /// When the hold of `last` ends: what it forbids (the opposite command) is allowed from
    /// then on.
    pub fn hold_until(&self, last: &Switched) -> DateTime<Utc> {
        later(last.at, self.hold(last))
    }

    /// Which limit makes `last` hold.
    pub fn holding_limit(last: &Switched) -> Limit {
        match last.command {
            HeaterCommand::On => Limit::MinOnTime,
            HeaterCommand::Off if last.forced_off => Limit::RunCooldown,
            HeaterCommand::Off => Limit::MinOffTime,
        }
    }

    /// How long `last` holds.
    fn hold(&self, last: &Switched) -> TimeDelta {
        let hold = match last.command {
            HeaterCommand::On => self.min_on,
            HeaterCommand::Off if last.forced_off => self.cooldown.max(self.min_off),
            HeaterCommand::Off => self.min_off,
        };
        hold.max(TimeDelta::zero())
    }

    /// Whether switching to `wanted` may happen at `now`. `safety` (the stale-sensor fail-safe,
    /// a deleted setpoint, the SAFETY level deciding) cuts any hold short.
    pub fn gate(
        &self,
        wanted: HeaterCommand,
        last: Option<&Switched>,
        now: DateTime<Utc>,
        safety: bool,
    ) -> Gate {
        match last {
            // No hold at all: `now` may even lie before `last.at` (a reading received in a
            // batch decided after the command before it).
            Some(last)
                if last.command != wanted && !safety && self.hold(last) > TimeDelta::zero() =>
            {
                let until = self.hold_until(last);
                if now < until {
                    Gate::After(until)
                } else {
                    Gate::Now
                }
            }
            _ => Gate::Now,
        }
    }

    /// When a heater that is ON since `last` must be switched OFF for its maximum run.
    pub fn run_ends(&self, last: &Switched) -> Option<DateTime<Utc>> {
        match last.command {
            HeaterCommand::On => self.max_run.map(|run| later(last.at, run)),
            HeaterCommand::Off => None,
        }
    }

    /// When the last command is next repeated (keep-alive), counting from when it was last
    /// sent, first or again.
    pub fn repeat_at(&self, last_sent: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.keep_alive
            .filter(|every| *every > TimeDelta::zero())
            .map(|every| later(last_sent, every))
    }

    /// When the keep-alive next repeats `last`, last sent at `last_sent`. A repeat does not say
    /// it repeats a maximum run's OFF (after a restart it would shorten the cooldown to the
    /// minimum off time), so none comes before that cooldown ends.
    pub fn next_repeat(&self, last: &Switched, last_sent: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let due = self.repeat_at(last_sent)?;
        Some(if last.forced_off {
            due.max(self.hold_until(last))
        } else {
            due
        })
    }

    /// The next instant at which something may be due for a heater whose last command is
    /// `last`, last sent at `last_sent`, with a switch wanted after `deferred` if any: the
    /// engine wakes the sensor then, without waiting for a reading.
    pub fn next_deadline(
        &self,
        last: &Switched,
        last_sent: DateTime<Utc>,
        deferred: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        [
            deferred,
            self.run_ends(last),
            self.next_repeat(last, last_sent),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// `at + span`, or the end of time rather than an overflow.
fn later(at: DateTime<Utc>, span: TimeDelta) -> DateTime<Utc> {
    at.checked_add_signed(span)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use HeaterCommand::{Off, On};

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn limits(min_on: i64, min_off: i64) -> Protection {
        Protection {
            min_on: TimeDelta::seconds(min_on),
            min_off: TimeDelta::seconds(min_off),
            ..Protection::default()
        }
    }

    #[test]
    fn a_switch_inside_the_hold_waits_for_its_end_and_safety_does_not() {
        let p = limits(300, 120);
        let on = Switched {
            command: On,
            at: t(0),
            forced_off: false,
        };
        assert_eq!(p.gate(Off, Some(&on), t(10), false), Gate::After(t(300)));
        assert_eq!(p.gate(Off, Some(&on), t(300), false), Gate::Now);
        assert_eq!(p.gate(Off, Some(&on), t(10), true), Gate::Now, "safety");
        assert_eq!(p.gate(On, Some(&on), t(10), false), Gate::Now, "no switch");
        assert_eq!(
            p.gate(On, None, t(10), false),
            Gate::Now,
            "nothing sent yet"
        );
        let forever = Protection {
            min_on: TimeDelta::MAX,
            ..Protection::default()
        };
        assert_eq!(
            forever.hold_until(&on),
            DateTime::<Utc>::MAX_UTC,
            "no overflow"
        );
        assert_eq!(
            limits(0, 0).gate(Off, Some(&on), t(-1), false),
            Gate::Now,
            "no hold, even asked before the last command's time"
        );
        let off = Switched {
            command: Off,
            at: t(0),
            forced_off: false,
        };
        assert_eq!(p.gate(On, Some(&off), t(10), false), Gate::After(t(120)));
    }

    #[test]
    fn a_maximum_run_ends_an_on_and_its_off_holds_the_cooldown() {
        let p = Protection {
            max_run: Some(TimeDelta::seconds(3600)),
            cooldown: TimeDelta::seconds(600),
            ..limits(0, 60)
        };
        let on = Switched {
            command: On,
            at: t(0),
            forced_off: false,
        };
        assert_eq!(p.run_ends(&on), Some(t(3600)));
        let forced = Switched {
            command: Off,
            at: t(3600),
            forced_off: true,
        };
        assert_eq!(p.run_ends(&forced), None);
        assert_eq!(
            p.gate(On, Some(&forced), t(3700), false),
            Gate::After(t(4200))
        );
        let plain = Switched {
            forced_off: false,
            ..forced
        };
        assert_eq!(p.gate(On, Some(&plain), t(3700), false), Gate::Now);

        // A keep-alive repeats a forced OFF only once its cooldown is over.
        let p = Protection {
            keep_alive: Some(TimeDelta::seconds(60)),
            ..p
        };
        assert_eq!(p.next_repeat(&forced, t(3600)), Some(t(4200)));
        assert_eq!(p.next_repeat(&plain, t(3600)), Some(t(3660)));
    }

    #[test]
    fn the_next_deadline_is_the_earliest_of_what_is_due() {
        let p = Protection {
            max_run: Some(TimeDelta::seconds(3600)),
            keep_alive: Some(TimeDelta::seconds(900)),
            ..limits(0, 0)
        };
        let on = Switched {
            command: On,
            at: t(0),
            forced_off: false,
        };
        assert_eq!(p.next_deadline(&on, t(0), None), Some(t(900)));
        assert_eq!(p.next_deadline(&on, t(3000), None), Some(t(3600)));
        assert_eq!(p.next_deadline(&on, t(3000), Some(t(3100))), Some(t(3100)));
        assert_eq!(Protection::default().next_deadline(&on, t(0), None), None);
    }

    proptest! {
        /// Whatever the rule asks and whenever, a switch the gate lets through never falls
        /// inside the hold of the command before it, unless safety asked for it; and a
        /// deferred switch is allowed exactly at the end of the hold.
        #[test]
        fn no_switch_passes_inside_a_hold(
            min_on in 0i64..600,
            min_off in 0i64..600,
            cooldown in 0i64..900,
            asks in proptest::collection::vec((any::<bool>(), 0i64..400, proptest::bool::weighted(0.1)), 1..60),
        ) {
            let p = Protection {
                cooldown: TimeDelta::seconds(cooldown),
                ..limits(min_on, min_off)
            };
            let mut last: Option<Switched> = None;
            let mut now = t(0);
            for (on, gap, safety) in asks {
                now += TimeDelta::seconds(gap);
                let wanted = if on { On } else { Off };
                match p.gate(wanted, last.as_ref(), now, safety) {
                    Gate::Now => {
                        if let Some(prev) = last.filter(|l| l.command != wanted) {
                            prop_assert!(safety || now >= p.hold_until(&prev));
                        }
                        if last.is_none_or(|l| l.command != wanted) {
                            last = Some(Switched { command: wanted, at: now, forced_off: false });
                        }
                    }
                    Gate::After(until) => {
                        prop_assert!(!safety && until > now);
                        prop_assert_eq!(p.gate(wanted, last.as_ref(), until, false), Gate::Now);
                        prop_assert_eq!(
                            p.gate(wanted, last.as_ref(), until - TimeDelta::seconds(1), false),
                            Gate::After(until)
                        );
                    }
                }
            }
        }
    }
}
