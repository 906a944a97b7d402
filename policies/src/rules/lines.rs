//! Where things are in a pack file: the line and column of a TOML syntax error, of the `n`th
//! `[[rules]]` table and of a key inside it. Every problem with an uploaded pack names its line
//! through these (toml's own parser, `toml_edit`, keeps the span of every key and table).

use std::fmt;
use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike};

/// A place in a pack file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// The location of byte `offset` of `text` (columns count characters).
pub fn location(text: &str, offset: usize) -> Location {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location { line: before.matches('\n').count() + 1, column: before[line_start..].chars().count() + 1 }
}

/// A TOML syntax error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub at: Option<Location>,
    pub message: String,
}

/// A pack file parsed with spans.
#[derive(Debug)]
pub struct Spans<'a> {
    text: &'a str,
    doc: ImDocument<&'a str>,
}

impl<'a> Spans<'a> {
    /// Parses `text`; a syntax error says where.
    pub fn parse(text: &'a str) -> Result<Self, SyntaxError> {
        match ImDocument::parse(text) {
            Ok(doc) => Ok(Spans { text, doc }),
            Err(e) => Err(SyntaxError {
                at: e.span().map(|s| location(text, s.start)),
                message: e.message().trim().to_owned(),
            }),
        }
    }

    /// The document's root table.
    pub fn root(&self) -> &toml_edit::Table {
        self.doc.as_table()
    }

    /// Where byte range `span` starts.
    pub fn at(&self, span: Option<Range<usize>>) -> Option<Location> {
        span.map(|s| location(self.text, s.start))
    }

    /// The `[[rules]]` tables, in order.
    pub fn rules(&self) -> Vec<&dyn TableLike> {
        tables(self.root().get("rules"))
    }

    /// Where the `index`th `[[rules]]` table starts (its header).
    pub fn rule(&self, index: usize) -> Option<Location> {
        let rules = self.root().get("rules")?;
        match rules {
            Item::ArrayOfTables(a) => self.at(a.get(index)?.span()),
            Item::Value(v) => self.at(v.as_array()?.get(index)?.span()),
            _ => None,
        }
    }

    /// Where key `path` (`["allowlist", "regexes"]`) of the `index`th rule is, else the rule.
    pub fn rule_key(&self, index: usize, path: &[&str]) -> Option<Location> {
        let rules = self.rules();
        let mut table = *rules.get(index)?;
        for (i, name) in path.iter().enumerate() {
            let Some((key, item)) = table.get_key_value(name) else { break };
            if i + 1 == path.len() {
                return self.at(key.span()).or_else(|| self.at(item.span()));
            }
            match item.as_table_like() {
                Some(inner) => table = inner,
                None => return self.at(key.span()),
            }
        }
        self.rule(index)
    }

    /// Where top-level key `name` is.
    pub fn key(&self, name: &str) -> Option<Location> {
        let (key, item) = self.root().get_key_value(name)?;
        self.at(key.span()).or_else(|| self.at(item.span()))
    }
}

/// The tables of an array of tables (`[[x]]`, or `x = [{…}, …]`).
pub fn tables(item: Option<&Item>) -> Vec<&dyn TableLike> {
    match item {
        Some(Item::ArrayOfTables(a)) => a.iter().map(|t| t as &dyn TableLike).collect(),
        Some(Item::Value(toml_edit::Value::Array(a))) => {
            a.iter().filter_map(|v| v.as_inline_table().map(|t| t as &dyn TableLike)).collect()
        }
        _ => Vec::new(),
    }
}

/// `TOML parse error at line 3, column 1\n  |\n3 | …\n  | ^\nmissing field `name`\n` (how
/// `toml` prints a deserialization error) as its location and its last line.
pub fn split_toml_message(message: &str) -> (Option<Location>, String) {
    let first = message.lines().next().unwrap_or("");
    let at = first.strip_prefix("TOML parse error at line ").and_then(|rest| {
        let (line, column) = rest.split_once(", column ")?;
        Some(Location { line: line.trim().parse().ok()?, column: column.trim().parse().ok()? })
    });
    match at {
        Some(at) => {
            let last = message.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            (Some(at), last.to_owned())
        }
        None => (None, message.trim().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACK: &str = "[pack]\nname = \"p\"\n\n[[rules]]\nid = \"a\"\n\n# second\n[[rules]]\nid = \"b\"\n  regex = 'x'\n[rules.allowlist]\nstopwords = [\"s\"]\n";

    #[test]
    fn locates_rules_and_their_keys() {
        let s = Spans::parse(PACK).unwrap();
        assert_eq!(s.rule(0), Some(Location { line: 4, column: 1 }));
        assert_eq!(s.rule(1), Some(Location { line: 8, column: 1 }));
        assert_eq!(s.rule_key(1, &["regex"]), Some(Location { line: 10, column: 3 }));
        assert_eq!(s.rule_key(1, &["allowlist", "stopwords"]), Some(Location { line: 12, column: 1 }));
        // A key the rule lacks: the rule's header.
        assert_eq!(s.rule_key(0, &["regex"]), Some(Location { line: 4, column: 1 }));
        assert_eq!(s.key("pack"), Some(Location { line: 1, column: 2 }));
        assert_eq!(s.rule(2), None);
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = Spans::parse("[pack]\nname = \"p\"\n[[rules]]\nid = \"a\nx = 1\n").err().unwrap();
        assert_eq!(e.at.map(|l| l.line), Some(4), "{e:?}");
        assert!(!e.message.is_empty());
    }

    #[test]
    fn toml_messages_split_into_location_and_problem() {
        let err =
            toml::from_str::<std::collections::BTreeMap<String, u32>>("a = 1\nb = \"x\"\n").unwrap_err();
        let (at, message) = split_toml_message(&err.to_string());
        assert_eq!(at, Some(Location { line: 2, column: 5 }), "{err}");
        assert!(message.contains("invalid type"), "{message}");
        assert_eq!(split_toml_message("plain"), (None, "plain".to_owned()));
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(location("é = 1\nxé", 10), Location { line: 2, column: 3 });
        assert_eq!(location("ab", 1), Location { line: 1, column: 2 });
    }
}
