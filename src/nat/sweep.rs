//! Start-up clean-up for kernels without owner tables (before Linux 5.12): tables named like
//! rproxy's whose process is gone. Owned tables, and anything not named like ours, are never
//! touched.

use super::netlink::{self, Attrs, Error, Message, Netlink};
use super::table::{NFTA_TABLE_FLAGS, NFTA_TABLE_NAME, NFT_TABLE_F_OWNER};

/// Deletes tables a crashed rproxy left: named `table` (which we are about to create) or
/// `rproxy-<pid>` with that process gone, and not owned by a live socket.
pub fn sweep(nl: &mut Netlink, table: &str) -> Result<(), Error> {
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
