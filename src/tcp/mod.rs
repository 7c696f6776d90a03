//! TCP: accept clients, dial the target with a timeout, relay both directions.

mod pipes;
pub mod relay;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::allow::AllowList;
use crate::backoff::Backoff;
use crate::mapping::describe;
use crate::proxy_protocol::{self, Version};
use crate::settings::options::Options;
use crate::stats::{Failure, Stats};
use crate::stop::Stop;

/// What the TCP path takes from a mapping's options.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long dialling the target may take before the client is reset.
    pub connect_timeout: Duration,
    /// Relay with splice(2); false copies through user space.
    pub splice: bool,
    /// The PROXY protocol header each backend connection starts with.
    pub proxy_protocol: Version,
    /// Who may connect (None: everyone).
    pub allow: Option<Arc<AllowList>>,
}

impl From<&Options> for Config {
    fn from(o: &Options) -> Config {
        Config {
            connect_timeout: o.connect_timeout,
            splice: o.splice,
            proxy_protocol: o.proxy_protocol,
            allow: o.allow.clone(),
        }
    }
}

/// A backend that ends the connection this soon after the PROXY protocol header, without a
/// byte back, is taken to have refused the header (nginx and HAProxy close at once on one
/// they cannot read); later, it is the backend's own business.
const HEADER_REFUSAL_WINDOW: Duration = Duration::from_secs(1);

/// Accepts until `stop` fires, then gives open connections the drain time to finish and cuts
/// the rest. Resource exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off and retries
/// instead of exiting as docker-proxy does: the port stays served once descriptors free up.
pub async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    config: Config,
    stats: Arc<Stats>,
    mut stop: Stop,
) {
    let mut conns = JoinSet::new();
    let mut backoff = Backoff::default();
    let drain = loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Some((client, peer)) = backoff.accepted("tcp", accepted).await {
                    if refused(&config.allow, &client, peer, &stats) {
                        continue;
                    }
                    conns.spawn(handle(client, peer, target, config.clone(), stats.clone()));
                }
            }
            // Reap finished connections so the set stays the size of what is open.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            stopping = stop.wait() => break stopping.drain,
        }
    };
    drop(listener);
    if !conns.is_empty() {
        tracing::info!("draining {} connections for up to {drain:?}", conns.len());
        let _ =
            tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    }
    // Dropping the set aborts what is left.
}

