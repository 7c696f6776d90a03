//! The daemon's side of the control socket. Nothing a client does may hold the daemon: a
//! request must arrive within [`REQUEST_TIMEOUT`], at most [`MAX_PENDING`] connections wait
//! for theirs (the oldest is dropped for a new one, so a pile of idle connections never
//! locks `rproxy ls` out), and replies that cannot be written within [`REPLY_TIMEOUT`] are
//! given up. A shim's registration is released however its connection ends.
//!
//! The daemon keeps a copy of each shim's connection: a takeover hands it, with the port, to
//! the new daemon, which [adopts](Server::adopt) it — the shim never notices. When the
//! daemon stops, it [lets go](Server::release) of every connection at once, so the shims
//! serve their ports themselves while it drains.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};

use super::handover::{self, Giver, ShimConn};
use super::{Refusal, Reply, Request, Row, MAX_REQUEST};
use crate::backoff::Backoff;
use crate::frontend;
use crate::mapping::{describe, parse_publish, Mapping, Proto};
use crate::proxy_protocol::{PortRules, Version};
use crate::settings::options::{Options, Overrides};
use crate::supervisor::{key, Change, Key, Listener, Origin, Start, Supervisor};
use crate::sys::fd::recv_with_fds;

/// How long a client may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reply may take to be written (a client that does not read).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections waiting for their request at once; registered shims do not count.
pub const MAX_PENDING: usize = 64;

/// The daemon's `[[proxy_protocol]]` rules for ports shims hand over, shared with the reload
/// that replaces them. Held across a registration's start, and across a reload's change and
/// the swap of the rules, so a port registers under the old rules (and the reload then
/// updates it) or under the new ones, never in between.
pub type SharedRules = Arc<tokio::sync::Mutex<PortRules>>;

/// What every request is served with.
struct Ctx {
    sup: Supervisor,
    /// Drain time of mappings `rm` stops.
    drain: Duration,
    /// Options of mappings that name none.
    defaults: Options,
    /// Those of dockerd's ports (shims' registrations): `defaults` with `docker_allow`.
    dockerd_defaults: Options,
    /// The daemon's own uid, which may change mappings besides root.
    own_uid: u32,
    /// The PROXY protocol of ports shims hand over.
    port_rules: SharedRules,
    /// Connection ids, which shims' origins carry.
    next_id: AtomicU64,
    /// The registered shims, by id.
    shims: Mutex<HashMap<u64, Shim>>,
    /// True once every registration must let go of its connection.
    release: watch::Sender<bool>,
    /// What a takeover hands over besides the mappings (None: no takeover yet possible).
    giver: OnceLock<Giver>,
    /// The process a takeover under way hands over to (0: none), for `moved` and for the
    /// stopping daemon, which must leave the control socket to it. Only the takeover that
    /// froze the supervisor sets and clears it ([`handover::give`]): one that is refused
    /// must not touch the one under way.
    taker: AtomicU32,
}

/// A registered shim, as a takeover hands it over.
struct Shim {
    /// A copy of its connection.
    conn: OwnedFd,
    /// The options its environment set.
    options: Overrides,
}

/// The daemon's control socket server: cheap to clone (shared).
#[derive(Clone)]
pub struct Server {
    ctx: Arc<Ctx>,
}

/// Connections still waiting for their request, oldest first, each with its eviction signal.
#[derive(Default)]
struct Pending(Mutex<VecDeque<(u64, oneshot::Sender<()>)>>);

impl Pending {
    /// Adds connection `id`, evicting the oldest when full; returns its eviction signal.
    fn add(&self, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while q.len() >= MAX_PENDING {
            if let Some((old, evict)) = q.pop_front() {
                tracing::debug!("control: dropping connection {old}, idle without a request");
                let _ = evict.send(());
            }
        }
        q.push_back((id, tx));
        rx
    }

    fn done(&self, id: u64) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|(i, _)| *i != id);
    }
}

