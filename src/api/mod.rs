//! The gRPC surface: service implementations, the error-to-status mapping, health and
//! reflection. Handlers decode and validate requests, call the store or the control loop, and
//! map errors with `?`.

pub mod convert;
mod effective;
mod equipment;
pub mod health;
mod heater;
pub mod limits;
pub mod metrics_layer;
mod page_token;
mod schedules;
mod setpoints;
mod status;

use tonic::Request;

use crate::domain::{Action, Identity};
use crate::error::{Error, Result};
pub use heater::{HeaterApi, LoopRules};
pub use limits::Limits;
pub use schedules::ScheduleApi;
pub use setpoints::SetpointApi;

/// The caller (authenticated by the interceptor in `security`), if its role allows `action`.
/// Buildings are checked per resource by the handler.
fn authorize<T>(request: &Request<T>, action: Action) -> Result<Identity> {
    let who = crate::security::identity(request)?;
    who.check(action).map_err(|denied| {
        metrics::counter!(crate::telemetry::AUTH_FAILURES, "code" => "permission_denied")
            .increment(1);
        Error::PermissionDenied(denied.to_string())
    })?;
    Ok(who)
}

/// The role check and the caller's read budget; the slot is held while the read runs.
fn reader<T>(request: &Request<T>, limits: &limits::Limits) -> Result<(Identity, limits::Slot)> {
    let who = authorize(request, Action::Read)?;
    let slot = limits.read(&who.subject)?;
    Ok((who, slot))
}

/// Server reflection, v1 and v1alpha (grpcurl 1.8.6 only speaks v1alpha), describing our
/// services and the health service.
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // The error details statuses carry (google.rpc.ErrorInfo, BadRequest, ...), so that
            // grpcurl and dynamic clients decode them.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
