//! A takeover on the wire: a new daemon asks the running one for every socket it serves, and
//! gets them over the control socket (SCM_RIGHTS), with what each is for.
//!
//! 1. new → old: `{"request":"takeover"}`.
//! 2. old → new: a [`Reply::Handover`] line listing the mappings (spec, origin, options,
//!    which descriptor is their socket and, for a shim's port, its registration connection),
//!    then the descriptors themselves in messages of one byte and up to 253 descriptors each
//!    (the kernel's SCM_MAX_FD): the control socket's listener, the metrics endpoint's, every
//!    listening socket, every shim's connection. From the moment it lists them the old daemon
//!    changes nothing ([`Supervisor::freeze`]).
//! 3. new → old: `serving` once it serves all of them (both accept for a moment: the kernel
//!    gives each connection to one). Anything else, or the new daemon's end, and the old one
//!    takes changes again as if nothing happened.
//! 4. old → new: `released` once it has stopped accepting on every socket, deleted its NAT
//!    table and let go of the shims' connections (the new daemon holds them now: shims see
//!    nothing). Its own connections finish in it ([`Supervisor::hand_over_all`]); when it
//!    exits, this connection closes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::{Handed, Refusal, Reply, Request, MAX_REPLY};
use crate::mapping::describe;
use crate::settings::options::Overrides;
use crate::supervisor::{Held, Origin, Supervisor};
use crate::sys::fd::{recv_with_many_fds, MAX_FDS_PER_MESSAGE};

/// How long the new daemon may take to serve what it was handed before the old one gives
/// up on it and carries on.
pub const SERVING_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the handover itself (the list and the descriptors) may take.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the new daemon waits for the old one to stop accepting before it installs its
/// NAT rules anyway.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the old daemon hands over besides its mappings, and whom it tells once the new one
/// serves.
pub struct Giver {
    /// A copy of the control socket's listener.
    pub control: OwnedFd,
    /// A copy of the metrics endpoint's listener, when metrics are served.
    pub metrics: Option<OwnedFd>,
    /// The daemon's main loop, which stops accepting and drains when it hears of it.
    pub events: mpsc::UnboundedSender<HandedOver>,
}

/// The new daemon serves: stop accepting everywhere, then answer `released`.
pub struct HandedOver {
    /// The new daemon's pid.
    pub to: u32,
    /// Send once nothing is accepted here any more (and the NAT table is gone).
    pub released: oneshot::Sender<()>,
    /// Ready once the new daemon has been told: this process must not exit before (with no
    /// connection to drain it would, and the new one would read an end instead).
    pub told: oneshot::Receiver<()>,
}

/// A shim's registration as the old daemon hands it over.
pub struct ShimConn {
    /// A copy of the shim's connection.
    pub conn: OwnedFd,
    /// The options its environment set.
    pub options: Overrides,
}

/// The old daemon's side: answers a `takeover` from `stream`'s peer (pid `to`). `shim` gives
/// the connection of registration `id`. `taker` says who takes over: set to `to` once the
/// supervisor is frozen for this takeover, and back to 0 before it thaws when the takeover
/// fails; a takeover refused because another is under way leaves it alone. Returns once this
/// daemon has let go of everything, or the new daemon failed (then nothing changed here).
pub async fn give(
    mut stream: UnixStream,
    to: u32,
    sup: &Supervisor,
    giver: &Giver,
    taker: &AtomicU32,
    shim: impl Fn(u64) -> Option<ShimConn>,
) -> io::Result<()> {
    let held = match sup.freeze().await {
        Ok(h) => h,
        Err(message) => return write_line(&mut stream, &Reply::Error { message }.encode()).await,
    };
    // Frozen by us: no other takeover is under way, so the slot is free.
    if taker
        .compare_exchange(0, to, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        tracing::error!("takeover by pid {to}: another process is recorded as taking over");
    }
    tracing::info!("takeover: handing {} mappings over to pid {to}", held.len());
    let handed = async {
        let (list, fds) = handover_list(held, giver, shim)?;
        transfer(&mut stream, &list, fds).await?;
        until_serving(&mut stream).await
    };
    if let Err(e) = handed.await {
        tracing::warn!(
            "takeover by pid {to} failed ({}); still serving everything here",
            describe(&e)
        );
        // Before the thaw: once thawed, the next takeover may claim the slot.
        let _ = taker.compare_exchange(to, 0, Ordering::AcqRel, Ordering::Acquire);
        sup.thaw().await;
        return Ok(());
    }
    let_go(stream, to, giver).await
}

