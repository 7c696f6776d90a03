//! eBPF programs written in Rust as instructions: a small typed builder with registers, jumps
//! to labels and map-fd loads, in the spirit of systemd's cgroup programs (arrays of
//! `struct bpf_insn` built with macros). No clang, no ELF: `cargo build` is all it takes.
//!
//! The encoding is the kernel's (include/uapi/linux/bpf.h, Documentation/bpf/standardization):
//! 8 bytes an instruction — opcode, destination and source registers, a signed 16-bit offset,
//! a signed 32-bit immediate — little-endian on the hosts rproxy runs on.

use std::collections::HashMap;

/// A register. R0 holds return values, R1-R5 arguments (R1 the context on entry), R6-R9 survive
/// helper calls, R10 is the read-only frame pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    /// Return value; helper results.
    R0,
    /// First argument; the context on entry.
    R1,
    /// Second argument.
    R2,
    /// Third argument.
    R3,
    /// Fourth argument.
    R4,
    /// Fifth argument.
    R5,
    /// Callee-saved.
    R6,
    /// Callee-saved.
    R7,
    /// Callee-saved.
    R8,
    /// Callee-saved.
    R9,
    /// Frame pointer (read-only; the stack lies below it).
    R10,
}

/// Access width of a load or store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// 1 byte.
    B,
    /// 2 bytes.
    H,
    /// 4 bytes.
    W,
    /// 8 bytes.
    DW,
}

impl Size {
    fn bits(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
            Size::DW => 0x18,
        }
    }
}

/// A 64-bit arithmetic operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alu {
    /// `dst += src`.
    Add,
    /// `dst -= src`.
    Sub,
    /// `dst |= src`.
    Or,
    /// `dst &= src`.
    And,
    /// `dst <<= src`.
    Lsh,
    /// `dst >>= src` (logical).
    Rsh,
    /// `dst ^= src`.
    Xor,
    /// `dst = src`.
    Mov,
}

impl Alu {
    fn bits(self) -> u8 {
        match self {
            Alu::Add => 0x00,
            Alu::Sub => 0x10,
            Alu::Or => 0x40,
            Alu::And => 0x50,
            Alu::Lsh => 0x60,
            Alu::Rsh => 0x70,
            Alu::Xor => 0xa0,
            Alu::Mov => 0xb0,
        }
    }
}

/// A conditional jump's comparison (unsigned, 64-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `dst & src != 0`.
    Set,
}

impl Cond {
    fn bits(self) -> u8 {
        match self {
            Cond::Eq => 0x10,
            Cond::Gt => 0x20,
            Cond::Ge => 0x30,
            Cond::Set => 0x40,
            Cond::Ne => 0x50,
            Cond::Lt => 0xa0,
            Cond::Le => 0xb0,
        }
    }
}

/// The kernel helpers the programs call, by number (enum bpf_func_id). None is GPL-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Helper {
    /// `void *bpf_map_lookup_elem(map, key)`.
    MapLookupElem = 1,
    /// `long bpf_map_update_elem(map, key, value, flags)`.
    MapUpdateElem = 2,
    /// `u64 bpf_get_socket_cookie(ctx)`.
    GetSocketCookie = 46,
    /// `void *bpf_sk_storage_get(map, sk, value, flags)`: a socket's own slot in a map.
    SkStorageGet = 107,
    /// `u64 bpf_get_netns_cookie(ctx)`.
    GetNetnsCookie = 122,
}

impl Helper {
    /// The helper's name without its `bpf_` prefix, as bpftool prints a call; None for a
    /// number the builder never emits.
    fn name_of(id: i32) -> Option<&'static str> {
        Some(match id {
            1 => "map_lookup_elem",
            2 => "map_update_elem",
            46 => "get_socket_cookie",
            107 => "sk_storage_get",
            122 => "get_netns_cookie",
            _ => return None,
        })
    }
}

// Instruction classes and modes.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const SRC_X: u8 = 0x08;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
const JA: u8 = 0x00;
/// `src_reg` of a 64-bit immediate load that names a map by its fd.
const PSEUDO_MAP_FD: u8 = 1;

