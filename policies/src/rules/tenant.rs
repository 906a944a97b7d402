//! Tenant rule packs: what a pack a tenant uploads to the service (or tries with `cella pack
//! test`) must pass, with every problem located by line and column in the file as written; and
//! the policy a job runs, from built-in packs and tenant packs that passed this before.
//!
//! A pack is Cella's own TOML (`policies/rules/*.toml`) or a gitleaks configuration, converted
//! (`gitleaks.rs`). Either way it is refused when it is too big ([`PackLimits`]), is not
//! TOML, misses a field or has one it should not, holds a regex that does not compile or whose
//! compiled form passes [`PackLimits::max_regex_bytes`] ("catastrophic"), uses a rule id twice or
//! the id of a built-in rule. What passes is the pack, its Cella TOML (the text itself, or the
//! conversion) and the compiled size of its regexes, which counts against the tenant's quota.

use std::fmt;

use regex_automata::meta;
use regex_automata::util::syntax;

use cella_scan::{check_rule, Policy, POLICY_FORMAT_VERSION};

use super::lines::{split_toml_message, Location, Spans};
use super::{combine, pack, serialize, CompiledPolicy, Pack, PolicyError, BUILTIN_PACKS};

/// How big one pack may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLimits {
    /// Bytes of the file as uploaded.
    pub max_bytes: usize,
    /// Rules in it.
    pub max_rules: usize,
    /// What one regex's automaton (regex-automata's Thompson NFA) may take compiled: past it
    /// the regex is "catastrophic".
    pub max_regex_bytes: usize,
    /// What all the pack's regexes may take compiled together (also bounds the time an upload's
    /// validation takes).
    pub max_compiled_bytes: u64,
}

impl Default for PackLimits {
    fn default() -> Self {
        // The largest built-in regex compiles to ~60 KiB; the largest built-in pack is 16 KB
        // with 55 rules.
        PackLimits {
            max_bytes: 512 << 10,
            max_rules: 500,
            max_regex_bytes: 1 << 20,
            max_compiled_bytes: 64 << 20,
        }
    }
}

/// The formats a pack may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackFormat {
    /// Cella's own (`[pack]` and `[[rules]]`, as `policies/rules/*.toml`).
    Cella,
    /// A gitleaks configuration (`[[rules]]` with `regex`, `secretGroup`, `[allowlist]`, …).
    Gitleaks,
}

impl PackFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PackFormat::Cella => "cella",
            PackFormat::Gitleaks => "gitleaks",
        }
    }

    /// `cella` or `gitleaks`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "cella" => Some(PackFormat::Cella),
            "gitleaks" => Some(PackFormat::Gitleaks),
            _ => None,
        }
    }

    /// The format `text` looks like: Cella's when it has a `[pack]` table or a rule with a
    /// field only Cella's format has (`help`, `secret_group`, `severity`, `category`),
    /// gitleaks' otherwise.
    pub fn guess(text: &str) -> Self {
        let Ok(spans) = Spans::parse(text) else { return PackFormat::Cella };
        if spans.root().contains_key("pack") {
            return PackFormat::Cella;
        }
        let cella_only = ["help", "secret_group", "severity", "category"];
        if spans.rules().iter().any(|r| cella_only.iter().any(|k| r.contains_key(k))) {
            PackFormat::Cella
        } else {
            PackFormat::Gitleaks
        }
    }
}

impl fmt::Display for PackFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pack that passed [`validate`].
#[derive(Debug, Clone)]
pub struct ValidatedPack {
    pub format: PackFormat,
    /// The pack, named as asked (else by its `[pack] name`).
    pub pack: Pack,
    /// Its Cella TOML: the text itself, or what a gitleaks configuration became.
    pub cella_toml: String,
    /// What its regexes take compiled, in bytes (rules' regexes and allowlist regexes).
    pub compiled_bytes: u64,
}

impl ValidatedPack {
    pub fn rule_ids(&self) -> Vec<String> {
        self.pack.rules.iter().map(|r| r.id.clone()).collect()
    }
}

