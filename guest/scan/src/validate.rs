//! Validators: checks that turn a regex candidate into a finding, and Shannon entropy.

use crate::rule::Validator;

/// Runs `validator` on `candidate`. `before` and `after` are the text around the candidate in
/// the same buffer (used by text-shape checks such as [`Validator::Bsd2Clause`], and to tell a
/// card number from a number in a table).
pub fn check(validator: Validator, candidate: &[u8], before: &[u8], after: &[u8]) -> bool {
    match validator {
        Validator::PaymentCard => payment_card(candidate) && !in_numeric_table(before, candidate, after),
        Validator::UsSsn => us_ssn(candidate) && !spaced_ssn_on_a_phone_line(candidate, before, after),
        Validator::Iban => iban(candidate),
        Validator::Email => {
            email(candidate) && !ssh_remote(candidate, before, after) && !url_userinfo(before)
        }
        Validator::Phone => phone(candidate),
        Validator::Bsd2Clause => bsd2_clause(after),
    }
}

/// Shannon entropy of `data` in bits per byte (0 for empty input).
pub fn shannon_entropy(data: &[u8]) -> f32 {
    if data.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let len = data.len() as f32;
    let mut h = 0.0f32;
    for &c in counts.iter().filter(|&&c| c != 0) {
        let p = c as f32 / len;
        h -= p * log2(p);
    }
    h
}

/// log2 for `0 < x <= 1` without libm: split off the exponent, then a short series for the
/// mantissa. Accurate to ~1e-5, plenty for an entropy threshold.
fn log2(x: f32) -> f32 {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // 1 <= m < 2
                                                                // ln(m) = 2 atanh((m-1)/(m+1)) = 2 (t + t^3/3 + t^5/5 + ...)
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let ln_m = 2.0 * t * (1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 / 9.0))));
    exp as f32 + ln_m * core::f32::consts::LOG2_E
}

fn digits(candidate: &[u8], out: &mut [u8; 32]) -> Option<usize> {
    let mut n = 0;
    for &b in candidate {
        match b {
            b'0'..=b'9' => {
                if n == out.len() {
                    return None;
                }
                out[n] = b - b'0';
                n += 1;
            }
            b' ' | b'-' | b'.' | b'(' | b')' | b'+' => {}
            _ => return None,
        }
    }
    Some(n)
}

/// Luhn check over decimal digits.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

fn prefix_value(d: &[u8], n: usize) -> u32 {
    d.iter().take(n).fold(0, |acc, &x| acc * 10 + u32::from(x))
}

/// Payment card number: issuer prefix + length + Luhn. Separators must be used consistently
/// (all spaces or all dashes, or none).
pub fn payment_card(candidate: &[u8]) -> bool {
    let has_space = candidate.contains(&b' ');
    let has_dash = candidate.contains(&b'-');
    if has_space && has_dash {
        return false;
    }
    if candidate.iter().any(|b| !(b.is_ascii_digit() || *b == b' ' || *b == b'-')) {
        return false;
    }
    let mut buf = [0u8; 32];
    let Some(n) = digits(candidate, &mut buf) else { return false };
    let d = &buf[..n];
    if !(13..=19).contains(&n) {
        return false;
    }
    let p2 = prefix_value(d, 2);
    let p3 = prefix_value(d, 3);
    let p4 = prefix_value(d, 4);
    let issuer_ok = match d[0] {
        4 => matches!(n, 13 | 16 | 19),              // Visa
        5 => (51..=55).contains(&p2) && n == 16,     // Mastercard
        2 => (2221..=2720).contains(&p4) && n == 16, // Mastercard 2-series
        3 => {
            ((p2 == 34 || p2 == 37) && n == 15)                                           // Amex
                || (((300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39)
                    && (14..=19).contains(&n))                                            // Diners
                || ((3528..=3589).contains(&p4) && (16..=19).contains(&n)) // JCB
        }
        6 => {
            (p4 == 6011 || (644..=649).contains(&p3) || p2 == 65) && (n == 16 || n == 19) // Discover
                || (p2 == 62 && (16..=19).contains(&n)) // UnionPay
        }
        _ => false,
    };
    issuer_ok && luhn(d)
}

/// Words that make a number on their line a card number whatever surrounds it.
const CARD_CONTEXT: [&[u8]; 8] =
    [b"card", b"visa", b"mastercard", b"amex", b"credit", b"pan", b"ccnum", b"cc_"];

/// How far around a candidate the context checks look, either way: a bound, so that a long
/// line holding many candidates costs each of them the same small look, not a walk to the line's
/// start.
const CONTEXT_REACH: usize = 160;

/// The candidate's line around it, at most [`CONTEXT_REACH`] bytes either way: the part before
/// it and the part after it.
fn line_around<'a>(before: &'a [u8], after: &'a [u8]) -> (&'a [u8], &'a [u8]) {
    let before = &before[before.len().saturating_sub(CONTEXT_REACH)..];
    let after = &after[..after.len().min(CONTEXT_REACH)];
    let start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let end = after.iter().position(|&b| b == b'\n').unwrap_or(after.len());
    (&before[start..], &after[..end])
}

