//! Commanded against reported: whether a heater follows its command (BACnet's
//! Feedback_Value, a device shadow's desired against reported). Pure.

use chrono::{DateTime, TimeDelta, Utc};

use super::control::HeaterCommand;

/// A heater's state as it reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub state: HeaterCommand,
    /// When it was in that state.
    pub at: DateTime<Utc>,
}

impl Reported {
    /// Whether `self` is at least as new as `other`: reports are kept newest first.
    pub fn supersedes(&self, other: Option<&Reported>) -> bool {
        other.is_none_or(|other| self.at >= other.at)
    }
}

/// Whether a heater follows `command`, switched to at `switched_at`: it reports that state,
/// or the command is younger than `timeout` (the heater may still be switching). A report
/// that differs after the timeout (a fault, or a manual change at the device) does not.
pub fn following(
    command: HeaterCommand,
    switched_at: DateTime<Utc>,
    reported: &Reported,
    now: DateTime<Utc>,
    timeout: TimeDelta,
) -> bool {
    reported.state == command
        || switched_at
            .checked_add_signed(timeout)
            .is_none_or(|due| now < due)
}

#[cfg(test)]
mod tests {
    use super::*;
    use HeaterCommand::{Off, On};

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn a_heater_follows_until_it_reports_another_state_past_the_timeout() {
        let timeout = TimeDelta::seconds(60);
        let off = Reported {
            state: Off,
            at: t(0),
        };
        // Commanded ON at 10, still reporting OFF: given a minute to switch.
        assert!(following(On, t(10), &off, t(69), timeout));
        assert!(!following(On, t(10), &off, t(70), timeout));
        let on = Reported {
            state: On,
            at: t(20),
        };
        assert!(following(On, t(10), &on, t(500), timeout));
        // Switched OFF by hand later: not following, at once (the command is old).
        let by_hand = Reported {
            state: Off,
            at: t(400),
        };
        assert!(!following(On, t(10), &by_hand, t(401), timeout));
        assert!(by_hand.supersedes(Some(&on)) && !on.supersedes(Some(&by_hand)));
        assert!(
            following(On, t(10), &off, t(10), TimeDelta::MAX),
            "no overflow"
        );
    }
}
