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
/// Key of the fingerprint in `partialFingerprints`.
pub const FINGERPRINT_KEY: &str = "secretHash/v1";

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

/// The SARIF log serialized as JSON text.
pub fn to_json(policy: &Policy, report: &Report) -> String {
    // A `Value` always serializes.
    serde_json::to_string_pretty(&to_value(policy, report)).unwrap_or_default()
}
