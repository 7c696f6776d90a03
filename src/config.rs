//! The daemon's settings: its flags, its config file (TOML) and its environment, resolved
//! once into the mappings it runs and the defaults later mappings get. Every bad spec or value
//! is reported — with its file and line — before anything binds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::control;
use crate::engine::{self, Engine};
use crate::env::Env;
use crate::mapping::{describe, parse_publish, Mapping};
use crate::options::{self, Mode, Options};

/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/rproxy/rproxy.toml";

/// `rproxy daemon`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A mapping: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp] (repeatable;
    /// IPv6 addresses in brackets; ranges map one to one).
    #[arg(long = "publish", short = 'p', value_name = "SPEC")]
    publish: Vec<String>,
    /// TOML config file with `publish = [...]` (default /etc/rproxy/rproxy.toml if present);
    /// re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket path (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Seconds (0 to 86400) open connections may take to finish when their mapping is removed
    /// or the daemon stops [default: 10].
    #[arg(long, value_name = "SECS", value_parser = |s: &str| options::DRAIN_TIMEOUT.parse(s))]
    drain_timeout: Option<Duration>,
    /// Kernel fast path: install nftables DNAT rules for each mapping (loopback and hairpin
    /// clients stay on the userland listener). `--nat` or `--nat=on` falls back to userland
    /// with a warning when the kernel path is unavailable; `--nat=require` fails instead.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", require_equals = true)]
    nat: Option<Mode>,
    /// Socket-level fast path: cgroup socket hooks send loopback and host clients of each
    /// mapping straight to its target (the listener serves the rest). `--socket-lb` or
    /// `--socket-lb=on` falls back to the listener with a warning when the kernel cannot
    /// have them; `--socket-lb=require` fails instead.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", require_equals = true)]
    socket_lb: Option<Mode>,
    /// dockerd's API socket, from which the socket hooks learn which containers share a
    /// network with icc on, to send their hairpin clients straight to the target (default:
    /// $DOCKER_HOST, else unix:///var/run/docker.sock; "" for none: containers then reach
    /// published ports through the listeners).
    #[arg(long, value_name = "HOST")]
    docker_host: Option<String>,
    /// Log lines as text or as JSON objects (default: $RPROXY_LOG_FORMAT, else text).
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (default: $RPROXY_METRICS_ADDR,
    /// else none).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<SocketAddr>,
    /// Take over from the daemon running on the control socket: receive every listening
    /// socket (and each shim's registration), serve them, then let it drain its connections
    /// and exit. No daemon there: start as usual. (SIGHUP after an upgrade, and SIGUSR2, make
    /// a running daemon start its successor this way.)
    #[arg(long)]
    takeover: bool,
}

/// The config file. Unknown keys are errors: a typo must not silently drop a mapping.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    publish: Vec<toml::Spanned<String>>,
    /// Mappings with their own options: `[[mapping]] publish = "…" nat = "require"`.
    #[serde(default)]
    mapping: Vec<MappingEntry>,
    control_socket: Option<PathBuf>,
    drain_timeout: Option<toml::Spanned<f64>>,
    /// The NAT mode of every mapping without its own (`--nat` wins).
    nat: Option<toml::Spanned<String>>,
    /// The socket-hook mode of every mapping without its own (`--socket-lb` wins).
    socket_lb: Option<toml::Spanned<String>>,
    /// Where to serve Prometheus metrics (`--metrics-addr` wins).
    metrics_addr: Option<SocketAddr>,
    /// dockerd's API socket (`--docker-host` wins).
    docker_host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingEntry {
    publish: toml::Spanned<String>,
    nat: Option<toml::Spanned<String>>,
    socket_lb: Option<toml::Spanned<String>>,
}

/// The kernel-path modes given on the command line, which win over the file's defaults.
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    nat: Option<Mode>,
    socket_lb: Option<Mode>,
}

impl Flags {
    /// `base` with the modes given here.
    fn over(self, base: Options) -> Options {
        Options {
            nat: self.nat.unwrap_or(base.nat),
            socket_lb: self.socket_lb.unwrap_or(base.socket_lb),
            ..base
        }
    }
}

