//! The daemon's settings: its flags, its config file (TOML) and its environment, resolved
//! once into the mappings it runs and the defaults later mappings get. Every bad spec or value
//! is reported — with its file and line — before anything binds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::allow::AllowList;
use crate::control;
use crate::engine::{self, Engine};
use crate::mapping::{describe, parse_publish, Mapping};
use crate::proxy_protocol::{self, PortRule, PortRules, Version};
use crate::settings::env::Env;
use crate::settings::options::{self, Mode, Options};

/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/rproxy/rproxy.toml";

/// `rproxy daemon`'s flags. Values that need checking (times, addresses, modes) arrive as
/// text and are checked in [`Settings::load`] with the config file and the environment, so
/// `--check` lists every problem at once.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A mapping: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp] (repeatable;
    /// IPv6 addresses in brackets; ranges map one to one).
    #[arg(long = "publish", short = 'p', value_name = "SPEC")]
    publish: Vec<String>,
    /// Who may reach the --publish mappings from outside the host: a CIDR or an address
    /// (repeatable; default everyone). Processes of the host itself always may.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<String>,
    /// TOML config file with `publish = [...]` (default /etc/rproxy/rproxy.toml if present);
    /// re-read on SIGHUP.
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    config: Option<PathBuf>,
    /// Control socket path (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock).
    #[arg(long, value_name = "PATH", value_hint = clap::ValueHint::FilePath)]
    control_socket: Option<PathBuf>,
    /// Seconds (0 to 86400) open connections may take to finish when their mapping is removed
    /// or the daemon stops [default: 10].
    #[arg(long, value_name = "SECS")]
    drain_timeout: Option<String>,
    /// Kernel fast path: install nftables DNAT rules for each mapping (loopback and hairpin
    /// clients stay on the userland listener). `--nat` or `--nat=on` falls back to userland
    /// with a warning when the kernel path is unavailable; `--nat=require` fails instead.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", require_equals = true)]
    nat: Option<String>,
    /// Socket-level fast path: cgroup socket hooks send loopback and host clients of each
    /// mapping straight to its target (the listener serves the rest). `--socket-lb` or
    /// `--socket-lb=on` falls back to the listener with a warning when the kernel cannot
    /// have them; `--socket-lb=require` fails instead.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", require_equals = true)]
    socket_lb: Option<String>,
    /// dockerd's API socket, from which the socket hooks learn which containers share a
    /// network with icc on, to send their hairpin clients straight to the target (default:
    /// $DOCKER_HOST, else unix:///var/run/docker.sock; "" for none: containers then reach
    /// published ports through the listeners).
    #[arg(long, value_name = "HOST")]
    docker_host: Option<String>,
    /// Serve the published ports of dockerd's containers, read from its API (see
    /// --docker-host), when dockerd runs without a userland proxy ("userland-proxy": false):
    /// the socket hooks carry host clients (127.0.0.1, [::1], host addresses) and hairpin
    /// clients, dockerd's DNAT remote ones, with no process per port. Turns the socket hooks
    /// on as --socket-lb=on does, unless --socket-lb or the config file says otherwise.
    #[arg(long)]
    docker_ports: bool,
    /// Log lines as text or as JSON objects (default: $RPROXY_LOG_FORMAT, else text).
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (default: $RPROXY_METRICS_ADDR,
    /// else none).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// One series set per port: by default a published range (contiguous ports to one
    /// target) is one set, summed, so a 1,000-port range costs what one port does.
    #[arg(long)]
    metrics_per_port: bool,
    /// Take over from the daemon running on the control socket: receive every listening
    /// socket (and each shim's registration), serve them, then let it drain its connections
    /// and exit. No daemon there: start as usual. (SIGHUP after an upgrade, and SIGUSR2, make
    /// a running daemon start its successor this way.)
    #[arg(long)]
    takeover: bool,
}

/// One key of the config file, as rproxy.toml(5) describes it.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Its name.
    pub name: &'static str,
    /// The value it takes.
    pub value: &'static str,
    /// What it does.
    pub meaning: &'static str,
}

