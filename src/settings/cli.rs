//! The command line: rproxy's subcommands (`daemon`, `ls`, `add`, `rm`), parsed by clap, and,
//! for anything that starts with a dash, docker-proxy's Go-style flags, which dockerd passes
//! and [`crate::docker`] parses.
//!
//! One definition here serves parsing, `rproxy --help`, the man page and the shell completions
//! (`packaging/man`, `packaging/completions`: generated from it, and a test fails when they are
//! stale). The help lists both halves, so a person who types `rproxy --help` learns about the
//! subcommands as well as the flags dockerd uses.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::proxy_protocol::Version;
use crate::settings::config;
use crate::settings::options::Mode;

/// rproxy's command line (the subcommand half; see [`DOCKER_FLAGS`] for the other).
#[derive(Debug, Parser)]
#[command(
    name = "rproxy",
    version,
    // The man page's NAME line is SUMMARY; help opens with the longer story.
    about = ABOUT,
    override_usage = USAGE,
    after_help = docker_mode_help(),
    // A leading dash means docker mode, so clap never sees `rproxy -V`: the version is
    // docker-proxy's -version, listed with its flags (`rproxy -h` prints this same help).
    disable_version_flag = true,
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What rproxy is, in one line (the man page's NAME).
pub const SUMMARY: &str =
    "a userland port-forwarding proxy and drop-in replacement for Docker's docker-proxy";

/// What rproxy is, as help and the man page's DESCRIPTION open.
pub const ABOUT: &str = "\
rproxy forwards TCP and UDP ports to other addresses, as Docker's docker-proxy does for \
published container ports, and replaces it: dockerd's userland-proxy-path points at rproxy, \
and each port dockerd publishes runs as `rproxy -proto ... -container-port ...` (docker-proxy \
mode, below).

`rproxy daemon` serves many mappings in one process: its own (--publish, a config file), \
those added at run time (`rproxy add`), and dockerd's ports, which the per-port processes \
hand over to it through its control socket.";

const USAGE: &str = "rproxy <COMMAND> [OPTIONS]
       rproxy [-proto tcp|udp] [-host-ip IP] [-host-port PORT]
              -container-ip IP -container-port PORT [-use-listen-fd]";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve many mappings in one process, with a control socket for `ls`/`add`/`rm` and for
    /// docker-mode processes handing their ports over.
    Daemon {
        /// The daemon's settings.
        #[command(flatten)]
        settings: config::Args,
        /// Check the flags, the config file and the RPROXY_* environment, print the mappings
        /// they make and exit: 0 when all is well, 2 listing every problem. Binds nothing.
        #[arg(long)]
        check: bool,
    },
    /// List the daemon's mappings with their connections and bytes.
    Ls {
        /// The daemon's control socket (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock).
        #[arg(long, value_name = "PATH", value_hint = clap::ValueHint::FilePath)]
        control_socket: Option<PathBuf>,
        /// Print the rows as a JSON array (the fields of the control protocol's rows), for
        /// scripts.
        #[arg(long)]
        json: bool,
    },
    /// Add a mapping to the running daemon: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp].
    Add {
        /// The mapping (IPv6 addresses in brackets; ranges map one to one).
        spec: String,
        /// The daemon's control socket (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock).
        #[arg(long, value_name = "PATH", value_hint = clap::ValueHint::FilePath)]
        control_socket: Option<PathBuf>,
        /// Kernel NAT for this mapping: on (fall back to userland), require, or off (default:
        /// the daemon's --nat).
        #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", require_equals = true)]
        nat: Option<Mode>,
        /// Socket hooks for this mapping's host clients: on (fall back to the listener),
        /// require, or off (default: the daemon's --socket-lb).
        #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", require_equals = true)]
        socket_lb: Option<Mode>,
        /// Start every backend connection with a PROXY protocol header (v1: text, v2: binary)
        /// carrying the client's address; TCP only, off by default. The backend must expect
        /// it (nginx: `listen … proxy_protocol`, HAProxy: `accept-proxy`).
        #[arg(long, value_name = "VERSION")]
        proxy_protocol: Option<Version>,
        /// Who may reach it from outside the host: a CIDR or an address (repeatable; default
        /// everyone). Processes of the host itself always may.
        #[arg(long = "allow", value_name = "CIDR", value_parser = network)]
        allow: Vec<String>,
    },
    /// Remove a mapping from the running daemon (same spec as `add`).
    Rm {
        /// The mapping, as it was added.
        spec: String,
        /// The daemon's control socket (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock).
        #[arg(long, value_name = "PATH", value_hint = clap::ValueHint::FilePath)]
        control_socket: Option<PathBuf>,
    },
}

