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
use crate::options::{self, Mode, Overrides};

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
}

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
        get("RPROXY_UDP_GSO", &mut |v| {
            env.no_gso = !options::parse_bool(v)?;
            Ok(())
        });
        match reader {
            Reader::Docker => get("RPROXY_HANDOFF", &mut |v| {
                env.no_handoff = !options::parse_bool(v)?;
                Ok(())
            }),
            Reader::Daemon => get("RPROXY_METRICS_ADDR", &mut |v| {
                env.metrics_addr = Some(
                    v.parse()
                        .map_err(|_| "must be HOST:PORT (e.g. 127.0.0.1:9464)".to_string())?,
                );
                Ok(())
            }),
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
