//! Processes the harness starts and stops: proxies, servers and load tools.

use super::*;

/// `pid` and everything below it, parents first.
pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, ppid)) = stat(p) {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// (state, ppid) from /proc/PID/stat.
pub(crate) fn stat(pid: u32) -> Option<(char, u32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

pub(crate) fn running(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// SIGTERM to `pid` and its descendants, SIGKILL to whatever is left after 3 s; reaps `child`.
pub(crate) fn kill_tree(pid: u32, mut child: Option<&mut Child>) {
    let pids = process_tree(pid);
    for &p in pids.iter().rev() {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(c) = child.as_deref_mut() {
            let _ = c.try_wait();
        }
        let left: Vec<u32> = pids.iter().copied().filter(|&p| running(p)).collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for p in left {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    if let Some(c) = child {
        let _ = c.wait();
    }
}

pub(crate) static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A child process with stdout/stderr in files, stopped (with its descendants) when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) name: String,
    pub(crate) out: PathBuf,
    pub(crate) err: PathBuf,
    pub(crate) stopped: bool,
    /// What it started in a container (`docker exec`): host PIDs, stopped before it.
    pub(crate) inside: Vec<u32>,
    /// That container's PID namespace: a PID of `inside` is stopped only while it is still
    /// the container's.
    pub(crate) pidns: Option<String>,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command, name: &str, dir: &Path) -> Result<Proc, String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = dir.join(format!("{n:05}-{}", name.replace(['/', ' '], "_")));
        let out = base.with_extension("out");
        let err = base.with_extension("err");
        let file = |p: &Path| File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        cmd.stdin(Stdio::null())
            .stdout(file(&out)?)
            .stderr(file(&err)?);
        let mut reg = registry();
        if reg.closing {
            return Err("interrupted".into());
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        reg.pids.push(child.id());
        drop(reg);
        // Drop `cmd` now: fds mapped into the child (status pipes) must have no copy left here.
        drop(cmd);
        Ok(Proc {
            child,
            name: name.to_string(),
            out,
            err,
            stopped: false,
            inside: Vec::new(),
            pidns: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Waits for the process to exit; `Ok(status)` or `Err` after `timeout`.
    pub(crate) fn wait_for(
        &mut self,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() > deadline => {
                    return Err(format!(
                        "{} did not finish within {} s{}",
                        self.name,
                        timeout.as_secs(),
                        self.logs()
                    ))
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("{}: wait: {e}", self.name)),
            }
        }
    }

    pub(crate) fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub(crate) fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// "; NAME said: …" with the last lines of its output, or "" when it said nothing.
    pub(crate) fn logs(&self) -> String {
        let text = format!("{}{}", self.stdout(), self.stderr());
        let t = tail(&text, 4);
        match t.is_empty() {
            true => String::new(),
            false => format!("; {} said: {t}", self.name),
        }
    }

    pub(crate) fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            for &p in &self.inside {
                let link = fs::read_link(format!("/proc/{p}/ns/pid"))
                    .map(|l| l.to_string_lossy().into_owned())
                    .ok();
                if link.is_some() && link == self.pidns {
                    kill_tree(p, None);
                }
            }
            let pid = self.pid();
            kill_tree(pid, Some(&mut self.child));
            registry().pids.retain(|&p| p != pid);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

pub(crate) fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| name.into())
}

/// The tools the harness needs and cannot find (docker-proxy is optional).
pub fn missing_tools() -> Vec<&'static str> {
    TOOLS
        .into_iter()
        .filter(|t| find_tool(t).is_none())
        .collect()
}

/// `[ip netns exec NS] [taskset -c CPU] PROGRAM`.
pub(crate) fn command(ns: Option<&str>, pin: bool, program: impl AsRef<Path>) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(ns) = ns {
        argv.extend([tool("ip").into(), "netns".into(), "exec".into(), ns.into()]);
    }
    if pin {
        argv.extend([tool("taskset").into(), "-c".into(), PIN_CPU.into()]);
    }
    argv.push(program.as_ref().into());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

pub(crate) struct ToolOut {
    pub(crate) ok: bool,
    pub(crate) status: String,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs a client tool to completion (killed after `timeout`).
pub(crate) fn run_tool(
    ctx: &Ctx,
    cmd: Command,
    name: &str,
    timeout: Duration,
) -> Result<ToolOut, String> {
    let mut p = Proc::spawn(cmd, name, &ctx.dir)?;
    let status = p.wait_for(timeout)?;
    Ok(ToolOut {
        ok: status.success(),
        status: status.to_string(),
        stdout: p.stdout(),
        stderr: p.stderr(),
    })
}

/// Host command that must succeed (topology set-up).
pub(crate) fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool(args[0]))
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}
