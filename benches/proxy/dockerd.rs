//! `--dockerd`: the host-* workloads against a container of a real dockerd run with
//! `--userland-proxy=false`, as the `docker-ports` deployment serves it.
//!
//! The harness starts a containerd and a dockerd of its own (own roots and sockets, under its
//! temporary directory), imports an image from a tarball (/bin/busybox with applets, `lib ->
//! usr/lib` and `lib64 -> usr/lib64`), and runs one container with the host's /usr bound
//! read-only, so that the host's iperf3, sockperf and nginx run inside it (Debian is
//! merged-/usr). The container publishes, TCP and UDP, the ports the `rproxy-docker-ports`
//! column will use; `rproxy daemon --docker-ports` starts before the container and follows it
//! for the whole run, and the run starts once the daemon serves every one of those ports by
//! its socket hooks. Servers start per measurement with `docker exec`; the clients are host
//! processes dialling 127.0.0.1:PORT (direct: the container's address).
//!
//! It holds the lock the dockerd tests hold (/run/lock/rproxy-dockerd-test.lock), waiting for
//! it, and refuses to run beside another dockerd (two fight over docker0). On the way out
//! (also on a signal or a panic) the container goes, then dockerd and containerd, and what
//! dockerd changed on the host is put back: forwarding and the FORWARD policies, docker0's
//! route_localnet, the bridge netfilter switches.

use super::*;

/// The dockerd tests' machine-wide lock (tests/dockerd.rs).
const MACHINE_LOCK: &str = "/run/lock/rproxy-dockerd-test.lock";
const CONTAINER: &str = "rpxb-docker";
const IMAGE: &str = "rpxb-docker:latest";
/// Where the container sees the harness's files (nginx configs), bound read-only.
const FILES: &str = "/rpxb";
const APPLETS: [&str; 6] = ["sh", "sleep", "kill", "cat", "ls", "ps"];
/// Host settings dockerd changes, put back as they were.
const SYSCTLS: [&str; 6] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
    "/proc/sys/net/ipv6/conf/default/forwarding",
    "/proc/sys/net/ipv4/conf/docker0/route_localnet",
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];
/// (table, chain, rule): the measured traffic skips connection tracking, whose table the
/// machine shares (a conn-rate run makes ~100,000 connections): host ↔ container over
/// docker0, and the userland proxies' loopback leg. Only the harness's ports. Tracking is
/// what dockerd's DNAT needs, so a host client the socket hooks missed gets no answer at all
/// rather than the DNAT path.
const NOTRACK: [(&str, &str, &str); 6] = [
    (
        "raw",
        "OUTPUT",
        "-o docker0 -p tcp -m multiport --dports 23000:25999 -j CT --notrack",
    ),
    (
        "raw",
        "OUTPUT",
        "-o docker0 -p udp -m multiport --dports 23000:25999 -j CT --notrack",
    ),
    (
        "raw",
        "PREROUTING",
        "-i docker0 -p tcp -m multiport --sports 23000:25999 -j CT --notrack",
    ),
    (
        "raw",
        "PREROUTING",
        "-i docker0 -p udp -m multiport --sports 23000:25999 -j CT --notrack",
    ),
    (
        "raw",
        "OUTPUT",
        "-o lo -p tcp -m multiport --ports 23000:25999 -j CT --notrack",
    ),
    (
        "raw",
        "OUTPUT",
        "-o lo -p udp -m multiport --ports 23000:25999 -j CT --notrack",
    ),
];

/// Where the servers run: the container namespace of the bridge topology, or a container.
pub(crate) enum Target {
    Netns,
    Container(Container),
}

/// The running container, and how to reach it.
pub(crate) struct Container {
    pub(crate) ip: Ipv4Addr,
    /// Its first process (host PID): /proc/PID/net shows the container's sockets.
    init: u32,
    /// Its PID namespace (/proc/PID/ns/pid's link): which processes are the container's.
    pidns: String,
    docker: PathBuf,
    sock: PathBuf,
    /// The host directory bound at FILES.
    files: PathBuf,
    /// `rproxy daemon --docker-ports`'s control socket, when that column runs.
    pub(crate) control: Option<PathBuf>,
    pub(crate) version: String,
}

