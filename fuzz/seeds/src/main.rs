//! Writes the fuzz targets' seed corpora (`fuzz/corpus/<target>/seed-*`), all made here from
//! Cella's own types and formats: archives built in code, valid frames, a real snapshot state
//! file, control-socket requests, the built-in rule packs, a signed audit bundle.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml -p cella-fuzz-seeds [-- CORPUS_DIR]
//!
//! The snapshot seed needs /dev/kvm and the runner image (`scripts/build-guest.sh`); without
//! them that one seed is skipped with a note. Rerun after a format changes, and commit the
//! seeds that changed because of it: the audit bundle (a new key) and the snapshot state (new
//! times) come out different on every run.

use std::io::Write;
use std::path::{Path, PathBuf};

use cella_abi::vsock::{self, Header};
use cella_audit::bundle;
use cella_audit::keys::SigningKey;
use cella_audit::{Actor, NewEvent, Resource, TenantId};
use cella_proto::{self as proto, Kind, SessionRequest, SessionResponse, SessionResult};
use miniz_oxide::deflate::compress_to_vec;
use serde_json::json;

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus"));
    let targets: [(&str, Seeds); 12] = [
        ("archive_tar", tar_seeds()),
        ("archive_git_bundle", bundle_seeds()),
        ("archive_gzip", gzip_seeds()),
        ("archive_zip", zip_seeds()),
        ("archive_zstd", zstd_seeds()),
        ("virtio_chain", virtio_seeds()),
        ("proto_host", proto_host_seeds()),
        ("proto_guest", proto_guest_seeds()),
        ("snapshot_state", snapshot_seeds()),
        ("control_http", http_seeds()),
        ("policy_toml", policy_seeds()),
        ("audit_bundle", audit_seeds()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus folder");
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}

// --- archives ------------------------------------------------------------------------------

const SECRET_TEXT: &[u8] = b"# config\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\nowner: alice@example.com\n";
const LICENSE_TEXT: &[u8] = b"// SPDX-License-Identifier: Apache-2.0\nfn main() {}\n";

fn tar_header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h
}

/// A tar of `files`, each a regular file.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar_header(tar::EntryType::Regular, data.len() as u64);
        b.append_data(&mut h, name, *data).expect("tar entry");
    }
    b.into_inner().expect("tar")
}

fn tar_seeds() -> Seeds {
    let mut rich = tar::Builder::new(Vec::new());
    let mut dir = tar_header(tar::EntryType::Directory, 0);
    rich.append_data(&mut dir, "src/", &[][..]).unwrap();
    let mut file = tar_header(tar::EntryType::Regular, SECRET_TEXT.len() as u64);
    rich.append_data(&mut file, "src/config.env", SECRET_TEXT).unwrap();
    let mut link = tar_header(tar::EntryType::Symlink, 0);
    rich.append_link(&mut link, "src/current", "config.env").unwrap();
    let mut hard = tar_header(tar::EntryType::Link, 0);
    rich.append_link(&mut hard, "src/again", "src/config.env").unwrap();
    // Longer than the 100 bytes of a ustar name: the builder writes a GNU `L` entry.
    let long = format!("deep/{}/main.rs", "nested-directory".repeat(8));
    let mut file = tar_header(tar::EntryType::Regular, LICENSE_TEXT.len() as u64);
    rich.append_data(&mut file, &long, LICENSE_TEXT).unwrap();
    rich.append_pax_extensions([("path", &b"pax/named by pax.txt"[..])]).unwrap();
    let mut file = tar_header(tar::EntryType::Regular, 6);
    rich.append_data(&mut file, "short-name.txt", &b"hello\n"[..]).unwrap();
    let inner_zip = zip_of(&[("inner.txt", SECRET_TEXT, true)]);
    let mut file = tar_header(tar::EntryType::Regular, inner_zip.len() as u64);
    rich.append_data(&mut file, "bundle/inner.zip", &inner_zip[..]).unwrap();
    let rich = rich.into_inner().unwrap();

    let inner_tgz = gzip_of(&tar_of(&[("a.txt", b"inner\n")]), None);
    vec![
        ("plain-file", SECRET_TEXT.to_vec()),
        ("one-file", tar_of(&[("README", b"read me\n")])),
        ("entries-links-long-names-pax-nested-zip", rich),
        ("nested-tar-gz", tar_of(&[("layer.tar.gz", &inner_tgz), ("top.txt", LICENSE_TEXT)])),
        ("escapes-root", tar_escaping_root()),
    ]
}

