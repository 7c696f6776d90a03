//! dockerd's Engine API, over its unix socket: the few reads the socket hooks' hairpin rule
//! needs (which containers share a bridge network, whether that network lets its containers
//! talk to each other, and each container's network namespace), the running containers with
//! their published ports and addresses (what `--docker-ports` serves), and the event streams
//! that say when to read them again.
//!
//! HTTP/1.0 on purpose: dockerd (Go's net/http) then answers without chunking and closes the
//! connection at the end of the body, so a response is "headers, then bytes to EOF" and the
//! event stream is JSON lines — no HTTP library needed for four GETs.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::mapping::Proto;
use crate::settings::goflags;

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

/// A running container as the container list shows it: what its published ports need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Its ID.
    pub id: String,
    /// Its name, without the leading slash.
    pub name: String,
    /// Its published ports (exposed but unpublished ports are left out).
    pub ports: Vec<Published>,
    /// Its networks, with its addresses on each.
    pub networks: Vec<Attachment>,
    /// Its labels (`rproxy.allow…` say who may reach its ports).
    pub labels: BTreeMap<String, String>,
}

/// One published port of one host address, as dockerd lists it (`-p 8080:80` is one for
/// 0.0.0.0 and, with IPv6 on the container's network, one for `::`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// TCP or UDP (SCTP ports are left out: rproxy does not carry SCTP).
    pub proto: Proto,
    /// The host address (0.0.0.0 when dockerd names none).
    pub host_ip: IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The container's port.
    pub container_port: u16,
}

/// A container's place on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The network's name.
    pub network: String,
    /// Its IPv4 address there.
    pub ipv4: Option<Ipv4Addr>,
    /// Its global IPv6 address there.
    pub ipv6: Option<Ipv6Addr>,
    /// Which network gives the container its default route (and so carries its published
    /// ports) when it has several: the highest wins (dockerd 28 and later; 0 before).
    pub gw_priority: i64,
}

/// What a container event says happened, for the published ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A container started: read it.
    Started(String),
    /// A container died or was removed: its ports are gone.
    Gone(String),
    /// A container was renamed, or joined or left a network: read it again.
    Changed(String),
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
                .is_none_or(|v| goflags::parse_bool(v) == Some(true));
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
        self.subscribe(r#"/events?filters={"type":["network"]}"#, poll)
    }

    /// The events that change what a container publishes (start, die, destroy, rename; a
    /// container joining or leaving a network), a JSON line each ([`Event::parse`]), with
    /// `poll` as the read timeout.
    pub fn container_events(&self, poll: Duration) -> io::Result<BufReader<UnixStream>> {
        self.subscribe(
            r#"/events?filters={"type":["container","network"],"event":["start","die","destroy","rename","connect","disconnect"]}"#,
            poll,
        )
    }

    fn subscribe(&self, path: &str, poll: Duration) -> io::Result<BufReader<UnixStream>> {
        let (stream, status) = self.request(path, Some(poll))?;
        check(status, "/events")?;
        Ok(stream)
    }

    /// The running containers (one request, whatever their number), or the one with ID `id`
    /// (none when it is not running).
    pub fn containers(&self, id: Option<&str>) -> io::Result<Vec<Container>> {
        let path = match id {
            None => "/containers/json".to_string(),
            // An ID filter matches prefixes too: only the exact one is kept below.
            Some(id) => format!(r#"/containers/json?filters={{"id":[{}]}}"#, quoted(id)),
        };
        let list: Vec<ContainerListJson> = self.get(&path)?;
        Ok(list
            .into_iter()
            .filter(|c| id.is_none_or(|id| c.id == id))
            .map(ContainerListJson::into_container)
            .collect())
    }

    /// The process ID of dockerd, the peer of its API socket (SO_PEERCRED).
    pub fn pid(&self) -> io::Result<u32> {
        let stream = UnixStream::connect(&self.socket)?;
        let cred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(io::Error::from)?;
        u32::try_from(cred.pid()).map_err(|_| io::Error::other("dockerd's pid is not a pid"))
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

/// `s` as a JSON string.
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
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

impl Event {
    /// One line of [`Engine::container_events`], with when dockerd says it happened; None
    /// for a line that is not such an event (or that this daemon does not act on).
    pub fn parse(line: &[u8]) -> Option<(Event, Option<SystemTime>)> {
        let e: EventJson = serde_json::from_slice(line).ok()?;
        let event = match (e.kind.as_str(), e.action.as_str()) {
            ("container", "start") => Event::Started(e.actor.id),
            ("container", "die" | "destroy") => Event::Gone(e.actor.id),
            ("container", "rename") => Event::Changed(e.actor.id),
            ("network", "connect" | "disconnect") => {
                Event::Changed(e.actor.attributes.get("container")?.clone())
            }
            _ => return None,
        };
        let at = u64::try_from(e.time_nano)
            .ok()
            .filter(|&n| n > 0)
            .and_then(|n| UNIX_EPOCH.checked_add(Duration::from_nanos(n)));
        Some((event, at))
    }
}

#[derive(Deserialize)]
struct EventJson {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(rename = "Actor")]
    actor: ActorJson,
    #[serde(rename = "timeNano", default)]
    time_nano: i64,
}

#[derive(Deserialize)]
struct ActorJson {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Attributes", default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ContainerListJson {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Vec<String>,
    #[serde(rename = "Ports", default)]
    ports: Vec<PortJson>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "NetworkSettings", default)]
    settings: ListSettingsJson,
}

