//! Logging that someone can read. dockerd points the proxy's stdout and stderr at /dev/null,
//! so when stderr is not a terminal, file, pipe or socket, lines go to the syslog socket
//! (/dev/log, which journald serves) instead. `RPROXY_LOG_FILE` overrides both;
//! `RPROXY_LOG` sets the filter (default: warnings; info on a terminal). All output is rate-limited so a flood of
//! failing connections cannot flood the journal.
//!
//! Logging never waits: lines are written from whichever thread logs, runtime threads
//! included, so a reader that stops reading (journald stalled behind its stream socket, a
//! paused pager) must not stop the proxy. Writes to stderr and syslog are non-blocking; a
//! line that cannot go at once is dropped and counted, and the next line that can says how
//! many were lost.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{span, Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::sys::fd::{fd_kind, FdKind};

/// Lines per second allowed on average, and the burst above it.
const RATE: f64 = 50.0;
const BURST: f64 = 200.0;

enum Dest {
    Stderr(Stderr),
    File(File),
    Syslog { socket: UnixDatagram, path: PathBuf },
}

/// stderr, written without waiting for its reader.
enum Stderr {
    /// A socket: sent with MSG_DONTWAIT.
    Socket,
    /// journald's stream (systemd's `JOURNAL_STREAM` names it): sent as a socket, each line
    /// prefixed with its syslog priority (`<3>` … `<7>`), which journald strips and records as
    /// the entry's PRIORITY; no timestamp (the journal stamps entries itself).
    Journal,
    /// A pipe or terminal: written through a non-blocking description of its own, opened
    /// anew through /proc (setting O_NONBLOCK on fd 2 itself would change it for whoever
    /// shares it: the shell, dockerd).
    Own(File),
    /// A regular file, or a pipe or terminal that could not be opened anew: written as is.
    Plain,
}

impl Stderr {
    fn new() -> Stderr {
        match fd_kind(2) {
            FdKind::Socket if is_journal_stream() => Stderr::Journal,
            FdKind::Socket => Stderr::Socket,
            FdKind::Fifo | FdKind::CharDevice => {
                use std::os::unix::fs::OpenOptionsExt;
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open("/proc/self/fd/2")
                    .map_or(Stderr::Plain, Stderr::Own)
            }
            _ => Stderr::Plain,
        }
    }

    /// Writes what it can of `line` now: the bytes written (all of them, or fewer when the
    /// reader is behind).
    fn write(&mut self, line: &[u8]) -> usize {
        let mut done = 0;
        while done < line.len() {
            let wrote = match self {
                Stderr::Socket | Stderr::Journal => {
                    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT
                        | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
                    nix::sys::socket::send(2, &line[done..], flags).map_err(io::Error::from)
                }
                Stderr::Own(f) => f.write(&line[done..]),
                Stderr::Plain => io::stderr().write(&line[done..]),
            };
            match wrote {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        done
    }
}

struct Limiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

struct Inner {
    dest: Dest,
    limiter: Limiter,
    /// Lines dropped because the destination was not taking them, not yet reported.
    dropped: u64,
    /// The last line went out in part: the next starts on a line of its own.
    cut: bool,
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Inner>>);

/// How lines look: text for people, JSON (one object per line: timestamp, level, message and
/// the event's fields) for log pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `LEVEL message`, with a timestamp unless syslog adds its own.
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err("must be text or json".into()),
        }
    }
}

impl Format {
    /// `--log-format` from the daemon's argv, read before clap runs (logging starts first;
    /// clap checks the value again).
    pub fn from_argv(argv: &[String]) -> Option<Format> {
        let value = argv.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix("--log-format=")
                .map(str::to_string)
                .or_else(|| {
                    (a == "--log-format")
                        .then(|| argv.get(i + 1).cloned())
                        .flatten()
                })
        })?;
        value.parse().ok()
    }
}

