//! The maps the socket hooks read, created and written by the daemon; their keys and values
//! as bytes, laid out as `programs` reads them.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use super::programs::FLAG_V4_TARGET;
use crate::mapping::{Mapping, Proto};
use crate::sys::bpf::{self, Map, MapSpec};

const HASH: u32 = 1;
const ARRAY: u32 = 2;
const LRU_HASH: u32 = 9;
const SK_STORAGE: u32 = 24;
const NO_PREALLOC: u32 = 1;

/// Size of a service's target: address [16], port u32, mapping id u32, flags u32, network
/// u32.
pub const TARGET_SIZE: u32 = 32;

/// Mappings the hooks can know at once (each needs a counter slot).
pub const MAX_MAPPINGS: u32 = 65_536;

/// Sockets redirected at once whose replies and peer names are restored (LRU: the oldest go).
const MAX_REVERSE: u32 = 262_144;

/// The host addresses tracked for wildcard mappings.
const MAX_LOCAL: u32 = 4_096;

/// (container namespace, network) pairs the hairpin rule can know at once.
pub const MAX_HAIRPIN: u32 = 65_536;

/// Every map, by the names the programs use.
pub struct Maps {
    services4: Map,
    services6: Map,
    local4: Map,
    local6: Map,
    reverse: Map,
    counters: Map,
    hairpin: Map,
    config: Map,
    v6only: Map,
}

impl Maps {
    /// Creates every map, with the host network namespace's cookie and the default of
    /// IPV6_V6ONLY (net.ipv6.bindv6only) in `config`.
    pub fn create(host_netns: u64, bindv6only: bool) -> io::Result<Maps> {
        let map = |kind, key, value, max_entries, name| {
            Map::create(&MapSpec {
                kind,
                key,
                value,
                max_entries,
                name,
                flags: 0,
                btf: None,
            })
        };
        let maps = Maps {
            services4: map(HASH, 8, TARGET_SIZE, MAX_MAPPINGS, "rpx_services4")?,
            services6: map(HASH, 20, TARGET_SIZE, MAX_MAPPINGS, "rpx_services6")?,
            local4: map(HASH, 4, 4, MAX_LOCAL, "rpx_local4")?,
            local6: map(HASH, 16, 4, MAX_LOCAL, "rpx_local6")?,
            reverse: map(LRU_HASH, 32, 20, MAX_REVERSE, "rpx_reverse")?,
            counters: map(ARRAY, 4, 16, MAX_MAPPINGS, "rpx_counters")?,
            hairpin: map(HASH, 16, 4, MAX_HAIRPIN, "rpx_hairpin")?,
            config: map(ARRAY, 4, 8, 2, "rpx_config")?,
            v6only: socket_storage("rpx_v6only")?,
        };
        let config = |slot: u32, value: u64| {
            maps.config
                .update(&slot.to_ne_bytes(), &value.to_ne_bytes())
        };
        config(0, host_netns)?;
        config(1, u64::from(bindv6only))?;
        Ok(maps)
    }

    /// The fd of the map a program names.
    pub fn fd(&self, name: &str) -> Option<BorrowedFd<'_>> {
        Some(
            match name {
                "services4" => &self.services4,
                "services6" => &self.services6,
                "local4" => &self.local4,
                "local6" => &self.local6,
                "reverse" => &self.reverse,
                "counters" => &self.counters,
                "hairpin" => &self.hairpin,
                "config" => &self.config,
                "v6only" => &self.v6only,
                _ => return None,
            }
            .as_fd(),
        )
    }

    /// Publishes `m` with counter slot `id`: sockets dialling its address (or, for a wildcard
    /// address, any loopback or host address) reach its target. `network`: the number of the
    /// target's network for the hairpin rule (0: none). `fresh`: the slot is new, its
    /// counters start at zero.
    pub fn publish(&self, m: &Mapping, id: u32, network: u32, fresh: bool) -> io::Result<()> {
        let (map, key) = self.service_key(m);
        if fresh {
            self.counters.update(&id.to_ne_bytes(), &[0u8; 16])?;
        }
        map.update(&key, &target(m, id, network))
    }

    /// Adds (`present`) or removes a hairpin pair: sockets of the network namespace with
    /// cookie `netns` may be sent to targets on network `network`.
    pub fn set_hairpin(&self, netns: u64, network: u32, present: bool) -> io::Result<()> {
        let mut key = netns.to_ne_bytes().to_vec();
        key.extend(network.to_ne_bytes());
        key.extend(0u32.to_ne_bytes());
        match present {
            true => self.hairpin.update(&key, &1u32.to_ne_bytes()),
            false => self.hairpin.delete(&key).map(|_| ()),
        }
    }

    /// Withdraws `m`: new sockets reach its listener again (or nothing).
    pub fn withdraw(&self, m: &Mapping) -> io::Result<()> {
        let (map, key) = self.service_key(m);
        map.delete(&key).map(|_| ())
    }

    /// Connections (TCP, connected UDP) and datagrams the hooks sent on to the targets of
    /// the mapping with counter slot `id`.
    pub fn counters(&self, id: u32) -> (u64, u64) {
        match self.counters.lookup(&id.to_ne_bytes()) {
            Ok(Some(value)) => {
                let word = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&value[i..i + 8]);
                    u64::from_ne_bytes(b)
                };
                (word(0), word(8))
            }
            _ => (0, 0),
        }
    }

    /// Adds (`present`) or removes a host address.
    pub fn set_local(&self, ip: IpAddr, present: bool) -> io::Result<()> {
        let (map, key): (&Map, Vec<u8>) = match ip {
            IpAddr::V4(v4) => (&self.local4, v4.octets().to_vec()),
            IpAddr::V6(v6) => (&self.local6, v6.octets().to_vec()),
        };
        match present {
            true => map.update(&key, &1u32.to_ne_bytes()),
            false => map.delete(&key).map(|_| ()),
        }
    }

    fn service_key(&self, m: &Mapping) -> (&Map, Vec<u8>) {
        let proto = match m.proto {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        };
        let port = m.listen.port().to_be_bytes();
        let tail = [port[0], port[1], proto, 0];
        match m.listen.ip() {
            IpAddr::V4(v4) => {
                let mut key = v4.octets().to_vec();
                key.extend(tail);
                (&self.services4, key)
            }
            IpAddr::V6(v6) => {
                let mut key = v6.octets().to_vec();
                key.extend(tail);
                (&self.services6, key)
            }
        }
    }
}

