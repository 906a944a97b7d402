//! SARIF 2.1.0 output, in the form GitHub code scanning takes: one run; the policy's rules that
//! results name as `tool.driver.rules` (descriptions, help as text and Markdown,
//! `security-severity` and tags);
//! one result per finding with its repository-relative path, region (lines and columns; bytes
//! in a binary file), level, fingerprints and, for a suppressed finding, its `suppressions`.
//! The run names its automation id and version-control details when the job gives them.

use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{json, Value};

use crate::finding::{Finding, Report};
use crate::rule::{Category, Policy, Rule, Severity};

/// The SARIF version written.
pub const SARIF_VERSION: &str = "2.1.0";
/// The schema URI written into `$schema`.
pub const SARIF_SCHEMA: &str = "https://json.schemastore.org/sarif-2.1.0.json";
/// Key of the fingerprint in `partialFingerprints`: HMAC-SHA256 of the rule id and the secret
/// under the tenant's key (see [`crate::FingerprintKey`]): equal secrets share it.
pub const FINGERPRINT_KEY: &str = "secretHmac/v1";
/// Key of the location fingerprint in `partialFingerprints` (see
/// [`crate::Finding::location_fingerprint`]): one finding's own, stable across runs. Baselines
/// are made of these.
pub const LOCATION_FINGERPRINT_KEY: &str = "cellaLocation/v1";
/// Key of GitHub's line fingerprint in `partialFingerprints` (see
/// [`crate::Finding::line_hash`]).
pub const LINE_HASH_KEY: &str = "primaryLocationLineHash";
/// `tool.driver.informationUri` when the job gives none: the OpenAPI document that
/// `cella serve` publishes at its default address (the service passes its own address).
pub const DEFAULT_INFORMATION_URI: &str = "https://127.0.0.1:8443/v1/openapi.json";
/// The tool's name in `tool.driver.name`.
pub const TOOL_NAME: &str = "cella-scan";

/// What the run says about itself beyond the findings (all optional; from the job).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunDetails {
    /// `tool.driver.informationUri` ([`DEFAULT_INFORMATION_URI`] if `None`).
    pub information_uri: Option<String>,
    /// `automationDetails.id`: which analysis this run is (GitHub keeps one set of alerts per
    /// id, e.g. `cella/secrets/`).
    pub automation_id: Option<String>,
    /// `versionControlProvenance[0]`: the repository the artifact was taken from.
    pub repository_uri: Option<String>,
    pub revision_id: Option<String>,
    pub branch: Option<String>,
}

/// GitHub's `security-severity` (0.0–10.0; 9.0 and up is critical, 7.0 high, 4.0 medium,
/// below that low) of a rule, from its category and severity: a leaked secret at `error` is
/// critical, personal data high at most, license findings low.
pub fn security_severity(category: Category, severity: Severity) -> &'static str {
    match (category, severity) {
        (Category::Secret, Severity::Error) => "9.0",
        (Category::Secret, Severity::Warning) => "7.0",
        (Category::Secret, Severity::Note) => "3.5",
        (Category::Pii, Severity::Error) => "7.5",
        (Category::Pii, Severity::Warning) => "5.5",
        (Category::Pii, Severity::Note) => "3.0",
        (Category::License, Severity::Error) => "2.0",
        (Category::License, Severity::Warning) => "1.5",
        (Category::License, Severity::Note) => "1.0",
    }
}

/// A rule's `properties.tags`: `security`, its category, and what kind of finding it is.
pub fn tags(rule: &Rule) -> [&'static str; 3] {
    let kind = match rule.category {
        Category::Secret => "credentials",
        Category::Pii => "privacy",
        Category::License => "compliance",
    };
    ["security", rule.category.as_str(), kind]
}

/// Percent-encodes a relative path for `artifactLocation.uri`; `/` and `!` (nested archives)
/// are kept.
pub fn path_to_uri(path: &str) -> String {
    let mut s = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b'!') {
            s.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            s.push('%');
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 15)] as char);
        }
    }
    s
}

