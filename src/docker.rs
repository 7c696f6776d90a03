//! docker-proxy mode: the contract dockerd holds its userland proxy to
//! (docs/docker-proxy-contract.md): Go-style flags, the fd-3 status pipe, the fd-4
//! inherited socket, exit codes and signals.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::bpf::SocketLb;
use crate::frontend;
use crate::mapping::{describe, Mapping, Proto};
use crate::nat::Nat;
use crate::proxy_protocol::Version;
use crate::settings::env::Env;
use crate::settings::goflags::{self, Flag, Kind, ParseError};
use crate::settings::options::Options;
use crate::shim::{self, HandBack, Handoff, WaitEnd};
use crate::signals::{self, Signals};
use crate::supervisor::{Listener, Origin, Supervisor};
use crate::sys::fd::{self as fds, FdKind};
use crate::sys::process;

const STATUS_FD: i32 = 3;
const LISTEN_FD: i32 = 4;

/// docker-proxy's flags, as its Go `flag` set defines them (usage text included).
pub const FLAGS: &[Flag] = &[
    Flag {
        name: "proto",
        kind: Kind::Str,
        default: "tcp",
        usage: "proxy protocol",
    },
    Flag {
        name: "host-ip",
        kind: Kind::Str,
        default: "0.0.0.0",
        usage: "host ip",
    },
    Flag {
        name: "host-port",
        kind: Kind::Int,
        default: "-1",
        usage: "host port",
    },
    Flag {
        name: "container-ip",
        kind: Kind::Str,
        default: "0.0.0.0",
        usage: "container ip",
    },
    Flag {
        name: "container-port",
        kind: Kind::Int,
        default: "-1",
        usage: "container port",
    },
    Flag {
        name: "use-listen-fd",
        kind: Kind::Bool,
        default: "false",
        usage: "use a listening socket passed as file descriptor 4",
    },
    Flag {
        name: "v",
        kind: Kind::Bool,
        default: "false",
        usage: "print version information and quit",
    },
    Flag {
        name: "version",
        kind: Kind::Bool,
        default: "false",
        usage: "print version information and quit",
    },
];

/// The descriptors dockerd hands over. They must be taken before anything else opens a file
/// (the log socket, the runtime's epoll): those would otherwise land on fds 3 and 4 when the
/// parent left them closed, and be mistaken for the status pipe or the listening socket.
pub struct Inherited {
    status: StatusPipe,
    listen: Result<OwnedFd, &'static str>,
    /// A shim started over after handing its port back to a daemon ([`shim::restart`]): its
    /// listening socket, its connection to the daemon and the header that daemon gave it.
    /// fds 3 and 4 are then not dockerd's.
    resumed: Option<(OwnedFd, OwnedFd, Version)>,
}

impl Inherited {
    /// Takes fds 3 and 4 as they were at exec: call first thing in `main`.
    pub fn take() -> Inherited {
        if let Some(resumed) = shim::resumed() {
            return Inherited {
                status: StatusPipe(None),
                listen: Err("a restarted shim has no fd 4"),
                resumed: Some(resumed),
            };
        }
        // As docker-proxy does first thing: our children must not inherit these.
        fds::set_cloexec(STATUS_FD);
        fds::set_cloexec(LISTEN_FD);
        let status = StatusPipe::inherit();
        let listen = match fds::fd_kind(LISTEN_FD) {
            FdKind::Socket => fds::take_inherited(LISTEN_FD).ok_or("fd 4 was taken already"),
            FdKind::Closed => Err("-use-listen-fd given but fd 4 is not open"),
            _ => Err("fd 4 is not a socket"),
        };
        Inherited {
            status,
            listen,
            resumed: None,
        }
    }
}

