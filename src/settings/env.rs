//! The `RPROXY_*` environment: how dockerd's per-port processes get options (dockerd's argv
//! cannot carry any) and where the daemon takes its defaults from.
//!
//! Read once, at start-up, by the mode that uses it. One rule for every variable: a value
//! that does not parse is refused with the variable, the value and what is valid — in docker
//! mode on fd 3, so `docker run` shows it; elsewhere with exit status 2. An operator who set
//! a variable meant something, and silently serving with the default would hide the typo
//! until it mattered. An empty value counts as unset (systemd's `Environment=RPROXY_X=`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::log;
use crate::settings::options::{self, Mode, Overrides};

/// Which mode is reading: each validates only the variables it uses, so a daemon-only
/// setting never breaks a docker-mode port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// A process dockerd spawned for one port (serving it, or handing it to the daemon).
    Docker,
    /// `rproxy daemon`.
    Daemon,
    /// `rproxy ls/add/rm`.
    Client,
}

/// The variables, parsed. Fields of variables the reader does not use keep their defaults.
#[derive(Debug, Default)]
pub struct Env {
    /// Logging: filter, format, file, syslog socket.
    pub log: log::Settings,
    /// `RPROXY_SOCKET`: the daemon's control socket.
    pub socket: Option<PathBuf>,
    /// `RPROXY_HANDOFF=0`: a docker-mode process serves its port itself even if a daemon runs.
    pub no_handoff: bool,
    /// Mapping options: `RPROXY_NAT`, `RPROXY_SOCKET_LB`, `RPROXY_CONNECT_TIMEOUT`, `RPROXY_SPLICE`,
    /// `RPROXY_UDP_TIMEOUT`, `RPROXY_UDP_MAX_FLOWS`.
    pub overrides: Overrides,
    /// `RPROXY_UDP_GSO=0`: never send UDP runs as one segmented message.
    pub no_gso: bool,
    /// `RPROXY_METRICS_ADDR` (daemon): where to serve /metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// `DOCKER_HOST` (daemon), as the docker CLI reads it: dockerd's API, for the hairpin
    /// rule of the socket hooks.
    pub docker_host: Option<String>,
}

/// One variable as the manual and `--help` describe it.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Its name.
    pub name: &'static str,
    /// The modes that read it.
    pub readers: &'static [Reader],
    /// What applies when it is unset or empty.
    pub default: &'static str,
    /// What it does, and the values it takes.
    pub meaning: &'static str,
}

const ALL: &[Reader] = &[Reader::Docker, Reader::Daemon, Reader::Client];
const SERVING: &[Reader] = &[Reader::Docker, Reader::Daemon];