/// One encoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// Destination register (low nibble) and source register (high nibble).
    pub regs: u8,
    /// Offset (memory access, jump distance).
    pub off: i16,
    /// Immediate.
    pub imm: i32,
}

impl Insn {
    fn new(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src as u8) << 4 | dst as u8,
            off,
            imm,
        }
    }

    /// The 8 bytes the kernel reads.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = self.regs;
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

/// Registers as bpftool names them: `r` for 64 bits, `w` for the low 32 (JMP32).
fn reg_name(n: u8, wide: bool) -> String {
    format!("{}{n}", if wide { 'r' } else { 'w' })
}

/// `*(u32 *)(r6 + 4)`: a memory operand.
fn mem(size: u8, base: u8, off: i16) -> String {
    let width = match size {
        0x00 => "u32",
        0x08 => "u16",
        0x10 => "u8",
        _ => "u64",
    };
    let sign = if off < 0 { '-' } else { '+' };
    format!("*({width} *)(r{base} {sign} {})", off.unsigned_abs())
}

/// The operator of an ALU operation, as in `r2 += 4`; None for one the builder never emits.
fn alu_op(op: u8) -> Option<&'static str> {
    Some(match op {
        0x00 => "+=",
        0x10 => "-=",
        0x40 => "|=",
        0x50 => "&=",
        0x60 => "<<=",
        0x70 => ">>=",
        0xa0 => "^=",
        0xb0 => "=",
        _ => return None,
    })
}

/// The comparison of a conditional jump, as in `if r0 == 0x0`.
fn jump_op(op: u8) -> Option<&'static str> {
    Some(match op {
        0x10 => "==",
        0x20 => ">",
        0x30 => ">=",
        0x40 => "&",
        0x50 => "!=",
        0xa0 => "<",
        0xb0 => "<=",
        _ => return None,
    })
}

impl Insn {
    fn dst(self) -> u8 {
        self.regs & 0x0f
    }

    fn src(self) -> u8 {
        self.regs >> 4
    }

    /// This instruction in bpftool's notation. `map`: the map a 64-bit load names; `next`:
    /// the instruction after it (a 64-bit load's second half). An encoding the builder never
    /// emits shows as its raw fields, so nothing is hidden.
    pub fn render(self, map: Option<&str>, next: Option<&Insn>) -> String {
        self.mnemonic(map, next).unwrap_or_else(|| {
            format!(
                "(code {:#04x} dst r{} src r{} off {} imm {})",
                self.code,
                self.dst(),
                self.src(),
                self.off,
                self.imm
            )
        })
    }

    fn mnemonic(self, map: Option<&str>, next: Option<&Insn>) -> Option<String> {
        let (class, op, size) = (self.code & 0x07, self.code & 0xf0, self.code & 0x18);
        let dst = reg_name(self.dst(), true);
        let src_x = self.code & SRC_X != 0;
        Some(match class {
            ALU64 => {
                let operand = match src_x {
                    true => reg_name(self.src(), true),
                    false => self.imm.to_string(),
                };
                format!("{dst} {} {operand}", alu_op(op)?)
            }
            LDX if self.code & 0xe0 == MEM => {
                format!("{dst} = {}", mem(size, self.src(), self.off))
            }
            STX if self.code & 0xe0 == MEM => {
                format!("{} = r{}", mem(size, self.dst(), self.off), self.src())
            }
            STX if self.code & 0xe0 == ATOMIC && self.imm == 0 => {
                format!(
                    "lock {} += r{}",
                    mem(size, self.dst(), self.off),
                    self.src()
                )
            }
            ST if self.code & 0xe0 == MEM => {
                format!("{} = {}", mem(size, self.dst(), self.off), self.imm)
            }
            LD if self.code == LD | IMM | Size::DW.bits() => match (self.src(), map) {
                (PSEUDO_MAP_FD, Some(name)) => format!("{dst} = map[{name}]"),
                (0, _) => {
                    let high = next.map_or(0, |n| n.imm as u32);
                    let value = u64::from(high) << 32 | u64::from(self.imm as u32);
                    format!("{dst} = {value:#x} ll")
                }
                _ => return None,
            },
            JMP if op == JA && !src_x => format!("goto {:+}", self.off),
            JMP if op == CALL => format!("call {}", Helper::name_of(self.imm)?),
            JMP if op == EXIT => "exit".to_string(),
            JMP | JMP32 => {
                let wide = class == JMP;
                let left = reg_name(self.dst(), wide);
                // JMP sign-extends its immediate to 64 bits; JMP32 compares the low 32.
                let right = match (src_x, wide) {
                    (true, _) => reg_name(self.src(), wide),
                    (false, true) => format!("{:#x}", i64::from(self.imm) as u64),
                    (false, false) => format!("{:#x}", self.imm as u32),
                };
                format!("if {left} {} {right} goto {:+}", jump_op(op)?, self.off)
            }
            _ => return None,
        })
    }
}

