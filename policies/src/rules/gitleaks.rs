//! gitleaks configurations (gitleaks' documented TOML format) converted to Cella packs, so a
//! tenant can bring the rules it already has. What Cella can honour is converted; everything
//! else is refused by name with its line, never dropped quietly.
//!
//! | gitleaks | Cella |
//! |---|---|
//! | `title`, `description` | `title` in a comment of the converted pack; `description` ignored |
//! | `[extend]` | refused: inline the rules of the configuration it extends |
//! | `[[rules]]` `id`, `description`, `keywords` | the same (no description: the id) |
//! | `regex` (Go RE2) | translated where the syntaxes differ, or refused by name ([`re2`]) |
//! | `secretGroup` | `secret_group`; unset or 0 with exactly one capture group: that group (gitleaks' rule) |
//! | `entropy` | `entropy` (0: none). Cella keeps a secret whose entropy equals it; gitleaks drops it |
//! | `tags` | kept in a comment above the rule, otherwise ignored |
//! | `path` | refused: Cella runs every rule on every file (no rule limited to some paths) |
//! | `[[rules.required]]`, `skipReport = true` | refused: composite rules are not supported |
//! | `[rules.allowlist]`, `[[rules.allowlists]]` | the rule's `[rules.allowlist]` (`regexes`, `stopwords`, `paths`) |
//! | `[allowlist]`, `[[allowlists]]` (global; `targetRules`) | merged into every rule's (or the targeted rules') allowlist |
//! | `regexTarget` | `secret` (default); `match` when the rule's secret is its whole match; `line` refused |
//! | `condition` | `OR` (default); `AND` when the allowlist has one kind of check, else refused |
//! | `commits` | refused: Cella scans artifacts, with no git history |
//!
//! Every rule becomes category `secret`, severity `error`, with a help text saying to remove and
//! revoke the secret. Keys are matched without regard to case, as gitleaks (viper) does; a key
//! gitleaks does not document is refused by name (gitleaks would ignore it).

mod re2;

use std::collections::HashMap;

use regex_automata::util::syntax;
use toml_edit::{Item, TableLike, Value};

use super::lines::{Location, Spans};
use super::tenant::{Locate, PackError};

/// A gitleaks configuration as a Cella pack, with where each rule came from.
pub(super) struct Converted {
    /// The Cella pack TOML.
    pub toml: String,
    origins: Vec<Origin>,
}

/// Where one converted rule's fields are in the gitleaks file.
struct Origin {
    at: Option<Location>,
    /// Cella key (`regex`, `secret_group`, `allowlist`) → its place in the gitleaks file.
    keys: HashMap<&'static str, Option<Location>>,
}

impl Locate for Converted {
    fn rule(&self, index: usize) -> Option<Location> {
        self.origins.get(index)?.at
    }

    fn key(&self, index: usize, path: &[&str]) -> Option<Location> {
        let origin = self.origins.get(index)?;
        let key = path.first().copied().unwrap_or("");
        origin.keys.get(key).copied().flatten().or(origin.at)
    }

    fn locates_text(&self) -> bool {
        false
    }

    fn wording(&self, problem: String) -> String {
        problem.replace("secret_group", "secretGroup")
    }
}

/// The help text of every converted rule.
const HELP: &str =
    "A secret found by a rule of your gitleaks configuration: remove it from the artifact and revoke \
                    or rotate it.";

/// A key of a table, with where it is.
struct Entry<'t> {
    /// As written.
    key: &'t str,
    /// Lowercased, as gitleaks compares keys.
    lower: String,
    item: &'t Item,
    at: Option<Location>,
}

fn entries<'t>(spans: &Spans<'_>, table: &'t dyn TableLike) -> Vec<Entry<'t>> {
    table
        .iter()
        .map(|(key, item)| {
            let at = table.get_key_value(key).and_then(|(k, _)| spans.at(k.span()));
            Entry { key, lower: key.to_ascii_lowercase(), item, at }
        })
        .collect()
}

fn unsupported(at: Option<Location>, construct: impl Into<String>, help: impl Into<String>) -> PackError {
    PackError::Unsupported { at, construct: construct.into(), help: help.into() }
}

fn wrong(e: &Entry<'_>, message: String) -> PackError {
    PackError::Syntax { at: e.at, message }
}