/// A SARIF `uri` back to the path it encodes, the inverse of [`path_to_uri`] (`%XX` escapes
/// decoded; anything else kept).
pub fn uri_to_path(uri: &str) -> String {
    let b = uri.as_bytes();
    let mut out = alloc::vec::Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn full_description(rule: &Rule) -> String {
    alloc::format!("{}. Category: {}. {}", rule.description, rule.category.as_str(), rule.help)
}

fn help_markdown(rule: &Rule) -> String {
    alloc::format!(
        "**{}** (`{}`, {})\n\n{}\n\nSuppress a finding that is not a secret with `cella:allow` in a comment on its line, or add it to the job's baseline.",
        rule.description,
        rule.id,
        rule.category.as_str(),
        rule.help
    )
}

fn message(rule: &Rule, f: &Finding) -> String {
    let mut text = match rule.category {
        Category::License => match f.license_score {
            Some(score) => alloc::format!("{}: license {} ({score}% match)", rule.description, f.redacted),
            None => alloc::format!("{}: license {}", rule.description, f.redacted),
        },
        _ => alloc::format!("{}: {}", rule.description, f.redacted),
    };
    if let Some(i) = &f.image {
        text.push_str(&alloc::format!(" (image {}, layer {}", i.image, i.layer));
        if let Some(later) = i.removed_in_layer {
            text.push_str(&alloc::format!("; deleted by layer {later}, but still in the image"));
        }
        text.push(')');
    }
    if let Some(h) = &f.history {
        let short = h.commit.get(..12).unwrap_or(&h.commit);
        text.push_str(&alloc::format!(" (introduced in commit {short}, {}", h.date));
        text.push_str(match h.only_in_history {
            true => "; deleted since, but still in the repository's history)",
            false => ")",
        });
    }
    text
}

/// The rules a log describes: only those some result names, in policy order. A clean scan's
/// log stays small (the guest writes it and sends it over vsock; with every rule's help it was
/// 90 KB for the built-in packs), and which rules ran is the job's policy, which its audit
/// evidence names with versions and hashes. `ruleIndex` points into this list.
struct RuleTable<'p> {
    policy: &'p Policy,
    /// Per policy rule: its index in the log's list, if listed.
    index: Vec<Option<u32>>,
}

impl<'p> RuleTable<'p> {
    fn of(policy: &'p Policy, report: &Report) -> Self {
        let mut index = alloc::vec![None; policy.rules.len()];
        for f in &report.findings {
            if let Some(slot) = index.get_mut(f.rule_index as usize) {
                *slot = Some(0);
            }
        }
        for (slot, n) in index.iter_mut().flatten().zip(0u32..) {
            *slot = n;
        }
        RuleTable { policy, index }
    }

    fn listed(&self) -> impl Iterator<Item = &'p Rule> + '_ {
        self.policy.rules.iter().zip(&self.index).filter(|(_, i)| i.is_some()).map(|(r, _)| r)
    }

    fn index_in_log(&self, f: &Finding) -> u32 {
        self.index.get(f.rule_index as usize).copied().flatten().unwrap_or(0)
    }
}

/// A finding's image layer as `properties.image` (keys in the order a JSON map sorts them).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageProps<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    created_by: Option<&'a str>,
    image: &'a str,
    layer: u32,
    layer_digest: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed_in_layer: Option<u32>,
}

fn image_props(i: &crate::archive::image::ImageOrigin) -> ImageProps<'_> {
    ImageProps {
        created_by: i.created_by.as_deref(),
        image: &i.image,
        layer: i.layer,
        layer_digest: &i.layer_digest,
        removed_in_layer: i.removed_in_layer,
    }
}

