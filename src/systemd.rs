//! systemd: readiness (`sd_notify`) and the file-descriptor store, so that `systemctl
//! restart` refuses no connection to the daemon's own mappings.
//!
//! The store. Under systemd (`NOTIFY_SOCKET` set), the daemon hands a copy of the listening
//! socket of each of its own mappings (`--publish` and the config file) to the service
//! manager: `FDSTORE=1` with `FDNAME=<proto>-<address>-<port>`, the socket attached
//! (SCM_RIGHTS). The unit allows it with `FileDescriptorStoreMax=`. systemd keeps the copies
//! while the service runs and while a restart is under way (it closes them once the service
//! is fully stopped with no job queued: `systemctl stop`), and passes them to the next main
//! process as `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID` (sd_listen_fds(3)). That process
//! serves its mappings on those sockets instead of binding anew ([`Activation`]): the ports
//! stay bound and listening between the old process closing its copy and the new one
//! accepting, and a client connecting in between waits in the listen backlog instead of being
//! refused. Sockets of mappings the daemon no longer has (a reload removed them, a restart
//! with another config) are taken out of the store (`FDSTOREREMOVE=1`), so systemd does not
//! hold their ports.
//!
//! systemd 252 (Debian 12) has no `FileDescriptorStorePreserve=` (254): the store lives as
//! long as the service is active or being restarted, which is what a restart needs.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

use crate::mapping::describe;
use crate::supervisor::Key;

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// More descriptors than any unit of ours stores; a larger `LISTEN_FDS` is not ours.
const MAX_LISTEN_FDS: u32 = 1 << 20;

/// The most descriptors sent in one notification: one, so that each has its own name.
const FDS_PER_MESSAGE: usize = 1;

/// The descriptors systemd passed at start (`LISTEN_FDS`), by name.
#[derive(Default)]
pub struct Activation {
    /// Sockets by `FDNAME`, each taken once.
    sockets: BTreeMap<String, OwnedFd>,
    /// Every name passed, used or not: what systemd's store holds.
    names: BTreeSet<String>,
    /// What was wrong with the environment, for the log once it is up.
    pub problems: Vec<String>,
}

impl Activation {
    /// Takes the descriptors systemd passed to this process, if it passed any: call first
    /// thing in `main`, before anything opens a descriptor (they start at fd 3).
    pub fn take() -> Activation {
        let vars = Vars {
            pid: std::env::var_os("LISTEN_PID"),
            fds: std::env::var_os("LISTEN_FDS"),
            names: std::env::var_os("LISTEN_FDNAMES"),
        };
        let (numbers, problems) = vars.parse(std::process::id());
        let mut activation = Activation {
            problems,
            ..Activation::default()
        };
        for (fd, name) in numbers {
            activation.names.insert(name.clone());
            // Not for our children (a successor gets what it needs over the control socket).
            crate::sys::fd::set_cloexec(fd);
            match crate::sys::fd::take_passed(fd) {
                Some(socket) => {
                    if activation.sockets.insert(name.clone(), socket).is_some() {
                        activation
                            .problems
                            .push(format!("LISTEN_FDNAMES names {name} twice; using the last"));
                    }
                }
                None => activation.problems.push(format!(
                    "LISTEN_FDS: fd {fd} ({name}) is not a socket; ignored"
                )),
            }
        }
        activation
    }

    /// The stored socket for `key`, taken (None when systemd passed none for it).
    pub fn socket_for(&mut self, key: &Key) -> Option<OwnedFd> {
        self.sockets.remove(&fd_name(key))
    }

    /// How many sockets systemd passed that are not taken yet.
    pub fn unused(&self) -> usize {
        self.sockets.len()
    }
}

/// The environment's `LISTEN_*` variables, as read.
struct Vars {
    pid: Option<OsString>,
    fds: Option<OsString>,
    names: Option<OsString>,
}