/// What the teardown needs (kept in the registry, so that a signal finds it too).
pub(crate) struct DockerState {
    docker: PathBuf,
    sock: PathBuf,
    /// Mounts under it are dockerd's and containerd's, unmounted on the way out.
    root: PathBuf,
    containerd: Option<Child>,
    dockerd: Option<Child>,
    /// `rproxy daemon --docker-ports`.
    daemon: Option<Proc>,
    container: bool,
    rules: Vec<(&'static str, &'static str, &'static str)>,
    sysctls: Vec<(&'static str, String)>,
    policies: Vec<(&'static str, String)>,
    _locks: Vec<Flock<File>>,
}

/// The dockerd run, torn down when dropped.
pub(crate) struct Dockerd;

impl Drop for Dockerd {
    fn drop(&mut self) {
        let state = registry().docker.take();
        if let Some(state) = state {
            state.teardown();
        }
    }
}

fn forward_policy(tool: &str) -> Option<String> {
    let out = sh(&[tool, "-w", "-S", "FORWARD"]).ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix("-P FORWARD "))
        .map(|p| p.trim().to_string())
}

/// Another dockerd than ours, by its command name.
fn other_dockerd() -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "dockerd").then_some(pid)
    })
}

/// Runs a command to completion within `timeout`; its stdout, or why it failed.
fn run_within(mut cmd: Command, timeout: Duration) -> Result<String, String> {
    let what = format!("{:?}", cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: no answer within {} s", timeout.as_secs()));
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The host paths of the programs the mode needs, or which are missing.
struct Tools {
    dockerd: PathBuf,
    containerd: PathBuf,
    docker: PathBuf,
    busybox: PathBuf,
}

fn tools() -> Result<Tools, String> {
    let mut missing = Vec::new();
    let mut find = |name: &str| {
        find_tool(name).unwrap_or_else(|| {
            missing.push(name.to_string());
            PathBuf::new()
        })
    };
    // The distribution's CLI, which matches its dockerd, before any other on PATH.
    let docker = match Path::new("/usr/bin/docker").is_file() {
        true => PathBuf::from("/usr/bin/docker"),
        false => find("docker"),
    };
    let t = Tools {
        dockerd: find("dockerd"),
        containerd: find("containerd"),
        docker,
        busybox: find("busybox"),
    };
    // Run inside the container from the host's /usr.
    for name in ["nginx", "tar"] {
        find(name);
    }
    match missing.is_empty() {
        true => Ok(t),
        false => Err(format!(
            "--dockerd needs {} (run .ci/install-deps)",
            missing.join(", ")
        )),
    }
}

impl DockerState {
    fn docker(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd = Command::new(&self.docker);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        run_within(cmd, timeout)
    }

    /// The container, dockerd, containerd, the rules, the mounts; then the host's settings.
    pub(crate) fn teardown(mut self) {
        drop(self.daemon.take());
        if self.container {
            if let Err(e) = self.docker(&["rm", "-f", CONTAINER], Duration::from_secs(60)) {
                eprintln!("bench: cleanup: {e}");
            }
        }
        for (child, name, patience) in [
            (self.dockerd.take(), "dockerd", 30),
            (self.containerd.take(), "containerd", 10),
        ] {
            let Some(mut child) = child else { continue };
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(patience);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("bench: cleanup: {name} did not stop within {patience} s; SIGKILL");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        for (table, chain, rule) in self.rules.drain(..) {
            let mut args = vec!["iptables", "-w", "-t", table, "-D", chain];
            args.extend(rule.split(' '));
            if let Err(e) = sh(&args) {
                eprintln!("bench: cleanup: {e}");
            }
        }
        // Deepest first; detached, so that nothing under the directory is a mount when it is
        // removed (the container's root holds the host's /usr, read-only).
        let prefix = format!("{}/", self.root.display());
        let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        points.dedup();
        for p in points {
            if let Err(e) = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("bench: cleanup: umount {p}: {e}");
            }
        }
        for (tool, policy) in &self.policies {
            if forward_policy(tool).as_ref() != Some(policy) {
                if let Err(e) = sh(&[tool, "-w", "-P", "FORWARD", policy]) {
                    eprintln!("bench: cleanup: {e}");
                }
            }
        }
        for (path, value) in &self.sysctls {
            let now = fs::read_to_string(path).unwrap_or_default();
            if now.trim() != value {
                if let Err(e) = fs::write(path, value) {
                    eprintln!("bench: cleanup: {path}: {e}");
                }
            }
        }
    }
}

impl Dockerd {
    /// containerd, dockerd `--userland-proxy=false`, the image, `rproxy daemon --docker-ports`
    /// when `daemon`, and the container publishing `ports` (TCP and UDP each); returns once
    /// the daemon serves them all.
    pub(crate) fn up(
        dir: &Path,
        rproxy: &Path,
        ports: &BTreeSet<u16>,
        daemon: bool,
    ) -> Result<(Dockerd, Container), String> {
        let t = tools()?;
        let mut locks = vec![lock_wait(LOCK_PATH, "owns the benchmark's ports")?];
        locks.push(lock_wait(MACHINE_LOCK, "runs a dockerd")?);
        if let Some(pid) = other_dockerd() {
            return Err(format!(
                "another dockerd runs (pid {pid}); stop it first: two fight over docker0"
            ));
        }
        let root = dir.join("docker");
        fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let sock = root.join("docker.sock");
        let state = DockerState {
            docker: t.docker.clone(),
            sock: sock.clone(),
            root: root.clone(),
            containerd: None,
            dockerd: None,
            daemon: None,
            container: false,
            rules: Vec::new(),
            sysctls: SYSCTLS
                .iter()
                .filter_map(|p| Some((*p, fs::read_to_string(p).ok()?.trim().to_string())))
                .collect(),
            policies: ["iptables", "ip6tables"]
                .into_iter()
                .filter_map(|t| Some((t, forward_policy(t)?)))
                .collect(),
            _locks: locks,
        };
        registry().docker = Some(state);
        let guard = Dockerd;
        let log = |name: &str| {
            let p = root.join(format!("{name}.log"));
            File::create(&p).map_err(|e| format!("{}: {e}", p.display()))
        };
        // containerd and dockerd stay out of the registry's PIDs: the teardown stops them,
        // after the container.
        let ctd_sock = root.join("containerd.sock");
        let mut cmd = Command::new(&t.containerd);
        cmd.arg("--root")
            .arg(root.join("containerd"))
            .arg("--state")
            .arg(root.join("containerd-state"))
            .arg("--address")
            .arg(&ctd_sock)
            .stdin(Stdio::null())
            .stdout(log("containerd")?)
            .stderr(log("containerd")?);
        let child = cmd.spawn().map_err(|e| format!("containerd: {e}"))?;
        with_state(|s| s.containerd = Some(child));
        wait_until(Duration::from_secs(10), "containerd's socket", || {
            ctd_sock.exists().then_some(())
        })?;
        let config = root.join("daemon.json");
        fs::write(&config, "{}\n").map_err(|e| format!("{}: {e}", config.display()))?;
        let mut cmd = Command::new(&t.dockerd);
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .arg(format!("--containerd={}", ctd_sock.display()))
            .args(["--userland-proxy=false", "--shutdown-timeout=2"])
            .env_remove("DOCKER_HOST")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log("dockerd")?)
            .stderr(log("dockerd")?);
        let child = cmd.spawn().map_err(|e| format!("dockerd: {e}"))?;
        with_state(|s| s.dockerd = Some(child));
        let docker = |args: &[&str], secs: u64| {
            let mut cmd = Command::new(&t.docker);
            cmd.arg("-H")
                .arg(format!("unix://{}", sock.display()))
                .args(args);
            run_within(cmd, Duration::from_secs(secs))
        };
        let version = wait_until(Duration::from_secs(60), "dockerd's API", || {
            docker(&["version", "--format", "{{.Server.Version}}"], 10).ok()
        })
        .map_err(|e| format!("{e}; {}", tail_file(&root.join("dockerd.log"))))?;
        eprintln!(
            "bench: dockerd {} up (--userland-proxy=false)",
            version.trim()
        );

        let image = root.join("image");
        build_image(&image, &t.busybox)?;
        let tarball = root.join("image.tar");
        sh(&[
            "tar",
            "-C",
            &image.to_string_lossy(),
            "-cf",
            &tarball.to_string_lossy(),
            ".",
        ])?;
        docker(&["import", &tarball.to_string_lossy(), IMAGE], 120)?;

        let control = daemon.then(|| dir.join("docker-ports.sock"));
        if let Some(control) = &control {
            let p = start_docker_ports(dir, rproxy, &sock, control)?;
            with_state(|s| s.daemon = Some(p));
        }

        let files = dir.join("files");
        fs::create_dir_all(&files).map_err(|e| format!("{}: {e}", files.display()))?;
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            CONTAINER,
            "-v",
            "/usr:/usr:ro",
            "-v",
            &format!("{}:{FILES}:ro", files.display()),
        ]
        .map(str::to_string)
        .to_vec();
        for p in ports {
            args.extend(["-p".into(), format!("{p}:{p}")]);
            args.extend(["-p".into(), format!("{p}:{p}/udp")]);
        }
        args.extend([IMAGE.into(), "sleep".into(), "1d".into()]);
        with_state(|s| s.container = true);
        let started = Instant::now();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&argv, 300)?;
        eprintln!(
            "bench: container {CONTAINER} up, {} ports published (TCP and UDP) in {:.1} s",
            ports.len(),
            started.elapsed().as_secs_f64()
        );
        let inspect = docker(
            &[
                "inspect",
                "-f",
                "{{.NetworkSettings.IPAddress}} {{.State.Pid}}",
                CONTAINER,
            ],
            30,
        )?;
        let mut words = inspect.split_whitespace();
        let (Some(ip), Some(init)) = (
            words.next().and_then(|w| w.parse().ok()),
            words.next().and_then(|w| w.parse().ok()),
        ) else {
            return Err(format!("docker inspect {CONTAINER}: {inspect:?}"));
        };
        let pidns = pidns(init).ok_or_else(|| format!("no /proc/{init}/ns/pid"))?;

        for rule in NOTRACK {
            let (table, chain, spec) = rule;
            let mut args = vec!["iptables", "-w", "-t", table, "-I", chain];
            args.extend(spec.split(' '));
            sh(&args)?;
            with_state(|s| s.rules.push(rule));
        }

        let c = Container {
            ip,
            init,
            pidns,
            docker: t.docker.clone(),
            sock: sock.clone(),
            files,
            control,
            version: version.trim().to_string(),
        };
        if let Some(control) = &c.control {
            let waited = Instant::now();
            wait_served(rproxy, control, ports)?;
            eprintln!(
                "bench: rproxy daemon --docker-ports serves them all by its socket hooks \
                 ({:.1} s after docker run returned)",
                waited.elapsed().as_secs_f64()
            );
        }
        Ok((guard, c))
    }
}

