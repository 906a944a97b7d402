//! Values that stand in for a secret without being one: a template's reference to where the
//! real value comes from (`${DB_PASSWORD}`, `{{ .Values.token }}`, `<password>`, `%s`,
//! `$TOKEN`), a mask (`********`, `xxxxxxxx`), a run like `12345678` or `abcdef`, the words
//! people write in examples and defaults (`changeme`, `your-api-key-here`), and a name rather
//! than a value (`CLIENT_TRAFFIC_SECRET_0`, `caching_sha2_password`: a label in a table of them). A generic rule
//! ([`crate::Rule::generic`]: a password in a URL, a value assigned to a secret-sounding name)
//! does not report them; rules for one provider's token format never meet them.

/// Whether a secret found by any secret rule is filler rather than key material: half of it or
/// more one repeated mask character (`ghp_xxxxxxxx…`, a Slack URL's `XXXXXXXX…`, `********`),
/// or mostly an alphabet run (`abcdefghijklmnopqrstuvwxyzABCD…`). A real token of a provider's
/// format is random: it never has either shape.
pub fn is_filler(secret: &[u8]) -> bool {
    if secret.len() < 8 {
        return false;
    }
    let mask = |b: u8| matches!(b, b'x' | b'X' | b'*' | b'#' | b'.');
    let mut longest = 0;
    let mut run = 0;
    for (i, &b) in secret.iter().enumerate() {
        run = if i > 0 && secret[i - 1] == b { run + 1 } else { 1 };
        if mask(b) {
            longest = longest.max(run);
        }
    }
    let ascending = secret.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count();
    2 * longest >= secret.len() || 5 * ascending >= 4 * (secret.len() - 1)
}

/// Whether the text right after a candidate secret is `@` and a host reserved for documentation
/// (RFC 2606 and RFC 6761: `example.com`, `example.net`, `example.org`, and names under
/// `.example`, `.test`, `.invalid`): the password of a URL in documentation, like
/// `ftp://user:secre1@example.com/`, is an example, not a credential.
pub fn at_documentation_host(after: &[u8]) -> bool {
    let Some(rest) = after.strip_prefix(b"@") else { return false };
    let end = rest
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')))
        .unwrap_or(rest.len());
    let host = rest[..end].to_ascii_lowercase();
    let host = host.strip_suffix(b".").unwrap_or(&host);
    let under = |domain: &[u8]| host == domain || host.ends_with(&[b".", domain].concat());
    under(b"example.com")
        || under(b"example.net")
        || under(b"example.org")
        || under(b"example")
        || under(b"test")
        || under(b"invalid")
}

/// Whether `value` (a candidate secret, without its quotes) is a placeholder.
pub fn is_placeholder(value: &[u8]) -> bool {
    let v = trim_quotes(value);
    v.is_empty()
        || is_reference(v)
        || is_mask(v)
        || is_run(v)
        || is_stand_in_word(v)
        || is_identifier(v)
        || is_header_name(v)
        || is_camel_case_name(v)
        || is_elided(v)
}

/// A value cut short on purpose, ending in `...` or `…` (`eyJ2IjoiMSIsInMiOjEsImMiOi...`):
/// documentation showing the start of a token, not a token.
fn is_elided(v: &[u8]) -> bool {
    v.ends_with(b"...") || v.ends_with("\u{2026}".as_bytes())
}

/// A name in camel or Pascal case, alone, as a dotted path or hyphenated
/// (`ExclusiveStartBackupArn`, `CloudFrontOriginAccessIdentityList.NextMarker`, `nextToken`,
/// `Access-Control-Allow-Credentials`): a field's, a type's or a header's name, as API models
/// and paginator tables assign them to `input_token`/`output_token`, not a value.
/// Every part is a name part ([`camel_case_words`]), one at least of two words or more. A random
/// token of letters and digits is none.
pub fn is_camel_case_name(v: &[u8]) -> bool {
    let parts: Option<alloc::vec::Vec<usize>> =
        v.split(|&b| matches!(b, b'.' | b'-')).map(camel_case_words).collect();
    parts.is_some_and(|words| words.iter().sum::<usize>() >= 2)
}

/// The words of a name part in camel or Pascal case (`NextContinuationToken`: 3; `Items`: 1),
/// or `None` if it is not one: letters only, each word a capital (or, first, a lowercase
/// letter) and then lowercase letters, with a vowel, three letters long on average.
fn camel_case_words(p: &[u8]) -> Option<usize> {
    if p.is_empty() || !p.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    let mut words: alloc::vec::Vec<&[u8]> = alloc::vec::Vec::new();
    let mut start = 0;
    for i in 1..p.len() {
        if p[i].is_ascii_uppercase() {
            words.push(&p[start..i]);
            start = i;
        }
    }
    words.push(&p[start..]);
    let vowel = |b: &u8| matches!(b.to_ascii_lowercase(), b'a' | b'e' | b'i' | b'o' | b'u' | b'y');
    let proper = |w: &&[u8]| w.len() >= 2 && w[1..].iter().all(u8::is_ascii_lowercase) && w.iter().any(vowel);
    (3 * words.len() <= p.len() && words.iter().all(proper)).then_some(words.len())
}

