//! The socket hooks, as instructions. Each runs inside a system call of every socket in the
//! host's cgroups and returns 1 (carry on) whatever it finds; only the addresses change:
//!
//! - connect4/connect6 (TCP, connected UDP) and sendmsg4/sendmsg6 (unconnected UDP): a
//!   socket of the host network namespace dialling a published address — the mapping's own
//!   address, or for a wildcard mapping any loopback or host address — is sent to the target
//!   instead, and the reverse entry (socket cookie, target → published address) is noted.
//!   A socket of another namespace (hairpin: a container dialling a host address) only when
//!   its namespace is on the target's own network and that network lets its containers talk
//!   (`hairpin` has the pair), and never for a loopback or unspecified address, which in a
//!   container's namespace is the container itself. Only a socket the kernel can send to
//!   the target from where it is, the rest left untouched (no reverse entry, no count) for
//!   the listener, which serves it as without the hooks: none bound to a device
//!   (SO_BINDTODEVICE); sending from (bound to, or for a datagram IP_PKTINFO) no address,
//!   loopback if the target is loopback too (the kernel refuses a loopback source towards
//!   anything else), or a host address (`local4`/`local6`) — not one the host does not have
//!   (IP_TRANSPARENT); a hairpin socket bound to nothing. sendmsg6 never writes an
//!   IPv4-mapped address (the kernel refuses the datagram: ENOTSUPP), so 6→4 datagrams are
//!   the listener's; an IPv6 socket's datagram to ::ffff:a.b.c.d runs sendmsg4, which notes
//!   its reverse entry IPv4-mapped, as recvmsg6 reads it. These checks run only once a
//!   published address matched;
//! - recvmsg4/recvmsg6 and getpeername4/getpeername6: a reply or peer address that is a
//!   target this socket was sent to reads as the published address it dialled;
//! - setsockopt: notes what IPV6_V6ONLY each socket set, for 6→4 (an IPv6 socket can reach
//!   an IPv4 target only as an IPv4-mapped address, which an IPv6-only socket cannot), when
//!   the kernel takes it (not once the socket has a port).
//!
//! Maps and layouts (all little-endian hosts; addresses and ports in network order, as the
//! kernel shows them in `struct bpf_sock_addr`):
//! - `services4` / `services6`: key {address (4 / 16 bytes), port u16, protocol u8, 0} →
//!   [`Target`] {address [16], port u32, mapping id u32, flags u32, network u32}. A wildcard
//!   mapping has the all-zero address; network is the target's network's number for the
//!   hairpin rule (0: none known, no hairpin).
//! - `local4` / `local6`: the host's own addresses (key → any 4 bytes).
//! - `reverse`: LRU, key {socket cookie u64, target address [16], port u32, 0 u32} → {published
//!   address [16], port u32}.
//! - `counters`: array by mapping id → {connections u64, datagrams u64}.
//! - `hairpin`: key {netns cookie u64, network u32, 0 u32} → any 4 bytes: that namespace has a
//!   container on that network, and the network allows traffic between its containers.
//! - `config`: array [0] → the host network namespace's cookie, [1] → net.ipv6.bindv6only.
//! - `v6only`: socket storage, int: the socket's last IPV6_V6ONLY setting.
//!
//! [`Target`]: super::maps::TARGET_SIZE

use super::insn::{Alu, Code, Cond, Helper, Label, Program, Reg, Size};

/// `struct bpf_sock_addr` field offsets.
const USER_IP4: i16 = 4;
const USER_IP6: i16 = 8;
const USER_PORT: i16 = 24;
const FAMILY: i16 = 28;
const PROTOCOL: i16 = 36;
const MSG_SRC_IP4: i16 = 40;
const MSG_SRC_IP6: i16 = 44;
const SOCK_ADDR_SK: i16 = 64;

/// `struct bpf_sock` field offsets (through `sk` of either context: a full socket).
const SK_BOUND_DEV_IF: i16 = 0;
const SK_SRC_IP4: i16 = 24;
const SK_SRC_IP6: i16 = 28;
const SK_SRC_PORT: i16 = 44;

/// `struct bpf_sockopt` field offsets.
const SOCKOPT_SK: i16 = 0;
const SOCKOPT_OPTVAL: i16 = 8;
const SOCKOPT_OPTVAL_END: i16 = 16;
const SOCKOPT_LEVEL: i16 = 24;
const SOCKOPT_OPTNAME: i16 = 28;

/// Stack layout, below the frame pointer (R10).
const CONF_KEY: i16 = -8; // u32: config / counters key
const SVC_KEY: i16 = -32; // 20 bytes: address, port+protocol
const REV_KEY: i16 = -64; // 32 bytes: cookie, address [16], port, pad
const REV_VALUE: i16 = -88; // 20 bytes: address [16], port
const HAIRPIN_KEY: i16 = -104; // 16 bytes: netns cookie, network, pad
const SRC: i16 = -120; // 16 bytes: the source address a socket sends from