#[derive(Deserialize, Default)]
struct ListSettingsJson {
    #[serde(rename = "Networks", default)]
    networks: BTreeMap<String, AttachmentJson>,
}

/// Numbers as dockerd writes them, checked here rather than by serde: one odd port must not
/// make the whole list unreadable.
#[derive(Deserialize)]
struct PortJson {
    #[serde(rename = "IP", default)]
    ip: String,
    #[serde(rename = "PrivatePort", default)]
    private: u64,
    #[serde(rename = "PublicPort", default)]
    public: u64,
    #[serde(rename = "Type", default)]
    kind: String,
}

#[derive(Deserialize)]
struct AttachmentJson {
    #[serde(rename = "IPAddress", default)]
    ipv4: String,
    #[serde(rename = "GlobalIPv6Address", default)]
    ipv6: String,
    #[serde(rename = "GwPriority", default)]
    gw_priority: i64,
}

impl ContainerListJson {
    fn into_container(self) -> Container {
        let ports = self.ports.iter().filter_map(PortJson::published).collect();
        let networks = self
            .settings
            .networks
            .into_iter()
            .map(|(network, a)| Attachment {
                network,
                ipv4: a.ipv4.parse().ok(),
                ipv6: a.ipv6.parse().ok(),
                gw_priority: a.gw_priority,
            })
            .collect();
        let name = self.names.first().map_or("", |n| n.trim_start_matches('/'));
        Container {
            name: name.to_string(),
            id: self.id,
            ports,
            networks,
            labels: self.labels.unwrap_or_default(),
        }
    }
}

impl PortJson {
    /// The port, when it is published (a host port) over TCP or UDP.
    fn published(&self) -> Option<Published> {
        let proto = match self.kind.as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return None,
        };
        let host_ip = match self.ip.as_str() {
            "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ip => ip.parse().ok()?,
        };
        Some(Published {
            proto,
            host_ip,
            host_port: u16::try_from(self.public).ok().filter(|&p| p != 0)?,
            container_port: u16::try_from(self.private).ok().filter(|&p| p != 0)?,
        })
    }
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

    /// A container as dockerd 20.10 lists it (trimmed), with an IPv6 binding, an exposed
    /// port nobody published, an SCTP port and a port number no TCP port can have.
    #[test]
    fn the_container_list_gives_published_ports_and_addresses() {
        let json = r#"[{"Id":"4f27","Names":["/web"],"State":"running",
            "Ports":[{"IP":"0.0.0.0","PrivatePort":80,"PublicPort":18600,"Type":"tcp"},
                     {"IP":"::","PrivatePort":80,"PublicPort":18600,"Type":"tcp"},
                     {"PrivatePort":443,"Type":"tcp"},
                     {"IP":"0.0.0.0","PrivatePort":9,"PublicPort":9,"Type":"sctp"},
                     {"IP":"0.0.0.0","PrivatePort":53,"PublicPort":70000,"Type":"udp"}],
            "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.2",
                "GlobalIPv6Address":"fd00::2","NetworkID":"38c7"}}}}]"#;
        let list: Vec<ContainerListJson> = serde_json::from_str(json).unwrap();
        let c = list.into_iter().next().unwrap().into_container();
        assert_eq!(c.name, "web");
        let ports: Vec<(IpAddr, u16, u16)> = c
            .ports
            .iter()
            .map(|p| (p.host_ip, p.host_port, p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("0.0.0.0".parse().unwrap(), 18600, 80),
                ("::".parse().unwrap(), 18600, 80)
            ]
        );
        assert_eq!(c.networks[0].ipv4, Some(Ipv4Addr::new(172, 17, 0, 2)));
        assert_eq!(c.networks[0].ipv6, Some("fd00::2".parse().unwrap()));
    }

    #[test]
    fn events_name_the_container() {
        let start = br#"{"Type":"container","Action":"start","Actor":{"ID":"d96c","Attributes":{"name":"web"}}}"#;
        let (event, at) = Event::parse(start).unwrap();
        assert_eq!((event, at), (Event::Started("d96c".into()), None));
        let connect = br#"{"Type":"network","Action":"connect","Actor":{"ID":"4b16","Attributes":{"container":"d96c","name":"v4only"}},"timeNano":1796675552991077389}"#;
        let (event, at) = Event::parse(connect).unwrap();
        assert_eq!(event, Event::Changed("d96c".into()));
        let nanos = at.unwrap().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        assert_eq!(nanos, 1_796_675_552_991_077_389);
        assert_eq!(Event::parse(b"{}"), None);
        assert_eq!(Event::parse(b"not json"), None);
    }

    #[test]
    fn options_are_read_as_go_reads_them() {
        assert_eq!(goflags::parse_bool("false"), Some(false));
        assert_eq!(goflags::parse_bool("1"), Some(true));
        assert_eq!(goflags::parse_bool("yes"), None);
    }
}