/// The SARIF log as a JSON value.
pub fn to_value(policy: &Policy, report: &Report, details: &RunDetails) -> Value {
    let table = RuleTable::of(policy, report);
    let rules: Vec<Value> = table
        .listed()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.id,
                "shortDescription": { "text": r.description },
                "fullDescription": { "text": full_description(r) },
                "help": { "text": r.help, "markdown": help_markdown(r) },
                "defaultConfiguration": { "level": r.severity.sarif_level() },
                "properties": {
                    "category": r.category.as_str(),
                    "security-severity": security_severity(r.category, r.severity),
                    "tags": tags(r),
                },
            })
        })
        .collect();
    let results: Vec<Value> = report
        .findings
        .iter()
        .map(|f| {
            let rule = &policy.rules[f.rule_index as usize];
            let mut region = json!({
                "startLine": f.line,
                "startColumn": f.column,
                "endLine": f.end_line,
                "endColumn": f.end_column,
            });
            if let Some(b) = f.bytes {
                region["byteOffset"] = json!(b.offset);
                region["byteLength"] = json!(b.length);
            }
            let mut result = json!({
                "ruleId": f.rule_id,
                "ruleIndex": table.index_in_log(f),
                "level": f.severity.sarif_level(),
                "message": { "text": message(rule, f) },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": path_to_uri(&f.path) },
                        "region": region,
                    }
                }],
                "partialFingerprints": {
                    FINGERPRINT_KEY: f.fingerprint,
                    LOCATION_FINGERPRINT_KEY: f.location_fingerprint,
                    LINE_HASH_KEY: f.line_hash,
                },
                "rank": f.confidence.sarif_rank(),
                "properties": { "category": rule.category.as_str(), "confidence": f.confidence.as_str() },
            });
            if let Some(verdict) = f.license_verdict {
                result["properties"]["licensePolicy"] = json!(verdict.as_str());
            }
            if let Some(score) = f.license_score {
                result["properties"]["licenseScore"] = json!(score);
            }
            if let Some(i) = &f.image {
                result["properties"]["image"] = serde_json::to_value(image_props(i)).unwrap_or_default();
            }
            if let Some(h) = &f.history {
                result["properties"]["history"] = json!({
                    "author": h.author,
                    "commit": h.commit,
                    "committed": h.committed,
                    "committer": h.committer,
                    "date": h.date,
                    "onlyInHistory": h.only_in_history,
                    "subject": h.subject,
                });
            }
            if let Some(s) = f.suppression {
                result["suppressions"] = json!([{
                    "kind": s.sarif_kind(),
                    "status": "accepted",
                    "justification": s.justification(),
                }]);
            }
            result
        })
        .collect();
    let mut run = json!({
        "tool": {
            "driver": {
                "name": TOOL_NAME,
                "version": env!("CARGO_PKG_VERSION"),
                "semanticVersion": env!("CARGO_PKG_VERSION"),
                "informationUri": details.information_uri.as_deref().unwrap_or(DEFAULT_INFORMATION_URI),
                "rules": rules,
            }
        },
        "columnKind": "unicodeCodePoints",
        "results": results,
    });
    if let Some(id) = &details.automation_id {
        run["automationDetails"] = json!({ "id": id });
    }
    if !report.skipped.is_empty() {
        let notes: Vec<Value> = report
            .skipped
            .iter()
            .map(|s| {
                json!({
                    "level": "warning",
                    "locations": [{ "physicalLocation": { "artifactLocation": { "uri": path_to_uri(&s.path) } } }],
                    "message": { "text": s.reason },
                })
            })
            .collect();
        run["invocations"] = json!([{ "executionSuccessful": true, "toolExecutionNotifications": notes }]);
    }
    if let Some(repo) = &details.repository_uri {
        let mut vcs = json!({ "repositoryUri": repo });
        if let Some(rev) = &details.revision_id {
            vcs["revisionId"] = json!(rev);
        }
        if let Some(branch) = &details.branch {
            vcs["branch"] = json!(branch);
        }
        run["versionControlProvenance"] = json!([vcs]);
    }
    json!({
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [run]
    })
}

