//! Which path a mapping gets: dockerd's own rules when they translate its port already,
//! else rproxy's table, else (NAT `on`) the listener alone with the reason; `require` turns
//! every fallback into an error. Runs on the NAT thread, which owns the [`State`].

use super::dockerd::Recent;
use super::table::Table;
use super::Path;
use crate::mapping::Mapping;
use crate::settings::options::Mode;

/// The table, as far as it got.
pub(super) enum State {
    /// Not opened yet (or closed).
    Closed,
    /// Open: rules can be added.
    Open(Box<Table>),
    /// The kernel refused it, and why: every mapping stays in userland (or fails).
    Unavailable(String),
}

/// Opens the table unless it is open or known to be unavailable.
pub(super) fn ensure_open(state: &mut State, table: &str) {
    if let State::Closed = state {
        *state = match Table::open(table) {
            Ok(t) => State::Open(Box::new(t)),
            Err(why) => {
                tracing::warn!("kernel NAT unavailable ({why}); serving every port in userland");
                State::Unavailable(why)
            }
        };
    }
}

/// The path `m` gets (see the module); `from_dockerd`: dockerd publishes it, and `dockerd`
/// has its rules.
pub(super) fn install(
    state: &mut State,
    table: &str,
    m: &Mapping,
    from_dockerd: bool,
    dockerd: &mut Recent,
) -> Result<Path, String> {
    let mode = m.options.nat;
    // Before opening our table: a port dockerd translates needs none.
    if from_dockerd && dockerd.dnat(m) {
        tracing::info!("{m}: dockerd's own rules already DNAT it (run dockerd with --iptables=false to let rproxy own NAT)");
        return Ok(Path::Dockerd);
    }
    ensure_open(state, table);
    let t = match state {
        State::Open(t) => t,
        State::Unavailable(why) if mode == Mode::Require => {
            return Err(format!("kernel NAT required for {m}: {why}"))
        }
        State::Unavailable(why) => return Ok(Path::Userland(why.clone())),
        State::Closed => return Err("kernel NAT: the table is closed".into()),
    };
    match t.install(m) {
        Ok(()) => {
            tracing::info!("{m}: kernel NAT installed in table inet {}", t.name());
            Ok(Path::Kernel)
        }
        Err(why) if mode == Mode::Require => Err(why),
        Err(why) => {
            tracing::warn!("{why}; serving {m} in userland");
            Ok(Path::Userland(why))
        }
    }
}
