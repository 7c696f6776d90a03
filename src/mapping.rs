//! A Mapping — protocol, listen address, target address — is the unit every mode works on:
//! docker-proxy flags produce one, and the data path never knows where it came from.

use std::fmt;
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub proto: Proto,
    /// Where clients connect (port 0 = any free port, resolved at bind time).
    pub listen: SocketAddr,
    /// Where connections and datagrams are forwarded.
    pub target: SocketAddr,
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.proto, self.listen, self.target)
    }
}

/// An OS error as a short lowercase phrase ("address already in use"), the way Go prints it,
/// without Rust's " (os error 98)" suffix — these strings end up in `docker run` output.
pub fn describe(err: &std::io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_like_go() {
        let e = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(describe(&e), "address already in use");
        let e = std::io::Error::other("Custom thing");
        assert_eq!(describe(&e), "custom thing");
    }
}