/// Every variable [`Env::read`] asks for, by mode (a test holds the two together), for the man
/// page.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "RPROXY_LOG",
        readers: ALL,
        default: "warn (info on a terminal)",
        meaning: "Log level: error, warn, info, debug, trace or off. The daemon also takes \
                  tracing filter directives (rproxy=debug).",
    },
    Variable {
        name: "RPROXY_LOG_FORMAT",
        readers: ALL,
        default: "text",
        meaning: "text, or json: one JSON object per line (timestamp, level, message). The \
                  daemon's --log-format wins.",
    },
    Variable {
        name: "RPROXY_LOG_FILE",
        readers: ALL,
        default: "none",
        meaning: "Append the log to this file instead of stderr or syslog.",
    },
    Variable {
        name: "RPROXY_SYSLOG_SOCKET",
        readers: ALL,
        default: "/dev/log",
        meaning: "The syslog socket the log goes to when stderr goes nowhere (as under dockerd).",
    },
    Variable {
        name: "RPROXY_SOCKET",
        readers: ALL,
        default: "/run/rproxy/rproxy.sock",
        meaning: "The daemon's control socket: where the daemon listens (unless \
                  --control-socket), where ls/add/rm call it, and where a docker-mode process \
                  looks for a daemon to hand its port to.",
    },
    Variable {
        name: "RPROXY_CONNECT_TIMEOUT",
        readers: SERVING,
        default: "10",
        meaning: "Seconds (0.001 to 3600) to connect to the target before the client is reset.",
    },
    Variable {
        name: "RPROXY_UDP_TIMEOUT",
        readers: SERVING,
        default: "90",
        meaning: "Seconds (0.001 to 86400) of silence in both directions after which a UDP \
                  flow expires.",
    },
    Variable {
        name: "RPROXY_UDP_MAX_FLOWS",
        readers: SERVING,
        default: "65536",
        meaning: "UDP flows per port (1 to 1048576), lowered to fit the open-file limit; past \
                  it the least recently used flow makes room.",
    },
    Variable {
        name: "RPROXY_SPLICE",
        readers: SERVING,
        default: "1",
        meaning: "0 relays TCP by copying through user space instead of splice(2).",
    },
    Variable {
        name: "RPROXY_UDP_GSO",
        readers: SERVING,
        default: "1",
        meaning: "0 sends UDP datagram by datagram instead of as segmented (GSO) runs.",
    },
    Variable {
        name: "RPROXY_NAT",
        readers: SERVING,
        default: "off",
        meaning: "Kernel DNAT beside the listener: on (userland when the kernel path is \
                  unavailable), require (fail instead) or off. The daemon's --nat wins.",
    },
    Variable {
        name: "RPROXY_SOCKET_LB",
        readers: SERVING,
        default: "off",
        meaning: "Socket hooks that connect host clients straight to the target: on, require \
                  or off; the daemon attaches them (a docker-mode process hands the wish over \
                  with its port). The daemon's --socket-lb wins.",
    },
    Variable {
        name: "RPROXY_ALLOW",
        readers: SERVING,
        default: "everyone",
        meaning: "Who may reach the port from outside the host: CIDRs or addresses separated \
                  by commas (192.0.2.0/24,2001:db8::/32). The host's own processes always may. \
                  For dockerd's ports, a container's rproxy.allow labels win.",
    },
    Variable {
        name: "RPROXY_HANDOFF",
        readers: &[Reader::Docker],
        default: "1",
        meaning: "0: a docker-mode process serves its port itself even when a daemon runs.",
    },
    Variable {
        name: "RPROXY_METRICS_ADDR",
        readers: &[Reader::Daemon],
        default: "none",
        meaning: "HOST:PORT where the daemon serves Prometheus metrics (/metrics). Its \
                  --metrics-addr wins.",
    },
    Variable {
        name: "DOCKER_HOST",
        readers: &[Reader::Daemon],
        default: "unix:///var/run/docker.sock",
        meaning: "dockerd's API socket (unix:// only), read as the docker CLI reads it: the \
                  socket hooks learn from it which containers share a network with icc on, \
                  to send their hairpin clients straight to the target. --docker-host and \
                  docker_host win; \"\" there turns this off.",
    },
];

impl Env {
    /// Reads the variables `reader` uses; returns them with one message per bad value.
    pub fn read(reader: Reader) -> (Env, Vec<String>) {
        Env::read_with(reader, &mut |name| std::env::var_os(name))
    }

