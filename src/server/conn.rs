//! Accepting gRPC connections with bounds: a cap on open connections, a
//! deadline for the HTTP/2 handshake, and an idle limit.
//!
//! Without these, 2,000 sockets that connect and never send a byte each hold
//! a task and a file descriptor forever, and enough of them starve the server
//! of descriptors: a misbehaving (or hostile) client becomes an outage. Here:
//! * every connection holds a permit of a semaphore of `max_connections`; past
//!   it, a new socket is closed at once (and counted);
//! * a connection must send the 24-byte HTTP/2 client preface within
//!   `handshake_timeout`, or it is closed before tonic ever sees it (the bytes
//!   read are replayed to tonic, so nothing is lost for a real client);
//! * a connection that receives nothing for `idle_timeout` is closed. HTTP/2
//!   keepalive pings (configured on the tonic server) are traffic too, so a
//!   live client that answers pings stays connected; a dead or frozen one goes.
//!
//! With `[server.tls]`, the TLS handshake is part of the same deadline (see
//! `tls.rs`), and a verified client certificate's names ride along with the
//! connection's addresses into every request's extensions.

use super::tls::ConnInfo;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connection bounds (from `[server]`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Counters the accept loop keeps, for metrics and tests.
#[derive(Default, Debug)]
pub struct Stats {
    pub rejected_full: std::sync::atomic::AtomicU64,
    pub handshake_failed: std::sync::atomic::AtomicU64,
    pub idle_closed: std::sync::atomic::AtomicU64,
}

/// Accepts connections from `listener` and yields those that completed the
/// handshake, as a stream for `tonic`'s `serve_with_incoming_shutdown`. Stops
/// accepting when `stop` resolves.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<Stats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Guarded>> {
    let (tx, rx) = mpsc::channel::<io::Result<Guarded>>(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (stream, _) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                stats
                    .rejected_full
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let stats = stats.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let deadline = limits.handshake_timeout;
                let done = tokio::time::timeout(deadline, handshake(stream, limits, permit, tls))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "handshake not finished in time",
                        ))
                    });
                match done {
                    Ok(g) => {
                        let _ = tx.send(Ok(g)).await;
                    }
                    Err(_) => {
                        stats
                            .handshake_failed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS handshake (if any), then the HTTP/2 preface; anything else
/// closes. The caller bounds the whole with `handshake_timeout`.
async fn handshake(
    stream: TcpStream,
    limits: Limits,
    permit: OwnedSemaphorePermit,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> io::Result<Guarded> {
    let tcp = stream.connect_info();
    let (mut io, peer) = match tls {
        None => (Io::Plain(stream), None),
        Some(acceptor) => {
            let t = acceptor.accept(stream).await?;
            let peer = super::tls::peer_identity(t.get_ref().1);
            (Io::Tls(Box::new(t)), peer)
        }
    };
    let mut preface = [0u8; 24];
    io.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 connection",
        ));
    }
    Ok(Guarded {
        info: ConnInfo { tcp, peer },
        io,
        replay: preface,
        replayed: 0,
        idle_timeout: limits.idle_timeout,
        last_read: Instant::now(),
        idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
        _permit: permit,
    })
}

/// A connection, in the clear or over TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An accepted connection: replays the preface it consumed, enforces the idle
/// limit, and frees its connection slot when dropped.
pub struct Guarded {
    io: Io,
    info: ConnInfo,
    replay: [u8; 24],
    replayed: usize,
    idle_timeout: Duration,
    /// Set on every read that returned data (cheap: one clock read).
    last_read: Instant,
    /// Fires at `last_read + idle_timeout` (re-armed lazily when it fires early).
    idle: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Guarded {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let n = (this.replay.len() - this.replayed).min(buf.remaining());
            buf.put_slice(&this.replay[this.replayed..this.replayed + n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last_read = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                // Nothing to read: is the connection idle past its limit?
                loop {
                    ready!(this.idle.as_mut().poll(cx));
                    let deadline = this.last_read + this.idle_timeout;
                    if Instant::now() >= deadline {
                        // End of stream: hyper closes the connection.
                        return Poll::Ready(Ok(()));
                    }
                    this.idle.as_mut().reset(deadline);
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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

use std::future::Future as _;
