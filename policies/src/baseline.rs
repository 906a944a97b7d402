//! Baselines: the findings a code base already has, so a gate fails only on new ones. A
//! baseline is a set of `cellaLocation/v1` fingerprints (see `cella_scan::Finding`): one per
//! known finding, the same in every scan made with the same fingerprint key (the tenant's),
//! whatever lines move around it. A scan given a baseline keeps every finding, marking those
//! it lists as suppressed ("in the baseline").
//!
//! A baseline comes from a Cella baseline file or from the SARIF log of an earlier Cella scan
//! (each result's `partialFingerprints["cellaLocation/v1"]`). The file format, versioned:
//!
//! ```json
//! {
//!   "format": "cella-baseline/1",
//!   "created_at": "2026-12-06T10:15:00Z",
//!   "fingerprints": ["3f1c…(64 hex digits)", "…"]
//! }
//! ```
//!
//! ```
//! use cella_policies::baseline::Baseline;
//! # let dir = std::env::temp_dir().join(format!("baseline-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let sarif = br#"{"version":"2.1.0","runs":[{"results":[{"partialFingerprints":{"cellaLocation/v1":"00000000000000000000000000000000000000000000000000000000000000aa"}}]}]}"#;
//! let baseline = Baseline::from_sarif(sarif)?;
//! baseline.write(&dir.join("cella-baseline.json"))?;
//! let again = Baseline::read(&dir.join("cella-baseline.json"))?;
//! assert_eq!(again.fingerprints(), baseline.fingerprints());
//! let payload = again.wire_payload(); // the job's baseline frame
//! # assert_eq!(payload.len(), 32);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use cella_scan::sarif::LOCATION_FINGERPRINT_KEY;
use cella_scan::{to_hex, FingerprintSet};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The `format` of the baseline files this module reads and writes.
pub const FORMAT: &str = "cella-baseline/1";
/// The largest baseline file or SARIF log read.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// The most fingerprints a baseline may hold.
pub const MAX_FINGERPRINTS: usize = 1_000_000;

/// Why a baseline could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("cannot read baseline {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("baseline {} is larger than {limit} bytes: keep a baseline file (`cella-baseline/1`) rather than a large SARIF log", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot write baseline {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the baseline is not JSON: give a Cella baseline file (`cella-baseline/1`) or the SARIF log of a Cella scan")]
    NotJson(#[source] serde_json::Error),
    #[error("this JSON is neither a Cella baseline file (`\"format\": \"{FORMAT}\"`) nor a SARIF 2.1.0 log (`\"version\": \"2.1.0\"`, `\"runs\"`): give one of those")]
    Unrecognized,
    #[error("baseline format `{found}` is not one this Cella reads (it reads `{FORMAT}`): make the baseline again with this version")]
    UnsupportedFormat { found: String },
    #[error("SARIF version `{found}` is not 2.1.0, the version Cella writes: make the baseline from a Cella scan's SARIF log")]
    UnsupportedSarif { found: String },
    #[error("the baseline file is not shaped like `{FORMAT}` (format, created_at, fingerprints)")]
    Malformed(#[source] serde_json::Error),
    #[error("the baseline file's created_at `{value}` is not an RFC 3339 time")]
    BadTime { value: String },
    #[error("the SARIF log is malformed")]
    MalformedSarif(#[source] serde_json::Error),
    #[error("baseline fingerprint #{index} `{value}` is not 64 hex digits (a `cellaLocation/v1` value)")]
    BadFingerprint { index: usize, value: String },
    #[error("SARIF run {run}, result {result} has no `{LOCATION_FINGERPRINT_KEY}` fingerprint: the log was not written by Cella's scanner (or by an older one); make the baseline from this Cella's SARIF output")]
    SarifWithoutFingerprint { run: usize, result: usize },
    #[error("the baseline holds {count} fingerprints, more than the limit of {MAX_FINGERPRINTS}")]
    TooMany { count: usize },
}

/// A set of known findings' `cellaLocation/v1` fingerprints, and when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baseline {
    fingerprints: FingerprintSet,
    created_at: String,
}

/// The file, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BaselineFile {
    format: String,
    created_at: String,
    fingerprints: Vec<String>,
}

/// Enough of either kind of file to tell them apart.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    format: Option<serde_json::Value>,
    #[serde(default)]
    version: Option<serde_json::Value>,
    #[serde(default)]
    runs: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct SarifLog {
    version: String,
    #[serde(default)]
    runs: Vec<SarifRun>,
}

#[derive(Deserialize)]
struct SarifRun {
    #[serde(default)]
    results: Option<Vec<SarifResult>>,
}

#[derive(Deserialize)]
struct SarifResult {
    #[serde(default, rename = "partialFingerprints")]
    partial_fingerprints: HashMap<String, String>,
}

fn now() -> String {
    // Formatting a UTC time as RFC 3339 cannot fail for years 0–9999.
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}

