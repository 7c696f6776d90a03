//! A container's published ports as mappings: what dockerd lists, each to the container's
//! address on the network that carries its ports, and for an IPv4-only container the IPv6
//! clients dockerd leaves out.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::allow::AllowList;
use crate::engine::{Attachment, Container};
use crate::mapping::Mapping;
use crate::settings::options::Options;

/// A mapping a container's ports ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// What to serve.
    pub mapping: Mapping,
    /// dockerd listed the address, and holds it (with its userland proxy off it binds the
    /// port to reserve it): only the kernel paths can serve it. False for the IPv6 address
    /// added here for an IPv4-only container, which is served with a listener of ours when
    /// it is free.
    pub listed: bool,
}

/// The network that carries `c`'s published ports: the one its default route leaves by.
/// dockerd picks it by gateway priority (28 and later), then prefers its default `bridge`
/// network, then network names in order (seen with dockerd 20.10: a container on `zzz`,
/// `aaa` and `bridge` routes by `bridge`; on `zzz` and `aaa` by `aaa`, whichever joined
/// first).
pub fn carrier(c: &Container) -> Option<&Attachment> {
    c.networks
        .iter()
        .filter(|a| a.ipv4.is_some() || a.ipv6.is_some())
        .min_by_key(|a| (-a.gw_priority, a.network != "bridge", a.network.as_str()))
}

/// The label that says who may reach all of a container's published ports.
pub const ALLOW_LABEL: &str = "rproxy.allow";

/// Who may reach `c`'s host port `port`: its `rproxy.allow.<port>` label, else its
/// `rproxy.allow` label, else `default`. A label that does not parse gives `default` (never
/// anything wider), and what is wrong with it goes to `bad`.
pub fn allow_for(
    c: &Container,
    port: u16,
    default: &Option<Arc<AllowList>>,
    bad: &mut Vec<String>,
) -> Option<Arc<AllowList>> {
    let own = format!("{ALLOW_LABEL}.{port}");
    let Some((name, value)) = [own.as_str(), ALLOW_LABEL]
        .into_iter()
        .find_map(|name| Some((name, c.labels.get(name)?)))
    else {
        return default.clone();
    };
    match AllowList::parse_joined(value) {
        Ok(list) => Some(Arc::new(list)),
        Err(e) => {
            let problem = format!("label {name}={value:?}: {e}");
            if !bad.contains(&problem) {
                bad.push(problem);
            }
            default.clone()
        }
    }
}

/// Every mapping `c`'s published ports ask for, with `options`: one per port dockerd lists
/// (IPv4 host addresses to the container's IPv4 address; IPv6 ones to its IPv6 address, or
/// 6→4 to its IPv4 address when it has none), and for each port published on 0.0.0.0 that
/// dockerd lists no IPv6 address for, `[::]:PORT` to its IPv4 address (6→4). Each gets the
/// allow-list its container's labels give its host port ([`allow_for`], `options.allow` the
/// default); labels that do not parse are described in `bad`.
pub fn wanted(c: &Container, options: &Options, bad: &mut Vec<String>) -> Vec<Wanted> {
    let Some(net) = carrier(c) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in &c.ports {
        let target: Option<IpAddr> = match p.host_ip {
            IpAddr::V4(_) => net.ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => net.ipv6.map(IpAddr::V6).or(net.ipv4.map(IpAddr::V4)),
        };
        let Some(target) = target else { continue };
        let options = Options {
            allow: allow_for(c, p.host_port, &options.allow, bad),
            ..options.clone()
        };
        let mapping = |listen: IpAddr| Mapping {
            proto: p.proto,
            listen: SocketAddr::new(listen, p.host_port),
            target: SocketAddr::new(target, p.container_port),
            options: options.clone(),
        };
        out.push(Wanted {
            mapping: mapping(p.host_ip),
            listed: true,
        });
        let v6_listed = c
            .ports
            .iter()
            .any(|q| q.proto == p.proto && q.host_port == p.host_port && q.host_ip.is_ipv6());
        if p.host_ip.is_unspecified() && p.host_ip.is_ipv4() && !v6_listed && target.is_ipv4() {
            out.push(Wanted {
                mapping: mapping(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                listed: false,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Published;
    use crate::mapping::Proto;

    fn net(name: &str, v4: &str, v6: Option<&str>, priority: i64) -> Attachment {
        Attachment {
            network: name.into(),
            ipv4: v4.parse().ok(),
            ipv6: v6.and_then(|a| a.parse().ok()),
            gw_priority: priority,
        }
    }

    fn port(proto: Proto, host_ip: &str, host_port: u16, container_port: u16) -> Published {
        Published {
            proto,
            host_ip: host_ip.parse().unwrap(),
            host_port,
            container_port,
        }
    }

    fn specs(c: &Container) -> Vec<(String, bool)> {
        wanted(c, &Options::default(), &mut Vec::new())
            .iter()
            .map(|w| (w.mapping.spec(), w.listed))
            .collect()
    }

    #[test]
    fn a_dual_stack_container_gets_what_dockerd_lists() {
        let c = Container {
            id: "a".into(),
            name: "web".into(),
            ports: vec![
                port(Proto::Tcp, "0.0.0.0", 8080, 80),
                port(Proto::Tcp, "::", 8080, 80),
            ],
            labels: Default::default(),
            networks: vec![net("bridge", "172.17.0.2", Some("fd00::2"), 0)],
        };
        assert_eq!(
            specs(&c),
            [
                ("0.0.0.0:8080:172.17.0.2:80/tcp".to_string(), true),
                ("[::]:8080:[fd00::2]:80/tcp".to_string(), true)
            ]
        );
    }

    #[test]
    fn an_ipv4_only_container_gets_its_ipv6_clients_too() {
        let c = Container {
            id: "a".into(),
            name: "web4".into(),
            ports: vec![
                port(Proto::Udp, "0.0.0.0", 8053, 53),
                port(Proto::Tcp, "127.0.0.1", 8081, 81),
            ],
            labels: Default::default(),
            networks: vec![net("v4only", "172.18.0.2", None, 0)],
        };
        assert_eq!(
            specs(&c),
            [
                ("0.0.0.0:8053:172.18.0.2:53/udp".to_string(), true),
                ("[::]:8053:172.18.0.2:53/udp".to_string(), false),
                ("127.0.0.1:8081:172.18.0.2:81/tcp".to_string(), true)
            ]
        );
    }

    #[test]
    fn the_carrier_is_the_default_routes_network() {
        let mut c = Container {
            id: "a".into(),
            name: "multi".into(),
            ports: vec![port(Proto::Tcp, "0.0.0.0", 8080, 80)],
            labels: Default::default(),
            networks: vec![
                net("zzz", "172.20.0.2", None, 0),
                net("aaa", "172.19.0.2", None, 0),
            ],
        };
        assert_eq!(carrier(&c).unwrap().network, "aaa");
        c.networks.push(net("bridge", "172.17.0.3", None, 0));
        assert_eq!(carrier(&c).unwrap().network, "bridge");
        c.networks.push(net("zzz-prio", "172.21.0.2", None, 10));
        assert_eq!(carrier(&c).unwrap().network, "zzz-prio");
        c.networks = vec![net("none", "", None, 0)];
        assert!(wanted(&c, &Options::default(), &mut Vec::new()).is_empty());
    }
}
