//! The control socket: how `rproxy ls/add/rm` and docker-mode shims talk to the daemon.
//!
//! One request per connection over a unix stream socket, and one reply, each a JSON object on
//! one line, typed by [`Request`] and [`Reply`] — the one definition both ends use:
//! - `ls` → the mappings with their counters;
//! - `add` / `rm` a spec → the mappings started or stopped, or why not;
//! - `register` a spec with its listening socket attached (SCM_RIGHTS) → registered, or why
//!   not; the mapping then lives exactly as long as this connection: the shim holds it open
//!   while dockerd keeps the port published, and closing it (the shim exits) removes it;
//! - `takeover` → every listening socket with its mapping, the control socket's own listener
//!   and the shims' connections, for a new daemon that then serves them ([`handover`]).
//!
//! The daemon's side is [`server`], the command line's [`client`]; a shim speaks through
//! [`send_request`] and [`read_reply`].

pub mod client;
pub mod handover;
mod refusal;
pub mod server;

pub use refusal::Refusal;

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::proxy_protocol::Version;
use crate::settings::options::Overrides;

fn is_off(v: &Version) -> bool {
    !v.is_on()
}
use crate::stats::Snapshot;
use crate::supervisor::OriginKind;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/rproxy/rproxy.sock";

/// The socket given (`--control-socket`, else `RPROXY_SOCKET`), else the default.
pub fn socket_path(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 4096;

/// Longest reply line a client reads (`ls` of a daemon with 100,000 mappings fits).
pub const MAX_REPLY: usize = 64 << 20;

/// What a client asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every mapping with its counters.
    Ls {},
    /// Start a spec's mappings (a range is several), all or none.
    Add {
        /// `[HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]`.
        spec: String,
        /// Options over the daemon's defaults.
        #[serde(default)]
        options: Overrides,
    },
    /// Stop a spec's mappings.
    Rm {
        /// As for `Add`; matched by protocol and listen address, checked against the target.
        spec: String,
    },
    /// Serve one port, whose listening socket comes with the request, while this connection
    /// stays open.
    Register {
        /// The port's one-port spec; its listen address must be the socket's.
        spec: String,
        /// Options the shim's environment set, over the daemon's defaults.
        #[serde(default)]
        options: Overrides,
    },
    /// Hand every socket over to the asking process, a new daemon (see [`handover`]).
    Takeover {},
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// `ls`.
    Mappings {
        /// One per mapping.
        rows: Vec<Row>,
    },
    /// `add`, `rm`, `register`: the mappings started or stopped, as one-port specs.
    Done {
        /// The specs.
        mappings: Vec<String>,
        /// `register`: the PROXY protocol header the daemon gives the port (from its
        /// `[[proxy_protocol]]` rules), which the shim keeps if it takes the port back.
        /// Absent when off, so a shim of an older build still reads the reply.
        #[serde(default, skip_serializing_if = "is_off")]
        proxy_protocol: Version,
    },
    /// The request was refused.
    Error {
        /// Why: a sentence for the person at the terminal or `docker run` on the wire.
        message: Refusal,
    },
    /// A change arrived while the daemon hands its sockets over to a new process: ask again
    /// in a moment (the new process answers then).
    Moved {
        /// The process taking over.
        pid: u32,
    },
    /// `takeover`: what is handed over; the descriptors follow (see [`handover`]).
    Handover {
        /// The process handing over.
        pid: u32,
        /// How many descriptors follow, in batches of at most 253.
        fds: usize,
        /// The control socket's listener: its index among the descriptors.
        control: usize,
        /// The metrics endpoint's listener, when there is one.
        #[serde(default)]
        metrics: Option<usize>,
        /// Every mapping.
        mappings: Vec<Handed>,
    },
}

/// One mapping handed over in a takeover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handed {
    /// The mapping as a one-port spec.
    pub spec: String,
    /// Where it came from (`publish`, `config`, `add`, `shim`, `docker`).
    pub origin: OriginKind,
    /// `add`: every option it runs with; `shim`: the options the shim's environment set
    /// (laid over the new daemon's defaults, as a registration would be); otherwise none
    /// (the new daemon's flags and config file decide).
    #[serde(default)]
    pub options: Overrides,
    /// Its listening socket: its index among the descriptors.
    pub socket: usize,
    /// A shim's registration connection: its index among the descriptors.
    #[serde(default)]
    pub conn: Option<usize>,
    /// `docker`: the container whose published port it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl Request {
    /// The request as its wire line.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a request line.
    pub fn decode(line: &[u8]) -> Result<Request, Refusal> {
        serde_json::from_slice(line).map_err(|e| Refusal::BadRequest(e.to_string()))
    }
}

