//! Checks of a SARIF log shared by the tests that make one (the engine's here, the service's
//! end to end through `#[path]`): the OASIS 2.1.0 schema (vendored next to this file) and what
//! GitHub code scanning requires of an upload.

use serde_json::Value;

pub fn schema() -> Value {
    let text = include_str!("../sarif-schema-2.1.0.json");
    serde_json::from_str(text).unwrap()
}

pub fn schema_errors(value: &Value) -> Vec<String> {
    let validator = jsonschema::draft4::new(&schema()).unwrap();
    validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect()
}

/// Whether `s` is an absolute URI (a scheme, then `:`).
fn absolute_uri(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, rest)) => {
            !scheme.is_empty()
                && scheme.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
                && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                && !rest.is_empty()
        }
        None => false,
    }
}

/// Everything in `log` that GitHub code scanning's upload would refuse or mishandle, per its
/// documented SARIF support: version and runs, at most 20 runs; a driver with a name (and here
/// a version and an absolute information URI); at most 25,000 rules and 25,000 results per
/// run; each rule with an id, descriptions, help text and Markdown, at most 20 tags including
/// `security`, and a `security-severity` that parses as a number from 0.0 to 10.0; each result
/// with a rule id naming a rule (and the rule index pointing at it), a level, a message, one
/// location with a relative URI (no scheme, not absolute, no `..`, no backslash) and a region
/// whose lines and columns start at 1 and end after they start, `partialFingerprints` with a
/// `primaryLocationLineHash` of the form `<16 hex>:<n>` (and no two results of a rule with the
/// same fingerprints: GitHub would make them one alert), and well-formed suppressions;
/// automation details and version-control provenance well-formed where present.
pub fn github_problems(log: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if log["version"] != "2.1.0" {
        p.push("version is not 2.1.0".to_owned());
    }
    if !log["$schema"].is_string() {
        p.push("no $schema".to_owned());
    }
    let Some(runs) = log["runs"].as_array() else {
        p.push("no runs array".to_owned());
        return p;
    };
    if runs.len() > 20 {
        p.push(format!("{} runs (at most 20)", runs.len()));
    }
    for (ri, run) in runs.iter().enumerate() {
        let driver = &run["tool"]["driver"];
        if driver["name"].as_str().is_none_or(str::is_empty) {
            p.push(format!("run {ri}: tool.driver.name missing"));
        }
        for key in ["version", "semanticVersion"] {
            if driver[key].as_str().is_none_or(str::is_empty) {
                p.push(format!("run {ri}: tool.driver.{key} missing"));
            }
        }
        if !driver["informationUri"].as_str().is_some_and(absolute_uri) {
            p.push(format!("run {ri}: informationUri is not an absolute URI"));
        }
        let rules = driver["rules"].as_array().cloned().unwrap_or_default();
        if rules.len() > 25_000 {
            p.push(format!("run {ri}: {} rules (at most 25,000)", rules.len()));
        }
        let mut ids = std::collections::BTreeSet::new();
        for rule in &rules {
            let id = rule["id"].as_str().unwrap_or("");
            if id.is_empty() || !ids.insert(id.to_owned()) {
                p.push(format!("run {ri}: rule id `{id}` empty or repeated"));
            }
            for path in ["/shortDescription/text", "/fullDescription/text", "/help/text", "/help/markdown"] {
                if rule.pointer(path).and_then(Value::as_str).is_none_or(str::is_empty) {
                    p.push(format!("rule {id}: {path} missing"));
                }
            }
            let tags = rule["properties"]["tags"].as_array().cloned().unwrap_or_default();
            if tags.is_empty() || tags.len() > 20 || !tags.iter().all(Value::is_string) {
                p.push(format!("rule {id}: properties.tags must be 1 to 20 strings"));
            }
            if !tags.iter().any(|t| t == "security") {
                p.push(format!("rule {id}: no `security` tag"));
            }
            match rule["properties"]["security-severity"].as_str().map(str::parse::<f64>) {
                Some(Ok(s)) if (0.0..=10.0).contains(&s) => {}
                _ => p.push(format!("rule {id}: security-severity is not a string number from 0.0 to 10.0")),
            }
        }
        let results = run["results"].as_array().cloned().unwrap_or_default();
        if results.len() > 25_000 {
            p.push(format!("run {ri}: {} results (at most 25,000)", results.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, r) in results.iter().enumerate() {
            let rule_id = r["ruleId"].as_str().unwrap_or("");
            if !seen.insert((rule_id.to_owned(), r["partialFingerprints"].to_string())) {
                p.push(format!(
                    "result {i}: same fingerprints as an earlier result of `{rule_id}` (one alert)"
                ));
            }
            if !ids.contains(rule_id) {
                p.push(format!("result {i}: ruleId `{rule_id}` names no rule"));
            }
            if let Some(index) = r["ruleIndex"].as_u64() {
                if rules.get(index as usize).map(|rule| &rule["id"]) != Some(&r["ruleId"]) {
                    p.push(format!("result {i}: ruleIndex {index} is not rule `{rule_id}`"));
                }
            }
            if !matches!(r["level"].as_str(), Some("error" | "warning" | "note" | "none")) {
                p.push(format!("result {i}: bad level {}", r["level"]));
            }
            if r["message"]["text"].as_str().is_none_or(str::is_empty) {
                p.push(format!("result {i}: no message.text"));
            }
            let locations = r["locations"].as_array().cloned().unwrap_or_default();
            if locations.is_empty() || locations.len() > 1000 {
                p.push(format!("result {i}: {} locations (1 to 1000)", locations.len()));
            }
            for loc in &locations {
                let phys = &loc["physicalLocation"];
                let uri = phys["artifactLocation"]["uri"].as_str().unwrap_or("");
                if uri.is_empty()
                    || absolute_uri(uri)
                    || uri.starts_with('/')
                    || uri.contains('\\')
                    || uri.split('/').any(|c| c == ".." || c == "." || c.is_empty())
                {
                    p.push(format!("result {i}: artifactLocation.uri `{uri}` is not a clean relative path"));
                }
                let region = &phys["region"];
                let n = |k: &str| region[k].as_u64();
                match (n("startLine"), n("startColumn"), n("endLine"), n("endColumn")) {
                    (Some(sl), Some(sc), Some(el), Some(ec))
                        if sl >= 1 && sc >= 1 && el >= sl && ec >= 1 && (el > sl || ec >= sc) => {}
                    other => p.push(format!("result {i}: bad region lines/columns {other:?}")),
                }
                if region.get("byteOffset").is_some() != region.get("byteLength").is_some() {
                    p.push(format!("result {i}: byteOffset without byteLength or the reverse"));
                }
            }
            let fps = r["partialFingerprints"].as_object().cloned().unwrap_or_default();
            if fps.is_empty() || !fps.values().all(|v| v.as_str().is_some_and(|s| !s.is_empty())) {
                p.push(format!("result {i}: partialFingerprints missing or empty"));
            }
            let line_hash = fps.get("primaryLocationLineHash").and_then(Value::as_str).unwrap_or("");
            let ok = line_hash.split_once(':').is_some_and(|(h, n)| {
                h.len() == 16
                    && h.bytes().all(|b| b.is_ascii_hexdigit())
                    && n.parse::<u64>().is_ok_and(|n| n >= 1)
            });
            if !ok {
                p.push(format!("result {i}: primaryLocationLineHash `{line_hash}` is not <16 hex>:<n>"));
            }
            for s in r["suppressions"].as_array().cloned().unwrap_or_default() {
                if !matches!(s["kind"].as_str(), Some("inSource" | "external"))
                    || !matches!(s["status"].as_str(), Some("accepted" | "underReview" | "rejected"))
                {
                    p.push(format!("result {i}: bad suppression {s}"));
                }
            }
        }
        if let Some(a) = run.get("automationDetails") {
            if a["id"].as_str().is_none_or(str::is_empty) {
                p.push(format!("run {ri}: automationDetails without an id"));
            }
        }
        for v in run["versionControlProvenance"].as_array().cloned().unwrap_or_default() {
            if !v["repositoryUri"].as_str().is_some_and(absolute_uri) {
                p.push(format!("run {ri}: versionControlProvenance.repositoryUri is not an absolute URI"));
            }
        }
    }
    p
}

/// The SARIF log in the file at `path`, checked first against the schema and GitHub's rules
/// (the service's end-to-end tests read the logs `cella scan` wrote).
#[allow(dead_code)]
pub fn checked_sarif(path: &std::path::Path) -> Value {
    let log: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(schema_errors(&log), Vec::<String>::new(), "{}: schema", path.display());
    assert_eq!(github_problems(&log), Vec::<String>::new(), "{}: GitHub", path.display());
    log
}