/// Whether one of `words` (ASCII case-insensitive) is on the candidate's line, near it.
fn line_mentions(before: &[u8], after: &[u8], words: &[&[u8]]) -> bool {
    let (left, right) = line_around(before, after);
    [left, right].iter().any(|part| words.iter().any(|w| contains_ascii_ci(part, w)))
}

/// Whether an unseparated digit run is one number among others rather than a card number: an
/// element of an array or table (another number follows or precedes it across a comma), or a
/// negative or fractional number. Numeric constant
/// tables (bignum powers, curve points, float test vectors) hold many Luhn-valid runs with card
/// prefixes. A card context word on the candidate's line (`card`, `visa`, `pan`, …) keeps it.
/// Card numbers written with spaces or dashes are deliberate and never count as table numbers.
pub fn in_numeric_table(before: &[u8], candidate: &[u8], after: &[u8]) -> bool {
    if !candidate.iter().all(u8::is_ascii_digit) {
        return false;
    }
    if line_mentions(before, after, &CARD_CONTEXT) {
        return false;
    }
    let before = &before[before.len().saturating_sub(CONTEXT_REACH)..];
    let after = &after[..after.len().min(CONTEXT_REACH)];
    let space = |b: &u8| b.is_ascii_whitespace();
    let number = |b: &u8| b.is_ascii_hexdigit();
    // Right before it: `-` or `.` (a negative or fractional number).
    if matches!(before.last(), Some(b'-' | b'.')) {
        return true;
    }
    // Right after it: a fraction.
    if after.first() == Some(&b'.') && after.get(1).is_some_and(u8::is_ascii_digit) {
        return true;
    }
    // A comma between it and another number, before or after (across line breaks).
    let mut back = before.iter().rev().skip_while(|b| space(b));
    if back.next() == Some(&b',') && back.find(|b| !space(b)).is_some_and(number) {
        return true;
    }
    let mut ahead = after.iter().skip_while(|b| space(b));
    ahead.next() == Some(&b',') && ahead.find(|b| !space(b)).is_some_and(|b| number(b) || *b == b'-')
}

/// Words that make a line about telephones.
const PHONE_CONTEXT: [&[u8]; 6] = [b"phone", b"tel", b"fax", b"mobile", b"call", b"dial"];

/// Whether an SSN-shaped `AAA GG SSSS` written with spaces stands on a line about telephones
/// (`phone 555 12 3456`): there it is a phone number's digits. The dashed form, the way SSNs
/// are written, is never discounted.
fn spaced_ssn_on_a_phone_line(candidate: &[u8], before: &[u8], after: &[u8]) -> bool {
    candidate.contains(&b' ') && line_mentions(before, after, &PHONE_CONTEXT)
}

