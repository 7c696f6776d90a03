//! A mapping's options — how it dials, relays and expires — and the checked parsers every
//! setting from outside goes through (environment, flags, config file, control requests).
//!
//! Options are resolved once, where a mapping enters (docker-proxy argv, `--publish`, the
//! config file, `rproxy add`, a shim's registration), and travel with the [`Mapping`]; the
//! data path never reads the environment. Every number from outside is parsed with a checked
//! conversion against a stated range: release builds abort on panic, so `1e20` seconds must
//! be an error that names the setting, never a `Duration` overflow.
//!
//! [`Mapping`]: crate::mapping::Mapping

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::allow::AllowList;
use crate::proxy_protocol::Version;

/// How one mapping behaves. Defaults are docker-proxy's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Options {
    /// Kernel DNAT beside the listener (remote clients).
    pub nat: Mode,
    /// Socket hooks beside the listener (host clients; the daemon's).
    pub socket_lb: Mode,
    /// How long dialling the target may take before the client is reset.
    pub connect_timeout: Duration,
    /// Relay TCP streams with splice(2) (false: copy through user space).
    pub splice: bool,
    /// Silence (both directions) after which a UDP flow expires.
    pub udp_timeout: Duration,
    /// UDP flows per mapping before the least recently used is evicted; the descriptor limit
    /// may lower it further at run time.
    pub udp_max_flows: usize,
    /// The PROXY protocol header each backend connection starts with (TCP only; off unless
    /// a mapping asks).
    pub proxy_protocol: Version,
    /// Who may reach it from outside the host (None: everyone); every path enforces it.
    pub allow: Option<Arc<AllowList>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            nat: Mode::Off,
            socket_lb: Mode::Off,
            connect_timeout: Duration::from_secs(10),
            splice: true,
            udp_timeout: Duration::from_secs(90),
            udp_max_flows: 65_536,
            proxy_protocol: Version::Off,
            allow: None,
        }
    }
}

/// The options a source set explicitly, to be laid over a base (the daemon's defaults): what
/// a shim found in dockerd's environment, what `rproxy add --nat` asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// See [`Options::nat`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Mode>,
    /// See [`Options::socket_lb`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_lb: Option<Mode>,
    /// See [`Options::connect_timeout`] (milliseconds on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// See [`Options::splice`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splice: Option<bool>,
    /// See [`Options::udp_timeout`] (milliseconds on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_timeout_ms: Option<u64>,
    /// See [`Options::udp_max_flows`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_max_flows: Option<u64>,
    /// See [`Options::proxy_protocol`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<Version>,
    /// See [`Options::allow`]: its networks as written (CIDRs or addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
}

impl Overrides {
    /// `base` with every option set here replaced, each checked against its range (a control
    /// request is input like any other).
    pub fn apply(&self, base: &Options) -> Result<Options, String> {
        let ms = |limit: &Seconds, v: Option<u64>, base: Duration| match v {
            None => Ok(base),
            Some(ms) => limit.check_ms(ms),
        };
        Ok(Options {
            nat: self.nat.unwrap_or(base.nat),
            socket_lb: self.socket_lb.unwrap_or(base.socket_lb),
            connect_timeout: ms(
                &CONNECT_TIMEOUT,
                self.connect_timeout_ms,
                base.connect_timeout,
            )?,
            splice: self.splice.unwrap_or(base.splice),
            udp_timeout: ms(&UDP_TIMEOUT, self.udp_timeout_ms, base.udp_timeout)?,
            udp_max_flows: match self.udp_max_flows {
                None => base.udp_max_flows,
                Some(n) => UDP_MAX_FLOWS.check(n)?,
            },
            proxy_protocol: self.proxy_protocol.unwrap_or(base.proxy_protocol),
            allow: match &self.allow {
                None => base.allow.clone(),
                Some(nets) => Some(Arc::new(
                    AllowList::parse(nets).map_err(|e| format!("allow {e}"))?,
                )),
            },
        })
    }
}

impl From<&Options> for Overrides {
    /// Every option, set: how a mapping's options travel to a daemon taking over.
    fn from(o: &Options) -> Overrides {
        let ms = |d: Duration| Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Overrides {
            nat: Some(o.nat),
            socket_lb: Some(o.socket_lb),
            connect_timeout_ms: ms(o.connect_timeout),
            splice: Some(o.splice),
            udp_timeout_ms: ms(o.udp_timeout),
            udp_max_flows: Some(o.udp_max_flows as u64),
            proxy_protocol: Some(o.proxy_protocol),
            allow: o
                .allow
                .as_ref()
                .map(|a| a.nets().iter().map(ToString::to_string).collect()),
        }
    }
}

