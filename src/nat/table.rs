//! rproxy's nftables table: created with its two NAT base chains, a rule pair added and
//! removed per mapping in one batch each, the mappings' allow-list filters (see `filter`),
//! rule counters read back, deleted when dropped.

use std::collections::HashMap;

use super::netlink::{self, Attrs, Error, Message, Netlink};
use super::rules::{self, Chain};
use super::{conntrack, filter, route, sweep};
use crate::allow::AllowList;
use crate::mapping::Mapping;

pub(super) const NFTA_TABLE_NAME: u16 = 1;
pub(super) const NFTA_TABLE_FLAGS: u16 = 2;
pub(super) const NFT_TABLE_F_OWNER: u32 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NF_ACCEPT: u32 = 1;

/// rproxy's table, for as long as this value lives. Owned by the NAT thread alone.
pub struct Table {
    nl: Netlink,
    table: String,
    /// UDP mappings with rules, whose flows must be forgotten with them.
    udp: Vec<Mapping>,
    /// (chain, handle) of the rules per comment, from the last dump. Deleting a rule needs its
    /// handle, and a dump per removal made a container's 500 ports cost 500 dumps of up to
    /// 1,000 rules (2.2 s here, holding the supervisor). A removal takes its entry; an install
    /// drops its entry (the dump predates the new rules); a miss or a stale handle dumps anew.
    /// Only this socket writes an owner table, so entries stay good between dumps.
    handles: HashMap<String, Vec<(String, u64)>>,
    /// The allow-list filters.
    filters: Filters,
}

/// The filters in the table, all named, so none needs a rule handle.
#[derive(Default)]
struct Filters {
    /// Whether the base chain and its dispatch maps exist (made with the first filter).
    base: bool,
    /// The next filter's number.
    next: u32,
    /// Each mapping's filter number, by spec (its options do not matter here).
    ids: HashMap<String, u32>,
    /// The mappings (specs) whose filters a dispatch key would lead to, oldest first; the map
    /// leads to the last. Two at once only while a mapping gives way to one on the same
    /// address and port (a container restarted with a new address), in whichever order
    /// they come.
    holders: HashMap<filter::Key, Vec<String>>,
}

impl Table {
    /// Sweeps what crashed rproxy processes left, then creates `table` with its chains.
    pub fn open(table: &str) -> Result<Table, String> {
        let mut nl = Netlink::open().map_err(|e| explain(&e))?;
        sweep::sweep(&mut nl, table).map_err(|e| explain(&e))?;
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
        Ok(Table {
            nl,
            table: table.to_string(),
            udp: Vec::new(),
            handles: HashMap::new(),
            filters: Filters::default(),
        })
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.table
    }

    /// Installs `m`'s DNAT rules in one batch. The caller has ruled out mappings that stay in
    /// userland (`rules::userland_only`).
    pub fn install(&mut self, m: &Mapping) -> Result<(), String> {
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
        self.handles.remove(&rules::comment(m));
        self.nl
            .batch(&msgs)
            .map_err(|e| format!("cannot install kernel NAT for {m}: {}", explain(&e)))?;
        if m.proto == crate::mapping::Proto::Udp {
            self.udp.push(m.clone());
        }
        Ok(())
    }

    /// Removes `m`'s rules (connections already translated keep their conntrack entries).
    pub fn remove(&mut self, m: &Mapping) -> Result<(), String> {
        let comment = rules::comment(m);
        let fail = |e: &Error| format!("cannot remove kernel NAT for {m}: {}", explain(e));
        let cached = self.handles.contains_key(&comment);
        if !cached {
            self.handles = self.read_handles().map_err(|e| fail(&e))?;
        }
        let rules = self.handles.remove(&comment).unwrap_or_default();
        let mut deleted = self.delete(&rules);
        // Someone changed the table behind our back (nft), which only a kernel without owner
        // tables (before 5.12) lets them do: read it again, once.
        if cached && deleted.as_ref().is_err_and(|e| e.errno == libc::ENOENT) {
            self.handles = self.read_handles().map_err(|e| fail(&e))?;
            let rules = self.handles.remove(&comment).unwrap_or_default();
            deleted = self.delete(&rules);
        }
        deleted.map_err(|e| fail(&e))?;
        self.udp.retain(|u| u != m);
        forget_flows(&mut self.nl, m);
        Ok(())
    }

    /// Deletes rules by (chain, handle), in one batch.
    fn delete(&mut self, rules: &[(String, u64)]) -> Result<(), Error> {
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
        self.nl.batch(&msgs)
    }

    /// Every rule's (chain, handle), by comment.
    fn read_handles(&mut self) -> Result<HashMap<String, Vec<(String, u64)>>, Error> {
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for r in self.rules()? {
            if let Some(comment) = r.comment {
                out.entry(comment).or_default().push((r.chain, r.handle));
            }
        }
        Ok(out)
    }