/// The config file's top-level keys (a test holds this list to what the parser accepts).
pub const KEYS: &[Key] = &[
    Key {
        name: "publish",
        value: "array of strings",
        meaning: "Mappings the daemon serves, one spec each (see SPECS).",
    },
    Key {
        name: "mapping",
        value: "array of tables",
        meaning: "Mappings with options of their own: each [[mapping]] table has the keys \
                  listed under MAPPING TABLES.",
    },
    Key {
        name: "control_socket",
        value: "path",
        meaning: "Where the control socket listens. --control-socket wins; without either, \
                  $RPROXY_SOCKET, else /run/rproxy/rproxy.sock.",
    },
    Key {
        name: "drain_timeout",
        value: "seconds",
        meaning: "0 to 86400 (default 10): how long open connections of a removed mapping, or \
                  of a stopping daemon, may take to finish. --drain-timeout wins.",
    },
    Key {
        name: "nat",
        value: "\"off\" | \"on\" | \"require\"",
        meaning: "Kernel DNAT for every mapping without a mode of its own: on falls back to \
                  the userland listener when the kernel path is unavailable, require fails \
                  instead. --nat wins; without either, $RPROXY_NAT, else off.",
    },
    Key {
        name: "socket_lb",
        value: "\"off\" | \"on\" | \"require\"",
        meaning: "Socket hooks for host clients of every mapping without a mode of its own, \
                  as nat. --socket-lb wins; without either, $RPROXY_SOCKET_LB, else off.",
    },
    Key {
        name: "metrics_addr",
        value: "\"HOST:PORT\"",
        meaning: "Serve Prometheus metrics at http://HOST:PORT/metrics. --metrics-addr wins; \
                  without either, $RPROXY_METRICS_ADDR, else none.",
    },
    Key {
        name: "metrics_per_port",
        value: "boolean",
        meaning: "One series set per port (default false: a published range, contiguous \
                  ports sent to one target, is one set, its counters summed). \
                  --metrics-per-port wins.",
    },
    Key {
        name: "docker_host",
        value: "\"unix:///PATH\"",
        meaning: "dockerd's API socket, from which the socket hooks learn which containers \
                  share a bridge network with icc on, to send their hairpin clients straight \
                  to the target. --docker-host wins; without either, $DOCKER_HOST, else \
                  unix:///var/run/docker.sock; \"\" turns this off.",
    },
    Key {
        name: "docker_ports",
        value: "boolean",
        meaning: "Serve the published ports of dockerd's running containers, read from its \
                  API (docker_host), with no process per port: for dockerd run with \
                  \"userland-proxy\": false. Turns the socket hooks on (as socket_lb = \"on\") \
                  unless socket_lb, --socket-lb or $RPROXY_SOCKET_LB says otherwise. \
                  --docker-ports wins.",
    },
    Key {
        name: "docker_allow",
        value: "array of strings",
        meaning: "Who may reach dockerd's published ports from outside the host (CIDRs or \
                  addresses) unless a container's rproxy.allow labels say otherwise; absent: \
                  everyone. An empty list closes them to every remote client; the host's own \
                  processes always get through.",
    },
    Key {
        name: "proxy_protocol",
        value: "array of tables",
        meaning: "PROXY protocol headers for TCP ports docker-mode processes hand over, by \
                  host port: each [[proxy_protocol]] table has ports = \"8000-8100\" (or one \
                  port) and version = \"v1\" | \"v2\"; ranges must not overlap.",
    },
];

