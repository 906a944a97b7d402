//! One entry Cella cannot read never fails the scan of everything around it: it is skipped and
//! listed with the reason. What a hostile archive does, and damage to the archive being read
//! itself, is still refused.

mod common;

use cella_scan::{ArtifactError, Report, SkippedEntry, MAX_SKIPPED_LISTED};
use common::*;

fn secret_file() -> Vec<u8> {
    format!("line one\nkey = {SECRET}\n").into_bytes()
}

fn skipped(r: &Report) -> Vec<(String, String)> {
    r.skipped.iter().map(|s| (s.path.clone(), s.reason.clone())).collect()
}

/// `zip` with the `n`-th central directory record's field at `offset` set to `value` (u16).
fn patch_central(mut z: Vec<u8>, n: usize, offset: usize, value: u16) -> Vec<u8> {
    let at = z.windows(4).enumerate().filter(|(_, w)| *w == b"PK\x01\x02").nth(n).unwrap().0;
    z[at + offset..at + offset + 2].copy_from_slice(&value.to_le_bytes());
    z
}

#[test]
fn a_damaged_nested_archive_is_skipped_and_the_rest_is_scanned() {
    let good = zip(&[zfile("doc.txt", &secret_file(), true)]);
    let cut = &good[..good.len() - 30]; // no end of central directory
    let inner_gz = gzip(&secret_file().repeat(200));
    let t = tar(&[
        file("lib/broken.odt", cut),
        file("lib/half.txt.gz", &inner_gz[..inner_gz.len() / 2]),
        file("lib/after.txt", &secret_file()),
    ]);
    let r = scan(&t, "site.tar").unwrap();
    assert_eq!(triples(&r), ["lib/after.txt:2:test-token"]);
    assert_eq!(
        skipped(&r),
        [
            ("lib/broken.odt".into(), "artifact entry `lib/broken.odt` is truncated".into()),
            ("lib/half.txt.gz".into(), "artifact entry `lib/half.txt.gz` is truncated".into()),
        ]
    );
    assert_eq!(r.entries_skipped, 2);
    assert_eq!(r.files_scanned, 1);
}

#[test]
fn what_a_nested_archive_yielded_before_its_damage_is_kept() {
    let mut inner =
        zip(&[zfile("first.txt", &secret_file(), false), zfile("second.txt", b"hello world\n", false)]);
    let second = inner.windows(11).position(|w| w == b"hello world").unwrap();
    inner[second] ^= 1; // CRC-32 mismatch in the second entry
    let t = tar(&[file("pkg/app.jar", &inner), file("pkg/z.txt", b"ok\n")]);
    let r = scan(&t, "a.tar").unwrap();
    assert_eq!(triples(&r), ["pkg/app.jar!/first.txt:2:test-token"]);
    assert_eq!(
        skipped(&r),
        [(
            "pkg/app.jar".into(),
            "artifact entry `pkg/app.jar!/second.txt` is corrupt: CRC-32 mismatch".into()
        )]
    );
    assert_eq!(r.files_scanned, 3, "first.txt, second.txt as far as it went, z.txt");
}

#[test]
fn encrypted_and_unsupported_zip_entries_are_listed_not_fatal() {
    let z = zip(&[
        zfile("locked.txt", &secret_file(), false),
        zfile("bz2.txt", &secret_file(), false),
        zfile("open.txt", &secret_file(), true),
    ]);
    let z = patch_central(z, 0, 8, 1); // flags: encrypted
    let z = patch_central(z, 1, 10, 12); // method: bzip2
    for (data, name, prefix) in
        [(z.clone(), "a.zip", ""), (tar(&[file("in/a.zip", &z)]), "a.tar", "in/a.zip!/")]
    {
        let r = scan(&data, name).unwrap();
        assert_eq!(triples(&r), [format!("{prefix}open.txt:2:test-token")]);
        let reasons = skipped(&r);
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert_eq!(reasons[0].0, format!("{prefix}locked.txt"));
        assert!(reasons[0].1.contains("encrypted zip entry"), "{reasons:?}");
        assert_eq!(reasons[1].0, format!("{prefix}bz2.txt"));
        assert!(reasons[1].1.contains("zip compression method"), "{reasons:?}");
    }
}