impl Reply {
    /// The reply as its wire line.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a reply line.
    pub fn decode(line: &[u8]) -> Result<Reply, String> {
        serde_json::from_slice(line).map_err(|e| format!("the daemon answered nonsense: {e}"))
    }
}

/// Reads one reply line (blocking, within the stream's read timeout).
pub fn read_reply(mut stream: &UnixStream) -> io::Result<Reply> {
    let mut line = Vec::new();
    let mut buf = [0u8; 8192];
    while !line.contains(&b'\n') {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without answering",
            ));
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_REPLY {
            return Err(io::Error::other("the daemon's reply is too long"));
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    Reply::decode(&line[..end]).map_err(io::Error::other)
}

/// Why a client will not deal with whoever serves the control socket: sockets a shim or a
/// taking-over daemon sends or accepts there must stay between processes of root and of
/// the client's own user (the daemon checks its clients the same way).
#[derive(Debug)]
pub enum UntrustedServer {
    /// The listening process runs as this uid, neither root nor the client's (`own`).
    Uid {
        /// The server's uid.
        uid: u32,
        /// This process's effective uid.
        own: u32,
    },
    /// The server's credentials (SO_PEERCRED) cannot be read.
    Unreadable(io::Error),
}

impl std::fmt::Display for UntrustedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UntrustedServer::Uid { uid, own } => write!(
                f,
                "it is served by uid {uid}, neither root nor this process's uid {own}"
            ),
            UntrustedServer::Unreadable(e) => write!(
                f,
                "its server's credentials cannot be read ({})",
                crate::mapping::describe(e)
            ),
        }
    }
}

/// Checks, before anything is sent, that the process listening on the control socket
/// `stream` is connected to (the kernel records its credentials at `listen`) runs as root
/// or as this process's effective uid. A socket path is only a name: anyone who can create
/// it (a writable directory, a stale path after the daemon left) would otherwise be given
/// dockerd's listening sockets.
pub fn check_server(stream: &impl std::os::fd::AsFd) -> Result<(), UntrustedServer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| UntrustedServer::Unreadable(e.into()))?;
    let own = nix::unistd::geteuid().as_raw();
    match cred.uid() {
        0 => Ok(()),
        uid if uid == own => Ok(()),
        uid => Err(UntrustedServer::Uid { uid, own }),
    }
}

/// Sends one request, with `fd` attached when given.
pub fn send_request(
    stream: &UnixStream,
    request: &Request,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let data = format!("{}\n", request.encode());
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

/// One row of `ls`, as sent over the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The mapping as a one-port spec.
    pub spec: String,
    /// Where it came from (`publish`, `config`, `add`, `shim`).
    pub origin: String,
    /// `serving` or `stopped`.
    pub state: String,
    /// Its userland counters.
    pub stats: Snapshot,
    /// The NAT path: `-` (off), `kernel`, `dockerd` or `userland`.
    pub nat: String,
    /// Connections the kernel rules translated (the userland counters never see them).
    pub kernel_connections: u64,
    /// The host clients' path: `-` (off), `socket` or `userland`.
    #[serde(default)]
    pub socket: String,
    /// Connections the socket hooks sent straight to the target.
    #[serde(default)]
    pub socket_connections: u64,
    /// The PROXY protocol header its backend connections start with: `-` (off), `v1`, `v2`.
    #[serde(default)]
    pub proxy_protocol: String,
    /// The process serving it (after a takeover, the new daemon).
    #[serde(default)]
    pub pid: u32,
    /// `docker`: the container whose published port it is; empty otherwise.
    #[serde(default)]
    pub container: String,
    /// Whether it has a listening socket of its own (dockerd's ports served by the kernel
    /// paths alone have none).
    #[serde(default = "yes")]
    pub listener: bool,
    /// Who may reach it from outside the host (absent: everyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Clients its allow-list refused: connections and datagrams at the listener, packets
    /// in the kernel.
    #[serde(default)]
    pub denied: u64,
}

fn yes() -> bool {
    true
}

