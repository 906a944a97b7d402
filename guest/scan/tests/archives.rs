//! Artifact formats: what is read, and every hostile case refused with its own error naming the
//! entry.

mod common;

use cella_scan::{ArtifactError, Limits};
use common::*;

fn secret_file() -> Vec<u8> {
    format!("line one\nkey = {SECRET}\n").into_bytes()
}

#[test]
fn scans_plain_file() {
    let r = scan(&secret_file(), "notes.txt").unwrap();
    assert_eq!(triples(&r), ["notes.txt:2:test-token"]);
    assert_eq!(r.findings[0].column, 7);
}

#[test]
fn scans_tar_entries_by_their_paths() {
    let data = secret_file();
    let t = tar(&[
        TarEntry { name: "dir/", kind: b'5', link: "", data: b"" },
        file("dir/a.txt", &data),
        file("./b.txt", b"// SPDX-License-Identifier: MIT\n"),
        TarEntry { name: "dir/inside", kind: b'2', link: "../b.txt", data: b"" },
    ]);
    let r = scan(&t, "artifact.tar").unwrap();
    assert_eq!(triples(&r), ["dir/a.txt:2:test-token", "b.txt:1:spdx"]);
    assert_eq!(r.files_scanned, 2);
}

#[test]
fn scans_tar_gz() {
    let t = tar(&[file("src/a.txt", &secret_file())]);
    let r = scan(&gzip(&t), "artifact.tar.gz").unwrap();
    assert_eq!(triples(&r), ["src/a.txt:2:test-token"]);
}

#[test]
fn scans_gzipped_plain_file_under_its_inner_name() {
    let r = scan(&gzip(&secret_file()), "notes.txt.gz").unwrap();
    assert_eq!(triples(&r), ["notes.txt:2:test-token"]);
}

#[test]
fn scans_zip_stored_and_deflated() {
    let data = secret_file();
    let z = zip(&[zfile("a.txt", &data, false), zfile("sub/b.txt", &data, true), zfile("sub/", b"", false)]);
    let r = scan(&z, "artifact.zip").unwrap();
    assert_eq!(triples(&r), ["a.txt:2:test-token", "sub/b.txt:2:test-token"]);
}

#[test]
fn scans_archives_nested_within_the_depth_limit() {
    let data = secret_file();
    let inner_zip = zip(&[zfile("deep.txt", &data, true)]);
    let inner_tgz = gzip(&tar(&[file("x.txt", &data)]));
    let outer = tar(&[file("lib/inner.zip", &inner_zip), file("lib/inner.tgz", &inner_tgz)]);
    let r = scan(&outer, "artifact.tar").unwrap();
    assert_eq!(triples(&r), ["lib/inner.zip!/deep.txt:2:test-token", "lib/inner.tgz!/x.txt:2:test-token"]);
}

#[test]
fn binary_files_are_scanned_by_their_strings_with_secret_rules_only() {
    // A secret and a valid card number in a binary file: the secret rule runs, PII does not.
    let mut bin = b"\x7fELF\0\0\0".to_vec();
    bin.extend_from_slice(SECRET.as_bytes());
    bin.extend_from_slice(b"\0card 4111 1111 1111 1111\0");
    let t = tar(&[file("bin/tool", &bin), file("a.txt", &secret_file())]);
    let r = scan(&t, "a.tar").unwrap();
    assert_eq!(triples(&r), ["bin/tool:1:test-token", "a.txt:2:test-token"]);
    assert_eq!((r.files_scanned, r.files_binary), (2, 1));
    let found = &r.findings[0];
    assert_eq!(found.bytes, Some(cella_scan::ByteRange { offset: 7, length: SECRET.len() as u64 }));
    assert_eq!((found.column, found.end_line, found.end_column), (8, 1, 8 + SECRET.len() as u64));
    assert_eq!(r.findings[1].bytes, None);
}

#[test]
fn rejects_tar_entry_outside_root() {
    let t = tar(&[file("../etc/passwd", b"x")]);
    assert_eq!(
        scan(&t, "a.tar").unwrap_err(),
        ArtifactError::PathEscapesRoot { entry: "../etc/passwd".into() }
    );
    assert_eq!(
        scan(&t, "a.tar").unwrap_err().to_string(),
        "artifact entry `../etc/passwd` escapes the archive root"
    );
}

#[test]
fn rejects_tar_entry_climbing_out_after_descending() {
    let t = tar(&[file("a/b/../../../x", b"x")]);
    assert!(
        matches!(scan(&t, "a.tar"), Err(ArtifactError::PathEscapesRoot { entry }) if entry == "a/b/../../../x")
    );
}

