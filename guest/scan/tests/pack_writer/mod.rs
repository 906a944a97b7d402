//! Git packs written byte by byte, in a bundle: so every hostile pack a test needs is explicit
//! (the engine's tests, and the service's end-to-end tests through `#[path]`).
#![allow(dead_code)]

use miniz_oxide::deflate::compress_to_vec_zlib;
use sha1::{Digest, Sha1};

pub const BLOB: u8 = 3;
pub const OFS_DELTA: u8 = 6;
pub const REF_DELTA: u8 = 7;

/// An object's header: its type and inflated size.
pub fn header(kind: u8, size: u64) -> Vec<u8> {
    let mut out = vec![(kind << 4) | (size & 15) as u8];
    let mut rest = size >> 4;
    while rest != 0 {
        *out.last_mut().unwrap() |= 0x80;
        out.push((rest & 0x7f) as u8);
        rest >>= 7;
    }
    out
}

/// A whole object of `kind` holding `content`.
pub fn object(kind: u8, content: &[u8]) -> Vec<u8> {
    let mut out = header(kind, content.len() as u64);
    out.extend(compress_to_vec_zlib(content, 6));
    out
}

/// A zlib stream of `data` (a delta's instructions).
pub fn zlib(data: &[u8]) -> Vec<u8> {
    compress_to_vec_zlib(data, 6)
}

/// A pack of `objects` (already encoded), announcing `count` of them, with its SHA-1 trailer,
/// in a v2 bundle with one ref.
pub fn bundle(objects: &[Vec<u8>], count: u32) -> Vec<u8> {
    let mut pack = b"PACK".to_vec();
    pack.extend(2u32.to_be_bytes());
    pack.extend(count.to_be_bytes());
    for o in objects {
        pack.extend(o);
    }
    let sum = Sha1::digest(&pack);
    pack.extend(sum);
    let mut out = b"# v2 git bundle\n".to_vec();
    out.extend(format!("{} refs/heads/main\n\n", "ab".repeat(20)).as_bytes());
    out.extend(pack);
    out
}

/// A pack whose second object is a delta whose base lies before the pack's first object.
pub fn base_out_of_range() -> Vec<u8> {
    let mut delta = header(OFS_DELTA, 3);
    delta.push(0x7f); // 127 bytes back
    delta.extend(zlib(&[6, 1, 0x01]));
    bundle(&[object(BLOB, b"hello\n"), delta], 2)
}

/// A pack of two reference deltas, each naming the other's (would-be) name as its base.
pub fn delta_cycle() -> Vec<u8> {
    let objects: Vec<Vec<u8>> = [[0x22u8; 20], [0x11u8; 20]]
        .iter()
        .map(|base| {
            let mut o = header(REF_DELTA, 4);
            o.extend(base);
            o.extend(zlib(&[1, 1, 1, b'x']));
            o
        })
        .collect();
    bundle(&objects, 2)
}

/// A pack whose delta would rebuild a 1 GiB object from a 3-byte base.
pub fn delta_bomb() -> Vec<u8> {
    let base = object(BLOB, b"abc");
    let mut delta = header(OFS_DELTA, 8);
    delta.push(base.len() as u8);
    delta.extend(zlib(&[3, 0x80, 0x80, 0x80, 0x40, 0x91, 0, 3]));
    bundle(&[base, delta], 2)
}
