//! Each connection's open calls, counted by a tower layer from the request's connection info, so
//! that the connection itself can tell when it has been idle too long.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use futures::task::AtomicWaker;
use tokio::time::Instant;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// A connection's count of open calls and when the last one ended.
#[derive(Clone)]
pub struct OpenCalls(Arc<Shared>);

struct Shared {
    /// Open calls, and since when there has been none: one lock, so that a reader never sees
    /// the count at zero with the time of an earlier idle spell.
    state: Mutex<(usize, Instant)>,
    /// The connection's reader, woken when the last call ends to start its idle clock.
    reader: AtomicWaker,
}

impl OpenCalls {
    /// None open, idle from now.
    pub fn new() -> Self {
        Self(Arc::new(Shared {
            state: Mutex::new((0, Instant::now())),
            reader: AtomicWaker::new(),
        }))
    }

    /// Since when no call has been open; `None` while one is.
    pub fn idle_since(&self, reader: &Waker) -> Option<Instant> {
        self.0.reader.register(reader);
        let (open, since) = *self.lock();
        (open == 0).then_some(since)
    }

    pub(super) fn start(&self) -> OpenCall {
        self.lock().0 += 1;
        OpenCall(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        // A count stays a count whatever panicked while holding it.
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One call, open until dropped with its response body (or its future, if it never answered).
pub(super) struct OpenCall(OpenCalls);

impl Drop for OpenCall {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 -= 1;
        if state.0 == 0 {
            state.1 = Instant::now();
            drop(state);
            self.0 .0.reader.wake();
        }
    }
}

/// What tonic puts into each request's extensions for a connection of ours: the wrapped
/// stream's own info (peer address, certificates) and the connection's open calls.
#[derive(Clone)]
pub struct ConnectionInfo<T> {
    pub io: T,
    pub(super) calls: OpenCalls,
}

/// A TLS connection's info, where the caller's certificates are.
pub type TlsConnectionInfo = ConnectionInfo<TlsConnectInfo<TcpConnectInfo>>;

impl TlsConnectionInfo {
    pub fn peer_certs(
        &self,
    ) -> Option<Arc<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>> {
        self.io.peer_certs()
    }
}

fn open_calls(extensions: &http::Extensions) -> Option<&OpenCalls> {
    let plain = extensions.get::<ConnectionInfo<TcpConnectInfo>>();
    plain.map(|info| &info.calls).or_else(|| {
        extensions
            .get::<TlsConnectionInfo>()
            .map(|info| &info.calls)
    })
}

/// Counts every call against its connection until its response body ends.
#[derive(Debug, Clone, Copy)]
pub struct OpenCallsLayer;

impl<S> Layer<S> for OpenCallsLayer {
    type Service = CountOpenCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountOpenCalls { inner }
    }
}

#[derive(Debug, Clone)]
pub struct CountOpenCalls<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for CountOpenCalls<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = open_calls(request.extensions()).map(OpenCalls::start);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| CountedBody { body, _call: call }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its call open.
    pub struct CountedBody<B> {
        #[pin]
        body: B,
        _call: Option<OpenCall>,
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_from_the_end_of_its_last_call() {
        let calls = OpenCalls::new();
        let waker = futures::task::noop_waker();
        let created = calls.idle_since(&waker).expect("idle when new");
        let first = calls.start();
        let second = calls.start();
        assert_eq!(calls.idle_since(&waker), None);
        drop(first);
        assert_eq!(calls.idle_since(&waker), None, "one call still open");
        std::thread::sleep(std::time::Duration::from_millis(5));
        drop(second);
        let since = calls.idle_since(&waker).expect("idle again");
        assert!(
            since > created,
            "the clock restarts when the last call ends"
        );
    }
}
