//! Descriptors: what an inherited number is, its flags, and taking ownership — of inherited
//! numbers once, of received ones (SCM_RIGHTS) as they arrive.

use std::io::{self, IoSliceMut};
use std::mem::zeroed;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use super::cvt;

/// What an inherited descriptor number refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// Not open.
    Closed,
    /// A pipe (dockerd's status pipe).
    Fifo,
    /// A socket.
    Socket,
    /// A regular file.
    File,
    /// A character device (a terminal, /dev/null).
    CharDevice,
    /// Anything else.
    Other,
}

/// Tells what `fd` is without taking ownership of it.
pub fn fd_kind(fd: RawFd) -> FdKind {
    // SAFETY: fstat writes into a zeroed stat buffer we own; an fd that is not open yields EBADF.
    unsafe {
        let mut st: libc::stat = zeroed();
        if libc::fstat(fd, &mut st) < 0 {
            return FdKind::Closed;
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO => FdKind::Fifo,
            libc::S_IFSOCK => FdKind::Socket,
            libc::S_IFREG => FdKind::File,
            libc::S_IFCHR => FdKind::CharDevice,
            _ => FdKind::Other,
        }
    }
}

/// Marks an inherited descriptor close-on-exec (no-op when it is not open).
pub fn set_cloexec(fd: RawFd) {
    // SAFETY: F_GETFD/F_SETFD on an arbitrary fd number only touch the descriptor flags;
    // on a closed fd they fail with EBADF, which we ignore.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Puts a descriptor into non-blocking mode.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we borrow; only the status flags change.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// Lets `fd` survive an exec (clears close-on-exec): a shim handing its port back to a
/// daemon starts over as a fresh process that keeps its listening socket and connection.
pub fn clear_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we borrow; only its descriptor flags change.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFD))?;
        cvt(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
    }
    Ok(())
}

/// Inherited numbers already taken, one bit per number below 64.
static TAKEN: AtomicU64 = AtomicU64::new(0);

/// Numbers from 64 on already taken by [`take_passed`].
static TAKEN_HIGH: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());

/// Takes ownership of socket `fd` that this program passed to itself across an exec (its
/// number named in the environment), once; None when it is not an open socket or was taken.
/// As for [`take_inherited`], call it before this process opens anything.
pub fn take_passed(fd: RawFd) -> Option<OwnedFd> {
    if fd_kind(fd) != FdKind::Socket {
        return None;
    }
    if fd < 64 {
        return take_inherited(fd);
    }
    let mut taken = TAKEN_HIGH.lock().unwrap_or_else(|e| e.into_inner());
    if taken.contains(&fd) {
        return None;
    }
    taken.push(fd);
    // SAFETY: the number is an open socket (checked) that the program before the exec left
    // open for us and named; it is taken only once (the list above), so this OwnedFd is its
    // only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of descriptor `fd` inherited from the parent (dockerd passes the status
/// pipe as 3 and the listening socket as 4), if it is open.
///
/// Each number is taken at most once per process — a second call returns None — so two
/// owners never close the same descriptor; stdio (0-2) and numbers from 64 on are never
/// taken. Call it before this process opens anything (`main` does, first thing), so that a
/// number the parent left closed is not yet one this process opened for itself.
pub fn take_inherited(fd: RawFd) -> Option<OwnedFd> {
    let bit = match fd {
        3..=63 => 1u64 << fd,
        _ => return None,
    };
    if TAKEN.fetch_or(bit, Ordering::SeqCst) & bit != 0 || fd_kind(fd) == FdKind::Closed {
        return None;
    }
    // SAFETY: the number is open (checked), was inherited (taken before anything else in the
    // process opens descriptors, as documented) and is taken only once (the bit above), so
    // this OwnedFd is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The most descriptors one SCM_RIGHTS message may carry (the kernel's SCM_MAX_FD).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Reads what is available on a unix stream socket into `buf`, with any descriptors sent
/// along (SCM_RIGHTS, at most 4 per call: the control socket's requests carry one; more
/// are closed by the kernel; received close-on-exec). Non-blocking: WouldBlock when nothing
/// is there. Returns (bytes read, descriptors); 0 bytes is EOF.
pub fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_fds::<4>(fd, buf)
}

/// As [`recv_with_fds`], with room for a whole message of [`MAX_FDS_PER_MESSAGE`]
/// descriptors: a daemon handing its sockets over sends them in such batches.
pub fn recv_with_many_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_fds::<MAX_FDS_PER_MESSAGE>(fd, buf)
}

fn recv_fds<const N: usize>(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; N]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for r in raw {
                // SAFETY: the kernel just installed this descriptor for this message; nothing
                // else in the process knows its number, so the OwnedFd is its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok((msg.bytes, fds))
}