impl Server {
    /// A server changing `sup`: `rm` gives connections `drain`, mappings naming no options
    /// get `defaults`, ports shims hand over get the PROXY protocol `port_rules` give them.
    pub fn new(
        sup: Supervisor,
        drain: Duration,
        defaults: Options,
        dockerd_defaults: Options,
        port_rules: SharedRules,
    ) -> Server {
        Server {
            ctx: Arc::new(Ctx {
                sup,
                drain,
                defaults,
                dockerd_defaults,
                own_uid: nix::unistd::geteuid().as_raw(),
                port_rules,
                next_id: AtomicU64::new(0),
                shims: Mutex::default(),
                release: watch::Sender::new(false),
                giver: OnceLock::new(),
                taker: AtomicU32::new(0),
            }),
        }
    }

    /// Lets a new daemon take everything over (`takeover`), with these sockets besides the
    /// mappings. Set once.
    pub fn accept_takeovers(&self, giver: Giver) {
        let _ = self.ctx.giver.set(giver);
    }

    /// The origin of a shim registration not made here (handed over by a previous daemon).
    pub fn shim_origin(&self) -> Origin {
        Origin::Shim(self.ctx.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Takes over a shim's registration from a previous daemon: `conn` is its connection,
    /// the mapping runs already under `key` and `origin` (from [`Server::shim_origin`]).
    /// From here on it is as if the shim had registered here.
    pub fn adopt(&self, conn: OwnedFd, key: Key, origin: Origin, options: Overrides) {
        let stream = std::os::unix::net::UnixStream::from(conn);
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(stream));
        match stream {
            Ok(stream) => {
                let ctx = self.ctx.clone();
                tokio::spawn(async move { hold(stream, &ctx, key, origin, options).await });
            }
            Err(e) => {
                tracing::warn!("cannot keep a shim's connection: {}", describe(&e));
                let _ = Registration::new(self.ctx.clone(), key, origin);
            }
        }
    }

    /// Whether a takeover is under way (the control socket may be another daemon's).
    pub fn handing_over(&self) -> bool {
        self.ctx.taker.load(Ordering::Relaxed) != 0
    }

    /// Lets go of every shim's connection (the daemon stops, or another one holds them now).
    pub fn release(&self) {
        self.ctx.release.send_replace(true);
    }

    /// Accepts control connections until the task is dropped; each is served on its own task.
    pub async fn serve(self, listener: UnixListener) {
        serve(listener, self.ctx).await
    }
}

async fn serve(listener: UnixListener, ctx: Arc<Ctx>) {
    let pending = Arc::new(Pending::default());
    let mut backoff = Backoff::default();
    loop {
        let Some((stream, _)) = backoff.accepted("control", listener.accept().await).await else {
            continue;
        };
        let id = ctx.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let evicted = pending.add(id);
        let (ctx, pending) = (ctx.clone(), pending.clone());
        tokio::spawn(async move {
            let read = tokio::select! {
                r = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&stream)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(Refusal::Other(format!(
                        "no request within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    ))),
                },
                _ = evicted => Err(Refusal::Other("too many connections waiting".into())),
            };
            pending.done(id);
            let result = match read {
                Ok(Some((request, fds))) => handle(stream, request, fds, &ctx, id).await,
                Ok(None) => Ok(()),
                Err(why) => {
                    tracing::debug!("control connection {id}: {why}");
                    let mut stream = stream;
                    reply(&mut stream, &Reply::Error { message: why }).await
                }
            };
            if let Err(e) = result {
                tracing::debug!("control connection {id}: {}", describe(&e));
            }
        });
    }
}

/// Reads the request line and any descriptors sent with it; None when the client closed
/// without a request.
async fn read_request(stream: &UnixStream) -> Result<Option<(Request, Vec<OwnedFd>)>, Refusal> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let mut fds = Vec::new();
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return Err(Refusal::Other(format!(
                "request longer than {MAX_REQUEST} bytes"
            )));
        }
        let (n, mut got) = stream
            .async_io(Interest::READABLE, || {
                recv_with_fds(stream.as_fd(), &mut buf[len..])
            })
            .await
            .map_err(|e| Refusal::Other(describe(&e)))?;
        fds.append(&mut got);
        if n == 0 {
            return Ok(None);
        }
        len += n;
    }
    let end = buf[..len].iter().position(|&b| b == b'\n').unwrap_or(len);
    Request::decode(&buf[..end]).map(|r| Some((r, fds)))
}

