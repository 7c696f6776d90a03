//! No input may crash the proxy. Release builds abort on panic, so a panic reachable from argv,
//! the environment or a config file would take every port of a daemon down, or fail
//! `docker run -p` for everyone. Each setting from outside is refused with a message that
//! names it (on fd 3 in docker mode, so `docker run` shows it), and the process always ends
//! by itself with an exit status, never by a signal.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::{Duration, Instant};

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
    ("RPROXY_SOCKET_LB", &["maybe", "sometimes"], &["off", "on"]),
    (
        "RPROXY_LOG",
        &["loud", "rproxy=loud"],
        &["debug", "rproxy=info"],
    ),
    ("RPROXY_LOG_FORMAT", &["xml", "JSON"], &["json", "text"]),
    ("RPROXY_LOG_FILE", &["/", "/nonexistent/dir/log"], &[]),
    // Any path will do: where nothing listens, the port is served here / logs go to stderr.
    (
        "RPROXY_SOCKET",
        &[],
        &["/nonexistent/rproxy.sock", "relative.sock", "é"],
    ),
    (
        "RPROXY_SYSLOG_SOCKET",
        &[],
        &["/nonexistent/log", "/dev/null", "é"],
    ),
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

/// dockerd's API for the hairpin rule is a unix socket: a TCP host from the flag, the config
/// file or DOCKER_HOST is refused with where it came from, never silently ignored.
#[test]
fn the_daemon_refuses_a_docker_host_it_cannot_use() {
    let dir = Dir::new("hard-docker-host");
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    let config = dir.0.join("rproxy.toml");
    std::fs::write(&config, "docker_host = \"tcp://127.0.0.1:2375\"\n").unwrap();
    let config = config.to_str().unwrap();
    let tcp = "tcp://127.0.0.1:2375";
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 3] = [
        (&["--docker-host", tcp], &[], "--docker-host"),
        (&["--config", config], &[], "docker_host in the config file"),
        (&[], &[("DOCKER_HOST", tcp)], "DOCKER_HOST"),
    ];
    for (args, env, from) in cases {
        let mut argv = vec!["daemon", "--control-socket", sock];
        argv.extend(args);
        let (code, err) = run(&argv, env);
        assert_eq!(code, Some(2), "{argv:?} {env:?}: {err}");
        assert!(
            err.contains(from) && err.contains("only a unix socket"),
            "{argv:?} {env:?}: {err}"
        );
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

/// A small deterministic generator: the seed is printed, and `RPROXY_FUZZ_SEED` replays it.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("RPROXY_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("{test}: RPROXY_FUZZ_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Values that have broken parsers elsewhere: overflows, signs, bases, families, emptiness.
const JUNK: &[&str] = &[
    "",
    "-",
    "--",
    "-1",
    "0",
    "1e20",
    "18446744073709551616",
    "9223372036854775808",
    "-9223372036854775809",
    "65535",
    "65536",
    "++80",
    "0x+50",
    "0x50",
    "0_8",
    "NaN",
    "inf",
    "::",
    "[::1]",
    "::ffff:127.0.0.1",
    "127.0.0.1",
    "0.0.0.0",
    "256.1.1.1",
    "udp",
    "sctp",
    "tcp",
    "-h",
    "-v",
    "--help",
    "=",
    "-proto=",
    "-use-listen-fd=2",
    "\u{fffd}\u{7f}",
    "ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé",
];

/// Mutates `base`: replaces, inserts, drops, repeats or swaps arguments.
fn mutate(rng: &mut Rng, base: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(args.len() + 1);
        match rng.below(5) {
            0 if at < args.len() => args[at] = rng.pick(JUNK).to_string(),
            1 => args.insert(at, rng.pick(JUNK).to_string()),
            2 if at < args.len() => {
                args.remove(at);
            }
            3 if at < args.len() => {
                let dup = args[at].clone();
                args.insert(at, dup);
            }
            _ if args.len() > 1 => {
                let other = rng.below(args.len());
                let at = at.min(args.len() - 1);
                args.swap(at, other);
            }
            _ => {}
        }
    }
    args
}

