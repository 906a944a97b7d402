//! The TOML pack format: a `[pack]` header with defaults (and `exclude`, path globs where the
//! pack's rules do not apply), then `[[rules]]`.

use serde::Deserialize;

use cella_scan::{check_rule, glob_to_regex, Allowlist, Category, Confidence, Rule, Severity, Validator};

use super::{Examples, Pack, PolicyError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackHeader {
    name: String,
    category: Option<Category>,
    severity: Option<Severity>,
    /// Gitignore-like globs of files none of this pack's rules look at (see
    /// `cella_scan::glob_to_regex`): added to every rule's path allowlist.
    #[serde(default)]
    exclude: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackFile {
    pack: PackHeader,
    #[serde(default)]
    rules: Vec<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct AllowlistToml {
    regexes: Vec<String>,
    stopwords: Vec<String>,
    paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    id: String,
    description: String,
    /// Empty for a `license_texts` rule.
    #[serde(default)]
    regex: String,
    #[serde(default)]
    secret_group: u32,
    #[serde(default)]
    keywords: Vec<String>,
    entropy: Option<f32>,
    validator: Option<Validator>,
    #[serde(default)]
    multiline: bool,
    #[serde(default)]
    allowlist: AllowlistToml,
    severity: Option<Severity>,
    category: Option<Category>,
    help: String,
    spdx: Option<String>,
    #[serde(default)]
    generic: bool,
    confidence: Option<Confidence>,
    #[serde(default)]
    license_texts: bool,
    /// Text the rule must find (each scanned as a file of its own, with this rule alone).
    #[serde(default)]
    examples: Vec<String>,
    /// Text the rule must not find: near misses, placeholders, look-alikes.
    #[serde(default)]
    negative_examples: Vec<String>,
}

/// Parses and validates one pack. `source` names the pack in errors until its `[pack] name` is
/// known (a built-in pack's name, or a file path).
pub fn parse_pack(source: &str, text: &str) -> Result<Pack, PolicyError> {
    parse(source, text, Check::Full)
}

/// How much of a rule [`parse`] checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Everything, compiling every regex ([`check_rule`]) and running every rule's examples
    /// ([`super::examples`]): for packs from outside.
    Full,
    /// The pack's shape only. For the built-in packs, which the tests check in full
    /// (`rules::tests::builtin_packs_pass_full_validation`): compiling their regexes again on
    /// every launch would cost milliseconds and could find nothing new.
    ShapeOnly,
}

pub(super) fn parse(source: &str, text: &str, check: Check) -> Result<Pack, PolicyError> {
    let file: PackFile = toml::from_str(text)
        .map_err(|e| PolicyError::Malformed { pack: source.to_owned(), message: e.to_string() })?;
    let pack_name = file.pack.name;
    let excluded = file
        .pack
        .exclude
        .iter()
        .map(|g| glob_to_regex(g))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PolicyError::InvalidExclude { pack: pack_name.clone(), source: e })?;
    let mut rules = Vec::with_capacity(file.rules.len());
    let mut examples = Vec::with_capacity(file.rules.len());
    for (i, value) in file.rules.into_iter().enumerate() {
        let label = value
            .get("id")
            .and_then(toml::Value::as_str)
            .map_or_else(|| format!("#{} (no id)", i + 1), str::to_owned);
        let invalid = |problem: String| PolicyError::InvalidRule {
            pack: pack_name.clone(),
            rule: label.clone(),
            problem,
        };
        let r: RuleToml = value.try_into().map_err(|e: toml::de::Error| invalid(e.message().to_owned()))?;
        let category = r
            .category
            .or(file.pack.category)
            .ok_or_else(|| invalid("no category (set it on the rule or in [pack])".to_owned()))?;
        let severity = r
            .severity
            .or(file.pack.severity)
            .ok_or_else(|| invalid("no severity (set it on the rule or in [pack])".to_owned()))?;
        let rule = Rule {
            id: r.id,
            description: r.description,
            regex: r.regex,
            secret_group: r.secret_group,
            keywords: r.keywords,
            entropy: r.entropy,
            validator: r.validator,
            multiline: r.multiline,
            allowlist: Allowlist {
                regexes: r.allowlist.regexes,
                stopwords: r.allowlist.stopwords,
                paths: r.allowlist.paths.into_iter().chain(excluded.iter().cloned()).collect(),
            },
            severity,
            category,
            help: r.help,
            spdx: r.spdx,
            generic: r.generic,
            confidence: r.confidence,
            license_texts: r.license_texts,
        };
        let rule_examples = Examples { positive: r.examples, negative: r.negative_examples };
        if check == Check::Full {
            check_rule(&rule).map_err(invalid)?;
            super::examples::check(&rule, &rule_examples).map_err(|e| invalid(e.to_string()))?;
        }
        rules.push(rule);
        examples.push(rule_examples);
    }
    Ok(Pack { name: pack_name, rules, examples })
}
