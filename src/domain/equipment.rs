//! What operators set per building and per sensor besides setpoints: heater limits that
//! override the service's (a sensor's over its building's, field by field) and out of service.
//! Pure: the engine and the API resolve a sensor's settings from one [`HeaterSettings`] table.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};

use super::protection::Protection;
use super::{BuildingId, SensorId, ValidationError};

/// The longest limit an operator may set: a larger one is a typo, and a week already keeps a
/// heater from switching for longer than any plant needs.
pub const MAX_LIMIT: TimeDelta = TimeDelta::days(7);

/// Limits set for a building or a sensor; `None` inherits, zero means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub min_on: Option<TimeDelta>,
    pub min_off: Option<TimeDelta>,
    pub max_run: Option<TimeDelta>,
    pub cooldown: Option<TimeDelta>,
    pub keep_alive: Option<TimeDelta>,
}

impl Limits {
    /// The fields in API order, with their names: for validation and for storage.
    pub fn fields(&self) -> [(&'static str, Option<TimeDelta>); 5] {
        [
            ("min_on_time", self.min_on),
            ("min_off_time", self.min_off),
            ("max_run_time", self.max_run),
            ("run_cooldown", self.cooldown),
            ("keep_alive", self.keep_alive),
        ]
    }

    /// Each set limit must be from zero to [`MAX_LIMIT`].
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (field, value) in self.fields() {
            if value.is_some_and(|v| v < TimeDelta::zero() || v > MAX_LIMIT) {
                return Err(ValidationError::new(field, "must be from 0s to 7 days"));
            }
        }
        Ok(())
    }

    /// `base` with the limits set here in place of its own.
    pub fn over(&self, base: Protection) -> Protection {
        let optional = |set: Option<TimeDelta>, inherited| match set {
            Some(span) => Some(span).filter(|s| *s > TimeDelta::zero()),
            None => inherited,
        };
        Protection {
            min_on: self.min_on.unwrap_or(base.min_on),
            min_off: self.min_off.unwrap_or(base.min_off),
            max_run: optional(self.max_run, base.max_run),
            cooldown: self.cooldown.unwrap_or(base.cooldown),
            keep_alive: optional(self.keep_alive, base.keep_alive),
        }
    }
}

/// A building or a sensor out of service: no commands for its heaters until it is back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfService {
    pub reason: String,
    pub since: DateTime<Utc>,
    pub by: String,
    /// Whether a heater left ON is switched OFF as it goes out of service (the default), or
    /// left as it is (a technician works on it by hand).
    pub release: bool,
    /// Whether the whole building is out (else the sensor alone).
    pub building_wide: bool,
}

/// What is set for one building (the defaults of its sensors) or one sensor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    pub limits: Limits,
    pub out_of_service: Option<OutOfService>,
}

/// A sensor's settings as the loop applies them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    pub protection: Protection,
    /// The sensor's own, else its building's.
    pub out_of_service: Option<OutOfService>,
}

/// What is set in one building: its own settings and its sensors'.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Building {
    own: Settings,
    /// A sensor's settings apply while its setpoint is in this building.
    sensors: HashMap<SensorId, Settings>,
}

/// Every building's and sensor's settings, over the service's limits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaterSettings {
    service: Protection,
    buildings: HashMap<BuildingId, Building>,
}

impl HeaterSettings {
    pub fn new(service: Protection) -> Self {
        Self {
            service,
            ..Self::default()
        }
    }

    /// Adds the settings of `building`, or of `sensor` in it.
    pub fn set(&mut self, building: BuildingId, sensor: Option<SensorId>, settings: Settings) {
        let entry = self.buildings.entry(building).or_default();
        match sensor {
            Some(sensor) => {
                entry.sensors.insert(sensor, settings);
            }
            None => entry.own = settings,
        }
    }

    /// The service's limits: no building or sensor has its own.
    pub fn service(&self) -> Protection {
        self.service
    }

    /// Whether nothing is set beyond the service's limits: then no lookup is needed.
    pub fn is_uniform(&self) -> bool {
        self.buildings.is_empty()
    }

    /// What applies to `sensor` while its setpoint is in `building`.
    pub fn resolve(&self, sensor: &str, building: Option<&BuildingId>) -> Resolved {
        let (protection, out_of_service) = self.applying(sensor, building);
        Resolved {
            protection,
            out_of_service: out_of_service.cloned(),
        }
    }