fn checked(count: usize) -> Result<(), BaselineError> {
    if count > MAX_FINGERPRINTS {
        return Err(BaselineError::TooMany { count });
    }
    Ok(())
}

impl Baseline {
    /// A baseline of these fingerprints, made now.
    pub fn new(fingerprints: FingerprintSet) -> Self {
        Baseline { fingerprints, created_at: now() }
    }

    /// The fingerprints of every result of a Cella scan's SARIF log (suppressed ones too, so a
    /// baseline made again from a gated scan keeps what it had). Refuses a log whose results
    /// lack Cella's location fingerprint.
    pub fn from_sarif(bytes: &[u8]) -> Result<Self, BaselineError> {
        let log: SarifLog = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                BaselineError::NotJson(e)
            }
            _ => BaselineError::MalformedSarif(e),
        })?;
        if log.version != "2.1.0" {
            return Err(BaselineError::UnsupportedSarif { found: log.version });
        }
        let mut fingerprints = Vec::new();
        for (run, r) in log.runs.iter().enumerate() {
            for (result, res) in r.results.iter().flatten().enumerate() {
                let value = res
                    .partial_fingerprints
                    .get(LOCATION_FINGERPRINT_KEY)
                    .ok_or(BaselineError::SarifWithoutFingerprint { run, result })?;
                let fp = FingerprintSet::parse_hex(value).ok_or_else(|| BaselineError::BadFingerprint {
                    index: fingerprints.len(),
                    value: value.clone(),
                })?;
                fingerprints.push(fp);
            }
        }
        checked(fingerprints.len())?;
        Ok(Baseline::new(FingerprintSet::new(fingerprints)))
    }

    /// A baseline from either a Cella baseline file or a SARIF log (told apart by their
    /// `format` and `version` fields); anything else is refused, saying what is expected.
    pub fn parse(bytes: &[u8]) -> Result<Self, BaselineError> {
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                BaselineError::NotJson(e)
            }
            _ => BaselineError::Unrecognized,
        })?;
        match (&probe.format, &probe.version, &probe.runs) {
            (Some(serde_json::Value::String(format)), _, _) if format != FORMAT => {
                Err(BaselineError::UnsupportedFormat { found: format.clone() })
            }
            (Some(serde_json::Value::String(_)), _, _) => Self::from_file(bytes),
            (None, Some(serde_json::Value::String(_)), Some(_)) => Self::from_sarif(bytes),
            _ => Err(BaselineError::Unrecognized),
        }
    }

    fn from_file(bytes: &[u8]) -> Result<Self, BaselineError> {
        let file: BaselineFile = serde_json::from_slice(bytes).map_err(BaselineError::Malformed)?;
        if file.format != FORMAT {
            return Err(BaselineError::UnsupportedFormat { found: file.format });
        }
        if OffsetDateTime::parse(&file.created_at, &Rfc3339).is_err() {
            return Err(BaselineError::BadTime { value: file.created_at });
        }
        checked(file.fingerprints.len())?;
        let fingerprints = file
            .fingerprints
            .iter()
            .enumerate()
            .map(|(index, value)| {
                FingerprintSet::parse_hex(value)
                    .ok_or_else(|| BaselineError::BadFingerprint { index, value: value.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Baseline { fingerprints: FingerprintSet::new(fingerprints), created_at: file.created_at })
    }

    /// Reads a baseline file or SARIF log (at most [`MAX_FILE_BYTES`]); see [`Baseline::parse`].
    pub fn read(path: &Path) -> Result<Self, BaselineError> {
        let read_error = |source| BaselineError::Read { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_error)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(BaselineError::TooLarge { path: path.to_owned(), limit: MAX_FILE_BYTES });
        }
        Self::parse(&bytes)
    }

    /// The baseline file's text (`cella-baseline/1`, one fingerprint per line, sorted).
    pub fn to_json(&self) -> String {
        let mut out =
            format!("{{\n  \"format\": \"{FORMAT}\",\n  \"created_at\": {},\n  \"fingerprints\": [", {
                serde_json::Value::String(self.created_at.clone())
            });
        for (i, fp) in self.fingerprints.iter().enumerate() {
            out.push_str(if i == 0 { "\n    \"" } else { ",\n    \"" });
            out.push_str(&to_hex(fp));
            out.push('"');
        }
        out.push_str(if self.fingerprints.is_empty() { "]\n}\n" } else { "\n  ]\n}\n" });
        out
    }

    /// Writes the baseline file: to `<path>.tmp` first, then renamed over `path`, so a reader
    /// never sees half a file (the temporary is removed if the write fails).
    pub fn write(&self, path: &Path) -> Result<(), BaselineError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(self.to_json().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        written.map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            BaselineError::Write { path: path.to_owned(), source }
        })
    }

    /// The fingerprints.
    pub fn fingerprints(&self) -> &FingerprintSet {
        &self.fingerprints
    }

    /// When the baseline was made (RFC 3339).
    pub fn created_at(&self) -> &str {
        &self.created_at
    }

    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    /// The payload of a job's baseline frame (`cella_proto::Kind::Baseline`): the fingerprints
    /// as 32-byte values, back to back.
    pub fn wire_payload(&self) -> Vec<u8> {
        self.fingerprints.to_wire()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> String {
        format!("{:064x}", n)
    }

    fn sarif(results: &str) -> String {
        format!(
            r#"{{"$schema":"x","version":"2.1.0","runs":[{{"tool":{{"driver":{{"name":"cella-scan"}}}},"results":[{results}]}}]}}"#
        )
    }

    #[test]
    fn a_sarif_logs_location_fingerprints_make_the_baseline() {
        let log = sarif(&format!(
            r#"{{"partialFingerprints":{{"secretHmac/v1":"{}","cellaLocation/v1":"{}"}},"suppressions":[{{"kind":"external"}}]}},
               {{"partialFingerprints":{{"cellaLocation/v1":"{}"}}}},{{"partialFingerprints":{{"cellaLocation/v1":"{}"}}}}"#,
            fp(9),
            fp(2),
            fp(1).to_uppercase(),
            fp(2)
        ));
        let b = Baseline::from_sarif(log.as_bytes()).unwrap();
        let got: Vec<String> = b.fingerprints().iter().map(|f| to_hex(f)).collect();
        assert_eq!(got, [fp(1), fp(2)]);
        assert_eq!(Baseline::parse(log.as_bytes()).unwrap().fingerprints(), b.fingerprints());
        assert!(OffsetDateTime::parse(b.created_at(), &Rfc3339).is_ok());
        let empty = Baseline::from_sarif(sarif("").as_bytes()).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn the_file_round_trips_and_reads_back_exactly() {
        let dir = std::env::temp_dir().join(format!("cella-baseline-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.json");
        let b = Baseline::new(FingerprintSet::new(vec![[7; 32], [1; 32]]));
        b.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\n  \"format\": \"cella-baseline/1\",\n  \"created_at\": \"{}\",\n  \"fingerprints\": [\n    \"{}\",\n    \"{}\"\n  ]\n}}\n",
                b.created_at(),
                "01".repeat(32),
                "07".repeat(32)
            )
        );
        assert!(!dir.join("b.json.tmp").exists());
        assert_eq!(Baseline::read(&path).unwrap(), b);
        let empty = Baseline::new(FingerprintSet::default());
        empty.write(&path).unwrap();
        assert_eq!(Baseline::read(&path).unwrap(), empty);
        assert_eq!(b.wire_payload(), [[1u8; 32], [7; 32]].concat());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn anything_else_is_refused_saying_what_is_expected() {
        let msg = |bytes: &[u8]| Baseline::parse(bytes).unwrap_err().to_string();
        assert!(msg(b"fingerprints: [a, b]").starts_with("the baseline is not JSON"), "{}", msg(b"x"));
        assert!(msg(br#"{"fingerprints":[]}"#).starts_with("this JSON is neither a Cella baseline file"));
        assert!(msg(b"[1,2]").starts_with("this JSON is neither"));
        assert_eq!(
            msg(br#"{"format":"cella-baseline/9","created_at":"x","fingerprints":[]}"#),
            "baseline format `cella-baseline/9` is not one this Cella reads (it reads `cella-baseline/1`): make the baseline again with this version"
        );
        assert!(msg(br#"{"version":"2.0.0","runs":[]}"#).starts_with("SARIF version `2.0.0` is not 2.1.0"));
        let bad = format!(
            r#"{{"format":"cella-baseline/1","created_at":"2026-01-01T00:00:00Z","fingerprints":["{}","xyz"]}}"#,
            fp(1)
        );
        assert_eq!(
            msg(bad.as_bytes()),
            "baseline fingerprint #1 `xyz` is not 64 hex digits (a `cellaLocation/v1` value)"
        );
        let extra =
            r#"{"format":"cella-baseline/1","created_at":"2026-01-01T00:00:00Z","fingerprints":[],"note":1}"#;
        assert!(msg(extra.as_bytes()).starts_with("the baseline file is not shaped like"));
        let time = r#"{"format":"cella-baseline/1","created_at":"yesterday","fingerprints":[]}"#;
        assert_eq!(
            msg(time.as_bytes()),
            "the baseline file's created_at `yesterday` is not an RFC 3339 time"
        );
        // Another tool's SARIF: its results carry no Cella location fingerprint.
        let foreign = sarif(r#"{"ruleId":"x","partialFingerprints":{"primaryLocationLineHash":"ab:1"}}"#);
        assert!(msg(foreign.as_bytes())
            .starts_with("SARIF run 0, result 0 has no `cellaLocation/v1` fingerprint"));
        let missing = Baseline::read(Path::new("/nonexistent/baseline.json")).unwrap_err();
        assert_eq!(missing.to_string(), "cannot read baseline /nonexistent/baseline.json");
    }
}
