//! A tower layer counting gRPC calls and timing them, by method and status code.
//!
//! The status is read from the response headers: tonic sends errors of unary calls as
//! "trailers-only" responses with `grpc-status` in the headers; a response without it started
//! successfully (an error later in a stream is not seen here).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message as _;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::telemetry::{RPCS, RPC_LATENCY};

#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

/// Every method this server serves, as its request path: ours, health, and reflection v1 and
/// v1alpha, from their descriptor sets.
static KNOWN_METHODS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    // Compiled in: they decode (the reflection service is built from the same bytes).
    .filter_map(|set| prost_types::FileDescriptorSet::decode(set).ok())
    .flat_map(|set| set.file)
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let prefix = format!("/{package}.{}/", service.name());
            service
                .method
                .into_iter()
                .map(move |method| format!("{prefix}{}", method.name()))
        })
    })
    .collect()
});

/// The method label: a method this server serves, or `other`. The layer runs before routing
/// and authentication, so anyone may call made-up paths; labelled by path (even only those
/// under our packages' prefixes, as before), each made a new series and `/metrics` grew without
/// bound.
pub fn method_label(path: &str) -> &'static str {
    KNOWN_METHODS.get(path).map_or("other", String::as_str)
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            let code = format!("{code:?}");
            metrics::counter!(RPCS, "method" => method, "code" => code).increment(1);
            metrics::histogram!(RPC_LATENCY, "method" => method)
                .record(started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_are_labelled_and_every_other_path_is_other() {
        for served in [
            "/thermostat.v1.SetpointService/GetSetpoint",
            "/thermostat.v1.SetpointService/PutSetpoint",
            "/thermostat.v1.HeaterControlService/SubscribeHeaterCommands",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(method_label(served), served);
        }
        for made_up in [
            "/evil.Service/x",
            "/thermostat.v1.SetpointService/Nope",
            "/thermostat.v1.Random/x",
            "/grpc.reflection.anything/x",
            "/grpc.health.v1.Health/Check/",
        ] {
            assert_eq!(method_label(made_up), "other", "{made_up}");
        }
    }
}
