//! The process: its descriptor limit, its parent's death, its name, and children it gives away.

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

/// Starts `command` as an orphan and returns its pid: a short-lived child forks it and exits
/// at once, so the kernel hands it to the nearest subreaper or to init. Under systemd that is
/// the service manager (PID 1, or the user manager, a subreaper), which then counts the
/// process as its own child: named the main process (MAINPID=), it is stopped as one systemd
/// started is, with SIGTERM and a wait. A main process systemd did not fork, it cannot wait
/// for: it sends SIGTERM and, at once, SIGKILL (KillMode=mixed), cutting every connection the
/// process still relays.
pub fn spawn_orphan(command: &mut std::process::Command) -> io::Result<u32> {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two new descriptors into the array we pass; we own both from here.
    let (read, write) = unsafe {
        cvt(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    let tell = write.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec, which is single-threaded
    // and whose libc state the fork left consistent; it calls only fork(2), write(2) and
    // _exit(2), all async-signal-safe, and touches no memory but a stack array. The
    // grandchild goes on to exec (the pipe is close-on-exec), the child tells its pid and
    // exits without running anything of the parent's.
    unsafe {
        command.pre_exec(move || match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(()),
            pid => {
                let bytes = pid.to_ne_bytes();
                libc::write(tell, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0)
            }
        });
    }
    // Returns once the grandchild has exec'd (or failed to: then Err, the child reaped).
    let mut child = command.spawn()?;
    drop(write);
    // The child exits right after its fork: reap it.
    let _ = child.wait();
    let mut bytes = [0u8; 4];
    std::fs::File::from(read).read_exact(&mut bytes)?;
    Ok(libc::pid_t::from_ne_bytes(bytes) as u32)
}