/// One `--allow` entry, checked where it is typed (a bad one exits 2 with usage).
fn network(entry: &str) -> Result<String, String> {
    crate::allow::AllowList::parse(&[entry])
        .map(|_| entry.to_string())
        .map_err(|e| e.why)
}

/// clap's definition of the command line, for help, the man page and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// What an argv asks for, told from its first argument alone: dockerd's invocations start
/// with a flag and never pay for building the subcommand parser.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// A subcommand (by name): parse argv with [`Cli`].
    Subcommand(String),
    /// docker-proxy's flags: what dockerd runs.
    Docker,
    /// No argument at all: the help, on stderr, exit 2.
    Bare,
    /// A word that is not a subcommand (`rproxy lss`): say so, exit 2. dockerd never passes
    /// a positional argument, so this is always a person's typo.
    Unknown(String),
}

impl Invocation {
    /// Classifies `argv` (with argv[0]).
    pub fn of(argv: &[String]) -> Invocation {
        match argv.get(1) {
            None => Invocation::Bare,
            // Go's flag package takes "-" as a non-flag; as docker mode it fails on fd 3.
            Some(a) if a.starts_with('-') => Invocation::Docker,
            Some(word) if subcommands().iter().any(|s| s == word) => {
                Invocation::Subcommand(word.clone())
            }
            Some(word) => Invocation::Unknown(word.clone()),
        }
    }
}

/// The subcommands' names, `help` included.
pub fn subcommands() -> Vec<String> {
    let cmd = command();
    let mut names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    names.push("help".into());
    names
}

/// The whole help: the subcommands, then docker-proxy mode's flags.
pub fn help() -> String {
    command().render_help().to_string()
}

/// What `rproxy WORD` says when WORD is not a subcommand.
pub fn unknown_subcommand(word: &str) -> String {
    let names = subcommands();
    let near = names
        .iter()
        .map(|n| (distance(word, n), n))
        // Close, and not merely short: "ab" is two edits from "rm" too.
        .filter(|(d, n)| *d <= 2 && *d < word.len().max(n.len()))
        .min();
    let hint = match near {
        Some((_, n)) => format!(" (did you mean `{n}`?)"),
        None => String::new(),
    };
    format!(
        "rproxy: {word:?} is not a subcommand{hint}\n\
         The subcommands are: {}.\n\
         Without one, rproxy takes docker-proxy's flags (-container-ip, -container-port, ...), \
         as dockerd runs it.\n\
         See `rproxy --help` or rproxy(8).\n",
        names.join(", ")
    )
}

/// Edit distance (insertions, deletions, substitutions) between two short words.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// One docker-proxy flag as the help and the man page describe it (docker-proxy's own usage
/// text, which Go-style usage errors print, is terse: "host ip").
#[derive(Debug, Clone, Copy)]
pub struct DockerFlag {
    /// Its names, without dashes (`v` and `version` are one flag).
    pub names: &'static [&'static str],
    /// The value it takes, as help shows it; empty for a boolean.
    pub value: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// docker-proxy's flags (a test holds this list to [`crate::docker::FLAGS`]).
pub const DOCKER_FLAGS: &[DockerFlag] = &[
    DockerFlag {
        names: &["proto"],
        value: "tcp|udp",
        help: "The protocol to forward [default: tcp]. sctp is refused with the reason.",
    },
    DockerFlag {
        names: &["host-ip"],
        value: "IP",
        help: "The address to listen on [default: 0.0.0.0]; an IPv6 one may forward to IPv4.",
    },
    DockerFlag {
        names: &["host-port"],
        value: "PORT",
        help: "The port to listen on; 0 takes any free port. Unused with -use-listen-fd.",
    },
    DockerFlag {
        names: &["container-ip"],
        value: "IP",
        help: "The address to forward to (required).",
    },
    DockerFlag {
        names: &["container-port"],
        value: "PORT",
        help: "The port to forward to (required).",
    },
    DockerFlag {
        names: &["use-listen-fd"],
        value: "",
        help: "Serve the listening socket passed as file descriptor 4 instead of binding one \
               (dockerd 28 and later).",
    },
    DockerFlag {
        names: &["v", "version"],
        value: "",
        help: "Print the version and exit.",
    },
];

