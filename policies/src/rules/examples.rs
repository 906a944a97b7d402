//! Every rule's own examples, run through the real engine: a positive example is text the rule
//! must find, a negative one text it must not (a near miss, a placeholder, a look-alike). Each
//! example is scanned as a file of its own (`example.txt`) by an engine holding that rule
//! alone, so another rule cannot hide or supply the finding; validators, entropy floors,
//! stopwords and allowlists all take part, as in a scan. A pack whose rule disagrees with one
//! of its examples does not load ([`super::pack::Check::Full`], and a tenant's upload).

use cella_scan::{Engine, Limits, Policy, Report, Rule, POLICY_FORMAT_VERSION};

use super::Examples;

/// The file name each example is scanned under.
pub const EXAMPLE_PATH: &str = "example.txt";

/// The longest example shown in an error, in characters.
const SHOWN: usize = 60;

/// A rule that disagrees with one of its examples.
#[derive(Debug, thiserror::Error)]
pub enum ExampleError {
    #[error("its example {n} ({shown}) is not found by the rule; fix the example or the rule")]
    Missed { n: usize, shown: String },
    #[error("its negative example {n} ({shown}) is found by the rule; fix the example or the rule")]
    Found { n: usize, shown: String },
    #[error("its examples cannot be scanned: {0}")]
    Engine(String),
}

/// An example as an error shows it: escaped, and cut at [`SHOWN`] characters.
fn shown(text: &str) -> String {
    let mut out: String = text.chars().take(SHOWN).flat_map(char::escape_default).collect();
    if text.chars().count() > SHOWN {
        out.push('…');
    }
    format!("`{out}`")
}

/// How many findings of `rule` alone in `text`, not counting suppressed ones.
pub fn findings(engine: &mut Engine, text: &str) -> Result<usize, ExampleError> {
    let mut report = Report::default();
    engine
        .scan_file(EXAMPLE_PATH, text.as_bytes(), &mut report, &Limits::default())
        .map_err(|e| ExampleError::Engine(e.to_string()))?;
    Ok(report.findings.iter().filter(|f| f.suppression.is_none()).count())
}

/// Checks `rule` against its `examples`.
pub fn check(rule: &Rule, examples: &Examples) -> Result<(), ExampleError> {
    if examples.positive.is_empty() && examples.negative.is_empty() {
        return Ok(());
    }
    let policy = Policy { format_version: POLICY_FORMAT_VERSION, rules: vec![rule.clone()] };
    let mut engine = Engine::new(policy).map_err(|e| ExampleError::Engine(e.to_string()))?;
    for (i, text) in examples.positive.iter().enumerate() {
        if findings(&mut engine, text)? == 0 {
            return Err(ExampleError::Missed { n: i + 1, shown: shown(text) });
        }
    }
    for (i, text) in examples.negative.iter().enumerate() {
        if findings(&mut engine, text)? != 0 {
            return Err(ExampleError::Found { n: i + 1, shown: shown(text) });
        }
    }
    Ok(())
}