/// US SSN `AAA-GG-SSSS` (dashes or spaces, or none): area not 000, 666, 9xx; group not 00;
/// serial not 0000.
pub fn us_ssn(candidate: &[u8]) -> bool {
    let mut buf = [0u8; 32];
    let Some(n) = digits(candidate, &mut buf) else { return false };
    if n != 9 {
        return false;
    }
    let area = prefix_value(&buf[..3], 3);
    let group = prefix_value(&buf[3..5], 2);
    let serial = prefix_value(&buf[5..9], 4);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// IBAN lengths by country (ISO 13616 registry, common subset).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BR", 29),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NL", 18),
    (b"NO", 15),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"SA", 24),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VG", 24),
    (b"XK", 20),
];

/// IBAN: country length and mod-97 == 1. Spaces between groups are allowed.
pub fn iban(candidate: &[u8]) -> bool {
    let mut buf = [0u8; 34];
    let mut n = 0;
    for &b in candidate {
        if b == b' ' {
            continue;
        }
        if !b.is_ascii_alphanumeric() || n == buf.len() {
            return false;
        }
        buf[n] = b.to_ascii_uppercase();
        n += 1;
    }
    let s = &buf[..n];
    if n < 15 || !s[0].is_ascii_uppercase() || !s[1].is_ascii_uppercase() {
        return false;
    }
    if !s[2].is_ascii_digit() || !s[3].is_ascii_digit() {
        return false;
    }
    let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| c[..] == s[..2]) else { return false };
    if n != len {
        return false;
    }
    let mut rem: u32 = 0;
    for &c in s[4..].iter().chain(&s[..4]) {
        if c.is_ascii_digit() {
            rem = (rem * 10 + u32::from(c - b'0')) % 97;
        } else {
            let v = u32::from(c - b'A') + 10;
            rem = (rem * 100 + v) % 97;
        }
    }
    rem == 1
}

/// E-mail: `local@domain.tld` with no empty or dash-edged labels, no `..`, alphabetic TLD.
pub fn email(candidate: &[u8]) -> bool {
    let mut parts = candidate.splitn(2, |&b| b == b'@');
    let (Some(local), Some(domain)) = (parts.next(), parts.next()) else { return false };
    if local.is_empty() || local.len() > 64 || domain.len() > 253 || domain.contains(&b'@') {
        return false;
    }
    if local[0] == b'.' || local[local.len() - 1] == b'.' || local.windows(2).any(|w| w == b"..") {
        return false;
    }
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for label in domain.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 || label[0] == b'-' || label[label.len() - 1] == b'-' {
            return false;
        }
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') {
            return false;
        }
        labels += 1;
        last = label;
    }
    labels >= 2 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic) && !is_file_extension(last)
}

/// Name endings of files that are no top-level domain (`logo@2x.png` names an image, not an
/// address). Endings that are also country domains (`.py`, `.rs`, `.md`, `.sh`) are not here.
const FILE_EXTENSIONS: [&[u8]; 24] = [
    b"png", b"jpg", b"jpeg", b"gif", b"svg", b"webp", b"ico", b"bmp", b"css", b"js", b"mjs", b"jsx", b"tsx",
    b"json", b"yaml", b"yml", b"toml", b"xml", b"html", b"htm", b"txt", b"lock", b"wasm", b"map",
];

fn is_file_extension(tld: &[u8]) -> bool {
    FILE_EXTENSIONS.iter().any(|e| tld.eq_ignore_ascii_case(e))
}

/// Whether an address-shaped candidate is the user information of a URL (`scheme://user@host`,
/// or the `pass@host` of `scheme://user:pass@host`): what precedes it on its line holds `://`
/// with no space after it. (A `mailto:` address has no `//`.)
fn url_userinfo(before: &[u8]) -> bool {
    let (line, _) = line_around(before, &[]);
    match memchr::memmem::rfind(line, b"://") {
        Some(i) => {
            !line[i..].iter().any(|b| b.is_ascii_whitespace() || matches!(b, b'"' | b'\'' | b'<' | b'>'))
        }
        None => false,
    }
}

