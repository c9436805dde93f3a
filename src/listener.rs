//! Accepting connections on a port within bounds, for the gRPC, health and admin ports alike: a
//! cap on open connections, TCP keepalive, a pause after failed accepts, and deadlines for a
//! client that never sends the HTTP/2 preface, keeps a connection past its age, or keeps one
//! open without a call.

mod open_calls;

use open_calls::OpenCalls;
pub use open_calls::{ConnectionInfo, OpenCallsLayer, TlsConnectionInfo};

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpIncoming};

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, the first bytes of every HTTP/2 client.
const HTTP2_PREFACE_LEN: usize = 24;
/// Pauses after failed accepts: the first, and the longest after several in a row.
const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// The bounds of one port's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub tcp_keepalive: Duration,
    /// How long a connection may take to send the HTTP/2 preface; `None` for HTTP/1, where
    /// hyper's header timeout does the same.
    pub preface_timeout: Option<Duration>,
    /// The age at which a connection is cut, whatever it is doing.
    pub lifetime: Option<Duration>,
    /// How long a connection may stay without an open call (counted by [`OpenCallsLayer`]).
    pub idle_timeout: Option<Duration>,
}

/// A bound port whose connections are counted against its cap.
pub struct Listener {
    incoming: TcpIncoming,
    name: &'static str,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
}

impl Listener {
    /// Binds `addr`; `name` labels the port in logs and metrics.
    pub fn bind(
        addr: SocketAddr,
        name: &'static str,
        limits: ConnectionLimits,
    ) -> io::Result<Self> {
        // TCP_NODELAY, as tonic's own `serve(addr)` sets it: without it the kernel may hold a
        // response's last frames until the client acknowledges the first (Nagle).
        let incoming = TcpIncoming::bind(addr)?
            .with_nodelay(Some(true))
            .with_keepalive(Some(limits.tcp_keepalive))
            .with_keepalive_interval(Some(limits.tcp_keepalive));
        Ok(Self {
            incoming,
            name,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.incoming.local_addr()
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// The next connection, with its slot under the cap. A connection beyond the cap is
    /// accepted and closed at once rather than left in the kernel's backlog: the client learns
    /// now, and a flood of silent sockets cannot queue ahead of the next legitimate client.
    pub async fn accept(&mut self) -> (TcpStream, OwnedSemaphorePermit) {
        let mut failures = 0;
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    failures = 0;
                    match Arc::clone(&self.slots).try_acquire_owned() {
                        Ok(slot) => return (stream, slot),
                        Err(_) => {
                            metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED, "port" => self.name)
                                .increment(1);
                            tracing::debug!(port = self.name, peer = ?stream.peer_addr().ok(), "at the connection cap; closed");
                        }
                    }
                }
                Some(Err(e)) => {
                    // Out of descriptors (EMFILE) or a connection reset before its accept:
                    // neither is fatal, and the growing pause keeps the first from spinning.
                    failures += 1;
                    let one_client = matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    );
                    if failures == 1 && !one_client {
                        tracing::warn!(port = self.name, error = %e, "accept failed; pausing");
                    } else {
                        tracing::debug!(port = self.name, error = %e, "accept failed");
                    }
                    tokio::time::sleep(accept_pause(failures)).await;
                }
                // A listener's stream never ends.
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// The accepted connections, each wrapped with its slot and deadlines, for tonic.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Connection<TcpStream>>> + Send {
        futures::stream::unfold(self, |mut listener| async move {
            let (stream, slot) = listener.accept().await;
            let connection = Connection::new(stream, slot, &listener.limits);
            Some((Ok(connection), listener))
        })
    }
}

/// 5 ms after the first failure in a row, doubling up to 1 s, as Go's `net/http` does.
fn accept_pause(failures: u32) -> Duration {
    FIRST_ACCEPT_PAUSE
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(LONGEST_ACCEPT_PAUSE)
}