/// The docker-proxy half of `--help`, wrapped to 80 columns by hand so that clap (which wraps
/// it as plain text) leaves its hanging indents alone on any wider terminal.
fn docker_mode_help() -> String {
    const WIDTH: usize = 80;
    let mut out = wrap(
        "docker-proxy mode, without a subcommand: what dockerd's userland-proxy-path runs, one \
         process per published port. Go flag syntax: -flag value, -flag=value, one dash or two.",
        WIDTH,
        0,
    );
    let mut rows: Vec<(String, &str)> = DOCKER_FLAGS
        .iter()
        .map(|f| {
            let names: Vec<String> = f.names.iter().map(|n| format!("-{n}")).collect();
            let head = match f.value {
                "" => names.join(", "),
                value => format!("{} {value}", names.join(", ")),
            };
            (head, f.help)
        })
        .collect();
    rows.push(("-h, -help".into(), "Print this help and exit."));
    let width = rows.iter().map(|(h, _)| h.len()).max().unwrap_or(0);
    for (head, help) in rows {
        let text = wrap(help, WIDTH, width + 4);
        out.push_str(&format!("  {head:<width$}  {}", &text[width + 4..]));
    }
    out.push_str(&wrap(
        "It reports to dockerd on fd 3, and hands its port to `rproxy daemon` when one listens on \
         $RPROXY_SOCKET. Its settings come from RPROXY_* environment variables \
         (RPROXY_CONNECT_TIMEOUT, RPROXY_NAT, ...): see rproxy(8).",
        WIDTH,
        0,
    ));
    out.trim_end().to_string()
}

/// `text` in lines of at most `width` columns (a longer word gets a line of its own), each
/// indented by `indent` spaces and ended by a newline.
fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent + line.len() + 1 + word.len() > width {
            out.push_str(&format!("{:indent$}{line}\n", ""));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&format!("{:indent$}{line}\n", ""));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker;
    use crate::settings::goflags::Kind;

    fn argv(args: &[&str]) -> Vec<String> {
        std::iter::once("rproxy")
            .chain(args.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn every_docker_flag_is_described_once() {
        let mut described: Vec<&str> = DOCKER_FLAGS.iter().flat_map(|f| f.names).copied().collect();
        let mut defined: Vec<&str> = docker::FLAGS.iter().map(|f| f.name).collect();
        described.sort();
        defined.sort();
        assert_eq!(described, defined);
        for f in DOCKER_FLAGS {
            for name in f.names {
                let kind = docker::FLAGS
                    .iter()
                    .find(|d| d.name == *name)
                    .map(|d| d.kind);
                assert_eq!(f.value.is_empty(), kind == Some(Kind::Bool), "{name}");
            }
        }
    }

    #[test]
    fn argv_is_told_by_its_first_word() {
        assert_eq!(Invocation::of(&argv(&[])), Invocation::Bare);
        assert_eq!(
            Invocation::of(&argv(&["-proto", "tcp"])),
            Invocation::Docker
        );
        assert_eq!(Invocation::of(&argv(&["--help"])), Invocation::Docker);
        assert_eq!(Invocation::of(&argv(&["-"])), Invocation::Docker);
        for name in ["daemon", "ls", "add", "rm", "help"] {
            assert_eq!(
                Invocation::of(&argv(&[name])),
                Invocation::Subcommand(name.into())
            );
        }
        assert_eq!(
            Invocation::of(&argv(&["lss"])),
            Invocation::Unknown("lss".into())
        );
        assert_eq!(Invocation::of(&argv(&[""])), Invocation::Unknown("".into()));
    }

    #[test]
    fn typos_get_the_nearest_subcommand() {
        assert!(unknown_subcommand("lss").contains("did you mean `ls`"));
        assert!(unknown_subcommand("deamon").contains("did you mean `daemon`"));
        assert!(unknown_subcommand("list").contains("did you mean `ls`"));
        let far = unknown_subcommand("frobnicate");
        assert!(!far.contains("did you mean"), "{far}");
        assert!(far.contains("daemon, ls, add, rm, help"), "{far}");
        assert_eq!(distance("", "ls"), 2);
        assert_eq!(distance("rm", "rm"), 0);
        assert_eq!(distance("add", "ad"), 1);
    }

    #[test]
    fn wrapped_lines_fit() {
        let text = wrap("one two three four five six seven", 12, 2);
        assert_eq!(text, "  one two\n  three four\n  five six\n  seven\n");
        assert_eq!(wrap("unbreakable-word", 5, 0), "unbreakable-word\n");
        for line in docker_mode_help().lines() {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
    }

    #[test]
    fn help_shows_both_halves() {
        let help = help();
        for word in [
            "daemon",
            "ls",
            "add",
            "rm",
            "-container-port PORT",
            "-use-listen-fd",
        ] {
            assert!(help.contains(word), "{word} missing:\n{help}");
        }
    }
}
