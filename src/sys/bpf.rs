//! bpf(2): maps, program loading, cgroup links and queries, for the socket-level fast path;
//! and the network namespace cookie the programs compare against.
//!
//! `union bpf_attr` is written field by field into a zeroed 128-byte buffer: the kernel
//! requires every byte past the fields a command uses to be zero, and ignores nothing.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

const MAP_CREATE: libc::c_int = 0;
const MAP_LOOKUP_ELEM: libc::c_int = 1;
const MAP_UPDATE_ELEM: libc::c_int = 2;
const MAP_DELETE_ELEM: libc::c_int = 3;
const PROG_LOAD: libc::c_int = 5;
const OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const PROG_QUERY: libc::c_int = 16;
const BTF_LOAD: libc::c_int = 18;
const LINK_CREATE: libc::c_int = 28;

/// `BPF_F_QUERY_EFFECTIVE`: the programs that run for a cgroup, inherited ones included.
const QUERY_EFFECTIVE: u32 = 1;

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// A `union bpf_attr`, zeroed, with typed writes at byte offsets.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }

    fn u32(&mut self, at: usize, v: u32) -> &mut Attr {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(&mut self, at: usize, v: u64) -> &mut Attr {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn ptr<T: ?Sized>(&mut self, at: usize, p: *const T) -> &mut Attr {
        self.u64(at, p as *const u8 as usize as u64)
    }

    fn name(&mut self, at: usize, name: &str) -> &mut Attr {
        // BPF_OBJ_NAME_LEN is 16 with the terminating NUL.
        let n = name.len().min(15);
        self.0[at..at + n].copy_from_slice(&name.as_bytes()[..n]);
        self
    }

    fn read_u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_ne_bytes(b)
    }

    /// bpf(cmd, self): the syscall's result (an fd or 0).
    fn call(&mut self, cmd: libc::c_int) -> io::Result<libc::c_int> {
        // SAFETY: the attr buffer is ours, 128 bytes long (the size we pass), and every pointer
        // written into it points to memory the caller keeps alive across this call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                self.0.len() as libc::c_uint,
            )
        };
        cvt(libc::c_int::try_from(r).unwrap_or(-1))
    }

    fn call_fd(&mut self, cmd: libc::c_int) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)?;
        // SAFETY: on success these commands return a new descriptor that only we hold.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// A map's shape, for [`Map::create`].
#[derive(Debug, Clone, Copy)]
pub struct MapSpec {
    /// `enum bpf_map_type` (1 hash, 2 array, 9 LRU hash).
    pub kind: u32,
    /// Key size in bytes.
    pub key: u32,
    /// Value size in bytes.
    pub value: u32,
    /// Entries at most.
    pub max_entries: u32,
    /// Its name, as `bpftool map` shows it (up to 15 bytes).
    pub name: &'static str,
    /// `map_flags` (BPF_F_NO_PREALLOC for socket storage).
    pub flags: u32,
    /// Type information, for maps that need it (socket storage): (BTF fd, key type id, value
    /// type id).
    pub btf: Option<(i32, u32, u32)>,
}

/// BPF_BTF_LOAD: type information (a `struct btf_header`, types and strings) for maps that
/// need it.
pub fn btf_load(btf: &[u8]) -> io::Result<OwnedFd> {
    Attr::new()
        .ptr(0, btf.as_ptr())
        .u32(16, btf.len() as u32)
        .call_fd(BTF_LOAD)
}

/// A map this process created, with the key and value sizes it was created with. The kernel
/// reads (update, delete) and writes (lookup) exactly those sizes whatever the buffers it is
/// given, so every access is checked against them here: a buffer of another length is
/// refused (`InvalidInput`) instead of being read or written past its end.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key: usize,
    value: usize,
}

impl Map {
    /// BPF_MAP_CREATE.
    pub fn create(spec: &MapSpec) -> io::Result<Map> {
        let mut attr = Attr::new();
        attr.u32(0, spec.kind)
            .u32(4, spec.key)
            .u32(8, spec.value)
            .u32(12, spec.max_entries)
            .u32(16, spec.flags)
            .name(28, spec.name);
        if let Some((fd, key, value)) = spec.btf {
            attr.u32(48, fd as u32).u32(52, key).u32(56, value);
        }
        Ok(Map {
            fd: attr.call_fd(MAP_CREATE)?,
            key: spec.key as usize,
            value: spec.value as usize,
        })
    }

