//! The admin HTTP port: `/metrics` (Prometheus text) and `/livez`. Plain HTTP/1.1 with hyper;
//! it exposes nothing that changes state.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::listener::{Connection, Listener};
use crate::telemetry;

async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            telemetry::render_metrics(),
        ),
        (&Method::GET, "/livez") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}

/// Serves until `shutdown`. A client gets `header_timeout` for each request's headers, and for
/// the wait between kept-alive requests (hyper starts the clock when it starts reading).
pub async fn serve(mut listener: Listener, header_timeout: Duration, shutdown: CancellationToken) {
    loop {
        let (stream, slot) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = Connection::new(stream, slot, &listener.limits());
        tokio::spawn(async move {
            let mut http = http1::Builder::new();
            // hyper enforces the header timeout only with a timer.
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = http.serve_connection(TokioIo::new(stream), service_fn(handle));
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    }
}
