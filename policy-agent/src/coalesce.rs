//! Write coalescing for the gRPC connections Envoy opens (docs/agent.md, "Throughput").
//!
//! hyper answers every HTTP/2 stream in a task of its own, and each answer wakes the
//! connection's task, which then encodes and flushes it. Tokio runs a task woken from
//! another one next (its LIFO slot), so with many decisions in flight each answer was
//! flushed alone: one `writev` per decision, and on loopback each write also runs the
//! receiving side's network stack and wakes Envoy's thread. [`Coalescing`] holds what the
//! connection writes and, at the first flush of a round, yields once instead: the tasks of
//! the other decisions already answered run first and add their frames, and the next flush
//! writes them all in one call. Nothing waits for a timer: with one decision in flight, the
//! yield costs one more poll of the connection and the answer leaves at once.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Past this many bytes held, writes go through at once.
const HOLD: usize = 64 * 1024;

/// A connection whose writes are held until a flush, and whose first flush of a round is
/// put off by one yield.
#[derive(Debug)]
pub struct Coalescing<T> {
    io: T,
    held: Vec<u8>,
    /// How much of `held` the socket took already (a partial write).
    sent: usize,
    /// The flush was put off once; the next one writes.
    yielded: bool,
}

impl<T> Coalescing<T> {
    pub fn new(io: T) -> Self {
        Coalescing { io, held: Vec::with_capacity(4096), sent: 0, yielded: false }
    }
}

impl<T: AsyncWrite + Unpin> Coalescing<T> {
    /// Writes what is held, until the socket has taken it all.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalescing<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalescing<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.held.len() >= HOLD {
            ready!(self.poll_drain(cx))?;
        }
        self.held.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.held.len() >= HOLD {
            ready!(self.poll_drain(cx))?;
        }
        let mut n = 0;
        for slice in data {
            self.held.extend_from_slice(slice);
            n += slice.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.held.is_empty() {
            return Pin::new(&mut self.io).poll_flush(cx);
        }
        if !self.yielded {
            // A task that wakes itself is run again after the tasks already queued (not
            // from the LIFO slot): the other answers of this round get written with ours.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        self.yielded = false;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Coalescing<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn writes_are_held_until_the_second_flush_of_a_round() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut writer = Coalescing::new(client);
        writer.write_all(b"one ").await.unwrap();
        writer.write_all(b"two").await.unwrap();
        // `flush` polls again after the yield: both parts leave in one write.
        writer.flush().await.unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two");
        // Past the hold limit a write goes through by itself.
        let big = vec![7u8; HOLD + 10];
        writer.write_all(&big).await.unwrap();
        writer.write_all(b"!").await.unwrap();
        let mut got = vec![0u8; HOLD + 10];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        writer.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"!", "shutdown writes what is held");
    }
}
