//! The command line's side of the control socket: `rproxy ls`, `add`, `rm`. Every step has a
//! deadline, so a daemon that is stuck, or a socket nobody serves, gets a message instead of
//! a terminal that hangs.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use super::{read_reply, send_request, socket_path, Reply, Request, Row};
use crate::mapping::{describe, parse_publish};
use crate::output::print;
use crate::settings::options::{Options, Overrides};

/// How long the daemon may take to accept, and then to answer. Generous: an `add` with
/// kernel NAT waits for netlink; a daemon that takes longer is stuck.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Connects within [`TIMEOUT`]; errors are worded for the person at the terminal.
pub fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, String> {
    let connect = || -> io::Result<UnixStream> {
        let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
        socket.connect_timeout(&SockAddr::unix(path)?, timeout)?;
        let stream = UnixStream::from(std::os::fd::OwnedFd::from(socket));
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    };
    connect().map_err(|e| {
        let why = describe(&e);
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
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "the rproxy daemon at {} is not accepting connections ({why}); is it stuck?",
                path.display()
            ),
            _ => format!("cannot reach {}: {why}", path.display()),
        }
    })
}

/// Runs one request and returns the daemon's reply (its refusals as Err). A daemon handing
/// its sockets to a new process answers changes with `moved`: they are asked again (of the
/// new process, once it serves) until `timeout`.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match call_once(path, request, timeout)? {
            Reply::Moved { pid } if std::time::Instant::now() < deadline => {
                tracing::debug!("the daemon is handing over to pid {pid}; asking again");
                std::thread::sleep(Duration::from_millis(50));
            }
            Reply::Moved { pid } => {
                return Err(format!(
                    "the rproxy daemon at {} was still handing over to pid {pid} after {} s",
                    path.display(),
                    timeout.as_secs()
                ))
            }
            reply => return Ok(reply),
        }
    }
}

/// The spec of an `add` or `rm`, read as the daemon will read it (with the options given
/// over the defaults): a spec that cannot be a mapping anywhere is the caller's mistake, said
/// with the spec quoted.
fn check_spec(request: &Request) -> Result<(), String> {
    let (spec, options) = match request {
        Request::Add { spec, options } => (spec, options.clone()),
        Request::Rm { spec } => (spec, Overrides::default()),
        _ => return Ok(()),
    };
    options
        .apply(&Options::default())
        .and_then(|options| parse_publish(spec, options))
        .map(|_| ())
        .map_err(|why| format!("invalid spec {spec:?}: {why}"))
}

fn call_once(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, String> {
    let stream = connect(path, timeout)?;
    send_request(&stream, request, None)
        .map_err(|e| format!("cannot send to the daemon: {}", describe(&e)))?;
    match read_reply(&stream) {
        Ok(Reply::Error { message }) => Err(message.to_string()),
        Ok(reply) => Ok(reply),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!(
                "the rproxy daemon at {} did not answer within {} s; is it stuck?",
                path.display(),
                timeout.as_secs()
            ))
        }
        Err(e) => Err(format!("cannot read the daemon's reply: {}", describe(&e))),
    }
}

/// `rproxy ls` / `add` / `rm`: prints the answer (`ls` rows as a JSON array when `json`); exit
/// 1 with the daemon's reason on failure, 2 when the spec itself is bad (a usage error, found
/// before any daemon is asked).
pub fn main(request: Request, control_socket: Option<PathBuf>, json: bool) -> i32 {
    if let Err(why) = check_spec(&request) {
        eprintln!("rproxy: {why}");
        return 2;
    }
    let path = socket_path(control_socket);
    let verb = match &request {
        Request::Add { .. } => "added",
        Request::Rm { .. } => "removed",
        _ => "",
    };
    match call(&path, &request, TIMEOUT) {
        Ok(Reply::Mappings { rows }) if json => match serde_json::to_string(&rows) {
            Ok(text) => {
                print(&format!("{text}\n"));
                0
            }
            Err(e) => {
                eprintln!("rproxy: cannot write the rows as JSON: {e}");
                1
            }
        },
        Ok(Reply::Mappings { rows }) => {
            print(&format_table(&rows));
            0
        }
        Ok(Reply::Done { mappings, .. }) => {
            let mut text = format!("{verb} {}\n", mappings.len());
            for m in mappings {
                text.push_str(&format!("  {m}\n"));
            }
            print(&text);
            0
        }
        Ok(other) => {
            eprintln!("rproxy: unexpected answer from the daemon: {other:?}");
            1
        }
        Err(e) => {
            eprintln!("rproxy: {e}");
            1
        }
    }
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
        "SOCKET",
        "SOCKET_CONNS",
        "PROXY_PROTOCOL",
        "PID",
        "CONTAINER",
        "ALLOW",
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
            r.socket.clone(),
            r.socket_connections.to_string(),
            match r.proxy_protocol.as_str() {
                // A daemon of an older build sends none.
                "" => "-".into(),
                v => v.into(),
            },
            r.pid.to_string(),
            match r.container.as_str() {
                "" => "-".into(),
                name => name.into(),
            },
            allow_cell(r.allow.as_deref()),
        ]);
    }
    columns(&table)
}

/// A mapping's allow-list as `ls` shows it: `-` for everyone, `none` for no one outside
/// the host, else its first networks (`ls --json` has them all).
pub fn allow_cell(allow: Option<&[String]>) -> String {
    const SHOWN: usize = 3;
    match allow {
        None => "-".into(),
        Some([]) => "none".into(),
        Some(nets) if nets.len() <= SHOWN => nets.join(","),
        Some(nets) => format!("{},+{}", nets[..SHOWN].join(","), nets.len() - SHOWN),
    }
}

/// Rows of cells as left-aligned columns two spaces apart, one line each.
pub fn columns(table: &[Vec<String>]) -> String {
    let width = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|c| {
            table
                .iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
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
    fn rows_tabulate() {
        let table = format_table(&[super::super::sample_row()]);
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
                "6",
                "socket",
                "7",
                "v2",
                "8",
                "web",
                "192.0.2.0/24"
            ]
        );
    }
}