/// Git bundles made by the real `git` in a scratch repository: a history with a branch, a
/// tag, a rename, a deleted secret and a file edited often (delta chains); the same from a
/// later commit on (prerequisites); and the repository packed with deep chains.
fn bundle_seeds() -> Seeds {
    let dir = std::env::temp_dir().join(format!("cella-fuzz-seeds-git-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=Seed", "-c", "user.email=seed@example.org", "-c", "commit.gpgsign=false"])
            .args(args)
            .current_dir(&dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_DATE", "1700000000 +0000")
            .env("GIT_COMMITTER_DATE", "1700000000 +0000")
            .output()
            .expect("git runs");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let write = |path: &str, text: &[u8]| {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    git(&["init", "-q", "-b", "main"]);
    write("config.env", SECRET_TEXT);
    write("src/lib.rs", LICENSE_TEXT);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "Start"]);
    let first = git(&["rev-parse", "HEAD"]);
    let mut lines: Vec<String> = (0..40).map(|i| format!("line {i} of a file edited often")).collect();
    for i in 0..12 {
        lines[i * 3] = format!("changed in commit {i}");
        write("notes.txt", (lines.join("\n") + "\n").as_bytes());
        git(&["add", "-A"]);
        git(&["commit", "-qm", &format!("Edit {i}")]);
    }
    std::fs::remove_file(dir.join("config.env")).unwrap();
    git(&["mv", "src/lib.rs", "src/main.rs"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "Remove the config, rename"]);
    git(&["tag", "-a", "v1", "-m", "v1"]);
    git(&["checkout", "-q", "-b", "side"]);
    write("side.txt", b"token = ghp_0123456789abcdefABCDEF0123456789abcd\n");
    git(&["add", "-A"]);
    git(&["commit", "-qm", "Side"]);
    git(&["checkout", "-q", "main"]);
    let bundle = |name: &str, revs: &[&str]| -> Vec<u8> {
        let path = dir.join(name);
        let mut args = vec!["bundle", "create", "-q", path.to_str().unwrap()];
        args.extend_from_slice(revs);
        git(&args);
        std::fs::read(&path).unwrap()
    };
    let all = bundle("all.bundle", &["--all"]);
    let since = bundle("since.bundle", &["--all", &format!("^{first}")]);
    git(&["repack", "-adf", "-q", "--depth=50", "--window=50"]);
    let deep = bundle("deep.bundle", &["main"]);
    std::fs::remove_dir_all(&dir).unwrap();
    vec![("all-refs", all), ("since-first-commit", since), ("main-deep-chains", deep)]
}

/// A tar whose one entry is named `../outside` (the tar crate refuses to write such a name).
fn tar_escaping_root() -> Vec<u8> {
    let mut h = tar_header(tar::EntryType::Regular, 1);
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..10].copy_from_slice(b"../outside");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"x"[..]).expect("tar entry");
    b.into_inner().expect("tar")
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { 0xedb8_8320 ^ (crc >> 1) } else { crc >> 1 };
        }
    }
    !crc
}

