//! Who may reach a published port: a mapping's list of source networks. Every path that
//! serves the port enforces the same list — the kernel's filter ahead of any DNAT (dockerd's
//! included), the listener at accept and before a UDP flow is made, the socket hooks for
//! containers — while processes of the host itself always get through, as host firewalls
//! let loopback through.
//!
//! A list is written as CIDRs or single addresses (`192.0.2.0/24`, `2001:db8::/32`,
//! `198.51.100.7`); an empty list lets no one from outside in.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// The networks a mapping accepts clients from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowList {
    /// Sorted, without duplicates.
    nets: Vec<IpNet>,
}

/// Why an entry of a list is not a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub why: String,
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.entry, self.why)
    }
}

impl AllowList {
    /// The list of `entries`, each a CIDR or an address; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, BadEntry> {
        let mut nets = entries
            .iter()
            .map(|e| net(e.as_ref().trim()))
            .collect::<Result<Vec<IpNet>, BadEntry>>()?;
        nets.sort();
        nets.dedup();
        Ok(AllowList { nets })
    }

    /// A list written as one string, its entries separated by commas (a container label).
    pub fn parse_joined(text: &str) -> Result<AllowList, BadEntry> {
        let entries: Vec<&str> = text.split(',').filter(|e| !e.trim().is_empty()).collect();
        AllowList::parse(&entries)
    }

    /// Whether a client at `ip` may connect (an IPv4-mapped IPv6 address is its IPv4 one).
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether a client at `ip` gets in: one the list permits, or a process of the host
    /// itself (loopback, or one of the host's addresses), which every path lets through.
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.permits(ip) || crate::interfaces::is_local(ip)
    }

    /// The networks, sorted.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

impl fmt::Display for AllowList {
    /// The entries joined by commas, as a label writes them; `none` for an empty list.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nets.is_empty() {
            return f.write_str("none");
        }
        for (i, n) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

impl FromStr for AllowList {
    type Err = BadEntry;
    fn from_str(s: &str) -> Result<AllowList, BadEntry> {
        AllowList::parse_joined(s)
    }
}

/// One entry: `a.b.c.d/len`, `v6/len`, or an address alone (all of its bits). Host bits
/// below the prefix are refused rather than dropped: `10.0.0.1/8` is more likely a typo
/// than a wish for all of 10/8.
fn net(entry: &str) -> Result<IpNet, BadEntry> {
    let bad = |why: String| BadEntry {
        entry: entry.to_string(),
        why,
    };
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    let net: IpNet = entry
        .parse()
        .map_err(|_| bad("not an address or a CIDR (e.g. 192.0.2.0/24, 2001:db8::/32)".into()))?;
    if net.trunc() != net {
        return Err(bad(format!(
            "host bits set below the /{} prefix: did you mean {}?",
            net.prefix_len(),
            net.trunc()
        )));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_addresses_are_parsed_sorted_and_deduplicated() {
        let list = AllowList::parse(&[
            "2001:db8::/32",
            "192.0.2.0/24",
            " 198.51.100.7",
            "192.0.2.0/24",
        ])
        .unwrap();
        assert_eq!(
            list.to_string(),
            "192.0.2.0/24,198.51.100.7/32,2001:db8::/32"
        );
        assert!(list.permits("192.0.2.200".parse().unwrap()));
        assert!(list.permits("::ffff:192.0.2.9".parse().unwrap()));
        assert!(list.permits("2001:db8:1::5".parse().unwrap()));
        assert!(list.permits("198.51.100.7".parse().unwrap()));
        assert!(!list.permits("198.51.100.8".parse().unwrap()));
        assert!(!list.permits("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_named() {
        let e = AllowList::parse(&["192.0.2.0/24", "10.0.0.1/8"]).unwrap_err();
        assert_eq!(e.entry, "10.0.0.1/8");
        assert!(e.why.contains("did you mean 10.0.0.0/8"), "{e}");
        for bad in ["192.0.2.0/33", "example.com", "", "1.2.3.4/", "::/129"] {
            assert!(AllowList::parse(&[bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_label_lists_with_commas_and_an_empty_one_lets_no_one_in() {
        let list: AllowList = "10.0.0.0/8, fd00::/8".parse().unwrap();
        assert_eq!(list.nets().len(), 2);
        let none: AllowList = "".parse().unwrap();
        assert!(!none.permits("127.0.0.1".parse().unwrap()));
        assert_eq!(none.to_string(), "none");
        assert!("10.0.0.0/8,nope".parse::<AllowList>().is_err());
    }
}
