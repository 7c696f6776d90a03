//! The docker-mode shim: when an rproxy daemon runs, a process that dockerd spawns hands its
//! mapping (and listening socket) to the daemon and then only waits, as a minimal process —
//! one thread, no runtime — for dockerd's SIGINT/SIGTERM.
//!
//! Recovery: the registration lives as long as the shim's control connection. If the daemon
//! dies or restarts, the connection closes and the shim takes the mapping back, serving it
//! itself from the copy of the listening socket it kept (the port never closes; queued
//! connections are not lost). It stays self-serving until dockerd stops it.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use socket2::Socket;

use crate::control::{self, Reply, Request};
use crate::mapping::{describe, Mapping};
use crate::options::Overrides;
use crate::proxy_protocol::Version;

/// What became of the offer to the daemon.
pub enum Handoff {
    /// The daemon serves the mapping for as long as this connection stays open, with this
    /// PROXY protocol header (its rules' choice for the port), which this process keeps if
    /// it takes the port back.
    Registered(UnixStream, Version),
    /// No daemon (or hand-off disabled): serve the mapping in this process.
    NoDaemon,
}

/// Offers the mapping to the daemon at `socket_path` (default when None), with the options
/// this process's environment set (the daemon's defaults fill in the rest). `Err` is the
/// daemon's refusal, for fd 3.
pub fn register(
    mapping: &Mapping,
    socket: &Socket,
    socket_path: Option<std::path::PathBuf>,
    options: Overrides,
) -> Result<Handoff, String> {
    let path = control::socket_path(socket_path);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound && e.kind() != io::ErrorKind::ConnectionRefused {
                tracing::warn!(
                    "daemon at {} unreachable ({}); serving {mapping} here",
                    path.display(),
                    describe(&e)
                );
            }
            return Ok(Handoff::NoDaemon);
        }
    };
    let exchange = || -> io::Result<Reply> {
        // dockerd waits 16 s for fd 3: leave time to serve the port here instead.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let request = Request::Register {
            spec: mapping.spec(),
            options,
        };
        control::send_request(&stream, &request, Some(socket.as_fd()))?;
        let reply = control::read_reply(&stream)?;
        stream.set_read_timeout(None)?;
        Ok(reply)
    };
    match exchange() {
        Ok(Reply::Done { proxy_protocol, .. }) => {
            tracing::info!("{mapping} handed to the daemon at {}", path.display());
            Ok(Handoff::Registered(stream, proxy_protocol))
        }
        Ok(Reply::Error { message }) => Err(message),
        Ok(other) => {
            tracing::warn!("daemon answered {other:?}; serving {mapping} here");
            Ok(Handoff::NoDaemon)
        }
        Err(e) => {
            tracing::warn!(
                "daemon did not answer ({}); serving {mapping} here",
                describe(&e)
            );
            Ok(Handoff::NoDaemon)
        }
    }
}

/// Why a registered shim stopped waiting.
pub enum WaitEnd {
    /// SIGINT or SIGTERM: exit 0 (closing the connection deregisters the mapping).
    Stopped(&'static str),
    /// The daemon closed the connection: take the mapping back.
    DaemonGone,
}

/// Waits, with signals already blocked, for a stop signal or the daemon's end.
pub fn wait(stream: &UnixStream) -> io::Result<WaitEnd> {
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGINT);
    stop.add(nix::sys::signal::Signal::SIGTERM);
    let sfd = SignalFd::with_flags(&stop, SfdFlags::SFD_CLOEXEC)?;
    loop {
        let mut fds = [
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        if fds[0].any().unwrap_or(false) {
            if let Some(info) = sfd.read_signal()? {
                let name = if info.ssi_signo == libc::SIGINT as u32 {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                return Ok(WaitEnd::Stopped(name));
            }
        }
        if fds[1].any().unwrap_or(false) {
            // The daemon never writes after "ok": readable means EOF or an error.
            return Ok(WaitEnd::DaemonGone);
        }
    }
}
