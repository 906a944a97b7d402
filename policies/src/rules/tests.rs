use super::*;

fn pack_with(rule_body: &str) -> String {
    format!(
        "[pack]\nname = \"tenant\"\ncategory = \"secret\"\nseverity = \"error\"\n\n[[rules]]\n{rule_body}\n"
    )
}

const GOOD: &str = "id = \"acme-token\"\ndescription = \"ACME token\"\nregex = '''\\b(acme_[a-z0-9]{16})\\b'''\nsecret_group = 1\nkeywords = [\"acme_\"]\nhelp = \"Revoke it.\"";

fn rule_problem(text: &str) -> (String, String) {
    match parse_pack("tenant.toml", text) {
        Err(PolicyError::InvalidRule { rule, problem, .. }) => (rule, problem),
        other => panic!("expected InvalidRule, got {other:?}"),
    }
}

#[test]
fn builtin_packs_load_and_have_enough_rules() {
    let c = load_packs(DEFAULT_PACKS).unwrap();
    let secrets = builtin_pack("secrets").unwrap();
    assert!(secrets.rules.len() >= 40, "{} secret rules", secrets.rules.len());
    let total: usize = DEFAULT_PACKS.iter().map(|p| builtin_pack(p).unwrap().rules.len()).sum();
    assert_eq!(c.policy().rules.len(), total);
}

/// Validates built-in packs the way a tenant's pack file is validated: every rule of every
/// pack (each regex compiled), then all of them together in one engine (every regex and both
/// line filters compiled). `load_packs` skips this at run time, so this is where a broken
/// built-in pack is caught.
fn validate_in_full(packs: &[(&str, &str)]) -> Result<CompiledPolicy, PolicyError> {
    let parsed = packs.iter().map(|(name, text)| parse_pack(name, text)).collect::<Result<Vec<_>, _>>()?;
    compile(&parsed)
}

#[test]
fn builtin_packs_pass_full_validation() {
    let full = validate_in_full(BUILTIN_PACKS).unwrap();
    for (name, text) in BUILTIN_PACKS {
        validate_in_full(&[(name, text)]).unwrap_or_else(|e| panic!("built-in pack `{name}`: {e}"));
    }
    // What a launch sends is exactly what full validation produces.
    let fast = load_packs(&BUILTIN_PACKS.iter().map(|(n, _)| *n).collect::<Vec<_>>()).unwrap();
    assert_eq!(fast.as_bytes(), full.as_bytes());
    assert_eq!(fast.policy(), full.policy());
}

#[test]
fn full_validation_catches_a_broken_builtin_pack() {
    let (_, secrets) = BUILTIN_PACKS[0];
    let broken = secrets.replacen("regex = '''", "regex = '''(", 1);
    match validate_in_full(&[("secrets", &broken)]) {
        Err(PolicyError::InvalidRule { pack, problem, .. }) => {
            assert_eq!(pack, "secrets");
            assert!(problem.starts_with("regex does not compile"), "{problem}");
        }
        other => panic!("expected InvalidRule, got {other:?}"),
    }
    // The run-time path only checks the shape, which is why the test above must exist.
    assert!(pack::parse("secrets", &broken, pack::Check::ShapeOnly).is_ok());
}

#[test]
fn load_packs_rejects_duplicates_and_empty_selections() {
    assert!(matches!(load_packs(&["pii", "pii"]), Err(PolicyError::DuplicateRule { .. })));
    assert!(matches!(load_packs(&[]), Err(PolicyError::Empty)));
}

#[test]
fn compiled_policy_round_trips_into_an_engine() {
    let c = load_packs(&["pii"]).unwrap();
    let e = cella_scan::Engine::from_policy_json(c.as_bytes()).unwrap();
    assert_eq!(e.policy(), c.policy());
}

#[test]
fn tenant_pack_parses() {
    let p = parse_pack("tenant.toml", &pack_with(GOOD)).unwrap();
    assert_eq!(p.name, "tenant");
    assert_eq!(p.rules[0].id, "acme-token");
    compile(&[p]).unwrap();
}

#[test]
fn rejects_regex_that_does_not_compile_naming_the_rule() {
    let (rule, problem) = rule_problem(&pack_with(&GOOD.replace("{16}", "{16")));
    assert_eq!(rule, "acme-token");
    assert!(problem.starts_with("regex does not compile"), "{problem}");
}

