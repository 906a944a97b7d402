//! A scan's findings in the formats a CI system reads: an aligned table for people, JSON, CSV,
//! JUnit XML, and the SARIF log itself. Every field comes from the SARIF log, which the guest
//! wrote from the artifact: control characters are shown escaped in the table, and each format
//! quotes what it must.

use serde_json::{json, Value};

use crate::error::escape_controls;

/// One finding, as the formats show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub level: String,
    pub rule: String,
    pub path: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
    /// The suppression's justification, if it is suppressed (inline marker, baseline).
    pub suppressed: Option<String>,
    /// Its fingerprints (`partialFingerprints`).
    pub fingerprints: Value,
    /// How sure it is (`properties.confidence`: high, medium or low; high if the log has none).
    pub confidence: String,
    /// The commit that introduced it (`properties.history`), when the scan had the history.
    pub history: Option<Value>,
    /// The image layer it is in (`properties.image`), when the artifact was an image.
    pub image: Option<Value>,
}

impl Row {
    fn of(result: &Value) -> Row {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let loc = &result["locations"][0]["physicalLocation"];
        let suppressed = is_suppressed(result).then(|| &result["suppressions"][0]).map(|s| {
            let kind = s["kind"].as_str().unwrap_or("suppressed");
            match s["justification"].as_str() {
                Some(j) => format!("{kind}: {j}"),
                None => kind.to_owned(),
            }
        });
        Row {
            level: result["level"].as_str().unwrap_or("warning").to_owned(),
            rule: text(&result["ruleId"]),
            path: text(&loc["artifactLocation"]["uri"]),
            line: loc["region"]["startLine"].as_u64().unwrap_or(0),
            column: loc["region"]["startColumn"].as_u64().unwrap_or(0),
            message: text(&result["message"]["text"]),
            suppressed,
            fingerprints: result["partialFingerprints"].clone(),
            confidence: result["properties"]["confidence"].as_str().unwrap_or("high").to_owned(),
            history: result["properties"].get("history").filter(|h| h.is_object()).cloned(),
            image: result["properties"].get("image").filter(|h| h.is_object()).cloned(),
        }
    }

    /// `path:line`, and the short commit that introduced it (`@abc1234`; `@abc1234 (history)`
    /// when only history holds it).
    fn location(&self) -> String {
        let mut at = format!("{}:{}", self.path, self.line);
        if let Some(i) = &self.image {
            at.push_str(&format!(" [layer {}", i["layer"]));
            if let Some(later) = i["removedInLayer"].as_u64() {
                at.push_str(&format!(", deleted in {later}"));
            }
            at.push(']');
        }
        if let Some(h) = &self.history {
            let commit = h["commit"].as_str().unwrap_or_default();
            at.push_str(&format!(" @{}", commit.get(..7).unwrap_or(commit)));
            if h["onlyInHistory"] == true {
                at.push_str(" (history)");
            }
        }
        at
    }
}

/// Whether a SARIF result is suppressed: it has a suppression and none is `rejected` or
/// `underReview` (SARIF: a suppression without a status is accepted).
pub fn is_suppressed(result: &Value) -> bool {
    let suppressions = result["suppressions"].as_array().map(Vec::as_slice).unwrap_or_default();
    !suppressions.is_empty()
        && suppressions.iter().all(|s| matches!(s["status"].as_str(), None | Some("accepted")))
}

/// The results of a SARIF log as rows, sorted by path, line, column and rule.
pub fn rows(results: &[Value]) -> Vec<Row> {
    let mut rows: Vec<Row> = results.iter().map(Row::of).collect();
    rows.sort_by(|a, b| {
        (a.path.as_str(), a.line, a.column, a.rule.as_str()).cmp(&(
            b.path.as_str(),
            b.line,
            b.column,
            b.rule.as_str(),
        ))
    });
    rows
}

/// An aligned table, one finding a line; suppressed ones marked.
pub fn table(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "no findings\n".to_owned();
    }
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            let level = if r.suppressed.is_some() { format!("({})", r.level) } else { r.level.clone() };
            [level, escape_controls(&r.rule).into_owned(), escape_controls(&r.location()).into_owned(), {
                let mut m = escape_controls(&r.message).into_owned();
                if let Some(s) = &r.suppressed {
                    m.push_str(&format!(" [suppressed, {}]", escape_controls(s)));
                }
                m
            }]
        })
        .collect();
    let header = ["LEVEL", "RULE", "LOCATION", "MESSAGE"];
    let width =
        |i: usize| cells.iter().map(|c| c[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0);
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out = format!("{:<w0$}  {:<w1$}  {:<w2$}  {}\n", header[0], header[1], header[2], header[3]);
    for c in &cells {
        out.push_str(&format!("{:<w0$}  {:<w1$}  {:<w2$}  {}\n", c[0], c[1], c[2], c[3]));
    }
    out
}

/// The entries the scan could not read (the SARIF log's tool notifications), one line each,
/// `path: reason`, escaped.
pub fn skipped_lines(log: &Value) -> Vec<String> {
    let notes = log["runs"][0]["invocations"][0]["toolExecutionNotifications"].as_array();
    notes
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|n| {
            let uri =
                n["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap_or("?");
            let path = cella_scan::sarif::uri_to_path(uri);
            format!(
                "{}: {}",
                escape_controls(&path),
                escape_controls(n["message"]["text"].as_str().unwrap_or("?"))
            )
        })
        .collect()
}

