//! The kernel fast path: DNAT rules for mappings in rproxy's own nftables table, installed
//! over netlink. The userland listener keeps running beside them and serves what DNAT must
//! not or cannot: loopback clients, hairpin traffic from the target's own network, IPv6
//! clients of an IPv4 target.
//!
//! Ownership: the table is created with NFT_TABLE_F_OWNER, so it belongs to this process's
//! netlink socket and the kernel deletes it when the process exits, even by SIGKILL. Tables
//! that kernels without the owner flag (before 5.12) leave behind are swept at start-up: only
//! tables named like ours, not owned, whose process is gone. Nothing else is ever touched.

mod conntrack;
mod netlink;
mod route;
pub mod rules;

use std::collections::HashMap;
use std::sync::Mutex;

use netlink::{Attrs, Error, Message, Netlink};
use rules::Chain;

use crate::mapping::Mapping;
use crate::options::NatMode as Mode;

/// How a mapping's traffic is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// DNAT rules in the kernel (plus the listener, for loopback and hairpin clients).
    Kernel,
    /// dockerd's own iptables rules DNAT it; rproxy adds none (the listener still runs).
    Dockerd,
    /// The userland listener only, and why.
    Userland(String),
}

impl Path {
    /// The word `rproxy ls` shows.
    pub fn label(&self) -> &'static str {
        match self {
            Path::Kernel => "kernel",
            Path::Dockerd => "dockerd",
            Path::Userland(_) => "userland",
        }
    }
}

/// Decides each mapping's path by its mode, opening rproxy's table on first use.
pub struct Manager {
    table: String,
    state: Mutex<State>,
}

enum State {
    Closed,
    Open(Nat),
    Unavailable(String),
}

impl Manager {
    pub fn new(table: &str) -> Manager {
        Manager {
            table: table.to_string(),
            state: Mutex::new(State::Closed),
        }
    }

    /// Opens the table now (the daemon with `--nat`: report at start-up, not at the first
    /// mapping). Err only for `Require`; `On` falls back with one warning.
    pub fn open(&self, mode: Mode) -> Result<(), String> {
        let mut state = self.state.lock().unwrap();
        Self::ensure_open(&mut state, &self.table);
        match (&*state, mode) {
            (State::Unavailable(why), Mode::Require) => Err(format!("kernel NAT required: {why}")),
            _ => Ok(()),
        }
    }

    fn ensure_open(state: &mut State, table: &str) {
        if let State::Closed = state {
            *state = match Nat::open(table) {
                Ok(nat) => State::Open(nat),
                Err(why) => {
                    tracing::warn!(
                        "kernel NAT unavailable ({why}); serving every port in userland"
                    );
                    State::Unavailable(why)
                }
            };
        }
    }

    /// Gives `m` the path its mode asks for. `from_dockerd`: the mapping is one dockerd
    /// publishes, whose own iptables rules may already translate it. None when `Off`.
    pub fn install(
        &self,
        m: &Mapping,
        mode: Mode,
        from_dockerd: bool,
    ) -> Result<Option<Path>, String> {
        if mode == Mode::Off {
            return Ok(None);
        }
        // Before opening our table: a mapping that stays in userland, or whose port dockerd
        // translates, needs none.
        if let Some(why) = rules::userland_only(m) {
            tracing::info!("{m}: userland only, {why}");
            return Ok(Some(Path::Userland(why.into())));
        }
        if from_dockerd && docker_dnats(m) {
            tracing::info!("{m}: dockerd's iptables rules already DNAT it (run dockerd with --iptables=false to let rproxy own NAT)");
            return Ok(Some(Path::Dockerd));
        }
        let mut state = self.state.lock().unwrap();
        Self::ensure_open(&mut state, &self.table);
        let nat = match &*state {
            State::Open(nat) => nat,
            State::Unavailable(why) if mode == Mode::Require => {
                return Err(format!("kernel NAT required for {m}: {why}"))
            }
            State::Unavailable(why) => return Ok(Some(Path::Userland(why.clone()))),
            State::Closed => unreachable!("opened above"),
        };
        match nat.install(m) {
            Ok(()) => {
                tracing::info!("{m}: kernel NAT installed in table inet {}", nat.table());
                Ok(Some(Path::Kernel))
            }
            Err(why) if mode == Mode::Require => Err(why),
            Err(why) => {
                tracing::warn!("{why}; serving {m} in userland");
                Ok(Some(Path::Userland(why)))
            }
        }
    }