#[test]
fn rejects_missing_secret_group() {
    let (_, problem) = rule_problem(&pack_with(&GOOD.replace("secret_group = 1", "secret_group = 2")));
    assert!(problem.contains("secret_group 2 does not exist"), "{problem}");
}

#[test]
fn rejects_regex_matching_empty_string() {
    let (_, problem) = rule_problem(&pack_with(
        &GOOD
            .replace("{16}", "{0,16}")
            .replace("secret_group = 1", "secret_group = 0")
            .replace("\\b(acme_", "(")
            .replace(")\\b", ")?"),
    ));
    assert_eq!(problem, "regex matches the empty string");
}

#[test]
fn rejects_unknown_validator_and_unknown_field() {
    let (_, problem) = rule_problem(&pack_with(&format!("{GOOD}\nvalidator = \"crc\"")));
    assert!(problem.contains("unknown variant `crc`"), "{problem}");
    let (_, problem) = rule_problem(&pack_with(&format!("{GOOD}\nentropyy = 3.0")));
    assert!(problem.contains("unknown field `entropyy`"), "{problem}");
}

#[test]
fn rejects_empty_help_and_bad_entropy() {
    let (_, problem) = rule_problem(&pack_with(&GOOD.replace("Revoke it.", " ")));
    assert_eq!(problem, "help is empty");
    let (_, problem) = rule_problem(&pack_with(&format!("{GOOD}\nentropy = 9.5")));
    assert!(problem.contains("entropy 9.5 is outside"), "{problem}");
}