#[test]
fn rejects_absolute_tar_entry() {
    let t = tar(&[file("/etc/shadow", b"x")]);
    assert_eq!(scan(&t, "a.tar").unwrap_err(), ArtifactError::AbsolutePath { entry: "/etc/shadow".into() });
}

#[test]
fn rejects_zip_entry_outside_root() {
    let z = zip(&[zfile("..\\..\\evil.txt", b"x", false)]);
    assert_eq!(
        scan(&z, "a.zip").unwrap_err(),
        ArtifactError::PathEscapesRoot { entry: "..\\..\\evil.txt".into() }
    );
}

#[test]
fn rejects_gzip_bomb_by_ratio() {
    let zeros = vec![0u8; 16 << 20];
    let err = scan(&gzip(&zeros), "bomb.gz").unwrap_err();
    assert!(
        matches!(&err, ArtifactError::DecompressionRatio { entry, limit: 200, .. } if entry == "bomb.gz"),
        "{err}"
    );
}

#[test]
fn rejects_zip_bomb_by_declared_ratio() {
    let zeros = vec![0u8; 8 << 20];
    let z = zip(&[zfile("zeros.txt", &zeros, true)]);
    let err = scan(&z, "a.zip").unwrap_err();
    assert!(matches!(&err, ArtifactError::DecompressionRatio { entry, .. } if entry == "zeros.txt"), "{err}");
}

#[test]
fn rejects_zip_entry_inflating_past_its_declared_size() {
    let data = vec![b'a'; 4096];
    let z = zip(&[ZipEntry {
        name: "liar.txt",
        data: &data,
        deflate: true,
        symlink: false,
        declared_size: Some(100),
    }]);
    assert_eq!(
        scan(&z, "a.zip").unwrap_err(),
        ArtifactError::Corrupt {
            entry: "liar.txt".into(),
            reason: "inflates to more than its declared size"
        }
    );
}

#[test]
fn rejects_decompressed_total_over_cap() {
    let text: Vec<u8> = (0..3u32 << 20).map(|i| b"abcdefghij\n"[(i % 11) as usize]).collect();
    let limits = Limits { max_decompressed: 1 << 20, max_ratio: 1_000_000, ..Limits::default() };
    let err = scan_with(&gzip(&text), "big.txt.gz", &limits).unwrap_err();
    assert_eq!(err, ArtifactError::DecompressedTotal { entry: "big.txt.gz".into(), limit: 1 << 20 });
}

#[test]
fn rejects_too_many_entries() {
    let t = tar(&[file("1", b"a"), file("2", b"b"), file("3", b"c"), file("4", b"d")]);
    let limits = Limits { max_entries: 3, ..Limits::default() };
    assert_eq!(
        scan_with(&t, "a.tar", &limits).unwrap_err(),
        ArtifactError::TooManyEntries { entry: "4".into(), limit: 3 }
    );
}

#[test]
fn rejects_entry_over_size_cap() {
    let t = tar(&[file("big.txt", &[b'x'; 2048])]);
    let limits = Limits { max_entry_size: 1024, ..Limits::default() };
    assert_eq!(
        scan_with(&t, "a.tar", &limits).unwrap_err(),
        ArtifactError::EntryTooLarge { entry: "big.txt".into(), size: 2048, limit: 1024 }
    );
}

#[test]
fn rejects_nesting_too_deep() {
    let mut blob = tar(&[file("leaf.txt", b"hello\n")]);
    for i in 0..4 {
        blob = tar(&[file(&format!("level{i}.tar"), &blob)]);
    }
    let limits = Limits { max_depth: 3, ..Limits::default() };
    let err = scan_with(&blob, "a.tar", &limits).unwrap_err();
    assert_eq!(
        err,
        ArtifactError::NestingTooDeep { entry: "level3.tar!/level2.tar!/level1.tar".into(), limit: 3 }
    );
}

#[test]
fn rejects_truncated_tar() {
    let t = tar(&[file("a.txt", &[b'x'; 5000])]);
    let err = scan(&t[..3000], "a.tar").unwrap_err();
    assert_eq!(err, ArtifactError::Truncated { entry: "a.txt".into() });
}

#[test]
fn rejects_tar_header_with_bad_checksum() {
    let mut t = tar(&[file("a.txt", b"hello\n"), file("b.txt", b"world\n")]);
    t[1024] ^= 0x20; // second header's name
    let err = scan(&t, "a.tar").unwrap_err();
    assert!(matches!(&err, ArtifactError::Corrupt { entry, .. } if entry == "a.txt"), "{err}");
}

#[test]
fn rejects_truncated_zip() {
    let z = zip(&[zfile("a.txt", &secret_file(), true)]);
    let err = scan(&z[..z.len() - 30], "a.zip").unwrap_err();
    assert_eq!(err, ArtifactError::Truncated { entry: "a.zip".into() });
}

