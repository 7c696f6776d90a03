//! Stop signals. dockerd stops a proxy with SIGINT and waits for it with no timeout, so both
//! SIGINT and SIGTERM must end the process promptly; SIGHUP must not kill it (the daemon
//! reloads on it).
//!
//! docker-proxy mode blocks these signals first thing ([`block`]) and unblocks them once a
//! handler exists: a shim waits for them on a signalfd without any runtime, and a self-serving
//! proxy installs tokio's handlers before unblocking, so a signal is never lost in between.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, Signal as TokioSignal, SignalKind};

/// The signals docker-proxy mode handles.
pub fn set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Holds the signals of [`set`] until [`unblock`]: none is lost before a handler exists.
pub fn block() {
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set()), None);
}

/// Lets the signals of [`set`] through again (to the handlers now installed).
pub fn unblock() {
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set()), None);
}

/// tokio handlers for SIGINT, SIGTERM and SIGHUP, and the daemon's SIGUSR2 (create inside
/// the runtime).
pub struct Signals {
    int: TokioSignal,
    term: TokioSignal,
    hup: TokioSignal,
    usr2: Option<TokioSignal>,
}

/// What a signal asks of the process.
pub enum Event {
    /// SIGINT or SIGTERM (named): stop.
    Stop(&'static str),
    /// SIGHUP: re-read the configuration.
    Reload,
    /// SIGUSR2 (the daemon): hand everything over to a new process of the program.
    Successor,
}

impl Signals {
    /// Installs the handlers (inside the runtime).
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            usr2: None,
        })
    }

    /// The daemon's handlers: also SIGUSR2.
    pub fn install_daemon() -> std::io::Result<Signals> {
        let mut s = Signals::install()?;
        s.usr2 = Some(signal(SignalKind::user_defined2())?);
        Ok(s)
    }

    /// The next signal.
    pub async fn next(&mut self) -> Event {
        let Signals {
            int,
            term,
            hup,
            usr2,
        } = self;
        let usr2 = async {
            match usr2 {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = int.recv() => Event::Stop("SIGINT"),
            _ = term.recv() => Event::Stop("SIGTERM"),
            _ = hup.recv() => Event::Reload,
            _ = usr2 => Event::Successor,
        }
    }

    /// Resolves at SIGINT or SIGTERM; SIGHUP is swallowed.
    pub async fn terminate(&mut self) -> &'static str {
        loop {
            match self.next().await {
                Event::Stop(name) => return name,
                Event::Reload => tracing::info!("SIGHUP ignored"),
                Event::Successor => {}
            }
        }
    }
}
