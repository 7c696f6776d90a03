//! The man pages and shell completions the package ships (`packaging/man`,
//! `packaging/completions`), generated from the code they describe: the subcommands' clap
//! definitions ([`crate::settings::cli`]), docker-proxy's flags, the `RPROXY_*` variables
//! ([`crate::settings::env::VARIABLES`]) and the config file's keys ([`crate::settings::config::KEYS`]). Tests
//! already hold those lists to the parsers, so the manual cannot drift from the program.
//!
//! Compiled for tests only, with clap_mangen and clap_complete as dev-dependencies: the files
//! are committed (so `cargo deb` packages them from a clean checkout, with no generation step
//! before it), the test below fails when one is stale, and `RPROXY_BLESS=1` rewrites them. The
//! shipped binary carries neither generator.

use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

use crate::control::DEFAULT_SOCKET;
use crate::settings::cli::{self, DOCKER_FLAGS};
use crate::settings::config::{self, Key, KEYS, MAPPING_KEYS};
use crate::settings::env::{Reader, VARIABLES};

/// The spec grammar, shared by both pages.
const SPECS: &[&str] = &[
    "[HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]",
    "Clients connect to HOST_IP:HOST_PORT and are forwarded to TARGET_IP:TARGET_PORT. \
     HOST_IP defaults to 0.0.0.0 and the protocol to tcp. IPv6 addresses go in brackets \
     ([::]:8080:[fd00::2]:80); an IPv6 host address may forward to an IPv4 target, not the \
     other way round. A range maps one to one onto a range of the same length \
     (20000-20009:10.0.0.2:30000-30009). HOST_PORT 0 takes any free port. rproxy ls prints \
     every mapping in this form, one port each.",
];

/// rproxy(8), section by section.
pub fn rproxy_8() -> String {
    let mut cmd = cli::command();
    cmd.build();
    // clap adds `help` when it builds the command; `--help` covers it here.
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help")
        .cloned()
        .collect();
    let mut page = Page::default();
    title(&mut page);
    synopsis(&mut page, &subcommands);
    description(&mut page);
    commands(&mut page, &subcommands);
    docker_proxy_mode(&mut page);
    page.control("SH", ["SPECS"]);
    specs(&mut page);
    environment(&mut page);
    signals(&mut page);
    systemd_section(&mut page);
    exit_status(&mut page);
    files(&mut page);
    examples_8(&mut page);
    page.control("SH", ["SEE ALSO"]);
    page.text([roman("rproxy.toml(5), dockerd(8), systemctl(1), nft(8)")]);
    page.finish()
}

/// The page's header and NAME.
fn title(page: &mut Page) {
    page.control(
        "TH",
        ["RPROXY", "8", "", &source(), "System Manager's Manual"],
    );
    page.control("SH", ["NAME"]);
    page.text([roman(format!("rproxy - {}", cli::SUMMARY))]);
}

/// SYNOPSIS: each subcommand's, then docker-proxy mode's.
fn synopsis(page: &mut Page, subcommands: &[clap::Command]) {
    page.control("SH", ["SYNOPSIS"]);
    for sub in subcommands {
        page.clap(&Man::new(sub.clone()), Man::render_synopsis_section);
        page.control("br", []);
    }
    page.text(docker_synopsis());
}

/// DESCRIPTION: the command's long about.
fn description(page: &mut Page) {
    page.control("SH", ["DESCRIPTION"]);
    paragraphs(page, cli::ABOUT);
}

/// COMMANDS: each subcommand's about and options.
fn commands(page: &mut Page, subcommands: &[clap::Command]) {
    page.control("SH", ["COMMANDS"]);
    for sub in subcommands {
        page.control("SS", [format!("rproxy {}", sub.get_name()).as_str()]);
        let about = sub.get_long_about().or(sub.get_about());
        paragraphs(page, &about.map(|a| a.to_string()).unwrap_or_default());
        page.clap(&Man::new(sub.clone()), Man::render_options_section);
    }
}

