//! Accepted connections, as the HTTP/2 server sees them.
//!
//! A TCP stream says it can write vectored, and HTTP/2 (the `h2` crate) then keeps every DATA
//! payload of 256 bytes or more as its own buffer, to hand to one `writev` with its frame
//! header; it accepts no further frame until that write is done. A watch event (a whole change
//! request, about 470 bytes for a small payload) therefore cost one system call per watcher:
//! 10,000 `writev`s of one frame each for an event delivered to 10,000 watchers. Told the
//! stream cannot write vectored, `h2` copies payloads under 1 KiB into its 16 KiB write buffer
//! and sends the frames of all the connection's streams that are ready in one write, about 34
//! events per system call. Larger payloads are written as before, in two writes instead of one
//! `writev`, which is noise beside the database work of a request that large.
//!
//! With `[tls]`, the TLS handshake runs here too (tokio-rustls, each in a task of its own so a
//! slow client holds up no other), and [`Coalescing`] sits above TLS: rustls writes a record to
//! the socket per write it is given, so the frames gather before they reach it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::transport::server::{Connected, TcpIncoming};

use crate::tls::{ConnectionInfo, PeerCertificates, ServerTls};

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The byte stream under HTTP/2: plain TCP, or TLS over it.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:expr, $stream:ident => $call:expr) => {
        match &mut $self.stream {
            Transport::Plain($stream) => {
                let $stream = Pin::new($stream);
                $call
            }
            Transport::Tls($stream) => {
                let $stream = Pin::new($stream.as_mut());
                $call
            }
        }
    };
}

/// A connection that reports no vectored writes, so HTTP/2 frames coalesce, and that lets
/// the other ready tasks run once before each burst of writes (module docs).
#[derive(Debug)]
pub(crate) struct Coalescing {
    stream: Transport,
    /// The client's verified certificate chain (TLS with a client certificate).
    peer: Option<PeerCertificates>,
    /// `limits.coalesce_writes`: false passes every write straight through.
    coalesce: bool,
    /// Whether this burst of writes has already stepped aside once; reset by each flush.
    yielded: bool,
}

impl AsyncRead for Coalescing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, stream => stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for Coalescing {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.coalesce && !self.yielded {
            // Step aside once: the connection's task goes to the back of the run queue, behind
            // the stream tasks woken with it, whose frames then go out in this same write.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        delegate!(self, stream => stream.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(delegate!(self, stream => stream.poll_flush(cx)))?;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, stream => stream.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Called only when not coalescing (`is_write_vectored` is false otherwise).
        delegate!(self, stream => stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        !self.coalesce
            && match &self.stream {
                Transport::Plain(stream) => stream.is_write_vectored(),
                Transport::Tls(stream) => stream.is_write_vectored(),
            }
    }
}

impl Connected for Coalescing {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let tcp = match &self.stream {
            Transport::Plain(stream) => stream,
            Transport::Tls(stream) => stream.get_ref().0,
        };
        ConnectionInfo {
            remote_addr: tcp.peer_addr().ok(),
            peer_certificates: self.peer.clone(),
        }
    }
}

/// Accepted connections with Nagle's algorithm off, each wrapped in [`Coalescing`]. tonic sets
/// TCP_NODELAY only on listeners it binds itself; without it a response written in several
/// pieces (headers, then data, then trailers) waits for the client's delayed ACK, about 40 ms
/// (measured with approvals-bench: get at 64 in flight went from ~1,500/s with p50 44 ms to the
/// figures in the README).
pub(crate) fn incoming(
    listener: tokio::net::TcpListener,
    coalesce: bool,
) -> impl Stream<Item = Result<Coalescing, io::Error>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(move |accepted| accepted.map(|stream| Coalescing::new(stream, coalesce)))
}

/// Accepted connections as [`incoming`], each through its TLS handshake (in a task of its own,
/// at most [`HANDSHAKE_TIMEOUT`]); a failed handshake is logged at debug and dropped. The
/// accepting task ends when the server drops the stream; the handle aborts it sooner.
pub(crate) fn incoming_tls(
    listener: tokio::net::TcpListener,
    coalesce: bool,
    tls: Arc<ServerTls>,
) -> (
    impl Stream<Item = Result<Coalescing, io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (ready, handshaken) = tokio::sync::mpsc::channel::<Result<Coalescing, io::Error>>(64);
    let accepting = tokio::spawn(async move {
        let mut accepted = std::pin::pin!(TcpIncoming::from(listener).with_nodelay(Some(true)));
        while let Some(next) = accepted.next().await {
            let stream = match next {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(%err, "accept failed");
                    continue;
                }
            };
            let acceptor = tls.acceptor().clone();
            let sender = ready.clone();
            tokio::spawn(async move {
                let remote = stream.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let peer = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .filter(|chain| !chain.is_empty())
                            .map(|chain| {
                                PeerCertificates(
                                    chain.iter().map(|c| c.clone().into_owned()).collect(),
                                )
                            });
                        let connection = Coalescing {
                            stream: Transport::Tls(Box::new(stream)),
                            peer,
                            coalesce,
                            yielded: false,
                        };
                        let _ = sender.send(Ok(connection)).await;
                    }
                    Ok(Err(err)) => tracing::debug!(?remote, %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(?remote, "TLS handshake timed out"),
                }
            });
            if ready.is_closed() {
                break;
            }
        }
    });
    (ReceiverStream::new(handshaken), accepting)
}

impl Coalescing {
    fn new(stream: TcpStream, coalesce: bool) -> Self {
        Self {
            stream: Transport::Plain(stream),
            peer: None,
            coalesce,
            yielded: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair(coalesce: bool) -> (Coalescing, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        (Coalescing::new(server, coalesce), client.expect("connect"))
    }

    /// Coalescing hides vectored writes from HTTP/2 (so it copies small frames into one
    /// buffer); turned off, the socket's own answer shows. Either way the bytes arrive whole.
    #[tokio::test]
    async fn coalescing_is_a_setting_and_writes_arrive_either_way() {
        for coalesce in [true, false] {
            let (mut server, mut client) = pair(coalesce).await;
            let Transport::Plain(tcp) = &server.stream else {
                panic!("plain TCP");
            };
            assert_eq!(
                server.is_write_vectored(),
                !coalesce && tcp.is_write_vectored(),
                "coalesce = {coalesce}"
            );
            server.write_all(b"frame one ").await.expect("write");
            let written = server
                .write_vectored(&[io::IoSlice::new(b"frame two")])
                .await
                .expect("write");
            assert_eq!(written, 9, "a short frame goes out whole");
            server.flush().await.expect("flush");
            server.shutdown().await.expect("shutdown");
            let mut received = String::new();
            client.read_to_string(&mut received).await.expect("read");
            assert_eq!(received, "frame one frame two", "coalesce = {coalesce}");
        }
    }
}