/// A gzip member of `data` (raw deflate inside), with a file name if given.
fn gzip_of(data: &[u8], name: Option<&str>) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, if name.is_some() { 0x08 } else { 0 }, 0, 0, 0, 0, 0, 3];
    if let Some(name) = name {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    out.extend(compress_to_vec(data, 6));
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn gzip_seeds() -> Seeds {
    // Every optional header field: FEXTRA, FNAME, FCOMMENT, FHCRC.
    let mut all_fields = vec![0x1f, 0x8b, 8, 0x04 | 0x08 | 0x10 | 0x02, 0, 0, 0, 0, 0, 3];
    all_fields.extend_from_slice(&4u16.to_le_bytes());
    all_fields.extend_from_slice(b"ab\x00\x00");
    all_fields.extend_from_slice(b"name.txt\x00comment\x00");
    all_fields.extend_from_slice(&[0, 0]);
    all_fields.extend(compress_to_vec(LICENSE_TEXT, 9));
    all_fields.extend_from_slice(&crc32(LICENSE_TEXT).to_le_bytes());
    all_fields.extend_from_slice(&(LICENSE_TEXT.len() as u32).to_le_bytes());
    let repetitive: Vec<u8> = b"0123456789abcdef\n".repeat(4096);
    vec![
        ("text", gzip_of(SECRET_TEXT, Some("config.env"))),
        ("tar-gz", gzip_of(&tar_of(&[("a/secret.env", SECRET_TEXT), ("a/lib.rs", LICENSE_TEXT)]), None)),
        ("header-fields", all_fields),
        ("compressible", gzip_of(&repetitive, None)),
        ("stored-block", {
            let mut g = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
            g.extend(compress_to_vec(b"stored", 0));
            g.extend_from_slice(&crc32(b"stored").to_le_bytes());
            g.extend_from_slice(&6u32.to_le_bytes());
            g
        }),
    ]
}

/// `data` compressed by the `zstd` command with `args` (stdin to stdout: no content size).
fn zstd_cli(data: &[u8], args: &[&str]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("zstd")
        .args(args)
        .args(["-q", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the zstd command (scripts/setup.sh installs it)");
    child.stdin.take().expect("stdin").write_all(data).expect("write to zstd");
    let out = child.wait_with_output().expect("zstd");
    assert!(out.status.success(), "zstd {args:?}");
    out.stdout
}

/// One zstd frame of stored (raw) blocks, single segment with its 4-byte content size.
fn zstd_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let header = 1 | ((data.len() as u32) << 3);
    out.extend_from_slice(&header.to_le_bytes()[..3]);
    out.extend_from_slice(data);
    out
}

fn zstd_seeds() -> Seeds {
    let layer = tar_of(&[("etc/secret.env", SECRET_TEXT), ("src/lib.rs", LICENSE_TEXT)]);
    let repetitive: Vec<u8> = b"0123456789abcdef\n".repeat(4096);
    let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, b'a', b'b', b'c'];
    skippable.extend(zstd_stored(SECRET_TEXT));
    vec![
        ("tar-level3", zstd_cli(&layer, &["-3"])),
        ("tar-level19", zstd_cli(&layer, &["-19"])),
        ("text-level1", zstd_cli(SECRET_TEXT, &["-1"])),
        ("compressible", zstd_cli(&repetitive, &["-9"])),
        ("two-frames", [zstd_cli(&layer[..700], &["-3"]), zstd_cli(&layer[700..], &["-3"])].concat()),
        ("stored", zstd_stored(&layer)),
        ("skippable-first", skippable),
    ]
}

/// A zip of `(name, data, deflate)` entries; names ending in `/` are directories, names
/// starting with `@` are Unix symlinks to their data.
fn zip_of(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data, deflate) in entries {
        let (name, symlink) = match name.strip_prefix('@') {
            Some(n) => (n, true),
            None => (*name, false),
        };
        let stored = if *deflate && !symlink { compress_to_vec(data, 6) } else { data.to_vec() };
        let method: u16 = if *deflate && !symlink { 8 } else { 0 };
        let offset = out.len() as u32;
        let crc = crc32(data);
        let mut local = Vec::new();
        local.extend_from_slice(b"PK\x03\x04");
        local.extend_from_slice(&20u16.to_le_bytes()); // version needed
        local.extend_from_slice(&0u16.to_le_bytes()); // flags
        local.extend_from_slice(&method.to_le_bytes());
        local.extend_from_slice(&[0; 4]); // time, date
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        local.extend_from_slice(&(data.len() as u32).to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes()); // extra
        local.extend_from_slice(name.as_bytes());
        out.extend(local);
        out.extend_from_slice(&stored);

        let mode: u32 = if symlink {
            0o120777
        } else if name.ends_with('/') {
            0o040755
        } else {
            0o100644
        };
        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&(0x0300u16 | 20).to_le_bytes()); // made by Unix
        central.extend_from_slice(&20u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&method.to_le_bytes());
        central.extend_from_slice(&[0; 4]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
        central.extend_from_slice(&(mode << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0; 4]); // disks
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // comment
    out
}

fn zip_seeds() -> Seeds {
    let inner_tar = tar_of(&[("deep/key.pem", b"-----BEGIN RSA PRIVATE KEY-----\nMIIB\n")]);
    let empty = {
        let mut z = b"PK\x05\x06".to_vec();
        z.extend_from_slice(&[0; 18]);
        z
    };
    vec![
        ("stored-and-deflated", zip_of(&[("a.txt", SECRET_TEXT, false), ("b/c.rs", LICENSE_TEXT, true)])),
        ("directory-and-symlink", zip_of(&[("dir/", b"", false), ("@dir/link", b"../dir", false)])),
        ("nested-tar", zip_of(&[("layer.tar", &inner_tar, true), ("note.txt", b"note\n", false)])),
        ("empty", empty),
    ]
}

// --- virtio ----------------------------------------------------------------------------------

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// Guest memory with descriptors and an available ring written in.
struct Memory(Vec<u8>);

impl Memory {
    fn put(&mut self, at: usize, bytes: &[u8]) {
        if self.0.len() < at + bytes.len() {
            self.0.resize(at + bytes.len(), 0);
        }
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }
    fn desc(&mut self, table: usize, index: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(table + index * 16, &d);
    }
    /// The available ring at `avail` offering `heads`.
    fn avail(&mut self, avail: usize, heads: &[u16]) {
        self.put(avail, &0u16.to_le_bytes());
        self.put(avail + 2, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            self.put(avail + 4 + 2 * i, &h.to_le_bytes());
        }
    }
}

/// The target's input: `[device, log2 size, desc, avail, used, ops = 0, notifies, head, memory]`.
fn virtio_input(device: u8, log2_size: u8, rings: [u16; 3], notifies: u8, memory: &Memory) -> Vec<u8> {
    let mut v = vec![device, log2_size];
    for r in rings {
        v.extend_from_slice(&r.to_le_bytes());
    }
    v.push(0);
    v.push(notifies - 1);
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&memory.0);
    v
}

