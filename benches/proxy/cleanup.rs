//! Cleanup: every PID started, the topology or dockerd, and the temporary directory, removed
//! by whoever gets there first (the end of `run`, a panic unwinding through it, or the signal
//! thread).

use super::*;

pub(crate) struct Registry {
    pub(crate) pids: Vec<u32>,
    pub(crate) closing: bool,
    pub(crate) topology: bool,
    /// `--dockerd`: what its teardown needs.
    pub(crate) docker: Option<DockerState>,
    pub(crate) tmp: Option<PathBuf>,
}

pub(crate) static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    closing: false,
    topology: false,
    docker: None,
    tmp: None,
});

pub(crate) fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn cleanup_all() {
    let (pids, topology, docker, tmp) = {
        let mut r = registry();
        r.closing = true;
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.topology),
            r.docker.take(),
            r.tmp.take(),
        )
    };
    for pid in pids {
        kill_tree(pid, None);
    }
    if topology {
        teardown();
    }
    // Before the directory goes: dockerd's mounts are under it.
    if let Some(docker) = docker {
        docker.teardown();
    }
    if let Some(dir) = tmp {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Runs `cleanup_all` when dropped: at the end of `run`, or while a panic unwinds.
pub(crate) struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup_all();
    }
}

pub(crate) fn install_signal_cleanup() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let spawned = thread::Builder::new()
                .name("bench-signals".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(format!("signal runtime: {e}")));
                            return;
                        }
                    };
                    let signal = rt.block_on(async {
                        use tokio::signal::unix::{signal, SignalKind};
                        let (int, term, hup) = (
                            signal(SignalKind::interrupt()),
                            signal(SignalKind::terminate()),
                            signal(SignalKind::hangup()),
                        );
                        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (int, term, hup) else {
                            let _ = tx.send(Err("cannot install signal handlers".to_string()));
                            return None;
                        };
                        let _ = tx.send(Ok(()));
                        tokio::select! {
                            _ = int.recv() => Some("SIGINT"),
                            _ = term.recv() => Some("SIGTERM"),
                            _ = hup.recv() => Some("SIGHUP"),
                        }
                    });
                    if let Some(signal) = signal {
                        eprintln!(
                            "bench: {signal}: stopping what it started and removing the topology"
                        );
                        cleanup_all();
                        std::process::exit(130);
                    }
                });
            if let Err(e) = spawned {
                return Err(format!("signal thread: {e}"));
            }
            rx.recv()
                .unwrap_or_else(|_| Err("signal thread died".into()))
        })
        .clone()
}