/// Runs docker-proxy mode with `args` (argv without argv[0]) and the environment (with the
/// problems found reading it); returns the exit code. `help` is what `-h` prints: the whole
/// command line's help, subcommands included (the command line lives above this module).
pub fn main(
    prog: &str,
    args: &[String],
    inherited: Inherited,
    env: Env,
    problems: Vec<String>,
    help: fn() -> String,
) -> i32 {
    let Inherited {
        status,
        listen,
        resumed,
    } = inherited;
    // Until a handler exists (signalfd in a shim, tokio's when serving), hold stop signals.
    signals::block();
    let flags = match read_flags(prog, args, help) {
        Ok(flags) => flags,
        Err(code) => return code,
    };
    if flags.version {
        print_version();
        return 0;
    }
    let options = match settle_options(&env, problems) {
        Ok(o) => o,
        Err(why) => return status.fail(&why),
    };
    prepare_process();
    let back = HandBack {
        socket_path: env.socket.clone(),
        options: env.overrides.clone(),
    };
    if let Some((socket, conn, proxy_protocol)) = resumed {
        let options = Options {
            proxy_protocol,
            ..options
        };
        return resume(prog, &flags, options, socket, conn, &back);
    }
    let (mapping, socket) = match open_port(&flags, options, listen) {
        Ok(ms) => ms,
        Err(msg) => return status.fail(&msg),
    };
    hand_off_or_serve(mapping, socket, status, &env, &back)
}

/// docker-proxy's flags, or the exit status when there is nothing to serve: 0 after
/// `-help`, 2 after a bad flag (with Go's usage on stderr).
fn read_flags(prog: &str, args: &[String], help: fn() -> String) -> Result<Flags, i32> {
    match Flags::parse(args) {
        Ok(flags) => Ok(flags),
        // Go prints usage on stderr; a person asking for help wants it on stdout (`| less`),
        // and dockerd never asks.
        Err(ParseError::Help) => {
            crate::output::print(&format!("{}\n", help()));
            Err(0)
        }
        Err(ParseError::Invalid(msg)) => {
            eprintln!("{msg}");
            eprint!("{}", goflags::usage(prog, FLAGS));
            eprintln!(
                "(rproxy also has subcommands: `rproxy daemon` serves many ports in one \
                 process, and processes like this one hand their ports to it; see rproxy \
                 --help)"
            );
            Err(2)
        }
    }
}

/// `-version`.
fn print_version() {
    crate::output::print(&format!(
        "rproxy (commit {}) version {}\n",
        commit(),
        env!("CARGO_PKG_VERSION")
    ));
}

/// The port's options from the environment; Err (for fd 3, so `docker run` names the
/// variable) when it has problems.
fn settle_options(env: &Env, problems: Vec<String>) -> Result<Options, String> {
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    env.overrides.apply(&Options::default())
}

/// What a long-lived process owes its host: room for descriptors, and an end with its parent.
fn prepare_process() {
    if let Err(e) = process::raise_nofile_limit() {
        tracing::warn!("cannot raise the open-file limit: {}", describe(&e));
    }
    // dockerd sets this too; doing it ourselves covers other supervisors and wrappers (nsenter).
    let _ = process::set_parent_death_signal(libc::SIGTERM);
}

/// The mapping the flags describe and its listening socket: dockerd's on fd 4
/// (`-use-listen-fd`), else bound here. The socket's own address is the truth (fd 4, or
/// port 0 resolved by bind).
fn open_port(
    flags: &Flags,
    options: Options,
    listen: Result<OwnedFd, &'static str>,
) -> Result<(Mapping, Socket), String> {
    let mut mapping = flags.mapping(options)?;
    let socket = match flags.use_listen_fd {
        true => listen
            .map_err(str::to_string)
            .and_then(|fd| frontend::check(&mapping, fd))
            .map_err(|why| format!("bad listening socket on fd 4: {why}"))?,
        false => frontend::bind(&mapping)?,
    };
    if let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
        mapping.listen = local;
    }
    Ok((mapping, socket))
}

/// Offers the port to a daemon (unless `RPROXY_HANDOFF=0`) and waits as a shim while it
/// serves it; serves it here when no daemon does.
fn hand_off_or_serve(
    mut mapping: Mapping,
    socket: Socket,
    status: StatusPipe,
    env: &Env,
    back: &HandBack,
) -> i32 {
    let handoff = match env.no_handoff {
        true => Ok(Handoff::NoDaemon),
        false => shim::register(&mapping, &socket, env.socket.clone(), env.overrides.clone()),
    };
    match handoff {
        Err(refusal) => status.fail(&refusal),
        Ok(Handoff::NoDaemon) => match serve(mapping, socket, Some(status), None) {
            Served::Exit(code) => code,
            // Never: without `back` there is no hand-back.
            Served::HandedBack(..) => 0,
        },
        Ok(Handoff::Registered(conn, proxy_protocol)) => {
            status.ready(&mapping);
            // Taken back, the port keeps the header the daemon gave it.
            mapping.options.proxy_protocol = proxy_protocol;
            registered(mapping, socket, conn, back)
        }
    }
}