    /// BPF_MAP_UPDATE_ELEM (BPF_ANY).
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.check("key", key.len(), self.key)?;
        self.check("value", value.len(), self.value)?;
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .ptr(8, key.as_ptr())
            .ptr(16, value.as_ptr())
            .call(MAP_UPDATE_ELEM)
            .map(|_| ())
    }

    /// BPF_MAP_DELETE_ELEM; Ok(false) when the key was not there.
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        self.check("key", key.len(), self.key)?;
        match Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .ptr(8, key.as_ptr())
            .call(MAP_DELETE_ELEM)
        {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// BPF_MAP_LOOKUP_ELEM: the value (of the map's value size), None when absent.
    pub fn lookup(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.check("key", key.len(), self.key)?;
        let mut value = vec![0u8; self.value];
        match Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .ptr(8, key.as_ptr())
            .ptr(16, value.as_mut_ptr())
            .call(MAP_LOOKUP_ELEM)
        {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn check(&self, what: &str, given: usize, size: usize) -> io::Result<()> {
        match given == size {
            true => Ok(()),
            false => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {what} of {given} bytes for a map whose {what}s have {size}"),
            )),
        }
    }
}

impl AsFd for Map {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What the verifier said about a program it refused.
#[derive(Debug)]
pub struct Refused {
    /// The error bpf(2) returned.
    pub error: io::Error,
    /// The verifier's log (its last lines say why).
    pub log: String,
}

/// How much of the verifier's account a refusal carries (the kernel keeps the end of it
/// since Linux 6.4, the beginning before).
const VERIFIER_LOG: usize = 1 << 16;

/// BPF_PROG_LOAD of `insns` (encoded instructions) as `prog_type` for `attach_type`, under
/// `license`; a refusal carries the verifier's log. The load itself asks for no log: a log
/// that does not fit its buffer fails the load with ENOSPC (every kernel reports the
/// truncation so), however valid the program. Only a refused program is loaded again, with
/// a log, to say why.
pub fn prog_load(
    prog_type: u32,
    attach_type: u32,
    insns: &[u8],
    license: &str,
    name: &str,
) -> Result<OwnedFd, Refused> {
    let license = CString::new(license).unwrap_or_default();
    let load = |log: Option<&mut [u8]>| {
        let mut attr = Attr::new();
        attr.u32(0, prog_type)
            .u32(4, (insns.len() / 8) as u32)
            .ptr(8, insns.as_ptr())
            .ptr(16, license.as_ptr())
            .name(48, name)
            .u32(68, attach_type);
        if let Some(log) = log {
            attr.u32(24, 1)
                .u32(28, log.len() as u32)
                .ptr(32, log.as_mut_ptr());
        }
        attr.call_fd(PROG_LOAD)
    };
    let error = match load(None) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let mut log = vec![0u8; VERIFIER_LOG];
    if let Ok(fd) = load(Some(&mut log)) {
        return Ok(fd);
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    Err(Refused {
        error,
        log: String::from_utf8_lossy(&log[..end]).into_owned(),
    })
}

/// BPF_LINK_CREATE: attaches `prog` to the cgroup directory `cgroup` for `attach_type`. The
/// program stays attached while the link fd is open: closing it — or the process dying, even
/// by SIGKILL — detaches it.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, cgroup.as_raw_fd() as u32)
        .u32(8, attach_type)
        .call_fd(LINK_CREATE)
}

/// The kernel's id of a program (as [`prog_query`] lists them).
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    // struct bpf_prog_info begins with u32 type, u32 id; the kernel fills what fits.
    let mut info = [0u32; 2];
    Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, size_of::<[u32; 2]>() as u32)
        .ptr(8, info.as_mut_ptr())
        .call(OBJ_GET_INFO_BY_FD)?;
    Ok(info[1])
}