/// An accepted connection holding its slot until dropped, and failing its reads and writes once
/// a deadline passes, which makes hyper close it.
pub struct Connection<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
    /// Until the HTTP/2 preface has arrived: how many of its bytes are still due, and by when.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    end: Option<Pin<Box<Sleep>>>,
    calls: OpenCalls,
    /// How long it may stay without an open call, and the clock of the present idle spell.
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl<IO> Connection<IO> {
    /// Starts the connection's clocks now.
    pub fn new(io: IO, slot: OwnedSemaphorePermit, limits: &ConnectionLimits) -> Self {
        Self {
            io,
            _slot: slot,
            preface: limits
                .preface_timeout
                .map(|timeout| (HTTP2_PREFACE_LEN, Box::pin(tokio::time::sleep(timeout)))),
            end: limits
                .lifetime
                .map(|lifetime| Box::pin(tokio::time::sleep(lifetime))),
            calls: OpenCalls::new(),
            idle: limits
                .idle_timeout
                .map(|timeout| (timeout, Box::pin(tokio::time::sleep(timeout)))),
        }
    }

    /// Checked only when nothing is waiting to be read: a call whose first bytes have arrived
    /// is not yet counted, and must not be cut.
    fn past_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some((timeout, clock)) = &mut self.idle else {
            return Ok(());
        };
        // While a call is open the clock is not polled; the last call's end wakes this reader.
        let Some(since) = self.calls.idle_since(cx.waker()) else {
            return Ok(());
        };
        let due = since + *timeout;
        if clock.deadline() != due {
            clock.as_mut().reset(due);
        }
        if clock.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no call on the connection for its idle timeout",
            ));
        }
        Ok(())
    }

    fn past_end(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let ended = self
            .end
            .as_mut()
            .is_some_and(|end| end.as_mut().poll(cx).is_ready());
        if ended {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection reached its maximum age and grace",
            ));
        }
        Ok(())
    }

    fn past_preface(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let late = (self.preface.as_mut()).is_some_and(|(_, due)| due.as_mut().poll(cx).is_ready());
        if late {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface in time",
            ));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Connection<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.past_preface(cx)?;
        this.past_end(cx)?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if polled.is_pending() {
            this.past_idle(cx)?;
        }
        if let (Poll::Ready(Ok(())), Some((due, _))) = (&polled, &mut this.preface) {
            *due = due.saturating_sub(buf.filled().len() - before);
            if *due == 0 {
                this.preface = None;
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Connection<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.past_end(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.past_end(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The wrapped stream's connection info, with the connection's open calls for
/// [`OpenCallsLayer`] to count.
impl<IO: Connected> Connected for Connection<IO> {
    type ConnectInfo = ConnectionInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            io: self.io.connect_info(),
            calls: self.calls.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_pause_doubles_up_to_a_second() {
        let pauses: Vec<_> = (1..=10).map(|n| accept_pause(n).as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(accept_pause(u32::MAX), LONGEST_ACCEPT_PAUSE);
    }

    #[tokio::test]
    async fn a_connection_without_its_preface_in_time_fails_its_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = ConnectionLimits {
            max_connections: 1,
            tcp_keepalive: Duration::from_secs(60),
            preface_timeout: Some(Duration::from_millis(50)),
            lifetime: None,
            idle_timeout: None,
        };
        let slot = || {
            Arc::new(Semaphore::new(1))
                .try_acquire_owned()
                .expect("slot")
        };
        let mut buf = [0; 64];

        let (mut client, server) = tokio::io::duplex(64);
        let mut silent = Connection::new(server, slot(), &limits);
        client.write_all(&[0; HTTP2_PREFACE_LEN - 1]).await.unwrap();
        assert_eq!(silent.read(&mut buf).await.unwrap(), HTTP2_PREFACE_LEN - 1);
        let err = silent.read(&mut buf).await.expect_err("one byte short");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let (mut client, server) = tokio::io::duplex(64);
        let mut prompt = Connection::new(server, slot(), &limits);
        client.write_all(&[0; HTTP2_PREFACE_LEN]).await.unwrap();
        assert_eq!(prompt.read(&mut buf).await.unwrap(), HTTP2_PREFACE_LEN);
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"later").await.unwrap();
        assert_eq!(
            prompt.read(&mut buf).await.unwrap(),
            5,
            "the preface came in time"
        );
    }

    #[tokio::test]
    async fn a_connection_without_an_open_call_for_its_idle_timeout_fails_its_reads() {
        use tokio::io::AsyncReadExt;
        let idle = Duration::from_millis(100);
        let limits = ConnectionLimits {
            max_connections: 1,
            tcp_keepalive: Duration::from_secs(60),
            preface_timeout: None,
            lifetime: None,
            idle_timeout: Some(idle),
        };
        let slot = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("slot");
        let (_client, server) = tokio::io::duplex(64);
        let mut connection = Connection::new(server, slot, &limits);
        let mut buf = [0; 8];

        let call = connection.calls.start();
        let open = tokio::time::timeout(3 * idle, connection.read(&mut buf)).await;
        assert!(open.is_err(), "an open call keeps the connection: {open:?}");
        drop(call);
        let ended = std::time::Instant::now();
        let err = connection.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            ended.elapsed() >= idle,
            "cut after the idle timeout, not before"
        );
    }
}
