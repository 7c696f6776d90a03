//! rproxy: a userland port-forwarding proxy and drop-in replacement for docker-proxy.
//!
//! argv → mode → run: a subcommand (`daemon`, `ls`, `add`, `rm`) or, for anything else,
//! docker-proxy's own command line (Go-style flags, as dockerd passes them).

#![deny(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use rproxy::control::{self, Request};
use rproxy::env::{Env, Reader};
use rproxy::options::{Mode, Overrides};
use rproxy::proxy_protocol::Version;
use rproxy::{config, daemon, docker, log, udp};

/// rproxy — one process for every published port. Without a subcommand, rproxy takes
/// docker-proxy's flags (-proto, -host-ip, -host-port, -container-ip, -container-port,
/// -use-listen-fd) and is what dockerd's `userland-proxy-path` points at.
#[derive(Parser)]
#[command(name = "rproxy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve many mappings in one process, with a control socket for `ls`/`add`/`rm` and for
    /// docker-mode processes handing their ports over.
    Daemon(config::Args),
    /// List the daemon's mappings with their connections and bytes.
    Ls {
        #[arg(long, value_name = "PATH")]
        control_socket: Option<PathBuf>,
    },
    /// Add a mapping to the running daemon: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp].
    Add {
        spec: String,
        #[arg(long, value_name = "PATH")]
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
    },
    /// Remove a mapping from the running daemon (same spec as `add`).
    Rm {
        spec: String,
        #[arg(long, value_name = "PATH")]
        control_socket: Option<PathBuf>,
    },
}

const SUBCOMMANDS: &[&str] = &["daemon", "ls", "add", "rm", "help"];

fn main() {
    // Before anything opens a descriptor.
    let inherited = docker::Inherited::take();
    // Lossy: a byte that is not UTF-8 makes its flag invalid (exit 2), never a panic.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let reader = match argv.get(1).map(String::as_str) {
        Some("daemon") => Reader::Daemon,
        Some(a) if SUBCOMMANDS.contains(&a) => Reader::Client,
        _ => Reader::Docker,
    };
    let (env, mut problems) = Env::read(reader);
    // docker-proxy mode runs once per published port: the light logger keeps each one small.
    problems.extend(log::init(
        reader == Reader::Docker,
        &env.log,
        log::Format::from_argv(&argv),
    ));
    if env.no_gso {
        udp::disable_gso();
    }
    let code = if reader == Reader::Docker {
        let prog = argv.first().map_or("rproxy", String::as_str);
        docker::main(
            prog,
            argv.get(1..).unwrap_or_default(),
            inherited,
            env,
            problems,
        )
    } else if !problems.is_empty() {
        for p in problems {
            eprintln!("rproxy: {p}");
        }
        2
    } else {
        drop(inherited);
        match Cli::parse_from(&argv).command {
            Command::Daemon(args) => daemon::main(args, env),
            Command::Ls { control_socket } => {
                control::client::main(Request::Ls {}, control_socket.or(env.socket))
            }
            Command::Add {
                spec,
                control_socket,
                nat,
                socket_lb,
                proxy_protocol,
            } => {
                let options = Overrides {
                    nat,
                    socket_lb,
                    proxy_protocol,
                    ..Overrides::default()
                };
                let request = Request::Add { spec, options };
                control::client::main(request, control_socket.or(env.socket))
            }
            Command::Rm {
                spec,
                control_socket,
            } => control::client::main(Request::Rm { spec }, control_socket.or(env.socket)),
        }
    };
    std::process::exit(code);
}