/// The SARIF log serialized as JSON text: the same text as [`to_value`] pretty-printed, written
/// straight from the policy and the report. Building the `Value` tree first allocates several
/// hundred KiB for a policy of 70 rules, which in a VM means page faults that cost more than
/// the rest of a small scan's reporting.
pub fn to_json(policy: &Policy, report: &Report, details: &RunDetails) -> String {
    let table = RuleTable::of(policy, report);
    let rules: Vec<direct::Rule<'_>> = table
        .listed()
        .map(|r| direct::Rule {
            default_configuration: direct::Level { level: r.severity.sarif_level() },
            full_description: direct::OwnedText { text: full_description(r) },
            help: direct::Help { markdown: help_markdown(r), text: &r.help },
            id: &r.id,
            name: &r.id,
            properties: direct::RuleProperties {
                category: r.category.as_str(),
                security_severity: security_severity(r.category, r.severity),
                tags: tags(r),
            },
            short_description: direct::Text { text: &r.description },
        })
        .collect();
    let results: Vec<direct::Result<'_>> = report
        .findings
        .iter()
        .map(|f| {
            let rule = &policy.rules[f.rule_index as usize];
            direct::Result {
                level: f.severity.sarif_level(),
                locations: [direct::Location {
                    physical_location: direct::PhysicalLocation {
                        artifact_location: direct::ArtifactLocation { uri: path_to_uri(&f.path) },
                        region: direct::Region {
                            byte_length: f.bytes.map(|b| b.length),
                            byte_offset: f.bytes.map(|b| b.offset),
                            end_column: f.end_column,
                            end_line: f.end_line,
                            start_column: f.column,
                            start_line: f.line,
                        },
                    },
                }],
                message: direct::OwnedText { text: message(rule, f) },
                partial_fingerprints: direct::Fingerprints {
                    location: &f.location_fingerprint,
                    line_hash: &f.line_hash,
                    secret_hash: &f.fingerprint,
                },
                properties: direct::Properties {
                    category: rule.category.as_str(),
                    confidence: f.confidence.as_str(),
                    history: f.history.as_deref().map(|h| direct::History {
                        author: &h.author,
                        commit: &h.commit,
                        committed: &h.committed,
                        committer: &h.committer,
                        date: &h.date,
                        only_in_history: h.only_in_history,
                        subject: &h.subject,
                    }),
                    image: f.image.as_deref().map(image_props),
                    license_policy: f.license_verdict.map(|v| v.as_str()),
                    license_score: f.license_score,
                },
                rank: f.confidence.sarif_rank(),
                rule_id: &f.rule_id,
                rule_index: table.index_in_log(f),
                suppressions: f.suppression.map(|s| {
                    [direct::Suppression {
                        justification: s.justification(),
                        kind: s.sarif_kind(),
                        status: "accepted",
                    }]
                }),
            }
        })
        .collect();
    let log = direct::Log {
        schema: SARIF_SCHEMA,
        runs: [direct::Run {
            automation_details: details.automation_id.as_deref().map(|id| direct::AutomationDetails { id }),
            column_kind: "unicodeCodePoints",
            invocations: (!report.skipped.is_empty()).then(|| {
                [direct::Invocation {
                    execution_successful: true,
                    tool_execution_notifications: report
                        .skipped
                        .iter()
                        .map(|s| direct::Notification {
                            level: "warning",
                            locations: [direct::NotificationLocation {
                                physical_location: direct::EntryLocation {
                                    artifact_location: direct::ArtifactLocation { uri: path_to_uri(&s.path) },
                                },
                            }],
                            message: direct::Text { text: &s.reason },
                        })
                        .collect(),
                }]
            }),
            results,
            tool: direct::Tool {
                driver: direct::Driver {
                    information_uri: details.information_uri.as_deref().unwrap_or(DEFAULT_INFORMATION_URI),
                    name: TOOL_NAME,
                    rules,
                    semantic_version: env!("CARGO_PKG_VERSION"),
                    version: env!("CARGO_PKG_VERSION"),
                },
            },
            version_control_provenance: details.repository_uri.as_deref().map(|repository_uri| {
                [direct::VersionControl {
                    branch: details.branch.as_deref(),
                    repository_uri,
                    revision_id: details.revision_id.as_deref(),
                }]
            }),
        }],
        version: SARIF_VERSION,
    };
    // Plain structs of strings and integers always serialize.
    serde_json::to_string_pretty(&log).unwrap_or_default()
}

/// The SARIF objects [`to_json`] writes. Fields are declared in the order [`to_value`]'s maps
/// print them (sorted by key), so both give the same text; a test holds them to it.
mod direct {
    use alloc::string::String;
    use alloc::vec::Vec;
    use serde::Serialize;

