//! A tower layer counting gRPC calls and timing them, by method and status code.
//!
//! The status is read from the response headers: tonic sends errors of unary calls as
//! "trailers-only" responses with `grpc-status` in the headers; a response without it started
//! successfully (an error later in a stream is not seen here).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

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

/// The method label: only our own and the standard services' paths, so that a client calling
/// made-up methods cannot grow the metric without bound.
fn method_label(path: &str) -> String {
    let known = ["/thermostat.v1.", "/grpc.health.v1.", "/grpc.reflection."];
    if path.len() <= 128 && known.iter().any(|prefix| path.starts_with(prefix)) {
        path.to_owned()
    } else {
        "other".to_owned()
    }
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
            metrics::counter!(RPCS, "method" => method.clone(), "code" => code).increment(1);
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
    fn unknown_paths_share_one_label() {
        assert_eq!(
            method_label("/thermostat.v1.SetpointService/GetSetpoint"),
            "/thermostat.v1.SetpointService/GetSetpoint"
        );
        assert_eq!(method_label("/evil.Service/x"), "other");
        assert_eq!(
            method_label(&format!("/thermostat.v1.{}", "x".repeat(200))),
            "other"
        );
    }
}
