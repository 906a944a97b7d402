//! zstd streams (image layers, `.tar.zst` artifacts): made by the real `zstd` at several levels,
//! in several frames, behind a skippable frame; and hostile ones (cut short, damaged, a window
//! or a dictionary this reader refuses, a bomb), each refused or skipped by name.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use cella_scan::{ArtifactError, Limits};
use common::*;

/// `data` compressed by the `zstd` command with `args` (input on stdin unless `sized`, when it
/// is a file, so the frame records its size).
fn zstd_cli(data: &[u8], args: &[&str], sized: bool) -> Vec<u8> {
    let mut cmd = Command::new("zstd");
    cmd.args(args).arg("-q").arg("-c");
    let dir = std::env::temp_dir().join(format!("cella-zstd-{}-{}", std::process::id(), args.join("")));
    let file = dir.join("in");
    if sized {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&file, data).unwrap();
        cmd.arg(&file);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the zstd command (apt-get install zstd; scripts/setup.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    if !sized {
        stdin.write_all(data).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "zstd {args:?} failed");
    out.stdout
}

/// A tar of the secret behind ~3 MB of text that compresses about as well as source code.
fn layer() -> Vec<u8> {
    let mut filler = String::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..60_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        filler.push_str(&format!("let value_{i} = compute({:x}, {});\n", x & 0xffff_ffff, i % 97));
    }
    tar(&[
        file("usr/share/filler.rs", filler.as_bytes()),
        file("etc/app/secret.env", format!("TOKEN={SECRET}\n").as_bytes()),
    ])
}

#[test]
fn streams_of_the_real_zstd_are_read_at_every_level() {
    let layer = layer();
    // `--ultra -22` of a stream of unknown size asks for a 128 MiB window (refused below); of a
    // file, a window the file's size.
    let cases =
        [(&["-1"][..], true), (&["-19"], true), (&["-3", "--long=24"], true), (&["--ultra", "-22"], false)];
    for (args, unsized_too) in cases {
        for sized in [true, false].into_iter().filter(|s| *s || unsized_too) {
            let z = zstd_cli(&layer, args, sized);
            assert!(z.len() < layer.len() / 2, "{args:?} compressed");
            let report = scan(&z, "rootfs.tar.zst").unwrap_or_else(|e| panic!("{args:?} sized={sized}: {e}"));
            assert_eq!(triples(&report), ["etc/app/secret.env:1:test-token"], "{args:?} sized={sized}");
            assert!(report.skipped.is_empty());
        }
    }
}

#[test]
fn every_frame_is_read_and_skippable_frames_are_skipped() {
    let layer = layer();
    let (front, back) = layer.split_at(layer.len() / 3);
    let mut stream = vec![0x5a, 0x2a, 0x4d, 0x18, 5, 0, 0, 0];
    stream.extend(b"hello");
    stream.extend(zstd_cli(front, &["-3"], false));
    stream.extend(zstd_stored(&back[..1000]));
    stream.extend(zstd_cli(&back[1000..], &["-9"], true));
    let report = scan(&stream, "layer.tzst").expect("read");
    assert_eq!(triples(&report), ["etc/app/secret.env:1:test-token"]);
    // Bytes after the last frame that are not a frame: damage.
    let mut tail = zstd_cli(&layer, &["-3"], false);
    tail.extend(b"junk");
    assert!(matches!(scan(&tail, "x.tar.zst"), Err(ArtifactError::Corrupt { .. })));
}

