//! Git's delta format: a base object's size and the result's, then instructions that copy a
//! range of the base or insert literal bytes. Every range is checked against the base and the
//! declared result size before a byte is written.

use alloc::vec::Vec;

use crate::error::HistoryProblem;

/// Reads a size: 7 bits per byte, least significant first, the top bit saying more follow.
fn size(delta: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0u32;
    loop {
        let byte = *delta.get(*pos)?;
        *pos += 1;
        if shift > 63 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
}

/// The result size a delta declares, without applying it.
pub(super) fn result_size(delta: &[u8]) -> Option<u64> {
    let mut pos = 0;
    size(delta, &mut pos)?;
    size(delta, &mut pos)
}

/// Applies `delta` to `base` into `out` (cleared first). `max` bounds the declared result
/// size; `offset` (the delta's place in the pack) names it in errors.
pub(super) fn apply(
    base: &[u8],
    delta: &[u8],
    max: u64,
    offset: u64,
    out: &mut Vec<u8>,
) -> Result<(), HistoryProblem> {
    let bad = |reason| HistoryProblem::BadDelta { offset, reason };
    let mut pos = 0;
    let base_size = size(delta, &mut pos).ok_or(bad("its base size is cut short"))?;
    if base_size != base.len() as u64 {
        return Err(bad("its base is not the size it declares"));
    }
    let result_size = size(delta, &mut pos).ok_or(bad("its result size is cut short"))?;
    if result_size > max {
        return Err(HistoryProblem::ObjectTooLarge { offset, size: result_size, limit: max });
    }
    out.clear();
    out.try_reserve_exact(result_size as usize).map_err(|_| HistoryProblem::ObjectTooLarge {
        offset,
        size: result_size,
        limit: max,
    })?;
    while pos < delta.len() {
        let op = delta[pos];
        pos += 1;
        if op & 0x80 != 0 {
            // Copy: bits 0-3 say which offset bytes follow, bits 4-6 which size bytes.
            let mut field = |bits: u8, first: u32| -> Result<u64, HistoryProblem> {
                let mut v = 0u64;
                for i in 0..bits as u32 {
                    if op & (1 << (first + i)) != 0 {
                        let byte = *delta.get(pos).ok_or(bad("a copy instruction is cut short"))?;
                        pos += 1;
                        v |= u64::from(byte) << (8 * i);
                    }
                }
                Ok(v)
            };
            let from = field(4, 0)?;
            let mut len = field(3, 4)?;
            if len == 0 {
                len = 0x10000;
            }
            let end = from.checked_add(len).ok_or(bad("a copy's range overflows"))?;
            if end > base.len() as u64 {
                return Err(bad("a copy reaches past the end of its base"));
            }
            if out.len() as u64 + len > result_size {
                return Err(bad("it writes more than its declared result size"));
            }
            out.extend_from_slice(&base[from as usize..end as usize]);
        } else if op != 0 {
            let len = usize::from(op);
            let bytes = delta.get(pos..pos + len).ok_or(bad("an insert instruction is cut short"))?;
            if (out.len() + len) as u64 > result_size {
                return Err(bad("it writes more than its declared result size"));
            }
            out.extend_from_slice(bytes);
            pos += len;
        } else {
            return Err(bad("it holds the reserved instruction 0"));
        }
    }
    if out.len() as u64 != result_size {
        return Err(bad("it writes less than its declared result size"));
    }
    Ok(())
}

/// Where a run of a delta's result comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// `len` bytes at `dst` of the result are the base's bytes at `src`.
    Copy { dst: usize, src: usize, len: usize },
    /// `len` bytes at `dst` are the delta's own.
    Insert { dst: usize, len: usize },
}

impl Piece {
    pub(super) fn end(&self) -> usize {
        match *self {
            Piece::Copy { dst, len, .. } | Piece::Insert { dst, len } => dst + len,
        }
    }
}

/// The runs of a delta's result, in order, adjacent copies of adjacent base bytes joined;
/// `None` if the delta is malformed (only deltas [`apply`] accepted are asked).
pub(super) fn pieces(delta: &[u8]) -> Option<Vec<Piece>> {
    let mut pos = 0;
    size(delta, &mut pos)?;
    size(delta, &mut pos)?;
    let mut out: Vec<Piece> = Vec::new();
    let mut dst = 0usize;
    while pos < delta.len() {
        let op = delta[pos];
        pos += 1;
        if op & 0x80 != 0 {
            let mut field = |bits: u32, first: u32| -> Option<usize> {
                let mut v = 0usize;
                for i in 0..bits {
                    if op & (1 << (first + i)) != 0 {
                        v |= usize::from(*delta.get(pos)?) << (8 * i);
                        pos += 1;
                    }
                }
                Some(v)
            };
            let src = field(4, 0)?;
            let len = match field(3, 4)? {
                0 => 0x10000,
                n => n,
            };
            match out.last_mut() {
                Some(Piece::Copy { src: s, len: l, .. }) if *s + *l == src => *l += len,
                _ => out.push(Piece::Copy { dst, src, len }),
            }
            dst += len;
        } else if op != 0 {
            let len = usize::from(op);
            pos += len;
            match out.last_mut() {
                Some(Piece::Insert { len: l, .. }) => *l += len,
                _ => out.push(Piece::Insert { dst, len }),
            }
            dst += len;
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(base: &[u8], delta: &[u8]) -> Result<Vec<u8>, HistoryProblem> {
        let mut out = Vec::new();
        apply(base, delta, 1 << 20, 7, &mut out).map(|()| out)
    }

    #[test]
    fn copies_and_inserts() {
        // base "hello world" (11), result "world, hello!" (13)
        let delta = [11, 13, 0x91, 6, 5, 2, b',', b' ', 0x90, 5, 1, b'!'];
        assert_eq!(run(b"hello world", &delta).unwrap(), b"world, hello!");
    }

    #[test]
    fn pieces_join_adjacent_copies() {
        // copy base[0..3], copy base[3..5], insert "xy", copy base[1..2]
        let delta = [5, 8, 0x90, 3, 0x91, 3, 2, 2, b'x', b'y', 0x91, 1, 1];
        assert_eq!(run(b"abcde", &delta).unwrap(), b"abcdexyb");
        assert_eq!(
            pieces(&delta).unwrap(),
            [
                Piece::Copy { dst: 0, src: 0, len: 5 },
                Piece::Insert { dst: 5, len: 2 },
                Piece::Copy { dst: 7, src: 1, len: 1 }
            ]
        );
    }

    #[test]
    fn refuses_copies_outside_the_base_and_wrong_sizes() {
        let past_end = [3, 4, 0x91, 2, 4];
        assert!(matches!(run(b"abc", &past_end), Err(HistoryProblem::BadDelta { offset: 7, .. })));
        let wrong_base = [4, 1, 1, b'x'];
        assert!(run(b"abc", &wrong_base).is_err());
        let short = [3, 5, 0x90, 3];
        assert!(run(b"abc", &short).is_err());
        let long = [3, 1, 0x90, 3];
        assert!(run(b"abc", &long).is_err());
        assert!(run(b"abc", &[3, 0, 0]).is_err());
        let huge = [3, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(run(b"abc", &huge), Err(HistoryProblem::ObjectTooLarge { .. })));
    }
}