/// DOCKER-PROXY MODE: docker-proxy's flags and what dockerd gets back.
fn docker_proxy_mode(page: &mut Page) {
    page.control("SH", ["DOCKER-PROXY MODE"]);
    paragraphs(
        page,
        "Without a subcommand rproxy is docker-proxy: dockerd's userland-proxy-path points at \
         it, and dockerd runs it once per published port, protocol and address family. It \
         parses docker-proxy's flags by the rules of Go's flag package: -flag value, \
         -flag=value, one dash or two; a boolean never takes a separate value; integers in any \
         base Go accepts (0x50); the last repeat wins; parsing stops at the first argument that \
         is not a flag.",
    );
    for flag in DOCKER_FLAGS {
        page.control("TP", []);
        let mut head = Vec::new();
        for (i, name) in flag.names.iter().enumerate() {
            if i > 0 {
                head.push(roman(", "));
            }
            head.push(bold(format!("-{name}")));
        }
        if !flag.value.is_empty() {
            head.push(roman(" "));
            head.push(italic(flag.value));
        }
        page.text(head);
        page.text([roman(flag.help)]);
    }
    page.control("TP", []);
    page.text([bold("-h"), roman(", "), bold("-help")]);
    page.text([roman(
        "Print the help (the subcommands and these flags) and exit.",
    )]);
    page.control("PP", []);
    paragraphs(
        page,
        "Once the port is served, rproxy writes \"0\\n\" to file descriptor 3 when dockerd \
         passed its status pipe there; a start-up failure writes \"1\\n\" and the reason, which \
         docker run shows (for example \"failed to listen on tcp 0.0.0.0:8080: address already \
         in use\"), and exits 1. With -use-listen-fd it serves the socket dockerd bound and \
         passed as file descriptor 4.\n\n\
         When an rproxy daemon listens on the control socket ($RPROXY_SOCKET), the process \
         hands its listening socket to the daemon and waits; it exits, and the daemon drops the \
         mapping, when dockerd stops it. If the daemon goes away, the waiting process serves \
         its port itself. dockerd's command line carries no options: they come from the \
         environment (ENVIRONMENT), set for dockerd, for example with a systemd drop-in.",
    );
}

/// ENVIRONMENT: every `RPROXY_*` variable, who reads it, and how values parse.
fn environment(page: &mut Page) {
    page.control("SH", ["ENVIRONMENT"]);
    for v in VARIABLES {
        page.control("TP", []);
        page.text([bold(v.name)]);
        let readers: Vec<&str> = v
            .readers
            .iter()
            .map(|r| match r {
                Reader::Docker => "docker-proxy mode",
                Reader::Daemon => "the daemon",
                Reader::Client => "ls/add/rm",
            })
            .collect();
        page.text([roman(format!(
            "{} Default: {}. Read by {}.",
            v.meaning,
            v.default,
            and_list(&readers)
        ))]);
    }
    page.control("PP", []);
    paragraphs(
        page,
        "Booleans take 1/0, true/false, on/off or yes/no; an empty value counts as unset. A \
         value that does not parse, or lies outside its range, is refused and never replaced by \
         the default: docker-proxy mode fails the port on file descriptor 3, naming the \
         variable; the daemon and ls, add and rm exit with status 2.",
    );
}

/// SIGNALS.
fn signals(page: &mut Page) {
    page.control("SH", ["SIGNALS"]);
    definitions(
        page,
        &[
            (
                "SIGHUP",
                "The daemon re-reads its config file: added mappings start, removed ones stop \
                 (their connections get the drain timeout), unchanged ones keep every \
                 connection. All of it or, when anything fails, none of it. Ignored in \
                 docker-proxy mode.",
            ),
            (
                "SIGTERM, SIGINT",
                "The daemon closes every listener at once and gives open connections the drain \
                 timeout; a second signal exits at once. A docker-proxy mode process exits at \
                 once with status 0, as dockerd expects.",
            ),
        ],
    );
}

/// EXIT STATUS.
fn exit_status(page: &mut Page) {
    page.control("SH", ["EXIT STATUS"]);
    definitions(
        page,
        &[
            ("0", "Success (for the daemon: stopped by a signal)."),
            (
                "1",
                "A failure at run time: a port that cannot be served (reported on file \
                 descriptor 3 in docker-proxy mode), a daemon that cannot start, a daemon that \
                 refused a request or cannot be reached.",
            ),
            (
                "2",
                "Bad input: an unknown flag or subcommand, a bad value on the command line or \
                 in the environment, a config file with problems (daemon --check lists them \
                 all).",
            ),
        ],
    );
}