/// A socket-storage map of one int per socket (what IPV6_V6ONLY was last set to). The kernel
/// wants such maps described with BTF: here the smallest description, one signed 32-bit
/// `int` for both key and value.
fn socket_storage(name: &'static str) -> io::Result<Map> {
    let btf = bpf::btf_load(&int_btf())?;
    Map::create(&MapSpec {
        kind: SK_STORAGE,
        key: 4,
        value: 4,
        max_entries: 0,
        name,
        flags: NO_PREALLOC,
        btf: Some((btf.as_raw_fd(), 1, 1)),
    })
}

/// BTF with one type, id 1: `int` (struct btf_header, one btf_type of kind INT and its
/// encoding word, the string section "\0int\0").
fn int_btf() -> Vec<u8> {
    const KIND_INT: u32 = 1;
    const INT_SIGNED: u32 = 1;
    let types: Vec<u32> = vec![1, KIND_INT << 24, 4, INT_SIGNED << 24 | 32];
    let strings = b"\0int\0";
    let mut b = Vec::new();
    b.extend(0xeb9fu16.to_ne_bytes());
    b.extend([1u8, 0]); // version, flags
    let types_len = (types.len() * 4) as u32;
    for word in [24, 0, types_len, types_len, strings.len() as u32] {
        b.extend(word.to_ne_bytes()); // hdr_len, type_off, type_len, str_off, str_len
    }
    for t in types {
        b.extend(t.to_ne_bytes());
    }
    b.extend(strings);
    b
}

/// The Target of `m`: its address (an IPv4 target of an IPv6 mapping written IPv4-mapped,
/// flagged), port, counter slot, network.
fn target(m: &Mapping, id: u32, network: u32) -> Vec<u8> {
    let (addr, flags): ([u8; 16], u32) = match (m.listen.ip(), m.target.ip()) {
        (IpAddr::V4(_), IpAddr::V4(t)) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&t.octets());
            (a, 0)
        }
        (IpAddr::V6(_), IpAddr::V4(t)) => (t.to_ipv6_mapped().octets(), FLAG_V4_TARGET as u32),
        (_, IpAddr::V6(t)) => (t.octets(), 0),
    };
    let port = m.target.port().to_be_bytes();
    let mut v = addr.to_vec();
    v.extend([port[0], port[1], 0, 0]);
    v.extend(id.to_ne_bytes());
    v.extend(flags.to_ne_bytes());
    v.extend(network.to_ne_bytes());
    v
}

/// The host's addresses now (what `local4`/`local6` should hold): every address of every
/// interface but loopback, which the programs recognise by itself.
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for (_, ip) in crate::interfaces::addresses()? {
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::parse_publish;

    #[test]
    fn targets_are_laid_out_as_the_programs_read_them() {
        let one = |spec: &str| parse_publish(spec, Default::default()).unwrap()[0].clone();
        let v = target(&one("8080:172.17.0.2:80"), 7, 3);
        assert_eq!(v.len(), TARGET_SIZE as usize);
        assert_eq!(&v[..4], &[172, 17, 0, 2]);
        assert_eq!(&v[4..16], &[0; 12]);
        assert_eq!(&v[16..20], &[0, 80, 0, 0]);
        assert_eq!(&v[20..24], &7u32.to_ne_bytes());
        assert_eq!(&v[24..28], &0u32.to_ne_bytes());
        assert_eq!(&v[28..32], &3u32.to_ne_bytes());
        // 6→4: the IPv4 target written IPv4-mapped, and flagged.
        let v = target(&one("[::]:8080:172.17.0.2:80"), 1, 0);
        assert_eq!(
            &v[..16],
            &"::ffff:172.17.0.2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&v[24..28], &1u32.to_ne_bytes());
    }
}
