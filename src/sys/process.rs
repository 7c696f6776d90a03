//! The process: its descriptor limit, its parent's death, and its name.

use std::io;
use std::mem::zeroed;

use super::cvt;

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns (old soft, new soft).
/// dockerd's children inherit dockerd's original soft limit (often 1024); Go raises its own,
/// so a drop-in must too.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass, which lives on our stack.
    unsafe {
        let mut lim: libc::rlimit = zeroed();
        cvt(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
        let old = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            cvt(libc::setrlimit(libc::RLIMIT_NOFILE, &lim))?;
        }
        Ok((old as u64, lim.rlim_cur as u64))
    }
}

/// The soft RLIMIT_NOFILE: how many descriptors this process may have open.
pub fn nofile_limit() -> io::Result<u64> {
    // SAFETY: getrlimit only writes the struct we pass, which lives on our stack.
    unsafe {
        let mut lim: libc::rlimit = zeroed();
        cvt(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
        Ok(lim.rlim_cur as u64)
    }
}

/// Asks the kernel to send `signal` to us when our parent dies.
pub fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number by value; no pointers are involved.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

/// Sets this thread's name as `ps` and `/proc/PID/comm` show it (the kernel keeps 15 bytes).
/// A process that re-executes itself through /proc/self/exe would otherwise be called "exe".
pub fn set_name(name: &str) -> io::Result<()> {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the buffer
    // we own (the last byte stays 0).
    cvt(unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}
