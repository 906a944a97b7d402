//! Entry path rules: every entry must stay inside the archive root.

use alloc::string::String;
use alloc::vec::Vec;

use crate::error::ArtifactError;

/// Normalizes an entry path (`\` counts as `/`, `.` and empty components dropped, `..` resolved).
/// Refuses absolute paths and paths that climb above the root.
pub fn normalize(raw: &str) -> Result<String, ArtifactError> {
    let unified = raw.replace('\\', "/");
    let b = unified.as_bytes();
    if b.first() == Some(&b'/') || (b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic()) {
        return Err(ArtifactError::AbsolutePath { entry: String::from(raw) });
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in unified.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(ArtifactError::PathEscapesRoot { entry: String::from(raw) });
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Checks a link target. Symlink targets are relative to the link's directory; hardlink targets
/// (tar) are relative to the archive root.
pub fn check_link(entry: &str, target: &str, relative_to_entry_dir: bool) -> Result<(), ArtifactError> {
    let escape =
        || ArtifactError::LinkEscapesRoot { entry: String::from(entry), target: String::from(target) };
    let t = target.replace('\\', "/");
    let tb = t.as_bytes();
    if tb.first() == Some(&b'/') || (tb.len() >= 2 && tb[1] == b':' && tb[0].is_ascii_alphabetic()) {
        return Err(escape());
    }
    let base = if relative_to_entry_dir {
        match entry.rfind('/') {
            Some(i) => &entry[..i],
            None => "",
        }
    } else {
        ""
    };
    let mut parts: Vec<&str> = base.split('/').filter(|c| !c.is_empty()).collect();
    for c in t.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(escape());
                }
            }
            c => parts.push(c),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_refuses() {
        assert_eq!(normalize("./a//b/./c").unwrap(), "a/b/c");
        assert_eq!(normalize("a/../b").unwrap(), "b");
        assert!(matches!(normalize("a/../../b"), Err(ArtifactError::PathEscapesRoot { .. })));
        assert!(matches!(normalize("/etc/passwd"), Err(ArtifactError::AbsolutePath { .. })));
        assert!(matches!(normalize("C:\\x"), Err(ArtifactError::AbsolutePath { .. })));
        assert!(check_link("a/b/l", "../c", true).is_ok());
        assert!(check_link("a/l", "../../c", true).is_err());
        assert!(check_link("a/l", "/etc/shadow", true).is_err());
        assert!(check_link("a/l", "a/../../x", false).is_err());
    }
}
