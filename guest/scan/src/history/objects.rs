//! Parsing commit, tree and tag objects: only what attributing a finding needs.

use alloc::string::String;
use alloc::vec::Vec;

use super::pack::Oid;

/// What a commit says about itself.
#[derive(Debug, Default)]
pub(super) struct CommitObject {
    pub tree: Oid,
    pub parents: Vec<Oid>,
    /// `Name <email>` of the author.
    pub author: String,
    /// Seconds since the epoch, and the author's UTC offset in minutes.
    pub author_time: i64,
    pub author_offset: i32,
    /// `Name <email>` of the committer.
    pub committer: String,
    /// Seconds since the epoch (orders commits of equal rank), and the committer's UTC offset.
    pub commit_time: i64,
    pub commit_offset: i32,
    /// The first line of the message.
    pub subject: String,
}

/// Longest subject kept (in characters).
const SUBJECT_MAX: usize = 200;

/// 40 hex digits as an object name.
pub(super) fn parse_hex_oid(hex: &[u8]) -> Option<Oid> {
    if hex.len() != 40 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 20];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// Splits `Name <email> 1700000000 +0100` into the identity, the time and the offset.
fn signature(line: &[u8]) -> Option<(String, i64, i32)> {
    let close = line.iter().rposition(|&b| b == b'>')?;
    let who = String::from_utf8_lossy(&line[..=close]).into_owned();
    let rest = core::str::from_utf8(&line[close + 1..]).ok()?.trim();
    let mut parts = rest.split_ascii_whitespace();
    let time = parts.next()?.parse::<i64>().ok()?;
    let tz = parts.next().unwrap_or("+0000");
    let (sign, digits) = match tz.as_bytes().first() {
        Some(b'-') => (-1, &tz[1..]),
        Some(b'+') => (1, &tz[1..]),
        _ => (1, tz),
    };
    let hhmm = digits.parse::<i32>().unwrap_or(0);
    Some((who, time, sign * ((hhmm / 100) * 60 + hhmm % 100)))
}

/// Parses a commit; `None` if it has no valid tree line.
pub(super) fn parse_commit(content: &[u8]) -> Option<CommitObject> {
    let mut commit = CommitObject::default();
    let mut has_tree = false;
    let mut rest = content;
    loop {
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or(&[]);
        if line.is_empty() {
            break;
        }
        if let Some(hex) = line.strip_prefix(b"tree ") {
            commit.tree = parse_hex_oid(hex)?;
            has_tree = true;
        } else if let Some(hex) = line.strip_prefix(b"parent ") {
            commit.parents.push(parse_hex_oid(hex)?);
        } else if let Some(sig) = line.strip_prefix(b"author ") {
            if let Some((who, time, offset)) = signature(sig) {
                (commit.author, commit.author_time, commit.author_offset) = (who, time, offset);
            }
        } else if let Some(sig) = line.strip_prefix(b"committer ") {
            if let Some((who, time, offset)) = signature(sig) {
                (commit.committer, commit.commit_time, commit.commit_offset) = (who, time, offset);
            }
        }
        if rest.is_empty() {
            break;
        }
    }
    let subject = rest.split(|&b| b == b'\n').find(|l| !l.iter().all(u8::is_ascii_whitespace)).unwrap_or(&[]);
    commit.subject = String::from_utf8_lossy(subject).chars().take(SUBJECT_MAX).collect();
    has_tree.then_some(commit)
}

/// What a tree entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EntryKind {
    Tree,
    /// A file (regular or executable).
    Blob,
    /// A symbolic link (its target is a blob, not scanned as a file).
    Link,
    /// A submodule's commit (not in this repository).
    Gitlink,
}

/// Calls `entry(kind, name, oid)` for each entry of a tree; `false` if it is malformed.
pub(super) fn parse_tree(content: &[u8], mut entry: impl FnMut(EntryKind, &[u8], &Oid)) -> bool {
    let mut rest = content;
    while !rest.is_empty() {
        let Some(space) = memchr::memchr(b' ', rest) else { return false };
        let mode = &rest[..space];
        let Some(nul) = memchr::memchr(0, &rest[space + 1..]) else { return false };
        let name = &rest[space + 1..space + 1 + nul];
        let Some(oid) = rest.get(space + 2 + nul..space + 22 + nul) else { return false };
        let mut id = [0u8; 20];
        id.copy_from_slice(oid);
        let kind = match mode {
            b"40000" | b"040000" => EntryKind::Tree,
            b"120000" => EntryKind::Link,
            b"160000" => EntryKind::Gitlink,
            _ => EntryKind::Blob,
        };
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return false;
        }
        entry(kind, name, &id);
        rest = &rest[space + 22 + nul..];
    }
    true
}

/// The object an annotated tag points to.
pub(super) fn parse_tag_target(content: &[u8]) -> Option<Oid> {
    let line = content.split(|&b| b == b'\n').next()?;
    parse_hex_oid(line.strip_prefix(b"object ")?)
}

/// `seconds` since the epoch at UTC offset `offset_minutes` as RFC 3339
/// (`2024-05-01T12:00:00+02:00`).
pub(super) fn rfc3339(seconds: i64, offset_minutes: i32) -> String {
    let local = seconds + i64::from(offset_minutes) * 60;
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let sign = if offset_minutes < 0 { '-' } else { '+' };
    let off = offset_minutes.unsigned_abs();
    alloc::format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        off / 60,
        off % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_in_the_authors_offset() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00+00:00");
        assert_eq!(rfc3339(1_700_000_000, 60), "2023-11-14T23:13:20+01:00");
        assert_eq!(rfc3339(951_782_400, -330), "2000-02-28T18:30:00-05:30");
    }

    #[test]
    fn commits_parse_with_parents_author_and_subject() {
        let text = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\
parent 1111111111111111111111111111111111111111\n\
parent 2222222222222222222222222222222222222222\n\
author Ada L <ada@example.org> 1700000000 +0100\n\
committer C <c@example.org> 1700000100 +0000\n\
\n\
Add the config\n\nbody\n";
        let c = parse_commit(text).unwrap();
        assert_eq!(c.parents.len(), 2);
        assert_eq!(c.author, "Ada L <ada@example.org>");
        assert_eq!((c.author_time, c.author_offset, c.commit_time), (1_700_000_000, 60, 1_700_000_100));
        assert_eq!((c.committer.as_str(), c.commit_offset), ("C <c@example.org>", 0));
        assert_eq!(c.subject, "Add the config");
        assert!(parse_commit(b"author x <y> 1 +0000\n\nno tree\n").is_none());
    }

    #[test]
    fn trees_refuse_names_that_leave_the_tree() {
        let mut t = Vec::new();
        t.extend_from_slice(b"100644 a.txt\0");
        t.extend_from_slice(&[7; 20]);
        t.extend_from_slice(b"40000 src\0");
        t.extend_from_slice(&[8; 20]);
        let mut seen = Vec::new();
        assert!(parse_tree(&t, |k, n, o| seen.push((k, n.to_vec(), o[0]))));
        assert_eq!(seen, [(EntryKind::Blob, b"a.txt".to_vec(), 7), (EntryKind::Tree, b"src".to_vec(), 8)]);
        let mut bad = Vec::new();
        bad.extend_from_slice(b"40000 ..\0");
        bad.extend_from_slice(&[8; 20]);
        assert!(!parse_tree(&bad, |_, _, _| {}));
        assert!(!parse_tree(b"100644 cut\0abc", |_, _, _| {}));
    }
}
