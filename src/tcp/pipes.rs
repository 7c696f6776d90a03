//! Splice pipes shared by the connections of a thread. A connection borrows one only while
//! bytes sit in it (between splicing in and splicing out), so idle connections hold none and
//! a busy proxy needs about one per thread, not two per connection as docker-proxy does.
//!
//! A pipe goes back to the pool only when empty: then any later "would block" on splicing
//! into it means the socket has nothing to read, never that the pipe is full.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// What each pipe asks for (what Go gives docker-proxy's pipes): one splice then moves up to
/// 1 MiB, not 64 KiB, with a fraction of the syscalls and wake-ups. Only pages in flight use
/// memory, and those are the socket's own, moved by reference.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept per thread; more are closed when they come back.
const POOL_MAX: usize = 16;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe on loan. `pending` counts the bytes in it; dropped with none pending, the pipe goes
/// back to the pool, otherwise (an error or an abort mid-transfer) it is closed.
pub struct Lease {
    pipe: Option<Pipe>,
    pub pending: usize,
}

impl Lease {
    /// Takes an empty pipe from this thread's pool, or makes one.
    pub fn take() -> io::Result<Lease> {
        let pipe = match POOL.with(|p| p.borrow_mut().pop()) {
            Some(pipe) => pipe,
            None => {
                let (read, write) = sys::pipe::pipe()?;
                let capacity = sys::pipe::set_pipe_size(write.as_fd(), PIPE_SIZE);
                Pipe {
                    read,
                    write,
                    capacity,
                }
            }
        };
        Ok(Lease {
            pipe: Some(pipe),
            pending: 0,
        })
    }

    fn pipe(&self) -> &Pipe {
        self.pipe
            .as_ref()
            .expect("a lease holds its pipe until dropped")
    }

    pub fn capacity(&self) -> usize {
        self.pipe().capacity
    }

    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.pipe().read.as_fd()
    }

    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.pipe().write.as_fd()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (Some(pipe), 0) = (self.pipe.take(), self.pending) {
            POOL.with(|p| {
                let mut pool = p.borrow_mut();
                if pool.len() < POOL_MAX {
                    pool.push(pipe);
                }
            });
        }
    }
}