/// Where logs go and what passes, from the environment (see `env`).
#[derive(Debug, Default)]
pub struct Settings {
    /// `RPROXY_LOG`, checked by [`check_filter`].
    pub filter: Option<String>,
    /// `RPROXY_LOG_FORMAT`.
    pub format: Option<Format>,
    /// `RPROXY_LOG_FILE`: append here instead of stderr or syslog.
    pub file: Option<PathBuf>,
    /// `RPROXY_SYSLOG_SOCKET`: syslog's socket, when stderr goes nowhere (default /dev/log).
    pub syslog_socket: Option<PathBuf>,
}

/// Checks an `RPROXY_LOG` value: a level (`error` … `trace`, `off`) for docker mode's light
/// subscriber (`light`), `tracing` filter directives for the daemon.
pub fn check_filter(text: &str, light: bool) -> Result<String, String> {
    if light {
        light_level(text)
            .map(|_| text.to_string())
            .ok_or_else(|| "must be a level: error, warn, info, debug, trace or off".into())
    } else {
        EnvFilter::try_new(text)
            .map(|_| text.to_string())
            .map_err(|e| format!("not a log filter ({e}); e.g. info, or rproxy=debug"))
    }
}

/// The level a light filter means: the last level of a directive list (`rproxy=debug` →
/// debug).
fn light_level(text: &str) -> Option<LevelFilter> {
    text.rsplit(['=', ',']).next()?.trim().parse().ok()
}

/// Installs the global subscriber. Safe to call once; later calls are ignored. `light` picks
/// the registry-free subscriber for docker-proxy mode (see [`Light`]); `format` is the
/// daemon's `--log-format`, which wins over the environment. Returns what could not be set up
/// as asked (an `RPROXY_LOG_FILE` that does not open), for the caller to refuse.
pub fn init(light: bool, settings: &Settings, format: Option<Format>) -> Vec<String> {
    let format = format.or(settings.format).unwrap_or(Format::Text);
    // Default: warnings; someone watching a terminal also sees lifecycle events ("serving …").
    let default = if io::stderr().is_terminal() {
        "info"
    } else {
        "warn"
    };
    let filter = settings.filter.as_deref().unwrap_or(default);
    let (dest, problems) = choose_dest(settings);
    // syslog and the journal stamp lines themselves.
    let syslog = matches!(dest, Dest::Syslog { .. } | Dest::Stderr(Stderr::Journal));
    let ansi = matches!(dest, Dest::Stderr(_)) && io::stderr().is_terminal();
    let sink = Sink(Arc::new(Mutex::new(Inner {
        dest,
        limiter: Limiter {
            tokens: BURST,
            last: Instant::now(),
            suppressed: 0,
        },
        dropped: 0,
        cut: false,
    })));
    if light {
        let _ = tracing::subscriber::set_global_default(Light {
            max: light_level(filter).unwrap_or(LevelFilter::WARN),
            sink,
            time: !syslog,
            json: format == Format::Json,
        });
        return problems;
    }
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_ansi(ansi)
        .with_target(false);
    // syslog stamps lines itself.
    let _ = match (format, syslog) {
        (Format::Json, _) => builder.json().flatten_event(true).try_init(),
        (Format::Text, true) => builder.without_time().try_init(),
        (Format::Text, false) => builder.try_init(),
    };
    problems
}

