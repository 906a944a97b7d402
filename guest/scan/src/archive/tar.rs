//! tar (POSIX ustar, pax `x` headers, GNU `L`/`K` long names), read sequentially.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::path::{check_link, normalize};
use super::{drain, Walk};
use crate::error::ArtifactError;
use crate::source::{read_full, ByteRead};

const BLOCK: usize = 512;
/// Longest GNU long name / pax header accepted.
const MAX_META: u64 = 64 * 1024;
/// The most map extension blocks of one GNU sparse entry read (21 data regions each).
const MAX_SPARSE_EXTENSIONS: u32 = 4096;
/// The longest map of a PAX sparse entry (format 1.0) read, in bytes.
const MAX_SPARSE_MAP: u64 = 1 << 20;

fn field_str(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn parse_octal(b: &[u8]) -> Option<u64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        // GNU base-256: big-endian in the remaining bytes.
        let mut v: u64 = u64::from(b[0] & 0x7f);
        for &c in &b[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(c))?;
        }
        return Some(v);
    }
    let s = field_str(b);
    let mut v: u64 = 0;
    let mut any = false;
    for &c in s {
        match c {
            b'0'..=b'7' => {
                v = v.checked_mul(8)?.checked_add(u64::from(c - b'0'))?;
                any = true;
            }
            b' ' => {
                if any {
                    break;
                }
            }
            _ => return None,
        }
    }
    Some(v)
}

fn checksum_ok(h: &[u8]) -> bool {
    let Some(stored) = parse_octal(&h[148..156]) else { return false };
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || stored as i64 == signed
}

/// True if `h` (one 512-byte block) is a tar header: ustar magic, or a valid checksum with a name.
pub(super) fn looks_like_header(h: &[u8]) -> bool {
    (&h[257..262] == b"ustar" && checksum_ok(h)) || (h[0] != 0 && checksum_ok(h))
}

/// An entry's data: exactly `left` bytes of the archive stream.
struct Take<'a, R: ByteRead + ?Sized> {
    inner: &'a mut R,
    left: u64,
    entry: &'a str,
}

impl<R: ByteRead + ?Sized> ByteRead for Take<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ArtifactError> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(ArtifactError::Truncated { entry: String::from(self.entry) });
        }
        self.left -= n as u64;
        Ok(n)
    }

    fn size_hint(&self) -> Option<u64> {
        Some(self.left)
    }
}

fn read_meta<R: ByteRead + ?Sized>(r: &mut R, size: u64, entry: &str) -> Result<Vec<u8>, ArtifactError> {
    if size > MAX_META {
        return Err(ArtifactError::Corrupt {
            entry: String::from(entry),
            reason: "oversized long-name or pax header",
        });
    }
    let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
    let mut v = alloc::vec![0u8; padded as usize];
    if read_full(r, &mut v)? != v.len() {
        return Err(ArtifactError::Truncated { entry: String::from(entry) });
    }
    v.truncate(size as usize);
    Ok(v)
}

/// pax records: `"<len> key=value\n"`.
fn pax_get(data: &[u8], key: &[u8]) -> Option<String> {
    let mut rest = data;
    let mut found = None;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&c| c == b' ')?;
        let len: usize = core::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&c| c == b'=') {
            if &rec[..eq] == key {
                found = Some(String::from_utf8_lossy(&rec[eq + 1..]).into_owned());
            }
        }
        rest = &rest[len..];
    }
    found
}

