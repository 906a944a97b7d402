//! Zips as real tools write them: Python's `zipfile` (to a file, and streamed with data
//! descriptors), Info-ZIP's `zip` (to a file, streamed to a pipe, and in zip64 form) and Java's
//! `jar`. Each holds a deflated text far larger than its compressed bytes, the case the inflater
//! once refused as "truncated" (all of a small entry's input is taken in at the first read while
//! its output still waits). And zip64 as a writer makes it for more than 65,535 entries.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// A text of ~40 KB that compresses well, with the test token on line 301.
fn text() -> Vec<u8> {
    let mut t = String::new();
    for i in 0..600 {
        if i == 300 {
            t.push_str(&format!("key = {SECRET}\n"));
        }
        t.push_str(&format!(
            "Permission is hereby granted to use copy {i} of the Software, subject to the conditions.\n"
        ));
    }
    t.into_bytes()
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cella-zip-writers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("LICENSE.txt"), text()).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `program args` in `dir`; its stdout, or `None` (said on stderr) if the tool is missing.
fn run(dir: &Path, program: &str, args: &[&str]) -> Option<Vec<u8>> {
    let out = match Command::new(program).args(args).current_dir(dir).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped the {program} writer: {program} is not installed");
            return None;
        }
        Err(e) => panic!("{program}: {e}"),
    };
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(out.stdout)
}

const PYTHON_ZIP: &str = r#"
import io, sys, zipfile
text = open("LICENSE.txt", "rb").read()
with zipfile.ZipFile("python.zip", "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("LICENSE.txt", text)
class Pipe(io.RawIOBase):  # cannot seek or tell: sizes go in data descriptors
    def __init__(self, f): self.f = f
    def writable(self): return True
    def write(self, b): return self.f.write(b)
with open("python-stream.zip", "wb") as f:
    with zipfile.ZipFile(Pipe(f), "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("LICENSE.txt", "w") as e:
            e.write(text)
"#;

/// The zips each writer makes of `LICENSE.txt`, by writer name.
fn zips(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    if run(dir, "python3", &["-c", PYTHON_ZIP]).is_some() {
        out.push(("python zipfile", std::fs::read(dir.join("python.zip")).unwrap()));
        let streamed = std::fs::read(dir.join("python-stream.zip")).unwrap();
        assert_eq!(streamed[6] & 8, 8, "the streamed zip's entry has a data descriptor");
        out.push(("python zipfile, streamed", streamed));
    }
    if run(dir, "zip", &["-q", "-9", "infozip.zip", "LICENSE.txt"]).is_some() {
        out.push(("Info-ZIP", std::fs::read(dir.join("infozip.zip")).unwrap()));
        // `zip - FILE` writes to a pipe: a streamed zip with data descriptors.
        out.push(("Info-ZIP, streamed", run(dir, "zip", &["-q", "-", "LICENSE.txt"]).unwrap()));
        // `-fz`: zip64 throughout (sizes and offsets in each entry's zip64 extra field, the
        // directory found through the zip64 end record).
        run(dir, "zip", &["-q", "-fz", "zip64.zip", "LICENSE.txt"]).unwrap();
        let zip64 = std::fs::read(dir.join("zip64.zip")).unwrap();
        assert!(zip64.windows(4).any(|w| w == b"PK\x06\x06"), "a zip64 end record");
        out.push(("Info-ZIP, zip64", zip64));
    }
    if run(dir, "jar", &["cf", "app.jar", "LICENSE.txt"]).is_some() {
        out.push(("jar", std::fs::read(dir.join("app.jar")).unwrap()));
    }
    assert!(out.len() >= 2, "python3 and zip are installed by scripts/setup.sh");
    out
}

#[test]
fn zips_from_every_writer_are_read_whole() {
    let dir = Scratch::new("top");
    for (writer, data) in zips(&dir.0) {
        let r = scan(&data, "artifact.zip").unwrap_or_else(|e| panic!("{writer}: {e}"));
        assert_eq!(triples(&r), ["LICENSE.txt:301:test-token"], "{writer}");
        // All of the text was read (jar adds a manifest of its own).
        assert!(r.bytes_scanned >= text().len() as u64, "{writer}: {} bytes", r.bytes_scanned);
    }
}

#[test]
fn zips_from_every_writer_are_read_nested_in_a_tar() {
    let dir = Scratch::new("nested");
    for (writer, data) in zips(&dir.0) {
        let t = tar(&[file("site-packages/pkg/doc.odt", &data), file("site-packages/pkg/after.txt", b"x\n")]);
        let r = scan(&t, "site.tar").unwrap_or_else(|e| panic!("{writer}: {e}"));
        assert_eq!(triples(&r), ["site-packages/pkg/doc.odt!/LICENSE.txt:301:test-token"], "{writer}");
        assert!(r.files_scanned >= 2, "{writer}: the tar's entry after the zip is read too");
    }
}

const PYTHON_MANY: &str = r#"
import zipfile
with zipfile.ZipFile("many.zip", "w", zipfile.ZIP_STORED) as z:
    for i in range(66000):
        z.writestr(f"f/{i}.txt", b"x\n")
    z.writestr("last.txt", open("LICENSE.txt", "rb").read())
"#;

#[test]
fn a_zip_of_more_than_65535_entries_is_read_through_its_zip64_end_record() {
    let dir = Scratch::new("many");
    if run(&dir.0, "python3", &["-c", PYTHON_MANY]).is_none() {
        return;
    }
    let data = std::fs::read(dir.0.join("many.zip")).unwrap();
    let eocd = data.len() - 22;
    assert_eq!(&data[eocd + 10..eocd + 12], &[0xff, 0xff], "the end record's count says: see zip64");
    let r = scan(&data, "many.zip").unwrap();
    assert_eq!(r.files_scanned, 66001);
    assert_eq!(triples(&r), ["last.txt:301:test-token"]);
}