/// Serves one request.
async fn handle(
    mut stream: UnixStream,
    request: Request,
    fds: Vec<OwnedFd>,
    ctx: &Arc<Ctx>,
    id: u64,
) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    if !matches!(request, Request::Ls {}) && uid != 0 && uid != ctx.own_uid {
        tracing::warn!("control: uid {uid} may not change mappings");
        let message = Refusal::Other(format!(
            "permission denied: uid {uid} may not change mappings (only root or uid {})",
            ctx.own_uid
        ));
        return reply(&mut stream, &Reply::Error { message }).await;
    }
    let answer = match request {
        Request::Ls {} => Ok(Reply::Mappings {
            rows: rows(&ctx.sup).await,
        }),
        Request::Add { spec, options } => add(ctx, &spec, options).await,
        Request::Rm { spec } => remove(ctx, &spec).await,
        Request::Register { spec, options } => {
            return register(stream, ctx, &spec, options, fds, id).await
        }
        Request::Takeover {} => return takeover(stream, ctx).await,
    };
    let answer = answer.unwrap_or_else(|message| refusal(ctx, message));
    reply(&mut stream, &answer).await
}

/// A refused change as the client gets it: while a takeover is under way, `moved` (ask
/// again, of the process it names).
fn refusal(ctx: &Ctx, message: Refusal) -> Reply {
    match (message, ctx.taker.load(Ordering::Relaxed)) {
        (Refusal::HandingOver, pid) if pid != 0 => Reply::Moved { pid },
        (message, _) => Reply::Error { message },
    }
}

/// `takeover`: hands everything to the asking process (see [`handover`]).
async fn takeover(mut stream: UnixStream, ctx: &Ctx) -> io::Result<()> {
    let Some(giver) = ctx.giver.get() else {
        let message = Refusal::Other("this daemon cannot hand over yet (still starting)".into());
        return reply(&mut stream, &Reply::Error { message }).await;
    };
    let to = stream.peer_cred()?.pid().map_or(0, |p| p as u32);
    let shim = |id: u64| {
        let shims = ctx.shims.lock().unwrap_or_else(|e| e.into_inner());
        let s = shims.get(&id)?;
        Some(ShimConn {
            conn: s.conn.try_clone().ok()?,
            options: s.options.clone(),
        })
    };
    handover::give(stream, to, &ctx.sup, giver, &ctx.taker, shim).await
}

async fn reply(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let line = format!("{}\n", reply.encode());
    match tokio::time::timeout(REPLY_TIMEOUT, stream.write_all(line.as_bytes())).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client does not read its reply",
        )),
    }
}

/// `ls`: every mapping with its counters and kernel path.
async fn rows(sup: &Supervisor) -> Vec<Row> {
    let pid = std::process::id();
    let statuses = sup.statuses();
    let kernel = sup.kernel_connections(&statuses).await;
    let denied = sup.kernel_denied(&statuses).await;
    statuses
        .into_iter()
        .map(|s| Row {
            denied: s.stats.denied.load(std::sync::atomic::Ordering::Relaxed)
                + denied.get(&s.mapping.spec()).copied().unwrap_or(0),
            nat: s.path.as_ref().map_or("-", |p| p.label()).into(),
            kernel_connections: kernel.get(&s.mapping.spec()).copied().unwrap_or(0),
            socket: s.socket_lb.as_ref().map_or("-", |p| p.label()).into(),
            socket_connections: sup.socket_lb().counters(&s.mapping).0,
            proxy_protocol: match s.mapping.options.proxy_protocol {
                Version::Off => "-".into(),
                v => v.to_string(),
            },
            spec: s.mapping.spec(),
            container: s.origin.container().unwrap_or_default().to_string(),
            origin: s.origin.to_string(),
            state: if s.serving { "serving" } else { "stopped" }.into(),
            stats: s.stats.snapshot(),
            pid,
            listener: s.listener,
            allow: s
                .mapping
                .options
                .allow
                .as_ref()
                .map(|a| a.nets().iter().map(ToString::to_string).collect()),
        })
        .collect()
}