/// Whether an address-shaped `git@host` is a repository's SSH remote (`git@github.com:acme/x.git`,
/// `ssh://git@host/x`): the user is a service account, not a person.
fn ssh_remote(candidate: &[u8], before: &[u8], after: &[u8]) -> bool {
    let Some(at) = candidate.iter().position(|&b| b == b'@') else { return false };
    let user = &candidate[..at];
    let service =
        [&b"git"[..], b"hg", b"svn", b"gitlab", b"ssh"].iter().any(|u| user.eq_ignore_ascii_case(u));
    service && (matches!(after.first(), Some(b':' | b'/')) || before.ends_with(b"://"))
}

/// Phone: E.164 (`+`, country code not starting with 0, 8–15 digits in total) or a 10-digit
/// North American number (area code and exchange not starting with 0 or 1), or a national
/// number with a trunk `0` and 10–11 digits written in groups.
pub fn phone(candidate: &[u8]) -> bool {
    let mut buf = [0u8; 32];
    let Some(n) = digits(candidate, &mut buf) else { return false };
    let d = &buf[..n];
    let plus = candidate.first() == Some(&b'+');
    if plus {
        return (8..=15).contains(&n) && d[0] != 0;
    }
    let separators = candidate.iter().filter(|b| matches!(b, b' ' | b'-' | b'.' | b'(' | b')')).count();
    if separators == 0 {
        // Bare digit runs are too often ids, timestamps or constants.
        return false;
    }
    // `(AAA) EEE-NNNN` is North American: its area code and exchange start with 2-9.
    if candidate.first() == Some(&b'(') && candidate.get(4) == Some(&b')') {
        return n == 10 && d[0] >= 2 && d[3] >= 2;
    }
    match n {
        10 if d[0] >= 2 && d[3] >= 2 => true,              // NANP (AAA) EEE-NNNN
        11 if d[0] == 1 && d[1] >= 2 && d[4] >= 2 => true, // NANP with leading 1
        10 | 11 if d[0] == 0 && d[1] != 0 => true,         // national trunk 0 (UK, DE, FR…)
        _ => false,
    }
}

/// BSD-2-Clause: the text after the redistribution clause must not contain the third clause.
fn bsd2_clause(after: &[u8]) -> bool {
    let window = &after[..after.len().min(2048)];
    !contains_ascii_ci(window, b"neither the name")
}