/// A place in a program, to jump to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label(u32);

/// Where a program refers to a map: instruction index (of a 64-bit load) and the map's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRef {
    /// Index of the first half of the `LD_IMM64`.
    pub at: usize,
    /// Which map.
    pub map: &'static str,
}

/// A program being written; [`Program::finish`] resolves its labels.
#[derive(Debug, Default)]
pub struct Program {
    insns: Vec<Insn>,
    /// Jumps waiting for their label: (instruction index, label).
    jumps: Vec<(usize, Label)>,
    labels: HashMap<Label, usize>,
    next_label: u32,
    maps: Vec<MapRef>,
}

/// A finished program: its instructions and the map loads to relocate with real fds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    /// The instructions, map fds still 0.
    pub insns: Vec<Insn>,
    /// Where each map fd goes.
    pub maps: Vec<MapRef>,
}

impl Code {
    /// The instructions with every map reference given its fd by `fd_of`; None when a map
    /// has no fd.
    pub fn relocated(&self, fd_of: impl Fn(&str) -> Option<i32>) -> Option<Vec<Insn>> {
        let mut insns = self.insns.clone();
        for r in &self.maps {
            insns.get_mut(r.at)?.imm = fd_of(r.map)?;
        }
        Some(insns)
    }

    /// The program as a reviewer reads it: one line per instruction, its index then its
    /// mnemonic in bpftool's notation (`r2 = *(u32 *)(r6 + 4)`, `if r0 == 0x0 goto +12`,
    /// `call map_lookup_elem`, `r1 = map[services4]`). A 64-bit load fills two slots and
    /// shows once, at the first. The golden files hold this, so a change to a program reads
    /// as a diff of instructions rather than of bytes.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while let Some(insn) = self.insns.get(i) {
            let map = self.maps.iter().find(|m| m.at == i).map(|m| m.map);
            out.push_str(&format!(
                "{i:4}: {}\n",
                insn.render(map, self.insns.get(i + 1))
            ));
            i += if insn.code == LD | IMM | Size::DW.bits() {
                2
            } else {
                1
            };
        }
        out
    }

    /// The program as the bytes bpf(2) loads (after relocation).
    pub fn bytes(insns: &[Insn]) -> Vec<u8> {
        insns.iter().flat_map(|i| i.to_bytes()).collect()
    }
}

impl Program {
    /// An empty program.
    pub fn new() -> Program {
        Program::default()
    }

    fn push(&mut self, i: Insn) -> &mut Program {
        self.insns.push(i);
        self
    }

    /// A fresh label, to be placed with [`Program::label`].
    pub fn new_label(&mut self) -> Label {
        self.next_label += 1;
        Label(self.next_label)
    }