/// `Target` value offsets.
const T_ADDR: i16 = 0;
const T_PORT: i16 = 16;
const T_ID: i16 = 20;
const T_FLAGS: i16 = 24;
const T_NETWORK: i16 = 28;
/// `Target.flags`: the target is IPv4, written as an IPv4-mapped IPv6 address (6→4).
pub const FLAG_V4_TARGET: i32 = 1;

/// Counter offsets in a `counters` value.
const CONNECTIONS: i16 = 0;
const DATAGRAMS: i16 = 8;

/// 0x0000ffff as the third word of an IPv4-mapped address, read as a little-endian u32.
const V4_MAPPED_WORD: i32 = 0xffff_0000_u32 as i32;
/// ::1's last word, read as a little-endian u32.
const LOOPBACK6_WORD: i32 = 0x0100_0000;

const AF_INET6: i32 = 10;
const SOL_IPV6: i32 = 41;
const IPV6_V6ONLY: i32 = 26;

/// Which hook a program is, with its attach type (enum bpf_attach_type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// setsockopt(): notes IPV6_V6ONLY.
    Setsockopt,
    /// connect() of an AF_INET socket.
    Connect4,
    /// connect() of an AF_INET6 socket.
    Connect6,
    /// sendmsg()/sendto() with an address, AF_INET UDP.
    Sendmsg4,
    /// The same, AF_INET6.
    Sendmsg6,
    /// recvmsg()/recvfrom() of AF_INET UDP.
    Recvmsg4,
    /// The same, AF_INET6.
    Recvmsg6,
    /// getpeername() of AF_INET.
    Getpeername4,
    /// getpeername() of AF_INET6.
    Getpeername6,
}

impl Hook {
    /// Every hook, in the order they are attached: the ones that restore and note before the
    /// ones that translate.
    pub const ALL: [Hook; 9] = [
        Hook::Setsockopt,
        Hook::Recvmsg4,
        Hook::Recvmsg6,
        Hook::Getpeername4,
        Hook::Getpeername6,
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
    ];

    /// `enum bpf_prog_type`: CGROUP_SOCKOPT for setsockopt, else CGROUP_SOCK_ADDR.
    pub fn prog_type(self) -> u32 {
        match self {
            Hook::Setsockopt => 25,
            _ => 18,
        }
    }

    /// `enum bpf_attach_type`.
    pub fn attach_type(self) -> u32 {
        match self {
            Hook::Setsockopt => 22,
            Hook::Connect4 => 10,
            Hook::Connect6 => 11,
            Hook::Sendmsg4 => 14,
            Hook::Sendmsg6 => 15,
            Hook::Recvmsg4 => 19,
            Hook::Recvmsg6 => 20,
            Hook::Getpeername4 => 29,
            Hook::Getpeername6 => 30,
        }
    }

    /// Its name, as `bpftool prog` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Setsockopt => "rpx_setsockopt",
            Hook::Connect4 => "rpx_connect4",
            Hook::Connect6 => "rpx_connect6",
            Hook::Sendmsg4 => "rpx_sendmsg4",
            Hook::Sendmsg6 => "rpx_sendmsg6",
            Hook::Recvmsg4 => "rpx_recvmsg4",
            Hook::Recvmsg6 => "rpx_recvmsg6",
            Hook::Getpeername4 => "rpx_peername4",
            Hook::Getpeername6 => "rpx_peername6",
        }
    }

    /// The program.
    pub fn code(self) -> Code {
        let p = match self {
            Hook::Connect4 => translate4(Call::Connect),
            Hook::Sendmsg4 => translate4(Call::Sendmsg),
            Hook::Connect6 => translate6(Call::Connect),
            Hook::Sendmsg6 => translate6(Call::Sendmsg),
            Hook::Recvmsg4 | Hook::Getpeername4 => restore(false),
            Hook::Recvmsg6 | Hook::Getpeername6 => restore(true),
            Hook::Setsockopt => note_v6only(),
        };
        p.finish()
            .unwrap_or_else(|e| unreachable!("{}: {e}", self.name()))
    }
}

/// The system call a translating program runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// connect(): counted as a connection.
    Connect,
    /// sendmsg() of an unconnected UDP socket: counted as a datagram; may carry its source
    /// (IP_PKTINFO), readable only here.
    Sendmsg,
}

impl Call {
    /// Its counter in a `counters` value.
    fn counter(self) -> i16 {
        match self {
            Call::Connect => CONNECTIONS,
            Call::Sendmsg => DATAGRAMS,
        }
    }
}

