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
