//! The daemon's side of the control socket. Nothing a client does may hold the daemon: a
//! request must arrive within [`REQUEST_TIMEOUT`], at most [`MAX_PENDING`] connections wait
//! for theirs (the oldest is dropped for a new one, so a pile of idle connections never
//! locks `rproxy ls` out), and replies that cannot be written within [`REPLY_TIMEOUT`] are
//! given up. A shim's registration is released however its connection ends.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::{Reply, Request, Row, MAX_REQUEST};
use crate::backoff::Backoff;
use crate::frontend;
use crate::mapping::{describe, parse_publish, Mapping, Proto};
use crate::options::{Options, Overrides};
use crate::proxy_protocol::{PortRules, Version};
use crate::supervisor::{key, Change, Key, Origin, Start, Supervisor};
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
    /// The daemon's own uid, which may change mappings besides root.
    own_uid: u32,
    /// The PROXY protocol of ports shims hand over.
    port_rules: SharedRules,
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

/// Accepts control connections until the task is dropped; each is served on its own task.
pub async fn serve(
    listener: UnixListener,
    sup: Supervisor,
    drain: Duration,
    defaults: Options,
    port_rules: SharedRules,
) {
    let ctx = Arc::new(Ctx {
        sup,
        drain,
        defaults,
        own_uid: nix::unistd::geteuid().as_raw(),
        port_rules,
    });
    let pending = Arc::new(Pending::default());
    let mut next_id = 0u64;
    let mut backoff = Backoff::default();
    loop {
        let Some((stream, _)) = backoff.accepted("control", listener.accept().await).await else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        let evicted = pending.add(id);
        let (ctx, pending) = (ctx.clone(), pending.clone());
        tokio::spawn(async move {
            let read = tokio::select! {
                r = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&stream)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(format!("no request within {} s", REQUEST_TIMEOUT.as_secs())),
                },
                _ = evicted => Err("too many connections waiting".into()),
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
async fn read_request(stream: &UnixStream) -> Result<Option<(Request, Vec<OwnedFd>)>, String> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let mut fds = Vec::new();
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        let (n, mut got) = stream
            .async_io(Interest::READABLE, || {
                recv_with_fds(stream.as_fd(), &mut buf[len..])
            })
            .await
            .map_err(|e| describe(&e))?;
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
    ctx: &Ctx,
    id: u64,
) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    if !matches!(request, Request::Ls {}) && uid != 0 && uid != ctx.own_uid {
        tracing::warn!("control: uid {uid} may not change mappings");
        let message = format!(
            "permission denied: uid {uid} may not change mappings (only root or uid {})",
            ctx.own_uid
        );
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
    };
    let answer = answer.unwrap_or_else(|message| Reply::Error { message });
    reply(&mut stream, &answer).await
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
    let statuses = sup.statuses();
    let kernel = sup.kernel_connections(&statuses).await;
    statuses
        .into_iter()
        .map(|s| Row {
            nat: s.path.as_ref().map_or("-", |p| p.label()).into(),
            kernel_connections: kernel.get(&s.mapping.spec()).copied().unwrap_or(0),
            socket: s.socket_lb.as_ref().map_or("-", |p| p.label()).into(),
            socket_connections: sup.socket_lb().counters(&s.mapping).0,
            proxy_protocol: match s.mapping.options.proxy_protocol {
                Version::Off => "-".into(),
                v => v.to_string(),
            },
            spec: s.mapping.spec(),
            origin: s.origin.to_string(),
            state: if s.serving { "serving" } else { "stopped" }.into(),
            stats: s.stats.snapshot(),
        })
        .collect()
}

fn specs(mappings: &[Mapping]) -> Vec<String> {
    mappings.iter().map(Mapping::spec).collect()
}

/// `add`: all of the spec's mappings start, or none do.
async fn add(ctx: &Ctx, spec: &str, options: Overrides) -> Result<Reply, String> {
    let mappings = parse_publish(spec, options.apply(ctx.defaults)?)?;
    let started = ctx
        .sup
        .change(Duration::ZERO, |_| {
            Ok(Change {
                stop: Vec::new(),
                start: mappings
                    .iter()
                    .map(|m| Start {
                        mapping: *m,
                        socket: None,
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
async fn remove(ctx: &Ctx, spec: &str) -> Result<Reply, String> {
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
                if let Origin::Shim(_) = c.origin {
                    return Err(format!(
                        "{} {} is published by dockerd (a docker-mode proxy handed it over): \
                         dockerd would still believe it served; stop or remove the container, \
                         or its port mapping, with docker instead",
                        m.proto, m.listen
                    ));
                }
                stop.push(key(m));
                stopped.push(c.mapping);
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
/// reply could not be written, the task was dropped.
struct Registration {
    sup: Supervisor,
    key: Key,
    origin: Origin,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let (sup, key, origin) = (self.sup.clone(), self.key, self.origin);
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
    ctx: &Ctx,
    spec: &str,
    options: Overrides,
    mut fds: Vec<OwnedFd>,
    id: u64,
) -> io::Result<()> {
    let origin = Origin::Shim(id);
    let started = async {
        if options.proxy_protocol.is_some() {
            return Err(
                "register: a handed-over port's PROXY protocol comes from the daemon's \
                 [[proxy_protocol]] rules"
                    .to_string(),
            );
        }
        let options = options.apply(ctx.defaults)?;
        let mut mapping = match parse_publish(spec, options)?.as_slice() {
            [m] => *m,
            _ => return Err("register takes exactly one port".to_string()),
        };
        // Held until the mapping runs: a reload swaps the rules only around its own change.
        let rules = ctx.port_rules.lock().await;
        if mapping.proto == Proto::Tcp {
            mapping.options.proxy_protocol = rules.version_for(mapping.listen.port());
        }
        let fd = match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => fd,
            _ => return Err("register needs exactly one listening socket".into()),
        };
        let socket = frontend::check(&mapping, fd)?;
        // The socket's own address is the key: a spec that says otherwise would file the
        // port under a key nothing could stop it by.
        match frontend::local_addr(&socket) {
            Some(local) if local == mapping.listen => {}
            local => {
                return Err(format!(
                    "register {}: the socket handed over is bound to {}, not {}",
                    mapping.spec(),
                    local.map_or("nothing".into(), |a| a.to_string()),
                    mapping.listen
                ))
            }
        }
        ctx.sup.start(mapping, Some(socket), origin).await
    }
    .await;
    let mapping = match started {
        Ok(m) => m,
        Err(message) => return reply(&mut stream, &Reply::Error { message }).await,
    };
    let _registration = Registration {
        sup: ctx.sup.clone(),
        key: key(&mapping),
        origin,
    };
    reply(
        &mut stream,
        &Reply::Done {
            mappings: vec![mapping.spec()],
            proxy_protocol: mapping.options.proxy_protocol,
        },
    )
    .await?;
    // The shim never writes again: readable means it closed (dockerd stopped it).
    let mut byte = [0u8; 1];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // EOF, an error, or a protocol violation: the registration ends.
            _ => return Ok(()),
        }
    }
}
