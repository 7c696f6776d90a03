//! Stop signals. dockerd stops a proxy with SIGINT and waits for it with no timeout, so both
//! SIGINT and SIGTERM must end the process promptly; SIGHUP must not kill it.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves with the signal's name when SIGINT or SIGTERM arrives. SIGHUP is swallowed (a
/// terminal closing must not take published ports down).
pub async fn terminate() -> &'static str {
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = int.recv() => return "SIGINT",
            _ = term.recv() => return "SIGTERM",
            _ = hup.recv() => tracing::info!("SIGHUP ignored"),
        }
    }
}