fn with_state(f: impl FnOnce(&mut DockerState)) {
    if let Some(s) = registry().docker.as_mut() {
        f(s)
    }
}

fn tail_file(path: &Path) -> String {
    format!(
        "{}: {}",
        path.display(),
        tail(&fs::read_to_string(path).unwrap_or_default(), 4)
    )
}

/// Polls `f` every 100 ms until it gives a value, for at most `patience`.
fn wait_until<T>(
    patience: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("no {what} after {} s", patience.as_secs()));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The image's tree: busybox and a few applets, the library links into /usr (bound from the
/// host), users for nginx, and the directories nginx and iperf3 write to.
fn build_image(root: &Path, busybox: &Path) -> Result<(), String> {
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    for d in ["bin", "etc", "tmp", "run", "var/lib/nginx", "var/log/nginx"] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
    }
    use std::os::unix::fs::{symlink, PermissionsExt};
    let tmp = root.join("tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(|e| io(&tmp, e))?;
    let bin = root.join("bin/busybox");
    fs::copy(busybox, &bin).map_err(|e| io(&bin, e))?;
    for applet in APPLETS {
        let p = root.join("bin").join(applet);
        symlink("busybox", &p).map_err(|e| io(&p, e))?;
    }
    for (link, to) in [("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        let p = root.join(link);
        symlink(to, &p).map_err(|e| io(&p, e))?;
    }
    for (file, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        let p = root.join(file);
        fs::write(&p, text).map_err(|e| io(&p, e))?;
    }
    Ok(())
}

/// `rproxy daemon --docker-ports` following our dockerd, with its own control socket; returns
/// once it answers there.
fn start_docker_ports(
    dir: &Path,
    rproxy: &Path,
    sock: &Path,
    control: &Path,
) -> Result<Proc, String> {
    let config = dir.join("docker-ports.toml");
    fs::write(&config, "publish = []\n").map_err(|e| format!("{}: {e}", config.display()))?;
    let mut cmd = Command::new(rproxy);
    cmd.arg("daemon")
        .arg("--config")
        .arg(&config)
        .arg("--control-socket")
        .arg(control)
        .arg("--docker-ports")
        .arg(format!("--docker-host=unix://{}", sock.display()))
        .args(["--drain-timeout", "0"])
        .env("RPROXY_LOG", "info")
        .env_remove("RPROXY_LOG_FILE")
        .env_remove("RPROXY_METRICS_ADDR")
        .env_remove("RPROXY_SOCKET")
        .env_remove("NOTIFY_SOCKET");
    let mut p = Proc::spawn(cmd, "rproxy-docker-ports", dir)?;
    let answered = wait_until(
        Duration::from_secs(20),
        "answer on its control socket",
        || {
            if p.exited().is_some() {
                return Some(false);
            }
            ls_rows(rproxy, control).ok().map(|_| true)
        },
    );
    match answered {
        Ok(true) => Ok(p),
        Ok(false) => Err(format!("rproxy daemon --docker-ports exited{}", p.logs())),
        Err(e) => Err(format!("rproxy daemon --docker-ports: {e}{}", p.logs())),
    }
}

/// Waits until the daemon lists 0.0.0.0:P of our container, TCP and UDP, for every port, each
/// on the socket hooks.
fn wait_served(rproxy: &Path, control: &Path, ports: &BTreeSet<u16>) -> Result<(), String> {
    let missing = || -> Vec<String> {
        let rows = ls_rows(rproxy, control).unwrap_or_default();
        ports
            .iter()
            .flat_map(|p| [(Proto::Tcp, *p), (Proto::Udp, *p)])
            .filter(|(proto, p)| {
                !rows.iter().any(|r| {
                    cell(r, "PROTO") == proto.name()
                        && cell(r, "LISTEN") == format!("0.0.0.0:{p}")
                        && cell(r, "CONTAINER") == CONTAINER
                        && cell(r, "SOCKET") == "socket"
                })
            })
            .map(|(proto, p)| format!("{p}/{}", proto.name()))
            .collect()
    };
    wait_until(Duration::from_secs(60), "full service", || {
        missing().is_empty().then_some(())
    })
    .map_err(|e| {
        format!(
            "rproxy daemon --docker-ports: {e}: not served by the socket hooks: {}",
            missing().join(" ")
        )
    })
}

/// /proc/PID/ns/pid's link.
fn pidns(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

impl Container {
    /// Host PIDs of the container's processes.
    fn pids(&self) -> BTreeSet<u32> {
        let Ok(dir) = fs::read_dir("/proc") else {
            return BTreeSet::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&p| pidns(p).as_deref() == Some(self.pidns.as_str()))
            .collect()
    }

    /// `docker exec CONTAINER [taskset -c CPU] ARGV…`, returned once something in the
    /// container listens on (or, UDP, has bound) `addr`. The process it started in there is
    /// stopped, by its PID, with it.
    pub(crate) fn exec(
        &self,
        dir: &Path,
        name: &str,
        pin: bool,
        argv: &[&str],
        proto: Proto,
        addr: SocketAddrV4,
    ) -> Result<Proc, String> {
        let before = self.pids();
        let mut cmd = Command::new(&self.docker);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(["exec", CONTAINER]);
        if pin {
            cmd.args(["taskset", "-c", PIN_CPU]);
        }
        cmd.args(argv);
        let mut p = Proc::spawn(cmd, name, dir)?;
        wait_bound_at(&mut p, self.init, proto, addr)?;
        p.inside = self.pids().difference(&before).copied().collect();
        p.pidns = Some(self.pidns.clone());
        Ok(p)
    }

    /// nginx answering every request with "ok" on `addr` (one worker, as the harness's own
    /// server is one thread), in the container.
    pub(crate) fn nginx(&self, dir: &Path, addr: SocketAddrV4) -> Result<Proc, String> {
        let port = addr.port();
        let name = format!("nginx-{port}.conf");
        let config = [
            "user nobody nogroup;".to_string(),
            "worker_processes 1;".into(),
            "daemon off;".into(),
            "error_log stderr warn;".into(),
            format!("pid /tmp/nginx-{port}.pid;"),
            "events { worker_connections 8192; }".into(),
            "http {".into(),
            "    access_log off;".into(),
            format!("    server {{ listen {addr} backlog=4096; return 200 \"ok\"; }}"),
            "}\n".into(),
        ]
        .join("\n");
        let path = self.files.join(&name);
        fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
        let inside = format!("{FILES}/{name}");
        self.exec(
            dir,
            "nginx",
            false,
            &["nginx", "-e", "stderr", "-c", &inside],
            Proto::Tcp,
            addr,
        )
    }
}

/// Takes `path`'s lock (flock, exclusive), waiting for whoever holds it.
pub(crate) fn lock_wait(path: &str, holder: &str) -> Result<Flock<File>, String> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, _)) => {
            eprintln!("bench: another run holds {path} (it {holder}); waiting");
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| format!("{path}: {e}"))
        }
    }
}