/// The keys of a `[[mapping]]` table.
pub const MAPPING_KEYS: &[Key] = &[
    Key {
        name: "publish",
        value: "string",
        meaning: "One spec (a range is one spec); required.",
    },
    Key {
        name: "nat",
        value: "\"off\" | \"on\" | \"require\"",
        meaning: "This mapping's kernel DNAT mode, over the file's and the command line's.",
    },
    Key {
        name: "socket_lb",
        value: "\"off\" | \"on\" | \"require\"",
        meaning: "This mapping's socket-hook mode, over the file's and the command line's.",
    },
    Key {
        name: "allow",
        value: "array of strings",
        meaning: "Who may reach it from outside the host: CIDRs or addresses (absent: \
                  everyone; [] no one). Enforced by the listener, the kernel (ahead of any \
                  DNAT) and the socket hooks; the host's own processes always get through.",
    },
    Key {
        name: "proxy_protocol",
        value: "\"off\" | \"v1\" | \"v2\"",
        meaning: "Start each backend connection with a PROXY protocol header carrying the \
                  client's address (TCP only; default off). The mapping is then served by its \
                  listener only (no kernel path would carry the header).",
    },
];

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
    /// One series set per port instead of per published range (`--metrics-per-port` wins).
    metrics_per_port: Option<bool>,
    /// dockerd's API socket (`--docker-host` wins).
    docker_host: Option<String>,
    /// Serve dockerd's published ports (`--docker-ports` wins).
    docker_ports: Option<bool>,
    /// Who may reach dockerd's ports unless their container's labels say otherwise.
    docker_allow: Option<toml::Spanned<Vec<String>>>,
    /// The PROXY protocol for TCP ports dockerd hands over, by host port:
    /// `[[proxy_protocol]] ports = "8000-8100" version = "v2"`.
    #[serde(default)]
    proxy_protocol: Vec<PortRuleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingEntry {
    publish: toml::Spanned<String>,
    nat: Option<toml::Spanned<String>>,
    socket_lb: Option<toml::Spanned<String>>,
    /// `"v1"`, `"v2"` or `"off"` (the default).
    proxy_protocol: Option<toml::Spanned<String>>,
    /// Its allow-list.
    allow: Option<toml::Spanned<Vec<String>>>,
}

/// One `[[proxy_protocol]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortRuleEntry {
    /// `"8080"`, `8080` or `"8000-8100"`.
    ports: toml::Spanned<Ports>,
    version: toml::Spanned<String>,
}

/// A port as a number or text, or a range as text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ports {
    Number(i64),
    Text(String),
}

/// The kernel-path modes given on the command line, which win over the file's defaults, and
/// what decides the socket hooks' default.
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    nat: Option<Mode>,
    socket_lb: Option<Mode>,
    /// `--docker-ports`.
    docker_ports: bool,
    /// The environment set no socket-hook mode (RPROXY_SOCKET_LB).
    socket_lb_unset: bool,
}

impl Flags {
    /// The environment's options `base`, with the socket hooks on when dockerd's ports are
    /// served (`docker_ports`, by flag or file) and the environment did not choose.
    fn base(self, base: Options, docker_ports: bool) -> Options {
        match docker_ports && self.socket_lb_unset {
            true => Options {
                socket_lb: Mode::On,
                ..base
            },
            false => base,
        }
    }

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
    /// Series per port rather than per published range.
    pub metrics_per_port: bool,
    /// dockerd's API, for the socket hooks' hairpin rule and `docker_ports`.
    pub engine: Option<Engine>,
    /// Serve the published ports of dockerd's containers.
    pub docker_ports: bool,
    /// Who may reach dockerd's ports unless their container's labels say otherwise (None:
    /// everyone).
    pub docker_allow: Option<Arc<AllowList>>,
    /// `--takeover`: start from the running daemon's sockets.
    pub takeover: bool,
    /// The config file's `[[proxy_protocol]]` rules for ports shims hand over.
    pub port_rules: PortRules,
}

/// What a reload reads: the config file's mappings and its rules for handed-over ports.
pub struct Reread {
    /// The mappings, resolved as at start-up.
    pub mappings: Vec<Mapping>,
    /// The `[[proxy_protocol]]` rules.
    pub port_rules: PortRules,
}