/// Why a pack was refused; each problem inside the file says where (`line 12, column 1: …`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PackError {
    #[error("the pack is {bytes} bytes, more than the limit of {limit}: split it into smaller packs")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the pack has {rules} rules, more than the limit of {limit}: split it into smaller packs")]
    TooManyRules { rules: usize, limit: usize },
    #[error("the pack has no rules: add at least one [[rules]] table")]
    NoRules,
    #[error(
        "{}: rule `{rule}`: with it the pack's regexes take more than {limit} bytes compiled: split the pack, \
         or simplify its regexes",
        Where(*at)
    )]
    CompiledTooLarge { at: Option<Location>, rule: String, limit: u64 },
    #[error("{}: {message}", Where(*at))]
    Syntax { at: Option<Location>, message: String },
    #[error("{}: rule `{rule}`: {problem}", Where(*at))]
    Rule { at: Option<Location>, rule: String, problem: String },
    #[error(
        "{}: rule `{rule}`: its {what} is catastrophic: compiled it would take more than {limit} bytes \
         (nested or very large counted repetitions, like `(\\w{{100}}){{100}}`, or a huge alternation): bound \
         the repetitions or split the rule",
        Where(*at)
    )]
    Catastrophic { at: Option<Location>, rule: String, what: &'static str, limit: usize },
    #[error("{}: rule id `{rule}` is used twice (first at line {first_line}): give each rule its own id", Where(*at))]
    DuplicateId { at: Option<Location>, rule: String, first_line: usize },
    #[error(
        "{}: rule id `{rule}` is the id of a rule of the built-in pack `{pack}`: rename the rule",
        Where(*at)
    )]
    BuiltinId { at: Option<Location>, rule: String, pack: String },
    /// A construct of the input format that Cella cannot honour (gitleaks' `[extend]`, a rule's
    /// `path`, `regexTarget = "line"`, `\C`, …), by name.
    #[error("{}: {construct} is not supported: {help}", Where(*at))]
    Unsupported { at: Option<Location>, construct: String, help: String },
}

impl PackError {
    /// Where in the file the problem is, if it is in one place.
    pub fn location(&self) -> Option<Location> {
        match self {
            PackError::TooLarge { .. } | PackError::TooManyRules { .. } | PackError::NoRules => None,
            PackError::Syntax { at, .. }
            | PackError::Rule { at, .. }
            | PackError::Catastrophic { at, .. }
            | PackError::CompiledTooLarge { at, .. }
            | PackError::DuplicateId { at, .. }
            | PackError::BuiltinId { at, .. }
            | PackError::Unsupported { at, .. } => *at,
        }
    }
}

/// `line 3, column 1`, or `the pack` when the place is not known.
struct Where(Option<Location>);

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(at) => write!(f, "{at}"),
            None => f.write_str("the pack"),
        }
    }
}

/// Where the rules of the Cella TOML being checked came from, for error locations: the file
/// itself, or the gitleaks configuration it was converted from.
pub(super) trait Locate {
    /// The `index`th rule's table.
    fn rule(&self, index: usize) -> Option<Location>;
    /// Key `path` of the `index`th rule (in Cella's names), else the rule.
    fn key(&self, index: usize, path: &[&str]) -> Option<Location>;
    /// Whether a location in the Cella TOML is one in the user's file (it is not in a
    /// conversion).
    fn locates_text(&self) -> bool {
        true
    }
    /// A problem as the user should read it (field names of their format).
    fn wording(&self, problem: String) -> String {
        problem
    }
}

impl Locate for Spans<'_> {
    fn rule(&self, index: usize) -> Option<Location> {
        Spans::rule(self, index)
    }

    fn key(&self, index: usize, path: &[&str]) -> Option<Location> {
        self.rule_key(index, path)
    }
}

/// Validates an uploaded pack (see the module's documentation). `name`: what to call it (a
/// Cella pack's `[pack] name` otherwise; a gitleaks configuration's pack is called `gitleaks`).
pub fn validate(
    text: &str,
    format: PackFormat,
    name: Option<&str>,
    limits: &PackLimits,
) -> Result<ValidatedPack, PackError> {
    if text.len() > limits.max_bytes {
        return Err(PackError::TooLarge { bytes: text.len(), limit: limits.max_bytes });
    }
    let spans = Spans::parse(text).map_err(|e| PackError::Syntax { at: e.at, message: e.message })?;
    let rules = spans.rules().len();
    if rules > limits.max_rules {
        return Err(PackError::TooManyRules { rules, limit: limits.max_rules });
    }
    let (cella_toml, mut pack, compiled_bytes) = match format {
        PackFormat::Cella => {
            let (pack, bytes) = check(text, &spans, limits)?;
            (text.to_owned(), pack, bytes)
        }
        PackFormat::Gitleaks => {
            let converted = super::gitleaks::convert(&spans, name.unwrap_or("gitleaks"))?;
            let (pack, bytes) = check(&converted.toml, &converted, limits)?;
            (converted.toml, pack, bytes)
        }
    };
    if let Some(name) = name {
        pack.name = name.to_owned();
    }
    Ok(ValidatedPack { format, pack, cella_toml, compiled_bytes })
}

