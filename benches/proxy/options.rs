//! Command-line options of the harness.

use super::*;

/// What runs, and where it goes.
#[derive(Clone, Debug)]
pub struct Options {
    pub smoke: bool,
    /// The host-* workloads against a container of a real dockerd (`--dockerd`).
    pub dockerd: bool,
    pub rounds: usize,
    pub seconds: u64,
    pub only: Vec<String>,
    pub proxies: Vec<Kind>,
    pub flows: usize,
    pub flow_msgs: usize,
    pub idle: usize,
    /// RLIMIT_NOFILE in force (the proxies inherit it): it caps idle-conns per proxy.
    pub nofile: u64,
    pub ports: usize,
    pub rate: u64,
    pub rproxy: PathBuf,
    pub docker_proxy: PathBuf,
    pub out: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub command: String,
}

pub(crate) fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: not a number: {v:?}"))
}

pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let smoke = args.iter().any(|a| a == "--smoke");
    let pick = |s: usize, f: usize| if smoke { s } else { f };
    let user_args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let dockerd = args.iter().any(|a| a == "--dockerd");
    let mut o = Options {
        smoke,
        dockerd,
        rounds: pick(1, 3),
        seconds: pick(1, 5) as u64,
        only: Vec::new(),
        // What the mode can run (the docker-ports deployment needs dockerd); with --dockerd,
        // the deployment, direct and docker-proxy.
        proxies: match dockerd {
            true => DOCKERD_DEFAULT.to_vec(),
            false => KINDS
                .into_iter()
                .filter(|k| *k != Kind::DockerPorts)
                .collect(),
        },
        flows: pick(200, 1000),
        flow_msgs: pick(2, 5),
        idle: pick(500, 10_000),
        nofile: 0,
        ports: pick(10, 100),
        rate: pick(1000, 10_000) as u64,
        rproxy: PathBuf::from(env!("CARGO_BIN_EXE_rproxy")),
        docker_proxy: PathBuf::from(DOCKER_PROXY),
        out: None,
        json: None,
        command: match user_args.is_empty() {
            true => "cargo bench --bench proxy".into(),
            false => format!("cargo bench --bench proxy -- {}", user_args.join(" ")),
        },
    };
    let mut it = user_args.iter();
    while let Some(&arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().map(|s| s.to_string()))
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag {
            "--smoke" | "--dockerd" => {}
            "--rounds" => o.rounds = number(flag, &value()?)?,
            "--seconds" => o.seconds = number(flag, &value()?)?,
            "--only" => {
                o.only = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--proxies" => {
                o.proxies = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Kind::from_name(s).ok_or(format!("--proxies: unknown proxy {s:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--flows" => o.flows = number(flag, &value()?)?,
            "--flow-msgs" => o.flow_msgs = number(flag, &value()?)?,
            "--idle" => o.idle = number(flag, &value()?)?,
            "--ports" => o.ports = number(flag, &value()?)?,
            "--rate" => o.rate = number(flag, &value()?)?,
            "--rproxy" => o.rproxy = value()?.into(),
            "--docker-proxy" => o.docker_proxy = value()?.into(),
            "--out" => o.out = Some(value()?.into()),
            "--json" => o.json = Some(value()?.into()),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    let checks = [
        (o.rounds >= 1, "--rounds must be at least 1"),
        (o.seconds >= 1, "--seconds must be at least 1"),
        (o.flows >= 1, "--flows must be at least 1"),
        (
            (1..=64).contains(&o.flow_msgs),
            "--flow-msgs must be 1..=64",
        ),
        (o.idle >= 1, "--idle must be at least 1"),
        ((1..=1000).contains(&o.ports), "--ports must be 1..=1000"),
        (o.rate >= 1, "--rate must be at least 1"),
    ];
    if let Some((_, e)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(e.to_string());
    }
    let possible = |k: &Kind| match o.dockerd {
        true => DOCKERD_KINDS.contains(k),
        false => *k != Kind::DockerPorts,
    };
    if let Some(k) = o.proxies.iter().find(|k| !possible(k)) {
        return Err(match o.dockerd {
            true => format!("--proxies: {} does not run with --dockerd", k.name()),
            false => format!("--proxies: {} needs --dockerd", k.name()),
        });
    }
    if o.dockerd {
        // Each measurement a port of its own: the run's ports for the deployment are
        // published before it starts, the others' must not be.
        if o.rounds * KINDS.len() > 100 {
            return Err(format!(
                "--dockerd: at most {} rounds (a port per measurement)",
                100 / KINDS.len()
            ));
        }
        if o.only.is_empty() {
            o.only = vec!["host-".into()];
        }
    }
    Ok(o)
}