fn unknown_key(e: &Entry<'_>, place: &str, known: &str) -> PackError {
    unsupported(
        e.at,
        format!("key `{}` in {place}", e.key),
        format!("it is not part of gitleaks' documented format (the keys there are {known})"),
    )
}

fn string(e: &Entry<'_>) -> Result<String, PackError> {
    e.item.as_str().map(str::to_owned).ok_or_else(|| wrong(e, format!("`{}` must be a string", e.key)))
}

fn strings(e: &Entry<'_>) -> Result<Vec<String>, PackError> {
    let not = || wrong(e, format!("`{}` must be an array of strings", e.key));
    let array = e.item.as_array().ok_or_else(not)?;
    array.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(not)).collect()
}

fn number(e: &Entry<'_>) -> Result<f64, PackError> {
    match e.item.as_value() {
        Some(Value::Float(f)) => Ok(*f.value()),
        Some(Value::Integer(i)) => Ok(*i.value() as f64),
        _ => Err(wrong(e, format!("`{}` must be a number", e.key))),
    }
}

/// A table of an array of tables, with where it starts.
type Located<'t> = (&'t dyn TableLike, Option<Location>);

fn tables<'t>(spans: &Spans<'_>, e: &Entry<'t>) -> Result<Vec<Located<'t>>, PackError> {
    match e.item {
        Item::ArrayOfTables(a) => Ok(a.iter().map(|t| (t as &dyn TableLike, spans.at(t.span()))).collect()),
        Item::Value(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_inline_table() {
                Some(t) => Ok((t as &dyn TableLike, spans.at(t.span()))),
                None => Err(wrong(e, format!("`{}` must be an array of tables ([[{}]])", e.key, e.key))),
            })
            .collect(),
        _ => Err(wrong(e, format!("`{}` must be an array of tables ([[{}]])", e.key, e.key))),
    }
}

fn table<'t>(e: &Entry<'t>) -> Result<&'t dyn TableLike, PackError> {
    e.item.as_table_like().ok_or_else(|| wrong(e, format!("`{}` must be a table ([{}])", e.key, e.key)))
}

/// What an allowlist's regexes are tested against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Secret,
    Match,
}

/// One gitleaks allowlist.
struct Allow {
    target: Target,
    target_at: Option<Location>,
    regexes: Vec<String>,
    stopwords: Vec<String>,
    paths: Vec<String>,
    /// Global allowlists only: the rules it applies to (none: every rule).
    target_rules: Vec<String>,
    target_rules_at: Option<Location>,
}

const ALLOWLIST_KEYS: &str = "description, condition, regexTarget, regexes, stopwords, paths, commits";

/// Translates an allowlist's regexes (or paths) and checks that each compiles.
fn allow_regexes(e: &Entry<'_>, what: &str) -> Result<Vec<String>, PackError> {
    let mut out = Vec::new();
    for pattern in strings(e)? {
        let translated = translate(e.at, &pattern)?;
        if let Err(err) = syntax::parse_with(&translated, &syntax_config()) {
            return Err(wrong(e, format!("{what} `{pattern}` does not compile: {err}")));
        }
        out.push(translated);
    }
    Ok(out)
}

