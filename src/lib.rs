//! thermostat: a gRPC control plane that joins temperature setpoints (PostgreSQL) with sensor
//! readings and decides heater commands.
//!
//! Layout: `domain` (validated values and rules, no I/O), `store` (SQL), `stream` (Kafka), `api`
//! (gRPC), `security` (TLS and who is calling), `listener` (accepting connections within
//! bounds), `config`, `telemetry`, and `startup` which wires them into an [`Application`].

pub mod admin_port;
pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod listener;
pub mod proto;
pub mod security;
pub mod startup;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod traces;

pub use error::Error;
pub use startup::{Application, StartupError};