/// `8-4-4-4-12` hex digits: a UUID. Assigned to a secret-sounding name it is most often an
/// identifier (an idempotency or client token, a request id), sometimes a key: a generic rule
/// reports it with low confidence.
pub fn is_uuid(v: &[u8]) -> bool {
    let v = trim_quotes(v);
    v.len() == 36
        && v.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A snake-case name of words, all upper or all lower case (`CLIENT_TRAFFIC_SECRET_0`,
/// `mysql_native_password`): a constant's or an option's name, not a value. A part is a word if
/// it starts with a letter, has at most 12 characters and at most a third of them digits
/// (`sha2`), or is a number after the first part; so `a3f9_b2c1_e7d4` (hex groups) and
/// `acme_qkvjzmtwpxrbnlsd` (a prefixed random token) are no names.
fn is_identifier(v: &[u8]) -> bool {
    let parts: alloc::vec::Vec<&[u8]> = v.split(|&b| b == b'_').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return false;
    }
    let upper = v.iter().any(u8::is_ascii_uppercase);
    let lower = v.iter().any(u8::is_ascii_lowercase);
    if upper == lower {
        return false;
    }
    parts.iter().enumerate().all(|(i, p)| is_name_word(p) || (i > 0 && p.iter().all(u8::is_ascii_digit)))
}

/// A word of a name: starts with a letter, at most 12 characters (16 if pronounceable), letters
/// and digits, at most a third of them digits.
fn is_name_word(p: &[u8]) -> bool {
    let digits = p.iter().filter(|b| b.is_ascii_digit()).count();
    p.first().is_some_and(u8::is_ascii_alphabetic)
        && (p.len() <= 12 || (p.len() <= 16 && pronounceable(p)))
        && p.iter().all(u8::is_ascii_alphanumeric)
        && 3 * digits <= p.len()
}

/// An HTTP header's name with the `X-` prefix (`X-aws-ec2-metadata-token`,
/// `x-goog-api-key`): the name a token is sent under, not a token.
fn is_header_name(v: &[u8]) -> bool {
    let Some(rest) = v.strip_prefix(b"X-").or_else(|| v.strip_prefix(b"x-")) else { return false };
    let parts: alloc::vec::Vec<&[u8]> = rest.split(|&b| b == b'-').collect();
    parts.len() >= 2 && parts.iter().all(|p| is_name_word(p))
}

/// No more than four consonants in a row (`AUTHORIZATION`, `CERTIFICATES`; not `qkvjzmtwpxrb`):
/// a long part of a name is a word, where a random one is not.
fn pronounceable(p: &[u8]) -> bool {
    let vowel = |b: u8| matches!(b.to_ascii_lowercase(), b'a' | b'e' | b'i' | b'o' | b'u' | b'y');
    let mut run = 0;
    p.iter().all(|&b| {
        run = if b.is_ascii_alphabetic() && !vowel(b) { run + 1 } else { 0 };
        run <= 4
    })
}

fn trim_quotes(v: &[u8]) -> &[u8] {
    let quote = |b: &u8| matches!(b, b'"' | b'\'' | b'`');
    let start = v.iter().position(|b| !quote(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !quote(b)).map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// A reference to the value's real source, in the syntax of a shell, a template engine or a
/// format string.
fn is_reference(v: &[u8]) -> bool {
    const INSIDE: [&[u8]; 6] = [b"${", b"{{", b"$(", b"#{", b"%(", b"%s"];
    if INSIDE.iter().any(|m| v.windows(m.len()).any(|w| w == *m)) {
        return true;
    }
    let wrapped = |open: u8, close: u8| v.len() >= 3 && v[0] == open && v[v.len() - 1] == close;
    if wrapped(b'<', b'>') || wrapped(b'{', b'}') || wrapped(b'%', b'%') || wrapped(b'[', b']') {
        return true;
    }
    let ident = |s: &[u8]| !s.is_empty() && s.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_');
    // `$TOKEN`, `$env:TOKEN`, `@@TOKEN@@`, `__TOKEN__`.
    if let Some(rest) = v.strip_prefix(b"$") {
        let rest = rest.strip_prefix(b"env:").or_else(|| rest.strip_prefix(b"ENV:")).unwrap_or(rest);
        if ident(rest) {
            return true;
        }
    }
    let between = |m: &[u8]| {
        v.len() > 2 * m.len() && v.starts_with(m) && v.ends_with(m) && ident(&v[m.len()..v.len() - m.len()])
    };
    between(b"@@") || between(b"__")
}

/// Mostly one character: `********`, `xxxxxxxx`, `0000`, `aaaaabbbbb`.
fn is_mask(v: &[u8]) -> bool {
    let mut seen = [false; 256];
    let mut distinct = 0;
    for &b in v {
        let b = b.to_ascii_lowercase();
        if !seen[b as usize] {
            seen[b as usize] = true;
            distinct += 1;
        }
    }
    distinct <= 2
}

/// Consecutive characters, up or down: `12345678`, `abcdefg`, `987654`.
fn is_run(v: &[u8]) -> bool {
    if v.len() < 3 {
        return false;
    }
    let steps = |step: i16| {
        v.windows(2)
            .all(|w| i16::from(w[1].to_ascii_lowercase()) - i16::from(w[0].to_ascii_lowercase()) == step)
    };
    steps(1) || steps(-1)
}

/// The words that fill a value's place in examples, defaults and documentation.
const STAND_INS: [&str; 40] = [
    "password",
    "passwd",
    "pass",
    "pwd",
    "secret",
    "changeme",
    "changeit",
    "change_me",
    "example",
    "dummy",
    "test",
    "testing",
    "todo",
    "fixme",
    "placeholder",
    "redacted",
    "hidden",
    "none",
    "null",
    "nil",
    "undefined",
    "empty",
    "default",
    "admin",
    "root",
    "user",
    "username",
    "token",
    "apikey",
    "api_key",
    "key",
    "foo",
    "bar",
    "foobar",
    "baz",
    "hunter2",
    "letmein",
    "qwerty",
    "abc123",
    "p@ssw0rd",
];

/// A stand-in word, alone or with a digit or two after it (`password1`), or a phrase that
/// says where the real value goes (`your-api-key-here`, `insert_token`, `my_password`).
fn is_stand_in_word(v: &[u8]) -> bool {
    let lower: alloc::vec::Vec<u8> = v.iter().map(u8::to_ascii_lowercase).collect();
    let word = match lower.iter().rposition(|b| !b.is_ascii_digit()) {
        Some(i) if lower.len() - i - 1 <= 3 => &lower[..=i],
        _ => &lower[..],
    };
    if STAND_INS.iter().any(|w| w.as_bytes() == word || w.as_bytes() == &lower[..]) {
        return true;
    }
    let sep = |b: &u8| matches!(b, b'-' | b'_' | b'.' | b' ');
    let starts = |p: &[u8]| lower.starts_with(p) && lower.get(p.len()).is_some_and(sep);
    let ends =
        |p: &[u8]| lower.ends_with(p) && lower.len() > p.len() && sep(&lower[lower.len() - p.len() - 1]);
    starts(b"your")
        || starts(b"my")
        || starts(b"insert")
        || starts(b"enter")
        || starts(b"replace")
        || ends(b"here")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_case_names_are_placeholders_and_random_letters_are_not() {
        for v in [
            "ExclusiveStartBackupArn",
            "CloudFrontOriginAccessIdentityList.NextMarker",
            "nextToken",
            "NextId",
            "Marker.Items.NextContinuationToken",
            "Access-Control-Allow-Credentials",
        ] {
            assert!(is_camel_case_name(v.as_bytes()), "{v:?} is a name");
            assert!(is_placeholder(v.as_bytes()), "{v:?} is a placeholder");
        }
        for v in [
            "QmXvTrLpWzKs",
            "KxQwErTyUiOp",
            "aB3dE5fG7hJ9kL1m",
            "Password",
            "AKIAHLP44QJAQNHYLOCI",
            "mzTsNmBWXPEIYkbve",
            "Next.",
            "hunter2Hunter",
        ] {
            assert!(!is_camel_case_name(v.as_bytes()), "{v:?} is not a name");
        }
    }

    #[test]
    fn long_words_in_a_constants_name_and_elided_values_are_placeholders() {
        for v in
            ["AWS_CONTAINER_AUTHORIZATION_TOKEN", "eyJ2IjoiMSIsInMiOjEsImMiOi...", "sk_live_4eC39Hq\u{2026}"]
        {
            assert!(is_placeholder(v.as_bytes()), "{v:?} is a placeholder");
        }
        for v in ["acme_qkvjzmtwpxrbnlsd", "ACME_QKVJZMTWPXRBNLSDFG", "eyJ2IjoiMSIsInMiOjEsImMiOi"] {
            assert!(!is_placeholder(v.as_bytes()), "{v:?} is not a placeholder");
        }
    }

    #[test]
    fn header_names_are_placeholders_and_tokens_after_x_are_not() {
        for v in ["X-aws-ec2-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token", "x-goog-api-key"] {
            assert!(is_placeholder(v.as_bytes()), "{v:?} is a header name");
        }
        for v in ["x-4f8a9b2c7d1e6f30a5b4", "X-qkvjzmtwpxrbnlsdfgh-token", "X-token"] {
            assert!(!is_header_name(v.as_bytes()), "{v:?} is not a header name");
        }
    }

    #[test]
    fn uuids_are_recognised_with_or_without_quotes() {
        assert!(is_uuid(b"abcd12f2-46da-4fdb-b8d5-fbd4c466928f"));
        assert!(is_uuid(b"\"1234ABCD-1234-abcd-1234-d46a8903e9bc\""));
        assert!(!is_uuid(b"abcd12f2-46da-4fdb-b8d5-fbd4c466928"));
        assert!(!is_uuid(b"abcd12f2x46da-4fdb-b8d5-fbd4c466928f"));
        assert!(!is_uuid(b"gbcd12f2-46da-4fdb-b8d5-fbd4c466928f"));
    }

    #[test]
    fn documentation_hosts_are_recognised_after_an_at_sign() {
        for after in [
            &b"@example.com/"[..],
            b"@EXAMPLE.net",
            b"@db.example.org:5432",
            b"@api.example",
            b"@x.test",
            b"@a.invalid",
        ] {
            assert!(at_documentation_host(after), "{}", core::str::from_utf8(after).unwrap_or("?"));
        }
        for after in
            [&b"@db.internal"[..], b"@example.com.evil.io", b"@localhost", b"example.com", b"@myexample.com"]
        {
            assert!(!at_documentation_host(after), "{}", core::str::from_utf8(after).unwrap_or("?"));
        }
    }

    #[test]
    fn masked_and_alphabet_tokens_are_filler_and_random_ones_are_not() {
        for v in [
            "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "glpat-xxxxxxxxxxxxxxxxxxxx",
            "XXXXXXXXXXXXXXXXXXXXXXXX",
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN",
            "sk_live_****************************",
        ] {
            assert!(is_filler(v.as_bytes()), "{v:?} is filler");
        }
        for v in [
            "ghp_mzTsNmBWXPEIYkbve7vPaNd6UU9mqdUeFyXu",
            "AKIAHLP44QJAQNHYLOCI",
            "lKTVv7+5nNmqNLf5P49jVyzG67/F/o4vxrqSrd0p",
            "xoxb-2048-4096-aaaa",
            "short",
            "tok_0000000000000005",
        ] {
            assert!(!is_filler(v.as_bytes()), "{v:?} is not filler");
        }
    }

    #[test]
    fn references_masks_runs_and_stand_ins_are_placeholders() {
        for v in [
            "${DB_PASSWORD}",
            "pre${X}post",
            "{{ .Values.token }}",
            "$(cat /run/secret)",
            "#{token}",
            "%(password)s",
            "%s",
            "<password>",
            "{password}",
            "%DB_PASS%",
            "[token]",
            "$TOKEN",
            "$env:API_KEY",
            "@@SECRET@@",
            "__API_TOKEN__",
            "********",
            "xxxxxxxx",
            "XxXxXx",
            "0000",
            "12345678",
            "abcdefg",
            "987654",
            "changeme",
            "Password1",
            "password123",
            "your-api-key-here",
            "YOUR_TOKEN",
            "insert_key_here",
            "my_password",
            "CLIENT_TRAFFIC_SECRET_0",
            "SERVER_HANDSHAKE_TRAFFIC_SECRET",
            "caching_sha2_password",
            "mysql_native_password",
            "'changeme'",
            "\"\"",
            "hunter2",
            "",
        ] {
            assert!(is_placeholder(v.as_bytes()), "{v:?} is a placeholder");
        }
    }

    #[test]
    fn real_looking_values_are_not_placeholders() {
        for v in [
            "Zr8#kq2Lm",
            "s3cr3t-Xq9!vT",
            "hR7kV2pQ9wX4",
            "ab12cd34",
            "passphrase-7Qx",
            "tokenizer9Lm2",
            "yourself",
            "mykonos-2031",
            "there",
            "$5tr0ng!",
            "1357924680",
            "Tr0ub4dor&3",
            "a3f9_b2c1_e7d4_9f0a",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "Secret_Value_2031",
            "acme_qkvjzmtwpxrbnlsd",
        ] {
            assert!(!is_placeholder(v.as_bytes()), "{v:?} is not a placeholder");
        }
    }
}