impl Vars {
    /// The descriptor numbers passed to process `pid`, each with its name; and what was
    /// wrong. Nothing when the variables are absent or meant for another process (a child
    /// that inherited them): sd_listen_fds(3).
    fn parse(&self, pid: u32) -> (Vec<(RawFd, String)>, Vec<String>) {
        let mut problems = Vec::new();
        let (Some(listen_pid), Some(fds)) = (&self.pid, &self.fds) else {
            return (Vec::new(), problems);
        };
        let number = |v: &OsString| v.to_str().and_then(|s| s.trim().parse::<u32>().ok());
        match number(listen_pid) {
            Some(p) if p == pid => {}
            Some(_) => return (Vec::new(), problems),
            None => {
                problems.push(format!(
                    "LISTEN_PID={listen_pid:?} is not a process id; LISTEN_FDS ignored"
                ));
                return (Vec::new(), problems);
            }
        }
        let count = match number(fds) {
            Some(n) if n <= MAX_LISTEN_FDS => n,
            _ => {
                problems.push(format!(
                    "LISTEN_FDS={fds:?} is not a count up to {MAX_LISTEN_FDS}; ignored"
                ));
                return (Vec::new(), problems);
            }
        };
        let names: Vec<String> = match &self.names {
            Some(v) => v.to_string_lossy().split(':').map(str::to_string).collect(),
            None => Vec::new(),
        };
        if !names.is_empty() && names.len() != count as usize {
            problems.push(format!(
                "LISTEN_FDNAMES has {} names for LISTEN_FDS={count}; the unnamed are \"unknown\"",
                names.len()
            ));
        }
        let mut out = Vec::new();
        for i in 0..count {
            let Some(fd) = i32::try_from(i)
                .ok()
                .and_then(|i| LISTEN_FDS_START.checked_add(i))
            else {
                break;
            };
            let name = names
                .get(i as usize)
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            out.push((fd, name));
        }
        (out, problems)
    }
}

/// The store's name for a mapping's listening socket: `tcp-127.0.0.1-8080`,
/// `udp-..1-53` (an IPv6 address's colons as dots: systemd refuses ':' in a name).
pub fn fd_name(key: &Key) -> String {
    let ip = key.1.ip().to_string().replace(':', ".");
    format!("{}-{}-{}", key.0, ip, key.1.port())
}

/// What systemd's store holds of this daemon's sockets, and the changes that keep it so.
pub struct FdStore {
    /// Names in the store.
    stored: BTreeSet<String>,
}

impl FdStore {
    /// The store as systemd passed it (`activation`), plus `also`: names a daemon taking over
    /// knows the previous one stored.
    pub fn new(activation: &Activation, also: impl IntoIterator<Item = String>) -> FdStore {
        let mut stored = activation.names.clone();
        stored.extend(also);
        FdStore { stored }
    }

    /// Makes the store hold exactly `current` (each key's listening socket): stores what is
    /// new, removes what is gone. Blocking (one datagram per socket): call off the runtime's
    /// threads for many. Does nothing without `NOTIFY_SOCKET`.
    pub fn sync(&mut self, current: Vec<(Key, OwnedFd)>) {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let mut wanted = BTreeSet::new();
        let mut stored = 0;
        for (key, fd) in current {
            let name = fd_name(&key);
            if key.1.port() == 0 || !wanted.insert(name.clone()) {
                continue;
            }
            if self.stored.contains(&name) {
                continue;
            }
            let state = format!("FDSTORE=1\nFDNAME={name}");
            match notify(&path, &state, &[fd]) {
                Ok(()) => {
                    self.stored.insert(name);
                    stored += 1;
                }
                Err(e) => tracing::warn!("fd store: cannot store {name}: {e}"),
            }
        }
        let gone: Vec<String> = self.stored.difference(&wanted).cloned().collect();
        for name in &gone {
            match notify(&path, &format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[]) {
                Ok(()) => {
                    self.stored.remove(name);
                }
                Err(e) => tracing::warn!("fd store: cannot remove {name}: {e}"),
            }
        }
        if stored > 0 || !gone.is_empty() {
            tracing::info!(
                "fd store: {stored} listening sockets stored, {} removed; systemd holds {}",
                gone.len(),
                self.stored.len()
            );
        }
    }
}

