//! The only module with `unsafe`: thin wrappers over the Linux system calls that std, tokio,
//! socket2 and nix do not cover, one file per family — the process ([`process`]), bpf(2)
//! ([`bpf`]),
//! descriptors ([`fd`]), pipes and splice ([`pipe`]), UDP with packet info and batches
//! ([`udp`]), netlink socket options ([`netlink`]).
//!
//! Every wrapper returns `io::Result` and takes borrowed or owned descriptors, so callers stay
//! safe; every `unsafe` block says why it is sound in a `SAFETY:` comment.

pub mod bpf;
pub mod fd;
pub mod netlink;
pub mod pipe;
pub mod process;
pub mod udp;

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// setsockopt with an int value.
fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads an int from our stack for the length we pass.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}