impl Settings {
    /// Resolves flags, config file and environment; every problem is reported at once.
    pub fn load(args: &Args, env: &Env) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        let base = match env.overrides.apply(&Options::default()) {
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
            nat: flag(&mut errors, "nat", &args.nat, str::parse),
            socket_lb: flag(&mut errors, "socket-lb", &args.socket_lb, str::parse),
            docker_ports: args.docker_ports,
            socket_lb_unset: env.overrides.socket_lb.is_none(),
        };
        let drain_flag = flag(&mut errors, "drain-timeout", &args.drain_timeout, |v| {
            options::DRAIN_TIMEOUT.parse(v)
        });
        let metrics_flag = flag(&mut errors, "metrics-addr", &args.metrics_addr, |v| {
            v.parse::<SocketAddr>()
                .map_err(|_| "must be HOST:PORT (e.g. 127.0.0.1:9464)".to_string())
        });
        let file = match &config_path {
            Some(path) => read(path, base.clone(), flags).unwrap_or_else(|mut e| {
                errors.append(&mut e);
                Loaded::default()
            }),
            None => Loaded::default(),
        };
        let config = file.mappings;
        let port_rules = file.port_rules;
        let docker_ports = args.docker_ports || file.docker_ports.unwrap_or(false);
        let defaults = file
            .defaults
            .unwrap_or(flags.over(flags.base(base.clone(), docker_ports)));
        let mut publish = Vec::new();
        let mut own = defaults.clone();
        if !args.allow.is_empty() {
            match AllowList::parse(&args.allow) {
                Ok(list) => own.allow = Some(Arc::new(list)),
                Err(e) => errors.push(format!("--allow {e}")),
            }
        }
        for spec in &args.publish {
            match parse_publish(spec, own.clone()) {
                Ok(m) => publish.extend(m),
                Err(e) => errors.push(format!("--publish {spec:?}: {e}")),
            }
        }
        let drain = drain_flag.or(file.drain).unwrap_or(Duration::from_secs(10));
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
        if docker_ports && engine.is_none() {
            errors.push(format!(
                "docker_ports needs dockerd's API, but {from} turns it off ({docker_host:?})"
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Settings {
            engine,
            docker_ports,
            docker_allow: file.docker_allow,
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
            defaults: defaults.clone(),
            base,
            flags,
            metrics_addr: metrics_flag.or(file.metrics_addr).or(env.metrics_addr),
            metrics_per_port: args.metrics_per_port || file.metrics_per_port.unwrap_or(false),
            port_rules,
            takeover: args.takeover,
        })
    }

    /// The options of dockerd's ports (shims' registrations, `--docker-ports`): the defaults,
    /// with `docker_allow` when it is set.
    pub fn dockerd_defaults(&self) -> Options {
        let mut options = self.defaults.clone();
        if self.docker_allow.is_some() {
            options.allow = self.docker_allow.clone();
        }
        options
    }

    /// Reads the config file again (SIGHUP): its mappings, resolved as at start-up, and its
    /// rules for handed-over ports.
    pub fn reread(&self) -> Result<Reread, Vec<String>> {
        match &self.config_path {
            Some(path) => read(path, self.base.clone(), self.flags).map(|l| Reread {
                mappings: l.mappings,
                port_rules: l.port_rules,
            }),
            None => Ok(Reread {
                mappings: Vec::new(),
                port_rules: PortRules::default(),
            }),
        }
    }
}

/// A flag's value checked by `parse`; a bad one is added to `errors`, named.
fn flag<T>(
    errors: &mut Vec<String>,
    name: &str,
    value: &Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Option<T> {
    let v = value.as_deref()?;
    parse(v)
        .map_err(|e| errors.push(format!("--{name} {v:?}: {e}")))
        .ok()
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
    metrics_per_port: Option<bool>,
    docker_host: Option<String>,
    docker_ports: Option<bool>,
    docker_allow: Option<Arc<AllowList>>,
    port_rules: PortRules,
}

/// Reads a config file over `base` (the environment's options); errors name the file and line.
fn read(path: &Path, base: Options, flags: Flags) -> Result<Loaded, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: {}", path.display(), describe(&e))])?;
    parse(&text, path, base, flags)
}

/// A config file's text, resolved as [`read`] does: its TOML, its defaults, its mappings with
/// their own options, its rules for handed-over ports and its drain time. Every problem is
/// reported, each with its line.
fn parse(text: &str, path: &Path, base: Options, flags: Flags) -> Result<Loaded, Vec<String>> {
    let at = Lines { text, path };
    let file = at.toml()?;
    let mut problems = Problems::default();
    let base = flags.base(base, flags.docker_ports || file.docker_ports == Some(true));
    let defaults = flags.over(file_defaults(&file, base, &at, &mut problems.modes));
    let (own_versions, rules) = versions(&file, &at, &mut problems.proxy_protocol);
    let mut entries: Vec<(&toml::Spanned<String>, Options)> = file
        .publish
        .iter()
        .map(|spec| (spec, defaults.clone()))
        .collect();
    entries.extend(mapping_tables(
        &file,
        &defaults,
        own_versions,
        &at,
        &mut problems,
    ));
    let docker_allow = allow_list(&file.docker_allow, "docker_", &at, &mut problems.allow);
    let port_rules = port_rules(&rules, &mut |offset, e| {
        problems
            .proxy_protocol
            .push(at.say(offset, format!("proxy_protocol: {e}")))
    });
    let mappings = resolve(entries, &at, &mut problems.publish);
    let drain = drain_timeout(&file, &at, &mut problems.drain);
    problems.into_result()?;
    Ok(Loaded {
        mappings,
        defaults: Some(defaults),
        drain,
        control_socket: file.control_socket,
        metrics_addr: file.metrics_addr,
        metrics_per_port: file.metrics_per_port,
        docker_host: file.docker_host,
        docker_ports: file.docker_ports,
        docker_allow,
        port_rules,
    })
}

/// A config file's text and name, to say where a problem is.
struct Lines<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Lines<'_> {
    /// `message` as reported: `FILE:LINE: message`, the line the one holding `offset`.
    fn say(&self, offset: usize, message: impl std::fmt::Display) -> String {
        let line = self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1;
        format!("{}:{line}: {message}", self.path.display())
    }

