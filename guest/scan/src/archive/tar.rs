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
        let display_raw = format!("{prefix}{raw_name}");
        w.count_entry(&display_raw)?;
        let path = normalize(&raw_name).map_err(|e| with_prefix(e, prefix))?;
        let display = format!("{prefix}{path}");
        last = path.clone();
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        match typeflag {
            b'0' | 0 | b'7' => {
                if size > w.limits().max_entry_size {
                    return Err(ArtifactError::EntryTooLarge {
                        entry: display,
                        size,
                        limit: w.limits().max_entry_size,
                    });
                }
                let mut t = Take { inner: &mut *r, left: size, entry: &display };
                w.entry(&mut t, &display, depth)?;
                drain(&mut t)?;
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
            b'S' => {
                w.skip(
                    &display,
                    &ArtifactError::Unsupported { entry: display.clone(), feature: "GNU sparse file" },
                );
                skip(r, size, &display)?;
            }
            _ => skip(r, size, &display)?,
        }
        skip(r, padding, &display)?;
    }
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