    /// [`Env::read`] with the values from `lookup` (tests see which variables a mode asks for).
    pub fn read_with(
        reader: Reader,
        lookup: &mut dyn FnMut(&str) -> Option<OsString>,
    ) -> (Env, Vec<String>) {
        let mut env = Env::default();
        let mut problems = Vec::new();
        let mut get = |name: &'static str, parse: &mut dyn FnMut(&str) -> Result<(), String>| {
            if let Err(e) = var(name, lookup(name), parse) {
                problems.push(e);
            }
        };
        let light = reader == Reader::Docker;
        get("RPROXY_LOG", &mut |v| {
            env.log.filter = Some(log::check_filter(v, light)?);
            Ok(())
        });
        get("RPROXY_LOG_FORMAT", &mut |v| {
            env.log.format = Some(v.parse()?);
            Ok(())
        });
        get("RPROXY_LOG_FILE", &mut |v| {
            env.log.file = Some(v.into());
            Ok(())
        });
        get("RPROXY_SYSLOG_SOCKET", &mut |v| {
            env.log.syslog_socket = Some(v.into());
            Ok(())
        });
        get("RPROXY_SOCKET", &mut |v| {
            env.socket = Some(v.into());
            Ok(())
        });
        if reader == Reader::Client {
            return (env, problems);
        }
        let o = &mut env.overrides;
        get("RPROXY_NAT", &mut |v| {
            o.nat = Some(v.parse::<Mode>()?);
            Ok(())
        });
        get("RPROXY_SOCKET_LB", &mut |v| {
            o.socket_lb = Some(v.parse::<Mode>()?);
            Ok(())
        });
        get("RPROXY_CONNECT_TIMEOUT", &mut |v| {
            o.connect_timeout_ms = Some(millis(options::CONNECT_TIMEOUT.parse(v)?));
            Ok(())
        });
        get("RPROXY_SPLICE", &mut |v| {
            o.splice = Some(options::parse_bool(v)?);
            Ok(())
        });
        get("RPROXY_UDP_TIMEOUT", &mut |v| {
            o.udp_timeout_ms = Some(millis(options::UDP_TIMEOUT.parse(v)?));
            Ok(())
        });
        get("RPROXY_UDP_MAX_FLOWS", &mut |v| {
            o.udp_max_flows = Some(options::UDP_MAX_FLOWS.parse(v)? as u64);
            Ok(())
        });
        get("RPROXY_ALLOW", &mut |v| {
            let list = crate::allow::AllowList::parse_joined(v).map_err(|e| e.to_string())?;
            o.allow = Some(list.nets().iter().map(ToString::to_string).collect());
            Ok(())
        });
        get("RPROXY_UDP_GSO", &mut |v| {
            env.no_gso = !options::parse_bool(v)?;
            Ok(())
        });
        match reader {
            Reader::Docker => get("RPROXY_HANDOFF", &mut |v| {
                env.no_handoff = !options::parse_bool(v)?;
                Ok(())
            }),
            Reader::Daemon => {
                get("RPROXY_METRICS_ADDR", &mut |v| {
                    env.metrics_addr = Some(
                        v.parse()
                            .map_err(|_| "must be HOST:PORT (e.g. 127.0.0.1:9464)".to_string())?,
                    );
                    Ok(())
                });
                get("DOCKER_HOST", &mut |v| {
                    env.docker_host = Some(v.to_string());
                    Ok(())
                });
            }
            Reader::Client => {}
        }
        (env, problems)
    }
}

/// Milliseconds of a duration already checked against a range of at most a day.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `parse` on the variable's value when it is set and not empty; the error names the
/// variable and (shortened) value.
fn var(
    name: &str,
    value: Option<OsString>,
    parse: &mut dyn FnMut(&str) -> Result<(), String>,
) -> Result<(), String> {
    let Some(raw) = value.filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let Some(value) = raw.to_str() else {
        return Err(format!("{name}: the value is not valid UTF-8"));
    };
    parse(value).map_err(|why| format!("{name}={}: {why}", shorten(value)))
}

/// A value quoted for a message, cut to a readable length (environments can hold megabytes).
fn shorten(value: &str) -> String {
    const MAX: usize = 40;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((at, _)) => format!("{:?}…", &value[..at]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manual's list is the list each mode reads: a new variable must be described.
    #[test]
    fn every_variable_read_is_described() {
        for reader in [Reader::Docker, Reader::Daemon, Reader::Client] {
            let mut asked = Vec::new();
            Env::read_with(reader, &mut |name| {
                asked.push(name.to_string());
                None
            });
            let described: Vec<&str> = VARIABLES
                .iter()
                .filter(|v| v.readers.contains(&reader))
                .map(|v| v.name)
                .collect();
            asked.sort();
            let mut described_sorted = described.clone();
            described_sorted.sort();
            assert_eq!(asked, described_sorted, "{reader:?}");
        }
    }

    #[test]
    fn bad_values_from_any_source_are_named() {
        let (_, problems) = Env::read_with(Reader::Daemon, &mut |name| {
            (name == "RPROXY_UDP_TIMEOUT").then(|| "soon".into())
        });
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("RPROXY_UDP_TIMEOUT=\"soon\""));
    }

    #[test]
    fn long_values_are_shortened_on_a_char_boundary() {
        let long = "é".repeat(100);
        let s = shorten(&long);
        assert!(s.ends_with('…') && s.chars().count() < 50, "{s}");
        assert_eq!(shorten("abc"), "\"abc\"");
    }
}