fn virtio_seeds() -> Seeds {
    let (table, avail, used) = (0x100, 0x200, 0x300);
    // A read of sector 1 into one 512-byte buffer, then a GET_ID and a FLUSH.
    let mut m = Memory(Vec::new());
    let mut header = vec![0u8; 16];
    header[8..16].copy_from_slice(&1u64.to_le_bytes());
    m.put(0x400, &header);
    m.desc(table, 0, 0x400, 16, NEXT, 1);
    m.desc(table, 1, 0x600, 512, NEXT | WRITE, 2);
    m.desc(table, 2, 0x800, 1, WRITE, 0);
    let mut get_id = vec![0u8; 16];
    get_id[..4].copy_from_slice(&8u32.to_le_bytes());
    m.put(0x410, &get_id);
    m.desc(table, 3, 0x410, 16, NEXT, 4);
    m.desc(table, 4, 0x900, 20, NEXT | WRITE, 5);
    m.desc(table, 5, 0x801, 1, WRITE, 0);
    let mut flush = vec![0u8; 16];
    flush[..4].copy_from_slice(&4u32.to_le_bytes());
    m.put(0x420, &flush);
    m.desc(table, 6, 0x420, 16, NEXT, 7);
    m.desc(table, 7, 0x802, 1, WRITE, 0);
    m.avail(avail, &[0, 3, 6]);
    let block = virtio_input(0, 3, [table as u16, avail as u16, used as u16], 1, &m);

    // A looping chain: refused.
    let mut l = Memory(Vec::new());
    l.desc(table, 0, 0x400, 16, NEXT, 1);
    l.desc(table, 1, 0x600, 16, NEXT, 0);
    l.avail(avail, &[0]);
    let looping = virtio_input(0, 3, [table as u16, avail as u16, used as u16], 1, &l);

    // vsock: the transmit queue is queue 1, whose rings are 0x800 further on; the receive
    // queue offers buffers for the device's answers. The guest connects to host port 1024 (a
    // listener the target runs), sends data, asks for credit and shuts down.
    let tx = 0x800;
    let packet = |src_port, dst_port, op, flags, payload: &[u8]| {
        let header = Header {
            src_cid: vsock::GUEST_CID,
            dst_cid: vsock::HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            kind: vsock::TYPE_STREAM,
            op,
            flags,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        [&header.to_bytes()[..], payload].concat()
    };
    let vsock_input = |device: u8, packets: &[Vec<u8>]| {
        let mut v = Memory(Vec::new());
        let mut at = 0x1800;
        let heads: Vec<u16> = (0..packets.len() as u16).collect();
        for (i, p) in packets.iter().enumerate() {
            v.put(at, p);
            v.desc(table + tx, i, at as u64, p.len() as u32, 0, 0);
            at += 0x80;
        }
        v.avail(avail + tx, &heads);
        for i in 0..4 {
            v.desc(table, i, 0x2000 + 0x400 * i as u64, 0x400, WRITE, 0);
        }
        v.avail(avail, &[0, 1, 2, 3]);
        v.put(used + 0x1000 + 0x100, &[0]); // cover the event queue's rings too
        virtio_input(device, 3, [table as u16, avail as u16, used as u16], 3, &v)
    };
    let guest_connects = vsock_input(
        1,
        &[
            packet(49152, 1024, vsock::op::REQUEST, 0, b""),
            packet(49152, 1024, vsock::op::RW, 0, b"hello, host"),
            packet(49152, 1024, vsock::op::CREDIT_REQUEST, 0, b""),
            packet(49152, 1024, vsock::op::SHUTDOWN, vsock::SHUTDOWN_SEND | vsock::SHUTDOWN_RCV, b""),
            packet(49153, 7, vsock::op::REQUEST, 0, b""),
        ],
    );
    // A host client asks for guest port 1025 (device byte bit 1); the guest accepts on the
    // first host port the device hands out (1 << 30) and sends data back.
    let host_connects = vsock_input(
        3,
        &[
            packet(1025, 1 << 30, vsock::op::RESPONSE, 0, b""),
            packet(1025, 1 << 30, vsock::op::RW, 0, b"hello, client"),
        ],
    );
    vec![
        ("block-read-get-id-flush", block),
        ("block-loop", looping),
        ("vsock-guest-connects", guest_connects),
        ("vsock-host-connects", host_connects),
    ]
}

// --- the protocol ----------------------------------------------------------------------------

fn hello() -> Vec<u8> {
    proto::encode_json(
        Kind::Hello,
        &proto::Hello { runner_version: "0.1.0".into(), protocol: proto::VERSION, policy_sha256: None },
    )
}

fn proto_host_seeds() -> Seeds {
    let mut completed = hello();
    completed.extend(proto::encode(Kind::Sarif, br#"{"version":"2.1.0","runs":[]}"#));
    completed.extend(proto::encode(Kind::Summary, br#"{"files_scanned":1,"findings":0}"#));
    let mut refused = hello();
    let error = proto::ErrorReport { kind: "artifact".into(), message: "entry `../x` escapes".into() };
    refused.extend(proto::encode_json(Kind::Error, &error));

    let scan = SessionResponse {
        result: SessionResult::Scan(proto::ScanResult {
            policy_name: "default".into(),
            policy_cached: false,
            files_scanned: 2,
            findings: 1,
            suppressed: 1,
            files_excluded: 1,
        }),
        frames: 2,
    };
    let mut scan_reply = proto::encode_json(Kind::SessionResponse, &scan);
    scan_reply.extend(proto::encode(Kind::Sarif, b"{}"));
    scan_reply.extend(proto::encode(Kind::Summary, b"{}"));
    let read = SessionResponse {
        result: SessionResult::Read(proto::ReadResult {
            path: "a.txt".into(),
            size: 5,
            returned: 5,
            truncated: false,
            redactions: 0,
            mode: "raw".into(),
        }),
        frames: 1,
    };
    let mut read_reply = proto::encode_json(Kind::SessionResponse, &read);
    read_reply.extend(proto::encode(Kind::Data, b"hello"));
    let grep = SessionResponse {
        result: SessionResult::Grep(proto::GrepResult {
            matches: vec![proto::GrepMatch {
                path: "a.txt".into(),
                line: 3,
                column: 7,
                text: "password = ********".into(),
                truncated: false,
            }],
            counts: vec![proto::GrepCount { path: "b.txt".into(), lines: 2 }],
            truncated: false,
            files_searched: 1,
            masked: true,
        }),
        frames: 0,
    };
    let error = SessionResponse {
        result: SessionResult::Error(proto::SessionError { kind: "not_found".into(), message: "no".into() }),
        frames: 0,
    };
    let with = |selector: u8, wire: Vec<u8>| [vec![selector], wire].concat();
    vec![
        ("job-completed", with(0, completed.clone())),
        ("job-refused", with(0, refused)),
        ("session-scan", with(1, scan_reply)),
        ("session-read", with(1, read_reply)),
        ("session-grep", with(1, proto::encode_json(Kind::SessionResponse, &grep))),
        ("session-error", with(1, proto::encode_json(Kind::SessionResponse, &error))),
        ("frames-in-pieces", with(2 + 3 * 4, completed)),
    ]
}

fn small_policy() -> Vec<u8> {
    let pack = r#"
[pack]
name = "fuzz"
category = "secret"
severity = "error"

[[rules]]
id = "fuzz-password"
description = "A password assignment"
regex = '''password\s*=\s*"([^"]{6,})"'''
secret_group = 1
keywords = ["password"]
help = "Remove the password."
"#;
    let pack = cella_policies::rules::parse_pack("fuzz", pack).expect("the seed pack parses");
    cella_policies::rules::compile(&[pack]).expect("the seed pack compiles").into_bytes()
}

fn proto_guest_seeds() -> Seeds {
    let request = |r: &SessionRequest| proto::encode_json(Kind::SessionRequest, r);
    const KEY: &str = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";
    let job = proto::Job {
        artifact_name: "artifact.tar".into(),
        artifact_size: 10240,
        fingerprint_key: KEY.into(),
        excludes: vec!["vendor/**".into(), "*.min.js".into()],
        baseline: None,
        sarif: proto::SarifContext { automation_id: Some("cella/fuzz/".into()), ..Default::default() },
        policy_preloaded: false,
        license_policy: Default::default(),
    };
    let mut job_frames = proto::encode_json(Kind::Job, &job);
    job_frames.extend(proto::encode(Kind::Policy, &small_policy()));
    let grep = SessionRequest::Grep { pattern: r"pass\w+\s*=".into(), max_matches: 10, path_prefix: None };
    // Every grep carries the masking policy.
    let mut grep_frames = request(&grep);
    grep_frames.extend(proto::encode(Kind::Policy, &small_policy()));
    let mut scan = request(&SessionRequest::Scan {
        policy_name: "fuzz".into(),
        fingerprint_key: KEY.into(),
        excludes: vec!["docs/**".into()],
    });
    scan.extend(proto::encode(Kind::Policy, &small_policy()));
    let mut read = request(&SessionRequest::Read { path: "notes.txt".into(), max_bytes: 100 });
    read.extend(proto::encode(Kind::Policy, &small_policy()));
    let mut add = request(&SessionRequest::Add { name: "more".into() });
    add.extend(proto::encode(Kind::Data, &tar_of(&[("x/y.txt", b"password = \"abcdefgh\"\n")])));
    add.extend(grep_frames.clone());
    let mut missing = request(&SessionRequest::Read { path: "notes.txt".into(), max_bytes: 100 });
    missing.extend(request(&SessionRequest::Stats));
    missing.extend(request(&SessionRequest::Stop));
    vec![
        ("job-and-policy", job_frames),
        ("grep", grep_frames),
        ("grep-prefix", {
            let mut frames = request(&SessionRequest::Grep {
                pattern: "(?i)alice@[a-z]+".into(),
                max_matches: 1,
                path_prefix: Some("no".into()),
            });
            frames.extend(proto::encode(Kind::Policy, &small_policy()));
            frames
        }),
        ("scan", scan),
        ("read-redacted", read),
        ("add-then-grep", add),
        ("missing-attachment-stats-stop", missing),
    ]
}

// --- the snapshot state file -------------------------------------------------------------------

fn snapshot_seeds() -> Seeds {
    match real_state_file() {
        Ok(file) => {
            let state =
                cella_vmm::snapshot::format::decode(Path::new("state.bin"), &file).expect("it decodes");
            let body = serde_json::to_vec(&state).expect("the state serializes");
            vec![("state-file", [vec![0], file].concat()), ("state-body", [vec![1], body].concat())]
        }
        Err(why) => {
            eprintln!("snapshot_state: no seed made ({why}); keeping whatever the corpus has");
            Vec::new()
        }
    }
}

/// The state file of a snapshot of a running `spin` VM, taken through the control contract.
fn real_state_file() -> Result<Vec<u8>, String> {
    use cella_vmm::rpc_interface::{VmmAction, VmmController};
    let image = cella_vmm::default_runner_image().map_err(|e| e.to_string())?;
    let config = cella_vmm::VmConfig { mem_mib: 16, ..cella_vmm::VmConfig::new(image, vec!["spin".into()]) };
    let vm =
        cella_vmm::build(&config, Box::new(cella_vmm::SharedBuffer::default())).map_err(|e| e.to_string())?;
    let mut controller = VmmController::new(vm.start().map_err(|e| e.to_string())?);
    let dir = std::env::temp_dir().join(format!("cella-fuzz-seed-snapshot-{}", std::process::id()));
    let result = controller
        .handle(VmmAction::Pause)
        .and_then(|_| controller.handle(VmmAction::CreateSnapshot { snapshot_dir: dir.clone() }))
        .map_err(|e| e.to_string());
    let _ = controller.handle(VmmAction::Stop);
    result?;
    let file = std::fs::read(dir.join(cella_vmm::snapshot::STATE_FILE)).map_err(|e| e.to_string());
    let _ = cella_vmm::snapshot::remove(&dir);
    file
}

// --- the control socket ------------------------------------------------------------------------

fn http_seeds() -> Seeds {
    let request = |method: &str, path: &str, body: &str| {
        let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if !body.is_empty() {
            r.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        r.push_str("\r\n");
        r.push_str(body);
        r.into_bytes()
    };
    // Side 0: a request, read whole (no piece sizes); side 2: in pieces of 1, 7 and 3 bytes.
    let whole = |r: Vec<u8>| [vec![0, 0], r].concat();
    let mut response = Vec::new();
    cella_vmm::control::http::write_response(
        &mut response,
        &cella_vmm::control::http::Response::fault(409, "the VM is not paused"),
    )
    .unwrap();
    vec![
        ("get-vm", whole(request("GET", "/vm", ""))),
        ("pause", whole(request("PATCH", "/vm", r#"{"state":"paused"}"#))),
        ("snapshot-create", whole(request("PUT", "/snapshot/create", r#"{"snapshot_dir":"/tmp/s"}"#))),
        (
            "snapshot-load-in-pieces",
            [
                vec![2, 3, 1, 7, 3],
                request("PUT", "/snapshot/load", r#"{"snapshot_dir":"/tmp/s","resume":true}"#),
            ]
            .concat(),
        ),
        ("stop", whole(request("PUT", "/actions", r#"{"action_type":"stop"}"#))),
        ("metrics-http10", whole(b"GET /metrics HTTP/1.0\r\n\r\n".to_vec())),
        ("response", [vec![1, 0], response].concat()),
        // A head just under the 8 KiB limit, read whole and in pieces (so inputs this long are
        // tried at all: libFuzzer's length limit follows the largest seed).
        ("head-near-limit", whole(long_head(8190))),
        ("head-near-limit-in-pieces", [vec![0, 12], vec![250; 12], long_head(8190)].concat()),
    ]
}

/// A GET whose head (request line and headers, without the blank line) is `len` bytes.
fn long_head(len: usize) -> Vec<u8> {
    let start = "GET /vm HTTP/1.1\r\nX-Pad: ";
    format!("{start}{}\r\n\r\n", "a".repeat(len - start.len())).into_bytes()
}

// --- rule packs --------------------------------------------------------------------------------

fn policy_seeds() -> Seeds {
    let mut seeds: Seeds = cella_policies::rules::BUILTIN_PACKS
        .iter()
        .map(|(name, text)| (*name, text.as_bytes().to_vec()))
        .collect();
    seeds.push((
        "validators-allowlists",
        br#"
[pack]
name = "custom"
category = "pii"
severity = "warning"

[[rules]]
id = "custom-card"
description = "A card number"
regex = '\b(\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4})\b'
secret_group = 1
validator = "payment-card"
help = "Remove the card number."
allowlist = { stopwords = ["4111"], paths = ["^tests/"] }

[[rules]]
id = "custom-token"
description = "A high-entropy token"
regex = 'token\s*[:=]\s*([A-Za-z0-9+/]{24,})'
secret_group = 1
entropy = 3.5
keywords = ["token"]
category = "secret"
severity = "error"
help = "Rotate the token."
"#
        .to_vec(),
    ));
    for (name, text) in &seeds {
        let text = std::str::from_utf8(text).expect("a pack is UTF-8");
        cella_policies::rules::parse_pack(name, text).unwrap_or_else(|e| panic!("seed pack {name}: {e}"));
    }
    seeds
}

// --- audit bundles -----------------------------------------------------------------------------

fn audit_seeds() -> Seeds {
    let key = SigningKey::generate("k1").expect("a signing key");
    let tenant = TenantId::new("acme").expect("a tenant id");
    let t0 = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("a time");
    let bundle_of = |n: u64, every: u64, ocsf: bool| {
        let events = (1..=n).map(|seq| {
            let event = NewEvent::tenant(
                tenant.clone(),
                Actor::ApiKey("key_1".into()),
                "job.created",
                Resource::new("job", format!("job-{seq}")),
                json!({ "n": seq }),
            );
            (event, t0)
        });
        let contents = bundle::offline_chain(&tenant, &key, events, |seq| seq % every == 0, ocsf, t0);
        let mut tar = Vec::new();
        bundle::write_bundle(&contents, &mut tar).expect("a bundle");
        tar
    };
    let mut out = Vec::new();
    let mut empty = tar::Builder::new(&mut out);
    empty.finish().unwrap();
    drop(empty);
    let _ = out.flush();
    vec![
        ("three-events-one-checkpoint", bundle_of(3, 3, false)),
        ("five-events-two-checkpoints-ocsf", bundle_of(5, 2, true)),
        ("empty-tar", out),
    ]
}