    #[derive(Serialize)]
    pub struct Log<'a> {
        #[serde(rename = "$schema")]
        pub schema: &'a str,
        pub runs: [Run<'a>; 1],
        pub version: &'a str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Run<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub automation_details: Option<AutomationDetails<'a>>,
        pub column_kind: &'a str,
        /// Entries the scan could not read, as tool notifications (only when there are some).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub invocations: Option<[Invocation<'a>; 1]>,
        pub results: Vec<Result<'a>>,
        pub tool: Tool<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub version_control_provenance: Option<[VersionControl<'a>; 1]>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Invocation<'a> {
        pub execution_successful: bool,
        pub tool_execution_notifications: Vec<Notification<'a>>,
    }

    #[derive(Serialize)]
    pub struct Notification<'a> {
        pub level: &'a str,
        pub locations: [NotificationLocation; 1],
        pub message: Text<'a>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NotificationLocation {
        pub physical_location: EntryLocation,
    }

    /// A whole entry's location (no region).
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EntryLocation {
        pub artifact_location: ArtifactLocation,
    }

    #[derive(Serialize)]
    pub struct AutomationDetails<'a> {
        pub id: &'a str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct VersionControl<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub branch: Option<&'a str>,
        pub repository_uri: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub revision_id: Option<&'a str>,
    }

    #[derive(Serialize)]
    pub struct Tool<'a> {
        pub driver: Driver<'a>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Driver<'a> {
        pub information_uri: &'a str,
        pub name: &'a str,
        pub rules: Vec<Rule<'a>>,
        pub semantic_version: &'a str,
        pub version: &'a str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Rule<'a> {
        pub default_configuration: Level<'a>,
        pub full_description: OwnedText,
        pub help: Help<'a>,
        pub id: &'a str,
        pub name: &'a str,
        pub properties: RuleProperties<'a>,
        pub short_description: Text<'a>,
    }

    #[derive(Serialize)]
    pub struct Level<'a> {
        pub level: &'a str,
    }

    #[derive(Serialize)]
    pub struct Text<'a> {
        pub text: &'a str,
    }

    #[derive(Serialize)]
    pub struct OwnedText {
        pub text: String,
    }

    #[derive(Serialize)]
    pub struct Help<'a> {
        pub markdown: String,
        pub text: &'a str,
    }

    #[derive(Serialize)]
    pub struct RuleProperties<'a> {
        pub category: &'a str,
        #[serde(rename = "security-severity")]
        pub security_severity: &'a str,
        pub tags: [&'a str; 3],
    }

    #[derive(Serialize)]
    pub struct Properties<'a> {
        pub category: &'a str,
        pub confidence: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub history: Option<History<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub image: Option<super::ImageProps<'a>>,
        #[serde(rename = "licensePolicy", skip_serializing_if = "Option::is_none")]
        pub license_policy: Option<&'a str>,
        #[serde(rename = "licenseScore", skip_serializing_if = "Option::is_none")]
        pub license_score: Option<u8>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct History<'a> {
        pub author: &'a str,
        pub commit: &'a str,
        pub committed: &'a str,
        pub committer: &'a str,
        pub date: &'a str,
        pub only_in_history: bool,
        pub subject: &'a str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Result<'a> {
        pub level: &'a str,
        pub locations: [Location; 1],
        pub message: OwnedText,
        pub partial_fingerprints: Fingerprints<'a>,
        pub properties: Properties<'a>,
        pub rank: f64,
        pub rule_id: &'a str,
        pub rule_index: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub suppressions: Option<[Suppression; 1]>,
    }

    #[derive(Serialize)]
    pub struct Suppression {
        pub justification: String,
        pub kind: &'static str,
        pub status: &'static str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Location {
        pub physical_location: PhysicalLocation,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PhysicalLocation {
        pub artifact_location: ArtifactLocation,
        pub region: Region,
    }

    #[derive(Serialize)]
    pub struct ArtifactLocation {
        pub uri: String,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Region {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub byte_length: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub byte_offset: Option<u64>,
        pub end_column: u64,
        pub end_line: u64,
        pub start_column: u64,
        pub start_line: u64,
    }

    #[derive(Serialize)]
    pub struct Fingerprints<'a> {
        #[serde(rename = "cellaLocation/v1")]
        pub location: &'a str,
        #[serde(rename = "primaryLocationLineHash")]
        pub line_hash: &'a str,
        #[serde(rename = "secretHmac/v1")]
        pub secret_hash: &'a str,
    }
}