/// JSON: the job, its summary and the findings.
pub fn json(job_id: &str, summary: &Value, rows: &[Row]) -> String {
    let findings: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "level": r.level, "rule": r.rule, "path": r.path, "line": r.line, "column": r.column,
                "message": r.message, "suppressed": r.suppressed, "fingerprints": r.fingerprints,
                "confidence": r.confidence, "history": r.history, "image": r.image,
            })
        })
        .collect();
    let doc = json!({ "job": job_id, "summary": summary, "findings": findings });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// CSV (RFC 4180): a header, then one finding a line.
pub fn csv(rows: &[Row]) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    }
    let mut out = String::from("level,rule,path,line,column,message,suppressed\r\n");
    for r in rows {
        let fields = [
            field(&r.level),
            field(&r.rule),
            field(&r.path),
            r.line.to_string(),
            r.column.to_string(),
            field(&r.message),
            field(r.suppressed.as_deref().unwrap_or("")),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

/// JUnit XML: one test case per finding, failed when it is at or above the gate (`fails`),
/// skipped when suppressed; CI systems show each as a test result.
pub fn junit(job_id: &str, rows: &[Row], fails: impl Fn(&Row) -> bool) -> String {
    fn xml(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&apos;"),
                // XML 1.0 allows no other control characters, even escaped.
                c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {
                    out.push_str(&format!("\\x{:02x}", c as u32))
                }
                c => out.push(c),
            }
        }
        out
    }
    let failures = rows.iter().filter(|r| r.suppressed.is_none() && fails(r)).count();
    let skipped = rows.iter().filter(|r| r.suppressed.is_some()).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites name=\"cella scan\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\">\n",
        rows.len()
    ));
    out.push_str(&format!(
        "  <testsuite name=\"cella scan {}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\">\n",
        xml(job_id),
        rows.len()
    ));
    for r in rows {
        out.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\">",
            xml(&r.rule),
            xml(&format!("{}:{}", r.path, r.line))
        ));
        if let Some(s) = &r.suppressed {
            out.push_str(&format!("<skipped message=\"{}\"/>", xml(s)));
        } else if fails(r) {
            out.push_str(&format!("<failure type=\"{}\" message=\"{}\"/>", xml(&r.level), xml(&r.message)));
        }
        out.push_str("</testcase>\n");
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(level: &str, rule: &str, uri: &str, line: u64, message: &str) -> Value {
        json!({
            "level": level, "ruleId": rule, "message": {"text": message},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": line, "startColumn": 2}}}],
            "partialFingerprints": {"secretHmac/v1": "ab"},
        })
    }

    fn sample() -> Vec<Row> {
        let mut suppressed = result("error", "card", "b.txt", 1, "card: ****");
        suppressed["suppressions"] = json!([{"kind": "inSource", "justification": "cella:allow on line 1"}]);
        rows(&[
            result("warning", "email", "z/a.txt", 9, "an \"e-mail\", here"),
            result("error", "stripe", "a/b.env", 3, "Stripe key <sk_live_****>"),
            suppressed,
        ])
    }

    #[test]
    fn rows_are_sorted_by_place_and_the_table_is_aligned() {
        let rows = sample();
        let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["a/b.env", "b.txt", "z/a.txt"]);
        let table = table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        let message_at = lines[0].find("MESSAGE").unwrap();
        assert!(lines[1..]
            .iter()
            .all(|l| l.char_indices().nth(message_at - 2).is_some_and(|(_, c)| c == ' ')));
        assert!(
            lines[2].starts_with("(error)")
                && lines[2].contains("[suppressed, inSource: cella:allow on line 1]"),
            "{table}"
        );
    }

    #[test]
    fn the_findings_table_shows_control_characters_escaped() {
        let rows = rows(&[result("error", "stripe\u{7}", "app/\u{1b}]0;x\u{7}.env", 3, "a key\r\u{1b}[2K")]);
        let table = table(&rows);
        assert!(!table.trim_end().contains(|c: char| c.is_control() && c != '\n'), "{table:?}");
        assert!(table.contains("app/\\x1b]0;x\\x07.env:3"), "{table}");
        assert!(table.contains("stripe\\x07") && table.contains("a key\\r\\x1b[2K"), "{table}");
    }

    #[test]
    fn skipped_entries_are_read_back_from_the_logs_notifications_escaped() {
        let log = json!({"runs": [{"invocations": [{"executionSuccessful": true, "toolExecutionNotifications": [
            {"level": "warning", "message": {"text": "artifact entry `a #1.jar` is truncated"},
             "locations": [{"physicalLocation": {"artifactLocation": {"uri": "lib/a%20%231.jar"}}}]},
            {"level": "warning", "message": {"text": "bad\u{1b}[2J"},
             "locations": [{"physicalLocation": {"artifactLocation": {"uri": "x%1b.zip"}}}]}
        ]}]}]});
        assert_eq!(
            skipped_lines(&log),
            ["lib/a #1.jar: artifact entry `a #1.jar` is truncated", "x\\x1b.zip: bad\\x1b[2J"]
        );
        assert!(skipped_lines(&json!({"runs": [{"results": []}]})).is_empty());
    }

    #[test]
    fn csv_quotes_what_it_must() {
        let csv = csv(&sample());
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], "level,rule,path,line,column,message,suppressed");
        assert_eq!(lines[3], "warning,email,z/a.txt,9,2,\"an \"\"e-mail\"\", here\",");
    }

    #[test]
    fn junit_fails_what_the_gate_fails_and_skips_what_is_suppressed() {
        let xml = junit("job_1", &sample(), |r| r.level == "error");
        assert!(xml.contains("tests=\"3\" failures=\"1\" skipped=\"1\""), "{xml}");
        assert!(
            xml.contains("<failure type=\"error\" message=\"Stripe key &lt;sk_live_****&gt;\"/>"),
            "{xml}"
        );
        assert!(xml.contains("<skipped message=\"inSource: cella:allow on line 1\"/>"), "{xml}");
    }
}
