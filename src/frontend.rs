//! The listening side of a mapping: bind a socket (or check one handed over by dockerd or a
//! shim), and serve it until told to stop. Every mode ends here; the data path below only
//! sees a socket and a target.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use socket2::{Domain, SockRef, Socket, Type};

use crate::mapping::{describe, Mapping, Proto};
use crate::stats::Stats;
use crate::stop::Stop;
use crate::{sys, tcp, udp};

/// Binds as docker-proxy does: SO_REUSEADDR for TCP, V6ONLY for IPv6 (the v4 proxy is separate).
/// The error reads like docker-proxy's: "failed to listen on tcp 0.0.0.0:80: address already in use".
pub fn bind(mapping: &Mapping) -> Result<Socket, String> {
    let bind = || -> io::Result<Socket> {
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
    };
    bind().map_err(|e| {
        format!(
            "failed to listen on {} {}: {}",
            mapping.proto,
            mapping.listen,
            describe(&e)
        )
    })
}

/// Checks that a socket handed over (fd 4, or from a shim) can serve `mapping`; listens on an
/// unlistened TCP socket.
pub fn check(mapping: &Mapping, fd: OwnedFd) -> Result<Socket, String> {
    let socket = Socket::from(fd);
    let wrap = |e: io::Error| describe(&e);
    let want = match mapping.proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    if socket.r#type().map_err(wrap)? != want {
        return Err(format!("it is not a {} socket", mapping.proto));
    }
    let domain = socket.domain().map_err(wrap)?;
    // An AF_INET6 socket may be dual-stack and serve any host address; an AF_INET one cannot
    // serve an IPv6 host address.
    if domain == Domain::IPV4 && mapping.listen.is_ipv6() {
        return Err(format!(
            "an IPv4 socket cannot serve host address {}",
            mapping.listen.ip()
        ));
    }
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err("not an IPv4 or IPv6 socket".into());
    }
    if mapping.proto == Proto::Tcp && !SockRef::from(&socket).is_listener().map_err(wrap)? {
        socket.listen(4096).map_err(wrap)?;
    }
    Ok(socket)
}

/// The address `socket` is bound to, IPv4-mapped addresses unmapped (as specs write them).
pub fn local_addr(socket: &Socket) -> Option<std::net::SocketAddr> {
    let local = socket.local_addr().ok()?.as_socket()?;
    Some(std::net::SocketAddr::new(
        local.ip().to_canonical(),
        local.port(),
    ))
}

/// A bound (UDP) or listening (TCP) socket inside the runtime, ready to serve.
pub enum Frontend {
    /// A TCP mapping's listener.
    Tcp(tokio::net::TcpListener, Mapping),
    /// A UDP mapping's socket.
    Udp(tokio::net::UdpSocket, Mapping),
}

impl Frontend {
    /// Registers `socket` with the runtime (call inside it). The mapping's listen address is
    /// updated to the socket's real one (port 0 resolved, fd 4's address).
    pub fn new(mut mapping: Mapping, socket: Socket) -> Result<Frontend, String> {
        let wrap = |e: io::Error| format!("cannot use the frontend socket: {}", describe(&e));
        if let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
            mapping.listen = local;
        }
        socket.set_nonblocking(true).map_err(wrap)?;
        match mapping.proto {
            Proto::Tcp => {
                tcp::tune(SockRef::from(&socket));
                let l = tokio::net::TcpListener::from_std(socket.into()).map_err(wrap)?;
                Ok(Frontend::Tcp(l, mapping))
            }
            Proto::Udp => {
                let ipv6 = socket.domain().map_err(wrap)? == Domain::IPV6;
                sys::udp::enable_pktinfo(socket.as_fd(), ipv6).map_err(wrap)?;
                // Absorb bursts: the kernel default (~208 KiB) overflows within a millisecond at
                // line rate. Memory is charged only while datagrams wait.
                udp::grow_receive_buffer(&socket);
                let s = tokio::net::UdpSocket::from_std(socket.into()).map_err(wrap)?;
                Ok(Frontend::Udp(s, mapping))
            }
        }
    }

    /// The mapping, with its real listen address.
    pub fn mapping(&self) -> Mapping {
        match self {
            Frontend::Tcp(_, m) | Frontend::Udp(_, m) => m.clone(),
        }
    }

    /// Serves until `stop` fires; then TCP connections get the drain time it carries to finish.
    pub async fn serve(self, stats: Arc<Stats>, stop: Stop) {
        match self {
            Frontend::Tcp(listener, m) => {
                tcp::serve(listener, m.target, (&m.options).into(), stats, stop).await
            }
            Frontend::Udp(socket, m) => {
                udp::serve(socket, m.target, (&m.options).into(), stats, stop).await
            }
        }
    }
}