    /// Places `l` at the next instruction.
    pub fn label(&mut self, l: Label) -> &mut Program {
        self.labels.insert(l, self.insns.len());
        self
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Program {
        self.alu_imm(Alu::Mov, dst, imm)
    }

    /// `dst = src`.
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Program {
        self.alu(Alu::Mov, dst, src)
    }

    /// `dst op= imm` (64-bit).
    pub fn alu_imm(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Program {
        self.push(Insn::new(ALU64 | op.bits(), dst, Reg::R0, 0, imm))
    }

    /// `dst op= src` (64-bit).
    pub fn alu(&mut self, op: Alu, dst: Reg, src: Reg) -> &mut Program {
        self.push(Insn::new(ALU64 | op.bits() | SRC_X, dst, src, 0, 0))
    }

    /// `dst = *(size *)(src + off)`.
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Program {
        self.push(Insn::new(LDX | MEM | size.bits(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = src`.
    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Program {
        self.push(Insn::new(STX | MEM | size.bits(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = imm`.
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Program {
        self.push(Insn::new(ST | MEM | size.bits(), dst, Reg::R0, off, imm))
    }

    /// `*(u64 *)(dst + off) += src`, atomically.
    pub fn atomic_add64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Program {
        // imm 0 = BPF_ADD: the old BPF_XADD encoding, which every kernel with these hooks has.
        self.push(Insn::new(STX | ATOMIC | Size::DW.bits(), dst, src, off, 0))
    }

    /// `dst = fd of map` (a 64-bit load, relocated when the program is loaded).
    pub fn load_map(&mut self, dst: Reg, map: &'static str) -> &mut Program {
        let at = self.insns.len();
        self.maps.push(MapRef { at, map });
        self.push(Insn::new(LD | IMM | Size::DW.bits(), dst, Reg::R0, 0, 0));
        self.insns.push(Insn {
            code: 0,
            regs: 0,
            off: 0,
            imm: 0,
        });
        // The first half's src_reg says "this immediate is a map fd".
        self.insns[at].regs |= PSEUDO_MAP_FD << 4;
        self
    }

    /// `if dst cond imm goto target`.
    pub fn jump_imm(&mut self, cond: Cond, dst: Reg, imm: i32, target: Label) -> &mut Program {
        self.jumps.push((self.insns.len(), target));
        self.push(Insn::new(JMP | cond.bits(), dst, Reg::R0, 0, imm))
    }

    /// `if (u32)dst cond (u32)imm goto target`: compares the low 32 bits, where an immediate
    /// with its top bit set would otherwise be sign-extended to 64 bits.
    pub fn jump32_imm(&mut self, cond: Cond, dst: Reg, imm: i32, target: Label) -> &mut Program {
        self.jumps.push((self.insns.len(), target));
        self.push(Insn::new(JMP32 | cond.bits(), dst, Reg::R0, 0, imm))
    }

    /// `if dst cond src goto target`.
    pub fn jump(&mut self, cond: Cond, dst: Reg, src: Reg, target: Label) -> &mut Program {
        self.jumps.push((self.insns.len(), target));
        self.push(Insn::new(JMP | cond.bits() | SRC_X, dst, src, 0, 0))
    }

    /// `goto target`.
    pub fn goto(&mut self, target: Label) -> &mut Program {
        self.jumps.push((self.insns.len(), target));
        self.push(Insn::new(JMP | JA, Reg::R0, Reg::R0, 0, 0))
    }

    /// `r0 = helper(r1, …, r5)`; R1-R5 are clobbered.
    pub fn call(&mut self, helper: Helper) -> &mut Program {
        self.push(Insn::new(JMP | CALL, Reg::R0, Reg::R0, 0, helper as i32))
    }

    /// `return r0`.
    pub fn exit(&mut self) -> &mut Program {
        self.push(Insn::new(JMP | EXIT, Reg::R0, Reg::R0, 0, 0))
    }

    /// Resolves every jump to its label; Err names a label never placed or out of reach.
    pub fn finish(&self) -> Result<Code, String> {
        let mut insns = self.insns.clone();
        for &(at, label) in &self.jumps {
            let target = *self
                .labels
                .get(&label)
                .ok_or_else(|| format!("label {} is never placed", label.0))?;
            let off = target as i64 - at as i64 - 1;
            insns[at].off = i16::try_from(off)
                .map_err(|_| format!("jump from {at} to {target} is out of reach"))?;
        }
        Ok(Code {
            insns,
            maps: self.maps.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A six-instruction cgroup/connect4 program (connect to port 24999 goes to 24998), the
    /// first one shown to load and work on this kernel, written with the builder: the same
    /// bytes as its instructions packed by hand from the kernel's encoding.
    #[test]
    fn encodes_like_the_kernel_expects() {
        let nport = |p: u16| u32::from_le_bytes([(p >> 8) as u8, p as u8, 0, 0]) as i32;
        let mut p = Program::new();
        let out = p.new_label();
        p.load(Size::W, Reg::R2, Reg::R1, 24)
            .jump_imm(Cond::Ne, Reg::R2, nport(24999), out)
            .mov_imm(Reg::R2, nport(24998))
            .store(Size::W, Reg::R1, 24, Reg::R2)
            .label(out)
            .mov_imm(Reg::R0, 1)
            .exit();
        let code = p.finish().unwrap();
        let bytes = Code::bytes(&code.insns);
        let expect: Vec<u8> = [
            (0x61u8, 0x12u8, 24i16, 0i32),
            (0x55, 0x02, 2, nport(24999)),
            (0xb7, 0x02, 0, nport(24998)),
            (0x63, 0x21, 24, 0),
            (0xb7, 0x00, 0, 1),
            (0x95, 0x00, 0, 0),
        ]
        .iter()
        .flat_map(|&(code, regs, off, imm)| {
            let mut b = vec![code, regs];
            b.extend(off.to_le_bytes());
            b.extend(imm.to_le_bytes());
            b
        })
        .collect();
        assert_eq!(bytes, expect);
    }

    /// Every form the builder emits, rendered as bpftool prints it.
    #[test]
    fn renders_each_instruction_as_bpftool_does() {
        let mut p = Program::new();
        let out = p.new_label();
        p.mov(Reg::R6, Reg::R1)
            .load(Size::W, Reg::R2, Reg::R6, 4)
            .store(Size::DW, Reg::R10, -8, Reg::R0)
            .store_imm(Size::W, Reg::R10, -88, 0)
            .alu_imm(Alu::And, Reg::R2, 0xff)
            .alu(Alu::Or, Reg::R2, Reg::R3)
            .jump_imm(Cond::Eq, Reg::R0, 0, out)
            .jump32_imm(Cond::Eq, Reg::R2, 0xffff_0000_u32 as i32, out)
            .jump_imm(Cond::Ne, Reg::R2, -1, out)
            .jump(Cond::Eq, Reg::R7, Reg::R1, out)
            .jump_imm(Cond::Set, Reg::R2, 1, out)
            .load_map(Reg::R1, "services4")
            .call(Helper::MapLookupElem)
            .atomic_add64(Reg::R0, 8, Reg::R1)
            .goto(out)
            .label(out)
            .mov_imm(Reg::R0, 1)
            .exit();
        let text = p.finish().unwrap().render();
        let expect = [
            "   0: r6 = r1",
            "   1: r2 = *(u32 *)(r6 + 4)",
            "   2: *(u64 *)(r10 - 8) = r0",
            "   3: *(u32 *)(r10 - 88) = 0",
            "   4: r2 &= 255",
            "   5: r2 |= r3",
            "   6: if r0 == 0x0 goto +9",
            "   7: if w2 == 0xffff0000 goto +8",
            "   8: if r2 != 0xffffffffffffffff goto +7",
            "   9: if r7 == r1 goto +6",
            "  10: if r2 & 0x1 goto +5",
            "  11: r1 = map[services4]",
            "  13: call map_lookup_elem",
            "  14: lock *(u64 *)(r0 + 8) += r1",
            "  15: goto +0",
            "  16: r0 = 1",
            "  17: exit",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expect);
        // What the builder never emits still shows, field by field.
        let odd = Insn::new(0x87, Reg::R1, Reg::R0, 0, 0);
        assert_eq!(
            odd.render(None, None),
            "(code 0x87 dst r1 src r0 off 0 imm 0)"
        );
    }

    #[test]
    fn map_loads_are_relocated_and_labels_checked() {
        let mut p = Program::new();
        p.load_map(Reg::R1, "services").mov_imm(Reg::R0, 0).exit();
        let code = p.finish().unwrap();
        assert_eq!(code.insns[0].code, 0x18);
        assert_eq!(code.insns[0].regs, 0x11);
        let insns = code.relocated(|m| (m == "services").then_some(7)).unwrap();
        assert_eq!(insns[0].imm, 7);
        assert!(code.relocated(|_| None).is_none());
        let mut q = Program::new();
        let nowhere = q.new_label();
        q.goto(nowhere);
        assert!(q.finish().is_err());
    }
}