/// Reads the map that starts a PAX sparse entry of format 1.0 (decimal numbers, one per line:
/// the count of data regions, then each one's offset and size; padded to whole blocks) and
/// returns its length in bytes, whole blocks. The data regions follow it.
fn read_sparse_map<R: ByteRead + ?Sized>(r: &mut R, size: u64, entry: &str) -> Result<u64, ArtifactError> {
    let bad = |reason| ArtifactError::Corrupt { entry: String::from(entry), reason };
    let (mut numbers, mut wanted, mut value, mut digits) = (0u64, None::<u64>, 0u64, 0u32);
    let mut consumed = 0u64;
    let mut block = [0u8; BLOCK];
    while wanted.is_none_or(|w| numbers < w) {
        if consumed + BLOCK as u64 > size.min(MAX_SPARSE_MAP) {
            return Err(bad("its sparse map is longer than the entry or 1 MiB"));
        }
        if read_full(r, &mut block)? != BLOCK {
            return Err(ArtifactError::Truncated { entry: String::from(entry) });
        }
        consumed += BLOCK as u64;
        for &b in &block {
            if wanted.is_some_and(|w| numbers >= w) {
                break;
            }
            match b {
                b'0'..=b'9' => {
                    value = value
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(b - b'0')))
                        .ok_or(bad("a number of its sparse map overflows"))?;
                    digits += 1;
                }
                b'\n' if digits > 0 => {
                    if wanted.is_none() {
                        // The count, then an offset and a size per region.
                        wanted = value.checked_mul(2).and_then(|n| n.checked_add(1));
                        wanted.ok_or(bad("its sparse map counts too many regions"))?;
                    }
                    numbers += 1;
                    (value, digits) = (0, 0);
                }
                _ => return Err(bad("its sparse map is not decimal numbers, one per line")),
            }
        }
    }
    Ok(consumed)
}

fn skip<R: ByteRead + ?Sized>(r: &mut R, n: u64, entry: &str) -> Result<(), ArtifactError> {
    let mut t = Take { inner: r, left: n, entry };
    drain(&mut t)
}