/// BPF_PROG_QUERY with BPF_F_QUERY_EFFECTIVE: the ids of the programs that run for the
/// cgroup `cgroup` at `attach_type`, inherited from its ancestors included (up to 64).
pub fn prog_query_effective(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = Attr::new();
    attr.u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, attach_type)
        .u32(8, QUERY_EFFECTIVE)
        .ptr(16, ids.as_mut_ptr())
        .u32(24, ids.len() as u32);
    attr.call(PROG_QUERY)?;
    let n = (attr.read_u32(24) as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

/// The cookie of the network namespace `socket` lives in (SO_NETNS_COOKIE, Linux 5.14):
/// what `bpf_get_netns_cookie` returns for sockets of that namespace.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into our u64 and updates `len`.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(cookie)
}

/// The cookie of the network namespace at `path` (a file of nsfs, such as dockerd's
/// `SandboxKey`): read from a socket opened inside it, by a short-lived thread that joins the
/// namespace (setns changes only the calling thread's, so the process's stays as it was).
pub fn netns_cookie_at(path: &std::path::Path) -> io::Result<u64> {
    let ns = std::fs::File::open(path)?;
    std::thread::Builder::new()
        .name("rproxy-netns".into())
        .spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
            netns_cookie(std::os::fd::AsFd::as_fd(&probe))
        })?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace probe thread failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An array map of one 16-byte value, or None (said why) without the right to make one.
    fn array_of_16() -> Option<Map> {
        let spec = MapSpec {
            kind: 2,
            key: 4,
            value: 16,
            max_entries: 1,
            name: "rpx_test",
            flags: 0,
            btf: None,
        };
        match Map::create(&spec) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("SKIP: cannot create a BPF map ({e}): needs root (CAP_BPF)");
                None
            }
        }
    }

    /// The kernel copies the map's sizes whatever the buffers: a lookup gives the whole
    /// value, and keys or values of another length are refused before the kernel sees them.
    #[test]
    fn accesses_have_the_maps_sizes() {
        let Some(map) = array_of_16() else { return };
        let slot = 0u32.to_ne_bytes();
        map.update(&slot, &[7u8; 16]).unwrap();
        assert_eq!(map.lookup(&slot).unwrap(), Some(vec![7u8; 16]));
        let refused = |r: io::Result<()>| r.is_err_and(|e| e.kind() == io::ErrorKind::InvalidInput);
        assert!(refused(map.update(&slot, &[9u8; 4])), "a short value");
        assert!(refused(map.update(&slot, &[9u8; 32])), "a long value");
        assert!(refused(map.update(&[0u8; 2], &[9u8; 16])), "a short key");
        assert!(refused(map.lookup(&[0u8; 8]).map(|_| ())), "a long key");
        assert!(refused(map.delete(&[0u8; 1]).map(|_| ())), "a short key");
        assert_eq!(
            map.lookup(&slot).unwrap(),
            Some(vec![7u8; 16]),
            "changed by a refusal"
        );
    }

    /// A cgroup/connect4 program of `n` moves and an exit: valid, and its verifier log at
    /// level 1 is a line per instruction.
    fn long_program(n: usize) -> Vec<u8> {
        let mut insns = Vec::new();
        for _ in 0..n {
            insns.extend([0xb7, 0x00, 0, 0, 1, 0, 0, 0]); // r0 = 1
        }
        insns.extend([0x95, 0, 0, 0, 0, 0, 0, 0]); // exit
        insns
    }

    /// A valid program loads however long the verifier's account of it would be.
    #[test]
    fn a_valid_program_with_a_long_log_loads() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("SKIP: loading a program needs root (CAP_BPF)");
        }
        let loaded = prog_load(18, 10, &long_program(8000), "GPL", "rpx_test");
        if let Err(r) = &loaded {
            panic!("refused: {} ({} bytes of log)", r.error, r.log.len());
        }
    }

    /// A refused program still comes with the verifier's reason.
    #[test]
    fn a_refusal_says_why() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("SKIP: loading a program needs root (CAP_BPF)");
        }
        // exit without setting r0.
        let insns = [0x95, 0, 0, 0, 0, 0, 0, 0];
        let Err(refused) = prog_load(18, 10, &insns, "GPL", "rpx_test") else {
            panic!("the verifier accepted an exit with r0 unset");
        };
        assert_eq!(
            refused.error.raw_os_error(),
            Some(libc::EACCES),
            "{}",
            refused.error
        );
        assert!(refused.log.contains("R0 !read_ok"), "{}", refused.log);
    }
}