/// Tells systemd (Type=notify) about our state, when it asked.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify(&path, state, &[]) {
        tracing::warn!("sd_notify {state}: {e}");
    }
}

/// Sends `state` with `fds` attached to the notification socket at `path` (a path, or an
/// abstract name after '@').
fn notify(path: &std::ffi::OsStr, state: &str, fds: &[OwnedFd]) -> Result<(), String> {
    debug_assert!(fds.len() <= FDS_PER_MESSAGE);
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name),
        None => UnixAddr::new(path),
    }
    .map_err(|e| format!("NOTIFY_SOCKET={path:?}: {}", describe(&e.into())))?;
    let socket = std::os::unix::net::UnixDatagram::unbound().map_err(|e| describe(&e))?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: Vec<ControlMessage> = match raw.is_empty() {
        true => Vec::new(),
        false => vec![ControlMessage::ScmRights(&raw)],
    };
    let iov = [IoSlice::new(state.as_bytes())];
    sendmsg(
        socket.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )
    .map(|_| ())
    .map_err(|e| describe(&e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Proto;

    fn vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Vars {
        Vars {
            pid: pid.map(Into::into),
            fds: fds.map(Into::into),
            names: names.map(Into::into),
        }
    }

    #[test]
    fn listen_fds_for_this_process_are_numbered_from_3_with_their_names() {
        let (fds, problems) =
            vars(Some("42"), Some("2"), Some("tcp-127.0.0.1-80:udp-..1-53")).parse(42);
        assert_eq!(
            fds,
            vec![
                (3, "tcp-127.0.0.1-80".to_string()),
                (4, "udp-..1-53".to_string())
            ]
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn listen_fds_of_another_process_or_absent_are_ignored_quietly() {
        for v in [
            vars(Some("41"), Some("2"), None),
            vars(None, Some("2"), None),
            vars(Some("42"), None, None),
        ] {
            let (fds, problems) = v.parse(42);
            assert!(
                fds.is_empty() && problems.is_empty(),
                "{fds:?} {problems:?}"
            );
        }
    }

    #[test]
    fn malformed_listen_variables_are_problems_never_panics() {
        for (pid, fds) in [
            ("x", "1"),
            ("-1", "1"),
            ("99999999999999999999", "1"),
            ("42", "-3"),
            ("42", "4294967295"),
            ("42", "1x"),
            ("42", ""),
        ] {
            let (got, problems) = vars(Some(pid), Some(fds), None).parse(42);
            assert!(got.is_empty(), "{pid} {fds}: {got:?}");
            assert_eq!(problems.len(), 1, "{pid} {fds}: {problems:?}");
        }
        // Fewer names than descriptors: the rest are "unknown", as sd_listen_fds_with_names.
        let (got, problems) = vars(Some("42"), Some("2"), Some("a")).parse(42);
        assert_eq!(got, vec![(3, "a".into()), (4, "unknown".into())]);
        assert_eq!(problems.len(), 1);
        // Not UTF-8: lossy names, no panic.
        let raw = std::os::unix::ffi::OsStringExt::from_vec(vec![0xff, b'a']);
        let v = Vars {
            pid: Some("42".into()),
            fds: Some("1".into()),
            names: Some(raw),
        };
        assert_eq!(v.parse(42).0.len(), 1);
    }

    #[test]
    fn names_hold_no_colon_and_differ_by_protocol_and_address() {
        let k = |p, a: &str| (p, a.parse().unwrap());
        let names: BTreeSet<String> = [
            k(Proto::Tcp, "127.0.0.1:80"),
            k(Proto::Udp, "127.0.0.1:80"),
            k(Proto::Tcp, "[::1]:80"),
            k(Proto::Tcp, "[::ffff:127.0.0.1]:80"),
            k(Proto::Tcp, "0.0.0.0:80"),
        ]
        .iter()
        .map(fd_name)
        .collect();
        assert_eq!(names.len(), 5);
        assert!(names.iter().all(|n| !n.contains(':') && n.len() < 256));
        assert!(names.contains("tcp-..1-80"), "{names:?}");
    }
}
