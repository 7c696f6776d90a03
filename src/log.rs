//! Logging that someone can read. dockerd points the proxy's stdout and stderr at /dev/null,
//! so when stderr is not a terminal, file, pipe or socket, lines go to the syslog socket
//! (/dev/log, which journald serves) instead. `RPROXY_LOG_FILE` overrides both;
//! `RPROXY_LOG` sets the filter (default: warnings; info on a terminal). All output is rate-limited so a flood of
//! failing connections cannot flood the journal.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::sys::{self, FdKind};

/// Lines per second allowed on average, and the burst above it.
const RATE: f64 = 50.0;
const BURST: f64 = 200.0;

enum Dest {
    Stderr,
    File(File),
    Syslog { socket: UnixDatagram, path: PathBuf },
}

struct Limiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

struct Inner {
    dest: Dest,
    limiter: Limiter,
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Inner>>);

/// Installs the global subscriber. Safe to call once; later calls are ignored.
pub fn init() {
    // Default: warnings; someone watching a terminal also sees lifecycle events ("serving …").
    let default = if io::stderr().is_terminal() {
        "info"
    } else {
        "warn"
    };
    let filter = std::env::var("RPROXY_LOG").unwrap_or_default();
    let filter = EnvFilter::try_new(if filter.is_empty() { default } else { &filter })
        .unwrap_or_else(|_| EnvFilter::new(default));
    let dest = choose_dest();
    let syslog = matches!(dest, Dest::Syslog { .. });
    let ansi = matches!(dest, Dest::Stderr) && io::stderr().is_terminal();
    let sink = Sink(Arc::new(Mutex::new(Inner {
        dest,
        limiter: Limiter {
            tokens: BURST,
            last: Instant::now(),
            suppressed: 0,
        },
    })));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_ansi(ansi)
        .with_target(false);
    // syslog stamps lines itself.
    let _ = if syslog {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

fn choose_dest() -> Dest {
    if let Some(path) = std::env::var_os("RPROXY_LOG_FILE").filter(|p| !p.is_empty()) {
        match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => return Dest::File(f),
            Err(e) => eprintln!("rproxy: cannot open RPROXY_LOG_FILE {path:?}: {e}"),
        }
    }
    let stderr_useful = io::stderr().is_terminal()
        || matches!(
            sys::fd_kind(2),
            FdKind::File | FdKind::Fifo | FdKind::Socket
        );
    if !stderr_useful {
        let path =
            PathBuf::from(std::env::var_os("RPROXY_SYSLOG_SOCKET").unwrap_or("/dev/log".into()));
        if let Ok(socket) = UnixDatagram::unbound() {
            // Never block the proxy on a slow reader: a full queue drops the line instead.
            if socket.connect(&path).is_ok() && socket.set_nonblocking(true).is_ok() {
                return Dest::Syslog { socket, path };
            }
        }
    }
    Dest::Stderr
}

impl Inner {
    fn emit(&mut self, level: Level, line: &[u8]) {
        let now = Instant::now();
        let l = &mut self.limiter;
        l.tokens = (l.tokens + now.duration_since(l.last).as_secs_f64() * RATE).min(BURST);
        l.last = now;
        if l.tokens < 1.0 {
            l.suppressed += 1;
            return;
        }
        l.tokens -= 1.0;
        if l.suppressed > 0 {
            let note = format!(
                "WARN {} log lines suppressed by the rate limit\n",
                l.suppressed
            );
            l.suppressed = 0;
            self.write(Level::WARN, note.as_bytes());
        }
        self.write(level, line);
    }

    /// Writes one line; false when it had to be dropped (syslog queue full).
    fn write(&mut self, level: Level, line: &[u8]) -> bool {
        match &mut self.dest {
            Dest::Stderr => io::stderr().write_all(line).is_ok(),
            Dest::File(f) => f.write_all(line).is_ok(),
            Dest::Syslog { socket, path } => {
                // Facility daemon (3); severity from the level.
                let severity = match level {
                    Level::ERROR => 3,
                    Level::WARN => 4,
                    Level::INFO => 6,
                    _ => 7,
                };
                let text = String::from_utf8_lossy(line);
                let msg = format!(
                    "<{}>rproxy[{}]: {}",
                    3 * 8 + severity,
                    std::process::id(),
                    text.trim_end()
                );
                match socket.send(msg.as_bytes()) {
                    Ok(_) => true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    // journald restarted: reconnect once, drop the line if that fails too.
                    Err(_) => socket.connect(&*path).is_ok() && socket.send(msg.as_bytes()).is_ok(),
                }
            }
        }
    }
}

/// Collects one formatted event and hands it to the sink when dropped.
pub struct LineWriter {
    sink: Sink,
    level: Level,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            if let Ok(mut inner) = self.sink.0.lock() {
                inner.emit(self.level, &self.buf);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            sink: self.clone(),
            level: Level::INFO,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter {
            sink: self.clone(),
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}