/// Checks the Cella TOML `text` in full; problems are located by `at`.
fn check(text: &str, at: &dyn Locate, limits: &PackLimits) -> Result<(Pack, u64), PackError> {
    let pack = pack::parse("tenant pack", text, pack::Check::ShapeOnly).map_err(|e| match e {
        PolicyError::Malformed { message, .. } => {
            let (location, message) = split_toml_message(&message);
            PackError::Syntax { at: location.filter(|_| at.locates_text()), message: at.wording(message) }
        }
        PolicyError::InvalidRule { rule, problem, .. } => {
            let index = rule_index(text, &rule);
            let location = index.and_then(|i| match problem_key(&problem) {
                Some(path) => at.key(i, &path),
                None => at.rule(i),
            });
            PackError::Rule { at: location, rule, problem: at.wording(problem) }
        }
        other => PackError::Syntax { at: None, message: other.to_string() },
    })?;
    if pack.rules.is_empty() {
        return Err(PackError::NoRules);
    }
    let builtin: Vec<(String, &str)> = BUILTIN_PACKS
        .iter()
        .filter_map(|(name, _)| super::trusted_builtin_pack(name).ok().map(|p| (*name, p)))
        .flat_map(|(name, p)| p.rules.into_iter().map(move |r| (r.id, name)))
        .collect();
    let mut compiled = 0u64;
    for (i, rule) in pack.rules.iter().enumerate() {
        let id = rule.id.clone();
        if let Some(first) = pack.rules[..i].iter().position(|r| r.id == id) {
            let first_line = at.rule(first).map_or(0, |l| l.line);
            return Err(PackError::DuplicateId { at: at.rule(i), rule: id, first_line });
        }
        if let Some((_, pack)) = builtin.iter().find(|(b, _)| *b == id) {
            return Err(PackError::BuiltinId { at: at.key(i, &["id"]), rule: id, pack: (*pack).to_owned() });
        }
        let regexes = std::iter::once((&rule.regex, "regex", ["regex", ""]))
            .chain(rule.allowlist.regexes.iter().map(|r| (r, "allowlist regex", ["allowlist", "regexes"])))
            .chain(rule.allowlist.paths.iter().map(|r| (r, "allowlist path regex", ["allowlist", "paths"])));
        for (pattern, what, path) in regexes {
            let path: Vec<&str> = path.into_iter().filter(|p| !p.is_empty()).collect();
            match compiled_size(pattern, limits.max_regex_bytes) {
                Ok(bytes) => {
                    compiled += bytes as u64;
                    if compiled > limits.max_compiled_bytes {
                        return Err(PackError::CompiledTooLarge {
                            at: at.rule(i),
                            rule: id,
                            limit: limits.max_compiled_bytes,
                        });
                    }
                }
                Err(Size::Catastrophic) => {
                    return Err(PackError::Catastrophic {
                        at: at.key(i, &path),
                        rule: id,
                        what,
                        limit: limits.max_regex_bytes,
                    })
                }
                // Worded by check_rule below, as the engine words it.
                Err(Size::DoesNotCompile) => {}
            }
        }
        check_rule(rule).map_err(|problem| PackError::Rule {
            at: match problem_key(&problem) {
                Some(path) => at.key(i, &path),
                None => at.rule(i),
            },
            rule: id.clone(),
            problem: at.wording(problem),
        })?;
        let examples = pack.examples.get(i).cloned().unwrap_or_default();
        super::examples::check(rule, &examples).map_err(|e| {
            let key = match e {
                super::examples::ExampleError::Found { .. } => "negative_examples",
                _ => "examples",
            };
            PackError::Rule { at: at.key(i, &[key]).or(at.rule(i)), rule: id.clone(), problem: e.to_string() }
        })?;
    }
    Ok((pack, compiled))
}

/// The rule a problem of `pack::parse` names: its id, or `#N (no id)`.
fn rule_index(text: &str, label: &str) -> Option<usize> {
    if let Some(n) =
        label.strip_prefix('#').and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<usize>().ok())
    {
        return n.checked_sub(1);
    }
    let spans = Spans::parse(text).ok()?;
    spans.rules().iter().position(|r| r.get("id").and_then(|i| i.as_str()) == Some(label))
}

