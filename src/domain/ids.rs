use std::fmt;
use std::sync::Arc;

use super::ValidationError;

/// Longest identifier accepted, in characters (= bytes, since only ASCII is allowed).
const MAX_ID_LEN: usize = 128;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')
}

fn check_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_ID_LEN} characters"),
        ));
    }
    if let Some(bad) = value.chars().find(|c| !is_id_char(*c)) {
        return Err(ValidationError::new(
            field,
            format!("contains {bad:?}; only A-Za-z0-9 and . _ : / - are allowed"),
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($repr:ty), $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name($repr);

        impl $name {
            /// Checks the id rules (1 to 128 characters of `A-Za-z0-9._:/-`); an error names
            /// the field the id is normally carried in.
            pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                check_id($field, &value)?;
                Ok(Self(value.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Hashed and compared as the string itself (the derives only forward to it), so sets
        /// and maps of ids can be looked up by `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// Identifies one temperature sensor (and the heater it controls).
    SensorId(String),
    "sensor_id"
);
impl SensorId {
    /// The building the id is named under: what comes before its first `/`, if anything does.
    pub fn named_under(&self) -> Option<&str> {
        self.0.split_once('/').map(|(building, _)| building)
    }
}

id_type!(
    /// Identifies a building: the unit of ownership for access control. Shared (`Arc`): the
    /// engine hands the same building to every decision of its sensors, and a clone is then a
    /// reference count, not a copy of the string.
    BuildingId(Arc<str>),
    "building_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let all = "azAZ09._:/-";
        assert_eq!(SensorId::parse(all).unwrap().as_str(), all);
        assert!(BuildingId::parse("hq/floor-1:room_2.a").is_ok());
    }

    #[test]
    fn rejects_bad_ids_naming_the_field() {
        for bad in ["", "a b", "é", "x\n", "a*b", "%", "a\0"] {
            let err = SensorId::parse(bad).unwrap_err();
            assert_eq!(err.field, "sensor_id", "{bad:?}");
        }
        assert_eq!(BuildingId::parse("").unwrap_err().field, "building_id");
    }

    #[test]
    fn a_sensor_is_named_under_what_precedes_its_first_slash() {
        for (id, under) in [
            ("south/room-7", Some("south")),
            ("north/annex/r1", Some("north")),
            ("room-7", None),
            ("/x", Some("")),
        ] {
            assert_eq!(SensorId::parse(id).unwrap().named_under(), under, "{id}");
        }
    }

    #[test]
    fn length_limit_is_128() {
        assert!(SensorId::parse("a".repeat(128)).is_ok());
        assert!(SensorId::parse("a".repeat(129)).is_err());
    }
}
