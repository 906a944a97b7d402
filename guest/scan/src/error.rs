//! Errors of the scan engine and the artifact readers.

use alloc::string::String;
use core::fmt;

use crate::glob::GlobError;
use crate::source::SourceError;

/// Building an [`Engine`](crate::Engine) from a policy failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The serialized policy is not valid JSON for [`Policy`](crate::Policy).
    PolicyFormat(String),
    /// The policy was produced by an incompatible version.
    PolicyVersion { found: u32, expected: u32 },
    /// A rule's regex (or allowlist regex) does not compile.
    Regex { rule: String, what: &'static str, message: String },
    /// The keyword prefilter could not be built.
    Keywords(String),
    /// An exclude glob was refused.
    Exclude(GlobError),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::PolicyFormat(m) => write!(f, "compiled policy is malformed: {m}"),
            EngineError::PolicyVersion { found, expected } => {
                write!(f, "compiled policy has format version {found}, this engine reads {expected}")
            }
            EngineError::Regex { rule, what, message } => {
                write!(f, "rule `{rule}`: {what} does not compile: {message}")
            }
            EngineError::Keywords(m) => write!(f, "keyword prefilter cannot be built: {m}"),
            EngineError::Exclude(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for EngineError {}

/// Why an archive was refused. Every variant names the entry (or the artifact) it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactError {
    /// The byte source failed.
    Source(SourceError),
    /// An entry path climbs out of the archive root with `..`.
    PathEscapesRoot { entry: String },
    /// An entry path is absolute (`/x`, `C:\x`).
    AbsolutePath { entry: String },
    /// A symlink or hardlink points outside the archive root.
    LinkEscapesRoot { entry: String, target: String },
    /// Decompressed size grows too fast relative to the compressed input.
    DecompressionRatio { entry: String, ratio: u64, limit: u64 },
    /// Total decompressed bytes exceed the absolute cap.
    DecompressedTotal { entry: String, limit: u64 },
    /// More entries than allowed.
    TooManyEntries { entry: String, limit: u64 },
    /// One entry is larger than allowed.
    EntryTooLarge { entry: String, size: u64, limit: u64 },
    /// Archives nested deeper than allowed.
    NestingTooDeep { entry: String, limit: u32 },
    /// The archive ends in the middle of a header or entry.
    Truncated { entry: String },
    /// The archive's structure is inconsistent (bad checksum, bad signature, bad field).
    Corrupt { entry: String, reason: &'static str },
    /// A feature this reader does not handle (encryption, zip64, a compression method).
    Unsupported { entry: String, feature: &'static str },
    /// A rule failed to compile when first used (lazy engines only).
    Engine(EngineError),
    /// A git bundle (a repository's history) could not be read, or exceeds a limit.
    History { entry: String, problem: HistoryProblem },
}

/// What is wrong with a git bundle or its pack. Each names the limit or the part at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryProblem {
    /// The bundle's header (signature, capabilities, references) is malformed.
    BadBundle(&'static str),
    /// The bundle uses SHA-256 object names (or another unknown object format).
    ObjectFormat(String),
    /// The pack's structure is inconsistent.
    BadPack { offset: u64, reason: &'static str },
    /// The pack ends in the middle of an object or its trailer.
    Truncated { offset: u64 },
    /// The pack's trailing SHA-1 does not match its content.
    PackChecksum,
    /// More objects than the limit.
    TooManyObjects { count: u64, limit: u64 },
    /// One object (or delta result) is larger than the limit.
    ObjectTooLarge { offset: u64, size: u64, limit: u64 },
    /// A delta's base offset is not the start of an earlier object in the pack.
    BaseOutOfRange { offset: u64 },
    /// A delta chain is longer than the limit.
    DeltaTooDeep { offset: u64, limit: u32 },
    /// The objects of one delta chain, held at once to resolve it, exceed the limit.
    DeltaChainTooLarge { offset: u64, limit: u64 },
    /// A delta's instructions are malformed (a copy outside its base, a wrong result size).
    BadDelta { offset: u64, reason: &'static str },
    /// Deltas whose base is not in the pack: a delta cycle, or a base the pack lacks although
    /// the bundle claims to be complete.
    UnresolvedDeltas { count: u64 },
    /// Bytes inflated and reconstructed from deltas exceed the limit (a decompression bomb).
    InflatedTotal { limit: u64 },
    /// A commit, tree or tag object cannot be parsed.
    BadObject { oid: String, reason: &'static str },
}

impl HistoryProblem {
    /// Whether this is a limit (which refuses the artifact) rather than damage (which, inside
    /// an archive, skips the bundle).
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            HistoryProblem::TooManyObjects { .. }
                | HistoryProblem::ObjectTooLarge { .. }
                | HistoryProblem::DeltaTooDeep { .. }
                | HistoryProblem::DeltaChainTooLarge { .. }
                | HistoryProblem::InflatedTotal { .. }
        )
    }
}

impl fmt::Display for HistoryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HistoryProblem::*;
        match self {
            BadBundle(why) => write!(f, "not a readable git bundle: {why}"),
            ObjectFormat(format) => write!(
                f,
                "the repository uses the `{format}` object format; Cella reads SHA-1 repositories only"
            ),
            BadPack { offset, reason } => write!(f, "its pack is corrupt at byte {offset}: {reason}"),
            Truncated { offset } => write!(f, "its pack is truncated (at byte {offset})"),
            PackChecksum => write!(f, "its pack's SHA-1 checksum does not match its content"),
            TooManyObjects { count, limit } => {
                write!(f, "its pack holds {count} objects, over the limit of {limit}")
            }
            ObjectTooLarge { offset, size, limit } => write!(
                f,
                "the object at pack byte {offset} is {size} bytes, over the {limit}-byte object limit"
            ),
            BaseOutOfRange { offset } => write!(
                f,
                "the delta at pack byte {offset} names a base that is not an earlier object of the pack"
            ),
            DeltaTooDeep { offset, limit } => write!(
                f,
                "the delta chain through pack byte {offset} is deeper than the limit of {limit}"
            ),
            DeltaChainTooLarge { offset, limit } => write!(
                f,
                "the delta chain through pack byte {offset} holds more than the limit of {limit} bytes"
            ),
            BadDelta { offset, reason } => write!(f, "the delta at pack byte {offset} is malformed: {reason}"),
            UnresolvedDeltas { count } => write!(
                f,
                "{count} deltas have no base in the pack (a delta cycle, or a missing base in a bundle that claims to be complete)"
            ),
            InflatedTotal { limit } => write!(
                f,
                "looks like a decompression bomb: more than {limit} bytes inflated and rebuilt from deltas"
            ),
            BadObject { oid, reason } => write!(f, "object {oid} is malformed: {reason}"),
        }
    }
}

impl ArtifactError {
    /// Whether this says an entry's content cannot be read (damaged, cut short, or a feature
    /// Cella does not read): inside an archive, that entry is skipped and reported, and the
    /// rest is scanned. Everything else (limits, paths out of the root, the artifact's own
    /// reads) refuses the artifact.
    pub fn is_unreadable_entry(&self) -> bool {
        matches!(
            self,
            ArtifactError::Truncated { .. }
                | ArtifactError::Corrupt { .. }
                | ArtifactError::Unsupported { .. }
        ) || matches!(self, ArtifactError::History { problem, .. } if !problem.is_limit())
    }
}

impl fmt::Display for ArtifactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ArtifactError::*;
        match self {
            Source(e) => write!(f, "{e}"),
            PathEscapesRoot { entry } => write!(f, "artifact entry `{entry}` escapes the archive root"),
            AbsolutePath { entry } => write!(f, "artifact entry `{entry}` has an absolute path"),
            LinkEscapesRoot { entry, target } => {
                write!(f, "artifact entry `{entry}` is a link to `{target}`, outside the archive root")
            }
            DecompressionRatio { entry, ratio, limit } => write!(
                f,
                "artifact entry `{entry}` looks like a decompression bomb: ratio {ratio}:1 exceeds {limit}:1"
            ),
            DecompressedTotal { entry, limit } => write!(
                f,
                "artifact entry `{entry}` looks like a decompression bomb: more than {limit} bytes decompressed"
            ),
            TooManyEntries { entry, limit } => {
                write!(f, "artifact entry `{entry}` exceeds the limit of {limit} entries")
            }
            EntryTooLarge { entry, size, limit } => {
                write!(f, "artifact entry `{entry}` is {size} bytes, over the {limit}-byte entry limit")
            }
            NestingTooDeep { entry, limit } => {
                write!(f, "artifact entry `{entry}` nests archives deeper than {limit} levels")
            }
            Truncated { entry } => write!(f, "artifact entry `{entry}` is truncated"),
            Corrupt { entry, reason } => write!(f, "artifact entry `{entry}` is corrupt: {reason}"),
            Unsupported { entry, feature } => {
                write!(f, "artifact entry `{entry}` uses an unsupported feature: {feature}")
            }
            Engine(e) => write!(f, "{e}"),
            History { entry, problem } => write!(f, "git history `{entry}`: {problem}"),
        }
    }
}

/// `Source` and `Engine` are transparent wrappers: their message is the inner error's, so no
/// `source()` is reported (a printed chain reads once).
impl core::error::Error for ArtifactError {}

impl From<SourceError> for ArtifactError {
    fn from(e: SourceError) -> Self {
        ArtifactError::Source(e)
    }
}

impl From<EngineError> for ArtifactError {
    fn from(e: EngineError) -> Self {
        ArtifactError::Engine(e)
    }
}