pub(super) fn walk(
    w: &mut Walk<'_>,
    r: &mut dyn ByteRead,
    name: &str,
    depth: u32,
    prefix: &str,
) -> Result<(), ArtifactError> {
    let mut h = [0u8; BLOCK];
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    // The next entry is a PAX sparse file of format 1.0 (its data starts with the map).
    let mut sparse_map_first = false;
    let mut last = String::from(name);
    loop {
        let n = read_full(r, &mut h)?;
        if n == 0 {
            return Ok(()); // no end-of-archive blocks; accept a clean end at a header boundary
        }
        if n < BLOCK {
            return Err(ArtifactError::Truncated { entry: format!("{prefix}{last}") });
        }
        if h.iter().all(|&b| b == 0) {
            return Ok(());
        }
        if !checksum_ok(&h) {
            return Err(ArtifactError::Corrupt {
                entry: format!("{prefix}{last}"),
                reason: "tar header checksum mismatch (after this entry)",
            });
        }
        let ustar = &h[257..262] == b"ustar";
        let mut raw_name = String::from_utf8_lossy(field_str(&h[..100])).into_owned();
        if ustar && h[345] != 0 {
            let pre = String::from_utf8_lossy(field_str(&h[345..500]));
            raw_name = format!("{pre}/{raw_name}");
        }
        let Some(size) = parse_octal(&h[124..136]) else {
            return Err(ArtifactError::Corrupt {
                entry: format!("{prefix}{raw_name}"),
                reason: "bad size field",
            });
        };
        let mut link = String::from_utf8_lossy(field_str(&h[157..257])).into_owned();
        let typeflag = h[156];
        match typeflag {
            b'L' => {
                let v = read_meta(r, size, &raw_name)?;
                long_name = Some(String::from_utf8_lossy(field_str(&v)).into_owned());
                continue;
            }
            b'K' => {
                let v = read_meta(r, size, &raw_name)?;
                long_link = Some(String::from_utf8_lossy(field_str(&v)).into_owned());
                continue;
            }
            b'x' => {
                let v = read_meta(r, size, &raw_name)?;
                if let Some(p) = pax_get(&v, b"path") {
                    long_name = Some(p);
                }
                if let Some(p) = pax_get(&v, b"linkpath") {
                    long_link = Some(p);
                }
                // GNU tar's PAX sparse formats (0.1 and 1.0 name the entry
                // `GNUSparseFile.N/name` and give the real name here).
                if let Some(p) = pax_get(&v, b"GNU.sparse.name") {
                    long_name = Some(p);
                }
                sparse_map_first = pax_get(&v, b"GNU.sparse.major").is_some_and(|m| m == "1");
                continue;
            }
            b'g' => {
                read_meta(r, size, &raw_name)?;
                continue;
            }
            _ => {}
        }
        if let Some(n) = long_name.take() {
            raw_name = n;
        }
        if let Some(l) = long_link.take() {
            link = l;
        }
        let sparse_map = core::mem::take(&mut sparse_map_first);
        let display_raw = format!("{prefix}{raw_name}");
        w.count_entry(&display_raw)?;
        let path = normalize(&raw_name).map_err(|e| with_prefix(e, prefix))?;
        let display = format!("{prefix}{path}");
        last = path.clone();
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        match typeflag {
            // A sparse file (GNU's own format, or GNU's PAX formats: 0.0 and 0.1 store only
            // the data regions, 1.0 a map before them) is read as its data regions one after
            // another, the holes (zeros) left out: its line numbers are the file's, as a hole
            // holds no newline; a binary one's byte offsets count stored data.
            b'0' | 0 | b'7' => {
                let map = if sparse_map { read_sparse_map(r, size, &display)? } else { 0 };
                file_entry(w, r, size - map, &display, depth)?;
            }
            b'S' => {
                // The map's extension blocks (not in the size) come before the data.
                let mut extended = h[482] != 0;
                let mut blocks = 0u32;
                while extended {
                    blocks += 1;
                    if blocks > MAX_SPARSE_EXTENSIONS {
                        return Err(ArtifactError::Corrupt {
                            entry: display,
                            reason: "its sparse map has more than 4096 extension blocks",
                        });
                    }
                    let mut extension = [0u8; BLOCK];
                    if read_full(r, &mut extension)? != BLOCK {
                        return Err(ArtifactError::Truncated { entry: display });
                    }
                    extended = extension[504] != 0;
                }
                file_entry(w, r, size, &display, depth)?;
            }
            b'2' => {
                // A symlink is never followed. One that points outside the root (an absolute
                // link in a system's tree) is listed as skipped; the artifact is still scanned.
                if let Err(e) = check_link(&path, &link, true) {
                    w.skip(&display, &with_prefix(e, prefix));
                }
                skip(r, size, &display)?;
            }
            b'1' => {
                check_link(&path, &link, false).map_err(|e| with_prefix(e, prefix))?;
                skip(r, size, &display)?;
            }
            b'5' | b'3' | b'4' | b'6' => skip(r, size, &display)?,
            _ => skip(r, size, &display)?,
        }
        skip(r, padding, &display)?;
    }
}

/// A file's `size` bytes of data, read as the entry `display`.
fn file_entry(
    w: &mut Walk<'_>,
    r: &mut dyn ByteRead,
    size: u64,
    display: &str,
    depth: u32,
) -> Result<(), ArtifactError> {
    if size > w.limits().max_entry_size {
        return Err(ArtifactError::EntryTooLarge {
            entry: String::from(display),
            size,
            limit: w.limits().max_entry_size,
        });
    }
    let mut t = Take { inner: &mut *r, left: size, entry: display };
    w.entry(&mut t, display, depth)?;
    drain(&mut t)
}

pub(super) fn with_prefix(e: ArtifactError, prefix: &str) -> ArtifactError {
    if prefix.is_empty() {
        return e;
    }
    match e {
        ArtifactError::PathEscapesRoot { entry } => {
            ArtifactError::PathEscapesRoot { entry: format!("{prefix}{entry}") }
        }
        ArtifactError::AbsolutePath { entry } => {
            ArtifactError::AbsolutePath { entry: format!("{prefix}{entry}") }
        }
        ArtifactError::LinkEscapesRoot { entry, target } => {
            ArtifactError::LinkEscapesRoot { entry: format!("{prefix}{entry}"), target }
        }
        e => e,
    }
}