fn specs(mappings: &[Mapping]) -> Vec<String> {
    mappings.iter().map(Mapping::spec).collect()
}

/// `add`: all of the spec's mappings start, or none do.
async fn add(ctx: &Ctx, spec: &str, options: Overrides) -> Result<Reply, Refusal> {
    let mappings = parse_publish(spec, options.apply(&ctx.defaults)?)?;
    let started = ctx
        .sup
        .change(Duration::ZERO, |_| {
            Ok(Change {
                stop: Vec::new(),
                start: mappings
                    .iter()
                    .map(|m| Start {
                        mapping: m.clone(),
                        listener: Listener::Bind,
                        origin: Origin::Control,
                    })
                    .collect(),
            })
        })
        .await?;
    Ok(Reply::Done {
        mappings: specs(&started),
        proxy_protocol: Version::Off,
    })
}

/// `rm`: stops the spec's mappings (matched by protocol and listen address), all or none.
/// Ports dockerd published stay: dockerd believes them served until it stops them itself.
async fn remove(ctx: &Ctx, spec: &str) -> Result<Reply, Refusal> {
    let wanted = parse_publish(spec, Options::default())?;
    let mut stopped = Vec::new();
    ctx.sup
        .change(ctx.drain, |current| {
            let mut stop = Vec::new();
            for m in &wanted {
                let Some(c) = current.get(&key(m)) else {
                    continue;
                };
                if c.mapping.target != m.target {
                    return Err(format!(
                        "{} {} maps to {}, not {}",
                        m.proto, m.listen, c.mapping.target, m.target
                    ));
                }
                if let Some(name) = c.origin.container() {
                    return Err(format!(
                        "{} {} is published by dockerd for container {name}: stop or remove \
                         the container, or its port mapping, with docker instead",
                        m.proto, m.listen
                    ));
                }
                if let Origin::Shim(_) = c.origin {
                    return Err(format!(
                        "{} {} is published by dockerd (a docker-mode proxy handed it over): \
                         dockerd would still believe it served; stop or remove the container, \
                         or its port mapping, with docker instead",
                        m.proto, m.listen
                    ));
                }
                stop.push(key(m));
                stopped.push(c.mapping.clone());
            }
            if stop.is_empty() {
                return Err(format!("no mapping matches {spec:?}"));
            }
            Ok(Change {
                stop,
                start: Vec::new(),
            })
        })
        .await?;
    Ok(Reply::Done {
        mappings: specs(&stopped),
        proxy_protocol: Version::Off,
    })
}

/// Releases a shim's mapping however its connection's task ends: the shim closed, the
/// reply could not be written, the task was dropped. Not when the daemon let go of the
/// connection ([`Server::release`]): the mapping stops with the rest, or lives on in the
/// daemon that took it over.
struct Registration {
    ctx: Arc<Ctx>,
    key: Key,
    origin: Origin,
}

impl Registration {
    fn new(ctx: Arc<Ctx>, key: Key, origin: Origin) -> Registration {
        Registration { ctx, key, origin }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Origin::Shim(id) = self.origin {
            let mut shims = self.ctx.shims.lock().unwrap_or_else(|e| e.into_inner());
            shims.remove(&id);
        }
        if *self.ctx.release.borrow() {
            return;
        }
        let (sup, key, origin) = (self.ctx.sup.clone(), self.key, self.origin.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = sup
                .change(Duration::ZERO, |current| {
                    let ours = current.get(&key).is_some_and(|c| c.origin == origin);
                    Ok(Change {
                        stop: ours.then_some(key).into_iter().collect(),
                        start: Vec::new(),
                    })
                })
                .await;
        });
    }
}

