//! SARIF 2.1.0 output: one run, the policy's rules as `tool.driver.rules` (with help text), one
//! result per finding with file, line, column, level and a `partialFingerprints` entry.

use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{json, Value};

use crate::finding::Report;
use crate::rule::Policy;

/// The SARIF version written.
pub const SARIF_VERSION: &str = "2.1.0";
/// The schema URI written into `$schema`.
pub const SARIF_SCHEMA: &str = "https://json.schemastore.org/sarif-2.1.0.json";
/// Key of the fingerprint in `partialFingerprints`: HMAC-SHA256 of the rule id and the secret
/// under the tenant's key (see [`crate::FingerprintKey`]).
pub const FINGERPRINT_KEY: &str = "secretHmac/v1";

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

/// The SARIF log as a JSON value.
pub fn to_value(policy: &Policy, report: &Report) -> Value {
    let rules: Vec<Value> = policy
        .rules
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.id,
                "shortDescription": { "text": r.description },
                "fullDescription": { "text": r.description },
                "help": { "text": r.help },
                "defaultConfiguration": { "level": r.severity.sarif_level() },
                "properties": { "category": r.category.as_str(), "tags": [r.category.as_str()] },
            })
        })
        .collect();
    let results: Vec<Value> = report
        .findings
        .iter()
        .map(|f| {
            let rule = &policy.rules[f.rule_index as usize];
            let text = match rule.category {
                crate::Category::License => alloc::format!("{}: license {}", rule.description, f.redacted),
                _ => alloc::format!("{}: {}", rule.description, f.redacted),
            };
            json!({
                "ruleId": f.rule_id,
                "ruleIndex": f.rule_index,
                "level": rule.severity.sarif_level(),
                "message": { "text": text },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": path_to_uri(&f.path) },
                        "region": { "startLine": f.line, "startColumn": f.column },
                    }
                }],
                "partialFingerprints": { FINGERPRINT_KEY: f.fingerprint },
                "properties": { "category": rule.category.as_str() },
            })
        })
        .collect();
    json!({
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [{
            "tool": {
                "driver": {
                    "name": "cella-scan",
                    "version": env!("CARGO_PKG_VERSION"),
                    "informationUri": "https://example.invalid/cella",
                    "rules": rules,
                }
            },
            "columnKind": "unicodeCodePoints",
            "results": results,
        }]
    })
}

/// The SARIF log serialized as JSON text: the same text as [`to_value`] pretty-printed, written
/// straight from the policy and the report. Building the `Value` tree first allocates several
/// hundred KiB for a policy of 70 rules, which in a VM means page faults that cost more than
/// the rest of a small scan's reporting.
pub fn to_json(policy: &Policy, report: &Report) -> String {
    let rules: Vec<direct::Rule<'_>> = policy
        .rules
        .iter()
        .map(|r| direct::Rule {
            default_configuration: direct::Level { level: r.severity.sarif_level() },
            full_description: direct::Text { text: &r.description },
            help: direct::Text { text: &r.help },
            id: &r.id,
            name: &r.id,
            properties: direct::RuleProperties { category: r.category.as_str(), tags: [r.category.as_str()] },
            short_description: direct::Text { text: &r.description },
        })
        .collect();
    let results: Vec<direct::Result<'_>> = report
        .findings
        .iter()
        .map(|f| {
            let rule = &policy.rules[f.rule_index as usize];
            let text = match rule.category {
                crate::Category::License => alloc::format!("{}: license {}", rule.description, f.redacted),
                _ => alloc::format!("{}: {}", rule.description, f.redacted),
            };
            direct::Result {
                level: rule.severity.sarif_level(),
                locations: [direct::Location {
                    physical_location: direct::PhysicalLocation {
                        artifact_location: direct::ArtifactLocation { uri: path_to_uri(&f.path) },
                        region: direct::Region { start_column: f.column, start_line: f.line },
                    },
                }],
                message: direct::OwnedText { text },
                partial_fingerprints: direct::Fingerprints { secret_hash: &f.fingerprint },
                properties: direct::Properties { category: rule.category.as_str() },
                rule_id: &f.rule_id,
                rule_index: f.rule_index,
            }
        })
        .collect();
    let log = direct::Log {
        schema: SARIF_SCHEMA,
        runs: [direct::Run {
            column_kind: "unicodeCodePoints",
            results,
            tool: direct::Tool {
                driver: direct::Driver {
                    information_uri: "https://example.invalid/cella",
                    name: "cella-scan",
                    rules,
                    version: env!("CARGO_PKG_VERSION"),
                },
            },
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
        pub column_kind: &'a str,
        pub results: Vec<Result<'a>>,
        pub tool: Tool<'a>,
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
        pub version: &'a str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Rule<'a> {
        pub default_configuration: Level<'a>,
        pub full_description: Text<'a>,
        pub help: Text<'a>,
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
    pub struct RuleProperties<'a> {
        pub category: &'a str,
        pub tags: [&'a str; 1],
    }

    #[derive(Serialize)]
    pub struct Properties<'a> {
        pub category: &'a str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Result<'a> {
        pub level: &'a str,
        pub locations: [Location; 1],
        pub message: OwnedText,
        pub partial_fingerprints: Fingerprints<'a>,
        pub properties: Properties<'a>,
        pub rule_id: &'a str,
        pub rule_index: u32,
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
        pub start_column: u64,
        pub start_line: u64,
    }

    #[derive(Serialize)]
    pub struct Fingerprints<'a> {
        #[serde(rename = "secretHmac/v1")]
        pub secret_hash: &'a str,
    }
}