/// The handover line and the descriptors it lists: the control socket's listener first, the
/// metrics endpoint's, then each mapping's socket and, for a shim's port, its connection.
fn handover_list(
    held: Vec<Held>,
    giver: &Giver,
    shim: impl Fn(u64) -> Option<ShimConn>,
) -> io::Result<(Reply, Vec<OwnedFd>)> {
    let mut fds: Vec<OwnedFd> = vec![giver.control.try_clone()?];
    let metrics = match &giver.metrics {
        Some(m) => {
            fds.push(m.try_clone()?);
            Some(fds.len() - 1)
        }
        None => None,
    };
    let mut mappings = Vec::with_capacity(held.len());
    for h in held {
        let (options, conn) = match h.origin {
            Origin::Shim(id) => match shim(id) {
                Some(s) => (s.options, Some(s.conn)),
                // Its registration is ending (the shim left): nothing to hand over.
                None => continue,
            },
            Origin::Control => (Overrides::from(&h.mapping.options), None),
            _ => (Overrides::default(), None),
        };
        fds.push(h.socket.into());
        let socket = fds.len() - 1;
        let conn = conn.map(|c| {
            fds.push(c);
            fds.len() - 1
        });
        mappings.push(Handed {
            spec: h.mapping.spec(),
            origin: h.origin.kind(),
            container: h.origin.container().map(str::to_string),
            options,
            socket,
            conn,
        });
    }
    let list = Reply::Handover {
        pid: std::process::id(),
        fds: fds.len(),
        control: 0,
        metrics,
        mappings,
    };
    Ok((list, fds))
}

/// Sends the list, then the descriptors in batches, within [`TRANSFER_TIMEOUT`]; this
/// process's copies close once sent (the new daemon's stay).
async fn transfer(stream: &mut UnixStream, list: &Reply, fds: Vec<OwnedFd>) -> io::Result<()> {
    tokio::time::timeout(TRANSFER_TIMEOUT, async {
        write_line(stream, &list.encode()).await?;
        for batch in fds.chunks(MAX_FDS_PER_MESSAGE) {
            send_fds(stream, batch).await?;
        }
        Ok::<_, io::Error>(())
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the new daemon does not read"))?
}

/// Waits (up to [`SERVING_TIMEOUT`]) for the new daemon to say `serving`.
async fn until_serving(stream: &mut UnixStream) -> io::Result<()> {
    match tokio::time::timeout(SERVING_TIMEOUT, read_line(stream)).await {
        Ok(Ok(line)) if line == "serving" => Ok(()),
        Ok(Ok(line)) => Err(io::Error::other(format!("it said {line:?}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("it did not serve within {} s", SERVING_TIMEOUT.as_secs()),
        )),
    }
}

/// The new daemon serves: has the daemon's main loop stop accepting, answers `released`
/// once it has, and holds the connection until this process exits (its end tells the new
/// daemon the drain is over).
async fn let_go(mut stream: UnixStream, to: u32, giver: &Giver) -> io::Result<()> {
    let (released, stopped) = oneshot::channel();
    let (tell, told) = oneshot::channel();
    if giver
        .events
        .send(HandedOver { to, released, told })
        .is_err()
    {
        // The daemon is stopping anyway.
        return Ok(());
    }
    let _ = stopped.await;
    write_line(&mut stream, "released").await?;
    let _ = tell.send(());
    std::future::pending::<()>().await;
    Ok(())
}

/// What the new daemon received.
pub struct Received {
    /// The old daemon's pid.
    pub pid: u32,
    /// The connection to it, for `serving` and `released`.
    pub pending: Pending,
    /// The control socket's listener.
    pub control: OwnedFd,
    /// The metrics endpoint's listener, when the old daemon served metrics.
    pub metrics: Option<OwnedFd>,
    /// Every mapping with its socket and, for a shim's port, its connection.
    pub mappings: Vec<(Handed, OwnedFd, Option<OwnedFd>)>,
}

/// The new daemon's side: asks the daemon at `path` for its sockets. None when no daemon
/// listens there; Err when one does but does not hand over.
pub async fn receive(path: &Path) -> Result<Option<Received>, String> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("cannot reach {}: {}", path.display(), describe(&e))),
    };
    if let Err(why) = super::check_server(&stream) {
        return Err(format!("not taking over from {}: {why}", path.display()));
    }
    let ask = async {
        write_line(&mut stream, &Request::Takeover {}.encode()).await?;
        read_handover(&stream).await
    };
    let (reply, mut fds) = match tokio::time::timeout(TRANSFER_TIMEOUT, ask).await {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => {
            return Err(format!(
                "the daemon at {} did not hand over: {}",
                path.display(),
                describe(&e)
            ))
        }
        Err(_) => {
            return Err(format!(
                "the daemon at {} did not hand over within {} s",
                path.display(),
                TRANSFER_TIMEOUT.as_secs()
            ))
        }
    };
    let (pid, control, metrics, mappings) = match reply {
        Reply::Handover {
            pid,
            fds: _,
            control,
            metrics,
            mappings,
        } => (pid, control, metrics, mappings),
        // `takeover` is well formed: a daemon that cannot read it predates takeovers.
        Reply::Error {
            message: message @ Refusal::BadRequest(_),
        } => {
            return Err(format!(
                "the daemon at {} is a version without takeovers ({message}): stop it, then \
                 start this one",
                path.display()
            ))
        }
        Reply::Error { message } => {
            return Err(format!(
                "the daemon at {} refused: {message}",
                path.display()
            ))
        }
        other => return Err(format!("the daemon answered {other:?}")),
    };
    // Each descriptor is taken once; an index out of range or used twice is a broken list.
    let mut take = |i: usize| -> Result<OwnedFd, String> {
        fds.get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| format!("the handover names descriptor {i}, which it did not send"))
    };
    let control = take(control)?;
    let metrics = metrics.map(&mut take).transpose()?;
    let mut out = Vec::with_capacity(mappings.len());
    for m in mappings {
        let socket = take(m.socket)?;
        let conn = m.conn.map(&mut take).transpose()?;
        out.push((m, socket, conn));
    }
    Ok(Some(Received {
        pid,
        pending: Pending { pid, conn: stream },
        control,
        metrics,
        mappings: out,
    }))
}

