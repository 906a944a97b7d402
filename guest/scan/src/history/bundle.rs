//! The git bundle format (v2 and v3): a signature line, v3 capabilities, prerequisite commits
//! (`-<oid> comment`: the history before them is not in the bundle), references
//! (`<oid> <refname>`), a blank line, then a pack.

use alloc::string::String;
use alloc::vec::Vec;

use super::objects::parse_hex_oid;
use super::pack::Oid;
use crate::error::HistoryProblem;

/// The signatures a bundle starts with.
pub(crate) const SIGNATURES: [&[u8]; 2] = [b"# v2 git bundle\n", b"# v3 git bundle\n"];

/// Whether `head` (the first bytes of a file) is a git bundle.
pub(crate) fn is_bundle(head: &[u8]) -> bool {
    SIGNATURES.iter().any(|s| head.starts_with(s))
}

/// A bundle's header.
#[derive(Debug, Default)]
pub(super) struct Header {
    /// Commits the bundle's history starts after (a `--since` or shallow bundle).
    pub prerequisites: Vec<Oid>,
    /// References: name and the object it points to.
    pub refs: Vec<(String, Oid)>,
    /// Where the pack starts.
    pub pack_offset: usize,
}

/// Parses a bundle's header.
pub(super) fn parse(bytes: &[u8]) -> Result<Header, HistoryProblem> {
    let Some(sig) = SIGNATURES.iter().find(|s| bytes.starts_with(s)) else {
        return Err(HistoryProblem::BadBundle("no `# v2 git bundle` or `# v3 git bundle` line"));
    };
    let mut header = Header::default();
    let mut pos = sig.len();
    loop {
        let Some(len) = memchr::memchr(b'\n', &bytes[pos..]) else {
            return Err(HistoryProblem::BadBundle("its header ends before the blank line that ends it"));
        };
        let line = &bytes[pos..pos + len];
        pos += len + 1;
        if line.is_empty() {
            break;
        }
        if let Some(capability) = line.strip_prefix(b"@") {
            let text = String::from_utf8_lossy(capability);
            if let Some(format) = text.strip_prefix("object-format=") {
                if format != "sha1" {
                    return Err(HistoryProblem::ObjectFormat(String::from(format)));
                }
            }
            // `@filter=` (a partial bundle) needs nothing: missing objects are reported.
            continue;
        }
        if let Some(rest) = line.strip_prefix(b"-") {
            let hex = rest.get(..40).ok_or(HistoryProblem::BadBundle("a prerequisite line is too short"))?;
            let oid = parse_hex_oid(hex).ok_or(HistoryProblem::BadBundle("a prerequisite is not a SHA-1"))?;
            header.prerequisites.push(oid);
            continue;
        }
        let hex = line.get(..40).ok_or(HistoryProblem::BadBundle("a reference line is too short"))?;
        let oid = parse_hex_oid(hex).ok_or(HistoryProblem::BadBundle("a reference is not a SHA-1"))?;
        let name = line.get(41..).filter(|_| line.get(40) == Some(&b' '));
        let name = name.ok_or(HistoryProblem::BadBundle("a reference line has no name"))?;
        header.refs.push((String::from_utf8_lossy(name).into_owned(), oid));
    }
    header.pack_offset = pos;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_refuse_sha256() {
        let text = b"# v3 git bundle\n@object-format=sha1\n-1111111111111111111111111111111111111111 old\n\
2222222222222222222222222222222222222222 refs/heads/main\n\nPACK";
        let h = parse(text).unwrap();
        assert_eq!(h.prerequisites, [[0x11; 20]]);
        assert_eq!(h.refs, [(String::from("refs/heads/main"), [0x22; 20])]);
        assert_eq!(&text[h.pack_offset..], b"PACK");
        let sha256 = b"# v3 git bundle\n@object-format=sha256\n\n";
        assert_eq!(parse(sha256).unwrap_err(), HistoryProblem::ObjectFormat(String::from("sha256")));
        assert!(matches!(parse(b"# v2 git bundle\nzz\n\n"), Err(HistoryProblem::BadBundle(_))));
        assert!(matches!(parse(b"# v2 git bundle\n"), Err(HistoryProblem::BadBundle(_))));
    }
}