    /// The same, borrowed: what the loop looks up for every reading, without copying a reason.
    pub fn applying(
        &self,
        sensor: &str,
        building: Option<&BuildingId>,
    ) -> (Protection, Option<&OutOfService>) {
        let entry = building.and_then(|b| self.buildings.get(b));
        let of_building = entry.map(|b| &b.own);
        let own = entry.and_then(|b| b.sensors.get(sensor));
        let mut protection = self.service;
        for settings in [of_building, own].into_iter().flatten() {
            protection = settings.limits.over(protection);
        }
        let out = [own, of_building]
            .into_iter()
            .flatten()
            .find_map(|s| s.out_of_service.as_ref());
        (protection, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minutes(m: i64) -> Option<TimeDelta> {
        Some(TimeDelta::minutes(m))
    }

    fn out(reason: &str, building_wide: bool) -> OutOfService {
        OutOfService {
            reason: reason.into(),
            since: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            by: "op".into(),
            release: true,
            building_wide,
        }
    }

    #[test]
    fn a_sensor_overrides_its_building_field_by_field_and_zero_turns_a_limit_off() {
        let service = Protection {
            min_on: TimeDelta::minutes(1),
            max_run: minutes(60),
            ..Protection::default()
        };
        let (hq, annex) = (
            BuildingId::parse("hq").unwrap(),
            BuildingId::parse("annex").unwrap(),
        );
        let mut settings = HeaterSettings::new(service);
        assert!(settings.is_uniform());
        settings.set(
            hq.clone(),
            None,
            Settings {
                limits: Limits {
                    min_on: minutes(5),
                    min_off: minutes(3),
                    ..Limits::default()
                },
                out_of_service: None,
            },
        );
        settings.set(
            hq.clone(),
            Some(SensorId::parse("boiler").unwrap()),
            Settings {
                limits: Limits {
                    min_off: minutes(10),
                    max_run: Some(TimeDelta::zero()),
                    ..Limits::default()
                },
                out_of_service: Some(out("valve", false)),
            },
        );
        assert!(!settings.is_uniform());
        let boiler = settings.resolve("boiler", Some(&hq));
        assert_eq!(
            boiler.protection,
            Protection {
                min_on: TimeDelta::minutes(5),
                min_off: TimeDelta::minutes(10),
                max_run: None,
                ..Protection::default()
            }
        );
        assert_eq!(boiler.out_of_service, Some(out("valve", false)));
        let other = settings.resolve("room", Some(&hq));
        assert_eq!(other.protection.min_off, TimeDelta::minutes(3));
        assert_eq!(other.protection.max_run, minutes(60), "inherited");
        assert_eq!(other.out_of_service, None);
        // The boiler moved to another building: its own settings stay with the old one.
        assert_eq!(settings.resolve("boiler", Some(&annex)).protection, service);
        assert_eq!(settings.resolve("boiler", None).protection, service);
        // Set again there, it has a row in each: the one of its building applies.
        settings.set(
            annex.clone(),
            Some(SensorId::parse("boiler").unwrap()),
            Settings {
                limits: Limits {
                    min_on: minutes(2),
                    ..Limits::default()
                },
                out_of_service: None,
            },
        );
        let moved = settings.resolve("boiler", Some(&annex));
        assert_eq!(moved.protection.min_on, TimeDelta::minutes(2));
        assert_eq!(moved.out_of_service, None);
        assert_eq!(
            settings.resolve("boiler", Some(&hq)).protection.min_off,
            TimeDelta::minutes(10)
        );
    }

    #[test]
    fn a_building_out_of_service_takes_its_sensors_unless_one_has_its_own_reason() {
        let hq = BuildingId::parse("hq").unwrap();
        let mut settings = HeaterSettings::default();
        settings.set(
            hq.clone(),
            None,
            Settings {
                out_of_service: Some(out("works", true)),
                ..Settings::default()
            },
        );
        settings.set(
            hq.clone(),
            Some(SensorId::parse("boiler").unwrap()),
            Settings {
                out_of_service: Some(out("valve", false)),
                ..Settings::default()
            },
        );
        let reason = |sensor| settings.resolve(sensor, Some(&hq)).out_of_service.unwrap();
        assert_eq!(reason("room").reason, "works");
        assert_eq!(reason("boiler").reason, "valve");
    }

    #[test]
    fn limits_are_from_zero_to_a_week() {
        let limits = |keep_alive| Limits {
            keep_alive,
            ..Limits::default()
        };
        assert!(limits(Some(MAX_LIMIT)).validate().is_ok());
        assert!(limits(Some(TimeDelta::zero())).validate().is_ok());
        let err = limits(Some(MAX_LIMIT + TimeDelta::seconds(1)))
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "keep_alive");
        assert!(limits(Some(TimeDelta::seconds(-1))).validate().is_err());
    }
}
