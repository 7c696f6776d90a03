//! The relay between two connected TCP sockets: both directions at once, exact half-close.
//!
//! Each direction starts by copying through a buffer on the stack, which suits
//! request/response traffic: one read and one write per message, and a short read tells the
//! runtime the socket is drained, so no extra "would block" syscall follows. When a read fills
//! the buffer, the direction is streaming, and it switches to zero-copy splice(2) through a
//! pooled pipe (see `pipes`) until a splice moves less than a buffer's worth again.
//!
//! A direction ends at EOF: what is in flight is delivered, then the other socket is shut
//! down for writing so the peer sees FIN while the opposite direction keeps flowing. An error
//! in either direction ends both and is returned, so the caller can reset both sides.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::task::{ready, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::pipes::Lease;
use crate::sys;

/// The copy buffer, and the threshold for streaming: a read that fills it switches to
/// splice, a splice that moves less switches back.
const COPY_CHUNK: usize = 16 << 10;

/// The direction of a relay that ended first: whose reads ended (EOF, or an error in that
/// direction), after how many bytes, and the error if any. The PROXY protocol path uses it
/// to tell a backend that hung up on the header from a client that left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstEnd {
    /// b→a ended first (b closed or failed); false: a→b did.
    pub from_b: bool,
    /// Bytes that direction had moved.
    pub bytes: u64,
    /// Why it ended, when not at EOF.
    pub error: Option<String>,
    /// When.
    pub at: std::time::Instant,
}

/// Relays until both directions reach EOF; returns bytes (a→b, b→a). `counters` (a→b, b→a)
/// are bumped as bytes move, so live connections show up in statistics. With `splice` false,
/// bytes are only ever copied. `first_end` is set when the first direction ends.
pub async fn relay(
    a: &mut TcpStream,
    b: &mut TcpStream,
    splice: bool,
    counters: (&AtomicU64, &AtomicU64),
    first_end: &OnceLock<FirstEnd>,
) -> io::Result<(u64, u64)> {
    let (a_read, a_write) = a.split();
    let (b_read, b_write) = b.split();
    let end = |from_b: bool, (result, bytes): (io::Result<()>, u64)| {
        let error = result.as_ref().err().map(crate::mapping::describe);
        let _ = first_end.set(FirstEnd {
            from_b,
            bytes,
            error,
            at: std::time::Instant::now(),
        });
        result.map(|()| bytes)
    };
    tokio::try_join!(
        async { end(false, pump(a_read, b_write, splice, counters.0).await) },
        async { end(true, pump(b_read, a_write, splice, counters.1).await) },
    )
}

/// One direction: `from` → `to` until EOF, then shutdown(write) on `to`. Returns how it
/// ended and the bytes moved until then.
async fn pump(
    from: ReadHalf<'_>,
    to: WriteHalf<'_>,
    splice: bool,
    counter: &AtomicU64,
) -> (io::Result<()>, u64) {
    let mut total = 0u64;
    let result = pump_counting(from, to, splice, counter, &mut total).await;
    (result, total)
}

async fn pump_counting(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut splice: bool,
    counter: &AtomicU64,
    total: &mut u64,
) -> io::Result<()> {
    let mut streaming = false;
    loop {
        let n = if streaming {
            match splice_once(from.as_ref(), to.as_ref()).await {
                Ok(n) => {
                    streaming = n >= COPY_CHUNK;
                    n
                }
                // These fds cannot be spliced (nothing was moved): copy from now on.
                Err(SpliceError::Unsupported) => {
                    (splice, streaming) = (false, false);
                    continue;
                }
                // No pipe to be had (out of descriptors): copy this chunk; the next full read
                // tries splice again.
                Err(SpliceError::NoPipe) => {
                    streaming = false;
                    continue;
                }
                Err(SpliceError::Io(e)) => return Err(e),
            }
        } else {
            let n = copy_once(&mut from, &mut to).await?;
            streaming = splice && n == COPY_CHUNK;
            n
        };
        if n == 0 {
            break;
        }
        *total += n as u64;
        counter.fetch_add(n as u64, Relaxed);
    }
    match SockRef::from(to.as_ref()).shutdown(Shutdown::Write) {
        // The peer may be gone already; its own direction reports that.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// Reads once (waiting for data) into a stack buffer and writes it all; 0 means EOF. The
/// buffer lives only inside the poll, so a waiting connection holds no memory; bytes the
/// socket would not take at once move to the heap until written.
async fn copy_once(from: &mut ReadHalf<'_>, to: &mut WriteHalf<'_>) -> io::Result<usize> {
    let mut rest = Vec::new();
    let n = poll_fn(|cx| {
        let mut buf = [MaybeUninit::<u8>::uninit(); COPY_CHUNK];
        let mut buf = ReadBuf::uninit(&mut buf);
        ready!(Pin::new(&mut *from).poll_read(cx, &mut buf))?;
        let data = buf.filled();
        let mut sent = 0;
        while sent < data.len() {
            match Pin::new(&mut *to).poll_write(cx, &data[sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(m)) => sent += m,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        rest.extend_from_slice(&data[sent..]);
        Poll::Ready(Ok(data.len()))
    })
    .await?;
    if !rest.is_empty() {
        to.write_all(&rest).await?;
    }
    Ok(n)
}

enum SpliceError {
    /// splice(2) refused to read these fds (EINVAL); nothing was moved.
    Unsupported,
    /// No pipe could be made (EMFILE, ENFILE); nothing was moved.
    NoPipe,
    Io(io::Error),
}

impl From<io::Error> for SpliceError {
    fn from(e: io::Error) -> Self {
        SpliceError::Io(e)
    }
}

/// Splices one pipeful: waits for data, moves it into a pooled pipe and out to `to`; 0 means
/// EOF.
async fn splice_once(from: &TcpStream, to: &TcpStream) -> Result<usize, SpliceError> {
    loop {
        from.readable().await?;
        let Ok(mut pipe) = Lease::take() else {
            return Err(SpliceError::NoPipe);
        };
        // The pipe is empty, so "would block" means the socket has nothing to read; the lease
        // then goes straight back to the pool.
        let n = match from.try_io(Interest::READABLE, || {
            sys::pipe::splice(from.as_fd(), pipe.write_end(), pipe.capacity())
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(SpliceError::Unsupported)
            }
            Err(e) => return Err(e.into()),
        };
        pipe.pending = n;
        while pipe.pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                sys::pipe::splice(pipe.read_end(), to.as_fd(), pipe.pending)
            }) {
                Ok(m) => pipe.pending -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(n);
    }
}