fn parse_allowlist(
    spans: &Spans<'_>,
    table: &dyn TableLike,
    at: Option<Location>,
    global: bool,
) -> Result<Allow, PackError> {
    let mut allow = Allow {
        target: Target::Secret,
        target_at: None,
        regexes: Vec::new(),
        stopwords: Vec::new(),
        paths: Vec::new(),
        target_rules: Vec::new(),
        target_rules_at: None,
    };
    let mut and: Option<Option<Location>> = None;
    for e in entries(spans, table) {
        match e.lower.as_str() {
            "description" => {
                string(&e)?;
            }
            "condition" => match string(&e)?.to_ascii_uppercase().as_str() {
                "" | "OR" | "||" => {}
                "AND" | "&&" => and = Some(e.at),
                other => {
                    return Err(wrong(
                        &e,
                        format!("unknown allowlist condition `{other}` (gitleaks knows OR and AND)"),
                    ))
                }
            },
            "regextarget" => match string(&e)?.as_str() {
                "" | "secret" => {}
                "match" => (allow.target, allow.target_at) = (Target::Match, e.at),
                "line" => return Err(unsupported(
                    e.at,
                    "regexTarget = \"line\"",
                    "Cella tests allowlist regexes against the secret (or the whole match), not the line: \
                         write the regex for the secret, or use stopwords",
                )),
                other => {
                    return Err(wrong(
                        &e,
                        format!("unknown regexTarget `{other}` (gitleaks knows secret, match and line)"),
                    ))
                }
            },
            "regexes" => allow.regexes = allow_regexes(&e, "allowlist regex")?,
            "paths" => allow.paths = allow_regexes(&e, "allowlist path regex")?,
            "stopwords" => allow.stopwords = strings(&e)?,
            "commits" => {
                if !strings(&e)?.is_empty() {
                    return Err(unsupported(
                        e.at,
                        "allowlist `commits`",
                        "Cella scans artifacts, which have no git history: remove the commits",
                    ));
                }
            }
            "targetrules" if global => (allow.target_rules, allow.target_rules_at) = (strings(&e)?, e.at),
            _ => {
                let known = if global {
                    "description, condition, regexTarget, regexes, stopwords, paths, commits, targetRules"
                } else {
                    ALLOWLIST_KEYS
                };
                return Err(unknown_key(&e, "an allowlist", known));
            }
        }
    }
    let kinds = [!allow.regexes.is_empty(), !allow.stopwords.is_empty(), !allow.paths.is_empty()];
    if kinds.iter().all(|k| !k) {
        return Err(PackError::Syntax {
            at,
            message: "an allowlist needs at least one of regexes, stopwords or paths".into(),
        });
    }
    if let Some(and_at) = and {
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err(unsupported(
                and_at,
                "condition = \"AND\" over more than one kind of check",
                "Cella drops a finding when any check of an allowlist matches (OR); with one kind of check \
                 (only regexes, only stopwords or only paths) AND means the same and is accepted: split the \
                 allowlist, or use OR",
            ));
        }
    }
    Ok(allow)
}

/// A gitleaks rule, translated.
struct Rule {
    id: String,
    description: Option<String>,
    regex: String,
    secret_group: u32,
    entropy: Option<f64>,
    keywords: Vec<String>,
    tags: Vec<String>,
    allows: Vec<(Allow, Option<Location>)>,
    origin: Origin,
}

const RULE_KEYS: &str =
    "id, description, regex, secretGroup, entropy, keywords, tags, path, allowlist, allowlists, required, skipReport";