/// `R2 = R10 + off`: a pointer to a stack slot, for a helper's argument.
fn stack_ptr(p: &mut Program, reg: Reg, off: i16) {
    p.mov(reg, Reg::R10).alu_imm(Alu::Add, reg, i32::from(off));
}

/// Zeroes `words` u32 words of the stack from `off`.
fn zero(p: &mut Program, off: i16, words: i16) {
    for i in 0..words {
        p.store_imm(Size::W, Reg::R10, off + 4 * i, 0);
    }
}

/// Returns 1 (the system call carries on).
fn allow(p: &mut Program, l: Label) {
    p.label(l).mov_imm(Reg::R0, 1).exit();
}

/// Where the dialled address is in REV_VALUE, to tell what it means in another namespace.
#[derive(Clone, Copy)]
enum Dialled {
    /// An IPv4 address, in the first word.
    V4,
    /// An IPv6 address.
    V6,
    /// An IPv4-mapped IPv6 address: the IPv4 address in the last word.
    Mapped,
}

/// Jumps to `out` unless the socket may be sent to the Target in R8: a socket of the host
/// network namespace (R9 = 0), or of a namespace with a container on the target's own
/// network where that network allows traffic between containers (R9 = 1; hairpin), dialling
/// neither loopback nor the unspecified address (its own, there). Needs R6 = ctx; clobbers
/// R0-R5, R7. Asked only once a published address matched: traffic to anything else, the
/// bulk of what the hooks see, pays for the service lookup alone.
fn in_scope(p: &mut Program, dialled: Dialled, out: Label) {
    let host = p.new_label();
    p.mov(Reg::R1, Reg::R6)
        .call(Helper::GetNetnsCookie)
        .mov(Reg::R7, Reg::R0);
    p.store_imm(Size::W, Reg::R10, CONF_KEY, 0);
    p.load_map(Reg::R1, "config");
    stack_ptr(p, Reg::R2, CONF_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .load(Size::DW, Reg::R1, Reg::R0, 0)
        .mov_imm(Reg::R9, 0)
        .jump(Cond::Eq, Reg::R7, Reg::R1, host);
    // Another namespace: loopback and the unspecified address are its own.
    match dialled {
        Dialled::V4 | Dialled::Mapped => {
            let at = if let Dialled::V4 = dialled { 0 } else { 12 };
            p.load(Size::W, Reg::R2, Reg::R10, REV_VALUE + at)
                .jump_imm(Cond::Eq, Reg::R2, 0, out)
                .alu_imm(Alu::And, Reg::R2, 0xff)
                .jump_imm(Cond::Eq, Reg::R2, 127, out);
        }
        Dialled::V6 => {
            let not_own = p.new_label();
            for w in 0..3 {
                p.load(Size::W, Reg::R2, Reg::R10, REV_VALUE + 4 * w)
                    .jump_imm(Cond::Ne, Reg::R2, 0, not_own);
            }
            p.load(Size::W, Reg::R2, Reg::R10, REV_VALUE + 12)
                .jump_imm(Cond::Eq, Reg::R2, 0, out)
                .jump32_imm(Cond::Eq, Reg::R2, LOOPBACK6_WORD, out)
                .label(not_own);
        }
    }
    // Hairpin: the namespace must be on the target's network, and that network allow it.
    p.load(Size::W, Reg::R2, Reg::R8, T_NETWORK)
        .jump_imm(Cond::Eq, Reg::R2, 0, out)
        .store(Size::DW, Reg::R10, HAIRPIN_KEY, Reg::R7)
        .store(Size::W, Reg::R10, HAIRPIN_KEY + 8, Reg::R2)
        .store_imm(Size::W, Reg::R10, HAIRPIN_KEY + 12, 0);
    p.load_map(Reg::R1, "hairpin");
    stack_ptr(p, Reg::R2, HAIRPIN_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .mov_imm(Reg::R9, 1)
        .label(host);
}

/// Jumps to `out` when the socket is bound to a device (SO_BINDTODEVICE): the kernel sends
/// it out of that device only, which need not be the target's. Leaves R7 = the socket.
/// Needs R6 = ctx.
fn no_bound_device(p: &mut Program, out: Label) {
    p.load(Size::DW, Reg::R7, Reg::R6, SOCK_ADDR_SK)
        .load(Size::W, Reg::R2, Reg::R7, SK_BOUND_DEV_IF)
        .jump_imm(Cond::Ne, Reg::R2, 0, out);
}

/// Copies to SRC the IPv4 address the socket sends from: the source a sendmsg gives
/// (IP_PKTINFO), else the address it is bound to (0: none, the kernel picks one by the
/// route). Needs R6 = ctx, R7 = the socket.
fn load_source4(p: &mut Program, call: Call) {
    p.load(Size::W, Reg::R2, Reg::R7, SK_SRC_IP4);
    if call == Call::Sendmsg {
        let bound = p.new_label();
        p.load(Size::W, Reg::R3, Reg::R6, MSG_SRC_IP4)
            .jump_imm(Cond::Eq, Reg::R3, 0, bound)
            .mov(Reg::R2, Reg::R3)
            .label(bound);
    }
    p.store(Size::W, Reg::R10, SRC, Reg::R2);
}

/// Copies the four words at `from` + `off` to SRC.
fn copy_source6(p: &mut Program, from: Reg, off: i16) {
    for w in 0..4 {
        p.load(Size::W, Reg::R2, from, off + 4 * w)
            .store(Size::W, Reg::R10, SRC + 4 * w, Reg::R2);
    }
}

/// Copies to SRC the IPv6 address the socket sends from: the source a sendmsg gives
/// (IPV6_PKTINFO), else the address it is bound to (::, none). Needs R6 = ctx, R7 = the
/// socket.
fn load_source6(p: &mut Program, call: Call) {
    let bound = p.new_label();
    let loaded = p.new_label();
    if call == Call::Sendmsg {
        p.load(Size::W, Reg::R2, Reg::R6, MSG_SRC_IP6);
        for w in 1..4 {
            p.load(Size::W, Reg::R3, Reg::R6, MSG_SRC_IP6 + 4 * w)
                .alu(Alu::Or, Reg::R2, Reg::R3);
        }
        p.jump_imm(Cond::Eq, Reg::R2, 0, bound);
        copy_source6(p, Reg::R6, MSG_SRC_IP6);
        p.goto(loaded);
    }
    p.label(bound);
    copy_source6(p, Reg::R7, SK_SRC_IP6);
    p.label(loaded);
}

/// `R2 = SRC's words 0..n OR'ed`: zero when they all are.
fn or_source_words(p: &mut Program, n: i16) {
    p.load(Size::W, Reg::R2, Reg::R10, SRC);
    for w in 1..n {
        p.load(Size::W, Reg::R3, Reg::R10, SRC + 4 * w)
            .alu(Alu::Or, Reg::R2, Reg::R3);
    }
}

/// Jumps to `out` unless the kernel can send from the IPv4 address at SRC + `at` to the
/// IPv4 Target in R8: from none (the kernel picks the route's), from loopback only to a
/// loopback target (a loopback source towards anything else is refused: EINVAL), from one
/// of the host's own addresses (`local4`). Not from an address the host does not have
/// (IP_TRANSPARENT, IP_FREEBIND): its replies come back as the client arranged for its own
/// traffic, which the target's need not follow. Hairpin (R9 = 1): a container's address is
/// not the host's; only an unbound one. Asked only once a published address matched.
fn v4_source_fits(p: &mut Program, at: i16, out: Label) {
    let fits = p.new_label();
    let not_loopback = p.new_label();
    p.load(Size::W, Reg::R2, Reg::R10, SRC + at)
        .jump_imm(Cond::Eq, Reg::R2, 0, fits)
        .jump_imm(Cond::Ne, Reg::R9, 0, out)
        .alu_imm(Alu::And, Reg::R2, 0xff)
        .jump_imm(Cond::Ne, Reg::R2, 127, not_loopback)
        .load(Size::W, Reg::R2, Reg::R8, T_ADDR)
        .alu_imm(Alu::And, Reg::R2, 0xff)
        .jump_imm(Cond::Eq, Reg::R2, 127, fits)
        .goto(out);
    p.label(not_loopback);
    p.load_map(Reg::R1, "local4");
    stack_ptr(p, Reg::R2, SRC + at);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .label(fits);
}

/// Jumps to `out` unless the kernel can send from the IPv6 address at SRC to the native
/// IPv6 Target in R8: the same rules as [`v4_source_fits`] (::1 is loopback, `local6` the
/// host's); never from an IPv4-mapped address (a socket bound to one is IPv4 only).
fn v6_source_fits(p: &mut Program, out: Label) {
    let fits = p.new_label();
    let other = p.new_label();
    or_source_words(p, 4);
    p.jump_imm(Cond::Eq, Reg::R2, 0, fits)
        .jump_imm(Cond::Ne, Reg::R9, 0, out);
    or_source_words(p, 2);
    p.jump_imm(Cond::Ne, Reg::R2, 0, other)
        .load(Size::W, Reg::R2, Reg::R10, SRC + 8)
        .jump32_imm(Cond::Eq, Reg::R2, V4_MAPPED_WORD, out)
        .jump_imm(Cond::Ne, Reg::R2, 0, other)
        .load(Size::W, Reg::R2, Reg::R10, SRC + 12)
        .jump32_imm(Cond::Ne, Reg::R2, LOOPBACK6_WORD, other);
    // From ::1: only to ::1.
    for w in 0..3 {
        p.load(Size::W, Reg::R2, Reg::R8, T_ADDR + 4 * w)
            .jump_imm(Cond::Ne, Reg::R2, 0, out);
    }
    p.load(Size::W, Reg::R2, Reg::R8, T_ADDR + 12)
        .jump32_imm(Cond::Eq, Reg::R2, LOOPBACK6_WORD, fits)
        .goto(out);
    p.label(other);
    p.load_map(Reg::R1, "local6");
    stack_ptr(p, Reg::R2, SRC);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .label(fits);
}

/// Jumps to `out` unless the kernel can send from the IPv6 address at SRC to the IPv4
/// Target in R8, written IPv4-mapped: from none, or from an IPv4-mapped address that
/// [`v4_source_fits`]; a socket bound to a native IPv6 address cannot reach an IPv4-mapped
/// one.
fn mapped_source_fits(p: &mut Program, out: Label) {
    let fits = p.new_label();
    let mapped = p.new_label();
    or_source_words(p, 2);
    p.jump_imm(Cond::Ne, Reg::R2, 0, out)
        .load(Size::W, Reg::R2, Reg::R10, SRC + 8)
        .jump32_imm(Cond::Eq, Reg::R2, V4_MAPPED_WORD, mapped)
        .jump_imm(Cond::Ne, Reg::R2, 0, out)
        .load(Size::W, Reg::R2, Reg::R10, SRC + 12)
        .jump_imm(Cond::Eq, Reg::R2, 0, fits)
        .goto(out);
    p.label(mapped);
    v4_source_fits(p, 12, out);
    p.label(fits);
}

/// `R0 = services[key at SVC_KEY]`, trying the wildcard address when the dialled one is
/// loopback or the host's own. `words`: the address's length in u32 words (1 or 4). Jumps
/// to `out` on a miss.
fn lookup_service(p: &mut Program, v6: bool, out: Label) {
    let (services, local) = match v6 {
        false => ("services4", "local4"),
        true => ("services6", "local6"),
    };
    let words: i16 = if v6 { 4 } else { 1 };
    let found = p.new_label();
    let wildcard = p.new_label();
    p.load_map(Reg::R1, services);
    stack_ptr(p, Reg::R2, SVC_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Ne, Reg::R0, 0, found);
    // Loopback: 127.0.0.0/8, or ::1.
    if v6 {
        let not_loopback = p.new_label();
        for w in 0..3 {
            p.load(Size::W, Reg::R2, Reg::R10, SVC_KEY + 4 * w)
                .jump_imm(Cond::Ne, Reg::R2, 0, not_loopback);
        }
        p.load(Size::W, Reg::R2, Reg::R10, SVC_KEY + 12)
            .jump32_imm(Cond::Eq, Reg::R2, LOOPBACK6_WORD, wildcard)
            .label(not_loopback);
    } else {
        p.load(Size::W, Reg::R2, Reg::R10, SVC_KEY)
            .alu_imm(Alu::And, Reg::R2, 0xff)
            .jump_imm(Cond::Eq, Reg::R2, 127, wildcard);
    }
    // The host's own addresses (the key's address part is the local map's key).
    p.load_map(Reg::R1, local);
    stack_ptr(p, Reg::R2, SVC_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .label(wildcard);
    zero(p, SVC_KEY, words);
    p.load_map(Reg::R1, services);
    stack_ptr(p, Reg::R2, SVC_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .label(found);
}

/// Builds the service key's port and protocol word at SVC_KEY + `at`. Needs R6 = ctx.
fn key_port_protocol(p: &mut Program, at: i16) {
    p.load(Size::W, Reg::R2, Reg::R6, USER_PORT)
        .load(Size::W, Reg::R3, Reg::R6, PROTOCOL)
        .alu_imm(Alu::Lsh, Reg::R3, 16)
        .alu(Alu::Or, Reg::R2, Reg::R3)
        .store(Size::W, Reg::R10, SVC_KEY + at, Reg::R2);
}

/// With R8 = the Target and the published address already in REV_VALUE: notes the reverse
/// entry for this socket — keyed by the target's address as the socket now sees it, the four
/// words at `seen` (the Target's, or the IPv4-mapped form the hook wrote into the context) —
/// and counts the translation at `counter`. Needs R6 = ctx.
fn remember_and_count(p: &mut Program, seen: (Reg, i16), counter: i16, done: Label) {
    p.mov(Reg::R1, Reg::R6).call(Helper::GetSocketCookie).store(
        Size::DW,
        Reg::R10,
        REV_KEY,
        Reg::R0,
    );
    for w in 0..4 {
        p.load(Size::W, Reg::R2, seen.0, seen.1 + 4 * w).store(
            Size::W,
            Reg::R10,
            REV_KEY + 8 + 4 * w,
            Reg::R2,
        );
    }
    p.load(Size::W, Reg::R2, Reg::R8, T_PORT)
        .store(Size::W, Reg::R10, REV_KEY + 24, Reg::R2)
        .store_imm(Size::W, Reg::R10, REV_KEY + 28, 0);
    p.load_map(Reg::R1, "reverse");
    stack_ptr(p, Reg::R2, REV_KEY);
    stack_ptr(p, Reg::R3, REV_VALUE);
    p.mov_imm(Reg::R4, 0).call(Helper::MapUpdateElem);
    p.load(Size::W, Reg::R2, Reg::R8, T_ID)
        .store(Size::W, Reg::R10, CONF_KEY, Reg::R2);
    p.load_map(Reg::R1, "counters");
    stack_ptr(p, Reg::R2, CONF_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, done)
        .mov_imm(Reg::R1, 1)
        .atomic_add64(Reg::R0, counter, Reg::R1);
}

/// connect4 / sendmsg4.
fn translate4(call: Call) -> Program {
    let mut p = Program::new();
    let out = p.new_label();
    p.mov(Reg::R6, Reg::R1);
    // The published address as dialled, for the reverse entry.
    zero(&mut p, REV_VALUE, 5);
    p.load(Size::W, Reg::R2, Reg::R6, USER_IP4)
        .store(Size::W, Reg::R10, REV_VALUE, Reg::R2)
        .store(Size::W, Reg::R10, SVC_KEY, Reg::R2)
        .load(Size::W, Reg::R2, Reg::R6, USER_PORT)
        .store(Size::W, Reg::R10, REV_VALUE + 16, Reg::R2);
    key_port_protocol(&mut p, 4);
    lookup_service(&mut p, false, out);
    p.mov(Reg::R8, Reg::R0);
    in_scope(&mut p, Dialled::V4, out);
    no_bound_device(&mut p, out);
    load_source4(&mut p, call);
    v4_source_fits(&mut p, 0, out);
    p.load(Size::W, Reg::R2, Reg::R8, T_ADDR)
        .store(Size::W, Reg::R6, USER_IP4, Reg::R2)
        .load(Size::W, Reg::R2, Reg::R8, T_PORT)
        .store(Size::W, Reg::R6, USER_PORT, Reg::R2);
    let seen = match call {
        Call::Connect => Reg::R8,
        Call::Sendmsg => {
            seen_by_a_dual_stack_socket(&mut p);
            Reg::R7
        }
    };
    remember_and_count(&mut p, (seen, T_ADDR), call.counter(), out);
    allow(&mut p, out);
    p
}

/// sendmsg4 also runs for an IPv6 socket's datagram to ::ffff:a.b.c.d (the kernel sends it
/// by its IPv4 path), but recvmsg6 reads that socket's replies, as from IPv4-mapped
/// addresses: for such a socket the reverse entry is noted in that form — REV_VALUE made
/// ::ffff:published, and R7 pointed at ::ffff:target (in SRC, no longer needed) for the
/// key (else at the Target). Needs R6 = ctx, R8 = the Target.
fn seen_by_a_dual_stack_socket(p: &mut Program) {
    let ipv4_socket = p.new_label();
    p.mov(Reg::R7, Reg::R8)
        .load(Size::W, Reg::R2, Reg::R6, FAMILY)
        .jump_imm(Cond::Ne, Reg::R2, AF_INET6, ipv4_socket);
    for (slot, from) in [(REV_VALUE, (Reg::R10, REV_VALUE)), (SRC, (Reg::R8, T_ADDR))] {
        p.load(Size::W, Reg::R2, from.0, from.1)
            .store(Size::W, Reg::R10, slot + 12, Reg::R2)
            .store_imm(Size::W, Reg::R10, slot, 0)
            .store_imm(Size::W, Reg::R10, slot + 4, 0)
            .store_imm(Size::W, Reg::R10, slot + 8, V4_MAPPED_WORD);
    }
    stack_ptr(p, Reg::R7, SRC);
    p.label(ipv4_socket);
}

/// connect6 / sendmsg6: IPv6 services, IPv4-mapped destinations (served by IPv4 mappings),
/// and 6→4 targets (IPv6 mapping, IPv4 target) only where the socket is not IPv6-only.
/// sendmsg6 writes no IPv4-mapped address: the kernel refuses the datagram (ENOTSUPP), so
/// 6→4 datagrams are the listener's (connect() then send() is not); a datagram to an
/// IPv4-mapped address never comes here (the kernel sends it by its IPv4 path, sendmsg4).
fn translate6(call: Call) -> Program {
    let mut p = Program::new();
    let out = p.new_label();
    let mapped = match call {
        Call::Connect => p.new_label(),
        Call::Sendmsg => out,
    };
    let write = p.new_label();
    p.mov(Reg::R6, Reg::R1);
    zero(&mut p, REV_VALUE, 5);
    for w in 0..4 {
        p.load(Size::W, Reg::R2, Reg::R6, USER_IP6 + 4 * w)
            .store(Size::W, Reg::R10, REV_VALUE + 4 * w, Reg::R2)
            .store(Size::W, Reg::R10, SVC_KEY + 4 * w, Reg::R2);
    }
    p.load(Size::W, Reg::R2, Reg::R6, USER_PORT)
        .store(Size::W, Reg::R10, REV_VALUE + 16, Reg::R2);
    // ::ffff:a.b.c.d goes to the IPv4 services.
    let native = p.new_label();
    p.load(Size::W, Reg::R2, Reg::R10, SVC_KEY)
        .jump_imm(Cond::Ne, Reg::R2, 0, native)
        .load(Size::W, Reg::R2, Reg::R10, SVC_KEY + 4)
        .jump_imm(Cond::Ne, Reg::R2, 0, native)
        .load(Size::W, Reg::R2, Reg::R10, SVC_KEY + 8)
        .jump32_imm(Cond::Eq, Reg::R2, V4_MAPPED_WORD, mapped);
    // A native IPv6 destination.
    p.label(native);
    key_port_protocol(&mut p, 16);
    lookup_service(&mut p, true, out);
    p.mov(Reg::R8, Reg::R0);
    in_scope(&mut p, Dialled::V6, out);
    no_bound_device(&mut p, out);
    load_source6(&mut p, call);
    let six_to_four = p.new_label();
    p.load(Size::W, Reg::R2, Reg::R8, T_FLAGS).jump_imm(
        Cond::Set,
        Reg::R2,
        FLAG_V4_TARGET,
        six_to_four,
    );
    v6_source_fits(&mut p, out);
    p.goto(write);
    p.label(six_to_four);
    if call == Call::Connect {
        six_to_four_fits(&mut p, out);
        p.goto(write);
        // An IPv4-mapped destination: the IPv4 services, the target written back mapped.
        p.label(mapped);
        translate_mapped(&mut p, out);
    } else {
        p.goto(out);
    }
    // Write the (IPv6 or IPv4-mapped) target as the Target holds it.
    p.label(write);
    for w in 0..4 {
        p.load(Size::W, Reg::R2, Reg::R8, T_ADDR + 4 * w).store(
            Size::W,
            Reg::R6,
            USER_IP6 + 4 * w,
            Reg::R2,
        );
    }
    p.load(Size::W, Reg::R2, Reg::R8, T_PORT)
        .store(Size::W, Reg::R6, USER_PORT, Reg::R2);
    remember_and_count(&mut p, (Reg::R8, T_ADDR), call.counter(), out);
    allow(&mut p, out);
    p
}

/// 6→4 (connect6): jumps to `out` unless the socket can reach an IPv4-mapped address: bound
/// to nothing (one bound to an IPv6 address cannot), and not IPv6-only — what it set, if it
/// set anything since the hooks were attached; else the namespace's default, known for the
/// host's only (another namespace's socket goes to the listener). Needs the source in SRC.
fn six_to_four_fits(p: &mut Program, out: Label) {
    or_source_words(p, 4);
    p.jump_imm(Cond::Ne, Reg::R2, 0, out);
    let default = p.new_label();
    let decided = p.new_label();
    p.load(Size::DW, Reg::R2, Reg::R6, SOCK_ADDR_SK)
        .jump_imm(Cond::Eq, Reg::R2, 0, out);
    p.load_map(Reg::R1, "v6only");
    p.mov_imm(Reg::R3, 0)
        .mov_imm(Reg::R4, 0)
        .call(Helper::SkStorageGet)
        .jump_imm(Cond::Eq, Reg::R0, 0, default)
        .load(Size::W, Reg::R2, Reg::R0, 0)
        .goto(decided);
    p.label(default)
        .jump_imm(Cond::Ne, Reg::R9, 0, out)
        .store_imm(Size::W, Reg::R10, CONF_KEY, 1);
    p.load_map(Reg::R1, "config");
    stack_ptr(p, Reg::R2, CONF_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .load(Size::DW, Reg::R2, Reg::R0, 0);
    p.label(decided).jump_imm(Cond::Ne, Reg::R2, 0, out);
}

/// connect6 to ::ffff:a.b.c.d of an IPv4 mapping: the IPv4 target written IPv4-mapped, the
/// reverse entry noted as the socket sees it; then to `out` (which allows).
fn translate_mapped(p: &mut Program, out: Label) {
    p.load(Size::W, Reg::R2, Reg::R10, SVC_KEY + 12)
        .store(Size::W, Reg::R10, SVC_KEY, Reg::R2);
    key_port_protocol(p, 4);
    lookup_service(p, false, out);
    p.mov(Reg::R8, Reg::R0);
    in_scope(p, Dialled::Mapped, out);
    no_bound_device(p, out);
    load_source6(p, Call::Connect);
    mapped_source_fits(p, out);
    // The IPv4 Target has its address in its first word; the hook writes ::ffff:a.b.c.d.
    p.store_imm(Size::W, Reg::R6, USER_IP6, 0)
        .store_imm(Size::W, Reg::R6, USER_IP6 + 4, 0)
        .store_imm(Size::W, Reg::R6, USER_IP6 + 8, V4_MAPPED_WORD)
        .load(Size::W, Reg::R2, Reg::R8, T_ADDR)
        .store(Size::W, Reg::R6, USER_IP6 + 12, Reg::R2)
        .load(Size::W, Reg::R2, Reg::R8, T_PORT)
        .store(Size::W, Reg::R6, USER_PORT, Reg::R2);
    // The socket sees the target as ::ffff:a.b.c.d, and its replies come from that.
    remember_and_count(p, (Reg::R6, USER_IP6), CONNECTIONS, out);
    p.goto(out);
}

/// recvmsg / getpeername: a source or peer that is a target this socket was sent to reads as
/// the published address it dialled.
fn restore(v6: bool) -> Program {
    let mut p = Program::new();
    let out = p.new_label();
    p.mov(Reg::R6, Reg::R1).call(Helper::GetSocketCookie).store(
        Size::DW,
        Reg::R10,
        REV_KEY,
        Reg::R0,
    );
    zero(&mut p, REV_KEY + 8, 6);
    let words: i16 = if v6 { 4 } else { 1 };
    let base = if v6 { USER_IP6 } else { USER_IP4 };
    for w in 0..words {
        p.load(Size::W, Reg::R2, Reg::R6, base + 4 * w).store(
            Size::W,
            Reg::R10,
            REV_KEY + 8 + 4 * w,
            Reg::R2,
        );
    }
    p.load(Size::W, Reg::R2, Reg::R6, USER_PORT)
        .store(Size::W, Reg::R10, REV_KEY + 24, Reg::R2);
    p.load_map(Reg::R1, "reverse");
    stack_ptr(&mut p, Reg::R2, REV_KEY);
    p.call(Helper::MapLookupElem)
        .jump_imm(Cond::Eq, Reg::R0, 0, out);
    for w in 0..words {
        p.load(Size::W, Reg::R2, Reg::R0, 4 * w)
            .store(Size::W, Reg::R6, base + 4 * w, Reg::R2);
    }
    p.load(Size::W, Reg::R2, Reg::R0, 16)
        .store(Size::W, Reg::R6, USER_PORT, Reg::R2);
    allow(&mut p, out);
    p
}

/// setsockopt: remembers the IPV6_V6ONLY value a socket sets, in its own storage slot, and
/// lets the call go on to the kernel untouched. The program runs before the kernel's own
/// handling, so it notes only a change the kernel will take: on a socket with no port yet,
/// an int.
fn note_v6only() -> Program {
    let mut p = Program::new();
    let out = p.new_label();
    p.mov(Reg::R6, Reg::R1)
        .load(Size::W, Reg::R2, Reg::R6, SOCKOPT_LEVEL)
        .jump_imm(Cond::Ne, Reg::R2, SOL_IPV6, out)
        .load(Size::W, Reg::R2, Reg::R6, SOCKOPT_OPTNAME)
        .jump_imm(Cond::Ne, Reg::R2, IPV6_V6ONLY, out)
        .load(Size::DW, Reg::R7, Reg::R6, SOCKOPT_OPTVAL)
        .load(Size::DW, Reg::R8, Reg::R6, SOCKOPT_OPTVAL_END)
        .mov(Reg::R2, Reg::R7)
        .alu_imm(Alu::Add, Reg::R2, 4)
        .jump(Cond::Gt, Reg::R2, Reg::R8, out)
        .load(Size::W, Reg::R9, Reg::R7, 0)
        .load(Size::DW, Reg::R2, Reg::R6, SOCKOPT_SK)
        .jump_imm(Cond::Eq, Reg::R2, 0, out)
        // The kernel refuses IPV6_V6ONLY once the socket has a port (bound, or connected):
        // what it asks then is not what it is.
        .load(Size::W, Reg::R3, Reg::R2, SK_SRC_PORT)
        .jump_imm(Cond::Ne, Reg::R3, 0, out);
    p.load_map(Reg::R1, "v6only");
    // BPF_SK_STORAGE_GET_F_CREATE.
    p.mov_imm(Reg::R3, 0)
        .mov_imm(Reg::R4, 1)
        .call(Helper::SkStorageGet)
        .jump_imm(Cond::Eq, Reg::R0, 0, out)
        .store(Size::W, Reg::R0, 0, Reg::R9);
    allow(&mut p, out);
    p
}
