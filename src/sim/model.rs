//! The thermal model of one room: pure arithmetic, no I/O, no clock.
//!
//! Newton's law of cooling plus a heater: `dT/dt = heating (if on) - loss * (T - outside)`,
//! integrated with explicit Euler steps of at most one simulated minute, plus measurement noise
//! on the reading (not on the room itself).

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
    /// The room temperature after `minutes` of simulated time.
    pub fn advance(&self, celsius: f64, heater_on: bool, minutes: f64) -> f64 {
        let mut t = celsius;
        let mut left = minutes.max(0.0);
        while left > 0.0 {
            let dt = left.min(1.0);
            let heating = if heater_on {
                self.heating_per_minute
            } else {
                0.0
            };
            t += dt * (heating - self.loss_per_minute * (t - self.outside_celsius));
            left -= dt;
        }
        t
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
    fn at_the_outside_temperature_an_idle_room_stays_put() {
        assert_eq!(M.advance(5.0, false, 60.0), 5.0);
    }
}