    /// Removes `m`'s rules if it had any.
    pub fn remove(&self, m: &Mapping, path: Option<&Path>) {
        if path != Some(&Path::Kernel) {
            return;
        }
        if let State::Open(nat) = &*self.state.lock().unwrap() {
            if let Err(e) = nat.remove(m) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Connections the kernel translated, by mapping spec.
    pub fn connections(&self) -> HashMap<String, u64> {
        match &*self.state.lock().unwrap() {
            State::Open(nat) => nat.connections(),
            _ => HashMap::new(),
        }
    }

    /// Deletes the table (all rules at once); a later install opens it again.
    pub fn close(&self) {
        *self.state.lock().unwrap() = State::Closed;
    }
}

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_OWNER: u32 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NF_ACCEPT: u32 = 1;

/// rproxy's table, for as long as this value lives.
pub struct Nat {
    nl: Mutex<Netlink>,
    table: String,
    /// UDP mappings with rules, whose flows must be forgotten with them.
    udp: Mutex<Vec<Mapping>>,
    /// (chain, handle) of the rules per comment, from the last dump. Deleting a rule needs its
    /// handle, and a dump per removal made a container's 500 ports cost 500 dumps of up to
    /// 1,000 rules (2.2 s here, holding the supervisor). A removal takes its entry; an install
    /// drops its entry (the dump predates the new rules); a miss or a stale handle dumps anew.
    /// Only this socket writes an owner table, so entries stay good between dumps.
    handles: Mutex<HashMap<String, Vec<(String, u64)>>>,
}

impl Nat {
    /// The daemon's table name; docker-mode processes serving alone use `rproxy-<pid>`.
    pub const DAEMON_TABLE: &'static str = "rproxy";

    /// Sweeps what crashed rproxy processes left, then creates `table` with its chains.
    fn open(table: &str) -> Result<Nat, String> {
        let mut nl = Netlink::open().map_err(|e| explain(&e))?;
        sweep(&mut nl, table).map_err(|e| explain(&e))?;
        let create = |flags: u32| {
            let mut msgs = vec![Message::new(
                netlink::NFT_MSG_NEWTABLE,
                netlink::NFPROTO_INET,
                netlink::NLM_F_CREATE | netlink::NLM_F_EXCL,
                {
                    let mut a = Attrs::default();
                    a.str(NFTA_TABLE_NAME, table).u32(NFTA_TABLE_FLAGS, flags);
                    a
                },
            )];
            for chain in Chain::ALL {
                let mut a = Attrs::default();
                a.str(NFTA_CHAIN_TABLE, table)
                    .str(NFTA_CHAIN_NAME, chain.name())
                    .nest(NFTA_CHAIN_HOOK, |h| {
                        h.u32(1, chain.hook()).u32(2, rules::PRIORITY as u32);
                    })
                    .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
                    .str(NFTA_CHAIN_TYPE, "nat");
                msgs.push(Message::new(
                    netlink::NFT_MSG_NEWCHAIN,
                    netlink::NFPROTO_INET,
                    netlink::NLM_F_CREATE,
                    a,
                ));
            }
            msgs
        };
        match nl.batch(&create(NFT_TABLE_F_OWNER)) {
            Ok(()) => {}
            // Before Linux 5.12: no owner flag; start-up sweeps stand in for it.
            Err(e) if e.errno == libc::EOPNOTSUPP => {
                tracing::info!("nftables has no table owner flag here; relying on sweeps");
                nl.batch(&create(0)).map_err(|e| explain(&e))?;
            }
            Err(e) if e.errno == libc::EEXIST => {
                return Err(format!(
                    "nftables table inet {table} belongs to another running rproxy"
                ))
            }
            Err(e) => return Err(explain(&e)),
        }
        tracing::info!("kernel NAT: nftables table inet {table} ready");
        Ok(Nat {
            nl: Mutex::new(nl),
            table: table.to_string(),
            udp: Mutex::default(),
            handles: Mutex::default(),
        })
    }

    fn table(&self) -> &str {
        &self.table
    }

    /// Installs `m`'s DNAT rules in one batch. `Manager::install` has ruled out mappings
    /// that stay in userland (`rules::userland_only`).
    fn install(&self, m: &Mapping) -> Result<(), String> {
        let hairpin = route::interface_toward(m.target).map_err(|e| {
            format!(
                "no route to {} for kernel NAT: {}",
                m.target,
                crate::mapping::describe(&e)
            )
        })?;
        if let Some(why) = hairpin
            .as_deref()
            .and_then(|i| forwarding_off(i, m.target.is_ipv6()))
        {
            return Err(format!(
                "{why}, so translated packets would not be forwarded to {}",
                m.target
            ));
        }
        let msgs: Vec<Message> = rules::for_mapping(m, hairpin.as_deref())
            .iter()
            .map(|r| {
                tracing::debug!("nat rule {r}");
                Message::new(
                    netlink::NFT_MSG_NEWRULE,
                    netlink::NFPROTO_INET,
                    netlink::NLM_F_CREATE | netlink::NLM_F_APPEND,
                    r.encode(&self.table),
                )
            })
            .collect();
        self.handles.lock().unwrap().remove(&rules::comment(m));
        self.nl
            .lock()
            .unwrap()
            .batch(&msgs)
            .map_err(|e| format!("cannot install kernel NAT for {m}: {}", explain(&e)))?;
        if m.proto == crate::mapping::Proto::Udp {
            self.udp.lock().unwrap().push(*m);
        }
        Ok(())
    }

    /// Removes `m`'s rules (connections already translated keep their conntrack entries).
    fn remove(&self, m: &Mapping) -> Result<(), String> {
        let comment = rules::comment(m);
        let mut nl = self.nl.lock().unwrap();
        let mut handles = self.handles.lock().unwrap();
        let fail = |e: &Error| format!("cannot remove kernel NAT for {m}: {}", explain(e));
        let cached = handles.contains_key(&comment);
        if !cached {
            *handles = self.handles(&mut nl).map_err(|e| fail(&e))?;
        }
        let mut deleted = self.delete(&mut nl, &handles.remove(&comment).unwrap_or_default());
        // Someone changed the table behind our back (nft), which only a kernel without owner
        // tables (before 5.12) lets them do: read it again, once.
        if cached && deleted.as_ref().is_err_and(|e| e.errno == libc::ENOENT) {
            *handles = self.handles(&mut nl).map_err(|e| fail(&e))?;
            deleted = self.delete(&mut nl, &handles.remove(&comment).unwrap_or_default());
        }
        deleted.map_err(|e| fail(&e))?;
        self.udp.lock().unwrap().retain(|u| u != m);
        forget_flows(&mut nl, m);
        Ok(())
    }

    /// Deletes rules by (chain, handle), in one batch.
    fn delete(&self, nl: &mut Netlink, rules: &[(String, u64)]) -> Result<(), Error> {
        let msgs: Vec<Message> = rules
            .iter()
            .map(|(chain, handle)| {
                let mut a = Attrs::default();
                a.str(rules::NFTA_RULE_TABLE, &self.table)
                    .str(rules::NFTA_RULE_CHAIN, chain)
                    .u64(rules::NFTA_RULE_HANDLE, *handle);
                Message::new(netlink::NFT_MSG_DELRULE, netlink::NFPROTO_INET, 0, a)
            })
            .collect();
        nl.batch(&msgs)
    }

    /// Every rule's (chain, handle), by comment.
    fn handles(&self, nl: &mut Netlink) -> Result<HashMap<String, Vec<(String, u64)>>, Error> {
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for r in self.rules(nl)? {
            if let Some(comment) = r.comment {
                out.entry(comment).or_default().push((r.chain, r.handle));
            }
        }
        Ok(out)
    }

    /// Connections (first packets) each mapping's rules translated, by mapping spec.
    fn connections(&self) -> HashMap<String, u64> {
        let mut nl = self.nl.lock().unwrap();
        let mut out = HashMap::new();
        for r in self.rules(&mut nl).unwrap_or_default() {
            if let Some(spec) = r.comment.as_deref().and_then(|c| c.strip_prefix("rproxy ")) {
                *out.entry(spec.to_string()).or_insert(0) += r.packets;
            }
        }
        out
    }

    fn rules(&self, nl: &mut Netlink) -> Result<Vec<RuleInfo>, Error> {
        let mut filter = Attrs::default();
        filter.str(rules::NFTA_RULE_TABLE, &self.table);
        let dumped = nl.dump(netlink::NFT_MSG_GETRULE, netlink::NFPROTO_INET, filter)?;
        Ok(dumped
            .iter()
            .filter_map(|r| RuleInfo::parse(&r.attrs))
            .collect())
    }
}

impl Drop for Nat {
    /// Deletes the table now rather than when the socket closes, so a stopping daemon leaves
    /// nothing behind even while it drains.
    fn drop(&mut self) {
        let mut a = Attrs::default();
        a.str(NFTA_TABLE_NAME, &self.table);
        let nl = self.nl.get_mut().unwrap_or_else(|e| e.into_inner());
        match nl.batch(&[Message::new(
            netlink::NFT_MSG_DELTABLE,
            netlink::NFPROTO_INET,
            0,
            a,
        )]) {
            Ok(()) => tracing::info!("kernel NAT: removed nftables table inet {}", self.table),
            Err(e) => tracing::warn!("cannot remove nftables table inet {}: {e}", self.table),
        }
        for m in self.udp.get_mut().unwrap_or_else(|e| e.into_inner()).iter() {
            forget_flows(nl, m);
        }
    }
}

/// Deletes the conntrack entries of `m`'s translated UDP flows, saying what happened.
fn forget_flows(nl: &mut Netlink, m: &Mapping) {
    match conntrack::forget(nl, m) {
        Ok(0) => {}
        Ok(n) => tracing::info!("{m}: forgot {n} translated UDP flow(s)"),
        Err(e) => tracing::warn!("{m}: cannot forget translated UDP flows: {e}"),
    }
}

/// One of our rules as read back.
struct RuleInfo {
    chain: String,
    handle: u64,
    comment: Option<String>,
    packets: u64,
}

impl RuleInfo {
    fn parse(attrs: &[u8]) -> Option<RuleInfo> {
        let chain = netlink::string(netlink::find(attrs, rules::NFTA_RULE_CHAIN)?);
        let handle = netlink::be_u64(netlink::find(attrs, rules::NFTA_RULE_HANDLE)?)?;
        let comment = netlink::find(attrs, rules::NFTA_RULE_USERDATA).and_then(rules::comment_of);
        let packets = netlink::find(attrs, rules::NFTA_RULE_EXPRESSIONS)
            .into_iter()
            .flat_map(netlink::attrs)
            .filter(|(kind, _)| *kind == rules::NFTA_LIST_ELEM)
            .find(|(_, e)| {
                netlink::find(e, rules::NFTA_EXPR_NAME)
                    .map(netlink::string)
                    .as_deref()
                    == Some("counter")
            })
            .and_then(|(_, e)| netlink::find(e, rules::NFTA_EXPR_DATA))
            .and_then(|d| netlink::find(d, rules::NFTA_COUNTER_PACKETS))
            .and_then(netlink::be_u64)
            .unwrap_or(0);
        Some(RuleInfo {
            chain,
            handle,
            comment,
            packets,
        })
    }
}

/// Whether dockerd's own iptables rules already DNAT `m`'s port: a rule in the `DOCKER`
/// chain of iptables' nat table (iptables-nft keeps it in nftables) that matches the protocol
/// and destination port and translates. dockerd adds it before it starts the proxy. Then
/// rproxy must not add a second set. Not visible: iptables-legacy rules, and everything
/// without CAP_NET_ADMIN.
fn docker_dnats(m: &Mapping) -> bool {
    let family = match m.target.is_ipv6() {
        false => netlink::NFPROTO_IPV4,
        true => netlink::NFPROTO_IPV6,
    };
    let mut filter = Attrs::default();
    filter
        .str(rules::NFTA_RULE_TABLE, "nat")
        .str(rules::NFTA_RULE_CHAIN, "DOCKER");
    let Ok(mut nl) = Netlink::open() else {
        return false;
    };
    let Ok(docker_rules) = nl.dump(netlink::NFT_MSG_GETRULE, family, filter) else {
        return false;
    };
    let proto = match m.proto {
        crate::mapping::Proto::Tcp => libc::IPPROTO_TCP as u8,
        crate::mapping::Proto::Udp => libc::IPPROTO_UDP as u8,
    };
    docker_rules
        .iter()
        .any(|r| rules::translates(&r.attrs, proto, m.listen.port()))
}

/// Deletes tables a crashed rproxy left: named `table` (which we are about to create) or
/// `rproxy-<pid>` with that process gone, and not owned by a live socket.
fn sweep(nl: &mut Netlink, table: &str) -> Result<(), Error> {
    let tables = nl.dump(
        netlink::NFT_MSG_GETTABLE,
        netlink::NFPROTO_INET,
        Attrs::default(),
    )?;
    let mut msgs = Vec::new();
    for t in &tables {
        let Some(name) = netlink::find(&t.attrs, NFTA_TABLE_NAME).map(netlink::string) else {
            continue;
        };
        let flags = netlink::find(&t.attrs, NFTA_TABLE_FLAGS)
            .and_then(netlink::be_u32)
            .unwrap_or(0);
        if flags & NFT_TABLE_F_OWNER != 0 {
            // Its owner is alive (the kernel deletes owned tables with their socket).
            continue;
        }
        let stale = name == table
            || name
                .strip_prefix("rproxy-")
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !is_rproxy(pid));
        if stale {
            tracing::warn!(
                "kernel NAT: removing nftables table inet {name} left by an rproxy that is gone"
            );
            let mut a = Attrs::default();
            a.str(NFTA_TABLE_NAME, &name);
            msgs.push(Message::new(
                netlink::NFT_MSG_DELTABLE,
                netlink::NFPROTO_INET,
                0,
                a,
            ));
        }
    }
    nl.batch(&msgs)
}

/// Whether `pid` is a running rproxy (not just any process that reused the number).
fn is_rproxy(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "rproxy")
}

/// Forwarded DNAT traffic needs forwarding on the interfaces it crosses; without it on the
/// target's interface (which `ip_forward=1` or Docker's bridge set-up turns on), clients
/// would be translated and then dropped, while the userland listener would have served them.
fn forwarding_off(iface: &str, v6: bool) -> Option<String> {
    let family = if v6 { "ipv6" } else { "ipv4" };
    let key = format!("net/{family}/conf/{iface}/forwarding");
    let value = std::fs::read_to_string(format!("/proc/sys/{key}")).ok()?;
    (value.trim() == "0").then(|| format!("{} is 0", key.replace('/', ".")))
}

/// The kernel's refusal in words an operator can act on.
fn explain(e: &Error) -> String {
    match e.errno {
        libc::EPERM | libc::EACCES => format!("{e}: kernel NAT needs CAP_NET_ADMIN"),
        libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::ENOENT => {
            format!("{e}: this kernel has no usable nf_tables NAT")
        }
        _ => e.to_string(),
    }
}