/// FILES: what the package installs and where the daemon listens.
fn files(page: &mut Page) {
    page.control("SH", ["FILES"]);
    definitions(
        page,
        &[
            (
                config::DEFAULT_CONFIG,
                "The daemon's config file, read when --config is not given and it exists. See \
                 rproxy.toml(5).",
            ),
            (DEFAULT_SOCKET, "The daemon's control socket (mode 0600)."),
            (
                "/usr/lib/systemd/system/rproxy.service",
                "The daemon's systemd unit: systemctl enable --now rproxy.",
            ),
            (
                "/usr/share/doc/rproxy/README.md",
                "What rproxy is, how to install it, the three deployments with dockerd, and an \
                 index of the pages under docs/.",
            ),
            (
                "/usr/share/doc/rproxy/docs/",
                "The rest of the documentation: running under dockerd and which Docker engines \
                 were tested (docker.md, docker-proxy-contract.md, docker-ports.md), the \
                 daemon, takeover, systemd and the package (operations.md), the kernel paths \
                 (kernel-paths.md), the PROXY protocol, allow-lists, metrics, every benchmark \
                 (performance.md) and the source layout (design.md).",
            ),
            (
                "/usr/share/doc/rproxy/daemon.json",
                "The lines /etc/docker/daemon.json needs for dockerd to run rproxy as its \
                 userland proxy.",
            ),
        ],
    );
}

/// EXAMPLES: a docker-proxy run, a config check, `add`/`ls`/`rm`, `ls --json`.
fn examples_8(page: &mut Page) {
    page.control("SH", ["EXAMPLES"]);
    examples(
        page,
        &[
            (
                "Forward 127.0.0.1:8080 to 127.0.0.1:8000, as dockerd would:",
                "rproxy -host-ip 127.0.0.1 -host-port 8080 -container-ip 127.0.0.1 \
                 -container-port 8000",
            ),
            (
                "Check a config file and see the mappings it makes, binding nothing:",
                "rproxy daemon --check --config /etc/rproxy/rproxy.toml",
            ),
            (
                "Add a mapping to the running daemon, list the mappings, remove it:",
                "rproxy add 127.0.0.1:9000:10.0.0.4:80\nrproxy ls\nrproxy rm \
                 127.0.0.1:9000:10.0.0.4:80",
            ),
            (
                "The mappings for a script:",
                "rproxy ls --json | jq -r '.[] | select(.nat == \"kernel\") | .spec'",
            ),
        ],
    );
}

/// rproxy.toml(5).
pub fn rproxy_toml_5() -> String {
    let mut page = Page::default();
    page.control(
        "TH",
        ["RPROXY.TOML", "5", "", &source(), "File Formats Manual"],
    );
    page.control("SH", ["NAME"]);
    page.text([roman("rproxy.toml - the rproxy daemon's config file")]);
    page.control("SH", ["SYNOPSIS"]);
    page.text([roman(config::DEFAULT_CONFIG)]);
    page.control("SH", ["DESCRIPTION"]);
    paragraphs(
        &mut page,
        "The mappings rproxy daemon serves on its own, and its settings, in TOML. The daemon \
         reads the file named by --config, else /etc/rproxy/rproxy.toml when it exists, at \
         start-up and again on SIGHUP (systemctl reload rproxy). Docker's published ports need \
         no entry: dockerd's per-port processes hand them to the daemon.\n\n\
         Unknown keys are errors, so a typo cannot silently drop a mapping. Every problem is \
         reported with the file and line before anything binds; a reload with a problem \
         changes nothing and logs why. rproxy daemon --check --config FILE lists every problem, \
         or prints the mappings the file makes, without starting anything.",
    );
    page.control("SH", ["KEYS"]);
    keys(&mut page, KEYS);
    page.control("SH", ["MAPPING TABLES"]);
    paragraphs(
        &mut page,
        "Each [[mapping]] table is a mapping with options of its own:",
    );
    keys(&mut page, MAPPING_KEYS);
    page.control("SH", ["SPECS"]);
    specs(&mut page);
    page.control("SH", ["PRECEDENCE"]);
    paragraphs(
        &mut page,
        "A setting given on the daemon's command line wins over the file's, which wins over the \
         environment's (RPROXY_NAT, RPROXY_SOCKET_LB, RPROXY_SOCKET, RPROXY_METRICS_ADDR), \
         which wins over the default. A [[mapping]] table's own nat or socket_lb wins over \
         all of them. Timeouts and flow limits come from the environment alone (see \
         rproxy(8)).",
    );
    page.control("SH", ["EXAMPLE"]);
    page.control("nf", []);
    for line in EXAMPLE.lines() {
        page.text([roman(line)]);
    }
    page.control("fi", []);
    page.control("SH", ["FILES"]);
    definitions(
        &mut page,
        &[(
            config::DEFAULT_CONFIG,
            "The file the package installs (a commented example); kept on upgrades and \
             removed by purge.",
        )],
    );
    page.control("SH", ["SEE ALSO"]);
    page.text([roman("rproxy(8)")]);
    page.finish()
}

