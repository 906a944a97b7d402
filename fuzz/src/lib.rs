//! What the fuzz targets share: the artifact harness with its structure checks (one harness, the
//! three archive targets differ in their seed corpora and artifact names), and a reader that
//! hands its input out in pieces the fuzzer chooses.

use std::io::Read;
use std::sync::{Mutex, OnceLock};

use cella_scan::SliceSource;
use cella_scan::{
    extract_artifact, normalize_entry_path, scan_artifact, ArtifactError, Engine, Limits, Report,
};

/// Limits small enough that the fuzzer reaches every one of them with small inputs.
pub fn artifact_limits() -> Limits {
    Limits {
        max_entries: 64,
        max_entry_size: 256 << 10,
        max_decompressed: 4 << 20,
        max_ratio: 50,
        max_depth: 3,
        max_nested_archive: 512 << 10,
        max_findings: 64,
        max_binary_bytes: 64 << 10,
        max_history_bundle: 512 << 10,
        max_git_objects: 256,
        max_git_object: 256 << 10,
        max_delta_depth: 16,
        max_delta_chain_bytes: 1 << 20,
        max_history_inflated: 4 << 20,
        history_delta_scan: true,
    }
}

/// `max_decompressed` of the second, extraction-only pass.
const TIGHT_DECOMPRESSED: u64 = 16 << 10;

/// Content an extraction may hand out in all.
pub const EXTRACT_BUDGET: u64 = 1 << 20;

/// The engine of the built-in packs a default scan uses, compiled once per process.
fn engine() -> &'static Mutex<Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let policy = cella_policies::rules::load_packs(cella_policies::rules::DEFAULT_PACKS)
            .expect("the built-in packs load");
        Mutex::new(Engine::from_policy_json(policy.as_bytes()).expect("the built-in policy compiles"))
    })
}

/// Reads `data` as the artifact `name` the two ways the guest does: extracted into a session's
/// index ([`extract_artifact`]) and scanned ([`scan_artifact`]). Panics (a crash for libFuzzer)
/// when what was accepted breaks a limit or a path rule, or when the two disagree: they share
/// every check, so a scan refuses what an extraction refuses, and the other way round, except
/// that an extraction also bounds each file and the content in all.
pub fn artifact(data: &[u8], name: &str) {
    let limits = artifact_limits();
    let mut files: Vec<(String, usize)> = Vec::new();
    let extracted =
        extract_artifact(&mut SliceSource(data), name, "", &limits, EXTRACT_BUDGET, |path, bytes| {
            files.push((path.to_owned(), bytes.len()));
            Ok(())
        });
    if extracted.is_ok() {
        check_extracted(data, name, &limits, &files);
    }

    // Again with a total small enough that content multiplied without decompression (a zip
    // whose entries share their data) would show: only extraction, which is cheap.
    let tight = Limits { max_decompressed: TIGHT_DECOMPRESSED, ..limits.clone() };
    let mut tight_total = 0u64;
    let tight_extracted =
        extract_artifact(&mut SliceSource(data), name, "", &tight, EXTRACT_BUDGET, |_, bytes| {
            tight_total += bytes.len() as u64;
            Ok(())
        });
    if tight_extracted.is_ok() {
        let bound = TIGHT_DECOMPRESSED + data.len() as u64;
        assert!(
            tight_total <= bound,
            "{tight_total} bytes from {} input bytes, over max_decompressed",
            data.len()
        );
    }

    let mut engine = engine().lock().unwrap_or_else(|e| e.into_inner());
    let mut report = Report::default();
    let scanned = scan_artifact(&mut SliceSource(data), name, &mut engine, &limits, &mut report);
    match (&extracted, &scanned) {
        (Ok(()), Err(e)) => panic!("extracted, but the scan refused it: {e:?}"),
        (Err(ArtifactError::EntryTooLarge { .. }), Ok(())) => {}
        (Err(e), Ok(())) => panic!("scanned, but the extraction refused it: {e:?}"),
        (Err(ArtifactError::EntryTooLarge { .. }), Err(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b, "the scan and the extraction refuse differently"),
        (Ok(()), Ok(())) => {
            // Binary files are scanned too (their printable strings).
            assert_eq!(report.files_scanned, files.len() as u64, "files scanned, and extracted");
            let text: u64 = files.iter().map(|(_, len)| *len as u64).sum();
            // A bundle's history is scanned, not extracted (it holds no files of the artifact).
            let history = report.history.as_ref().map_or(0, |h| h.bytes_scanned);
            let scanned = report.bytes_scanned - history;
            assert!(scanned <= text, "{scanned} bytes scanned of {text}");
            assert!(report.findings.len() <= limits.max_findings, "findings over max_findings");
        }
    }
}

/// What an accepted artifact must look like.
fn check_extracted(data: &[u8], name: &str, limits: &Limits, files: &[(String, usize)]) {
    assert!(files.len() as u64 <= limits.max_entries, "{} files, over max_entries", files.len());
    let total: u64 = files.iter().map(|(_, len)| *len as u64).sum();
    assert!(total <= EXTRACT_BUDGET, "{total} bytes extracted, over the budget");
    // Stored content comes from the input itself; everything else was decompressed.
    let bound = limits.max_decompressed + data.len() as u64;
    assert!(total <= bound, "{total} bytes from {} input bytes, over max_decompressed", data.len());
    for (path, len) in files {
        assert!(*len as u64 <= limits.max_entry_size, "`{path}`: {len} bytes, over max_entry_size");
        if path == name {
            continue; // the artifact itself, a plain file
        }
        // Each layer's part of the path is a normalized relative path.
        for part in path.split("!/") {
            assert_eq!(normalize_entry_path(part).as_deref(), Ok(part), "path `{path}` is not normalized");
        }
        assert!(path.split("!/").count() as u32 <= limits.max_depth, "`{path}` nests deeper than max_depth");
    }
}

/// A reader that returns its input in pieces whose sizes come from the input itself, so that
/// parsers that read from a stream see every way a peer can split its bytes.
#[derive(Debug)]
pub struct Chunked<'a> {
    sizes: &'a [u8],
    data: &'a [u8],
}

impl<'a> Chunked<'a> {
    /// The first byte says how many of the following bytes are piece sizes (at most 16).
    pub fn new(input: &'a [u8]) -> Self {
        let (n, rest) = match input.split_first() {
            Some((n, rest)) => (usize::from(n % 17).min(rest.len()), rest),
            None => (0, input),
        };
        let (sizes, data) = rest.split_at(n);
        Chunked { sizes, data }
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = match self.sizes.split_first() {
            Some((&size, rest)) => {
                self.sizes = rest;
                usize::from(size).max(1)
            }
            None => usize::MAX,
        };
        let n = want.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