    /// Connections (first packets) each mapping's rules translated, by mapping spec: one dump.
    pub fn connections(&mut self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for r in self.rules().unwrap_or_default() {
            if !Chain::ALL.iter().any(|c| c.name() == r.chain) {
                continue;
            }
            if let Some(spec) = r.comment.as_deref().and_then(|c| c.strip_prefix("rproxy ")) {
                *out.entry(spec.to_string()).or_insert(0) += r.packets;
            }
        }
        out
    }

    /// Makes `allow` the filter of `m`'s published address and port (None: no filter), in
    /// one batch: a new filter with its dispatch element, or the same filter's set emptied
    /// and filled again.
    pub fn set_allow(&mut self, m: &Mapping, allow: Option<&AllowList>) -> Result<(), String> {
        let fail = |e: &Error| format!("cannot set the allow-list of {m}: {}", explain(e));
        let t = self.table.clone();
        let f = &mut self.filters;
        let key = filter::key(m);
        let spec = m.spec();
        match (allow, f.ids.get(&spec).copied()) {
            (None, None) => Ok(()),
            (Some(list), Some(id)) => self
                .nl
                .batch(&filter::refill(&t, id, m, list))
                .map_err(|e| fail(&e)),
            (Some(list), None) => {
                if m.listen.port() == 0 {
                    return Err(format!("{m}: no allow-list before its port is known"));
                }
                let mut msgs = match f.base {
                    false => filter::base(&t),
                    true => Vec::new(),
                };
                let id = f.next;
                msgs.extend(filter::create(&t, id, m, list));
                // The newest mapping on an address and port is the one it leads to.
                if f.holders.get(&key).is_some_and(|h| !h.is_empty()) {
                    msgs.push(filter::unpoint(&t, &key));
                }
                msgs.push(filter::point(&t, &key, id));
                tracing::debug!("{m}: allow-list rule {}", filter::describe(m, id));
                self.nl.batch(&msgs).map_err(|e| fail(&e))?;
                f.base = true;
                f.next += 1;
                f.ids.insert(spec.clone(), id);
                f.holders.entry(key).or_default().push(spec);
                Ok(())
            }
            (None, Some(id)) => {
                let holders = f.holders.get(&key).cloned().unwrap_or_default();
                let mut msgs = Vec::new();
                if holders.last() == Some(&spec) {
                    msgs.push(filter::unpoint(&t, &key));
                    let before = holders.len().checked_sub(2).and_then(|i| holders.get(i));
                    if let Some(id) = before.and_then(|b| f.ids.get(b)) {
                        msgs.push(filter::point(&t, &key, *id));
                    }
                }
                msgs.extend(filter::delete(&t, id));
                self.nl.batch(&msgs).map_err(|e| fail(&e))?;
                f.ids.remove(&spec);
                if let Some(h) = f.holders.get_mut(&key) {
                    h.retain(|x| *x != spec);
                    if h.is_empty() {
                        f.holders.remove(&key);
                    }
                }
                Ok(())
            }
        }
    }

    /// Packets each mapping's filter dropped, by mapping spec: one dump.
    pub fn denied(&mut self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for r in self.rules().unwrap_or_default() {
            if let Some(spec) = r.comment.as_deref().and_then(filter::spec_of) {
                *out.entry(spec.to_string()).or_insert(0) += r.packets;
            }
        }
        out
    }

    fn rules(&mut self) -> Result<Vec<RuleInfo>, Error> {
        let mut filter = Attrs::default();
        filter.str(rules::NFTA_RULE_TABLE, &self.table);
        let dumped = self
            .nl
            .dump(netlink::NFT_MSG_GETRULE, netlink::NFPROTO_INET, filter)?;
        Ok(dumped
            .iter()
            .filter_map(|r| RuleInfo::parse(&r.attrs))
            .collect())
    }
}

impl Drop for Table {
    /// Deletes the table now rather than when the socket closes, so a stopping daemon leaves
    /// nothing behind even while it drains.
    fn drop(&mut self) {
        let mut a = Attrs::default();
        a.str(NFTA_TABLE_NAME, &self.table);
        let nl = &mut self.nl;
        match nl.batch(&[Message::new(
            netlink::NFT_MSG_DELTABLE,
            netlink::NFPROTO_INET,
            0,
            a,
        )]) {
            Ok(()) => tracing::info!("kernel NAT: removed nftables table inet {}", self.table),
            Err(e) => tracing::warn!("cannot remove nftables table inet {}: {e}", self.table),
        }
        for m in &self.udp {
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
pub(super) fn explain(e: &Error) -> String {
    match e.errno {
        libc::EPERM | libc::EACCES => format!("{e}: kernel NAT needs CAP_NET_ADMIN"),
        libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::ENOENT => {
            format!("{e}: this kernel has no usable nf_tables NAT")
        }
        _ => e.to_string(),
    }
}
