//! Restart and upgrade without an outage: a new daemon takes over the running one's sockets.
//!
//! `rproxy daemon --takeover` asks the running daemon for everything it serves
//! ([`crate::control::handover`]), serves it — its own `--publish` and config file deciding
//! which of the old `--publish`/config mappings stay, `rproxy add` mappings and shims'
//! ports carried over as they were — and only then lets the old one stop accepting, drain
//! its connections and exit. Every listening socket stays open throughout, so no connection
//! is refused; established ones finish in the process that accepted them.
//!
//! A running daemon starts its successor itself ([`Program::start_successor`]) on SIGUSR2,
//! and on SIGHUP when its program file was replaced (a package upgrade): the successor is the
//! file now on disk, with the same arguments.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::control::server::Server;
use crate::control::Handed;
use crate::frontend;
use crate::mapping::{describe, parse_publish, Mapping};
use crate::settings::config::Settings;
use crate::settings::options::{Options, Overrides};
use crate::supervisor::{key, Key, Listener, Origin, OriginKind, Start};

/// A shim's registration carried over: adopt it once its mapping runs.
pub struct Adopt {
    /// Its mapping's key.
    pub key: Key,
    /// The origin its mapping runs under.
    pub origin: Origin,
    /// The shim's connection.
    pub conn: OwnedFd,
    /// The options the shim's environment set.
    pub options: Overrides,
}

/// The first change of a daemon taking over: this daemon's own mappings (on the old
/// daemon's sockets where it had them), then what was handed over and is not this daemon's
/// to decide (`rproxy add` mappings, shims' ports). The old daemon's `--publish` and config
/// mappings that this one does not have are left to it: it drains them.
pub fn plan(
    settings: &Settings,
    old: u32,
    received: Vec<(Handed, OwnedFd, Option<OwnedFd>)>,
    server: &Server,
) -> Result<(Vec<Start>, Vec<Adopt>), String> {
    let mut handed: HashMap<Key, (Handed, OwnedFd, Option<OwnedFd>)> = HashMap::new();
    for (h, socket, conn) in received {
        let m = one(&h.spec, Options::default())?;
        handed.insert(key(&m), (h, socket, conn));
    }
    let mut starts = Vec::new();
    let own = [
        (&settings.publish, Origin::Publish),
        (&settings.config, Origin::Config),
    ];
    for (mappings, origin) in own {
        for m in mappings {
            let listener = match handed.remove(&key(m)) {
                Some((h, _, _)) if matches!(h.origin, OriginKind::Shim | OriginKind::Docker) => {
                    return Err(format!(
                        "{} {} is published by dockerd ({}, handed over by pid {old}), and \
                         this daemon's {origin} mappings have it too",
                        m.proto, m.listen, h.spec
                    ))
                }
                Some((_, socket, _)) => Listener::Socket(checked(m, socket)?),
                None => Listener::Bind,
            };
            starts.push(Start {
                mapping: m.clone(),
                listener,
                origin: origin.clone(),
            });
        }
    }
    let mut adopt = Vec::new();
    for (_, (h, socket, conn)) in handed {
        let (spec, from, options) = (h.spec, h.origin, h.options);
        match (from, conn, h.container) {
            (OriginKind::Control, _, _) => {
                let m = one(&spec, options.apply(&Options::default())?)?;
                starts.push(Start {
                    listener: Listener::Socket(checked(&m, socket)?),
                    mapping: m,
                    origin: Origin::Control,
                });
            }
            (OriginKind::Shim, Some(conn), _) => {
                let m = one(&spec, options.apply(&settings.dockerd_defaults())?)?;
                let origin = server.shim_origin();
                starts.push(Start {
                    listener: Listener::Socket(checked(&m, socket)?),
                    mapping: m,
                    origin: origin.clone(),
                });
                adopt.push(Adopt {
                    key: key(&starts[starts.len() - 1].mapping),
                    origin,
                    conn,
                    options,
                });
            }
            // A container's port this daemon also follows: its follower's first read of
            // dockerd keeps it, or changes it as dockerd says.
            (OriginKind::Docker, _, Some(name)) if settings.docker_ports => {
                let m = one(&spec, settings.dockerd_defaults())?;
                starts.push(Start {
                    listener: Listener::Socket(checked(&m, socket)?),
                    mapping: m,
                    origin: Origin::Container(name.into()),
                });
            }
            (from, _, _) => tracing::info!(
                "takeover: {spec} ({from} of pid {old}) is not one of this daemon's mappings; \
                 pid {old} drains it"
            ),
        }
    }
    Ok((starts, adopt))
}

/// The one mapping of a one-port spec.
fn one(spec: &str, options: Options) -> Result<Mapping, String> {
    match parse_publish(spec, options)?.as_slice() {
        [m] => Ok(m.clone()),
        _ => Err(format!(
            "the handover lists {spec:?}, which is not one port"
        )),
    }
}

/// A handed-over socket, checked to serve `m` on its own address.
pub fn checked(m: &Mapping, socket: OwnedFd) -> Result<socket2::Socket, String> {
    let socket = frontend::check(m, socket)
        .map_err(|why| format!("the socket handed over for {m}: {why}"))?;
    match frontend::local_addr(&socket) {
        Some(local) if local == m.listen => Ok(socket),
        local => Err(format!(
            "the socket handed over for {m} is bound to {}",
            local.map_or("nothing".into(), |a| a.to_string())
        )),
    }
}

/// This daemon's program and arguments, as started: what its successor runs.
pub struct Program {
    path: PathBuf,
    args: Vec<OsString>,
}

impl Program {
    /// The program this process runs, and its arguments (None when the kernel cannot say
    /// where it is).
    pub fn current() -> Option<Program> {
        let path = std::env::current_exe().ok()?;
        Some(Program {
            path,
            args: std::env::args_os().skip(1).collect(),
        })
    }

    /// Whether the file this process was started from has been replaced (a package upgrade
    /// installs a new file under the same name), so a successor would run another program.
    pub fn replaced(&self) -> bool {
        match (
            std::fs::metadata(&self.path),
            std::fs::metadata("/proc/self/exe"),
        ) {
            (Ok(on_disk), Ok(running)) => {
                (on_disk.dev(), on_disk.ino()) != (running.dev(), running.ino())
            }
            _ => false,
        }
    }

    /// Starts the program file (the new one after an upgrade) as `daemon … --takeover`, in
    /// this process's environment (so it reaches systemd's notify socket too), and returns
    /// its pid. It is not this process's child ([`crate::sys::process::spawn_orphan`]): it
    /// becomes systemd's, which then stops it, once it is the main process, as one it
    /// started — with SIGTERM and a wait for the drain, not SIGKILL at once. If it fails
    /// before taking over, its own lines in the log say why, and this daemon carries on.
    pub fn start_successor(&self) -> Result<u32, String> {
        let mut args = self.args.clone();
        if !args.iter().any(|a| a == "--takeover") {
            args.push("--takeover".into());
        }
        let mut command = std::process::Command::new(&self.path);
        command.args(&args).stdin(std::process::Stdio::null());
        crate::sys::process::spawn_orphan(&mut command)
            .map_err(|e| format!("cannot start {}: {}", self.path.display(), describe(&e)))
    }
}
