//! Sparse files as GNU tar writes them: its own format (`--format=gnu`, with the map's
//! extension blocks when a file has more than four data regions) and its three PAX formats
//! (`--format=posix --sparse-version=0.0|0.1|1.0`). Each is read as its data regions one after
//! another, the holes left out: the finding's line is the file's line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// A block of text lines, `BLOCK` bytes long, numbered from `first`.
fn text_block(first: usize, secret_at: Option<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut n = first;
    while out.len() < BLOCK {
        let line = match secret_at == Some(n) {
            true => format!("key = {SECRET}\n"),
            false => format!("line {n:05} of the sparse file, some text to fill it\n"),
        };
        out.extend_from_slice(line.as_bytes());
        n += 1;
    }
    out.truncate(BLOCK - 1);
    out.push(b'\n');
    out
}

/// The filesystem's block: GNU tar finds data regions at this granularity.
const BLOCK: usize = 4096;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sparse file `disk.img` of 8 MiB: `regions` text blocks, each 1 MiB after the one before,
/// the secret on the first line of the last; and the line that is on (counting holes' zeros
/// as part of the next line, as a reader of the file would).
fn sparse_file(dir: &Path, regions: usize) -> usize {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::File::create(dir.join("disk.img")).unwrap();
    file.set_len(8 << 20).unwrap();
    let mut line = 1;
    let mut secret_line = 0;
    for region in 0..regions {
        let last = region + 1 == regions;
        if last {
            secret_line = line;
        }
        let block = text_block(line, last.then_some(line));
        line += block.iter().filter(|&&b| b == b'\n').count();
        file.seek(SeekFrom::Start((region as u64) << 20)).unwrap();
        file.write_all(&block).unwrap();
    }
    secret_line
}

/// `tar ARGS -cf - disk.img` in `dir`, or `None` (said on stderr) without GNU tar or a
/// filesystem that keeps holes.
fn gnu_tar(dir: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let out = match Command::new("tar")
        .args(args)
        .args(["-S", "-cf", "-", "disk.img"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: cannot run GNU tar: {e}");
            return None;
        }
    };
    assert!(out.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(out.stdout)
}

fn scratch(name: &str, regions: usize) -> (Scratch, usize) {
    let dir = std::env::temp_dir().join(format!("cella-sparse-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let line = sparse_file(&dir, regions);
    (Scratch(dir), line)
}

/// Whether the file in `dir` really has holes (a filesystem may fill them in).
fn has_holes(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.join("disk.img")).unwrap();
    let sparse = meta.blocks() * 512 < meta.len();
    if !sparse {
        eprintln!("skipped: {} does not keep holes in files", dir.display());
    }
    sparse
}

fn assert_read_whole(tar: &[u8], secret_line: usize, how: &str) {
    let r = scan(tar, "sparse.tar").unwrap_or_else(|e| panic!("{how}: {e}"));
    assert_eq!(triples(&r), [format!("disk.img:{secret_line}:test-token")], "{how}");
    assert_eq!((r.files_scanned, r.entries_skipped), (1, 0), "{how}");
}

#[test]
fn gnu_sparse_files_are_read_as_their_data_regions_in_every_format() {
    let (dir, line) = scratch("formats", 3);
    if !has_holes(&dir.0) {
        return;
    }
    for args in [
        &["--format=gnu"][..],
        &["--format=posix", "--sparse-version=0.0"],
        &["--format=posix", "--sparse-version=0.1"],
        &["--format=posix", "--sparse-version=1.0"],
    ] {
        let Some(tar) = gnu_tar(&dir.0, args) else { return };
        // Only the data regions are stored: far less than the file's 8 MiB.
        assert!(tar.len() < 64 << 10, "{args:?}: {} bytes", tar.len());
        assert_read_whole(&tar, line, &format!("{args:?}"));
        // And the same inside a gzip, as a streamed entry.
        assert_read_whole(&gzip(&tar), line, &format!("{args:?}, gzipped"));
    }
}

#[test]
fn a_gnu_sparse_map_with_extension_blocks_is_read_past() {
    // More than the four regions a header holds: the map goes on in an extension block.
    let (dir, line) = scratch("extended", 7);
    if !has_holes(&dir.0) {
        return;
    }
    let Some(tar) = gnu_tar(&dir.0, &["--format=gnu"]) else { return };
    assert_eq!(tar[156], b'S');
    assert_ne!(tar[482], 0, "the map is extended");
    assert_read_whole(&tar, line, "7 regions");
}

#[test]
fn a_pax_sparse_map_that_lies_is_refused_by_name() {
    let (dir, _) = scratch("lying", 2);
    if !has_holes(&dir.0) {
        return;
    }
    let Some(mut tar) = gnu_tar(&dir.0, &["--format=posix", "--sparse-version=1.0"]) else { return };
    // The map is the first block of the second entry's data: after the pax header's header and
    // records, and the file's own header.
    let pax_size = usize::from_str_radix(std::str::from_utf8(&tar[124..135]).unwrap().trim(), 8).unwrap();
    let map_at = 512 + pax_size.div_ceil(512) * 512 + 512;
    // The count of regions (the two written and the empty one GNU tar ends the file with).
    assert!(tar[map_at..].starts_with(b"3\n0\n4096\n"), "{:?}", &tar[map_at..map_at + 16]);
    tar[map_at] = b'x';
    let err = scan(&tar, "sparse.tar").unwrap_err();
    assert_eq!(
        err.to_string(),
        "artifact entry `disk.img` is corrupt: its sparse map is not decimal numbers, one per line"
    );
}

/// `tar` with its first header's field at `offset` set to `value` and its checksum made again.
fn patched_header(mut tar: Vec<u8>, offset: usize, value: u8) -> Vec<u8> {
    tar[offset] = value;
    tar[148..156].copy_from_slice(b"        ");
    let sum: u32 = tar[..512].iter().map(|&b| u32::from(b)).sum();
    tar[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar
}

#[test]
fn a_gnu_sparse_map_that_never_ends_is_refused_by_name() {
    // A hostile archive: the header says its map goes on, and every extension block says so too.
    let t = tar(&[TarEntry { name: "disk.img", kind: b'S', link: "", data: b"x\n" }]);
    let t = patched_header(t, 482, 1);
    let mut hostile = t[..512].to_vec();
    let mut extension = [0u8; 512];
    extension[504] = 1;
    for _ in 0..5000 {
        hostile.extend_from_slice(&extension);
    }
    hostile.extend_from_slice(&t[512..]);
    assert_eq!(
        scan(&hostile, "a.tar").unwrap_err().to_string(),
        "artifact entry `disk.img` is corrupt: its sparse map has more than 4096 extension blocks"
    );
}

#[test]
fn a_pax_sparse_map_longer_than_its_entry_is_refused_by_name() {
    let t = tar(&[
        TarEntry { name: "PaxHeaders/disk.img", kind: b'x', link: "", data: b"22 GNU.sparse.major=1\n" },
        TarEntry { name: "disk.img", kind: b'0', link: "", data: b"9\n" },
    ]);
    assert_eq!(
        scan(&t, "a.tar").unwrap_err().to_string(),
        "artifact entry `disk.img` is corrupt: its sparse map is longer than the entry or 1 MiB"
    );
}