/// The new daemon's connection to the old one, until the old one stops accepting.
pub struct Pending {
    pid: u32,
    conn: UnixStream,
}

impl Pending {
    /// Tells the old daemon we serve, and waits (up to [`RELEASE_TIMEOUT`]) until it has
    /// stopped accepting. Returns the connection, whose end says the old daemon exited.
    pub async fn serving(mut self) -> Result<UnixStream, String> {
        write_line(&mut self.conn, "serving")
            .await
            .map_err(|e| format!("cannot tell pid {} we serve: {}", self.pid, describe(&e)))?;
        match tokio::time::timeout(RELEASE_TIMEOUT, read_line(&mut self.conn)).await {
            Ok(Ok(line)) if line == "released" => Ok(self.conn),
            Ok(Ok(line)) => Err(format!("pid {} answered {line:?}", self.pid)),
            Ok(Err(e)) => Err(format!("pid {} went away: {}", self.pid, describe(&e))),
            Err(_) => Err(format!(
                "pid {} did not stop accepting within {} s",
                self.pid,
                RELEASE_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Reads the handover line and every descriptor it announces.
async fn read_handover(stream: &UnixStream) -> io::Result<(Reply, Vec<Option<OwnedFd>>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut reply = None;
    loop {
        if reply.is_none() {
            if let Some(end) = data.iter().position(|&b| b == b'\n') {
                let r = Reply::decode(&data[..end]).map_err(io::Error::other)?;
                data.drain(..=end);
                reply = Some(r);
            }
        }
        // The list, then one byte per batch of descriptors.
        match &reply {
            Some(Reply::Handover { fds: want, .. }) => {
                let batches = want.div_ceil(MAX_FDS_PER_MESSAGE);
                if fds.len() >= *want && data.len() >= batches {
                    break;
                }
            }
            Some(_) => break,
            None if data.len() > MAX_REPLY => {
                return Err(io::Error::other("the handover list is too long"))
            }
            None => {}
        }
        let (n, mut got) = stream
            .async_io(Interest::READABLE, || {
                recv_with_many_fds(stream.as_fd(), &mut buf)
            })
            .await?;
        fds.append(&mut got);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection before handing everything over",
            ));
        }
        data.extend_from_slice(&buf[..n]);
    }
    let reply = reply.ok_or_else(|| io::Error::other("no reply"))?;
    Ok((reply, fds.into_iter().map(Some).collect()))
}

/// Sends one message: a byte and `batch` (at most [`MAX_FDS_PER_MESSAGE`] descriptors).
async fn send_fds(stream: &UnixStream, batch: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<i32> = batch.iter().map(|f| f.as_raw_fd()).collect();
    let fd: BorrowedFd<'_> = stream.as_fd();
    stream
        .async_io(Interest::WRITABLE, || {
            let cmsgs = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                fd.as_raw_fd(),
                &[io::IoSlice::new(b"F")],
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from)
        })
        .await
        .map(|_| ())
}

async fn write_line(stream: &mut UnixStream, line: &str) -> io::Result<()> {
    stream.write_all(format!("{line}\n").as_bytes()).await
}

/// Reads one short line (a word), byte by byte: nothing after it may be consumed.
async fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= 64 {
            return Err(io::Error::other("line too long"));
        }
        line.push(b);
    }
}