/// What the daemon runs: the union of `--publish` and the config file, and how.
pub struct Settings {
    /// `--publish` mappings (kept across reloads).
    pub publish: Vec<Mapping>,
    /// The config file's mappings (replaced by each reload).
    pub config: Vec<Mapping>,
    /// The file reloads read, if any.
    pub config_path: Option<PathBuf>,
    /// Where the control socket listens.
    pub control_socket: PathBuf,
    /// How long connections of a stopped mapping may take to finish.
    pub drain: Duration,
    /// The options of mappings that name none (`rproxy add`, shims): the environment's, with
    /// the modes of the command line, else of the file.
    pub defaults: Options,
    /// The environment's options: what a reload lays the file over.
    base: Options,
    flags: Flags,
    /// Where to serve /metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// dockerd's API, for the socket hooks' hairpin rule.
    pub engine: Option<Engine>,
    /// `--takeover`: start from the running daemon's sockets.
    pub takeover: bool,
}

impl Settings {
    /// Resolves flags, config file and environment; every problem is reported at once.
    pub fn load(args: &Args, env: &Env) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        let base = match env.overrides.apply(Options::default()) {
            Ok(o) => o,
            Err(e) => {
                errors.push(e);
                Options::default()
            }
        };
        let config_path = args.config.clone().or_else(|| {
            Path::new(DEFAULT_CONFIG)
                .exists()
                .then(|| PathBuf::from(DEFAULT_CONFIG))
        });
        let flags = Flags {
            nat: args.nat,
            socket_lb: args.socket_lb,
        };
        let file = match &config_path {
            Some(path) => read(path, base, flags).unwrap_or_else(|mut e| {
                errors.append(&mut e);
                Loaded::default()
            }),
            None => Loaded::default(),
        };
        let config = file.mappings;
        let defaults = file.defaults.unwrap_or(flags.over(base));
        let mut publish = Vec::new();
        for spec in &args.publish {
            match parse_publish(spec, defaults) {
                Ok(m) => publish.extend(m),
                Err(e) => errors.push(format!("--publish {spec:?}: {e}")),
            }
        }
        let drain = args
            .drain_timeout
            .or(file.drain)
            .unwrap_or(Duration::from_secs(10));
        let mut seen = BTreeSet::new();
        for m in publish.iter().chain(&config) {
            if m.listen.port() != 0 && !seen.insert((m.proto, m.listen)) {
                errors.push(format!("{} {} is mapped twice", m.proto, m.listen));
            }
        }
        let (docker_host, from) = [
            (args.docker_host.clone(), "--docker-host"),
            (file.docker_host, "docker_host in the config file"),
            (env.docker_host.clone(), "DOCKER_HOST"),
        ]
        .into_iter()
        .find_map(|(host, from)| Some((host?, from)))
        .unwrap_or_else(|| (engine::DEFAULT_HOST.to_string(), "the default"));
        let engine = match docker_host.as_str() {
            "" => None,
            host => Engine::new(host)
                .map_err(|e| {
                    errors.push(format!(
                        "{from}: {e} (--docker-host \"\" turns the hairpin rule off)"
                    ))
                })
                .ok(),
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Settings {
            engine,
            publish,
            config,
            config_path,
            control_socket: control::socket_path(
                args.control_socket
                    .clone()
                    .or(file.control_socket)
                    .or(env.socket.clone()),
            ),
            drain,
            defaults,
            base,
            flags,
            metrics_addr: args.metrics_addr.or(file.metrics_addr).or(env.metrics_addr),
            takeover: args.takeover,
        })
    }

    /// Reads the config file again (SIGHUP): its mappings, resolved as at start-up.
    pub fn reread(&self) -> Result<Vec<Mapping>, Vec<String>> {
        match &self.config_path {
            Some(path) => read(path, self.base, self.flags).map(|l| l.mappings),
            None => Ok(Vec::new()),
        }
    }
}

/// A config file, resolved.
#[derive(Default)]
struct Loaded {
    /// Its mappings, each with its options: its own modes, else the command line's, else the
    /// file's.
    mappings: Vec<Mapping>,
    /// The defaults it sets (None: a file that could not be read).
    defaults: Option<Options>,
    drain: Option<Duration>,
    control_socket: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    docker_host: Option<String>,
}

/// Reads a config file over `base` (the environment's options); errors name the file and line.
fn read(path: &Path, base: Options, flags: Flags) -> Result<Loaded, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: {}", path.display(), describe(&e))])?;
    parse(&text, path, base, flags)
}

