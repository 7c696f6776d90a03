//! Helpers shared by the unit tests.

use proptest::prelude::*;

/// Edits to make to some bytes: (position, byte, 0 = replace / 1 = insert / 2 = cut), the
/// position taken modulo the length.
pub fn edits(max_at: usize) -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    proptest::collection::vec((0..max_at, any::<u8>(), 0u8..3), 1..8)
}

/// `good` with `edits` applied.
pub fn mutate(good: &str, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut bytes = good.as_bytes().to_vec();
    for &(at, byte, how) in edits {
        let at = at % (bytes.len() + 1);
        match how {
            0 if at < bytes.len() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => {}
        }
    }
    bytes
}
