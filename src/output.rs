//! Writing to stdout without panicking: `println!` panics when stdout is a closed pipe
//! (`rproxy ls | head`, `rproxy --help | head`), and release builds abort on panic. A reader
//! that stopped reading ends the output, not the process.

use std::io::Write;

/// Writes `text` to stdout; errors (a closed pipe, a full disk) are dropped: there is no one
/// left to tell on stdout, and the exit status stays the command's own.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
