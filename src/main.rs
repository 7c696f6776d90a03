//! rproxy: a userland port-forwarding proxy and drop-in replacement for docker-proxy.
//!
//! argv → mode → run: a subcommand (`daemon`, `ls`, `add`, `rm`) or, for anything starting
//! with a dash, docker-proxy's own command line (Go-style flags, as dockerd passes them).

#![deny(unsafe_code)]

use clap::Parser;

use rproxy::control::{self, Request};
use rproxy::settings::cli::{self, Cli, Command, Invocation};
use rproxy::settings::env::{Env, Reader};
use rproxy::settings::options::Overrides;
use rproxy::{daemon, docker, log, systemd, udp};

fn main() {
    // Before anything opens a descriptor: systemd's (fd store, from 3 on) first, then
    // dockerd's (3 and 4), which are not there when systemd's are.
    let activation = systemd::Activation::take();
    let inherited = docker::Inherited::take();
    // Lossy: a byte that is not UTF-8 makes its flag invalid (exit 2), never a panic.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let reader = match Invocation::of(&argv) {
        Invocation::Docker => Reader::Docker,
        Invocation::Subcommand(name) if name == "daemon" => Reader::Daemon,
        Invocation::Subcommand(_) => Reader::Client,
        Invocation::Bare => {
            eprintln!("{}", cli::help());
            std::process::exit(2);
        }
        Invocation::Unknown(word) => {
            eprint!("{}", cli::unknown_subcommand(&word));
            std::process::exit(2);
        }
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
    if reader == Reader::Docker {
        let prog = argv.first().map_or("rproxy", String::as_str);
        let args = argv.get(1..).unwrap_or_default();
        drop(activation);
        let code = docker::main(prog, args, inherited, env, problems, cli::help);
        std::process::exit(code);
    }
    drop(inherited);
    let command = Cli::parse_from(&argv).command;
    // `--check` lists the environment's problems with the rest; everything else stops here.
    if let Command::Daemon {
        settings,
        check: true,
    } = command
    {
        std::process::exit(daemon::check(settings, env, problems));
    }
    if !problems.is_empty() {
        for p in problems {
            eprintln!("rproxy: {p}");
        }
        std::process::exit(2);
    }
    let code = match command {
        Command::Daemon { settings, .. } => daemon::main(settings, env, activation),
        Command::Ls {
            control_socket,
            json,
        } => control::client::main(Request::Ls {}, control_socket.or(env.socket), json),
        Command::Add {
            spec,
            control_socket,
            nat,
            socket_lb,
            proxy_protocol,
            allow,
        } => {
            let options = Overrides {
                nat,
                socket_lb,
                proxy_protocol,
                allow: (!allow.is_empty()).then_some(allow),
                ..Overrides::default()
            };
            let request = Request::Add { spec, options };
            control::client::main(request, control_socket.or(env.socket), false)
        }
        Command::Rm {
            spec,
            control_socket,
        } => control::client::main(Request::Rm { spec }, control_socket.or(env.socket), false),
    };
    std::process::exit(code);
}