    /// The file as TOML, or its one syntax error.
    fn toml(&self) -> Result<ConfigFile, Vec<String>> {
        toml::from_str(self.text).map_err(|e| match e.span() {
            Some(span) => vec![self.say(span.start, e.message())],
            None => vec![format!("{}: {}", self.path.display(), e.message())],
        })
    }
}

/// A file's problems by kind, reported in this order.
#[derive(Default)]
struct Problems {
    /// `nat` and `socket_lb` values, the file's then its mapping tables'.
    modes: Vec<String>,
    /// Allow-lists: the mapping tables', then `docker_allow`.
    allow: Vec<String>,
    /// PROXY protocol versions (the mapping tables', the rules') and the rules' ports.
    proxy_protocol: Vec<String>,
    /// Specs that are no mapping.
    publish: Vec<String>,
    /// `drain_timeout`.
    drain: Vec<String>,
}

impl Problems {
    fn into_result(self) -> Result<(), Vec<String>> {
        let all: Vec<String> = [
            self.modes,
            self.allow,
            self.proxy_protocol,
            self.publish,
            self.drain,
        ]
        .concat();
        match all.is_empty() {
            true => Ok(()),
            false => Err(all),
        }
    }
}

/// A mode the file sets (`default` when it sets none, or one that does not parse).
fn mode(
    value: &Option<toml::Spanned<String>>,
    default: Mode,
    at: &Lines,
    problems: &mut Vec<String>,
) -> Mode {
    match value {
        None => default,
        Some(v) => v.get_ref().parse().unwrap_or_else(|e| {
            problems.push(at.say(v.span().start, e));
            default
        }),
    }
}

/// `base` with the file's own `nat` and `socket_lb`.
fn file_defaults(
    file: &ConfigFile,
    base: Options,
    at: &Lines,
    problems: &mut Vec<String>,
) -> Options {
    Options {
        nat: mode(&file.nat, base.nat, at, problems),
        socket_lb: mode(&file.socket_lb, base.socket_lb, at, problems),
        ..base
    }
}

