//! Licence files of real crates against what each crate declares:
//! `cargo run --release -p cella-policies --example license_files -- [REGISTRY-SRC]`.
//!
//! For every crate under REGISTRY-SRC (default `~/.cargo/registry/src/*/`), each top-level
//! `LICENSE*`, `LICENCE*`, `COPYING*` and `UNLICENSE*` file is scanned by the built-in policy,
//! and its licence findings are checked against the crate's `license` field in Cargo.toml: a
//! whole text (`license-text`) naming a declared licence, one naming another, only opening
//! lines or a notice (`license-text-*`) naming a declared licence, or nothing. Prints the
//! counts and every file that is not the first kind, and opening-lines findings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cella_policies::rules::{load_packs, DEFAULT_PACKS};
use cella_scan::{Engine, Limits, Report};

fn registry_dirs(arg: Option<String>) -> Vec<PathBuf> {
    if let Some(dir) = arg {
        return vec![PathBuf::from(dir)];
    }
    let root = Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cargo/registry/src");
    std::fs::read_dir(&root).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// The identifiers a `license` expression names, upper-cased, with `-only`/`-or-later`/`+`
/// dropped (a text cannot tell them apart).
fn declared(expression: &str) -> Vec<String> {
    expression
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == '/')
        .filter(|t| !t.is_empty() && !["AND", "OR", "WITH"].contains(&t.to_ascii_uppercase().as_str()))
        .map(normal)
        .collect()
}

fn normal(id: &str) -> String {
    let id = id.trim_end_matches('+').to_ascii_uppercase();
    id.trim_end_matches("-ONLY").trim_end_matches("-OR-LATER").to_owned()
}

fn main() {
    let compiled = load_packs(DEFAULT_PACKS).expect("built-in packs");
    let mut engine = Engine::from_policy_json(compiled.as_bytes()).expect("engine");
    let (mut right, mut wrong, mut missed, mut crates, mut all_found) = (0, 0, 0, 0, 0);
    let mut by_opening = 0;
    let mut problems: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut by_rule: BTreeMap<String, usize> = BTreeMap::new();
    for dir in registry_dirs(std::env::args().nth(1)) {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for krate in entries {
            let Ok(manifest) = std::fs::read_to_string(krate.join("Cargo.toml")) else { continue };
            let Ok(manifest) = manifest.parse::<toml::Table>() else { continue };
            let Some(license) =
                manifest.get("package").and_then(|p| p.get("license")).and_then(|l| l.as_str())
            else {
                continue;
            };
            let ids = declared(license);
            let Ok(files) = std::fs::read_dir(&krate) else { continue };
            let mut files: Vec<PathBuf> = files
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_uppercase();
                    p.is_file()
                        && ["LICENSE", "LICENCE", "COPYING", "UNLICENSE"].iter().any(|s| name.starts_with(s))
                })
                .collect();
            files.sort();
            crates += 1;
            let mut every = true;
            for file in files {
                let Ok(text) = std::fs::read(&file) else { continue };
                let mut report = Report::default();
                let _ = engine.scan_file("LICENSE", &text, &mut report, &Limits::default());
                let found: Vec<&cella_scan::Finding> =
                    report.findings.iter().filter(|f| f.rule_id.starts_with("license-text")).collect();
                for f in &found {
                    *by_rule.entry(f.rule_id.clone()).or_default() += 1;
                }
                let whole: Vec<_> = found.iter().filter(|f| f.rule_id == "license-text").collect();
                for f in found.iter().filter(|f| f.rule_id != "license-text") {
                    let beside = whole.iter().any(|w| w.line <= f.end_line && f.line <= w.end_line);
                    let kind = if beside {
                        "opening lines reported beside a whole text"
                    } else {
                        "opening lines or notice alone"
                    };
                    problems.entry(kind).or_default().push(format!(
                        "{}:{} {} ({}); whole texts: {:?}",
                        file.strip_prefix(&dir).unwrap_or(&file).display(),
                        f.line,
                        f.rule_id,
                        f.redacted,
                        whole.iter().map(|w| (&w.redacted, w.line, w.end_line)).collect::<Vec<_>>()
                    ));
                }
                let shown = format!(
                    "{} (declares {license}; found {:?})",
                    file.strip_prefix(&dir).unwrap_or(&file).display(),
                    found.iter().map(|f| (&f.redacted, f.license_score)).collect::<Vec<_>>()
                );
                let names =
                    |list: &[&&cella_scan::Finding]| list.iter().any(|f| ids.contains(&normal(&f.redacted)));
                let all: Vec<&&cella_scan::Finding> = found.iter().collect();
                if !whole.is_empty() && names(&whole) {
                    right += 1;
                } else if !whole.is_empty() {
                    wrong += 1;
                    every = false;
                    problems.entry("wrong").or_default().push(shown);
                } else if names(&all) {
                    by_opening += 1;
                    problems.entry("by opening lines or a notice only").or_default().push(shown);
                } else {
                    missed += 1;
                    every = false;
                    problems.entry("missed").or_default().push(shown);
                }
            }
            all_found += usize::from(every);
        }
    }
    println!(
        "licence files of {crates} crates: {right} identified by their whole text as a declared licence, \
         {wrong} as another, {by_opening} by opening lines or a notice only, {missed} not at all"
    );
    println!("crates whose every licence file is identified as a declared licence: {all_found}");
    println!("findings by rule: {by_rule:?}");
    for (kind, list) in problems {
        println!("\n{kind} ({}):", list.len());
        for p in list {
            println!("  {p}");
        }
    }
}
