//! The control socket: how `rproxy ls/add/rm` and docker-mode shims talk to the daemon.
//!
//! A line protocol over a unix stream socket, one request per connection:
//! - `ls` → one tab-separated row per mapping, then `end`;
//! - `add SPEC` / `rm SPEC` → `ok …` or `error REASON`;
//! - `register SPEC` with the listening socket attached (SCM_RIGHTS) → `ok SPEC` or
//!   `error REASON`; the mapping then lives exactly as long as this connection: the shim
//!   holds it open while dockerd keeps the port published, and closing it (the shim exits)
//!   removes the mapping.
//!
//! Both ends live here so the wire format is defined once.

use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::stats::Snapshot;
use crate::sys;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/rproxy/rproxy.sock";

/// The socket given (`--control-socket`, else `RPROXY_SOCKET`), else the default.
pub fn socket_path(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 4096;

/// Sends one request line, with `fd` attached when given.
pub fn send_request(stream: &UnixStream, line: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let data = format!("{line}\n");
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| ControlMessage::ScmRights(r))
        .into_iter()
        .collect();
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(data.as_bytes())],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent != data.len() {
        // The fd went with the first bytes; the rest is plain data.
        (&*stream).write_all(&data.as_bytes()[sent..])?;
    }
    Ok(())
}

/// Reads what is available of a request and any descriptors sent with it (non-blocking:
/// WouldBlock when nothing is there). Returns (bytes read, received fds); 0 bytes is EOF.
pub fn recv_request(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for r in raw {
                // Freshly received: nothing else in the process knows these numbers.
                fds.push(sys::adopt_fd(r)?);
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// One row of `ls`, as sent over the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub spec: String,
    pub origin: String,
    pub state: String,
    pub stats: Snapshot,
    /// The NAT path: `-` (off), `kernel`, `dockerd` or `userland`.
    pub nat: String,
    /// Connections the kernel rules translated (the userland counters never see them).
    pub kernel_connections: u64,
}

impl Row {
    pub fn encode(&self) -> String {
        let s = &self.stats;
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.spec,
            self.origin,
            self.state,
            s.active,
            s.total,
            s.failed,
            s.bytes_in,
            s.bytes_out,
            self.nat,
            self.kernel_connections
        )
    }

    pub fn decode(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split('\t').collect();
        let [spec, origin, state, active, total, failed, bytes_in, bytes_out, nat, kernel] =
            f.as_slice()
        else {
            return None;
        };
        Some(Row {
            spec: spec.to_string(),
            origin: origin.to_string(),
            state: state.to_string(),
            stats: Snapshot {
                active: active.parse().ok()?,
                total: total.parse().ok()?,
                failed: failed.parse().ok()?,
                bytes_in: bytes_in.parse().ok()?,
                bytes_out: bytes_out.parse().ok()?,
            },
            nat: nat.to_string(),
            kernel_connections: kernel.parse().ok()?,
        })
    }
}

/// Why a client request failed, worded for the person at the terminal.
pub fn connect(path: &std::path::Path) -> Result<UnixStream, String> {
    UnixStream::connect(path).map_err(|e| {
        let why = crate::mapping::describe(&e);
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                format!(
                    "no rproxy daemon at {} ({why}); start one with `rproxy daemon`",
                    path.display()
                )
            }
            io::ErrorKind::PermissionDenied => {
                format!(
                    "cannot reach {} ({why}): the control socket is for root and the daemon's user",
                    path.display()
                )
            }
            _ => format!("cannot reach {}: {why}", path.display()),
        }
    })
}

/// Runs one request from the command line and returns the reply lines (up to `end` or EOF).
pub fn call(path: &std::path::Path, line: &str) -> Result<Vec<String>, String> {
    let stream = connect(path)?;
    send_request(&stream, line, None).map_err(|e| {
        format!(
            "cannot send to the daemon: {}",
            crate::mapping::describe(&e)
        )
    })?;
    let mut lines = Vec::new();
    for l in BufReader::new(&stream).lines() {
        let l = l.map_err(|e| {
            format!(
                "cannot read the daemon's reply: {}",
                crate::mapping::describe(&e)
            )
        })?;
        if l == "end" {
            break;
        }
        if let Some(reason) = l.strip_prefix("error ") {
            return Err(reason.to_string());
        }
        lines.push(l);
    }
    Ok(lines)
}

/// `rproxy ls`: the daemon's mappings as a table.
pub fn format_table(rows: &[Row]) -> String {
    let header = [
        "PROTO",
        "LISTEN",
        "TARGET",
        "ORIGIN",
        "STATE",
        "ACTIVE",
        "TOTAL",
        "FAILED",
        "BYTES_IN",
        "BYTES_OUT",
        "NAT",
        "KERNEL_CONNS",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let (addrs, proto) = r.spec.rsplit_once('/').unwrap_or((&r.spec, "?"));
        let (listen, target) = split_spec(addrs);
        let s = &r.stats;
        table.push(vec![
            proto.into(),
            listen,
            target,
            r.origin.clone(),
            r.state.clone(),
            s.active.to_string(),
            s.total.to_string(),
            s.failed.to_string(),
            s.bytes_in.to_string(),
            s.bytes_out.to_string(),
            r.nat.clone(),
            r.kernel_connections.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// "127.0.0.1:8080:10.0.0.2:80" → ("127.0.0.1:8080", "10.0.0.2:80"): the listen part ends at
/// the second ':' outside brackets.
fn split_spec(s: &str) -> (String, String) {
    let mut depth = 0;
    let mut colons = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ':' if depth == 0 => {
                colons += 1;
                if colons == 2 {
                    return (s[..i].to_string(), s[i + 1..].to_string());
                }
            }
            _ => {}
        }
    }
    (s.to_string(), String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_tabulate() {
        let row = Row {
            spec: "[::]:8080:10.0.0.2:80/tcp".into(),
            origin: "shim".into(),
            state: "serving".into(),
            stats: Snapshot {
                active: 1,
                total: 2,
                failed: 3,
                bytes_in: 4,
                bytes_out: 5,
            },
            nat: "kernel".into(),
            kernel_connections: 6,
        };
        assert_eq!(Row::decode(&row.encode()), Some(row.clone()));
        let table = format_table(&[row]);
        let line = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "tcp",
                "[::]:8080",
                "10.0.0.2:80",
                "shim",
                "serving",
                "1",
                "2",
                "3",
                "4",
                "5",
                "kernel",
                "6"
            ]
        );
    }
}