fn parse_rule(
    spans: &Spans<'_>,
    rule: &dyn TableLike,
    at: Option<Location>,
    n: usize,
) -> Result<Rule, PackError> {
    let mut id = None;
    let mut description = None;
    let mut regex: Option<(String, Option<Location>)> = None;
    let mut secret_group: Option<(i64, Option<Location>)> = None;
    let mut entropy = None;
    let mut keywords = Vec::new();
    let mut tags = Vec::new();
    let mut allows = Vec::new();
    let mut old_allowlist = false;
    let mut new_allowlists = false;
    let mut keys: HashMap<&'static str, Option<Location>> = HashMap::new();
    for e in entries(spans, rule) {
        match e.lower.as_str() {
            "id" => {
                id = Some(string(&e)?);
                keys.insert("id", e.at);
            }
            "description" => {
                description = Some(string(&e)?);
                keys.insert("description", e.at);
            }
            "regex" => regex = Some((string(&e)?, e.at)),
            "secretgroup" => {
                let Some(v) = e.item.as_integer() else {
                    return Err(wrong(&e, format!("`{}` must be an integer", e.key)));
                };
                secret_group = Some((v, e.at));
            }
            "entropy" => {
                entropy = Some(number(&e)?);
                keys.insert("entropy", e.at);
            }
            "keywords" => {
                keywords = strings(&e)?;
                keys.insert("keywords", e.at);
            }
            "tags" => tags = strings(&e)?,
            "path" => {
                return Err(unsupported(
                    e.at,
                    "a rule's `path`",
                    "Cella runs every rule on every file and cannot limit a rule to the files whose path \
                     matches: remove `path` (the rule then runs on every file), or skip paths with an \
                     allowlist's `paths`",
                ))
            }
            "required" => {
                return Err(unsupported(
                    e.at,
                    "[[rules.required]] (composite rules)",
                    "Cella reports each rule's matches on their own: remove the required rules",
                ))
            }
            "skipreport" => {
                if e.item.as_bool() != Some(false) {
                    return Err(unsupported(
                        e.at,
                        "skipReport",
                        "it only makes sense with [[rules.required]], which Cella does not support: remove it",
                    ));
                }
            }
            "allowlist" => {
                old_allowlist = true;
                keys.entry("allowlist").or_insert(e.at);
                allows.push((parse_allowlist(spans, table(&e)?, e.at, false)?, e.at));
            }
            "allowlists" => {
                new_allowlists = true;
                keys.entry("allowlist").or_insert(e.at);
                for (t, t_at) in tables(spans, &e)? {
                    allows.push((parse_allowlist(spans, t, t_at, false)?, t_at));
                }
            }
            _ => return Err(unknown_key(&e, "a rule", RULE_KEYS)),
        }
    }
    let label = id.clone().unwrap_or_else(|| format!("#{n} (no id)"));
    let Some(id) = id else {
        return Err(PackError::Rule { at, rule: label, problem: "missing field `id`".into() });
    };
    if old_allowlist && new_allowlists {
        return Err(PackError::Rule {
            at,
            rule: label,
            problem:
                "[rules.allowlist] and [[rules.allowlists]] cannot be used together (gitleaks refuses it \
                      too): move the first into the second"
                    .into(),
        });
    }
    let Some((pattern, regex_at)) = regex else {
        return Err(unsupported(
            at,
            format!("rule `{id}` without a `regex`"),
            "rules that only match file paths are not supported: give the rule a regex",
        ));
    };
    keys.insert("regex", regex_at);
    let regex = translate(regex_at, &pattern)?;
    // gitleaks: secretGroup 0 (or none) takes the only capture group if there is exactly one.
    let secret_group = match secret_group {
        Some((g, g_at)) => {
            keys.insert("secret_group", g_at);
            u32::try_from(g).map_err(|_| PackError::Rule {
                at: g_at,
                rule: id.clone(),
                problem: format!("secretGroup {g} is negative"),
            })?
        }
        None => {
            keys.insert("secret_group", regex_at);
            0
        }
    };
    let secret_group = match syntax::parse_with(&regex, &syntax_config()) {
        Ok(hir) if secret_group == 0 && hir.properties().explicit_captures_len() == 1 => 1,
        _ => secret_group,
    };
    Ok(Rule {
        id,
        description,
        regex,
        secret_group,
        entropy: entropy.filter(|e| *e != 0.0),
        keywords,
        tags,
        allows,
        origin: Origin { at, keys },
    })
}

fn syntax_config() -> syntax::Config {
    syntax::Config::new().unicode(false).utf8(false)
}

fn translate(at: Option<Location>, pattern: &str) -> Result<String, PackError> {
    re2::translate(pattern)
        .map_err(|u| unsupported(at, format!("`{}` in regex `{pattern}`", u.construct), u.help))
}