/// The PROXY protocol version of each mapping table (off when it names none), and each
/// `[[proxy_protocol]]` table with its version (those whose version does not parse left out).
fn versions<'f>(
    file: &'f ConfigFile,
    at: &Lines,
    problems: &mut Vec<String>,
) -> (Vec<Version>, Vec<(&'f PortRuleEntry, Version)>) {
    let mut version = |value: &toml::Spanned<String>| {
        value
            .get_ref()
            .parse::<Version>()
            .map_err(|e| problems.push(at.say(value.span().start, e)))
    };
    let own = file
        .mapping
        .iter()
        .map(|e| match &e.proxy_protocol {
            None => Version::Off,
            Some(v) => version(v).unwrap_or_default(),
        })
        .collect();
    let rules = file
        .proxy_protocol
        .iter()
        .filter_map(|r| Some((r, version(&r.version).ok()?)))
        .collect();
    (own, rules)
}

/// A `[[mapping]]` table's spec with its options: its own, else `defaults`.
fn mapping_tables<'f>(
    file: &'f ConfigFile,
    defaults: &Options,
    versions: Vec<Version>,
    at: &Lines,
    problems: &mut Problems,
) -> Vec<(&'f toml::Spanned<String>, Options)> {
    let mut entries = Vec::new();
    for (e, proxy_protocol) in file.mapping.iter().zip(versions) {
        let what = format!("publish {:?}: ", e.publish.get_ref());
        let own = Options {
            nat: mode(&e.nat, defaults.nat, at, &mut problems.modes),
            socket_lb: mode(&e.socket_lb, defaults.socket_lb, at, &mut problems.modes),
            proxy_protocol,
            allow: allow_list(&e.allow, &what, at, &mut problems.allow).or(defaults.allow.clone()),
            ..defaults.clone()
        };
        entries.push((&e.publish, own));
    }
    entries
}

/// An allow-list the file gives (None: none, or one with a problem); `what` says whose.
fn allow_list(
    value: &Option<toml::Spanned<Vec<String>>>,
    what: &str,
    at: &Lines,
    problems: &mut Vec<String>,
) -> Option<Arc<AllowList>> {
    let v = value.as_ref()?;
    AllowList::parse(v.get_ref())
        .map(Arc::new)
        .map_err(|e| problems.push(at.say(v.span().start, format!("{what}allow {e}"))))
        .ok()
}

/// The mappings of every spec, each with its options.
fn resolve(
    entries: Vec<(&toml::Spanned<String>, Options)>,
    at: &Lines,
    problems: &mut Vec<String>,
) -> Vec<Mapping> {
    let mut mappings = Vec::new();
    for (spec, options) in entries {
        match parse_publish(spec.get_ref(), options) {
            Ok(m) => mappings.extend(m),
            Err(e) => problems.push(at.say(
                spec.span().start,
                format!("publish {:?}: {e}", spec.get_ref()),
            )),
        }
    }
    mappings
}

/// `drain_timeout`, checked.
fn drain_timeout(file: &ConfigFile, at: &Lines, problems: &mut Vec<String>) -> Option<Duration> {
    let d = file.drain_timeout.as_ref()?;
    options::DRAIN_TIMEOUT
        .check(*d.get_ref())
        .map_err(|e| problems.push(at.say(d.span().start, format!("drain_timeout: {e}"))))
        .ok()
}

