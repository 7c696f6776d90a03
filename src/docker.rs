//! docker-proxy mode: the contract dockerd holds its userland proxy to
//! (../shared/spec/docker-proxy-contract.md): Go-style flags, the fd-3 status pipe, the fd-4
//! inherited socket, exit codes and signals.

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::goflags::{self, Flag, Kind, ParseError};
use crate::mapping::{describe, Mapping, Proto};
use crate::sys::{self, FdKind};
use crate::{tcp, udp};

const STATUS_FD: i32 = 3;
const LISTEN_FD: i32 = 4;

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

/// A start-up failure that dockerd must see on fd 3 (exit 1).
#[derive(Debug)]
pub struct StartError(pub String);

/// The descriptors dockerd hands over. They must be taken before anything else opens a file
/// (the log socket, the runtime's epoll): those would otherwise land on fds 3 and 4 when the
/// parent left them closed, and be mistaken for the status pipe or the listening socket.
pub struct Inherited {
    status: StatusPipe,
    listen: Result<OwnedFd, &'static str>,
}

impl Inherited {
    pub fn take() -> Inherited {
        // As docker-proxy does first thing: our children must not inherit these.
        sys::set_cloexec(STATUS_FD);
        sys::set_cloexec(LISTEN_FD);
        let status = StatusPipe::inherit();
        let listen = match sys::fd_kind(LISTEN_FD) {
            FdKind::Socket => sys::adopt_fd(LISTEN_FD).map_err(|_| "fd 4 is not open"),
            FdKind::Closed => Err("-use-listen-fd given but fd 4 is not open"),
            _ => Err("fd 4 is not a socket"),
        };
        Inherited { status, listen }
    }
}

/// Runs docker-proxy mode with `args` (argv without argv[0]); returns the exit code.
pub fn main(prog: &str, args: &[String], inherited: Inherited) -> i32 {
    let Inherited { status, listen } = inherited;
    let opts = match Options::parse(args) {
        Ok(opts) => opts,
        Err(ParseError::Help) => {
            eprint!("{}", goflags::usage(prog, FLAGS));
            return 0;
        }
        Err(ParseError::Invalid(msg)) => {
            eprintln!("{msg}");
            eprint!("{}", goflags::usage(prog, FLAGS));
            return 2;
        }
    };
    if opts.version {
        println!(
            "rproxy (commit {}) version {}",
            commit(),
            env!("CARGO_PKG_VERSION")
        );
        return 0;
    }

    if let Err(e) = sys::raise_nofile_limit() {
        tracing::warn!("cannot raise the open-file limit: {}", describe(&e));
    }
    // dockerd sets this too; doing it ourselves covers other supervisors and wrappers (nsenter).
    let _ = sys::set_parent_death_signal(libc::SIGTERM);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return status.fail(&format!("cannot start the runtime: {}", describe(&e))),
    };
    runtime.block_on(async move {
        let listen = opts.use_listen_fd.then_some(listen);
        let frontend = match opts.mapping().and_then(|m| Frontend::open(m, listen)) {
            Ok(f) => f,
            Err(StartError(msg)) => return status.fail(&msg),
        };
        let mapping = frontend.mapping();
        let serve = frontend.serve();
        status.ready(&mapping);
        tokio::select! {
            _ = serve => 0,
            signal = crate::signals::terminate() => {
                tracing::info!("{signal}: stopping {mapping}");
                0
            }
        }
    })
}

fn commit() -> &'static str {
    option_env!("RPROXY_COMMIT").unwrap_or("unknown")
}

/// The flags of one docker-proxy invocation.
#[derive(Debug)]
struct Options {
    proto: String,
    host_ip: IpAddr,
    host_port: i64,
    container_ip: IpAddr,
    container_port: i64,
    use_listen_fd: bool,
    version: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, ParseError> {
        let p = goflags::parse(FLAGS, args)?;
        // Go 28+ parses the addresses as flag values, so a bad one is a usage error (exit 2).
        let ip = |name: &str| -> Result<IpAddr, ParseError> {
            let text = p.str(name).unwrap_or("0.0.0.0");
            let ip: IpAddr = text.parse().map_err(|_| {
                ParseError::Invalid(format!(
                    "invalid value {text:?} for flag -{name}: invalid IP address: {text}"
                ))
            })?;
            // dockerd 28+ unmaps IPv4-mapped host addresses; do the same for hand-written ones.
            Ok(ip.to_canonical())
        };
        Ok(Options {
            proto: p.str("proto").unwrap_or("tcp").to_string(),
            host_ip: ip("host-ip")?,
            host_port: p.int("host-port").unwrap_or(-1),
            container_ip: ip("container-ip")?,
            container_port: p.int("container-port").unwrap_or(-1),
            use_listen_fd: p.bool("use-listen-fd"),
            version: p.bool("v") || p.bool("version"),
        })
    }