/// Whether a mapping uses one of the kernel paths (nftables DNAT, socket hooks) beside its
/// listener.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Userland only.
    #[default]
    Off,
    /// The kernel path where possible; without it, userland and one warning.
    On,
    /// The kernel path or fail.
    Require,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "off" | "0" | "false" | "no" => Ok(Mode::Off),
            "on" | "1" | "true" | "yes" => Ok(Mode::On),
            "require" => Ok(Mode::Require),
            other => Err(format!("invalid mode {other:?} (off, on or require)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::On => "on",
            Mode::Require => "require",
        })
    }
}

/// A setting measured in seconds, with its valid range.
pub struct Seconds {
    /// How errors name it.
    pub name: &'static str,
    /// Smallest and largest accepted value, in seconds.
    pub min: f64,
    /// See `min`.
    pub max: f64,
}

/// `RPROXY_CONNECT_TIMEOUT`: a tenth of a millisecond would fail every dial; an hour is
/// longer than any kernel SYN retry sequence.
pub const CONNECT_TIMEOUT: Seconds = Seconds {
    name: "connect timeout",
    min: 0.001,
    max: 3600.0,
};

/// `RPROXY_UDP_TIMEOUT`: up to a day of silence per flow.
pub const UDP_TIMEOUT: Seconds = Seconds {
    name: "UDP flow timeout",
    min: 0.001,
    max: 86_400.0,
};

/// `--drain-timeout`: 0 cuts connections at once; a day is the longest wait.
pub const DRAIN_TIMEOUT: Seconds = Seconds {
    name: "drain timeout",
    min: 0.0,
    max: 86_400.0,
};

impl Seconds {
    /// Parses a decimal number of seconds (`10`, `0.5`).
    pub fn parse(&self, text: &str) -> Result<Duration, String> {
        let secs: f64 = text.trim().parse().map_err(|_| {
            format!(
                "{} must be a number of seconds, {}",
                self.name,
                self.range()
            )
        })?;
        self.check(secs)
    }

    /// Checks a number of seconds (as a config file gives it).
    pub fn check(&self, secs: f64) -> Result<Duration, String> {
        if !(secs >= self.min && secs <= self.max) {
            return Err(format!(
                "{} of {secs} seconds is out of range: {}",
                self.name,
                self.range()
            ));
        }
        Duration::try_from_secs_f64(secs).map_err(|e| format!("{}: {e}", self.name))
    }

    fn check_ms(&self, ms: u64) -> Result<Duration, String> {
        // Exact for every u64 that matters here; larger values fail the range check anyway.
        self.check(ms as f64 / 1000.0)
    }

    fn range(&self) -> String {
        format!("from {} to {} seconds", self.min, self.max)
    }
}

/// A setting that counts something, with its valid range.
pub struct Count {
    /// How errors name it.
    pub name: &'static str,
    /// Smallest accepted value.
    pub min: u64,
    /// Largest accepted value.
    pub max: u64,
}

/// `RPROXY_UDP_MAX_FLOWS`: each flow costs a descriptor, and no process has a million.
pub const UDP_MAX_FLOWS: Count = Count {
    name: "UDP flow limit",
    min: 1,
    max: 1 << 20,
};

impl Count {
    /// Parses a decimal count.
    pub fn parse(&self, text: &str) -> Result<usize, String> {
        let n: u64 = text.trim().parse().map_err(|_| {
            format!(
                "{} must be a whole number from {} to {}",
                self.name, self.min, self.max
            )
        })?;
        self.check(n)
    }

    /// Checks a count (as a control request carries it).
    pub fn check(&self, n: u64) -> Result<usize, String> {
        if n < self.min || n > self.max {
            return Err(format!(
                "{} of {n} is out of range: from {} to {}",
                self.name, self.min, self.max
            ));
        }
        usize::try_from(n).map_err(|_| format!("{} of {n} does not fit this machine", self.name))
    }
}

