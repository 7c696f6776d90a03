//! The docker-mode shim: when an rproxy daemon runs, a process that dockerd spawns hands its
//! mapping (and listening socket) to the daemon and then only waits, as a minimal process —
//! one thread, no runtime — for dockerd's SIGINT/SIGTERM.
//!
//! Recovery: the registration lives as long as the shim's control connection. A daemon that
//! hands over to a new one (a takeover) passes the connection along, and the shim notices
//! nothing. If the daemon stops or dies, the connection closes and the shim takes the
//! mapping back, serving it itself from the copy of the listening socket it kept (the port
//! never closes; queued connections are not lost), and looks for a daemon every second
//! ([`watch_daemon`]). When one answers, the shim registers again, lets its own connections
//! finish, and starts over as a waiting shim ([`restart`]: the same program, executed
//! anew, keeping the socket and the connection), so its memory is a fresh shim's again.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use socket2::Socket;

use crate::control::{self, Reply, Request};
use crate::mapping::{describe, Mapping};
use crate::proxy_protocol::Version;
use crate::settings::options::Overrides;
use crate::signals;
use crate::sys::fd::{clear_cloexec, set_cloexec, take_passed};

/// How often a shim serving its port itself looks for a daemon to hand it back to.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// How long a shim that handed its port back lets its own connections finish (the daemon's
/// default drain).
pub const HANDBACK_DRAIN: Duration = Duration::from_secs(10);

/// How long a registration is tried again while a daemon hands over to a new one.
const MOVED_PATIENCE: Duration = Duration::from_secs(4);

/// Names, across a shim's [`restart`], its listening socket, its connection and the PROXY
/// protocol header the daemon gave its port: `<socket fd>,<connection fd>,<off|v1|v2>`.
pub const RESUME_VAR: &str = "RPROXY_SHIM_RESUME";

/// What became of the offer to the daemon.
pub enum Handoff {
    /// The daemon serves the mapping for as long as this connection stays open, with this
    /// PROXY protocol header (its rules' choice for the port), which this process keeps if
    /// it takes the port back.
    Registered(UnixStream, Version),
    /// No daemon (or hand-off disabled): serve the mapping in this process.
    NoDaemon,
}

/// What a shim needs to offer its port to a daemon again.
#[derive(Debug, Clone)]
pub struct HandBack {
    /// The daemon's control socket (None: the default).
    pub socket_path: Option<PathBuf>,
    /// The options this process's environment set.
    pub options: Overrides,
}

/// Offers the mapping to the daemon at `socket_path` (default when None), with the options
/// this process's environment set (the daemon's defaults fill in the rest). `Err` is the
/// daemon's refusal, for fd 3. A daemon handing over to a new one answers `moved`: the offer
/// is made again (to the new one) for a few seconds.
pub fn register(
    mapping: &Mapping,
    socket: &Socket,
    socket_path: Option<PathBuf>,
    options: Overrides,
) -> Result<Handoff, String> {
    let path = control::socket_path(socket_path);
    let started = Instant::now();
    loop {
        match offer(mapping, socket, &path, options.clone()) {
            Offer::Moved(pid) if started.elapsed() < MOVED_PATIENCE => {
                tracing::debug!("the daemon is handing over to pid {pid}; offering again");
                std::thread::sleep(Duration::from_millis(50));
            }
            Offer::Moved(pid) => {
                tracing::warn!(
                    "the daemon was still handing over to pid {pid}; serving {mapping} here"
                );
                return Ok(Handoff::NoDaemon);
            }
            Offer::Done(handoff) => return handoff,
        }
    }
}

enum Offer {
    Done(Result<Handoff, String>),
    Moved(u32),
}

fn offer(mapping: &Mapping, socket: &Socket, path: &std::path::Path, options: Overrides) -> Offer {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound && e.kind() != io::ErrorKind::ConnectionRefused {
                tracing::warn!(
                    "daemon at {} unreachable ({}); serving {mapping} here",
                    path.display(),
                    describe(&e)
                );
            }
            return Offer::Done(Ok(Handoff::NoDaemon));
        }
    };
    if let Err(why) = control::check_server(&stream) {
        untrusted(path, &why, mapping);
        return Offer::Done(Ok(Handoff::NoDaemon));
    }
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
    Offer::Done(match exchange() {
        Ok(Reply::Done { proxy_protocol, .. }) => {
            tracing::info!("{mapping} handed to the daemon at {}", path.display());
            Ok(Handoff::Registered(stream, proxy_protocol))
        }
        Ok(Reply::Moved { pid }) => return Offer::Moved(pid),
        Ok(Reply::Error { message }) => Err(message.to_string()),
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
    })
}

