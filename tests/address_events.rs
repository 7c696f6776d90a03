//! The socket hooks' list of host addresses (for wildcard mappings) follows the kernel's
//! address events (rtnetlink), and only them: an idle host costs the daemon no rescans.

mod common;

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

    // Nothing changes: nothing is rescanned. (Another process adding an address to the host
    // meanwhile would be an event, and a rescan.)
    let idle: Vec<String> = d
        .log_lines_for(Duration::from_millis(2500))
        .into_iter()
        .filter(|l| l.contains(RESCAN))
        .collect();
    assert!(idle.is_empty(), "rescans with no address event: {idle:#?}");

    // An address appears (on a veth pair of our own): rescanned.
    let link = format!("rpxae{}", std::process::id() % 10_000);
    sh(&format!(
        "ip link add {link} type veth peer name {link}p && \
         ip addr add 10.232.0.1/32 dev {link}"
    ));
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let _link = Link(link);
    let line = d.wait_log(RESCAN, Duration::from_secs(5));
    assert!(line.contains("added [10.232.0.1]"), "{line}");
}
