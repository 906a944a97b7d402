//! Conversion of gitleaks configurations, on examples written for these tests in gitleaks'
//! documented format (the token formats are made up).

use cella_scan::{scan_artifact, Engine, Limits, Report, SliceSource};

use super::super::tenant::{tenant_policy, validate, PackError, PackFormat, PackLimits, ValidatedPack};

/// A configuration with what Cella converts: a global allowlist, rule allowlists old and new,
/// a targeted allowlist, tags, entropy, an inferred and an explicit secret group.
pub const CONFIG: &str = r#"title = "Orbital Freight secrets"

[[allowlists]]
description = "fixtures everywhere"
paths = ['''(?:^|/)fixtures/''']

[[rules]]
id = "orbital-api-key"
description = "Orbital Freight API key"
regex = '''\b(orb_live_[A-Za-z0-9]{28})\b'''
keywords = ["orb_live_"]
tags = ["orbital", "key"]
entropy = 3.2
[rules.allowlist]
stopwords = ["sample"]

[[rules]]
id = "quillpay-webhook-secret"
description = "QuillPay webhook signing secret"
regex = '''(?i)quillpay.{0,20}\Qsecret\E\s*[:=]\s*["']?(qpws_[a-f0-9]{40})'''
secretGroup = 1
keywords = ["quillpay"]
[[rules.allowlists]]
regexes = ['''^qpws_0{40}$''']

[[allowlists]]
targetRules = ["quillpay-webhook-secret"]
stopwords = ["deadbeef"]
"#;

fn convert(text: &str) -> Result<ValidatedPack, PackError> {
    validate(text, PackFormat::Gitleaks, Some("orbital"), &PackLimits::default())
}

fn refused(text: &str) -> PackError {
    convert(text).expect_err("refused")
}

/// Findings (rule id, file) of scanning `files` with `pack` alone.
fn scan(pack: &ValidatedPack, files: &[(&str, &str)]) -> Vec<(String, String)> {
    let policy = tenant_policy(&[], vec![pack.pack.clone()]).unwrap();
    let mut engine = Engine::new(policy.policy().clone()).unwrap();
    let mut found = Vec::new();
    for (path, text) in files {
        let mut report = Report::default();
        scan_artifact(&mut SliceSource(text.as_bytes()), path, &mut engine, &Limits::default(), &mut report)
            .unwrap();
        for f in &report.findings {
            found.push((f.rule_id.clone(), (*path).to_owned()));
        }
    }
    found
}