    /// Checks the flags make a mapping; every failure here goes to fd 3.
    fn mapping(&self) -> Result<Mapping, StartError> {
        let proto = match self.proto.as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => return Err(StartError(sctp_unsupported())),
            other => return Err(StartError(format!("unsupported protocol {other}"))),
        };
        if self.container_ip.is_unspecified() {
            return Err(StartError(format!(
                "no container address: -container-ip is {} (give the container's IP)",
                self.container_ip
            )));
        }
        let container_port = port(self.container_port)
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                StartError(format!(
                    "invalid container port {} (must be 1-65535)",
                    self.container_port
                ))
            })?;
        // 6→4 is normal (dockerd's `::` proxy targets IPv4 containers); 4→6 never comes from
        // dockerd and means the caller mixed up addresses.
        if self.host_ip.is_ipv4() && self.container_ip.is_ipv6() {
            return Err(StartError(format!(
                "backend family mismatch: IPv4 host address {} cannot target IPv6 container address {}",
                self.host_ip, self.container_ip
            )));
        }
        let host_port = if self.use_listen_fd {
            // The port is in the passed socket; the flag is informational.
            port(self.host_port).unwrap_or(0)
        } else {
            port(self.host_port).ok_or_else(|| {
                StartError(format!(
                    "invalid host port {} (must be 0-65535)",
                    self.host_port
                ))
            })?
        };
        Ok(Mapping {
            proto,
            listen: SocketAddr::new(self.host_ip, host_port),
            target: SocketAddr::new(self.container_ip, container_port),
        })
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
        match sys::fd_kind(STATUS_FD) {
            FdKind::Fifo | FdKind::Socket => {
                let fd = sys::adopt_fd(STATUS_FD).ok();
                if let Some(fd) = &fd {
                    let _ = sys::set_nonblocking(fd.as_fd());
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

/// A bound (UDP) or listening (TCP) frontend socket, ready to serve.
pub enum Frontend {
    Tcp(tokio::net::TcpListener, Mapping),
    Udp(tokio::net::UdpSocket, Mapping),
}

impl Frontend {
    /// Binds the mapping's address, or adopts the inherited socket when one is given.
    pub fn open(
        mapping: Mapping,
        inherited: Option<Result<OwnedFd, &str>>,
    ) -> Result<Frontend, StartError> {
        let socket = if let Some(fd) = inherited {
            adopt_listen_fd(&mapping, fd)?
        } else {
            bind(&mapping).map_err(|e| {
                StartError(format!(
                    "failed to listen on {} {}: {}",
                    mapping.proto,
                    mapping.listen,
                    describe(&e)
                ))
            })?
        };
        let mut mapping = mapping;
        if let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
            mapping.listen = local;
        }
        let wrap =
            |e: io::Error| StartError(format!("cannot use the frontend socket: {}", describe(&e)));
        socket.set_nonblocking(true).map_err(wrap)?;
        match mapping.proto {
            Proto::Tcp => {
                let l = tokio::net::TcpListener::from_std(socket.into()).map_err(wrap)?;
                Ok(Frontend::Tcp(l, mapping))
            }
            Proto::Udp => {
                let ipv6 = socket.domain().map_err(wrap)? == Domain::IPV6;
                sys::enable_pktinfo(socket.as_fd(), ipv6).map_err(wrap)?;
                let s = tokio::net::UdpSocket::from_std(socket.into()).map_err(wrap)?;
                Ok(Frontend::Udp(s, mapping))
            }
        }
    }

    pub fn mapping(&self) -> Mapping {
        match self {
            Frontend::Tcp(_, m) | Frontend::Udp(_, m) => *m,
        }
    }

    /// Serves until a fatal error (which is logged); normally runs until the process is stopped.
    pub async fn serve(self) {
        match self {
            Frontend::Tcp(listener, m) => {
                tcp::serve(listener, m.target, tcp::Config::from_env()).await
            }
            Frontend::Udp(socket, m) => udp::serve(socket, m.target, udp::Config::from_env()).await,
        }
    }
}

/// Binds as docker-proxy does: SO_REUSEADDR for TCP, V6ONLY for IPv6 (the v4 proxy is separate).
fn bind(mapping: &Mapping) -> io::Result<Socket> {
    let domain = Domain::for_address(mapping.listen);
    let socket = match mapping.proto {
        Proto::Tcp => Socket::new(domain, Type::STREAM.cloexec(), None)?,
        Proto::Udp => Socket::new(domain, Type::DGRAM.cloexec(), None)?,
    };
    if domain == Domain::IPV6 {
        socket.set_only_v6(true)?;
    }
    if mapping.proto == Proto::Tcp {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&mapping.listen.into())?;
    if mapping.proto == Proto::Tcp {
        // The kernel caps this at net.core.somaxconn, which is what Go asks for.
        socket.listen(4096)?;
    }
    Ok(socket)
}

/// Checks dockerd's socket from fd 4 is what the flags say.
fn adopt_listen_fd(mapping: &Mapping, fd: Result<OwnedFd, &str>) -> Result<Socket, StartError> {
    let bad = |why: String| StartError(format!("bad listening socket on fd 4: {why}"));
    let fd = fd.map_err(|why| bad(why.to_string()))?;
    let socket = Socket::from(fd);
    let wrap = |e: io::Error| bad(describe(&e));
    let ty = socket.r#type().map_err(wrap)?;
    let want = match mapping.proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    if ty != want {
        return Err(bad(format!("it is not a {} socket", mapping.proto)));
    }
    let domain = socket.domain().map_err(wrap)?;
    // An AF_INET6 socket may be dual-stack and serve any host address; an AF_INET one cannot
    // serve an IPv6 host address.
    if domain == Domain::IPV4 && mapping.listen.is_ipv6() {
        return Err(bad(format!(
            "an IPv4 socket cannot serve host address {}",
            mapping.listen.ip()
        )));
    }
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(bad("not an IPv4 or IPv6 socket".into()));
    }
    if mapping.proto == Proto::Tcp {
        let listening = SockRef::from(&socket).is_listener().map_err(wrap)?;
        if !listening {
            socket.listen(4096).map_err(wrap)?;
        }
    }
    Ok(socket)
}