/// A shim started over after handing its port back ([`shim::restart`]): the same flags,
/// its socket and connection kept; it waits as a fresh shim does.
fn resume(
    prog: &str,
    flags: &Flags,
    options: Options,
    socket: OwnedFd,
    conn: OwnedFd,
    back: &HandBack,
) -> i32 {
    // Executed through /proc/self/exe, whose name the kernel took for ours.
    let name = std::path::Path::new(prog)
        .file_name()
        .map_or("rproxy".into(), |n| n.to_string_lossy());
    let _ = process::set_name(&name);
    let checked = flags
        .mapping(options)
        .and_then(|m| frontend::check(&m, socket).map(|s| (m, s)));
    let (mut mapping, socket) = match checked {
        Ok(ms) => ms,
        Err(e) => {
            tracing::error!("restarted shim: {e}");
            return 1;
        }
    };
    if let Some(local) = frontend::local_addr(&socket) {
        mapping.listen = local;
    }
    tracing::info!("{mapping}: the daemon serves it again; waiting as a shim");
    registered(mapping, socket, UnixStream::from(conn), back)
}

/// A registered shim: waits for dockerd's stop signal; when the daemon goes away, serves the
/// port itself until a daemon takes it back, then starts over as a waiting shim.
fn registered(mut mapping: Mapping, socket: Socket, mut conn: UnixStream, back: &HandBack) -> i32 {
    loop {
        match shim::wait(&conn) {
            Ok(WaitEnd::Stopped(signal)) => {
                tracing::info!("{signal}: stopping {mapping}");
                return 0;
            }
            Ok(WaitEnd::DaemonGone) => tracing::warn!(
                "the rproxy daemon went away; serving {mapping} in this process until a \
                 daemon takes it back"
            ),
            Err(e) => tracing::error!(
                "waiting for the daemon failed ({}); serving {mapping} in this process",
                describe(&e)
            ),
        }
        drop(conn);
        let copy = match socket.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot serve {mapping}: {}", describe(&e));
                return 1;
            }
        };
        conn = match serve(mapping.clone(), copy, None, Some(back)) {
            Served::Exit(code) => return code,
            Served::HandedBack(conn, proxy_protocol) => {
                mapping.options.proxy_protocol = proxy_protocol;
                conn
            }
        };
        let e = shim::restart(&socket, &conn, mapping.options.proxy_protocol);
        tracing::warn!(
            "cannot start over as a waiting shim ({}); waiting in this process",
            describe(&e)
        );
    }
}

/// How serving in this process ended.
enum Served {
    /// Stopped (SIGINT/SIGTERM) or failed: the exit code.
    Exit(i32),
    /// A daemon serves the port now, for as long as this connection stays open; this
    /// process's own connections are finished.
    HandedBack(UnixStream, Version),
}

