use super::*;

/// A pack of two rules; `second` is the body of the second rule (it starts on line 14).
fn pack(second: &str) -> String {
    format!(
        "[pack]\nname = \"acme\"\ncategory = \"secret\"\nseverity = \"error\"\n\n\
         [[rules]]\nid = \"acme-deploy-token\"\ndescription = \"ACME deploy token\"\n\
         regex = '''\\b(acmedt_[a-z0-9]{{24}})\\b'''\nsecret_group = 1\nkeywords = [\"acmedt_\"]\n\
         help = \"Revoke it in the ACME console.\"\n\n[[rules]]\n{second}\n"
    )
}

const SECOND: &str = "id = \"acme-webhook-secret\"\ndescription = \"ACME webhook signing secret\"\n\
                      regex = '''whsec_acme_([A-Za-z0-9]{32})'''\nsecret_group = 1\n\
                      keywords = [\"whsec_acme_\"]\nhelp = \"Roll the webhook secret.\"";

fn refused(text: &str) -> PackError {
    validate(text, PackFormat::Cella, None, &PackLimits::default()).expect_err("refused")
}

fn line(e: &PackError) -> usize {
    e.location().unwrap_or_else(|| panic!("no location: {e}")).line
}

#[test]
fn a_good_pack_passes_with_its_rules_and_compiled_size() {
    let text = pack(SECOND);
    let v = validate(&text, PackFormat::Cella, Some("mine"), &PackLimits::default()).unwrap();
    assert_eq!(v.pack.name, "mine");
    assert_eq!(v.rule_ids(), ["acme-deploy-token", "acme-webhook-secret"]);
    assert_eq!(v.cella_toml, text);
    assert_eq!(v.format, PackFormat::Cella);
    assert!(v.compiled_bytes > 1000, "{}", v.compiled_bytes);
    // Without a name, the [pack] name.
    assert_eq!(validate(&text, PackFormat::Cella, None, &PackLimits::default()).unwrap().pack.name, "acme");
}

#[test]
fn a_regex_that_does_not_compile_is_refused_at_its_line() {
    let e = refused(&pack(&SECOND.replace("{32}", "{32")));
    assert_eq!(line(&e), 17, "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with("line 17, column 1: rule `acme-webhook-secret`: regex does not compile"),
        "{text}"
    );
}

#[test]
fn a_catastrophic_regex_is_refused_by_name_at_its_line() {
    let e = refused(&pack(&SECOND.replace("([A-Za-z0-9]{32})", "((?:[A-Za-z0-9]{200}){200})")));
    assert!(matches!(e, PackError::Catastrophic { what: "regex", .. }), "{e:?}");
    assert_eq!(line(&e), 17);
    assert!(e.to_string().contains("rule `acme-webhook-secret`: its regex is catastrophic"), "{e}");
    // So is a catastrophic allowlist regex, at the allowlist's key.
    let e = refused(&pack(&format!("{SECOND}\n[rules.allowlist]\nregexes = ['''(?:\\w{{300}}){{300}}''']")));
    assert!(matches!(e, PackError::Catastrophic { what: "allowlist regex", .. }), "{e:?}");
    assert_eq!(line(&e), 22, "{e}");
}

#[test]
fn a_missing_field_is_refused_at_its_rules_table() {
    let e = refused(&pack(&SECOND.replace("help = \"Roll the webhook secret.\"", "")));
    assert_eq!(line(&e), 14, "{e}");
    assert!(e.to_string().contains("rule `acme-webhook-secret`: missing field `help`"), "{e}");
}

#[test]
fn an_unknown_field_is_refused_at_its_line() {
    let e = refused(&pack(&format!("{SECOND}\nentropyy = 3.5")));
    assert_eq!(line(&e), 21, "{e}");
    assert!(e.to_string().contains("unknown field `entropyy`"), "{e}");
}

#[test]
fn a_duplicate_id_is_refused_naming_both_lines() {
    let e = refused(&pack(&SECOND.replace("acme-webhook-secret", "acme-deploy-token")));
    assert_eq!(
        e.to_string(),
        "line 14, column 1: rule id `acme-deploy-token` is used twice (first at line 6): give each rule its own id"
    );
}

#[test]
fn the_id_of_a_builtin_rule_is_refused() {
    let e = refused(&pack(&SECOND.replace("acme-webhook-secret", "aws-access-key-id")));
    assert_eq!(
        e.to_string(),
        "line 15, column 1: rule id `aws-access-key-id` is the id of a rule of the built-in pack `secrets`: \
         rename the rule"
    );
}

#[test]
fn other_rule_problems_name_their_key() {
    let e = refused(&pack(&SECOND.replace("secret_group = 1", "secret_group = 3")));
    assert_eq!(line(&e), 18);
    assert!(e.to_string().contains("secret_group 3 does not exist"), "{e}");
    let e = refused(&pack(&SECOND.replace("[\"whsec_acme_\"]", "[\"w\"]")));
    assert_eq!(line(&e), 19);
    let e = refused(&pack(&SECOND.replace("help = \"Roll the webhook secret.\"", "help = \" \"")));
    assert_eq!(line(&e), 20);
}

#[test]
fn toml_that_does_not_parse_is_refused_at_its_line() {
    let e = refused(&pack(
        &SECOND.replace("description = \"ACME webhook signing secret\"", "description = \"ACME"),
    ));
    assert!(matches!(e, PackError::Syntax { .. }), "{e:?}");
    assert_eq!(line(&e), 16, "{e}");
    let e = refused("[[rules]]\nid = \"x\"\n");
    assert!(e.to_string().contains("missing field `pack`"), "{e}");
}