/// The key a problem (of `check_rule` or the pack's shape) is about.
fn problem_key(problem: &str) -> Option<Vec<&str>> {
    let quoted = |prefix: &str| {
        problem.strip_prefix(prefix).and_then(|r| r.strip_prefix('`')).and_then(|r| r.split('`').next())
    };
    if let Some(field) = quoted("unknown field ") {
        return Some(vec![field]);
    }
    let key: &[&str] = if problem.starts_with("regex") {
        &["regex"]
    } else if problem.starts_with("secret_group") {
        &["secret_group"]
    } else if problem.starts_with("allowlist regex") {
        &["allowlist", "regexes"]
    } else if problem.starts_with("allowlist path regex") {
        &["allowlist", "paths"]
    } else if problem.starts_with("an allowlist stopword") {
        &["allowlist", "stopwords"]
    } else if problem.starts_with("keyword") {
        &["keywords"]
    } else if problem.starts_with("entropy") {
        &["entropy"]
    } else if problem.starts_with("spdx") {
        &["spdx"]
    } else if problem.starts_with("id ") {
        &["id"]
    } else if problem.starts_with("description") {
        &["description"]
    } else if problem.starts_with("help") {
        &["help"]
    } else {
        return None;
    };
    Some(key.to_vec())
}

pub(super) enum Size {
    Catastrophic,
    DoesNotCompile,
}

/// What `pattern` takes compiled as the engine compiles it, refusing to build past `limit`.
pub(super) fn compiled_size(pattern: &str, limit: usize) -> Result<usize, Size> {
    let config = syntax::Config::new().unicode(false).utf8(false);
    syntax::parse_with(pattern, &config).map_err(|_| Size::DoesNotCompile)?;
    // As the engine builds it (`cella_scan` engine.rs), with the NFA capped at `limit`.
    let built = meta::Regex::builder()
        .syntax(config)
        .configure(meta::Config::new().utf8_empty(false).auto_prefilter(false).nfa_size_limit(Some(limit)))
        .build(pattern);
    match built {
        Ok(re) => Ok(re.memory_usage()),
        Err(e) if e.size_limit().is_some() => Err(Size::Catastrophic),
        Err(_) => Err(Size::DoesNotCompile),
    }
}

/// A pack stored by the service after it passed [`validate`], parsed again for a job (its
/// regexes are not compiled again: the guest compiles each on first use). `name` is what the
/// job calls it (`mypack@3`), in errors and duplicate-rule messages.
pub fn stored_pack(name: &str, cella_toml: &str) -> Result<Pack, PolicyError> {
    let mut pack = pack::parse(name, cella_toml, pack::Check::ShapeOnly)?;
    pack.name = name.to_owned();
    Ok(pack)
}

/// The policy of built-in packs `builtin` (by name) and tenant packs `tenant` (from
/// [`stored_pack`]), in that order, without compiling any regex again (every pack was validated
/// in full before: the built-in ones by the tests, the tenant's when they were uploaded). A
/// rule id in two packs is refused, naming both.
pub fn tenant_policy(builtin: &[&str], tenant: Vec<Pack>) -> Result<CompiledPolicy, PolicyError> {
    let mut packs = builtin.iter().map(|n| super::trusted_builtin_pack(n)).collect::<Result<Vec<_>, _>>()?;
    packs.extend(tenant);
    let (policy, owner) = combine(&packs)?;
    serialize(policy, &owner)
}

/// A compiled policy read back from its serialized form (`cella-vmm scan --compiled-policy`):
/// checked to be a policy of this format version with rules; its regexes are compiled by the
/// guest as it uses them.
pub fn read_compiled(bytes: Vec<u8>) -> Result<CompiledPolicy, PolicyError> {
    let malformed = |message: String| PolicyError::Malformed { pack: "compiled policy".into(), message };
    let policy: Policy = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    if policy.format_version != POLICY_FORMAT_VERSION {
        return Err(malformed(format!(
            "format version {} (this Cella reads {POLICY_FORMAT_VERSION})",
            policy.format_version
        )));
    }
    if policy.rules.is_empty() {
        return Err(PolicyError::Empty);
    }
    Ok(CompiledPolicy { policy, bytes })
}

#[cfg(test)]
mod tests;
