//! The domain: validated identifiers and setpoints. Pure values and rules, no I/O.
//!
//! Everything that enters from the network is converted into these types once, at the edge
//! (`api`, `stream`), so the rest of the service never sees an unchecked id or a NaN.

pub mod access;
pub mod control;
pub mod equipment;
pub mod feedback;
mod ids;
pub mod levels;
pub mod protection;
pub mod schedule;
mod setpoint;

pub use access::{Action, CredentialKind, Identity, Role, Scope, Subject};
pub use ids::{BuildingId, SensorId};
pub use setpoint::{Celsius, Reason, Setpoint, StoredSetpoint, DELTA_RANGE, DESIRED_RANGE};

/// A value that failed validation: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, reported for a field nested in `parent` (e.g. `setpoint.sensor_id`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}