#[test]
fn packs_over_the_limits_are_refused() {
    let limits = PackLimits { max_bytes: 100, ..PackLimits::default() };
    let text = pack(SECOND);
    assert_eq!(
        validate(&text, PackFormat::Cella, None, &limits).unwrap_err(),
        PackError::TooLarge { bytes: text.len(), limit: 100 }
    );
    let limits = PackLimits { max_rules: 1, ..PackLimits::default() };
    assert_eq!(
        validate(&text, PackFormat::Cella, None, &limits).unwrap_err(),
        PackError::TooManyRules { rules: 2, limit: 1 }
    );
    assert_eq!(
        refused("[pack]\nname = \"x\"\ncategory = \"secret\"\nseverity = \"error\"\n"),
        PackError::NoRules
    );
    let first = validate(&text, PackFormat::Cella, None, &PackLimits::default()).unwrap().compiled_bytes;
    let limits = PackLimits { max_compiled_bytes: first - 1, ..PackLimits::default() };
    let e = validate(&text, PackFormat::Cella, None, &limits).unwrap_err();
    assert!(matches!(&e, PackError::CompiledTooLarge { rule, .. } if rule == "acme-webhook-secret"), "{e:?}");
    assert_eq!(e.location().map(|l| l.line), Some(14));
}

#[test]
fn every_builtin_regex_is_far_below_the_catastrophe_limit() {
    let limit = PackLimits::default().max_regex_bytes;
    let mut large = Vec::new();
    for (name, _) in BUILTIN_PACKS {
        for rule in super::super::builtin_pack(name).unwrap().rules {
            match compiled_size(&rule.regex, limit) {
                Ok(bytes) if bytes * 4 >= limit => large.push((rule.id, bytes)),
                Ok(_) => {}
                Err(_) => panic!("built-in rule {} is over the limit", rule.id),
            }
        }
    }
    assert!(large.is_empty(), "built-in regexes over a quarter of the limit of {limit} bytes: {large:?}");
}

#[test]
fn the_format_is_guessed_from_the_content() {
    assert_eq!(PackFormat::guess(&pack(SECOND)), PackFormat::Cella);
    assert_eq!(PackFormat::guess("[[rules]]\nid = \"a\"\nhelp = \"h\"\n"), PackFormat::Cella);
    assert_eq!(
        PackFormat::guess("title = \"t\"\n[[rules]]\nid = \"a\"\nregex = 'x'\n"),
        PackFormat::Gitleaks
    );
    assert_eq!(PackFormat::parse("gitleaks"), Some(PackFormat::Gitleaks));
    assert_eq!(PackFormat::parse("yaml"), None);
}

#[test]
fn a_job_policy_joins_builtin_and_stored_packs_and_refuses_a_rule_in_two() {
    let stored = stored_pack("acme@3", &pack(SECOND)).unwrap();
    let policy = tenant_policy(&["pii"], vec![stored.clone()]).unwrap();
    let pii = super::super::builtin_pack("pii").unwrap().rules.len();
    assert_eq!(policy.policy().rules.len(), pii + 2);
    assert_eq!(policy.policy().rules[pii].id, "acme-deploy-token");
    // What a worker writes, read back as cella-vmm reads it.
    let back = read_compiled(policy.as_bytes().to_vec()).unwrap();
    assert_eq!(back.policy(), policy.policy());
    let mut again = stored.clone();
    again.name = "other@1".into();
    match tenant_policy(&[], vec![stored, again]) {
        Err(PolicyError::DuplicateRule { rule, first, second }) => {
            assert_eq!(
                (rule.as_str(), first.as_str(), second.as_str()),
                ("acme-deploy-token", "acme@3", "other@1")
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_compiled_policy_of_another_format_version_is_refused() {
    let e = read_compiled(br#"{"format_version":99,"rules":[]}"#.to_vec()).unwrap_err();
    assert!(e.to_string().contains("format version 99"), "{e}");
    assert!(matches!(read_compiled(b"{".to_vec()), Err(PolicyError::Malformed { .. })));
}

#[test]
fn an_upload_whose_rule_disagrees_with_its_examples_is_refused_at_the_examples_line() {
    // The second rule: 14 [[rules]], 15 id, 16 description, 17 regex, 18 secret_group, 19 keywords,
    // 20 help, 21 examples.
    let good = "examples = ['''WEBHOOK=whsec_acme_Q7dX2mP9vL4kR8sT1wY6zB3nC5hJ0aE2''']\n\
                negative_examples = ['''whsec_acme_tooshort''']";
    validate(&pack(&format!("{SECOND}\n{good}")), PackFormat::Cella, None, &PackLimits::default()).unwrap();
    let e = refused(&pack(&format!("{SECOND}\nexamples = ['''whsec_acme_tooshort''']")));
    assert_eq!(line(&e), 21, "{e}");
    assert_eq!(
        e.to_string(),
        "line 21, column 1: rule `acme-webhook-secret`: its example 1 (`whsec_acme_tooshort`) is not found \
         by the rule; fix the example or the rule"
    );
    let found = "negative_examples = ['''whsec_acme_Q7dX2mP9vL4kR8sT1wY6zB3nC5hJ0aE2''']";
    let e = refused(&pack(&format!("{SECOND}\n{found}")));
    assert_eq!(line(&e), 21, "{e}");
    assert!(e.to_string().contains("its negative example 1"), "{e}");
}