/// A config file with every key, for the page's EXAMPLE (a test checks that it loads).
pub const EXAMPLE: &str = r#"publish = [
  "8080:10.0.0.2:80",
  "127.0.0.1:5353:10.0.0.3:53/udp",
  "[::]:9000-9009:10.0.0.4:9000-9009",
]
control_socket = "/run/rproxy/rproxy.sock"
drain_timeout = 10
nat = "on"
socket_lb = "off"
metrics_addr = "127.0.0.1:9464"

[[mapping]]
publish = "8443:10.0.0.5:443"
nat = "require"
"#;

/// The completion scripts: (file name under packaging/completions, text).
pub fn completions() -> Vec<(&'static str, String)> {
    use clap_complete::Shell;
    [
        (Shell::Bash, "rproxy.bash"),
        (Shell::Zsh, "_rproxy"),
        (Shell::Fish, "rproxy.fish"),
    ]
    .into_iter()
    .map(|(shell, file)| {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cli::command(), "rproxy", &mut out);
        (file, String::from_utf8_lossy(&out).into_owned())
    })
    .collect()
}

/// "rproxy 0.1.0": the page's source, as clap_mangen writes it.
fn source() -> String {
    format!("rproxy {}", env!("CARGO_PKG_VERSION"))
}

/// A page being written: roff built with the roff crate, and sections clap_mangen rendered,
/// spliced in as text. Every rendering starts with the roff crate's apostrophe preamble; the
/// page keeps one, at its top.
#[derive(Default)]
struct Page {
    done: String,
    roff: Roff,
}

impl Page {
    /// Appends one section as clap_mangen renders it, without its `.SH` line: it goes under
    /// a heading of this page.
    fn clap(
        &mut self,
        man: &Man,
        render: fn(&Man, &mut dyn std::io::Write) -> std::io::Result<()>,
    ) {
        self.flush();
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = render(man, &mut out);
        let text = String::from_utf8_lossy(&out);
        for line in without_preamble(&text).lines() {
            if !line.starts_with(".SH ") {
                self.done.push_str(line);
                self.done.push('\n');
            }
        }
    }

    fn flush(&mut self) {
        let roff = std::mem::take(&mut self.roff);
        self.done.push_str(without_preamble(&roff.render()));
    }

    fn finish(mut self) -> String {
        self.flush();
        format!("{}{}", Roff::new().render(), self.done)
    }
}

impl std::ops::Deref for Page {
    type Target = Roff;
    fn deref(&self) -> &Roff {
        &self.roff
    }
}

impl std::ops::DerefMut for Page {
    fn deref_mut(&mut self) -> &mut Roff {
        &mut self.roff
    }
}

/// `rendered` without the preamble an empty document renders to.
fn without_preamble(rendered: &str) -> &str {
    let preamble = Roff::new().render();
    rendered.strip_prefix(preamble.as_str()).unwrap_or(rendered)
}

fn docker_synopsis() -> Vec<Inline> {
    vec![
        bold("rproxy"),
        roman(" [-proto "),
        italic("tcp|udp"),
        roman("] [-host-ip "),
        italic("IP"),
        roman("] [-host-port "),
        italic("PORT"),
        roman("] -container-ip "),
        italic("IP"),
        roman(" -container-port "),
        italic("PORT"),
        roman(" [-use-listen-fd]"),
    ]
}