#[test]
fn rejects_zip_entry_with_bad_crc() {
    let mut z = zip(&[zfile("a.txt", b"hello world\n", false)]);
    z[30 + 5 + 1] ^= 1; // a byte of the stored data
    assert_eq!(
        scan(&z, "a.zip").unwrap_err(),
        ArtifactError::Corrupt { entry: "a.txt".into(), reason: "CRC-32 mismatch" }
    );
}

#[test]
fn rejects_truncated_gzip() {
    let g = gzip(&secret_file().repeat(100));
    let err = scan(&g[..g.len() / 2], "a.txt.gz").unwrap_err();
    assert_eq!(err, ArtifactError::Truncated { entry: "a.txt.gz".into() });
}

#[test]
fn rejects_gzip_with_bad_crc() {
    let mut g = gzip(&secret_file());
    let n = g.len();
    g[n - 8] ^= 1;
    assert_eq!(
        scan(&g, "a.txt.gz").unwrap_err(),
        ArtifactError::Corrupt { entry: "a.txt.gz".into(), reason: "gzip CRC-32 mismatch" }
    );
}

/// One pax record, `"<len> key=value\n"`, where `<len>` counts itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut total = body.len() + 1;
    while body.len() + total.to_string().len() != total {
        total = body.len() + total.to_string().len();
    }
    format!("{total}{body}").into_bytes()
}

#[test]
fn pax_path_overrides_the_header_name() {
    let rec = pax_record("path", "very/long/dir/name.txt");
    let t = tar(&[
        TarEntry { name: "PaxHeader", kind: b'x', link: "", data: &rec },
        file("short", &secret_file()),
    ]);
    let r = scan(&t, "a.tar").unwrap();
    assert_eq!(triples(&r), ["very/long/dir/name.txt:2:test-token"]);
}

#[test]
fn rejects_pax_path_outside_root() {
    let rec = pax_record("path", "../../outside.txt");
    let t =
        tar(&[TarEntry { name: "PaxHeader", kind: b'x', link: "", data: &rec }, file("innocent.txt", b"x")]);
    assert_eq!(
        scan(&t, "a.tar").unwrap_err(),
        ArtifactError::PathEscapesRoot { entry: "../../outside.txt".into() }
    );
}

#[test]
fn rejects_gnu_long_name_outside_root() {
    let t = tar(&[
        TarEntry { name: "././@LongLink", kind: b'L', link: "", data: b"../../long/escape.txt\0" },
        file("x", b"x"),
    ]);
    assert_eq!(
        scan(&t, "a.tar").unwrap_err(),
        ArtifactError::PathEscapesRoot { entry: "../../long/escape.txt".into() }
    );
}

#[test]
fn zip64_records_that_lie_are_refused_by_name() {
    let z = zip(&[zfile("a.txt", &secret_file(), false)]);
    let eocd = z.len() - 22;
    let corrupt = |data: &[u8]| match scan(data, "a.zip").unwrap_err() {
        ArtifactError::Corrupt { reason, .. } => reason,
        e => panic!("{e}"),
    };
    // The end record says "see zip64" but no locator precedes it.
    let mut no_locator = z.clone();
    no_locator[eocd + 10..eocd + 12].copy_from_slice(&[0xff, 0xff]);
    assert_eq!(corrupt(&no_locator), "zip64 end of central directory locator missing");
    // A locator pointing past itself.
    let mut far = z[..eocd].to_vec();
    far.extend_from_slice(b"PK\x06\x07");
    far.extend_from_slice(&0u32.to_le_bytes());
    far.extend_from_slice(&(u64::MAX - 10).to_le_bytes());
    far.extend_from_slice(&1u32.to_le_bytes());
    far.extend_from_slice(&z[eocd..]);
    let at = far.len() - 22;
    far[at + 16..at + 20].copy_from_slice(&[0xff; 4]);
    assert_eq!(corrupt(&far), "zip64 end of central directory record out of place");
    // An entry whose sizes say "see zip64" without a zip64 extra field.
    let mut no_extra = z.clone();
    let cd = no_extra.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    no_extra[cd + 24..cd + 28].copy_from_slice(&[0xff; 4]);
    assert_eq!(corrupt(&no_extra), "zip64 sizes announced but no zip64 extra field");
}

#[test]
fn a_gnu_sparse_entry_is_read_as_its_stored_data() {
    // A map of one region in the header (no extension block): the data is the region.
    let t = tar(&[
        TarEntry { name: "disk.img", kind: b'S', link: "", data: &secret_file() },
        file("after.txt", &secret_file()),
    ]);
    let r = scan(&t, "a.tar").unwrap();
    assert_eq!(triples(&r), ["disk.img:2:test-token", "after.txt:2:test-token"]);
    assert_eq!(r.entries_skipped, 0);
}