fn choose_dest(settings: &Settings) -> (Dest, Vec<String>) {
    let mut problems = Vec::new();
    if let Some(path) = &settings.file {
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => return (Dest::File(f), problems),
            Err(e) => problems.push(format!(
                "RPROXY_LOG_FILE={path:?}: cannot open it: {}",
                crate::mapping::describe(&e)
            )),
        }
    }
    let stderr_useful = io::stderr().is_terminal()
        || matches!(fd_kind(2), FdKind::File | FdKind::Fifo | FdKind::Socket);
    if !stderr_useful {
        let path = settings
            .syslog_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/log"));
        if let Ok(socket) = UnixDatagram::unbound() {
            // Never block the proxy on a slow reader: a full queue drops the line instead.
            if socket.connect(&path).is_ok() && socket.set_nonblocking(true).is_ok() {
                return (Dest::Syslog { socket, path }, problems);
            }
        }
    }
    (Dest::Stderr(Stderr::new()), problems)
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
            self.write_or_count(Level::WARN, note.as_bytes());
        }
        if self.dropped > 0 {
            let note = format!(
                "WARN {} log lines dropped: the log's reader did not keep up\n",
                self.dropped
            );
            if !self.write(Level::WARN, note.as_bytes()) {
                self.dropped += 1;
                return;
            }
            self.dropped = 0;
        }
        self.write_or_count(level, line);
    }

    fn write_or_count(&mut self, level: Level, line: &[u8]) {
        if !self.write(level, line) {
            self.dropped += 1;
        }
    }

    /// Writes one line without waiting; false when it (or part of it) had to be dropped.
    fn write(&mut self, level: Level, line: &[u8]) -> bool {
        match &mut self.dest {
            Dest::Stderr(stderr) => {
                if self.cut {
                    if stderr.write(b"\n") == 0 {
                        return false;
                    }
                    self.cut = false;
                }
                let prefixed;
                let line = match stderr {
                    Stderr::Journal => {
                        prefixed = [format!("<{}>", severity(level)).as_bytes(), line].concat();
                        &prefixed[..]
                    }
                    _ => line,
                };
                let wrote = stderr.write(line);
                self.cut = wrote > 0 && wrote < line.len();
                wrote == line.len()
            }
            Dest::File(f) => f.write_all(line).is_ok(),
            Dest::Syslog { socket, path } => {
                // Facility daemon (3).
                let severity = severity(level);
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

/// The syslog severity of a level.
fn severity(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Whether stderr is journald's stream: `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd for
/// a service whose output goes to the journal) names the socket on fd 2. A variable that
/// does not parse, or names another file (a child of the service whose stderr was
/// redirected), is not the journal.
fn is_journal_stream() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    use std::os::fd::AsFd;
    match nix::sys::stat::fstat(io::stderr().as_fd()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
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

/// docker-proxy mode's subscriber: a level filter (`RPROXY_LOG=warn|info|debug|…`, or the last
/// level of a directive list) and one line per event, no span registry. tracing-subscriber's
/// registry allocates a 32 KiB shard table up front — most of a waiting shim's heap, paid once
/// per published port when dockerd runs a thousand of them.
struct Light {
    max: LevelFilter,
    sink: Sink,
    time: bool,
    json: bool,
}

impl Subscriber for Light {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.max >= *meta.level()
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }
    // rproxy logs events only; spans are accepted and ignored.
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let level = *event.metadata().level();
        if self.json {
            // The daemon's JSON shape (tracing-subscriber's, flattened), written by hand.
            let mut fields = serde_json::Map::new();
            fields.insert("timestamp".into(), utc_now().into());
            fields.insert("level".into(), level.as_str().into());
            event.record(&mut JsonVisitor(&mut fields));
            let mut line = serde_json::Value::Object(fields).to_string();
            line.push('\n');
            if let Ok(mut inner) = self.sink.0.lock() {
                inner.emit(level, line.as_bytes());
            }
            return;
        }
        let mut line = String::with_capacity(128);
        if self.time {
            line.push_str(&utc_now());
            line.push(' ');
        }
        let _ = write!(line, "{level:>5} ");
        event.record(&mut LineVisitor(&mut line));
        line.push('\n');
        if let Ok(mut inner) = self.sink.0.lock() {
            inner.emit(level, line.as_bytes());
        }
    }
}

struct LineVisitor<'a>(&'a mut String);

impl Visit for LineVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// Now as RFC 3339 UTC with microseconds, like tracing-subscriber's default.
fn utc_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_timestamps_match_the_calendar() {
        let stamp = super::utc_now();
        // Shape: 2026-11-23T12:00:00.123456Z
        assert_eq!(stamp.len(), 27, "{stamp}");
        assert!(stamp.starts_with("20") && stamp.ends_with('Z') && &stamp[10..11] == "T");
        let out = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M"])
            .output();
        if let Ok(out) = out {
            let date = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let again = super::utc_now();
            assert!(
                again.starts_with(&date) || stamp.starts_with(&date),
                "{stamp} vs date(1) {date}"
            );
        }
    }
}