/// Converts the gitleaks configuration in `spans` into a Cella pack named `name`.
pub(super) fn convert(spans: &Spans<'_>, name: &str) -> Result<Converted, PackError> {
    let mut title = None;
    let mut rules = Vec::new();
    let mut global: Vec<(Allow, Option<Location>)> = Vec::new();
    let (mut old_global, mut new_global) = (None, None);
    for e in entries(spans, spans.root()) {
        match e.lower.as_str() {
            "title" => title = Some(string(&e)?),
            "description" => {
                string(&e)?;
            }
            "extend" => return Err(unsupported(
                e.at,
                "[extend]",
                "extend is not supported: inline the rules (and allowlists) of the configuration it extends",
            )),
            "rules" => {
                for (n, (t, at)) in tables(spans, &e)?.into_iter().enumerate() {
                    rules.push(parse_rule(spans, t, at, n + 1)?);
                }
            }
            "allowlist" => {
                old_global = Some(e.at);
                global.push((parse_allowlist(spans, table(&e)?, e.at, true)?, e.at));
            }
            "allowlists" => {
                new_global = Some(e.at);
                for (t, at) in tables(spans, &e)? {
                    global.push((parse_allowlist(spans, t, at, true)?, at));
                }
            }
            _ => {
                return Err(unknown_key(
                    &e,
                    "a gitleaks configuration",
                    "title, description, extend, rules, allowlist, allowlists",
                ))
            }
        }
    }
    if let (Some(_), Some(at)) = (old_global, new_global) {
        return Err(PackError::Syntax {
            at,
            message:
                "[allowlist] and [[allowlists]] cannot be used together (gitleaks refuses it too): move the \
                      first into the second"
                    .into(),
        });
    }
    for (allow, _) in &global {
        if let Some(unknown) = allow.target_rules.iter().find(|t| !rules.iter().any(|r| &r.id == *t)) {
            return Err(PackError::Syntax {
                at: allow.target_rules_at,
                message: format!(
                    "targetRules names rule `{unknown}`, which this configuration does not define"
                ),
            });
        }
    }
    let mut out = String::new();
    out.push_str(&format!(
        "# Converted by Cella {} from a gitleaks configuration{}.\n# Each rule names the line of the \
         gitleaks file it came from.\n\n[pack]\nname = {}\ncategory = \"secret\"\nseverity = \"error\"\n",
        env!("CARGO_PKG_VERSION"),
        title.map(|t| format!(" ({})", one_line(&t))).unwrap_or_default(),
        quote(name)
    ));
    let mut origins = Vec::with_capacity(rules.len());
    for rule in rules {
        let applies = |a: &Allow| a.target_rules.is_empty() || a.target_rules.contains(&rule.id);
        let allows = rule.allows.iter().chain(global.iter().filter(|(a, _)| applies(a)));
        let (mut regexes, mut stopwords, mut paths) = (Vec::new(), Vec::new(), Vec::new());
        for (allow, _) in allows {
            if allow.target == Target::Match && !allow.regexes.is_empty() && rule.secret_group != 0 {
                return Err(unsupported(
                    allow.target_at,
                    format!("regexTarget = \"match\" for rule `{}`", rule.id),
                    format!(
                        "the rule's secret is capture group {} and Cella tests allowlist regexes against the \
                         secret only: write the allowlist regexes for the secret (regexTarget = \"secret\")",
                        rule.secret_group
                    ),
                ));
            }
            extend_unique(&mut regexes, &allow.regexes);
            extend_unique(&mut stopwords, &allow.stopwords);
            extend_unique(&mut paths, &allow.paths);
        }
        out.push('\n');
        let line = rule.origin.at.map_or_else(String::new, |l| format!(" at line {}", l.line));
        out.push_str(&format!("# gitleaks rule{line}"));
        if !rule.tags.is_empty() {
            let tags: Vec<String> = rule.tags.iter().map(|t| one_line(t)).collect();
            out.push_str(&format!("; tags: {}", tags.join(", ")));
        }
        out.push_str("\n[[rules]]\n");
        out.push_str(&format!("id = {}\n", quote(&rule.id)));
        let description = rule.description.as_deref().filter(|d| !d.trim().is_empty()).unwrap_or(&rule.id);
        out.push_str(&format!("description = {}\n", quote(description)));
        out.push_str(&format!("regex = {}\n", quote(&rule.regex)));
        if rule.secret_group != 0 {
            out.push_str(&format!("secret_group = {}\n", rule.secret_group));
        }
        if !rule.keywords.is_empty() {
            out.push_str(&format!("keywords = {}\n", array(&rule.keywords)));
        }
        if let Some(e) = rule.entropy {
            out.push_str(&format!("entropy = {}\n", toml_edit::Value::from(e)));
        }
        out.push_str(&format!("help = {}\n", quote(HELP)));
        if !(regexes.is_empty() && stopwords.is_empty() && paths.is_empty()) {
            out.push_str("[rules.allowlist]\n");
            for (key, list) in [("regexes", &regexes), ("stopwords", &stopwords), ("paths", &paths)] {
                if !list.is_empty() {
                    out.push_str(&format!("{key} = {}\n", array(list)));
                }
            }
        }
        origins.push(rule.origin);
    }
    Ok(Converted { toml: out, origins })
}

fn extend_unique(into: &mut Vec<String>, from: &[String]) {
    for s in from {
        if !into.contains(s) {
            into.push(s.clone());
        }
    }
}

/// A TOML string (a literal string where the text allows, as regexes read best).
fn quote(s: &str) -> String {
    toml_edit::Value::from(s).to_string()
}

fn array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Text for a comment: on one line, without control characters.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests;