/// A row with a distinct value in every field, for tests.
#[cfg(test)]
pub(crate) fn sample_row() -> Row {
    Row {
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
        socket: "socket".into(),
        socket_connections: 7,
        proxy_protocol: "v2".into(),
        pid: 8,
        container: "web".into(),
        listener: false,
        allow: Some(vec!["192.0.2.0/24".into()]),
        denied: 9,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let requests = [
            Request::Ls {},
            Request::Add {
                spec: "8080:10.0.0.2:80".into(),
                options: Overrides {
                    nat: Some(crate::settings::options::Mode::Require),
                    ..Overrides::default()
                },
            },
            Request::Rm {
                spec: "8080:10.0.0.2:80".into(),
            },
            Request::Register {
                spec: "[::]:8080:10.0.0.2:80/udp".into(),
                options: Overrides::default(),
            },
            Request::Takeover {},
        ];
        for r in requests {
            assert_eq!(Request::decode(r.encode().as_bytes()), Ok(r));
        }
        let replies = [
            Reply::Mappings {
                rows: vec![sample_row()],
            },
            Reply::Moved { pid: 7 },
            Reply::Error {
                message: Refusal::HandingOver,
            },
            Reply::Error {
                message: Refusal::Other("no mapping matches \"8080\"".into()),
            },
            Reply::Handover {
                pid: 7,
                fds: 3,
                control: 0,
                metrics: None,
                mappings: vec![Handed {
                    spec: "127.0.0.1:8080:10.0.0.2:80/tcp".into(),
                    origin: OriginKind::Shim,
                    options: Overrides {
                        nat: Some(crate::settings::options::Mode::On),
                        ..Overrides::default()
                    },
                    socket: 1,
                    container: None,
                    conn: Some(2),
                }],
            },
        ];
        for reply in replies {
            assert_eq!(Reply::decode(reply.encode().as_bytes()), Ok(reply));
        }
    }

    /// Origins on the wire are spelled as daemons of earlier versions spell them, both ways;
    /// one a later version adds is read as unknown (left to the daemon that has it).
    #[test]
    fn handed_origins_keep_their_spelling() {
        for (word, kind) in [
            ("publish", OriginKind::Publish),
            ("config", OriginKind::Config),
            ("add", OriginKind::Control),
            ("shim", OriginKind::Shim),
            ("docker", OriginKind::Docker),
        ] {
            let line =
                format!(r#"{{"spec":"127.0.0.1:1:10.0.0.2:1/tcp","origin":"{word}","socket":1}}"#);
            let handed: Handed = serde_json::from_str(&line).unwrap();
            assert_eq!(handed.origin, kind, "{line}");
            let again = serde_json::to_string(&handed).unwrap();
            assert!(again.contains(&format!(r#""origin":"{word}""#)), "{again}");
        }
        let later = r#"{"spec":"127.0.0.1:1:10.0.0.2:1/tcp","origin":"mesh","socket":1}"#;
        let handed: Handed = serde_json::from_str(later).unwrap();
        assert_eq!(handed.origin, OriginKind::Unknown);
    }

    #[test]
    fn unknown_fields_and_requests_are_refused() {
        for bad in [
            r#"{"request":"ls","extra":1}"#,
            r#"{"request":"format_disk"}"#,
            r#"{"request":"add"}"#,
            r#"{"request":"add","spec":"1:1.2.3.4:1","options":{"nat":"sometimes"}}"#,
            r#"{"request":"add","spec":"1:1.2.3.4:1","options":{"bogus":1}}"#,
            r#"{"request":"add","spec":"1:1.2.3.4:1","options":{"proxy_protocol":"v3"}}"#,
            "ls",
            "",
        ] {
            assert!(Request::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    use proptest::prelude::*;

    const GOOD: &[&str] = &[
        r#"{"request":"ls"}"#,
        r#"{"request":"add","spec":"8080:10.0.0.2:80","options":{"nat":"on","connect_timeout_ms":500,"proxy_protocol":"v2"}}"#,
        r#"{"request":"rm","spec":"8080:10.0.0.2:80"}"#,
        r#"{"request":"register","spec":"127.0.0.1:8080:10.0.0.2:80/udp","options":{"udp_max_flows":10}}"#,
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any bytes: a request or a reason, never a panic.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }

        /// Good requests with bytes changed, inserted or cut, and the options they carry
        /// applied: a request or a reason, never a panic.
        #[test]
        fn mutated_requests_decode_or_are_refused(
            which in 0usize..4,
            edits in crate::testing::edits(200)
        ) {
            let bytes = crate::testing::mutate(GOOD[which], &edits);
            if let Ok(Request::Add { options, .. } | Request::Register { options, .. }) = Request::decode(&bytes) {
                let _ = options.apply(&crate::settings::options::Options::default());
            }
        }
    }
}