#[test]
fn hostile_nested_archives_and_damage_to_the_archive_itself_are_still_refused() {
    // A path out of the root inside a nested zip.
    let escaping = zip(&[zfile("../../etc/passwd", b"x\n", false)]);
    let err = scan(&tar(&[file("a/evil.zip", &escaping)]), "a.tar").unwrap_err();
    assert!(matches!(err, ArtifactError::PathEscapesRoot { .. }), "{err}");
    // A nested gzip bomb.
    let bomb = gzip(&vec![0u8; 8 << 20]);
    let err = scan(&tar(&[file("a/bomb.gz", &bomb)]), "a.tar").unwrap_err();
    assert!(matches!(err, ArtifactError::DecompressionRatio { .. }), "{err}");
    // The outer tar cut inside a nested zip: the tar's own bytes are missing.
    let inner = zip(&[zfile("doc.txt", &secret_file().repeat(50), false)]);
    let t = tar(&[file("a/inner.zip", &inner)]);
    let err = scan(&t[..512 + inner.len() / 2], "a.tar").unwrap_err();
    assert_eq!(err, ArtifactError::Truncated { entry: "a/inner.zip".into() });
    // A top-level archive that is damaged is the artifact itself: refused.
    let good = zip(&[zfile("doc.txt", &secret_file(), true)]);
    assert!(scan(&good[..good.len() - 30], "a.zip").is_err());
}

#[test]
fn skipped_entries_are_all_counted_and_the_first_listed() {
    let mut r = Report::default();
    for i in 0..MAX_SKIPPED_LISTED + 5 {
        r.skip(&format!("e{i}"), "why".into());
    }
    assert_eq!(r.entries_skipped, (MAX_SKIPPED_LISTED + 5) as u64);
    assert_eq!(r.skipped.len(), MAX_SKIPPED_LISTED);
    assert_eq!(r.skipped[0], SkippedEntry { path: "e0".into(), reason: "why".into() });
}

#[test]
fn a_symlink_pointing_outside_the_root_is_listed_never_followed_and_the_rest_scanned() {
    let t = tar(&[
        TarEntry { name: "a/link", kind: b'2', link: "../../etc/passwd", data: b"" },
        TarEntry { name: "sitecustomize.py", kind: b'2', link: "/etc/python3/sitecustomize.py", data: b"" },
        TarEntry { name: "a/inside", kind: b'2', link: "../after.txt", data: b"" },
        file("after.txt", &secret_file()),
    ]);
    let r = scan(&t, "tree.tar").unwrap();
    assert_eq!(triples(&r), ["after.txt:2:test-token"]);
    assert_eq!(
        skipped(&r),
        [
            (
                "a/link".into(),
                "artifact entry `a/link` is a link to `../../etc/passwd`, outside the archive root".into()
            ),
            (
                "sitecustomize.py".into(),
                "artifact entry `sitecustomize.py` is a link to `/etc/python3/sitecustomize.py`, outside the archive root"
                    .into()
            ),
        ]
    );
    assert_eq!((r.files_scanned, r.entries_skipped), (1, 2));
}

#[test]
fn a_zip_symlink_pointing_outside_the_root_is_listed_and_the_rest_scanned() {
    let link =
        ZipEntry { name: "l", data: b"../../root/.ssh", deflate: false, symlink: true, declared_size: None };
    let z = zip(&[link, zfile("after.txt", &secret_file(), true)]);
    let r = scan(&z, "a.zip").unwrap();
    assert_eq!(triples(&r), ["after.txt:2:test-token"]);
    assert_eq!(
        skipped(&r),
        [("l".into(), "artifact entry `l` is a link to `../../root/.ssh`, outside the archive root".into())]
    );
}

#[test]
fn a_hardlink_pointing_outside_the_root_still_refuses_the_archive() {
    // A tar hardlink names an earlier entry of the same archive: one outside it is not a tree
    // any tar wrote.
    let t = tar(&[TarEntry { name: "a/hard", kind: b'1', link: "../x", data: b"" }]);
    assert_eq!(
        scan(&t, "a.tar").unwrap_err(),
        ArtifactError::LinkEscapesRoot { entry: "a/hard".into(), target: "../x".into() }
    );
}
