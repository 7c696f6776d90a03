//! The servers in the container namespace that the harness runs itself.

use super::*;

/// A server the harness runs in the container namespace; dropping it stops its threads.
pub(crate) struct Server {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) count: Arc<AtomicUsize>,
    pub(crate) handles: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Server {
    pub(crate) fn new() -> Server {
        Server {
            stop: Arc::new(AtomicBool::new(false)),
            count: Arc::new(AtomicUsize::new(0)),
            handles: Vec::new(),
        }
    }
}

pub(crate) fn tcp_listener_in(ns: &'static str, addr: SocketAddrV4) -> Result<TcpListener, String> {
    in_netns(ns, move || {
        let err = |e: std::io::Error| format!("listen {addr} in {ns}: {e}");
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.bind(&SocketAddr::V4(addr).into()).map_err(err)?;
        s.listen(4096).map_err(err)?;
        let l = TcpListener::from(s);
        l.set_nonblocking(true).map_err(err)?;
        Ok(l)
    })
}

pub(crate) fn wait_readable(fd: &impl AsFd, ms: u16) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, ms);
}

/// Accepts on a non-blocking listener until `stop`, handing each connection to `serve`.
/// The container's web server: one thread, epoll-driven (a tokio current-thread runtime), so
/// it serves every connection at once as nginx does. A server with a thread per connection
/// in flight set the rate itself: with 2, a connection whose request was still crossing a
/// proxy held up the others; with 16, polling threads woke in a herd on every connection.
pub(crate) fn http_server(port: u16) -> Result<Server, String> {
    let listener = tcp_listener_in(NS_CTR, SocketAddrV4::new(CTR, port))?;
    let mut server = Server::new();
    let (stop, count) = (server.stop.clone(), server.count.clone());
    server.handles.push(thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                let accepted =
                    tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
                if let Ok(Ok((s, _))) = accepted {
                    let count = count.clone();
                    tokio::spawn(async move {
                        if serve_http_async(s).await.is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
        });
    }));
    Ok(server)
}

async fn serve_http_async(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    let read = async {
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            if n == buf.len() {
                return Ok(false);
            }
            match s.read(&mut buf[n..]).await? {
                0 => return Ok(false),
                r => n += r,
            }
        }
        Ok::<_, std::io::Error>(true)
    };
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(true)) => s.write_all(HTTP_RESPONSE).await,
        Ok(Ok(false)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ErrorKind::TimedOut.into()),
    }
}
