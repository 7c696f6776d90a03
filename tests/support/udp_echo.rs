//! A tiny UDP echo server for the real-dockerd test (busybox's nc has no UDP mode).
//!
//! The test compiles this file on the fly with
//! `rustc -O -C target-feature=+crt-static -o <dir>/udpecho tests/support/udp_echo.rs`
//! and copies the static binary into the test image. Usage: `udpecho PORT`. It listens on the
//! IPv6 wildcard with IPV6_V6ONLY off when it can (so both IPv4 and IPv6 clients are served),
//! otherwise on 0.0.0.0, and sends every datagram back to its sender unchanged.

use std::net::UdpSocket;

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(7);
    // std binds `[::]` with the system default for V6ONLY, which on Linux is dual-stack.
    let socket = UdpSocket::bind(("::", port))
        .or_else(|_| UdpSocket::bind(("0.0.0.0", port)))
        .unwrap_or_else(|e| {
            eprintln!("udpecho: cannot bind port {port}: {e}");
            std::process::exit(1);
        });
    eprintln!("udpecho: listening on {:?}", socket.local_addr());
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = socket.send_to(&buf[..n], peer) {
                    eprintln!("udpecho: send to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("udpecho: recv: {e}"),
        }
    }
}
