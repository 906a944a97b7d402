//! Test helpers: a small policy, and writers for tar, gzip and zip built in code so every
//! hostile case is explicit.
#![allow(dead_code)]

use cella_scan::{
    scan_artifact, Allowlist, ArtifactError, Category, Engine, Limits, Policy, Report, Rule, Severity,
    SliceSource, Validator, POLICY_FORMAT_VERSION,
};
use miniz_oxide::deflate::compress_to_vec;

pub mod git;

pub fn rule(id: &str, regex: &str, group: u32, keywords: &[&str], category: Category) -> Rule {
    Rule {
        id: id.into(),
        description: format!("{id} description"),
        regex: regex.into(),
        secret_group: group,
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
        entropy: None,
        validator: None,
        multiline: false,
        allowlist: Allowlist::default(),
        severity: Severity::Error,
        category,
        help: format!("{id} help"),
        spdx: None,
        generic: false,
        confidence: None,
        license_texts: false,
    }
}

/// `test-token` (keyword rule), `card` (validator), `spdx` (license).
pub fn policy() -> Policy {
    let mut card = rule("card", r"\b\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4}\b", 0, &[], Category::Pii);
    card.validator = Some(Validator::PaymentCard);
    card.severity = Severity::Warning;
    let mut spdx = rule(
        "spdx",
        r"SPDX-License-Identifier:\s*([A-Za-z0-9.+-]+)",
        1,
        &["spdx-license-identifier"],
        Category::License,
    );
    spdx.severity = Severity::Note;
    Policy {
        format_version: POLICY_FORMAT_VERSION,
        rules: vec![
            rule("test-token", r"\b(tok_[a-z0-9]{16})\b", 1, &["tok_"], Category::Secret),
            card,
            spdx,
        ],
    }
}

pub fn engine() -> Engine {
    Engine::new(policy()).unwrap()
}

pub fn scan_with(data: &[u8], name: &str, limits: &Limits) -> Result<Report, ArtifactError> {
    let mut engine = engine();
    let mut report = Report::default();
    scan_artifact(&mut SliceSource(data), name, &mut engine, limits, &mut report)?;
    Ok(report)
}

pub fn scan(data: &[u8], name: &str) -> Result<Report, ArtifactError> {
    scan_with(data, name, &Limits::default())
}

pub fn triples(r: &Report) -> Vec<String> {
    r.findings.iter().map(|f| format!("{}:{}:{}", f.path, f.line, f.rule_id)).collect()
}

pub const SECRET: &str = "tok_0123456789abcdef";

pub struct TarEntry<'a> {
    pub name: &'a str,
    pub kind: u8,
    pub link: &'a str,
    pub data: &'a [u8],
}

pub fn file<'a>(name: &'a str, data: &'a [u8]) -> TarEntry<'a> {
    TarEntry { name, kind: b'0', link: "", data }
}

pub fn tar_header(name: &str, kind: u8, link: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

pub fn tar(entries: &[TarEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&tar_header(e.name, e.kind, e.link, e.data.len() as u64));
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

pub fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    out.extend_from_slice(&compress_to_vec(data, 6));
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

pub struct ZipEntry<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
    pub deflate: bool,
    pub symlink: bool,
    /// Overrides the declared uncompressed size (for bomb/lie tests).
    pub declared_size: Option<u32>,
}

pub fn zfile<'a>(name: &'a str, data: &'a [u8], deflate: bool) -> ZipEntry<'a> {
    ZipEntry { name, data, deflate, symlink: false, declared_size: None }
}

pub fn zip(entries: &[ZipEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let payload = if e.deflate { compress_to_vec(e.data, 6) } else { e.data.to_vec() };
        let method: u16 = if e.deflate { 8 } else { 0 };
        let crc = crc32(e.data);
        let usize_ = e.declared_size.unwrap_or(e.data.len() as u32);
        let off = out.len() as u32;
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&20u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&method.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&usize_.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&payload);

        central.extend_from_slice(b"PK\x01\x02");
        let made_by: u16 = if e.symlink { (3 << 8) | 20 } else { 20 };
        central.extend_from_slice(&made_by.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&method.to_le_bytes());
        central.extend_from_slice(&[0; 4]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        central.extend_from_slice(&usize_.to_le_bytes());
        central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]); // extra len, comment len, disk, internal attrs
        let ext: u32 = if e.symlink { 0o120777 << 16 } else { 0o100644 << 16 };
        central.extend_from_slice(&ext.to_le_bytes());
        central.extend_from_slice(&off.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// `data` as one zstd frame of raw (stored) blocks: a valid frame any decoder reads, written
/// here so a test needs no compressor. Single segment, with its 4-byte content size.
pub fn zstd_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
    out.extend((data.len() as u32).to_le_bytes());
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(100_000).collect() };
    for (i, chunk) in chunks.iter().enumerate() {
        let last = u32::from(i + 1 == chunks.len());
        let header = last | ((chunk.len() as u32) << 3);
        out.extend(&header.to_le_bytes()[..3]);
        out.extend(*chunk);
    }
    out
}
