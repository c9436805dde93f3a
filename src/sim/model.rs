//! The thermal model of one room: pure arithmetic, no I/O, no clock.
//!
//! Newton's law of cooling plus a heater: each simulated minute the room gains `heating` (if
//! on) and loses `loss` of its gap to the outside temperature. That is a geometric approach to
//! an equilibrium (the outside temperature, or `outside + heating / loss` with the heater on),
//! solved in closed form, so any span of time costs the same and spans compose exactly.
//! Measurement noise is added to the reading, not to the room.

/// Parameters shared by every room.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThermalModel {
    /// Temperature the room drifts towards with the heater off, °C.
    pub outside_celsius: f64,
    /// Warming by the heater, °C per simulated minute.
    pub heating_per_minute: f64,
    /// Fraction of the gap to the outside temperature lost per simulated minute.
    pub loss_per_minute: f64,
}

impl Default for ThermalModel {
    fn default() -> Self {
        Self {
            outside_celsius: 5.0,
            heating_per_minute: 0.6,
            loss_per_minute: 0.02,
        }
    }
}

impl ThermalModel {
    /// Why these parameters describe no room, if they do not: a loss outside (0, 1] or a
    /// negative heater oscillates or runs away (and with an Euler loop, an infinite time scale
    /// once never returned).
    pub fn check(&self) -> Result<(), String> {
        if !self.outside_celsius.is_finite() {
            return Err("SIM_OUTSIDE_CELSIUS must be a finite number".into());
        }
        if !(self.heating_per_minute.is_finite() && self.heating_per_minute >= 0.0) {
            return Err("SIM_HEATING_PER_MINUTE must be zero or positive".into());
        }
        if !(self.loss_per_minute > 0.0 && self.loss_per_minute <= 1.0) {
            return Err("SIM_LOSS_PER_MINUTE must be above 0 and at most 1".into());
        }
        Ok(())
    }

    /// The room temperature after `minutes` of simulated time (none if negative).
    pub fn advance(&self, celsius: f64, heater_on: bool, minutes: f64) -> f64 {
        let target = if heater_on {
            self.equilibrium_on()
        } else {
            self.outside_celsius
        };
        target + (celsius - target) * (1.0 - self.loss_per_minute).powf(minutes.max(0.0))
    }

    /// The temperature a room settles at with the heater always on.
    pub fn equilibrium_on(&self) -> f64 {
        self.outside_celsius + self.heating_per_minute / self.loss_per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: ThermalModel = ThermalModel {
        outside_celsius: 5.0,
        heating_per_minute: 0.6,
        loss_per_minute: 0.02,
    };

    #[test]
    fn heater_off_drifts_towards_outside_without_overshooting() {
        let mut t = 20.0;
        let mut previous = t;
        for _ in 0..1000 {
            t = M.advance(t, false, 1.0);
            assert!(t < previous && t > M.outside_celsius);
            previous = t;
        }
        assert!((t - 5.0).abs() < 0.01, "{t}");
    }

    #[test]
    fn heater_on_warms_towards_its_equilibrium() {
        assert!((M.equilibrium_on() - 35.0).abs() < 1e-9);
        let warmer = M.advance(15.0, true, 1.0);
        assert!((warmer - (15.0 + 0.6 - 0.02 * 10.0)).abs() < 1e-9);
        let settled = M.advance(15.0, true, 2000.0);
        assert!((settled - M.equilibrium_on()).abs() < 0.01, "{settled}");
    }

    #[test]
    fn steps_compose_and_nothing_happens_in_no_time() {
        let once = M.advance(18.0, true, 10.0);
        let twice = M.advance(M.advance(18.0, true, 4.0), true, 6.0);
        assert!((once - twice).abs() < 1e-9);
        assert_eq!(M.advance(18.0, true, 0.0), 18.0);
        assert_eq!(M.advance(18.0, false, -3.0), 18.0);
    }

    #[test]
    fn whole_minutes_are_the_per_minute_rule_applied_that_often() {
        // The rule as the parameters state it, one minute at a time.
        let by_minute = |mut t: f64, on: bool, n: usize| {
            for _ in 0..n {
                t += if on { 0.6 } else { 0.0 } - 0.02 * (t - 5.0);
            }
            t
        };
        for (start, on) in [(12.0, true), (30.0, true), (21.0, false), (3.0, false)] {
            for n in [1, 7, 90] {
                let closed = M.advance(start, on, n as f64);
                assert!(
                    (closed - by_minute(start, on, n)).abs() < 1e-9,
                    "{start} {on} {n}"
                );
            }
        }
    }

    #[test]
    fn a_huge_span_settles_at_once_instead_of_looping() {
        assert_eq!(M.advance(18.0, false, f64::INFINITY), 5.0);
        assert!((M.advance(18.0, true, 1e12) - M.equilibrium_on()).abs() < 1e-9);
    }

    #[test]
    fn parameters_that_describe_no_room_are_refused() {
        assert_eq!(M.check(), Ok(()));
        let with = |f: fn(&mut ThermalModel)| {
            let mut m = M;
            f(&mut m);
            m.check()
        };
        assert!(with(|m| m.loss_per_minute = 0.0).is_err());
        assert!(with(|m| m.loss_per_minute = 1.5).is_err());
        assert!(with(|m| m.loss_per_minute = f64::NAN).is_err());
        assert!(with(|m| m.heating_per_minute = -0.1).is_err());
        assert!(with(|m| m.heating_per_minute = f64::INFINITY).is_err());
        assert!(with(|m| m.outside_celsius = f64::NAN).is_err());
        assert_eq!(with(|m| m.loss_per_minute = 1.0), Ok(()));
        assert_eq!(with(|m| m.heating_per_minute = 0.0), Ok(()));
    }

    #[test]
    fn at_the_outside_temperature_an_idle_room_stays_put() {
        assert_eq!(M.advance(5.0, false, 60.0), 5.0);
    }
}