/// Serves the mapping in this process on a current-thread runtime until SIGINT/SIGTERM, with
/// kernel NAT in this process's own table when its options ask. `status` is reported once
/// the socket is registered with the runtime and the rules are in. With `back` (a shim whose
/// daemon went away), also until a daemon takes the port back.
fn serve(
    mapping: Mapping,
    socket: Socket,
    status: Option<StatusPipe>,
    back: Option<&HandBack>,
) -> Served {
    let fail = |status: Option<StatusPipe>, msg: &str| {
        Served::Exit(match status {
            Some(s) => s.fail(msg),
            None => {
                tracing::error!("{msg}");
                1
            }
        })
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                status,
                &format!("cannot start the runtime: {}", describe(&e)),
            )
        }
    };
    runtime.block_on(async move {
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => return fail(status, &format!("cannot handle signals: {}", describe(&e))),
        };
        // Handlers exist now: a signal that arrived meanwhile is delivered to them.
        signals::unblock();
        // Kernel NAT, when asked, in this process's own table (deleted on the way out).
        let nat = Nat::new(&format!("rproxy-{}", std::process::id()));
        let sup = Supervisor::new(nat, SocketLb::disabled(), false);
        let copy = match back.map(|_| socket.try_clone()).transpose() {
            Ok(c) => c,
            Err(e) => return fail(status, &format!("cannot keep the socket: {}", describe(&e))),
        };
        let mut mapping = match sup.start(mapping, Listener::Socket(socket), Origin::Docker).await {
            Ok(m) => m,
            Err(msg) => return fail(status, &msg),
        };
        // The supervisor has said "serving" already.
        if let Some(s) = status {
            s.ready(&mapping);
        }
        let (Some(back), Some(socket)) = (back, copy) else {
            let signal = signals.terminate().await;
            tracing::info!("{signal}: stopping {mapping}");
            sup.stop_all(Duration::ZERO).await;
            return Served::Exit(0);
        };
        loop {
            let conn = tokio::select! {
                signal = signals.terminate() => {
                    tracing::info!("{signal}: stopping {mapping}");
                    sup.stop_all(Duration::ZERO).await;
                    return Served::Exit(0);
                }
                taken = shim::watch_daemon(&mapping, &socket, back) => taken,
            };
            let (conn, proxy_protocol) = conn;
            // Should that daemon go too, the port keeps the header it gave.
            mapping.options.proxy_protocol = proxy_protocol;
            tracing::info!(
                "{mapping} handed back to the daemon; finishing this process's connections \
                 (up to {:?})",
                shim::HANDBACK_DRAIN
            );
            let tasks = sup.hand_over_all(shim::HANDBACK_DRAIN).await;
            let drained = async {
                for t in tasks {
                    let _ = t.await;
                }
            };
            tokio::select! {
                _ = drained => return Served::HandedBack(conn, proxy_protocol),
                signal = signals.terminate() => {
                    tracing::info!("{signal}: stopping {mapping}");
                    return Served::Exit(0);
                }
                _ = shim::closed(&conn) => {
                    tracing::warn!("the rproxy daemon went away again; serving {mapping} in this process");
                }
            }
            let copy = match socket.try_clone() {
                Ok(c) => c,
                Err(e) => return fail(None, &format!("cannot serve {mapping}: {}", describe(&e))),
            };
            if let Err(msg) = sup
                .start(mapping.clone(), Listener::Socket(copy), Origin::Docker)
                .await
            {
                return fail(None, &msg);
            }
        }
    })
}

fn commit() -> &'static str {
    option_env!("RPROXY_COMMIT").unwrap_or("unknown")
}

/// The flags of one docker-proxy invocation. The ports and the container address are None
/// when not given: Go's defaults (-1, 0.0.0.0) are no values anyone chose, and a message
/// must not quote them.
#[derive(Debug)]
struct Flags {
    proto: String,
    host_ip: IpAddr,
    host_port: Option<i64>,
    container_ip: Option<IpAddr>,
    container_port: Option<i64>,
    use_listen_fd: bool,
    version: bool,
}

impl Flags {
    fn parse(args: &[String]) -> Result<Flags, ParseError> {
        let p = goflags::parse(FLAGS, args)?;
        // Go 28+ parses the addresses as flag values, so a bad one is a usage error (exit 2).
        let ip = |name: &str| -> Result<Option<IpAddr>, ParseError> {
            let Some(text) = p.str(name) else {
                return Ok(None);
            };
            let ip: IpAddr = text.parse().map_err(|_| {
                ParseError::Invalid(format!(
                    "invalid value {text:?} for flag -{name}: invalid IP address: {text}"
                ))
            })?;
            // dockerd 28+ unmaps IPv4-mapped host addresses; do the same for hand-written ones.
            Ok(Some(ip.to_canonical()))
        };
        Ok(Flags {
            proto: p.str("proto").unwrap_or("tcp").to_string(),
            host_ip: ip("host-ip")?.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            host_port: p.int("host-port"),
            container_ip: ip("container-ip")?,
            container_port: p.int("container-port"),
            use_listen_fd: p.bool("use-listen-fd"),
            version: p.bool("v") || p.bool("version"),
        })
    }

