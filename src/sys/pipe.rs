//! Pipes and splice(2): the zero-copy TCP relay's plumbing.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{cvt, cvt_size};

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array we pass; on success we own both.
    unsafe {
        cvt(libc::pipe2(
            fds.as_mut_ptr(),
            libc::O_NONBLOCK | libc::O_CLOEXEC,
        ))?;
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Asks for a pipe of `bytes` capacity (F_SETPIPE_SZ) and returns the capacity it has, which
/// stays the old one when the kernel refuses (EPERM past the per-user pipe quota).
pub fn set_pipe_size(fd: BorrowedFd<'_>, bytes: usize) -> usize {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a borrowed pipe fd with integer arguments; no memory is passed.
    if let Ok(size) = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) }) {
        return size as usize;
    }
    // SAFETY: as above; F_GETPIPE_SZ takes no argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) }).map_or(1 << 16, |n| n as usize)
}

/// Moves up to `len` bytes from `from` to `to` without copying through user space.
/// One of the two must be a pipe. Returns 0 at end of stream.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are borrowed for the call; null offsets mean "use the file position",
    // which is what sockets and pipes require.
    cvt_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}