/// A yes/no setting: `1`/`0`, `true`/`false`, `on`/`off`, `yes`/`no`.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err("must be 1 or 0 (true/false, on/off, yes/no)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mapping's options travel to a daemon taking over as overrides; they must arrive
    /// as they left, whatever the new daemon's defaults.
    #[test]
    fn options_survive_the_trip_as_overrides() {
        let o = Options {
            nat: Mode::Require,
            socket_lb: Mode::On,
            connect_timeout: Duration::from_millis(1),
            splice: false,
            udp_timeout: Duration::from_secs(86_400),
            udp_max_flows: 1,
            proxy_protocol: crate::proxy_protocol::Version::V2,
            allow: Some(Arc::new(
                AllowList::parse(&["192.0.2.0/24", "2001:db8::7"]).unwrap(),
            )),
        };
        let wire = serde_json::to_string(&Overrides::from(&o)).unwrap();
        let back: Overrides = serde_json::from_str(&wire).unwrap();
        assert_eq!(back.apply(&Options::default()), Ok(o));
    }

    #[test]
    fn seconds_are_checked_not_converted_blindly() {
        assert_eq!(CONNECT_TIMEOUT.parse("10"), Ok(Duration::from_secs(10)));
        assert_eq!(
            CONNECT_TIMEOUT.parse(" 0.5 "),
            Ok(Duration::from_millis(500))
        );
        for bad in [
            "1e20",
            "18446744073709551616",
            "-1",
            "0",
            "NaN",
            "inf",
            "-inf",
            "",
            "10s",
            "abc",
        ] {
            let err = CONNECT_TIMEOUT.parse(bad).expect_err(bad);
            assert!(
                err.contains("connect timeout") && err.contains("3600"),
                "{bad}: {err}"
            );
        }
        assert_eq!(DRAIN_TIMEOUT.check(0.0), Ok(Duration::ZERO));
        assert!(DRAIN_TIMEOUT.check(1e20).is_err());
        assert!(DRAIN_TIMEOUT.check(f64::NAN).is_err());
    }

    #[test]
    fn counts_are_checked() {
        assert_eq!(UDP_MAX_FLOWS.parse("100"), Ok(100));
        for bad in ["0", "-1", "1e3", "18446744073709551616", "2000000", "x"] {
            assert!(UDP_MAX_FLOWS.parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overrides_are_checked_when_applied() {
        let base = Options::default();
        let o = Overrides {
            connect_timeout_ms: Some(2500),
            udp_max_flows: Some(7),
            ..Overrides::default()
        };
        let got = o.apply(&base).unwrap();
        assert_eq!(got.connect_timeout, Duration::from_millis(2500));
        assert_eq!(got.udp_max_flows, 7);
        assert_eq!(got.udp_timeout, base.udp_timeout);
        for bad in [
            Overrides {
                connect_timeout_ms: Some(u64::MAX),
                ..Overrides::default()
            },
            Overrides {
                udp_timeout_ms: Some(0),
                ..Overrides::default()
            },
            Overrides {
                udp_max_flows: Some(u64::MAX),
                ..Overrides::default()
            },
        ] {
            assert!(bad.apply(&base).is_err(), "{bad:?}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Any text, any number: a duration within range or a reason naming the setting.
        #[test]
        fn any_seconds_are_checked(text in "[-+0-9.eEinfaINFA]{0,30}", secs in any::<f64>(), ms in any::<u64>()) {
            for limit in [&CONNECT_TIMEOUT, &UDP_TIMEOUT, &DRAIN_TIMEOUT] {
                for got in [limit.parse(&text), limit.check(secs), limit.check_ms(ms)] {
                    match got {
                        Ok(d) => prop_assert!(d.as_secs_f64() >= limit.min && d.as_secs_f64() <= limit.max),
                        Err(e) => prop_assert!(e.contains(limit.name)),
                    }
                }
            }
        }

        #[test]
        fn any_overrides_apply_or_are_refused(
            c in proptest::option::of(any::<u64>()),
            u in proptest::option::of(any::<u64>()),
            f in proptest::option::of(any::<u64>()),
        ) {
            let o = Overrides { connect_timeout_ms: c, udp_timeout_ms: u, udp_max_flows: f, ..Overrides::default() };
            if let Ok(got) = o.apply(&Options::default()) {
                prop_assert!(got.udp_max_flows >= 1 && got.udp_max_flows <= 1 << 20);
            }
        }
    }
}