/// "a, b and c".
fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Text with blank-line-separated paragraphs.
/// SYSTEMD: readiness, the journal and the fd store (see [`crate::systemd`]).
fn systemd_section(page: &mut Roff) {
    page.control("SH", ["SYSTEMD"]);
    paragraphs(
        page,
        "The packaged unit (rproxy.service) is Type=notify: the daemon sends READY=1 once it \
         serves every mapping, so systemctl start returns when the ports are open. Its log \
         lines go to the journal with their priorities (error 3, warning 4, info 6, debug 7): \
         journalctl -u rproxy -p warning shows warnings and errors.",
    );
    paragraphs(
        page,
        "The fd store. Under systemd the daemon hands a copy of the listening socket of each \
         of its own mappings (--publish and the config file) to the service manager \
         (sd_notify FDSTORE=1, FDNAME=PROTO-ADDRESS-PORT; the unit sets \
         FileDescriptorStoreMax=), and takes back those a reload removed (FDSTOREREMOVE=1). \
         systemd keeps them while the service runs and through systemctl restart, and passes \
         them to the new process (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), which serves its \
         mappings on them instead of binding anew. The ports stay open throughout a restart: \
         a client connecting while no process accepts waits in the listen backlog, for at \
         most the old process's drain, and is not refused. systemctl stop empties the store \
         and closes the ports. Not stored, so bound anew after a restart: mappings added \
         with rproxy add (they do not survive one), ports dockerd's proxies handed over \
         (their proxies serve them meanwhile) and ports followed with docker_ports. An upgrade needs no restart: systemctl reload \
         hands every socket to the new binary (SIGHUP).",
    );
}

fn paragraphs(page: &mut Roff, text: &str) {
    for (i, para) in text.split("\n\n").enumerate() {
        if i > 0 {
            page.control("PP", []);
        }
        page.text([roman(para.split_whitespace().collect::<Vec<_>>().join(" "))]);
    }
}

/// Terms in bold, each with its definition.
fn definitions(page: &mut Roff, items: &[(&str, &str)]) {
    for (term, definition) in items {
        page.control("TP", []);
        page.text([bold(*term)]);
        page.text([roman(*definition)]);
    }
}

fn keys(page: &mut Roff, keys: &[Key]) {
    for k in keys {
        page.control("TP", []);
        page.text([bold(k.name), roman(" = "), italic(k.value)]);
        page.text([roman(k.meaning)]);
    }
}

fn specs(page: &mut Roff) {
    page.text([bold(SPECS[0])]);
    page.control("PP", []);
    page.text([roman(SPECS[1])]);
}

/// What each example does, then its commands, unfilled.
fn examples(page: &mut Roff, items: &[(&str, &str)]) {
    for (what, commands) in items {
        page.control("PP", []);
        page.text([roman(*what)]);
        page.control("PP", []);
        page.control("RS", ["4"]);
        page.control("nf", []);
        for line in commands.lines() {
            page.text([bold(line)]);
        }
        page.control("fi", []);
        page.control("RE", []);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// packaging/ holds what the code generates: RPROXY_BLESS=1 rewrites it (review the diff
    /// and commit it), otherwise a stale file fails here.
    #[test]
    fn packaging_files_are_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
        let mut files = vec![
            ("man/rproxy.8".to_string(), rproxy_8()),
            ("man/rproxy.toml.5".to_string(), rproxy_toml_5()),
        ];
        for (name, text) in completions() {
            files.push((format!("completions/{name}"), text));
        }
        let bless = std::env::var_os("RPROXY_BLESS").is_some();
        let mut stale = Vec::new();
        for (name, text) in files {
            let path = root.join(&name);
            if bless {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "packaging/{stale:?} differ from what the code generates: run \
             `RPROXY_BLESS=1 cargo test --release --lib manual`, review the diff, commit"
        );
    }

    /// The mappings a config file makes, loaded as `rproxy daemon --config FILE` would. The
    /// file lives in a directory of its own (tests run in parallel), removed before returning.
    fn mappings_of(text: &str) -> usize {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rproxy-manual-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rproxy.toml");
        std::fs::write(&path, text).unwrap();
        let args = <crate::settings::cli::Cli as clap::Parser>::try_parse_from([
            "rproxy",
            "daemon",
            "--config",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let crate::settings::cli::Command::Daemon { settings, .. } = args.command else {
            panic!("not the daemon");
        };
        let loaded = config::Settings::load(&settings, &crate::settings::env::Env::default());
        let _ = std::fs::remove_dir_all(&dir);
        let settings = loaded.unwrap_or_else(|e| panic!("{e:?}"));
        settings.publish.len() + settings.config.len()
    }

    #[test]
    fn the_example_config_loads() {
        assert_eq!(mappings_of(EXAMPLE), 1 + 1 + 10 + 1);
    }

    /// The conffile the package installs is valid and maps nothing: a daemon reading it by
    /// default serves only what it is told.
    #[test]
    fn the_packaged_config_loads_and_maps_nothing() {
        assert_eq!(mappings_of(include_str!("../packaging/rproxy.toml")), 0);
    }
}
