//! What /proc says about a process: its sockets and its memory.

use super::*;

/// (local address, state) of every IPv4 socket in PID's network namespace.
pub(crate) fn sockets(pid: u32, proto: Proto) -> Vec<(SocketAddrV4, u8)> {
    let path = match pid {
        0 => format!("/proc/thread-self/net/{}", proto.name()),
        _ => format!("/proc/{pid}/net/{}", proto.name()),
    };
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (ip, port) = f.get(1)?.split_once(':')?;
            // The kernel prints the address as a native-endian u32 of network-order bytes.
            let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
            let port = u16::from_str_radix(port, 16).ok()?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            Some((SocketAddrV4::new(Ipv4Addr::from(ip), port), state))
        })
        .collect()
}

pub(crate) const TCP_LISTEN: u8 = 0x0A;

pub(crate) fn is_bound(pid: u32, proto: Proto, addr: SocketAddrV4) -> bool {
    sockets(pid, proto)
        .iter()
        .any(|(a, st)| *a == addr && (proto == Proto::Udp || *st == TCP_LISTEN))
}

/// Waits until `p` (or, through `ip netns exec`, the program it became) has bound `addr`.
pub(crate) fn wait_bound(p: &mut Proc, proto: Proto, addr: SocketAddrV4) -> Result<(), String> {
    let pid = p.pid();
    wait_bound_at(p, pid, proto, addr)
}

/// Waits until `addr` is bound in the network namespace of `netns_pid`, while `p` runs.
pub(crate) fn wait_bound_at(
    p: &mut Proc,
    netns_pid: u32,
    proto: Proto,
    addr: SocketAddrV4,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if is_bound(netns_pid, proto, addr) {
            return Ok(());
        }
        if let Some(status) = p.exited() {
            return Err(format!("{} exited ({status}){}", p.name, p.logs()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not bind {} {addr} within 10 s{}",
                p.name,
                proto.name(),
                p.logs()
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Reads docker-proxy's status pipe (fd 3): "0\n" once it listens, "1\n<error>" if it cannot.
pub(crate) fn wait_status(p: &mut Proc, pipe: OwnedFd) -> Result<(), String> {
    let mut file = File::from(pipe);
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.contains(&b'\n') {
        if Instant::now() > deadline {
            return Err(format!("{}: no status within 10 s{}", p.name, p.logs()));
        }
        let readable = {
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, 100u16).map_err(|e| format!("poll: {e}"))? > 0
        };
        if readable {
            let mut chunk = [0u8; 512];
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("{}: status pipe: {e}", p.name)),
            }
        }
    }
    let status = String::from_utf8_lossy(&buf);
    match status.starts_with("0\n") {
        true => Ok(()),
        false => Err(format!(
            "{} did not start: status {status:?}{}",
            p.name,
            p.logs()
        )),
    }
}

#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Mem {
    pub(crate) rss_kb: u64,
    pub(crate) pss_kb: u64,
    pub(crate) private_kb: u64,
    pub(crate) threads: u64,
    pub(crate) processes: u64,
}

pub(crate) fn field_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Memory and threads of `pid` and its descendants.
pub(crate) fn tree_mem(pid: u32) -> Mem {
    let mut total = Mem::default();
    for p in process_tree(pid) {
        let (Ok(rollup), Ok(status)) = (
            fs::read_to_string(format!("/proc/{p}/smaps_rollup")),
            fs::read_to_string(format!("/proc/{p}/status")),
        ) else {
            continue;
        };
        total.rss_kb += field_kb(&rollup, "Rss:");
        total.pss_kb += field_kb(&rollup, "Pss:");
        total.private_kb +=
            field_kb(&rollup, "Private_Clean:") + field_kb(&rollup, "Private_Dirty:");
        total.threads += field_kb(&status, "Threads:");
        total.processes += 1;
    }
    total
}
