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
