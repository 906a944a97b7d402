//! Cella's scan engine: finds secrets, personal data and licenses in a tenant's artifact. It runs
//! inside the microVM (`no_std` + `alloc`), and natively on the host for benchmarks and tests.
//!
//! It owns the rule model ([`Policy`], [`Rule`]), the engine ([`Engine`]: Aho–Corasick keyword
//! prefilter, regex-automata, validators, entropy, allowlists, streaming with exact line
//! numbers, binary files' printable strings), what keeps a finding from counting (inline
//! markers, a baseline of fingerprints, path excludes as gitignore-like globs:
//! [`glob_to_regex`]), the artifact readers ([`scan_artifact`]: plain file, tar, gzip, zip,
//! with limits) and the output ([`Report`], [`Summary`], [`sarif`]). The host-side loading of rule packs lives
//! in `cella-policies`, which hands the guest a serialized [`Policy`].
//!
//! ```
//! use cella_scan::{scan_artifact, Engine, Limits, Report, SliceSource};
//! # let policy_json = br#"{"format_version":1,"rules":[]}"#;
//! let mut engine = Engine::from_policy_json(policy_json)?;
//! let mut report = Report::default();
//! let artifact = b"hello";
//! scan_artifact(&mut SliceSource(artifact), "hello.txt", &mut engine, &Limits::default(), &mut report)?;
//! let sarif = cella_scan::sarif::to_json(engine.policy(), &report, &Default::default());
//! let summary = report.summary_json(engine.policy(), 3);
//! # assert!(sarif.contains("2.1.0") && summary.contains("files_scanned"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod archive;
mod binary;
pub mod checksum;
mod engine;
mod error;
mod finding;
mod glob;
mod history;
pub mod index;
pub mod license_text;
pub mod parallel;
pub mod placeholder;
mod rule;
pub mod sarif;
mod source;
pub mod spdx;
pub mod validate;
mod window;

pub use archive::image::{ImageOrigin, ImageSummary};
pub use archive::path::{check_link, normalize as normalize_entry_path};
pub use archive::{extract_artifact, scan_artifact, Limits, RATIO_MIN_OUTPUT};
pub use engine::{
    check_rule, Engine, FindingSpan, BINARY_SNIFF_LEN, CHUNK_LEN, FILTER_REGEXES, LINE_FILTER_AFTER,
    OVERLAP_LEN,
};
pub use error::{ArtifactError, EngineError, HistoryProblem};
pub use finding::{
    fingerprint, gate, hmac_sha256, in_test_fixture, line_hash, location_fingerprint, redact, to_hex,
    ByLevel, ByteRange, Finding, FingerprintKey, FingerprintSet, Report, SkippedEntry, Summary, Suppressed,
    Suppression, INLINE_MARKERS, MAX_SKIPPED_LISTED,
};
pub use glob::{glob_to_regex, GlobError};
pub use history::{HistorySummary, Origin, HISTORY_ENTRY};
pub use rule::{
    Allowlist, Category, Confidence, Policy, Rule, Severity, Validator, MULTILINE_WINDOW,
    POLICY_FORMAT_VERSION,
};
pub use source::{SliceSource, Source, SourceError, VecSource};
