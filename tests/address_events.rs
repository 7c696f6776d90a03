//! The socket hooks' list of host addresses (for wildcard mappings) follows the kernel's
//! address events (rtnetlink), and only them: an idle host costs the daemon no rescans.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use common::*;

const RESCAN: &str = "host addresses rescanned";

#[test]
fn host_addresses_are_rescanned_on_address_events_only() {
    if !need_root("host_addresses_are_rescanned_on_address_events_only") {
        return;
    }
    let dir = Dir::new("addr-events");
    let echo = tcp_echo("127.0.0.1:0");
    let port = free_ports(1);
    let sock = dir.sock();
    let publish = format!("{port}:{echo}");
    let d = Spawn::new(&[
        "daemon",
        "--control-socket",
        sock.to_str().unwrap(),
        "--socket-lb=require",
        "-p",
        &publish,
    ])
    .env("RPROXY_LOG", "info,rproxy::bpf=debug")
    .no_status_pipe()
    .spawn();
    d.wait_log("daemon ready", Duration::from_secs(10));

    // Nothing changes: nothing is rescanned. Other processes on this machine may change
    // addresses meanwhile (a test's veth gets an IPv6 link-local address): this test listens
    // for the same events, and judges only a window in which none came.
    let mut judged = false;
    for _ in 0..10 {
        let events = address_events();
        let _ = d.log_lines_for(Duration::from_millis(300));
        if saw_events(&events) {
            continue;
        }
        let idle: Vec<String> = d
            .log_lines_for(Duration::from_millis(2500))
            .into_iter()
            .filter(|l| l.contains(RESCAN))
            .collect();
        if saw_events(&events) {
            continue;
        }
        assert!(idle.is_empty(), "rescans with no address event: {idle:#?}");
        judged = true;
        break;
    }
    if !judged {
        skip(
            "host_addresses_are_rescanned_on_address_events_only",
            "addresses changed on this host in every 2.5 s window: no quiet one to judge",
        );
    }

    // An address appears (TEST-NET-2, on a veth pair of our own): rescanned.
    let link = format!("rpxae{}", std::process::id() % 10_000);
    sh(&format!(
        "ip link add {link} type veth peer name {link}p && \
         ip addr add 198.51.100.77/32 dev {link}"
    ));
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let _link = Link(link);
    // (Other rescans may come first, for other processes' changes.)
    let line = d.wait_log("198.51.100.77", Duration::from_secs(5));
    assert!(
        line.contains(RESCAN) && line.contains("added [198.51.100.77"),
        "{line}"
    );
}

/// A NETLINK_ROUTE socket subscribed to IPv4 and IPv6 address changes, as the daemon's.
fn address_events() -> OwnedFd {
    use nix::sys::socket::{
        bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
    )
    .unwrap();
    fd
}

/// Whether any address event has arrived on `events` (reading them all).
fn saw_events(events: &OwnedFd) -> bool {
    let mut buf = [0u8; 8192];
    let mut saw = false;
    while let Ok(n) = nix::sys::socket::recv(
        events.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        saw |= n > 0;
        if n == 0 {
            break;
        }
    }
    saw
}