#[test]
fn a_cut_or_damaged_stream_is_refused_and_inside_an_archive_skipped_by_name() {
    let z = zstd_cli(&layer(), &["-3"], false);
    for cut in [5, 9, z.len() / 2, z.len() - 3] {
        match scan(&z[..cut], "x.tar.zst") {
            Err(ArtifactError::Truncated { entry }) => assert_eq!(entry, "x.tar.zst"),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    // A block of the reserved type.
    let mut bad = zstd_stored(b"abc");
    bad[9] |= 0b110;
    assert!(matches!(scan(&bad, "x.zst"), Err(ArtifactError::Corrupt { .. })), "{:?}", scan(&bad, "x.zst"));
    // The reserved bit of the frame header.
    let mut reserved = zstd_stored(b"abc");
    reserved[4] |= 0x08;
    match scan(&reserved, "x.zst") {
        Err(ArtifactError::Corrupt { reason, .. }) => assert!(reason.contains("reserved"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Inside a tar, the damaged layer is skipped and named; the rest is scanned.
    let outer = tar(&[
        file("blobs/sha256/aaaa", &z[..z.len() / 2]),
        file("notes.txt", format!("x {SECRET}\n").as_bytes()),
    ]);
    let report = scan(&outer, "image.tar").expect("the image is scanned");
    assert_eq!(triples(&report), ["notes.txt:1:test-token"]);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].path, "blobs/sha256/aaaa");
    assert!(report.skipped[0].reason.contains("truncated"), "{}", report.skipped[0].reason);
}

#[test]
fn a_window_over_32_mib_or_a_dictionary_is_refused_by_name() {
    // --long=27 on a stream of unknown size asks for a 128 MiB window.
    let z = zstd_cli(&layer(), &["-3", "--long=27"], false);
    match scan(&z, "big.zst") {
        Err(ArtifactError::Unsupported { feature, .. }) => assert!(feature.contains("window"), "{feature}"),
        other => panic!("{other:?}"),
    }
    // A frame naming dictionary 7 (descriptor: 1-byte dictionary id, window descriptor 0).
    let with_dictionary = [0x28, 0xb5, 0x2f, 0xfd, 0x01, 0x00, 0x07, 0x01, 0x00, 0x00];
    match scan(&with_dictionary, "dict.zst") {
        Err(ArtifactError::Unsupported { feature, .. }) => {
            assert!(feature.contains("dictionary"), "{feature}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_zstd_bomb_stops_at_the_ratio_and_the_artifacts_total() {
    let zeros = vec![0u8; 64 << 20];
    let bomb = zstd_cli(&zeros, &["-19"], false);
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    match scan(&bomb, "zeros.zst") {
        Err(ArtifactError::DecompressionRatio { entry, limit, .. }) => {
            assert_eq!((entry.as_str(), limit), ("zeros.zst", 200))
        }
        other => panic!("{other:?}"),
    }
    let limits = Limits { max_ratio: u64::MAX, max_decompressed: 8 << 20, ..Limits::default() };
    match scan_with(&bomb, "zeros.zst", &limits) {
        Err(ArtifactError::DecompressedTotal { limit, .. }) => assert_eq!(limit, 8 << 20),
        other => panic!("{other:?}"),
    }
}

#[test]
fn zstd_inside_zstd_may_not_hold_more_than_48_mib_of_windows() {
    // Each stream of unknown size with --long=25 asks for a 32 MiB window.
    let inner =
        zstd_cli(&tar(&[file("deep/secret.env", format!("T={SECRET}\n").as_bytes())]), &["--long=25"], false);
    let middle = tar(&[file("inner.tar.zst", &inner), file("notes.txt", format!("x {SECRET}\n").as_bytes())]);
    let outer = zstd_cli(&middle, &["--long=25"], false);
    let report = scan(&outer, "image.tar.zst").expect("the outer stream is read");
    assert_eq!(triples(&report), ["notes.txt:1:test-token"]);
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    assert!(report.skipped[0].reason.contains("48 MiB"), "{}", report.skipped[0].reason);
    // With a smaller outer window both are read, and each stream's window is given back when
    // it ends: many such layers in one tar are fine.
    let outer = zstd_cli(&middle, &["-3"], false);
    let report = scan(&outer, "image.tar.zst").expect("read");
    assert_eq!(triples(&report), ["inner.tar.zst!/deep/secret.env:1:test-token", "notes.txt:1:test-token"]);
    let many = tar(&(0..4).map(|_| file("layer.tar.zst", &inner)).collect::<Vec<_>>());
    assert_eq!(scan(&many, "image.tar").expect("read").findings.len(), 4);
}