/// The `[[proxy_protocol]]` tables as rules; each problem goes to `error` with its offset in
/// the file. Overlapping ranges are refused: which one wins would be a guess.
fn port_rules(
    entries: &[(&PortRuleEntry, Version)],
    error: &mut dyn FnMut(usize, String),
) -> PortRules {
    let mut rules: Vec<PortRule> = Vec::new();
    for (entry, version) in entries {
        let at = entry.ports.span().start;
        if !version.is_on() {
            error(
                entry.version.span().start,
                "version must be \"v1\" or \"v2\" (ports without a table get none)".into(),
            );
            continue;
        }
        let parsed = match entry.ports.get_ref() {
            Ports::Number(n) => u16::try_from(*n)
                .ok()
                .filter(|&p| p != 0)
                .map(|p| (p, p))
                .ok_or_else(|| format!("invalid port {n} (must be 1-65535)")),
            Ports::Text(t) => proxy_protocol::parse_ports(t),
        };
        let (first, last) = match parsed {
            Ok(r) => r,
            Err(e) => {
                error(at, format!("ports: {e}"));
                continue;
            }
        };
        if let Some(other) = rules.iter().find(|r| first <= r.last && r.first <= last) {
            error(
                at,
                format!(
                    "ports {first}-{last} overlap ports {}-{} of an earlier table",
                    other.first, other.last
                ),
            );
            continue;
        }
        rules.push(PortRule {
            first,
            last,
            version: *version,
        });
    }
    PortRules::new(rules)
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

    #[test]
    fn proxy_protocol_per_mapping_and_per_handed_over_port() {
        let l = load(
            r#"
publish = ["8080:10.0.0.2:80"]

[[mapping]]
publish = "8443:10.0.0.5:443"
proxy_protocol = "v2"

[[proxy_protocol]]
ports = "8000-8100"
version = "v1"

[[proxy_protocol]]
ports = 9000
version = "v2"
"#,
        )
        .unwrap();
        assert_eq!(l.mappings[0].options.proxy_protocol, Version::Off);
        assert_eq!(l.mappings[1].options.proxy_protocol, Version::V2);
        assert_eq!(l.port_rules.version_for(8050), Version::V1);
        assert_eq!(l.port_rules.version_for(9000), Version::V2);
        assert_eq!(l.port_rules.version_for(9001), Version::Off);
    }

    #[test]
    fn bad_proxy_protocol_settings_name_their_line() {
        for (text, line, why) in [
            (
                "[[mapping]]\npublish = \"1:10.0.0.2:1\"\nproxy_protocol = \"v3\"\n",
                3,
                "v1, v2 or off",
            ),
            (
                "[[mapping]]\npublish = \"1:10.0.0.2:1/udp\"\nproxy_protocol = \"v1\"\n",
                2,
                "TCP only",
            ),
            (
                "[[proxy_protocol]]\nports = \"9-3\"\nversion = \"v1\"\n",
                2,
                "ends before it starts",
            ),
            (
                "[[proxy_protocol]]\nports = 70000\nversion = \"v1\"\n",
                2,
                "must be 1-65535",
            ),
            (
                "[[proxy_protocol]]\nports = \"80\"\nversion = \"off\"\n",
                3,
                "must be \"v1\" or \"v2\"",
            ),
            (
                "[[proxy_protocol]]\nports = \"80-90\"\nversion = \"v1\"\n\
                 [[proxy_protocol]]\nports = \"85\"\nversion = \"v2\"\n",
                5,
                "overlap ports 80-90",
            ),
        ] {
            let errors = load(text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            let want = format!("rproxy.toml:{line}:");
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(&want) && e.contains(why)),
                "{text}: {errors:?} lacks {want}…{why}"
            );
        }
    }

    /// The keys the parser expects, as its refusal of an unknown one lists them.
    fn accepted_keys(text: &str) -> Vec<String> {
        let errors = load(text).err().unwrap_or_default();
        let message = errors.join(" ");
        let expected = message.split("expected").nth(1).unwrap_or_default();
        let mut keys: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    /// rproxy.toml(5) describes every key the parser takes, and no other.
    #[test]
    fn every_key_is_described() {
        let names = |keys: &[Key]| {
            let mut v: Vec<String> = keys.iter().map(|k| k.name.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(accepted_keys("no_such_key = 1\n"), names(KEYS));
        assert_eq!(
            accepted_keys("[[mapping]]\npublish = \"1:10.0.0.1:1\"\nno_such_key = 1\n"),
            names(MAPPING_KEYS)
        );
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
