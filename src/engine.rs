//! dockerd's Engine API, over its unix socket: the few reads the socket hooks' hairpin rule
//! needs (which containers share a bridge network, whether that network lets its containers
//! talk to each other, and each container's network namespace), and its event stream, to
//! read them again when containers come and go.
//!
//! HTTP/1.0 on purpose: dockerd (Go's net/http) then answers without chunking and closes the
//! connection at the end of the body, so a response is "headers, then bytes to EOF" and the
//! event stream is JSON lines — no HTTP library needed for four GETs.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where dockerd listens when nothing says otherwise.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A response body larger than this is refused (a network inspect is a few KB per container).
const MAX_BODY: u64 = 64 << 20;

/// dockerd's API socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    socket: PathBuf,
}

/// A bridge network of dockerd's, as the hairpin rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// dockerd's network ID.
    pub id: String,
    /// Whether its containers may talk to each other (`com.docker.network.bridge.enable_icc`,
    /// dockerd's `--icc` for the default bridge; absent means yes, a value Go would not parse
    /// means no).
    pub icc: bool,
    /// Its running containers.
    pub members: Vec<Member>,
}

/// A container on a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its ID.
    pub container: String,
    /// Its addresses on the network.
    pub addrs: Vec<IpAddr>,
}

impl Engine {
    /// The engine at `host`: `unix:///path` or a path; TCP hosts are refused (the API would
    /// then need TLS, and dockerd on the same host always has its socket).
    pub fn new(host: &str) -> Result<Engine, String> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        if path.is_empty() || host.contains("://") && !host.starts_with("unix://") {
            return Err(format!(
                "docker host {host:?}: only a unix socket (unix:///path) is supported"
            ));
        }
        Ok(Engine {
            socket: PathBuf::from(path),
        })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every bridge network with its running members (one request for the list, then one per network).
    pub fn networks(&self) -> io::Result<Vec<Network>> {
        let list: Vec<NetworkJson> = self.get(r#"/networks?filters={"driver":["bridge"]}"#)?;
        let mut out = Vec::new();
        for n in list {
            // The list carries no members: each network is asked for its own.
            let n: NetworkJson = match self.get(&format!("/networks/{}", n.id)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let icc = n
                .options
                .get("com.docker.network.bridge.enable_icc")
                .is_none_or(|v| go_bool(v) == Some(true));
            let mut members = Vec::new();
            for (container, ep) in &n.containers {
                let addrs: Vec<IpAddr> = [&ep.ipv4, &ep.ipv6]
                    .into_iter()
                    .filter_map(|a| a.split('/').next()?.parse().ok())
                    .collect();
                // Endpoints without a container ("ep-…": load balancers) have no sandbox.
                if addrs.is_empty() || container.starts_with("ep-") {
                    continue;
                }
                members.push(Member {
                    container: container.clone(),
                    addrs,
                });
            }
            out.push(Network {
                id: n.id,
                icc,
                members,
            });
        }
        Ok(out)
    }

    /// The network namespace of `container` (`NetworkSettings.SandboxKey`, a file under
    /// dockerd's exec root); None for a container that is gone or has none.
    pub fn sandbox(&self, container: &str) -> io::Result<Option<PathBuf>> {
        match self.get::<ContainerJson>(&format!("/containers/{container}/json")) {
            Ok(c) if !c.settings.sandbox_key.is_empty() => {
                Ok(Some(PathBuf::from(c.settings.sandbox_key)))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// dockerd's network events (a container joining or leaving one, a network created or
    /// removed): a reader that yields a line per event, with `poll` as its read timeout so
    /// the caller can look up between events.
    pub fn events(&self, poll: Duration) -> io::Result<BufReader<UnixStream>> {
        let (stream, status) =
            self.request(r#"/events?filters={"type":["network"]}"#, Some(poll))?;
        check(status, "/events")?;
        Ok(stream)
    }

    /// GET `path`, its JSON body decoded.
    fn get<T: for<'de> Deserialize<'de>>(&self, path: &str) -> io::Result<T> {
        let (stream, status) = self.request(path, None)?;
        check(status, path)?;
        let mut body = Vec::new();
        stream.take(MAX_BODY + 1).read_to_end(&mut body)?;
        if body.len() as u64 > MAX_BODY {
            return Err(io::Error::other(format!(
                "{path}: answer over {MAX_BODY} bytes"
            )));
        }
        serde_json::from_slice(&body).map_err(|e| io::Error::other(format!("{path}: {e}")))
    }

    /// Sends GET `path` and reads the status line and headers; the reader is left at the
    /// body. `read_timeout`: how long each later read may wait (default [`TIMEOUT`]).
    fn request(
        &self,
        path: &str,
        read_timeout: Option<Duration>,
    ) -> io::Result<(BufReader<UnixStream>, u16)> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        write!(
            stream,
            "GET {} HTTP/1.0\r\nHost: docker\r\nUser-Agent: rproxy\r\n\r\n",
            escape(path)
        )?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| io::Error::other(format!("{path}: not an HTTP answer: {line:?}")))?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        reader
            .get_ref()
            .set_read_timeout(read_timeout.or(Some(TIMEOUT)))?;
        Ok((reader, status))
    }
}

/// A status other than 2xx as an error (404 as NotFound: a container or network that went
/// away between two reads).
fn check(status: u16, path: &str) -> io::Result<()> {
    match status {
        200..=299 => Ok(()),
        404 => Err(io::Error::new(io::ErrorKind::NotFound, path.to_string())),
        s => Err(io::Error::other(format!("{path}: dockerd answered {s}"))),
    }
}

/// Percent-escapes what a request line cannot carry (the filters' JSON).
fn escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'a'..=b'z'
            | b'A'..=b'Z'
            | b'0'..=b'9'
            | b'/'
            | b'?'
            | b'='
            | b'&'
            | b'-'
            | b'_'
            | b'.'
            | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Go's strconv.ParseBool, which dockerd uses for network options.
fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[derive(Deserialize)]
struct NetworkJson {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Options", default)]
    options: BTreeMap<String, String>,
    #[serde(rename = "Containers", default)]
    containers: BTreeMap<String, EndpointJson>,
}

#[derive(Deserialize)]
struct EndpointJson {
    #[serde(rename = "IPv4Address", default)]
    ipv4: String,
    #[serde(rename = "IPv6Address", default)]
    ipv6: String,
}

#[derive(Deserialize)]
struct ContainerJson {
    #[serde(rename = "NetworkSettings")]
    settings: SettingsJson,
}

#[derive(Deserialize)]
struct SettingsJson {
    #[serde(rename = "SandboxKey", default)]
    sandbox_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_unix_sockets() {
        assert_eq!(
            Engine::new("unix:///run/d.sock").unwrap().socket(),
            Path::new("/run/d.sock")
        );
        assert_eq!(
            Engine::new("/run/d.sock").unwrap().socket(),
            Path::new("/run/d.sock")
        );
        assert!(Engine::new("tcp://127.0.0.1:2375").is_err());
        assert!(Engine::new("unix://").is_err());
        assert!(Engine::new("").is_err());
    }

    #[test]
    fn filters_are_escaped() {
        assert_eq!(
            escape(r#"/events?filters={"type":["network"]}"#),
            "/events?filters=%7B%22type%22%3A%5B%22network%22%5D%7D"
        );
    }

    #[test]
    fn options_are_read_as_go_reads_them() {
        assert_eq!(go_bool("false"), Some(false));
        assert_eq!(go_bool("1"), Some(true));
        assert_eq!(go_bool("yes"), None);
    }
}