#[test]
fn a_gitleaks_configuration_becomes_a_cella_pack() {
    let v = convert(CONFIG).unwrap();
    assert_eq!(v.format, PackFormat::Gitleaks);
    assert_eq!(v.pack.name, "orbital");
    let [api, webhook] = &v.pack.rules[..] else { panic!("{:?}", v.pack.rules) };
    assert_eq!(api.id, "orbital-api-key");
    // secretGroup unset with one capture group: that group, as gitleaks takes it.
    assert_eq!(api.secret_group, 1);
    assert_eq!(api.entropy, Some(3.2));
    assert_eq!(api.keywords, ["orb_live_"]);
    assert_eq!(api.allowlist.stopwords, ["sample"]);
    // The global allowlist reaches every rule; the targeted one only its target.
    assert_eq!(api.allowlist.paths, ["(?:^|/)fixtures/"]);
    assert_eq!(webhook.allowlist.paths, ["(?:^|/)fixtures/"]);
    assert_eq!(webhook.allowlist.stopwords, ["deadbeef"]);
    assert_eq!(webhook.allowlist.regexes, ["^qpws_0{40}$"]);
    // `\Q…\E` translated.
    assert_eq!(webhook.regex, r#"(?i)quillpay.{0,20}secret\s*[:=]\s*["']?(qpws_[a-f0-9]{40})"#);
    assert_eq!(webhook.category, cella_scan::Category::Secret);
    assert_eq!(webhook.severity, cella_scan::Severity::Error);
    // The converted text is a Cella pack that validates on its own, tags in a comment.
    assert!(
        v.cella_toml.contains("# gitleaks rule at line 7; tags: orbital, key\n[[rules]]\n"),
        "{}",
        v.cella_toml
    );
    assert!(v.cella_toml.contains("(Orbital Freight secrets)"), "{}", v.cella_toml);
    let again = validate(&v.cella_toml, PackFormat::Cella, None, &PackLimits::default()).unwrap();
    assert_eq!(again.pack.rules, v.pack.rules);
}

#[test]
fn the_converted_pack_finds_what_gitleaks_would_and_honours_the_allowlists() {
    let v = convert(CONFIG).unwrap();
    let key = "orb_live_Q7dX2mP9vL4kR8sT1wY6zB3nC5hJ";
    let secret = format!("qpws_{}", "3fa9c07e1b2d4c6e8a0f1e3d5b7c9a2e4f6d8b0c");
    let found = scan(
        &v,
        &[
            ("app/config.env", &format!("ORBITAL_KEY={key}\nQUILLPAY_SECRET = \"{secret}\"\n")),
            ("app/fixtures/keys.env", &format!("ORBITAL_KEY={key}\n")),
            ("app/sample.env", "ORBITAL_KEY=orb_live_sampleQ7dX2mP9vL4kR8sT1wY6zB\n"),
            ("app/zero.env", &format!("quillpay secret: qpws_{}\n", "0".repeat(40))),
        ],
    );
    assert_eq!(
        found,
        [
            ("orbital-api-key".to_owned(), "app/config.env".to_owned()),
            ("quillpay-webhook-secret".to_owned(), "app/config.env".to_owned()),
        ]
    );
}

#[test]
fn the_older_global_allowlist_table_applies_to_every_rule() {
    let text = CONFIG.replace("[[allowlists]]\ndescription", "[allowlist]\ndescription").replace(
        "[[allowlists]]\ntargetRules = [\"quillpay-webhook-secret\"]\nstopwords = [\"deadbeef\"]\n",
        "",
    );
    let v = convert(&text).unwrap();
    assert!(v.pack.rules.iter().all(|r| r.allowlist.paths == ["(?:^|/)fixtures/"]));
    // Both forms at once are refused, as gitleaks refuses them.
    let both = format!("{text}[[allowlists]]\nstopwords = [\"x\"]\n");
    assert!(refused(&both).to_string().contains("[allowlist] and [[allowlists]] cannot be used together"));
}

#[test]
fn keys_are_matched_without_regard_to_case_as_gitleaks_does() {
    let text = CONFIG.replace("secretGroup = 1", "SECRETGROUP = 1").replace("targetRules", "targetrules");
    assert_eq!(convert(&text).unwrap().pack.rules[1].secret_group, 1);
}

/// `(construct, line)` of a refusal.
fn unsupported(text: &str) -> (String, usize) {
    match refused(text) {
        PackError::Unsupported { at, construct, .. } => (construct, at.expect("a location").line),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn every_construct_cella_cannot_honour_is_refused_by_name_at_its_line() {
    let rule = "[[rules]]\nid = \"r\"\nregex = '''tok_[a-z]{8}'''\nkeywords = [\"tok_\"]\n";
    let cases: &[(&str, &str, usize)] = &[
        ("[extend]\nuseDefault = true\n", "[extend]", 1),
        ("path = '''\\.env$'''\n", "a rule's `path`", 5),
        ("[[rules.required]]\nid = \"other\"\n", "[[rules.required]] (composite rules)", 5),
        ("skipReport = true\n", "skipReport", 5),
        ("[rules.allowlist]\nregexTarget = \"line\"\nregexes = ['''x''']\n", "regexTarget = \"line\"", 6),
        ("[rules.allowlist]\ncommits = [\"abc123\"]\n", "allowlist `commits`", 6),
        (
            "[rules.allowlist]\ncondition = \"AND\"\nregexes = ['''x''']\nstopwords = [\"y\"]\n",
            "condition = \"AND\" over more than one kind of check",
            6,
        ),
        ("severity = \"high\"\n", "key `severity` in a rule", 5),
        ("[rules.allowlist]\nregexes = ['''a\\Cb''']\n", "`\\C` in regex `a\\Cb`", 6),
    ];
    for (extra, construct, line) in cases {
        let text =
            if extra.starts_with("[extend]") { format!("{extra}{rule}") } else { format!("{rule}{extra}") };
        assert_eq!(unsupported(&text), ((*construct).to_owned(), *line), "{text}");
    }
    // In the rule's regex, and a rule with no regex at all.
    let text = rule.replace("tok_[a-z]{8}", r"tok_\p{Greek}{8}");
    assert_eq!(unsupported(&text), (r"`\p{Greek}` in regex `tok_\p{Greek}{8}`".to_owned(), 3));
    let text = "title = \"t\"\n\n[[rules]]\nid = \"r\"\npath = '''x'''\n".replace("path", "description");
    assert_eq!(unsupported(&text), ("rule `r` without a `regex`".to_owned(), 3));
    // A top-level key gitleaks does not document.
    assert_eq!(
        unsupported(&format!("minVersion = \"8\"\n{rule}")),
        ("key `minVersion` in a gitleaks configuration".to_owned(), 1)
    );
}

#[test]
fn condition_and_with_one_kind_of_check_means_or_and_is_accepted() {
    let text = "[[rules]]\nid = \"r\"\nregex = '''tok_[a-z]{8}'''\n[rules.allowlist]\ncondition = \"AND\"\nstopwords = [\"a\", \"b\"]\n";
    assert_eq!(convert(text).unwrap().pack.rules[0].allowlist.stopwords, ["a", "b"]);
}

#[test]
fn regex_target_match_is_honoured_only_when_the_secret_is_the_whole_match() {
    let whole = "[[rules]]\nid = \"r\"\nregex = '''tok_[a-z]{8}'''\n[rules.allowlist]\nregexTarget = \"match\"\nregexes = ['''^tok_a''']\n";
    assert_eq!(convert(whole).unwrap().pack.rules[0].allowlist.regexes, ["^tok_a"]);
    let group = whole.replace("tok_[a-z]{8}", "key=(tok_[a-z]{8})");
    assert_eq!(unsupported(&group), ("regexTarget = \"match\" for rule `r`".to_owned(), 5));
}

#[test]
fn rule_problems_are_located_in_the_gitleaks_file() {
    // A regex that does not compile, at its line.
    let e = refused("title = \"t\"\n[[rules]]\nid = \"r\"\nregex = '''tok_[a-z'''\n");
    assert!(e.to_string().starts_with("line 4, column 1: rule `r`: regex does not compile"), "{e}");
    // A secretGroup the regex does not have, in gitleaks' words.
    let e = refused("[[rules]]\nid = \"r\"\nregex = '''(a)(b)'''\nsecretGroup = 3\n");
    assert!(e.to_string().starts_with("line 4, column 1: rule `r`: secretGroup 3 does not exist"), "{e}");
    // Duplicate ids, a built-in rule's id, a missing id.
    let e = refused("[[rules]]\nid = \"r\"\nregex = 'a+'\n\n[[rules]]\nid = \"r\"\nregex = 'b+'\n");
    assert_eq!(e, PackError::DuplicateId { at: e.location(), rule: "r".into(), first_line: 1 });
    assert_eq!(e.location().map(|l| l.line), Some(5));
    let e = refused("[[rules]]\nid = \"github-pat\"\nregex = 'ghp_[a-z]+'\n");
    assert!(matches!(e, PackError::BuiltinId { .. }), "{e:?}");
    let e = refused("[[rules]]\ndescription = \"d\"\nregex = 'b+'\n");
    assert_eq!(e.to_string(), "line 1, column 1: rule `#1 (no id)`: missing field `id`");
    // A value of the wrong type.
    let e = refused("[[rules]]\nid = \"r\"\nregex = 'b+'\nentropy = \"high\"\n");
    assert_eq!(e.to_string(), "line 4, column 1: `entropy` must be a number");
    // A targetRules naming no rule.
    let e = refused(
        "[[rules]]\nid = \"r\"\nregex = 'b+'\n[[allowlists]]\ntargetRules = [\"s\"]\nstopwords = [\"x\"]\n",
    );
    assert_eq!(
        e.to_string(),
        "line 5, column 1: targetRules names rule `s`, which this configuration does not define"
    );
}