/// Says (once per process at warning level: a shim serving its port looks for a daemon
/// every second) that the control socket's server is not one to hand the port to.
fn untrusted(path: &std::path::Path, why: &control::UntrustedServer, mapping: &Mapping) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let first = !SAID.swap(true, std::sync::atomic::Ordering::Relaxed);
    let path = path.display();
    match first {
        true => tracing::warn!("not handing {mapping} to {path}: {why}; serving it here"),
        false => tracing::debug!("not handing {mapping} to {path}: {why}; serving it here"),
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

/// Looks for a daemon every [`WATCH_INTERVAL`] while this process serves `mapping` itself,
/// and offers it the port; returns the connection of the registration it accepted and the
/// PROXY protocol header the daemon gives the port (kept should it go away again). A
/// daemon that refuses is asked again less and less often (up to once a minute).
pub async fn watch_daemon(
    mapping: &Mapping,
    socket: &Socket,
    back: &HandBack,
) -> (UnixStream, Version) {
    let path = control::socket_path(back.socket_path.clone());
    let mut pause = WATCH_INTERVAL;
    let mut refusals = 0u32;
    loop {
        tokio::time::sleep(pause).await;
        // Cheap first: does anything accept there? (No daemon: the path is gone, or refuses.)
        if tokio::net::UnixStream::connect(&path).await.is_err() {
            continue;
        }
        let Ok(copy) = socket.try_clone() else {
            continue;
        };
        let (p, options, offer) = (path.clone(), back.options.clone(), mapping.clone());
        let offered =
            tokio::task::spawn_blocking(move || register(&offer, &copy, Some(p), options)).await;
        match offered {
            Ok(Ok(Handoff::Registered(conn, proxy_protocol))) => return (conn, proxy_protocol),
            Ok(Err(refusal)) => {
                if refusals == 0 {
                    tracing::warn!(
                        "the daemon at {} refused {mapping} ({refusal}); serving it here, and \
                         asking again later",
                        path.display()
                    );
                }
                refusals += 1;
                pause = (pause * 2).min(Duration::from_secs(60));
            }
            _ => {}
        }
    }
}

/// Resolves when the daemon closes `conn` (it went away).
pub async fn closed(conn: &UnixStream) {
    let stream = conn.try_clone().and_then(|c| {
        c.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(c)
    });
    let Ok(stream) = stream else {
        return std::future::pending().await;
    };
    // The daemon never writes: readable means EOF or an error.
    let _ = stream.readable().await;
}

/// Starts this program over as a waiting shim that keeps `socket` and `conn` (it registered
/// them with a daemon): a fresh process image, so nothing the serving left behind (its
/// runtime, buffers, pipes) stays. The process, its parent (dockerd) and its pid stay; stop
/// signals that arrive meanwhile wait, blocked, for the new image. Returns only on failure.
pub fn restart(socket: &Socket, conn: &UnixStream, proxy_protocol: Version) -> io::Error {
    let keep = |fd: &dyn AsFd| clear_cloexec(fd.as_fd());
    if let Err(e) = keep(socket).and_then(|()| keep(conn)) {
        return e;
    }
    signals::block();
    let resume = format!(
        "{RESUME_VAR}={},{},{proxy_protocol}",
        socket.as_raw_fd(),
        conn.as_raw_fd()
    );
    let cstring = |bytes: &[u8]| CString::new(bytes).ok();
    let args: Option<Vec<CString>> = std::env::args_os().map(|a| cstring(a.as_bytes())).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != RESUME_VAR)
        .filter_map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    env.extend(cstring(resume.as_bytes()));
    let error = match (args, cstring(b"/proc/self/exe")) {
        (Some(args), Some(exe)) => match nix::unistd::execve(&exe, &args, &env) {
            Err(e) => io::Error::from(e),
            Ok(never) => match never {},
        },
        _ => io::Error::other("an argument holds a NUL byte"),
    };
    set_cloexec(socket.as_raw_fd());
    set_cloexec(conn.as_raw_fd());
    signals::unblock();
    error
}

/// The listening socket and connection a shim kept across its [`restart`], taken from the
/// descriptors [`RESUME_VAR`] names; call first thing, as for inherited descriptors. None
/// when this process is not such a restart.
pub fn resumed() -> Option<(OwnedFd, OwnedFd, Version)> {
    let value = std::env::var_os(RESUME_VAR)?;
    let mut parts = value.to_str()?.split(',');
    let fd = |s: Option<&str>| s?.parse::<RawFd>().ok().and_then(take_passed);
    let (socket, conn) = (fd(parts.next())?, fd(parts.next())?);
    let version = parts
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    Some((socket, conn, version))
}