/// A config file's text, resolved as [`read`] does.
fn parse(text: &str, path: &Path, base: Options, flags: Flags) -> Result<Loaded, Vec<String>> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!(":{}", line_of(s.start)))
            .unwrap_or_default();
        vec![format!("{}{line}: {}", path.display(), e.message())]
    })?;
    let mut errors = Vec::new();
    let mut mode = |value: &Option<toml::Spanned<String>>, default: Mode| match value {
        None => default,
        Some(v) => v.get_ref().parse().unwrap_or_else(|e| {
            errors.push(format!(
                "{}:{}: {e}",
                path.display(),
                line_of(v.span().start)
            ));
            default
        }),
    };
    let file_defaults = Options {
        nat: mode(&file.nat, base.nat),
        socket_lb: mode(&file.socket_lb, base.socket_lb),
        ..base
    };
    let defaults = flags.over(file_defaults);
    let mut entries: Vec<(&toml::Spanned<String>, Options)> =
        file.publish.iter().map(|spec| (spec, defaults)).collect();
    for e in &file.mapping {
        let own = Options {
            nat: mode(&e.nat, defaults.nat),
            socket_lb: mode(&e.socket_lb, defaults.socket_lb),
            ..defaults
        };
        entries.push((&e.publish, own));
    }
    let mut mappings = Vec::new();
    for (spec, options) in entries {
        match parse_publish(spec.get_ref(), options) {
            Ok(m) => mappings.extend(m),
            Err(e) => errors.push(format!(
                "{}:{}: publish {:?}: {e}",
                path.display(),
                line_of(spec.span().start),
                spec.get_ref()
            )),
        }
    }
    let drain = file.drain_timeout.as_ref().and_then(|d| {
        options::DRAIN_TIMEOUT
            .check(*d.get_ref())
            .map_err(|e| {
                errors.push(format!(
                    "{}:{}: drain_timeout: {e}",
                    path.display(),
                    line_of(d.span().start)
                ))
            })
            .ok()
    });
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Loaded {
        mappings,
        defaults: Some(defaults),
        drain,
        control_socket: file.control_socket,
        metrics_addr: file.metrics_addr,
        docker_host: file.docker_host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"
publish = ["8080:10.0.0.2:80", "127.0.0.1:5300-5309:10.0.0.3:5300-5309/udp"]
drain_timeout = 2.5
nat = "on"
metrics_addr = "127.0.0.1:9464"

[[mapping]]
publish = "[::]:9000:10.0.0.4:90"
nat = "require"
"#;

    fn load(text: &str) -> Result<Loaded, Vec<String>> {
        parse(
            text,
            Path::new("rproxy.toml"),
            Options::default(),
            Flags::default(),
        )
    }

    #[test]
    fn a_good_file_resolves() {
        let l = load(GOOD).unwrap();
        assert_eq!(l.mappings.len(), 12);
        assert_eq!(l.drain, Some(Duration::from_millis(2500)));
        assert_eq!(l.defaults.map(|d| d.nat), Some(Mode::On));
        assert_eq!(l.mappings[11].options.nat, Mode::Require);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text: resolved or refused with messages, never a panic.
        #[test]
        fn any_text_is_resolved_or_refused(text in ".{0,300}") {
            if let Err(errors) = load(&text) {
                prop_assert!(!errors.is_empty());
            }
        }

        /// A good file with bytes changed, inserted or cut: the same.
        #[test]
        fn mutated_files_are_resolved_or_refused(
            edits in crate::testing::edits(400)
        ) {
            let bytes = crate::testing::mutate(GOOD, &edits);
            let text = String::from_utf8_lossy(&bytes);
            if let Err(errors) = load(&text) {
                prop_assert!(!errors.is_empty());
            }
        }

        /// Any number of seconds for drain_timeout: taken within range, refused outside.
        #[test]
        fn any_drain_timeout_is_checked(secs in any::<f64>()) {
            let text = format!("drain_timeout = {secs:?}\n");
            match load(&text) {
                Ok(l) => prop_assert!(l.drain.is_some_and(|d| d.as_secs_f64() <= 86_400.0)),
                Err(e) => prop_assert!(e.iter().any(|m| m.contains("drain")) || !secs.is_finite(), "{e:?}"),
            }
        }
    }
}
