//! SHA-256 digests and their lowercase hex spelling, the only hash and text form the log uses.

use ring::digest;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first event of every chain.
pub const GENESIS: Hash = [0; 32];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Hash {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// Value of each lowercase hex digit; 0xff for every other byte.
const NIBBLE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

fn nibble(c: u8) -> Option<u8> {
    let v = NIBBLE[usize::from(c)];
    (v != 0xff).then_some(v)
}

/// Parses lowercase hex into bytes; `None` for odd length or any other character.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() & 1 == 1 {
        return None;
    }
    b.chunks_exact(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

/// Parses 64 lowercase hex digits (text or raw bytes) into a digest.
#[inline]
pub fn hash_from_hex(s: impl AsRef<[u8]>) -> Option<Hash> {
    let b = s.as_ref();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    let mut valid = true;
    for (o, digits) in out.chunks_exact_mut(4).zip(b.chunks_exact(8)) {
        let mut word = [0; 8];
        word.copy_from_slice(digits);
        let (bytes, ok) = eight_hex_digits(u64::from_le_bytes(word));
        o.copy_from_slice(&bytes);
        // Decided once at the end, so the loop has no branches.
        valid &= ok;
    }
    valid.then_some(out)
}

/// Decodes eight lowercase hex digits (the bytes of `w`, first digit lowest) into four bytes,
/// all at once; the flag says whether all eight were lowercase hex digits.
#[inline]
fn eight_hex_digits(w: u64) -> ([u8; 4], bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // For bytes below 0x80 these sums carry into no other byte: the high bit of each byte says
    // "at least `lo`" or "more than `hi`".
    let at_least = |lo: u64| w.wrapping_add(ONES * (0x80 - lo));
    let above = |hi: u64| w.wrapping_add(ONES * (0x7f - hi));
    let digit = at_least(0x30) & !above(0x39);
    let letter = at_least(0x61) & !above(0x66);
    let valid = (digit | letter) & !w & HIGH == HIGH;
    // '0'..'9' -> 0..9 (low nibble); 'a'..'f' -> 1..6 (low nibble) + 9 (bit 6 set).
    let nibbles = (w & (ONES * 0x0f)) + ((w >> 6) & ONES) * 9;
    // Pair each digit with the next: the high nibble first.
    let pairs = ((nibbles & 0x00ff_00ff_00ff_00ff) << 4) | ((nibbles >> 8) & 0x00ff_00ff_00ff_00ff);
    let packed = (pairs | (pairs >> 8)) & 0x0000_ffff_0000_ffff;
    let packed = (packed | (packed >> 16)) & 0xffff_ffff;
    let bytes = (packed as u32).to_le_bytes();
    (bytes, valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_from_hex_takes_lowercase_hex_digits_only() {
        let h: Hash = std::array::from_fn(|i| (i * 37 + 5) as u8);
        let hex = to_hex(&h);
        assert_eq!(hash_from_hex(&hex), Some(h));
        assert_eq!(hash_from_hex([b'f'; 64]), Some([0xff; 32]));
        assert_eq!(hash_from_hex([b'0'; 64]), Some([0; 32]));
        // Every byte that is not a lowercase hex digit, in every position of a word.
        for bad in (0..=255u8).filter(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            for at in [0, 5, 8, 63] {
                let mut text = hex.clone().into_bytes();
                text[at] = bad;
                assert_eq!(hash_from_hex(&text), None, "byte {bad:#x} at {at}");
            }
        }
        assert_eq!(hash_from_hex(&hex[..62]), None);
    }

    #[test]
    fn hex_round_trips_and_rejects_uppercase() {
        let h = sha256(b"abc");
        assert_eq!(to_hex(&h), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hash_from_hex(to_hex(&h)), Some(h));
        assert_eq!(from_hex("0aFF"), None);
        assert_eq!(from_hex("0aff"), Some(vec![0x0a, 0xff]));
    }
}