/// Runs rproxy with `args`: it must exit by itself (0, 1 or 2) or, when it serves, stop on
/// SIGTERM with 0. Never a signal.
fn survives(args: &[String], status_pipe: bool) {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut spawn = Spawn::new(&argv);
    spawn.stderr_null = true;
    if !status_pipe {
        spawn = spawn.no_status_pipe();
    }
    let mut p = spawn.spawn();
    let deadline = Instant::now() + Duration::from_secs(3);
    let code = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            // Serving: it must stop cleanly.
            p.signal(nix::sys::signal::Signal::SIGTERM);
            let code = p.wait_exit(Duration::from_secs(10));
            assert_eq!(code, Some(0), "{args:?} served but did not stop cleanly");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        matches!(code, Some(0..=2)),
        "{args:?} ended with {code:?} (None: killed by a signal)"
    );
}

#[test]
fn mutated_docker_proxy_command_lines_never_kill_the_process() {
    let mut rng = Rng::new("mutated_docker_proxy_command_lines_never_kill_the_process");
    let base = [
        "-proto",
        "tcp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        "0",
        "-container-ip",
        "127.0.0.1",
        "-container-port",
        "9",
    ];
    let runs: Vec<Vec<String>> = (0..120).map(|_| mutate(&mut rng, &base)).collect();
    let threads: Vec<_> = runs
        .chunks(30)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            std::thread::spawn(move || chunk.iter().for_each(|a| survives(a, true)))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn mutated_daemon_command_lines_and_config_files_never_kill_the_process() {
    let mut rng = Rng::new("mutated_daemon_command_lines_and_config_files_never_kill_the_process");
    let dir = Dir::new("hard-fuzz-daemon");
    let good = r#"publish = ["127.0.0.1:0:127.0.0.1:9", "127.0.0.1:0:127.0.0.1:9/udp"]
drain_timeout = 1

[[mapping]]
publish = "127.0.0.1:0:127.0.0.1:10"
nat = "off"
"#;
    for run in 0..40 {
        let sock = dir.0.join(format!("ctl{run}.sock"));
        let config = dir.0.join(format!("rproxy{run}.toml"));
        // Half the runs mutate the file, half the command line.
        let mut text = good.as_bytes().to_vec();
        if run % 2 == 0 {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(text.len());
                match rng.below(3) {
                    0 => text[at] = (rng.next() & 0xff) as u8,
                    1 => text.insert(at, b"\"=[]{}.,#\n0123456789-e"[rng.below(22)]),
                    _ => {
                        text.remove(at);
                    }
                }
            }
        }
        std::fs::write(&config, &text).unwrap();
        let base = [
            "daemon",
            "--control-socket",
            sock.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "-p",
            "127.0.0.1:0:127.0.0.1:9",
            "--drain-timeout",
            "1",
        ];
        let args = match run % 2 {
            0 => base.iter().map(|s| s.to_string()).collect(),
            _ => {
                let mut a = mutate(&mut rng, &base[1..]);
                a.insert(0, "daemon".into());
                a
            }
        };
        survives(&args, false);
    }
}

#[test]
fn mutated_control_requests_never_kill_the_daemon() {
    let mut rng = Rng::new("mutated_control_requests_never_kill_the_daemon");
    let dir = Dir::new("hard-fuzz-control");
    let mut d = Spawn::new(&["daemon", "--control-socket", dir.sock().to_str().unwrap()])
        .no_status_pipe()
        .spawn();
    d.wait_log("daemon ready", Duration::from_secs(10));
    let good = [
        r#"{"request":"ls"}"#,
        r#"{"request":"add","spec":"127.0.0.1:0:127.0.0.1:9","options":{"nat":"off","connect_timeout_ms":500}}"#,
        r#"{"request":"rm","spec":"127.0.0.1:1:127.0.0.1:9"}"#,
        r#"{"request":"register","spec":"127.0.0.1:0:127.0.0.1:9/udp","options":{"udp_max_flows":10}}"#,
    ];
    for _ in 0..300 {
        let mut bytes = good[rng.below(good.len())].as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = (rng.next() & 0xff) as u8,
                1 => bytes.insert(at, b"\"{}[]:,0123456789-e\\"[rng.below(20)]),
                _ => {
                    bytes.remove(at);
                }
            }
        }
        bytes.push(b'\n');
        let mut s = std::os::unix::net::UnixStream::connect(dir.sock()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = std::io::Write::write_all(&mut s, &bytes);
        let mut reply = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut reply);
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "the daemon died on {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let (code, out, err) = cli(&dir, &["ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("PROTO"));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}