    /// Checks the flags make a mapping (with `options`); every failure here goes to fd 3.
    /// Every problem is named, the host side's first.
    fn mapping(&self, options: Options) -> Result<Mapping, String> {
        let proto = match self.proto.as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => return Err(sctp_unsupported()),
            other => return Err(format!("unsupported protocol {other}")),
        };
        let (listen, target) = match (self.listen_port(), self.target(), self.families()) {
            (Ok(port), Ok(target), Ok(())) => (SocketAddr::new(self.host_ip, port), target),
            (listen, target, family) => {
                let problems = [listen.err(), target.err(), family.err()];
                return Err(problems
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; "));
            }
        };
        Ok(Mapping {
            proto,
            listen,
            target,
            options,
        })
    }

    /// The port to listen on: -host-port's, or, with -use-listen-fd, whatever the passed
    /// socket has (the flag is informational then).
    fn listen_port(&self) -> Result<u16, String> {
        match (self.host_port, self.use_listen_fd) {
            (given, true) => Ok(given.and_then(port).unwrap_or(0)),
            (None, false) => Err("no host port: give -host-port (0 takes any free port)".into()),
            (Some(given), false) => {
                port(given).ok_or_else(|| format!("invalid host port {given} (must be 0-65535)"))
            }
        }
    }

    /// 6→4 is normal (dockerd's `::` proxy targets IPv4 containers); 4→6 never comes from
    /// dockerd and means the caller mixed up addresses.
    fn families(&self) -> Result<(), String> {
        match self.container_ip {
            Some(ip) if self.host_ip.is_ipv4() && ip.is_ipv6() => Err(format!(
                "backend family mismatch: IPv4 host address {} cannot target IPv6 container \
                 address {ip}",
                self.host_ip
            )),
            _ => Ok(()),
        }
    }

    /// The container's address and port, or every problem with them.
    fn target(&self) -> Result<SocketAddr, String> {
        let ip = match self.container_ip {
            None => Err("no container address: give -container-ip".to_string()),
            Some(ip) if ip.is_unspecified() => Err(format!(
                "no container address: -container-ip is {ip} (give the container's IP)"
            )),
            Some(ip) => Ok(ip),
        };
        let port = match self.container_port {
            None => Err("no container port: give -container-port (1-65535)".to_string()),
            Some(given) => port(given)
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("invalid container port {given} (must be 1-65535)")),
        };
        match (ip, port) {
            (Ok(ip), Ok(port)) => Ok(SocketAddr::new(ip, port)),
            (ip, port) => Err([ip.err(), port.err()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ")),
        }
    }
}

fn port(value: i64) -> Option<u16> {
    u16::try_from(value).ok()
}

/// Why SCTP fails, told apart by whether the kernel could open an SCTP socket at all.
fn sctp_unsupported() -> String {
    match Socket::new(
        Domain::IPV4,
        Type::STREAM,
        Some(Protocol::from(libc::IPPROTO_SCTP)),
    ) {
        Ok(_) => "SCTP is not supported by rproxy yet; publish this port over tcp or udp".into(),
        Err(e) => format!("SCTP is not supported by this kernel ({})", describe(&e)),
    }
}

/// The write end of dockerd's status pipe, when we were given one.
pub struct StatusPipe(Option<File>);

impl StatusPipe {
    /// Takes fd 3 when it is a pipe or socket (run by hand, fd 3 is absent or something else).
    pub fn inherit() -> StatusPipe {
        match fds::fd_kind(STATUS_FD) {
            FdKind::Fifo | FdKind::Socket => {
                let fd = fds::take_inherited(STATUS_FD);
                if let Some(fd) = &fd {
                    let _ = fds::set_nonblocking(fd.as_fd());
                }
                StatusPipe(fd.map(File::from))
            }
            _ => StatusPipe(None),
        }
    }

    /// "0\n" in one write: dockerd reads exactly two bytes and treats them as "mapping live".
    pub fn ready(self, mapping: &Mapping) {
        tracing::info!("serving {mapping}");
        if let Some(mut f) = self.0 {
            if let Err(e) = f.write_all(b"0\n") {
                tracing::warn!("cannot report readiness on fd 3: {}", describe(&e));
            }
        }
    }

    /// "1\n<reason>", then EOF (the file is closed on return); exit code 1.
    pub fn fail(self, reason: &str) -> i32 {
        match self.0 {
            Some(mut f) => {
                tracing::error!("{reason}");
                let _ = f.write_all(format!("1\n{reason}").as_bytes());
            }
            // Run by hand: the reason must still reach a human.
            None => eprintln!("rproxy: {reason}"),
        }
        1
    }
}
