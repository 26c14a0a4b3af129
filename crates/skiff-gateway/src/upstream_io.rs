//! The connection to an instance, with delayed ACKs turned off.
//!
//! Many small servers (Python's `http.server`, for one) write a response's
//! headers and body in two writes without `TCP_NODELAY`. On a reused
//! connection the second write then waits, by Nagle's algorithm, for the ACK
//! of the first, which our side delays by up to 40 ms hoping to piggy-back
//! it. Re-arming `TCP_QUICKACK` after every read keeps our ACKs immediate
//! (the flag is not sticky), so pooled connections are as fast as fresh
//! ones. It costs one `setsockopt` per read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub(crate) struct UpstreamIo {
    io: TokioIo<TcpStream>,
}

impl UpstreamIo {
    pub(crate) fn new(stream: TcpStream) -> Self {
        let io = Self {
            io: TokioIo::new(stream),
        };
        io.quickack();
        io
    }

    fn quickack(&self) {
        let _ = socket2::SockRef::from(self.io.inner()).set_tcp_quickack(true);
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_ready() {
            self.quickack();
        }
        r
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}
