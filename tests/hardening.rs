//! No input may crash the proxy. Release builds abort on panic, so a panic reachable from argv,
//! the environment or a config file would take every port of a daemon down, or fail
//! `docker run -p` for everyone. Each setting from outside is refused with a message that
//! names it (on fd 3 in docker mode, so `docker run` shows it), and the process always ends
//! by itself with an exit status, never by a signal.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Every variable docker mode reads, with values it must refuse and values it must take.
const VARIABLES: &[(&str, &[&str], &[&str])] = &[
    (
        "RPROXY_CONNECT_TIMEOUT",
        &[
            "1e20",
            "18446744073709551616",
            "-1",
            "0",
            "NaN",
            "inf",
            "10s",
            "abc",
        ],
        &["10", "0.25"],
    ),
    (
        "RPROXY_UDP_TIMEOUT",
        &["1e20", "18446744073709551616", "-5", "0", "nan", "1m"],
        &["90", "1.5"],
    ),
    (
        "RPROXY_UDP_MAX_FLOWS",
        &["0", "-1", "1e3", "18446744073709551616", "99999999", "many"],
        &["1", "1000"],
    ),
    ("RPROXY_SPLICE", &["2", "maybe", "-0"], &["0", "1", "false"]),
    ("RPROXY_UDP_GSO", &["2", "nope"], &["0", "on"]),
    ("RPROXY_HANDOFF", &["disabled", "00"], &["0", "no"]),
    ("RPROXY_NAT", &["maybe", "required"], &["off"]),
    (
        "RPROXY_LOG",
        &["loud", "rproxy=loud"],
        &["debug", "rproxy=info"],
    ),
    ("RPROXY_LOG_FORMAT", &["xml", "JSON"], &["json", "text"]),
    ("RPROXY_LOG_FILE", &["/", "/nonexistent/dir/log"], &[]),
];

/// Spawns a docker-mode proxy with one variable set; returns what fd 3 said and the exit
/// status (None: killed by a signal), stopping it if it serves.
fn docker_mode_with(proto: &str, var: &str, value: &OsStr) -> (String, Option<i32>) {
    let target = match proto {
        "tcp" => tcp_echo("127.0.0.1:0"),
        _ => udp_echo("127.0.0.1:0"),
    };
    let mut p = Spawn::forward(proto, "127.0.0.1", target)
        .env_os(var, value)
        .spawn();
    let status = String::from_utf8_lossy(&p.status()).into_owned();
    if status == "0\n" {
        p.signal(nix::sys::signal::Signal::SIGTERM);
    }
    let code = p.wait_exit(Duration::from_secs(10));
    (status, code)
}

#[test]
fn every_variable_refuses_junk_on_fd_3_and_takes_good_values() {
    let mut threads = Vec::new();
    for &(var, bad, good) in VARIABLES {
        for proto in ["tcp", "udp"] {
            threads.push(std::thread::spawn(move || {
                for value in bad {
                    let (status, code) = docker_mode_with(proto, var, OsStr::new(value));
                    assert!(
                        status.starts_with("1\n") && status.contains(var),
                        "{proto} {var}={value:?}: fd 3 said {status:?}, not a refusal naming {var}"
                    );
                    assert_eq!(code, Some(1), "{proto} {var}={value:?}");
                }
                for value in good {
                    let (status, code) = docker_mode_with(proto, var, OsStr::new(value));
                    assert_eq!(status, "0\n", "{proto} {var}={value:?} refused");
                    assert_eq!(code, Some(0), "{proto} {var}={value:?}");
                }
                // Not UTF-8: refused, not read as unset or as a panic.
                let (status, code) = docker_mode_with(proto, var, OsStr::from_bytes(b"\xff\xfe"));
                assert!(
                    status.starts_with("1\n") && status.contains("UTF-8"),
                    "{proto} {var}=<invalid UTF-8>: {status:?}"
                );
                assert_eq!(code, Some(1));
            }));
        }
    }
    for t in threads {
        t.join().unwrap();
    }
}

/// An empty value is unset (systemd's `Environment=RPROXY_X=`), not junk.
#[test]
fn empty_variables_count_as_unset() {
    for &(var, ..) in VARIABLES {
        let (status, code) = docker_mode_with("tcp", var, OsStr::new(""));
        assert_eq!(status, "0\n", "{var}=\"\" refused");
        assert_eq!(code, Some(0));
    }
}

/// Runs `rproxy ARGS` to completion; returns (exit status, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(rproxy());
    cmd.args(args).env("RPROXY_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_daemon_refuses_out_of_range_durations_with_their_range() {
    let dir = Dir::new("hard-drain");
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    for value in ["1e20", "18446744073709551616", "-1", "NaN", "inf"] {
        let (code, err) = run(
            &[
                "daemon",
                "--control-socket",
                sock,
                &format!("--drain-timeout={value}"),
            ],
            &[],
        );
        assert_eq!(code, Some(2), "--drain-timeout {value}: {err}");
        assert!(
            err.contains("drain timeout") && err.contains("86400"),
            "--drain-timeout {value}: {err}"
        );
    }
    // The same in the config file, with its line.
    let config = dir.0.join("rproxy.toml");
    std::fs::write(&config, "publish = []\ndrain_timeout = 1e20\n").unwrap();
    let (code, err) = run(
        &[
            "daemon",
            "--control-socket",
            sock,
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("rproxy.toml:2: drain_timeout"), "{err}");
    // And the environment's options, named.
    for (var, value) in [
        ("RPROXY_UDP_TIMEOUT", "1e20"),
        ("RPROXY_CONNECT_TIMEOUT", "18446744073709551616"),
        ("RPROXY_UDP_MAX_FLOWS", "0"),
        ("RPROXY_METRICS_ADDR", "somewhere"),
        ("RPROXY_LOG", "rproxy=[{"),
    ] {
        let (code, err) = run(&["daemon", "--control-socket", sock], &[(var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {err}");
        assert!(err.contains(var), "{var}={value}: {err}");
    }
}

/// A good integer in the config file is seconds too (TOML has no implicit float).
#[test]
fn a_whole_number_drain_timeout_in_the_config_is_taken() {
    let dir = Dir::new("hard-drain-int");
    let config = dir.0.join("rproxy.toml");
    std::fs::write(&config, "publish = []\ndrain_timeout = 3\n").unwrap();
    let p = Spawn::new(&[
        "daemon",
        "--control-socket",
        dir.sock().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
    .no_status_pipe()
    .spawn();
    p.wait_log("daemon ready", Duration::from_secs(10));
}