/// `register` + socket: serve it for as long as the shim keeps this connection open.
async fn register(
    mut stream: UnixStream,
    ctx: &Arc<Ctx>,
    spec: &str,
    options: Overrides,
    mut fds: Vec<OwnedFd>,
    id: u64,
) -> io::Result<()> {
    let origin = Origin::Shim(id);
    let started = async {
        if options.proxy_protocol.is_some() {
            return Err(Refusal::Other(
                "register: a handed-over port's PROXY protocol comes from the daemon's \
                 [[proxy_protocol]] rules"
                    .to_string(),
            ));
        }
        let options = options.apply(&ctx.dockerd_defaults)?;
        let mut mapping = match parse_publish(spec, options)?.as_slice() {
            [m] => m.clone(),
            _ => return Err(Refusal::Other("register takes exactly one port".into())),
        };
        // Held until the mapping runs: a reload swaps the rules only around its own change.
        let rules = ctx.port_rules.lock().await;
        if mapping.proto == Proto::Tcp {
            mapping.options.proxy_protocol = rules.version_for(mapping.listen.port());
        }
        let fd = match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => fd,
            _ => {
                return Err(Refusal::Other(
                    "register needs exactly one listening socket".into(),
                ))
            }
        };
        let socket = frontend::check(&mapping, fd)?;
        // The socket's own address is the key: a spec that says otherwise would file the
        // port under a key nothing could stop it by.
        match frontend::local_addr(&socket) {
            Some(local) if local == mapping.listen => {}
            local => {
                return Err(Refusal::Other(format!(
                    "register {}: the socket handed over is bound to {}, not {}",
                    mapping.spec(),
                    local.map_or("nothing".into(), |a| a.to_string()),
                    mapping.listen
                )))
            }
        }
        // A shim's registration wins over what the daemon serves for the same container
        // port from dockerd's API (`--docker-ports`): the shim holds the listening socket.
        let k = key(&mapping);
        let start = Start {
            mapping,
            listener: Listener::Socket(socket),
            origin: origin.clone(),
        };
        let started = ctx.sup.change(Duration::ZERO, |current| {
            let stop = current
                .get(&k)
                .filter(|c| c.origin.container().is_some())
                .map(|_| k);
            Ok(Change {
                stop: stop.into_iter().collect(),
                start: vec![start],
            })
        });
        started
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Refusal::Other("nothing started".into()))
    }
    .await;
    let mapping = match started {
        Ok(m) => m,
        Err(message) => return reply(&mut stream, &refusal(ctx, message)).await,
    };
    if let Some(pid) = stream.peer_cred().ok().and_then(|c| c.pid()) {
        tracing::debug!("{mapping}: registered by pid {pid}");
    }
    let answered = reply(
        &mut stream,
        &Reply::Done {
            mappings: vec![mapping.spec()],
            proxy_protocol: mapping.options.proxy_protocol,
        },
    )
    .await;
    if let Err(e) = answered {
        let _ = Registration::new(ctx.clone(), key(&mapping), origin);
        return Err(e);
    }
    hold(stream, ctx, key(&mapping), origin, options).await
}

/// Keeps a registered shim's mapping while its connection stays open, and a copy of the
/// connection for a takeover; or until the daemon lets go of it.
async fn hold(
    stream: UnixStream,
    ctx: &Arc<Ctx>,
    key: Key,
    origin: Origin,
    options: Overrides,
) -> io::Result<()> {
    let _registration = Registration::new(ctx.clone(), key, origin.clone());
    if let (Origin::Shim(id), Ok(conn)) = (origin, stream.as_fd().try_clone_to_owned()) {
        let mut shims = ctx.shims.lock().unwrap_or_else(|e| e.into_inner());
        shims.insert(id, Shim { conn, options });
    }
    let mut release = ctx.release.subscribe();
    // The shim never writes again: readable means it closed (dockerd stopped it).
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            readable = stream.readable() => readable?,
            _ = release.wait_for(|r| *r) => return Ok(()),
        }
        match stream.try_read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // EOF, an error, or a protocol violation: the registration ends.
            _ => return Ok(()),
        }
    }
}