/// ASCII case-insensitive substring search (short needles, short haystacks).
pub fn contains_ascii_ci(haystack: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_test_cards_and_rejects_off_by_one() {
        assert!(payment_card(b"4111 1111 1111 1111"));
        assert!(payment_card(b"5555-5555-5555-4444"));
        assert!(payment_card(b"378282246310005"));
        assert!(payment_card(b"6011111111111117"));
        assert!(!payment_card(b"4111 1111 1111 1112"));
        assert!(!payment_card(b"4111-1111 1111 1111"));
        assert!(!payment_card(b"1234567812345670")); // Luhn ok, no issuer
    }

    #[test]
    fn a_number_in_a_table_is_not_a_card_number_unless_a_card_is_named() {
        let card = b"4111111111111111";
        let table = |before: &str, after: &str| in_numeric_table(before.as_bytes(), card, after.as_bytes());
        // Alone, or in a sentence: a card number.
        assert!(!table("number: ", " is on file\n"));
        assert!(!table("", ". Next sentence"));
        assert!(!table("(", ")"));
        // In an array, one per line or several per line; negative; fractional.
        assert!(table("    1001412661522686, ", ",\n"));
        assert!(table(
            "const T: [u64; 3] = [\n    3550991145492617480,\n    ",
            ",\n    4104017706432470283,\n"
        ));
        assert!(table("{ mantissa -", ", base 2 }"));
        assert!(table("x = 0.", ""));
        assert!(table("x = ", ".5"));
        assert!(table("0x1f, ", ""));
        // A card context on its line keeps it, and so do separators.
        assert!(!table("let visa_cards = [\"", "\", \"5555555555554444\"];"));
        assert!(!table("test_pan: ", ", 42"));
        assert!(!in_numeric_table(b"1, ", b"4111 1111 1111 1111", b", 2"));
        assert!(check(Validator::PaymentCard, card, b"card: ", b"\n"));
        assert!(!check(Validator::PaymentCard, card, b"[7, ", b", 9]"));
    }

    #[test]
    fn ssn_rules() {
        assert!(us_ssn(b"123-45-6789"));
        assert!(!us_ssn(b"000-45-6789"));
        assert!(!us_ssn(b"666-45-6789"));
        assert!(!us_ssn(b"912-45-6789"));
        assert!(!us_ssn(b"123-00-6789"));
        assert!(!us_ssn(b"123-45-0000"));
    }

    #[test]
    fn iban_mod97() {
        assert!(iban(b"GB82 WEST 1234 5698 7654 32"));
        assert!(iban(b"DE89370400440532013000"));
        assert!(!iban(b"GB82 WEST 1234 5698 7654 33"));
        assert!(!iban(b"DE8937040044053201300")); // wrong length
    }

    #[test]
    fn a_spaced_ssn_on_a_phone_line_is_a_phone_number() {
        let ssn = Validator::UsSsn;
        assert!(!check(ssn, b"555 12 3456", b"phone ", b"\n"));
        assert!(!check(ssn, b"412 58 3096", b"", b" (mobile)"));
        assert!(check(ssn, b"412 58 3096", b"ssn = \"", b"\"\n"));
        assert!(check(ssn, b"412-58-3096", b"phone / ssn: ", b""));
        // Context is looked for near the candidate only: a long line costs each candidate the
        // same bounded look, so "phone" 200 bytes away does not count.
        let far = [&b"phone "[..], &[b' '; 200]].concat();
        assert!(check(ssn, b"412 58 3096", &far, b""));
    }

    #[test]
    fn email_shapes() {
        assert!(email(b"jane.doe@corp.example.org"));
        assert!(!email(b"jane..doe@corp.org"));
        assert!(!email(b"jane@localhost"));
        assert!(!email(b"jane@-corp.org"));
        assert!(!email(b"jane@corp.c0m"));
        // A retina image's name is no address; a country domain that is also a file ending is.
        assert!(!email(b"logo@2x.png"));
        assert!(!email(b"icon@3x.WEBP"));
        assert!(email(b"dev@tools.py"));
        // A repository's SSH remote is no person's address.
        let mail = Validator::Email;
        assert!(!check(mail, b"git@github.com", b"git clone ", b":acme/infra.git"));
        assert!(!check(mail, b"git@gitlab.example.net", b"ssh://", b"/acme/infra.git"));
        assert!(check(mail, b"git@lumenbridge.io", b"write to ", b" for access"));
        assert!(check(mail, b"ana@github.com", b"", b":"));
        // A URL's user information is no address; a `mailto:` link's is.
        assert!(!check(mail, b"Zr8vK2qLm4Tx@db.internal", b"url = postgres://svc:", b"/app"));
        assert!(!check(mail, b"deploy@ci.internal", b"https://", b"/hook"));
        assert!(check(mail, b"ana@lumenbridge.io", b"<a href=\"mailto:", b"\">"));
        assert!(check(mail, b"ana@lumenbridge.io", b"see https://x.io/docs or write ", b""));
    }

    #[test]
    fn phone_shapes() {
        assert!(phone(b"+14155552671"));
        assert!(phone(b"(415) 555-2671"));
        assert!(phone(b"020 7946 0958"));
        assert!(!phone(b"4155552671"));
        assert!(!phone(b"+0123456789"));
        assert!(!phone(b"(115) 555-2671"));
        // Parentheses around three digits make it North American: no area code starts with 0.
        assert!(!phone(b"(015) 555-0172"));
        assert!(!phone(b"(415) 055-0172"));
        assert!(phone(b"0151 555 0172"));
    }

    #[test]
    fn entropy_values() {
        assert_eq!(shannon_entropy(b"aaaa"), 0.0);
        assert!((shannon_entropy(b"ab") - 1.0).abs() < 1e-4);
        assert!((shannon_entropy(b"0123456789abcdef") - 4.0).abs() < 1e-4);
    }
}