/// Resets `client` when `allow` has no room for it, before a byte is relayed or the target
/// dialled; counted, with a line now and then.
fn refused(
    allow: &Option<Arc<AllowList>>,
    client: &TcpStream,
    peer: SocketAddr,
    stats: &Stats,
) -> bool {
    let Some(list) = allow.as_ref().filter(|l| !l.admits(peer.ip())) else {
        return false;
    };
    let _ = SockRef::from(client).set_linger(Some(Duration::ZERO));
    match stats.deny() {
        Some(n) => tracing::warn!(
            "{peer}: refused, not in the allow-list ({list}){}",
            since_last(n)
        ),
        None => tracing::debug!("{peer}: refused, not in the allow-list"),
    }
    true
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    config: Config,
    stats: Arc<Stats>,
) {
    Stats::add(&stats.total, 1);
    Stats::add(&stats.active, 1);
    let accepted = std::time::Instant::now();
    let _active = Guard(&stats, accepted);
    // The client socket inherited its options from the listener (see `tune`).
    let mut backend = match connect(target, config.connect_timeout).await {
        Ok(b) => b,
        Err(e) => {
            stats.fail(Failure::of(&e));
            // Reset rather than accept-then-FIN: the client learns at once that nothing is there.
            let why = connect_error(&e);
            match stats.warning_due() {
                Some(1) => tracing::warn!("{peer}: cannot reach {target}: {why}"),
                Some(n) => tracing::warn!(
                    "{peer}: cannot reach {target}: {why} ({n} connections failed since the last warning)"
                ),
                None => tracing::debug!("{peer}: cannot reach {target}: {why}"),
            }
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    stats.timings.connected(accepted.elapsed());
    tracing::debug!("{peer}: connected to {target}");
    // The header before the relay starts: no byte of the client's (already waiting, or
    // still to come) can reach the backend ahead of it, and it goes exactly once.
    let header_sent = match config.proxy_protocol {
        Version::Off => None,
        version => match send_header(version, &client, peer, &mut backend).await {
            Ok(()) => Some(std::time::Instant::now()),
            Err(e) => {
                stats.fail(Failure::of(&e));
                let why = describe(&e);
                match stats.header_warning_due() {
                    Some(n) => tracing::warn!(
                        "{peer}: cannot send the PROXY protocol {version} header to {target}: \
                         {why}{}",
                        since_last(n)
                    ),
                    None => tracing::debug!(
                        "{peer}: cannot send the PROXY protocol {version} header to {target}: {why}"
                    ),
                }
                let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return;
            }
        },
    };
    let first_end = std::sync::OnceLock::new();
    let relayed = relay::relay(
        &mut client,
        &mut backend,
        config.splice,
        (&stats.bytes_in, &stats.bytes_out),
        &first_end,
    )
    .await;
    if let (Some(sent), Some(end)) = (header_sent, first_end.get()) {
        refused_header(&stats, peer, target, config.proxy_protocol, sent, end);
    }
    match relayed {
        Ok((up, down)) => tracing::debug!("{peer}: closed after {up} bytes up, {down} down"),
        Err(e) => {
            tracing::debug!("{peer}: aborted: {}", describe(&e));
            // Propagate the abort: both sides get a reset, not a clean FIN.
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            let _ = SockRef::from(&backend).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Writes the PROXY protocol header for `client` (whose peer is `peer`) to `backend`: the
/// client as the proxy saw it, and the address it connected to (the accepted socket's own,
/// which for a 0.0.0.0 listener is the host address the client used). The header is
/// shorter than any send buffer, so on a fresh connection it goes out in one write.
async fn send_header(
    version: Version,
    client: &TcpStream,
    peer: SocketAddr,
    backend: &mut TcpStream,
) -> io::Result<()> {
    let local = client.local_addr()?;
    let header = proxy_protocol::header(version, peer, local);
    backend.write_all(header.as_bytes()).await
}

/// Says (once per period, per mapping) that the backend ended the connection right after the
/// header without answering: the sign of a backend that does not expect it, or not this
/// version. A client that left first, or a backend that answered, is not that.
fn refused_header(
    stats: &Stats,
    peer: SocketAddr,
    target: SocketAddr,
    version: Version,
    sent: std::time::Instant,
    end: &relay::FirstEnd,
) {
    let after = end.at.saturating_duration_since(sent);
    if !end.from_b || end.bytes != 0 || after > HEADER_REFUSAL_WINDOW {
        return;
    }
    let how = match &end.error {
        Some(why) => format!("ended the connection ({why})"),
        None => "closed the connection".into(),
    };
    let ms = after.as_millis();
    match stats.header_warning_due() {
        Some(n) => tracing::warn!(
            "{peer}: {target} {how} {ms} ms after the PROXY protocol {version} header, without \
             a byte back: does it expect the header, and this version? (nginx: `listen … \
             proxy_protocol`; HAProxy: `accept-proxy`){}",
            since_last(n)
        ),
        None => tracing::debug!(
            "{peer}: {target} {how} {ms} ms after the PROXY protocol {version} header"
        ),
    }
}

/// The count a rate-limited warning carries: connections since the last one.
fn since_last(n: u64) -> String {
    match n {
        0 | 1 => String::new(),
        n => format!(" ({n} connections since the last warning)"),
    }
}

async fn connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    tune(SockRef::from(&socket));
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out",
        )),
    }
}

/// A failed connect for the log. Out of local ports (EADDRNOTAVAIL) gets its usual cause:
/// every backend connection goes from the same address to the same target, so about 28,000
/// ports serve them, and one the proxy closed first stays taken for 60 s (moby#30400).
fn connect_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => format!(
            "{}: no local port left toward it (connections closed by their client first hold \
             theirs in TIME_WAIT for 60 s; see net.ipv4.ip_local_port_range and tcp_tw_reuse)",
            describe(e)
        ),
        _ => describe(e),
    }
}

/// The options docker-proxy (Go) gives both legs: no Nagle, keepalive 15 s idle / 15 s
/// interval, the probe count left to the kernel (net.ipv4.tcp_keepalive_probes, 9 by default)
/// as Go leaves it. Set on the listener, they are inherited by every connection it accepts
/// (Linux copies them at the handshake), which saves four syscalls per connection;
/// connections that completed their handshake before (in the backlog of a socket handed over
/// by dockerd) lack them.
pub fn tune(socket: SockRef<'_>) {
    let _ = socket.set_tcp_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(15));
    let _ = socket.set_tcp_keepalive(&keepalive);
}

/// Counts a connection as closed however its task ends (finished, failed or aborted), and
/// records how long it lived.
struct Guard<'a>(&'a Stats, std::time::Instant);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        Stats::sub(&self.0.active, 1);
        self.0.timings.closed(self.1.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tune` on the listener only is enough because accepted sockets inherit the options:
    /// checked on this kernel, with a real connection.
    #[test]
    fn accepted_connections_inherit_the_listeners_options() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tune(SockRef::from(&listener));
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap(), "TCP_NODELAY not inherited");
        assert!(s.keepalive().unwrap(), "SO_KEEPALIVE not inherited");
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(15));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(15));
        let probes: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_probes")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(s.tcp_keepalive_retries().unwrap(), probes);
    }
}
