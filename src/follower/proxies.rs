//! Which published ports a userland proxy of dockerd's already serves: when dockerd runs one
//! (docker-proxy, or rproxy serving its port itself), its listener keeps the port, and the
//! daemon adds nothing for it (a shim's port reaches the daemon by its own registration).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use crate::docker::FLAGS;
use crate::settings::goflags;
use crate::supervisor::Key;

/// The (protocol, host address) of every port dockerd's children serve, told from their
/// command lines (docker-proxy's flags, as dockerd passes them).
pub fn served(dockerd: u32) -> BTreeSet<Key> {
    children(dockerd)
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            port_of(&cmdline)
        })
        .collect()
}

/// The port a proxy's NUL-separated command line serves; None for any other command.
fn port_of(cmdline: &[u8]) -> Option<Key> {
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .skip(1)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if !args
        .iter()
        .any(|a| a.trim_start_matches('-') == "host-port")
    {
        return None;
    }
    let flags = goflags::parse(FLAGS, &args).ok()?;
    let proto = flags.str("proto")?.parse().ok()?;
    let ip: IpAddr = flags.str("host-ip")?.parse().ok()?;
    let port = u16::try_from(flags.int("host-port")?).ok()?;
    Some((proto, SocketAddr::new(ip, port)))
}

/// `pid`'s children: from each thread's `children` list (a few reads however many
/// processes the host runs), else (a kernel without those lists) from every process's
/// parent.
fn children(pid: u32) -> Vec<u32> {
    let lists: Option<Vec<String>> =
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                    .collect()
            });
    match lists {
        Some(lists) if !lists.is_empty() => lists
            .iter()
            .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect(),
        _ => by_parent(pid),
    }
}

/// Every process whose parent is `pid`, from /proc/*/stat.
fn by_parent(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                == Some(pid)
        })
        .collect()
}

/// The parent pid in a /proc/PID/stat line (the field after the state, after the command
/// name in parentheses, which may itself hold spaces and parentheses).
fn parent_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Proto;

    #[test]
    fn a_proxys_command_line_names_its_port() {
        let argv = [
            "/usr/bin/docker-proxy",
            "-proto",
            "udp",
            "-host-ip",
            "::",
            "-host-port",
            "8053",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "53",
            "",
        ]
        .join("\0");
        let argv = argv.as_bytes();
        assert_eq!(
            port_of(argv),
            Some((Proto::Udp, "[::]:8053".parse().unwrap()))
        );
        assert_eq!(port_of(b"/usr/bin/containerd\x00--config\x00x\x00"), None);
        assert_eq!(port_of(b"rproxy\x00-host-port\x00999999\x00"), None);
    }

    #[test]
    fn the_parent_follows_the_command_name() {
        assert_eq!(parent_of("42 (a) b) S 7 42 42 0"), Some(7));
        assert_eq!(parent_of("42 (sh) S 1 42"), Some(1));
    }

    #[test]
    fn this_process_is_its_parents_child() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id();
        assert!(children(parent).contains(&me));
        assert!(by_parent(parent).contains(&me));
    }
}
