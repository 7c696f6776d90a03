//! The relay between two connected TCP sockets: both directions at once, exact half-close,
//! zero-copy splice(2) through one pipe per direction, and a copy fallback.
//!
//! A direction ends at EOF: what is buffered is flushed, then the other socket is shut down
//! for writing so the peer sees FIN while the opposite direction keeps flowing. An error in
//! either direction ends both and is returned, so the caller can reset both sides.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::sys;

/// Bytes moved per splice call; also the pipe's default capacity.
const CHUNK: usize = 1 << 16;

/// Relays until both directions reach EOF; returns bytes (a→b, b→a). `counters` (a→b, b→a)
/// are bumped as bytes move, so live connections show up in statistics.
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    splice: bool,
    counters: (&AtomicU64, &AtomicU64),
) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        pump(a, b, splice, counters.0),
        pump(b, a, splice, counters.1)
    )
}

/// One direction: `from` → `to` until EOF, then shutdown(write) on `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    splice: bool,
    counter: &AtomicU64,
) -> io::Result<u64> {
    let moved = if splice {
        match splice_pump(from, to, counter).await {
            Err(SpliceError::Unsupported(already)) => {
                already + copy_pump(from, to, counter).await?
            }
            Err(SpliceError::Io(e)) => return Err(e),
            Ok(n) => n,
        }
    } else {
        copy_pump(from, to, counter).await?
    };
    match SockRef::from(to).shutdown(Shutdown::Write) {
        // The peer may be gone already; its own direction reports that.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(moved),
    }
}

enum SpliceError {
    /// splice(2) refused these fds (EINVAL); carries bytes moved before, all delivered.
    Unsupported(u64),
    Io(io::Error),
}

impl From<io::Error> for SpliceError {
    fn from(e: io::Error) -> Self {
        SpliceError::Io(e)
    }
}

async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
) -> Result<u64, SpliceError> {
    // Created on first data, so idle connections hold no pipe.
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let (rd, wr) = match &pipe {
            Some(p) => p,
            None => pipe.insert(sys::pipe()?),
        };
        // The pipe is always empty here, so EAGAIN means the socket has nothing to read.
        let n = match from.try_io(Interest::READABLE, || {
            sys::splice(from.as_fd(), wr.as_fd(), CHUNK)
        }) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && total == 0 => {
                return Err(SpliceError::Unsupported(total))
            }
            Err(e) => return Err(e.into()),
        };
        let mut pending = n;
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                sys::splice(rd.as_fd(), to.as_fd(), pending)
            }) {
                Ok(m) => pending -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        total += n as u64;
        counter.fetch_add(n as u64, Relaxed);
    }
}

async fn copy_pump(from: &TcpStream, to: &TcpStream, counter: &AtomicU64) -> io::Result<u64> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        from.readable().await?;
        if buf.is_empty() {
            buf = vec![0; CHUNK];
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        counter.fetch_add(n as u64, Relaxed);
    }
}
