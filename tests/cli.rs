//! The command line a person meets: `rproxy --help` shows the subcommands and docker-proxy's
//! flags; a word that is not a subcommand is named as such with the list; `rproxy daemon
//! --check` prints what a config would serve, or every problem with it, binding nothing;
//! `rproxy ls --json` gives scripts the daemon's rows.

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rproxy::control::Row;

/// Runs `rproxy ARGS` with a status pipe on fd 3, as dockerd would; returns (exit status,
/// what fd 3 said, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String, String) {
    let mut p = Spawn::new(args).close_fd4().spawn();
    let status = String::from_utf8_lossy(&p.status()).into_owned();
    let code = p.wait_exit(Duration::from_secs(10));
    let stdout = p.output_stdout();
    let stderr = p.stderr_text(Duration::from_millis(200));
    (code, status, stdout, stderr)
}

const SUBCOMMANDS: &[&str] = &["daemon", "ls", "add", "rm"];
const DOCKER_FLAGS: &[&str] = &[
    "-proto",
    "-host-ip",
    "-host-port",
    "-container-ip",
    "-container-port",
    "-use-listen-fd",
    "-version",
];

#[test]
fn help_lists_the_subcommands_and_the_docker_proxy_flags() {
    for args in [&["--help"][..], &["-h"], &["-help"], &["help"]] {
        let (code, status, stdout, _) = run(args);
        assert_eq!(code, Some(0), "{args:?}");
        assert!(status.is_empty(), "{args:?} wrote {status:?} on fd 3");
        for word in SUBCOMMANDS.iter().chain(DOCKER_FLAGS) {
            assert!(stdout.contains(word), "{args:?}: no {word}:\n{stdout}");
        }
        assert!(
            stdout.contains("RPROXY_"),
            "{args:?}: no word of the environment"
        );
    }
    // Each subcommand's own help.
    let (code, _, stdout, _) = run(&["daemon", "--help"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("--check") && stdout.contains("--publish"),
        "{stdout}"
    );
    let (code, _, stdout, _) = run(&["ls", "--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--json"), "{stdout}");
}

/// `rproxy --help | head -1`: a reader that stops reading ends the output, not the process
/// (release builds abort on a panic, and println! panics on a closed pipe).
#[test]
fn help_into_a_closed_pipe_exits_cleanly() {
    for args in [&["--help"][..], &["help"]] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let status = Command::new(rproxy())
            .args(args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        // clap's own help (`rproxy help`) exits 0 as well once its write fails.
        assert!(status.code().is_some(), "{args:?} was killed: {status:?}");
        assert_eq!(status.code(), Some(0), "{args:?}: {status:?}");
    }
}

/// `rproxy lss` used to answer "no container address: -container-ip is 0.0.0.0": docker
/// mode took the word for a leftover argument. dockerd never passes one.
#[test]
fn a_word_that_is_not_a_subcommand_says_so() {
    let (code, status, stdout, stderr) = run(&["lss"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(status.is_empty(), "fd 3 said {status:?}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("\"lss\" is not a subcommand"), "{stderr}");
    assert!(stderr.contains("did you mean `ls`"), "{stderr}");
    assert!(stderr.contains("daemon, ls, add, rm"), "{stderr}");
    assert!(!stderr.contains("container-ip is"), "{stderr}");
    let (code, _, _, stderr) = run(&["frobnicate", "-proto", "tcp"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("\"frobnicate\" is not a subcommand"),
        "{stderr}"
    );
    assert!(!stderr.contains("did you mean"), "{stderr}");
    // No argument at all: the help, as an error.
    let (code, status, _, stderr) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(status.is_empty());
    assert!(
        stderr.contains("daemon") && stderr.contains("-container-port"),
        "{stderr}"
    );
}

/// Go-style usage errors keep docker-proxy's wording and point at the subcommands.
#[test]
fn docker_mode_usage_errors_point_at_the_subcommands() {
    let (code, status, _, stderr) = run(&["-nope"]);
    assert_eq!(code, Some(2));
    assert!(status.is_empty());
    assert!(
        stderr.contains("flag provided but not defined: -nope"),
        "{stderr}"
    );
    assert!(stderr.contains("rproxy --help"), "{stderr}");
    // The usage names the flag dockerd 28+ passes and the daemon the ports can go to.
    assert!(stderr.contains("-use-listen-fd"), "{stderr}");
    assert!(stderr.contains("rproxy daemon"), "{stderr}");
}

/// `rproxy add` checks its spec before it looks for a daemon: a bad one exits 2 (a usage
/// error, as clap's own) and is quoted, whether or not a daemon runs.
#[test]
fn add_with_a_bad_spec_exits_2_and_quotes_it() {
    let dir = Dir::new("cli-badspec");
    let sock = dir.sock();
    let sock = sock.to_str().unwrap();
    for spec in [
        "nonsense",
        "8080:10.0.0.2",
        "70000:10.0.0.2:80",
        "1:2:3:4:5",
    ] {
        let (code, _, _, stderr) = run(&["add", "--control-socket", sock, spec]);
        assert_eq!(code, Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(&format!("{spec:?}")), "{spec}: {stderr}");
        assert!(!stderr.contains("no rproxy daemon"), "{spec}: {stderr}");
    }
    let _d = daemon(&dir, &[]);
    let (code, _, _, stderr) = run(&["add", "--control-socket", sock, "nonsense"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("\"nonsense\""), "{stderr}");
    assert!(ls(&dir).is_empty());
}

/// Built from a git checkout, `--version` names the commit it was built from.
#[test]
fn version_names_the_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    let head = match head {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => return skip("version_names_the_commit", "not built from a git checkout"),
    };
    if std::env::var_os("RPROXY_TEST_BINARY").is_some() {
        return skip(
            "version_names_the_commit",
            "RPROXY_TEST_BINARY: another build",
        );
    }
    let (code, _, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.starts_with("rproxy (commit ") && stdout.contains(&head),
        "{stdout:?} does not name {head}"
    );
}

/// Runs `rproxy daemon --check ARGS` with `env`; returns (status, stdout, stderr).
fn check(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(rproxy());
    cmd.args(["daemon", "--check"]).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RPROXY_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file, flags and the environment resolve into the mappings a start would serve
/// (ports taken by someone else included: nothing binds), and the check starts nothing.
#[test]
fn daemon_check_prints_the_mappings_and_binds_nothing() {
    let dir = Dir::new("cli-check");
    let base = free_ports(4);
    // Held by this test for the whole check: a real start would fail on both.
    let taken = TcpListener::bind(("127.0.0.1", base)).unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = dir.0.join("rproxy.toml");
    std::fs::write(
        &config,
        format!(
            "publish = [\"127.0.0.1:{base}:10.0.0.2:80\", \"127.0.0.1:{}-{}:10.0.0.3:5300-5301/udp\"]\n\
             nat = \"on\"\n\
             [[mapping]]\npublish = \"127.0.0.1:{}:10.0.0.4:90\"\nsocket_lb = \"require\"\n",
            base + 1,
            base + 2,
            base + 3
        ),
    )
    .unwrap();
    let sock = dir.0.join("ctl.sock");
    let (code, out, err) = check(
        &[
            "--config",
            config.to_str().unwrap(),
            "--control-socket",
            sock.to_str().unwrap(),
            "-p",
            "[::1]:0:[::1]:9",
            "--drain-timeout=2.5",
            "--metrics-addr",
            &metrics.local_addr().unwrap().to_string(),
        ],
        &[("RPROXY_UDP_TIMEOUT", "30")],
    );
    assert_eq!(code, Some(0), "{err}");
    for line in [
        format!("config file:     {}", config.display()),
        format!("control socket:  {}", sock.display()),
        "drain timeout:   2.5 s".to_string(),
        format!(
            "metrics:         http://{}/metrics",
            metrics.local_addr().unwrap()
        ),
        "UDP timeout 30 s".to_string(),
        "mappings:        5".to_string(),
    ] {
        assert!(out.contains(&line), "no {line:?} in:\n{out}");
    }
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.starts_with("PROTO"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expected = [
        ["tcp", "[::1]:0", "[::1]:9", "publish", "on", "off", "-"],
        [
            "tcp",
            &format!("127.0.0.1:{base}"),
            "10.0.0.2:80",
            "config",
            "on",
            "off",
            "-",
        ],
        [
            "udp",
            &format!("127.0.0.1:{}", base + 1),
            "10.0.0.3:5300",
            "config",
            "on",
            "off",
            "-",
        ],
        [
            "udp",
            &format!("127.0.0.1:{}", base + 2),
            "10.0.0.3:5301",
            "config",
            "on",
            "off",
            "-",
        ],
        [
            "tcp",
            &format!("127.0.0.1:{}", base + 3),
            "10.0.0.4:90",
            "config",
            "on",
            "require",
            "-",
        ],
    ];
    assert_eq!(rows, expected.map(|r| r.to_vec()), "{out}");
    // Nothing was started: no control socket, every port still free for us.
    assert!(!sock.exists(), "--check created the control socket");
    drop(taken);
    TcpListener::bind(("127.0.0.1", base)).unwrap();
    for port in [base + 1, base + 2] {
        UdpSocket::bind(("127.0.0.1", port)).unwrap();
    }
    TcpListener::bind(("127.0.0.1", base + 3)).unwrap();
}

/// Every problem is listed, from every source, not just the first; exit 2.
#[test]
fn daemon_check_lists_every_problem() {
    let dir = Dir::new("cli-check-bad");
    let config = dir.0.join("rproxy.toml");
    std::fs::write(
        &config,
        "publish = [\"8080:10.0.0.2\", \"9090:10.0.0.2:90\"]\ndrain_timeout = -1\nnat = \"maybe\"\n",
    )
    .unwrap();
    let (code, out, err) = check(
        &[
            "--config",
            config.to_str().unwrap(),
            "--nat=sometimes",
            "--drain-timeout",
            "1e20",
            "--metrics-addr",
            "nowhere",
            "-p",
            "9090:10.0.0.9:90",
            "-p",
            "1:2:3",
        ],
        &[("RPROXY_UDP_TIMEOUT", "soon"), ("RPROXY_SPLICE", "maybe")],
    );
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let expected = [
        "RPROXY_UDP_TIMEOUT=\"soon\"",
        "RPROXY_SPLICE=\"maybe\"",
        "--nat \"sometimes\"",
        "--drain-timeout \"1e20\"",
        "--metrics-addr \"nowhere\"",
        "--publish \"1:2:3\"",
        "rproxy.toml:1: publish \"8080:10.0.0.2\"",
        "rproxy.toml:2: drain_timeout",
        "rproxy.toml:3: invalid mode \"maybe\"",
    ];
    for needle in expected {
        assert!(err.contains(needle), "no {needle:?} in:\n{err}");
    }
    let listed = err.lines().filter(|l| l.starts_with("rproxy: ")).count();
    assert_eq!(listed, expected.len() + 1, "{err}");
    assert!(
        err.contains(&format!(
            "{} problems: the daemon would not start",
            expected.len()
        )),
        "{err}"
    );
    // A mapping twice is one more problem once the file parses.
    std::fs::write(&config, "publish = [\"127.0.0.1:9090:10.0.0.2:90\"]\n").unwrap();
    let (code, _, err) = check(
        &[
            "--config",
            config.to_str().unwrap(),
            "-p",
            "127.0.0.1:9090:10.0.0.3:90",
        ],
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("tcp 127.0.0.1:9090 is mapped twice"), "{err}");
    // A missing config file named on the command line is a problem, not an empty file.
    let (code, _, err) = check(&["--config", "/nonexistent/rproxy.toml"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/rproxy.toml"), "{err}");
}

/// `ls --json`: the rows the control protocol carries, one JSON array; the same mappings the
/// table shows, with their counters.
#[test]
fn ls_json_gives_scripts_the_rows() {
    let dir = Dir::new("cli-json");
    let echo = tcp_echo("127.0.0.1:0");
    let uecho = udp_echo("127.0.0.1:0");
    let base = free_ports(2);
    let tcp = format!("127.0.0.1:{base}:{echo}");
    let udp = format!("127.0.0.1:{}:{uecho}/udp", base + 1);
    let _d = daemon(&dir, &["-p", &tcp, "-p", &udp]);
    let addr = SocketAddr::from(([127, 0, 0, 1], base));
    assert_eq!(tcp_roundtrip(addr, b"json"), b"json");
    let (code, out, err) = cli(&dir, &["ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let rows: Vec<Row> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let specs: Vec<&str> = rows.iter().map(|r| r.spec.as_str()).collect();
    assert_eq!(specs, [format!("{tcp}/tcp"), udp.clone()], "{out}");
    let t = &rows[0];
    assert_eq!(
        (t.origin.as_str(), t.state.as_str()),
        ("publish", "serving")
    );
    wait_until("the connection counted", Duration::from_secs(5), || {
        let (_, out, _) = cli(&dir, &["ls", "--json"]);
        let rows: Vec<Row> = serde_json::from_str(&out).unwrap();
        rows[0].stats.total == 1 && rows[0].stats.bytes_in == 4
    });
    // The table and the JSON list the same mappings.
    let table = ls(&dir);
    assert_eq!(table.len(), rows.len());
    // No daemon: the same message and status as the table's.
    let gone = Dir::new("cli-json-gone");
    let (code, out, err) = cli(&gone, &["ls", "--json"]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("no rproxy daemon at"), "{err}");
}