#[test]
fn rejects_duplicate_rule_ids_across_packs() {
    let a = parse_pack("a", &pack_with(GOOD)).unwrap();
    let mut b = a.clone();
    b.name = "other".into();
    match compile(&[a, b]) {
        Err(PolicyError::DuplicateRule { rule, first, second }) => {
            assert_eq!((rule.as_str(), first.as_str(), second.as_str()), ("acme-token", "tenant", "other"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rejects_unknown_pack_and_unreadable_file() {
    assert!(matches!(load_packs(&["nope"]), Err(PolicyError::UnknownPack { .. })));
    let e = load_pack_file(Path::new("/nonexistent/pack.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/pack.toml"), "{e}");
}

#[test]
fn tenant_pack_file_loads() {
    let dir = std::env::temp_dir().join(format!("cella-pack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tenant.toml");
    std::fs::write(&path, pack_with(GOOD)).unwrap();
    let pack = load_pack_file(&path).unwrap();
    let mut packs = vec![builtin_pack("secrets").unwrap()];
    packs.push(pack);
    assert!(compile(&packs).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_packs_exclude_globs_join_every_rule_path_allowlist() {
    let text = pack_with(&format!("{GOOD}\n[rules.allowlist]\npaths = ['''^fixtures/''']"))
        .replace("severity = \"error\"\n", "severity = \"error\"\nexclude = [\"test/\", \"*.snap\"]\n");
    let text = format!("{text}\n[[rules]]\n{}\n", GOOD.replace("acme-token", "acme-2"));
    let pack = parse_pack("tenant.toml", &text).unwrap();
    let globs = [cella_scan::glob_to_regex("test/").unwrap(), cella_scan::glob_to_regex("*.snap").unwrap()];
    assert_eq!(pack.rules[0].allowlist.paths, ["^fixtures/".to_owned(), globs[0].clone(), globs[1].clone()]);
    assert_eq!(pack.rules[1].allowlist.paths, globs);
    // The rules apply everywhere else; the first rule's own allowlist still holds for it alone.
    let compiled = compile(&[pack]).unwrap();
    let mut engine = cella_scan::Engine::from_policy_json(compiled.as_bytes()).unwrap();
    let mut report = cella_scan::Report::default();
    let token = b"acme_0123456789abcdef\n";
    for path in ["test/unit.rs", "src/lib.rs", "pkg/test/x.rs", "snapshots/a.snap", "fixtures/k"] {
        engine.scan_file(path, token, &mut report, &cella_scan::Limits::default()).unwrap();
    }
    let found: Vec<String> = report.findings.iter().map(|f| format!("{}:{}", f.path, f.rule_id)).collect();
    assert_eq!(found, ["src/lib.rs:acme-token", "fixtures/k:acme-2"]);
}

#[test]
fn a_bad_exclude_glob_is_refused_naming_the_pack() {
    let text =
        pack_with(GOOD).replace("severity = \"error\"\n", "severity = \"error\"\nexclude = [\"!keep/\"]\n");
    let e = parse_pack("tenant.toml", &text).unwrap_err();
    assert!(matches!(&e, PolicyError::InvalidExclude { pack, .. } if pack == "tenant"), "{e:?}");
    assert_eq!(
        format!("{e}: {}", std::error::Error::source(&e).unwrap()),
        "rule pack `tenant` has an `exclude` glob it cannot use: exclude glob `!keep/` starts with `!`: negation is not supported, list only what to exclude (write `\\!` for a literal `!`)"
    );
}

#[test]
fn the_builtin_catch_alls_are_generic_and_lose_to_a_tenants_specific_rule() {
    let secrets = builtin_pack("secrets").unwrap();
    let generic: Vec<&str> = secrets.rules.iter().filter(|r| r.generic).map(|r| r.id.as_str()).collect();
    assert_eq!(generic, ["generic-secret-assignment", "password-in-url"]);
    let tenant = parse_pack("tenant.toml", &pack_with(GOOD)).unwrap();
    assert!(!tenant.rules[0].generic);
    let generic_rule = parse_pack("t.toml", &pack_with(&format!("{GOOD}\ngeneric = true"))).unwrap();
    assert!(generic_rule.rules[0].generic);
    // Built-in packs first, the tenant's after: the tenant's specific rule still wins.
    let compiled = compile(&[secrets, tenant]).unwrap();
    let mut engine = cella_scan::Engine::from_policy_json(compiled.as_bytes()).unwrap();
    let mut report = cella_scan::Report::default();
    let text = b"api_token = \"acme_9f8e7d6c5b4a3f2e\"\n";
    engine.scan_file("app.env", text, &mut report, &cella_scan::Limits::default()).unwrap();
    let rules: Vec<&str> = report.findings.iter().map(|f| f.rule_id.as_str()).collect();
    assert_eq!(rules, ["acme-token"]);
}

#[test]
fn a_rule_must_find_its_examples_and_not_its_negative_ones() {
    let with = |extra: &str| pack_with(&format!("{GOOD}\n{extra}"));
    let pack = parse_pack(
        "tenant.toml",
        &with("examples = ['''token = acme_0123456789abcdef''']\nnegative_examples = ['''acme_short''']"),
    )
    .unwrap();
    assert_eq!(pack.examples[0].positive, ["token = acme_0123456789abcdef"]);
    let (rule, problem) =
        rule_problem(&with("examples = ['''acme_0123456789abcdef''', '''acme_tooshort''']"));
    assert_eq!(rule, "acme-token");
    assert_eq!(
        problem,
        "its example 2 (`acme_tooshort`) is not found by the rule; fix the example or the rule"
    );
    // Shown escaped, and cut after 60 characters.
    let (_, problem) = rule_problem(&with(
        "negative_examples = [\"x\\n\\u0007 acme_0123456789abcdef and much more text, to be cut off here\"]",
    ));
    assert!(
        problem.starts_with(
            "its negative example 1 (`x\\n\\u{7} acme_0123456789abcdef and much more text, to be cut off …`)"
        ),
        "{problem}"
    );
    // A suppressed finding is not a finding: an inline allow makes a negative example.
    parse_pack("tenant.toml", &with("negative_examples = ['''acme_0123456789abcdef # cella:allow''']"))
        .unwrap();
}

#[test]
fn every_builtin_rule_carries_a_positive_and_a_negative_example() {
    for (name, _) in BUILTIN_PACKS {
        let pack = builtin_pack(name).unwrap();
        assert_eq!(pack.examples.len(), pack.rules.len());
        for (rule, examples) in pack.rules.iter().zip(&pack.examples) {
            assert!(
                !examples.positive.is_empty() && !examples.negative.is_empty(),
                "built-in rule `{}` of `{name}` needs at least one example and one negative example",
                rule.id
            );
        }
    }
}
