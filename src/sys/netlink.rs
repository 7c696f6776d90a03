//! Netlink socket options (rproxy speaks nf_tables over a socket socket2 opens).

use std::io;
use std::os::fd::BorrowedFd;

use super::set_int_option;

/// An int option at SOL_NETLINK (NETLINK_CAP_ACK, NETLINK_EXT_ACK).
pub fn set_netlink_option(
    fd: BorrowedFd<'_>,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    set_int_option(fd, libc::SOL_NETLINK, name, value)
}
