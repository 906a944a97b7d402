//! Validators: checks that turn a regex candidate into a finding, and Shannon entropy.

use crate::rule::Validator;

/// Runs `validator` on `candidate`. `before` and `after` are the text around the candidate in
/// the same buffer (used by text-shape checks such as [`Validator::Bsd2Clause`], and to tell a
/// card number from a number in a table).
pub fn check(validator: Validator, candidate: &[u8], before: &[u8], after: &[u8]) -> bool {
    match validator {
        Validator::Base62Crc32 => crate::checksum::base62_crc32_tail(candidate),
        Validator::Jwt => crate::checksum::jwt_structure(candidate),
        Validator::PypiMacaroon => crate::checksum::pypi_macaroon(candidate),
        Validator::SpdxListed => crate::spdx::check_expression(candidate) == crate::spdx::Checked::Listed,
        Validator::SpdxUnlisted => crate::spdx::check_expression(candidate) != crate::spdx::Checked::Listed,
        Validator::PaymentCard => payment_card(candidate) && !in_numeric_table(before, candidate, after),
        Validator::UsSsn => us_ssn(candidate) && !spaced_ssn_on_a_phone_line(candidate, before, after),
        Validator::Iban => iban(candidate),
        Validator::Email => {
            email(candidate) && !ssh_remote(candidate, before, after) && !url_userinfo(before)
        }
        Validator::Phone => phone(candidate),
        Validator::Bsd2Clause => bsd2_clause(after),
        Validator::UkNhsNumber => uk_nhs_number(candidate),
        Validator::UkNino => uk_nino(candidate),
        Validator::CaSin => ca_sin(candidate),
        Validator::UsItin => us_itin(candidate),
        Validator::UsAbaRouting => us_aba_routing(candidate),
        Validator::UsNpi => us_npi(candidate),
        Validator::UsDea => us_dea(candidate),
        Validator::BrCpf => br_cpf(candidate),
        Validator::BrCnpj => br_cnpj(candidate),
        Validator::MxCurp => mx_curp(candidate),
        Validator::EsDniNie => es_dni_nie(candidate),
        Validator::ItCodiceFiscale => it_codice_fiscale(candidate),
        Validator::FrNir => fr_nir(candidate),
        Validator::DeTaxId => de_tax_id(candidate),
        Validator::NlBsn => nl_bsn(candidate),
        Validator::BeNationalNumber => be_national_number(candidate),
        Validator::PlPesel => pl_pesel(candidate),
        Validator::SePersonnummer => se_personnummer(candidate),
        Validator::FiHetu => fi_hetu(candidate),
        Validator::NoFodselsnummer => no_fodselsnummer(candidate),
        Validator::DkCpr => dk_cpr(candidate),
        Validator::InAadhaar => in_aadhaar(candidate),
        Validator::InPan => in_pan(candidate),
        Validator::AuTfn => au_tfn(candidate),
        Validator::AuMedicare => au_medicare(candidate),
        Validator::AuAbn => au_abn(candidate),
        Validator::SgNric => sg_nric(candidate),
        Validator::ZaId => za_id(candidate),
        Validator::CnResidentId => cn_resident_id(candidate),
        Validator::JpMyNumber => jp_my_number(candidate),
        Validator::KrRrn => kr_rrn(candidate),
        Validator::ChAhv => ch_ahv(candidate),
        Validator::Vin => vin(candidate),
        Validator::BitcoinAddress => bitcoin_address(candidate),
        Validator::Ipv4Public => ipv4_public(candidate, before, after),
        Validator::MacAddress => mac_address(candidate),
        Validator::DateOfBirth => date_of_birth(candidate),
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

// ---------------------------------------------------------------------------------------------
// National and personal identifiers. Each validator takes the regex candidate, drops the
// separators its format allows, and checks what the issuer's specification fixes: lengths,
// allocated prefixes, an embedded birth date, and check digits. The rules' keywords supply the
// context; these functions only say whether the characters can be such an identifier.
// ---------------------------------------------------------------------------------------------

/// Whether `b` separates the groups of an identifier as people write them (`+` is the
/// separator of a Swedish centenarian's personnummer).
fn is_id_separator(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.' | b'/' | b'+')
}

/// The candidate's letters (uppercased) and digits, its separators dropped, if it holds exactly
/// `N` of them and nothing else.
fn id_chars<const N: usize>(candidate: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    let mut n = 0;
    for &b in candidate {
        if is_id_separator(b) {
            continue;
        }
        if !b.is_ascii_alphanumeric() {
            return None;
        }
        *out.get_mut(n)? = b.to_ascii_uppercase();
        n += 1;
    }
    (n == N).then_some(out)
}

/// The candidate's digits as values 0–9, its separators dropped, if it is exactly `N` digits.
fn id_digits<const N: usize>(candidate: &[u8]) -> Option<[u8; N]> {
    let mut d = id_chars::<N>(candidate)?;
    for v in &mut d {
        if !v.is_ascii_digit() {
            return None;
        }
        *v -= b'0';
    }
    Some(d)
}

/// Whether every separator in the candidate is the same byte (`123 456 789`, not `123-456 789`):
/// a number typed as one identifier uses one style.
fn one_separator_kind(candidate: &[u8]) -> bool {
    let mut seps = candidate.iter().filter(|b| !b.is_ascii_alphanumeric());
    match seps.next() {
        Some(first) => seps.all(|b| b == first),
        None => true,
    }
}

/// The two-digit number at `d[i..i + 2]` (digit values).
fn two(d: &[u8], i: usize) -> u32 {
    u32::from(d[i]) * 10 + u32::from(d[i + 1])
}

/// The number the digit values `d` spell.
fn number(d: &[u8]) -> u64 {
    d.iter().fold(0, |acc, &v| acc * 10 + u64::from(v))
}

/// The number the ASCII digits `s` spell (callers check they are digits).
fn ascii_number(s: &[u8]) -> u32 {
    s.iter().fold(0, |acc, &b| acc * 10 + u32::from(b.wrapping_sub(b'0')))
}

/// Σ dᵢ·wᵢ over digit values and weights, pairwise.
fn weighted(d: &[u8], weights: &[u32]) -> u32 {
    d.iter().zip(weights).map(|(&v, &w)| u32::from(v) * w).sum()
}

/// Whether all the characters are one character repeated (`000000000`, `111.111.111-11`):
/// such runs satisfy several check-digit schemes and are never issued.
fn all_same(d: &[u8]) -> bool {
    d.windows(2).all(|w| w[0] == w[1])
}

/// Whether `year-month-day` is a date of the Gregorian calendar.
fn is_date(year: u32, month: u32, day: u32) -> bool {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// Whether `month`/`day` is a date in some year (29 February included): for identifiers that
/// write a two-digit year whose century they do not say.
fn plausible_day(month: u32, day: u32) -> bool {
    is_date(2000, month, day)
}

/// The usual mod-11 check digit: `11 − (Σ dᵢ·wᵢ mod 11)`, 11 read as 0. `None` where it would
/// be 10: schemes that use it never issue such a number.
fn mod11_check(d: &[u8], weights: &[u32]) -> Option<u8> {
    match 11 - weighted(d, weights) % 11 {
        11 => Some(0),
        10 => None,
        c => Some(c as u8),
    }
}

/// UK NHS number (NHS Data Dictionary): 10 digits, the tenth a mod-11 check over the first nine
/// weighted 10 down to 2; a number whose check would be 10 is never issued.
pub fn uk_nhs_number(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<10>(candidate) else { return false };
    one_separator_kind(candidate)
        && !all_same(&d)
        && mod11_check(&d[..9], &[10, 9, 8, 7, 6, 5, 4, 3, 2]) == Some(d[9])
}

/// NINO prefixes HMRC never allocates (NIM39110), besides those with D, F, I, Q, U, V, or O
/// second.
const NINO_UNUSED_PREFIXES: [&[u8; 2]; 7] = [b"BG", b"GB", b"KN", b"NK", b"NT", b"TN", b"ZZ"];

/// UK National Insurance number (HMRC NIM39110): two prefix letters (neither D, F, I, Q, U or
/// V, the second not O, not one of [`NINO_UNUSED_PREFIXES`]), six digits, suffix A–D. No check
/// digit: the structure is all there is.
pub fn uk_nino(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<9>(candidate) else { return false };
    let (first, second) = (c[0], c[1]);
    first.is_ascii_uppercase()
        && second.is_ascii_uppercase()
        && !b"DFIQUV".contains(&first)
        && !b"DFIOQUV".contains(&second)
        && !NINO_UNUSED_PREFIXES.iter().any(|p| p[..] == c[..2])
        && c[2..8].iter().all(u8::is_ascii_digit)
        && (b'A'..=b'D').contains(&c[8])
}

/// Canadian social insurance number (ESDC): 9 digits passing Luhn. The first digit is the
/// province of registration (1–7) or 9 for temporary residents; 0 and 8 are not given to people.
pub fn ca_sin(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<9>(candidate) else { return false };
    one_separator_kind(candidate) && matches!(d[0], 1..=7 | 9) && luhn(&d)
}

/// US ITIN (IRS): `9XX-GG-SSSS` whose group GG is in a range the IRS issues (50–65, 70–88,
/// 90–92, 94–99). No check digit.
pub fn us_itin(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<9>(candidate) else { return false };
    d[0] == 9 && matches!(two(&d, 3), 50..=65 | 70..=88 | 90..=92 | 94..=99) && one_separator_kind(candidate)
}

/// US ABA routing transit number: a Federal Reserve routing symbol prefix (01–12 banks, 21–32
/// thrifts, 61–72 electronic, 80 traveller's cheques) and `3·(d1+d4+d7) + 7·(d2+d5+d8) +
/// (d3+d6+d9) ≡ 0 (mod 10)`.
pub fn us_aba_routing(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<9>(candidate) else { return false };
    matches!(two(&d, 0), 1..=12 | 21..=32 | 61..=72 | 80)
        && weighted(&d, &[3, 7, 1, 3, 7, 1, 3, 7, 1]).is_multiple_of(10)
}

/// US National Provider Identifier (CMS): 10 digits starting 1 or 2, whose last digit is the
/// Luhn check of the number prefixed with the health-industry card issuer prefix `80840`.
pub fn us_npi(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<10>(candidate) else { return false };
    let mut prefixed = [8, 0, 8, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    prefixed[5..].copy_from_slice(&d);
    matches!(d[0], 1 | 2) && luhn(&prefixed)
}

/// First letters of DEA registration numbers: the registrant types in use.
const DEA_REGISTRANT_TYPES: &[u8] = b"ABCDEFGHJKLMPRSTUX";

/// US DEA registration number: a registrant-type letter, the registrant's initial (or 9), six
/// digits and a check digit: the last digit of `(d1+d3+d5) + 2·(d2+d4+d6)`.
pub fn us_dea(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<9>(candidate) else { return false };
    let (letters, digits) = c.split_at(2);
    if !DEA_REGISTRANT_TYPES.contains(&letters[0])
        || !(letters[1].is_ascii_uppercase() || letters[1] == b'9')
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return false;
    }
    let v = |i: usize| u32::from(digits[i] - b'0');
    (v(0) + v(2) + v(4) + 2 * (v(1) + v(3) + v(5))) % 10 == v(6)
}

/// Brazilian CPF (Receita Federal): 9 digits and two check digits, each `10·Σ mod 11` (10 read
/// as 0) over the digits before it weighted from its length + 1 down to 2. Runs of one digit
/// pass the check and are invalid.
pub fn br_cpf(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<11>(candidate) else { return false };
    !all_same(&d) && cpf_digit(&d[..9]) == d[9] && cpf_digit(&d[..10]) == d[10]
}

/// One CPF check digit over `d`.
fn cpf_digit(d: &[u8]) -> u8 {
    let top = d.len() as u32 + 1;
    let sum: u32 = d.iter().zip((2..=top).rev()).map(|(&v, w)| u32::from(v) * w).sum();
    (sum * 10 % 11 % 10) as u8
}

/// Brazilian CNPJ (Receita Federal, IN RFB 2.229/2024 for the alphanumeric form): 12
/// characters (digits, and from 2026 also letters, each worth its ASCII code − 48) and two
/// numeric mod-11 check digits, weights 2–9 repeating from the right.
pub fn br_cnpj(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<14>(candidate) else { return false };
    if !c[12..].iter().all(u8::is_ascii_digit) || all_same(&c) {
        return false;
    }
    let v = c.map(|b| b - b'0');
    cnpj_digit(&v[..12]) == v[12] && cnpj_digit(&v[..13]) == v[13]
}

/// One CNPJ check digit over the character values `v`.
fn cnpj_digit(v: &[u8]) -> u8 {
    let sum: u32 = v.iter().rev().zip((2..=9).cycle()).map(|(&x, w)| u32::from(x) * w).sum();
    match sum % 11 {
        0 | 1 => 0,
        r => (11 - r) as u8,
    }
}

/// State codes of a CURP's birthplace (RENAPO), `NE` for born abroad.
const CURP_STATES: [&[u8; 2]; 33] = [
    b"AS", b"BC", b"BS", b"CC", b"CL", b"CM", b"CS", b"CH", b"DF", b"DG", b"GT", b"GR", b"HG", b"JC", b"MC",
    b"MN", b"MS", b"NT", b"NL", b"OC", b"PL", b"QT", b"QR", b"SP", b"SL", b"SR", b"TC", b"TS", b"TL", b"VZ",
    b"YN", b"ZS", b"NE",
];

/// Mexican CURP (RENAPO): 4 letters, birth date `YYMMDD`, sex (H, M, or X), a state code, three
/// inner consonants, a character that tells the century (a digit before 2000, a letter from
/// 2000) and a check digit.
pub fn mx_curp(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<18>(candidate) else { return false };
    let is_consonant = |b: &u8| b.is_ascii_uppercase() && !b"AEIOU".contains(b);
    if !c[..4].iter().all(u8::is_ascii_uppercase)
        || !c[4..10].iter().all(u8::is_ascii_digit)
        || !c[13..16].iter().all(is_consonant)
        || !c[17].is_ascii_digit()
    {
        return false;
    }
    let century = if c[16].is_ascii_digit() { 1900 } else { 2000 };
    let year = century + ascii_number(&c[4..6]);
    is_date(year, ascii_number(&c[6..8]), ascii_number(&c[8..10]))
        && matches!(c[10], b'H' | b'M' | b'X')
        && CURP_STATES.iter().any(|s| s[..] == c[11..13])
        && curp_check(&c[..17]) == u32::from(c[17] - b'0')
}

/// A CURP's check digit: character values (0–9, A–N 10–23, Ñ 24, O–Z 25–36) weighted 18 down
/// to 2, `(10 − Σ mod 10) mod 10`.
fn curp_check(c: &[u8]) -> u32 {
    let value = |b: u8| match b {
        b'0'..=b'9' => u32::from(b - b'0'),
        b'A'..=b'N' => u32::from(b - b'A') + 10,
        _ => u32::from(b - b'A') + 11,
    };
    let sum: u32 = c.iter().zip((2..=18).rev()).map(|(&b, w)| value(b) * w).sum();
    (10 - sum % 10) % 10
}

/// The check letters of Spanish DNI and NIE numbers, by the number mod 23 (Real Decreto
/// 1553/2005 and Ministerio del Interior).
const DNI_LETTERS: &[u8; 23] = b"TRWAGMYFPDXBNJZSQVHLCKE";

/// Spanish DNI (8 digits) or NIE (X, Y or Z standing for 0, 1, 2, then 7 digits), and the
/// check letter of that 8-digit number mod 23.
pub fn es_dni_nie(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<9>(candidate) else { return false };
    let lead = match c[0] {
        b'X' => 0,
        b'Y' => 1,
        b'Z' => 2,
        b'0'..=b'9' => u32::from(c[0] - b'0'),
        _ => return false,
    };
    if !c[1..8].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n = lead * 10_000_000 + ascii_number(&c[1..8]);
    n != 0 && DNI_LETTERS[(n % 23) as usize] == c[8]
}

/// Values of a codice fiscale's characters in odd positions (1st, 3rd, … 15th), by digit or
/// letter index (`0`/`A` first): DM 23 dicembre 1976, allegato.
const CF_ODD_VALUES: [u32; 26] =
    [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23];

/// Letters that replace digits 0–9 in a codice fiscale altered for a homonym (omocodia).
const CF_OMOCODE: &[u8; 10] = b"LMNPQRSTUV";

/// Month letters of a codice fiscale, January first.
const CF_MONTHS: &[u8; 12] = b"ABCDEHLMPRST";

/// The digit a codice fiscale position holds, read through omocodia.
fn cf_digit(b: u8) -> Option<u32> {
    if b.is_ascii_digit() {
        return Some(u32::from(b - b'0'));
    }
    CF_OMOCODE.iter().position(|&x| x == b).map(|p| p as u32)
}

/// Italian codice fiscale: 6 letters (surname, name), year, month letter, day (+40 for women),
/// 4-character place code, check letter; digits may be replaced by omocodia letters.
pub fn it_codice_fiscale(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<16>(candidate) else { return false };
    let letters_ok = [0, 1, 2, 3, 4, 5, 8, 11, 15].iter().all(|&i| c[i].is_ascii_uppercase());
    let mut digits = [0u32; 7];
    for (out, &i) in digits.iter_mut().zip(&[6, 7, 9, 10, 12, 13, 14]) {
        let Some(v) = cf_digit(c[i]) else { return false };
        *out = v;
    }
    let Some(month) = CF_MONTHS.iter().position(|&m| m == c[8]) else { return false };
    let day = digits[2] * 10 + digits[3];
    let day = if day > 40 { day - 40 } else { day };
    letters_ok && plausible_day(month as u32 + 1, day) && cf_check(&c[..15]) == c[15]
}

/// A codice fiscale's check letter: odd positions by [`CF_ODD_VALUES`], even ones by their
/// digit or letter index, the sum mod 26 as a letter.
fn cf_check(c: &[u8]) -> u8 {
    let index = |b: u8| if b.is_ascii_digit() { usize::from(b - b'0') } else { usize::from(b - b'A') };
    let sum: u32 = c
        .iter()
        .enumerate()
        .map(|(i, &b)| if i % 2 == 0 { CF_ODD_VALUES[index(b)] } else { index(b) as u32 })
        .sum();
    b'A' + (sum % 26) as u8
}

/// French NIR (INSEE registration number): sex (1, 2; 3, 4, 7, 8 for provisional numbers), year,
/// month (01–12, or 20 and above where it is unknown), department (Corsica's 2A and 2B count as
/// 19 and 18), commune, order number, and the key `97 − (first 13 digits mod 97)`.
pub fn fr_nir(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<15>(candidate) else { return false };
    let mut d = [0u8; 15];
    for (i, (out, &b)) in d.iter_mut().zip(&c).enumerate() {
        *out = match (i, b) {
            (_, b'0'..=b'9') => b - b'0',
            (6, b'A') if c[5] == b'2' => 9,
            (6, b'B') if c[5] == b'2' => 8,
            _ => return false,
        };
    }
    if c[6].is_ascii_uppercase() {
        d[5] = 1; // 2A → 19, 2B → 18
    }
    let key = u64::from(two(&d, 13));
    matches!(d[0], 1..=4 | 7 | 8)
        && matches!(two(&d, 3), 1..=12 | 20..=99)
        && key == 97 - number(&d[..13]) % 97
}

/// German tax identification number (Steuer-IdNr, BZSt): 11 digits, the first not 0; among the
/// first ten exactly one digit occurs twice or three times (never three in a row) and the rest
/// at most once; the eleventh is the ISO 7064 MOD 11,10 check digit.
pub fn de_tax_id(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<11>(candidate) else { return false };
    d[0] != 0 && de_tax_id_repeats(&d[..10]) && iso7064_mod11_10(&d[..10]) == d[10]
}

/// The Steuer-IdNr's rule for repeated digits, over its first ten digits.
fn de_tax_id_repeats(d: &[u8]) -> bool {
    let mut counts = [0u8; 10];
    for &v in d {
        counts[usize::from(v)] += 1;
    }
    let repeated = counts.iter().filter(|&&n| n >= 2).count();
    let most = counts.iter().copied().max().unwrap_or(0);
    repeated == 1 && most <= 3 && !d.windows(3).any(|w| w[0] == w[1] && w[1] == w[2])
}

/// ISO 7064 MOD 11,10 (hybrid system) check digit over digit values.
fn iso7064_mod11_10(d: &[u8]) -> u8 {
    let mut product = 10u32;
    for &v in d {
        let sum = match (u32::from(v) + product) % 10 {
            0 => 10,
            s => s,
        };
        product = sum * 2 % 11;
    }
    ((11 - product) % 10) as u8
}

/// Dutch BSN (burgerservicenummer): 9 digits passing the eleven test, `9·d1 + 8·d2 + … + 2·d8 −
/// d9 ≡ 0 (mod 11)`.
pub fn nl_bsn(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<9>(candidate) else { return false };
    !all_same(&d) && weighted(&d[..8], &[9, 8, 7, 6, 5, 4, 3, 2]) % 11 == u32::from(d[8])
}

/// Belgian national register number (rijksregisternummer): birth date `YYMMDD` (month 0 when
/// unknown, +20 or +40 in a BIS number), a 3-digit serial, and `97 − (first 9 digits mod 97)`,
/// with `2` put in front of the nine for people born from 2000.
pub fn be_national_number(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<11>(candidate) else { return false };
    let base = number(&d[..9]);
    let check = u64::from(two(&d, 9));
    matches!(two(&d, 2), 0..=12 | 20..=32 | 40..=52)
        && two(&d, 4) <= 31
        && (check == 97 - base % 97 || check == 97 - (2_000_000_000 + base) % 97)
}

/// Polish PESEL: birth date whose month carries the century (+80 for the 1800s, +20 for the
/// 2000s, +40, +60 after), a serial, and `(10 − Σ dᵢ·(1,3,7,9,…) mod 10) mod 10`.
pub fn pl_pesel(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<11>(candidate) else { return false };
    let (century, month) = match two(&d, 2) {
        m @ 81..=92 => (1800, m - 80),
        m @ 1..=12 => (1900, m),
        m @ 21..=32 => (2000, m - 20),
        m @ 41..=52 => (2100, m - 40),
        m @ 61..=72 => (2200, m - 60),
        _ => return false,
    };
    let check = (10 - weighted(&d[..10], &[1, 3, 7, 9, 1, 3, 7, 9, 1, 3]) % 10) % 10;
    is_date(century + two(&d, 0), month, two(&d, 4)) && check == u32::from(d[10])
}

/// Swedish personnummer (Skatteverket): `YYMMDD-NNNC` (`+` from the year someone turns 100) or
/// with the century in front; a samordningsnummer adds 60 to the day. `C` is the Luhn digit of
/// the ten-digit form.
pub fn se_personnummer(candidate: &[u8]) -> bool {
    let mut ten = [0u8; 10];
    if let Some(d) = id_digits::<12>(candidate) {
        if !matches!(two(&d, 0), 18..=20) {
            return false;
        }
        ten.copy_from_slice(&d[2..]);
    } else if let Some(d) = id_digits::<10>(candidate) {
        ten = d;
    } else {
        return false;
    }
    let day = two(&ten, 4);
    let day = if day > 60 { day - 60 } else { day };
    plausible_day(two(&ten, 2), day) && luhn(&ten)
}

/// The check characters of a Finnish henkilötunnus, by the nine-digit number mod 31.
const HETU_CHECK: &[u8; 31] = b"0123456789ABCDEFHJKLMNPRSTUVWXY";

/// Finnish henkilötunnus (DVV): `DDMMYY`, a century sign (`+` 1800s; `-` or Y, X, W, V, U 1900s;
/// A–F 2000s), an individual number 002–999 and a check character: `DDMMYYNNN mod 31` in
/// [`HETU_CHECK`].
pub fn fi_hetu(candidate: &[u8]) -> bool {
    if candidate.len() != 11 {
        return false;
    }
    let c: [u8; 11] = core::array::from_fn(|i| candidate[i].to_ascii_uppercase());
    let century = match c[6] {
        b'+' => 1800,
        b'-' | b'U'..=b'Y' => 1900,
        b'A'..=b'F' => 2000,
        _ => return false,
    };
    let digits_ok = c[..6].iter().chain(&c[7..10]).all(u8::is_ascii_digit);
    if !digits_ok {
        return false;
    }
    let date = ascii_number(&c[..6]);
    let individual = ascii_number(&c[7..10]);
    let n = u64::from(date) * 1000 + u64::from(individual);
    is_date(century + date % 100, date / 100 % 100, date / 10_000)
        && individual >= 2
        && HETU_CHECK[(n % 31) as usize] == c[10]
}

/// Norwegian fødselsnummer (Skatteetaten): `DDMMYY` (a D-number adds 40 to the day), an
/// individual number, and two mod-11 check digits with weights 3 7 6 1 8 9 4 5 2 and
/// 5 4 3 2 7 6 5 4 3 2.
pub fn no_fodselsnummer(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<11>(candidate) else { return false };
    let day = two(&d, 0);
    let day = if day > 40 { day - 40 } else { day };
    plausible_day(two(&d, 2), day)
        && mod11_check(&d[..9], &[3, 7, 6, 1, 8, 9, 4, 5, 2]) == Some(d[9])
        && mod11_check(&d[..10], &[5, 4, 3, 2, 7, 6, 5, 4, 3, 2]) == Some(d[10])
}

/// Danish CPR number (CPR-kontoret): `DDMMYY-SSSS` whose date is valid in the century the
/// serial's first digit gives (0–3: 1900s; 4, 9: 2000s up to '36; 5–8: 2000s up to '57, else
/// 1800s). The modulus-11 check was dropped in 2007, so the date is all there is to check.
pub fn dk_cpr(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<10>(candidate) else { return false };
    let year = two(&d, 4);
    let century = match d[6] {
        0..=3 => 1900,
        4 | 9 if year <= 36 => 2000,
        4 | 9 => 1900,
        _ if year <= 57 => 2000,
        _ => 1800,
    };
    is_date(century + year, two(&d, 2), two(&d, 0))
}

/// Verhoeff's dihedral-group multiplication table.
const VERHOEFF_D: [[u8; 10]; 10] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
];

/// Verhoeff's position permutations.
const VERHOEFF_P: [[u8; 10]; 8] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
];

/// Verhoeff check over digit values, the check digit last.
fn verhoeff(d: &[u8]) -> bool {
    let mut c = 0u8;
    for (i, &v) in d.iter().rev().enumerate() {
        c = VERHOEFF_D[usize::from(c)][usize::from(VERHOEFF_P[i % 8][usize::from(v)])];
    }
    c == 0
}

/// Indian Aadhaar number (UIDAI): 12 digits, the first not 0 or 1, the last a Verhoeff check
/// digit.
pub fn in_aadhaar(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<12>(candidate) else { return false };
    d[0] >= 2 && one_separator_kind(candidate) && !all_same(&d) && verhoeff(&d)
}

/// Holder types a PAN's fourth character names: person, company, HUF, firm, association of
/// persons, trust, body of individuals, local authority, artificial juridical person,
/// government.
const PAN_HOLDER_TYPES: &[u8] = b"PCHFATBLJG";

/// Indian PAN (Income Tax Department): 5 letters (the fourth a holder type), 4 digits (not
/// 0000), a letter. The last letter is a check character whose algorithm is not published, so
/// this is structure only.
pub fn in_pan(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<10>(candidate) else { return false };
    c[..5].iter().all(u8::is_ascii_uppercase)
        && PAN_HOLDER_TYPES.contains(&c[3])
        && c[5..9].iter().all(u8::is_ascii_digit)
        && c[5..9] != *b"0000"
        && c[9].is_ascii_uppercase()
}

/// Australian tax file number: 9 digits (or an older 8) whose weighted sum (1 4 3 7 5 8 6 9 10,
/// or 10 7 8 4 6 3 5 1) is a multiple of 11.
pub fn au_tfn(candidate: &[u8]) -> bool {
    let nine = id_digits::<9>(candidate)
        .is_some_and(|d| !all_same(&d) && weighted(&d, &[1, 4, 3, 7, 5, 8, 6, 9, 10]).is_multiple_of(11));
    let eight = id_digits::<8>(candidate)
        .is_some_and(|d| !all_same(&d) && weighted(&d, &[10, 7, 8, 4, 6, 3, 5, 1]).is_multiple_of(11));
    (nine || eight) && one_separator_kind(candidate)
}

/// Australian Medicare card number: 8 digits starting 2–6, a check digit (`Σ dᵢ·(1,3,7,9,…)
/// mod 10`), an issue number 1–9, and optionally the person's reference number 1–9.
pub fn au_medicare(candidate: &[u8]) -> bool {
    let card_ok = |d: &[u8]| {
        matches!(d[0], 2..=6)
            && weighted(&d[..8], &[1, 3, 7, 9, 1, 3, 7, 9]) % 10 == u32::from(d[8])
            && d[9] != 0
    };
    id_digits::<10>(candidate).is_some_and(|d| card_ok(&d))
        || id_digits::<11>(candidate).is_some_and(|d| card_ok(&d) && d[10] != 0)
}

/// Australian Business Number (ABR): subtract 1 from the first digit, weight the eleven digits
/// 10 1 3 5 7 9 11 13 15 17 19, and the sum is a non-zero multiple of 89.
pub fn au_abn(candidate: &[u8]) -> bool {
    let Some(mut d) = id_digits::<11>(candidate) else { return false };
    if d[0] == 0 {
        return false;
    }
    d[0] -= 1;
    let sum = weighted(&d, &[10, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]);
    sum != 0 && sum.is_multiple_of(89)
}

/// Singapore NRIC (S, T) or FIN (F, G): 7 digits weighted 2 7 6 5 4 3 2, plus 4 for the T and G
/// series, mod 11, names the check letter. (The M series of FINs, issued since 2022, uses a check
/// the authorities have not published; it is not accepted.)
pub fn sg_nric(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<9>(candidate) else { return false };
    let (offset, letters): (u32, &[u8; 11]) = match c[0] {
        b'S' => (0, b"JZIHGFEDCBA"),
        b'T' => (4, b"JZIHGFEDCBA"),
        b'F' => (0, b"XWUTRQPNMLK"),
        b'G' => (4, b"XWUTRQPNMLK"),
        _ => return false,
    };
    if !c[1..8].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = c[1..8].iter().zip([2, 7, 6, 5, 4, 3, 2]).map(|(&b, w)| u32::from(b - b'0') * w).sum();
    letters[((sum + offset) % 11) as usize] == c[8]
}

/// South African identity number (Department of Home Affairs): birth date `YYMMDD`, a 4-digit
/// sequence, citizenship (0 citizen, 1 permanent resident, 2 refugee), one more digit, and a
/// Luhn check digit.
pub fn za_id(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<13>(candidate) else { return false };
    plausible_day(two(&d, 2), two(&d, 4)) && d[10] <= 2 && luhn(&d)
}

/// Chinese resident identity number (GB 11643-1999): a 6-digit region code (not starting 0),
/// birth date `YYYYMMDD`, a 3-digit sequence, and the ISO 7064 MOD 11-2 check character (0–9
/// or X).
pub fn cn_resident_id(candidate: &[u8]) -> bool {
    let Some(c) = id_chars::<18>(candidate) else { return false };
    if c[0] == b'0' || !c[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let year = ascii_number(&c[6..10]);
    let born =
        (1900..=2099).contains(&year) && is_date(year, ascii_number(&c[10..12]), ascii_number(&c[12..14]));
    // ISO 7064 MOD 11-2: weight 2^(17−i) mod 11; the check makes Σ ≡ 1 (mod 11).
    let weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = c[..17].iter().zip(weights).map(|(&b, w)| u32::from(b - b'0') * w).sum();
    born && b"10X98765432"[(sum % 11) as usize] == c[17]
}

/// Japanese individual number (My Number; 総務省令第八十五号 第五条): 12 digits, the last
/// `11 − (Σ Pn·Qn mod 11)` (0 when the remainder is 0 or 1), where Pn is the n-th of the other
/// eleven digits counted from the right and Qn is n + 1 for n ≤ 6, n − 5 above.
pub fn jp_my_number(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<12>(candidate) else { return false };
    let sum: u32 = d[..11]
        .iter()
        .rev()
        .zip(1u32..)
        .map(|(&p, n)| u32::from(p) * if n <= 6 { n + 1 } else { n - 5 })
        .sum();
    let check = match sum % 11 {
        0 | 1 => 0,
        r => 11 - r,
    };
    one_separator_kind(candidate) && !all_same(&d) && check == u32::from(d[11])
}

/// Korean resident registration number: birth date `YYMMDD` valid in the century the seventh
/// digit gives (1, 2, 5, 6: 1900s; 3, 4, 7, 8: 2000s; 9, 0: 1800s). Numbers issued since
/// October 2020 carry no check digit, so none is checked.
pub fn kr_rrn(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<13>(candidate) else { return false };
    let century = match d[6] {
        1 | 2 | 5 | 6 => 1900,
        3 | 4 | 7 | 8 => 2000,
        _ => 1800,
    };
    is_date(century + two(&d, 0), two(&d, 2), two(&d, 4))
}

/// Swiss social security number (AHV/AVS, since 2008): the EAN-13 country prefix 756, nine
/// digits, and the EAN-13 check digit (weights 1 and 3 alternating from the left).
pub fn ch_ahv(candidate: &[u8]) -> bool {
    let Some(d) = id_digits::<13>(candidate) else { return false };
    let sum = weighted(&d[..12], &[1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3]);
    d[..3] == [7, 5, 6] && one_separator_kind(candidate) && (10 - sum % 10) % 10 == u32::from(d[12])
}

/// Weights of a VIN's 17 positions (49 CFR 565.15); the ninth is the check digit itself.
const VIN_WEIGHTS: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];

/// A VIN character's value (49 CFR 565.15 transliteration); I, O and Q are never used.
fn vin_value(b: u8) -> Option<u32> {
    let v = match b {
        b'0'..=b'9' => b - b'0',
        b'A'..=b'H' => b - b'A' + 1,
        b'J'..=b'N' => b - b'J' + 1,
        b'P' => 7,
        b'R' => 9,
        b'S'..=b'Z' => b - b'S' + 2,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Vehicle identification number (ISO 3779; 49 CFR 565): 17 characters, digits and letters
/// other than I, O and Q, whose ninth is the check digit (`Σ value·weight mod 11`, 10 written
/// X). North American VINs always carry it; elsewhere it is optional, so only those are found.
pub fn vin(candidate: &[u8]) -> bool {
    if candidate.len() != 17 || !candidate.iter().any(u8::is_ascii_uppercase) {
        return false;
    }
    let mut sum = 0;
    for (&b, w) in candidate.iter().zip(VIN_WEIGHTS) {
        let Some(v) = vin_value(b) else { return false };
        sum += v * w;
    }
    let check = match sum % 11 {
        10 => b'X',
        r => b'0' + r as u8,
    };
    candidate[8] == check
}

/// The base58 alphabet of Bitcoin addresses (no 0, O, I, l).
const BASE58: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Bitcoin address: a legacy one (`1…` P2PKH, `3…` P2SH) in base58check, or a segwit one
/// (`bc1…`) in bech32 or bech32m; either way its checksum must hold.
pub fn bitcoin_address(candidate: &[u8]) -> bool {
    match candidate.get(..3) {
        Some(hrp) if hrp.eq_ignore_ascii_case(b"bc1") => bech32_address(candidate),
        _ => base58check_address(candidate),
    }
}

/// P2PKH or P2SH address: base58 of 25 bytes (version 0 or 5, a 20-byte hash, and the first
/// four bytes of the double SHA-256 of those 21), its leading `1`s exactly its leading zero
/// bytes.
fn base58check_address(candidate: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let mut bytes = [0u8; 25];
    for &c in candidate {
        let Some(digit) = BASE58.iter().position(|&x| x == c) else { return false };
        let mut carry = digit as u32;
        for b in bytes.iter_mut().rev() {
            carry += u32::from(*b) * 58;
            *b = carry as u8;
            carry >>= 8;
        }
        if carry != 0 {
            return false; // more than 25 bytes
        }
    }
    let ones = candidate.iter().take_while(|&&c| c == b'1').count();
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    let version_ok = matches!((bytes[0], candidate.first()), (0, Some(b'1')) | (5, Some(b'3')));
    let hash = Sha256::digest(Sha256::digest(&bytes[..21]));
    version_ok && ones == zeros && hash[..4] == bytes[21..]
}

/// The bech32 data alphabet (BIP 173).
const BECH32: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";

/// The bech32 checksum's BCH code step (BIP 173).
fn bech32_polymod(chk: u32, value: u8) -> u32 {
    const GEN: [u32; 5] = [0x3b6a_57b2, 0x2650_8e6d, 0x1ea1_19fa, 0x3d42_33dd, 0x2a14_62b3];
    let top = chk >> 25;
    let mut chk = ((chk & 0x01ff_ffff) << 5) ^ u32::from(value);
    for (i, g) in GEN.iter().enumerate() {
        if (top >> i) & 1 == 1 {
            chk ^= g;
        }
    }
    chk
}

/// Segwit address `bc1…` (BIP 173, BIP 350): one case throughout, a witness version 0–16, a
/// program of a length that version allows (v0: 20 or 32 bytes; others 2–40) with zero padding,
/// and the checksum constant of its version (bech32 for v0, bech32m from v1).
fn bech32_address(candidate: &[u8]) -> bool {
    let lower = !candidate.iter().any(u8::is_ascii_uppercase);
    let upper = !candidate.iter().any(u8::is_ascii_lowercase);
    if !(lower || upper) || !(14..=90).contains(&candidate.len()) {
        return false;
    }
    // The human-readable part `bc`, expanded: high bits, 0, low bits.
    let mut chk = [3, 3, 0, 2, 3].into_iter().fold(1, bech32_polymod);
    let mut values = [0u8; 87];
    let data = &candidate[3..];
    for (v, &c) in values.iter_mut().zip(data) {
        let Some(p) = BECH32.iter().position(|&x| x == c.to_ascii_lowercase()) else { return false };
        *v = p as u8;
        chk = bech32_polymod(chk, *v);
    }
    let version = values[0];
    let groups = data.len() - 1 - 6; // 5-bit groups of the program
    let (bytes, pad) = (groups * 5 / 8, groups * 5 % 8);
    let padding_zero = pad < 5 && values[data.len() - 7] & ((1 << pad) - 1) == 0;
    let (constant, length_ok) = match version {
        0 => (1, bytes == 20 || bytes == 32),
        1..=16 => (0x2bc8_30a3, (2..=40).contains(&bytes)),
        _ => return false,
    };
    chk == constant && length_ok && padding_zero
}

/// IPv4 ranges that identify no one on the internet: this network, private, shared (CGNAT),
/// loopback, link-local, IETF protocol assignments, the three documentation networks, 6to4
/// relay, benchmarking, multicast and reserved (IANA IPv4 Special-Purpose Address Registry).
const IPV4_NOT_PUBLIC: [([u8; 4], u32); 15] = [
    ([0, 0, 0, 0], 8),
    ([10, 0, 0, 0], 8),
    ([100, 64, 0, 0], 10),
    ([127, 0, 0, 0], 8),
    ([169, 254, 0, 0], 16),
    ([172, 16, 0, 0], 12),
    ([192, 0, 0, 0], 24),
    ([192, 0, 2, 0], 24),
    ([192, 88, 99, 0], 24),
    ([192, 168, 0, 0], 16),
    ([198, 18, 0, 0], 15),
    ([198, 51, 100, 0], 24),
    ([203, 0, 113, 0], 24),
    ([224, 0, 0, 0], 4),
    ([240, 0, 0, 0], 4),
];

/// Dotted-quad IPv4 address: four decimal octets 0–255 without leading zeros.
fn ipv4(candidate: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = candidate.split(|&b| b == b'.');
    for o in &mut out {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || (part.len() > 1 && part[0] == b'0') {
            return None;
        }
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *o = u8::try_from(ascii_number(part)).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A public IPv4 address (a host on the internet, personal data where it is a user's): not in
/// [`IPV4_NOT_PUBLIC`], not four numbers of a longer dotted run (`1.2.3.4.5`, a version), and
/// not the network of a CIDR block (`81.2.69.0/24`).
pub fn ipv4_public(candidate: &[u8], before: &[u8], after: &[u8]) -> bool {
    let Some(ip) = ipv4(candidate) else { return false };
    let addr = u32::from_be_bytes(ip);
    let special =
        IPV4_NOT_PUBLIC.iter().any(|&(net, len)| addr >> (32 - len) == u32::from_be_bytes(net) >> (32 - len));
    let dotted_on = after.first() == Some(&b'.') && after.get(1).is_some_and(u8::is_ascii_digit);
    let dotted_before =
        before.last() == Some(&b'.') && before.len() >= 2 && before[before.len() - 2].is_ascii_digit();
    let cidr = after.first() == Some(&b'/') && after.get(1).is_some_and(u8::is_ascii_digit);
    !special && !dotted_on && !dotted_before && !cidr
}

/// MAC address (IEEE 802): six octets as `xx:xx:…`, `xx-xx-…` or `xxxx.xxxx.xxxx`, in one
/// separator style; not the all-zero address, not a group address (broadcast, multicast: the
/// first octet's low bit set), not the documentation block 00-00-5E-00-53-xx (RFC 7042), not a
/// virtual machine's or container's ([`VIRTUAL_MAC_PREFIXES`]), and not a placeholder that
/// counts up ([`counts_up`]).
pub fn mac_address(candidate: &[u8]) -> bool {
    let mut octets = [0u8; 6];
    let mut nibbles = 0;
    for &b in candidate {
        let v = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            b':' | b'-' | b'.' => continue,
            _ => return false,
        };
        let Some(o) = octets.get_mut(nibbles / 2) else { return false };
        *o = (*o << 4) | v;
        nibbles += 1;
    }
    nibbles == 12
        && one_separator_kind(candidate)
        && octets != [0; 6]
        && octets[0] & 1 == 0
        && octets[..5] != [0x00, 0x00, 0x5e, 0x00, 0x53]
        && !VIRTUAL_MAC_PREFIXES.iter().any(|p| octets.starts_with(p))
        && !counts_up(&octets)
}

/// Address prefixes of virtual network interfaces, which belong to machines, not people: QEMU/KVM
/// (52:54:00), VMware (00:50:56, 00:0C:29, 00:05:69), VirtualBox (08:00:27), Hyper-V (00:15:5D),
/// Xen (00:16:3E), and Docker's default bridge (02:42).
const VIRTUAL_MAC_PREFIXES: [&[u8]; 8] = [
    &[0x52, 0x54, 0x00],
    &[0x00, 0x50, 0x56],
    &[0x00, 0x0c, 0x29],
    &[0x00, 0x05, 0x69],
    &[0x08, 0x00, 0x27],
    &[0x00, 0x15, 0x5d],
    &[0x00, 0x16, 0x3e],
    &[0x02, 0x42],
];

/// Whether a MAC address is a made-up one that counts: octet by octet (`00:01:02:03:04:05`) or
/// hex digit by hex digit (`01:23:45:67:89:ab`, `12:34:56:78:9a:bc`).
fn counts_up(octets: &[u8; 6]) -> bool {
    let by_octet = octets.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
    let nibbles: [u8; 12] = core::array::from_fn(|i| (octets[i / 2] >> (4 * (1 - i % 2))) & 0xf);
    let by_nibble = nibbles.windows(2).all(|w| w[1] == (w[0] + 1) & 0xf);
    by_octet || by_nibble
}

/// A date as people write one: `YYYY-MM-DD`, or `DD-MM-YYYY` / `MM-DD-YYYY` (either reading
/// valid), with `-`, `/` or `.` used throughout, in the years 1900–2099.
pub fn date_of_birth(candidate: &[u8]) -> bool {
    if !one_separator_kind(candidate) {
        return false;
    }
    let mut fields = candidate.split(|b| matches!(b, b'-' | b'/' | b'.'));
    let (Some(a), Some(b), Some(c), None) = (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    if ![a, b, c].iter().all(|f| !f.is_empty() && f.len() <= 4 && f.iter().all(u8::is_ascii_digit)) {
        return false;
    }
    let (a_n, b_n, c_n) = (ascii_number(a), ascii_number(b), ascii_number(c));
    let year_ok = |y: u32| (1900..=2099).contains(&y);
    match (a.len(), c.len()) {
        (4, 1..=2) => year_ok(a_n) && is_date(a_n, b_n, c_n),
        (1..=2, 4) => year_ok(c_n) && (is_date(c_n, b_n, a_n) || is_date(c_n, a_n, b_n)),
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

    // The identifiers below are made up; their check digits were computed from each
    // specification, and each invalid case differs from a valid one in its check digit or in
    // the one rule it breaks.

    #[test]
    fn uk_nhs_number_mod11() {
        assert!(uk_nhs_number(b"720 929 3515"));
        assert!(uk_nhs_number(b"7209293515"));
        assert!(!uk_nhs_number(b"720 929 3516"));
        assert!(!uk_nhs_number(b"720-929 3515")); // mixed separators
        assert!(!uk_nhs_number(b"000 000 0000"));
    }

    #[test]
    fn uk_nino_prefix_rules() {
        assert!(uk_nino(b"JT 48 23 71 B"));
        assert!(uk_nino(b"JT482371B"));
        assert!(!uk_nino(b"GB 48 23 71 B")); // never allocated
        assert!(!uk_nino(b"TN482371B"));
        assert!(!uk_nino(b"JO482371B")); // O never second
        assert!(!uk_nino(b"DT482371B")); // D never used
        assert!(!uk_nino(b"JT482371E")); // suffix A–D only
    }

    #[test]
    fn ca_sin_luhn_and_first_digit() {
        assert!(ca_sin(b"121 838 858"));
        assert!(ca_sin(b"121-838-858"));
        assert!(!ca_sin(b"121 838 859"));
        assert!(!ca_sin(b"023640568")); // Luhn-valid, but 0 is not given to people
        assert!(!ca_sin(b"821838851")); // 8 neither
    }

    #[test]
    fn us_itin_groups() {
        assert!(us_itin(b"931-84-2076"));
        assert!(us_itin(b"931 50 2076"));
        assert!(!us_itin(b"931-93-2076")); // group 93 is not issued
        assert!(!us_itin(b"931-49-2076"));
        assert!(!us_itin(b"831-84-2076")); // not 9xx
        assert!(!us_itin(b"931-84 2076"));
    }

    #[test]
    fn us_aba_routing_371() {
        assert!(us_aba_routing(b"012285583"));
        assert!(!us_aba_routing(b"012285584"));
        assert!(!us_aba_routing(b"505847195")); // checksum holds, prefix 50 is no routing symbol
        assert!(!us_aba_routing(b"000000000"));
    }

    #[test]
    fn us_npi_luhn_80840() {
        assert!(us_npi(b"1059291678"));
        assert!(!us_npi(b"1059291679"));
        assert!(!us_npi(b"3224154997")); // check holds, but NPIs start with 1 or 2
    }

    #[test]
    fn us_dea_check_digit() {
        assert!(us_dea(b"BK6883145"));
        assert!(us_dea(b"B96883145")); // 9 for a business name
        assert!(!us_dea(b"BK6883146"));
        assert!(!us_dea(b"QK6883145")); // Q is no registrant type
    }

    #[test]
    fn br_cpf_and_cnpj_check_digits() {
        assert!(br_cpf(b"260.316.241-17"));
        assert!(br_cpf(b"26031624117"));
        assert!(!br_cpf(b"260.316.241-18"));
        assert!(!br_cpf(b"111.111.111-11")); // passes the check, never issued
        assert!(br_cnpj(b"61.327.666/0001-43"));
        assert!(br_cnpj(b"61327666000143"));
        assert!(br_cnpj(b"K7.QW2.M9R/0001-00")); // the alphanumeric CNPJ of 2026
        assert!(!br_cnpj(b"61.327.666/0001-44"));
        assert!(!br_cnpj(b"00.000.000/0000-00"));
        assert!(!br_cnpj(b"61.327.666/0001-4A"));
    }

    #[test]
    fn mx_curp_structure_and_check_digit() {
        assert!(mx_curp(b"REGL870314MJCMRS05"));
        assert!(mx_curp(b"ZUOA050921HNLXRLA4")); // born 2005: a letter before the check digit
        assert!(!mx_curp(b"REGL870314MJCMRS06"));
        assert!(!mx_curp(b"REGL870314MXXMRS08")); // check holds, XX is no state
        assert!(!mx_curp(b"REGL870231MJCMRS05")); // 31 February
    }

    #[test]
    fn es_dni_and_nie_letters() {
        assert!(es_dni_nie(b"63462570G"));
        assert!(es_dni_nie(b"63462570-G"));
        assert!(es_dni_nie(b"Y8605067E"));
        assert!(es_dni_nie(b"X-4397362-S"));
        assert!(!es_dni_nie(b"63462570M"));
        assert!(!es_dni_nie(b"Y8605067T"));
        assert!(!es_dni_nie(b"00000000T")); // zero is no number
    }

    #[test]
    fn it_codice_fiscale_check_letter_and_omocodia() {
        assert!(it_codice_fiscale(b"BNCMRA79H62F205L"));
        assert!(it_codice_fiscale(b"RSSGNN85T10L2P9N")); // digits of the place code as letters
        assert!(!it_codice_fiscale(b"BNCMRA79H62F205M"));
        assert!(!it_codice_fiscale(b"BNCMRA79F62F205H")); // check holds, F is no month
        assert!(!it_codice_fiscale(b"BNCMRA79H92F205L")); // day 92
    }

    #[test]
    fn fr_nir_key() {
        assert!(fr_nir(b"291046938714229"));
        assert!(fr_nir(b"2 91 04 69 387 142 29"));
        assert!(fr_nir(b"176082A00408796")); // Corsica: 2A counts as 19
        assert!(!fr_nir(b"291046938714230"));
        assert!(!fr_nir(b"591046938714273")); // key holds, 5 is no sex code
        assert!(!fr_nir(b"176083A00408796"));
    }

    #[test]
    fn de_tax_id_digits_and_check() {
        assert!(de_tax_id(b"36497150687"));
        assert!(de_tax_id(b"47179235782")); // one digit three times, apart
        assert!(!de_tax_id(b"36497150688"));
        assert!(!de_tax_id(b"47771235684")); // three in a row
        assert!(!de_tax_id(b"47711235680")); // two digits repeated
        assert!(!de_tax_id(b"06497150687"));
    }

    #[test]
    fn nl_bsn_eleven_test() {
        assert!(nl_bsn(b"293481337"));
        assert!(nl_bsn(b"2934.81.337"));
        assert!(!nl_bsn(b"293481338"));
        assert!(!nl_bsn(b"000000000"));
    }

    #[test]
    fn be_national_number_mod97() {
        assert!(be_national_number(b"86110214727"));
        assert!(be_national_number(b"86.11.02-147.27"));
        assert!(be_national_number(b"03051928449")); // born 2003: 2 in front for the check
        assert!(be_national_number(b"86410214743")); // BIS number: month + 40
        assert!(!be_national_number(b"86110214728"));
    }

    #[test]
    fn pl_pesel_date_and_check() {
        assert!(pl_pesel(b"92081733324"));
        assert!(pl_pesel(b"04222985792")); // 29 February 2004: month + 20
        assert!(!pl_pesel(b"92081733325"));
        assert!(!pl_pesel(b"92131712349")); // month 13
    }

    #[test]
    fn se_personnummer_luhn() {
        assert!(se_personnummer(b"830925-1026"));
        assert!(se_personnummer(b"200112074323")); // with the century
        assert!(se_personnummer(b"190214+2205")); // 100 or older
        assert!(se_personnummer(b"7108839973")); // samordningsnummer: day + 60
        assert!(!se_personnummer(b"830925-1027"));
        assert!(!se_personnummer(b"170112074323")); // no 1700s
    }

    #[test]
    fn fi_hetu_check_character() {
        assert!(fi_hetu(b"150478-576L"));
        assert!(fi_hetu(b"031012A1542"));
        assert!(fi_hetu(b"220591Y318Y")); // a 2023 century sign
        assert!(!fi_hetu(b"150478-576M"));
        assert!(!fi_hetu(b"150478G576L")); // G is no century sign
        assert!(!fi_hetu(b"310278-576L")); // 31 February
    }

    #[test]
    fn no_fodselsnummer_two_check_digits() {
        assert!(no_fodselsnummer(b"21079070790"));
        assert!(no_fodselsnummer(b"53068521285")); // D-number: day + 40
        assert!(!no_fodselsnummer(b"21079070791"));
        assert!(!no_fodselsnummer(b"21079070780"));
    }

    #[test]
    fn dk_cpr_date_by_century() {
        assert!(dk_cpr(b"051268-2850"));
        assert!(dk_cpr(b"2902004321")); // 29 February 2000 (digit 4, year 00)
        assert!(dk_cpr(b"2902601234")); // digit 1: 1960, a leap year
        assert!(!dk_cpr(b"2902611234")); // 1961 was not
        assert!(!dk_cpr(b"310268-2262")); // 31 February
    }

    #[test]
    fn in_aadhaar_verhoeff() {
        assert!(in_aadhaar(b"8507 4418 8003"));
        assert!(in_aadhaar(b"850744188003"));
        assert!(!in_aadhaar(b"8507 4418 8004"));
        assert!(!in_aadhaar(b"103322453836")); // Verhoeff holds, starts with 1
    }

    #[test]
    fn in_pan_structure() {
        assert!(in_pan(b"AKRPT4821M"));
        assert!(!in_pan(b"AKRXT4821M")); // X is no holder type
        assert!(!in_pan(b"AKRPT0000M"));
    }

    #[test]
    fn au_tfn_abn_medicare() {
        assert!(au_tfn(b"101 243 555"));
        assert!(au_tfn(b"93036426")); // an older 8-digit TFN
        assert!(!au_tfn(b"101 243 556"));
        assert!(au_abn(b"77 153 848 859"));
        assert!(!au_abn(b"77 153 848 850"));
        assert!(au_medicare(b"4875 88147 3"));
        assert!(au_medicare(b"39504172921")); // with the person's reference number
        assert!(!au_medicare(b"4875 88148 3"));
        assert!(!au_medicare(b"4875 88147 0")); // issue number 0
    }

    #[test]
    fn sg_nric_check_letter() {
        assert!(sg_nric(b"S0852611G"));
        assert!(sg_nric(b"T6748481E"));
        assert!(sg_nric(b"G6267818L"));
        assert!(!sg_nric(b"S0852611H"));
        assert!(!sg_nric(b"A0852611G"));
    }

    #[test]
    fn za_id_date_citizenship_luhn() {
        assert!(za_id(b"9105086275086"));
        assert!(!za_id(b"9105086275087"));
        assert!(!za_id(b"9105086275581")); // Luhn holds, citizenship 5
    }

    #[test]
    fn cn_resident_id_mod11_2() {
        assert!(cn_resident_id(b"330106198811239178"));
        assert!(cn_resident_id(b"440305200107094649"));
        assert!(!cn_resident_id(b"330106198811239170"));
        assert!(!cn_resident_id(b"330106198802304177")); // check holds, 30 February
    }

    #[test]
    fn jp_my_number_check_digit() {
        assert!(jp_my_number(b"0797 3300 9689"));
        assert!(jp_my_number(b"079733009689"));
        assert!(!jp_my_number(b"0797 3300 9680"));
    }

    #[test]
    fn kr_rrn_birth_date() {
        assert!(kr_rrn(b"841016-1159147"));
        assert!(!kr_rrn(b"841316-1107119")); // month 13
        assert!(!kr_rrn(b"850229-2107119")); // 1985 was no leap year
    }

    #[test]
    fn ch_ahv_ean13() {
        assert!(ch_ahv(b"756.2457.9159.15"));
        assert!(ch_ahv(b"7562457915915"));
        assert!(!ch_ahv(b"756.2457.9159.16"));
        assert!(!ch_ahv(b"7572457915914")); // check holds, 757 is not Switzerland
    }

    #[test]
    fn vin_check_digit() {
        assert!(vin(b"12X9FP6K1GK905952"));
        assert!(!vin(b"12X9FP6K0GK905952"));
        assert!(!vin(b"12X9FP6K1GK90595I")); // I is never used
        assert!(!vin(b"00000000000000000")); // a number, not a VIN
    }

    #[test]
    fn bitcoin_address_checksums() {
        assert!(bitcoin_address(b"1L5ro5HW79SEC91T21qyqcwhtkx7xE8YnT"));
        assert!(bitcoin_address(b"3ECMNrMSFnfR9UBwyyDxLhbVoLUfq5U6Lg"));
        assert!(bitcoin_address(b"112D2adLM3UKy4Z4giRbReR6gjWuvHUqB")); // a zero byte after the version
        assert!(!bitcoin_address(b"1L5ro5HW79SEC91T21qyqcwhtkx7xE8YnU"));
        assert!(!bitcoin_address(b"3L5ro5HW79SEC91T21qyqcwhtkx7xE8YnT"));
        assert!(bitcoin_address(b"bc1q8lsq28hufnvylpp972n46vpzjeaus6h39qfyv6"));
        assert!(bitcoin_address(b"BC1Q8LSQ28HUFNVYLPP972N46VPZJEAUS6H39QFYV6"));
        assert!(bitcoin_address(b"bc1p67a8rpkd9w74ve9ycme4g6d294jrkc6wpz3wlmwd2v70lkxfasmqf6xwyv"));
        assert!(!bitcoin_address(b"bc1q8lsq28hufnvylpp972n46vpzjeaus6h39qfyv7"));
        assert!(!bitcoin_address(b"bc1Q8lsq28hufnvylpp972n46vpzjeaus6h39qfyv6")); // mixed case
                                                                                  // A v1 program under the v0 checksum constant, the other way round, and a v0 program
                                                                                  // of 25 bytes, each with its checksum right.
        assert!(!bitcoin_address(b"bc1paklcs3jlqwk762dtznp9de7c2pt8jx3cgvsvgdy4dpedwtygd09s7rm4fv"));
        assert!(!bitcoin_address(b"bc1q37hpvesz6gwvr768p3uajwgp8ejk02gychng65"));
        assert!(!bitcoin_address(b"bc1q9fzqs2l7vhtj8jmz9a99s9gm3fxgjyf7eeu4y94m4c6azn"));
    }

    #[test]
    fn ipv4_public_only() {
        let ip = |c: &[u8], before: &[u8], after: &[u8]| ipv4_public(c, before, after);
        assert!(ip(b"81.149.37.202", b"client_ip: ", b"\n"));
        for private in [&b"10.1.2.3"[..], b"192.168.0.10", b"172.20.1.1", b"127.0.0.1", b"100.64.3.4"] {
            assert!(!ip(private, b"", b""), "{private:?}");
        }
        for doc in [&b"192.0.2.15"[..], b"198.51.100.7", b"203.0.113.99", b"224.0.0.251", b"255.255.255.0"] {
            assert!(!ip(doc, b"", b""), "{doc:?}");
        }
        assert!(!ip(b"81.149.37.202", b"", b".4")); // a longer dotted number
        assert!(!ip(b"81.149.37.202", b"version 3.", b""));
        assert!(!ip(b"81.149.37.0", b"", b"/24")); // a network
        assert!(!ip(b"81.149.37.256", b"", b""));
        assert!(!ip(b"81.149.037.202", b"", b"")); // leading zero
    }

    #[test]
    fn mac_address_unicast_only() {
        assert!(mac_address(b"3c:a9:f4:52:7e:18"));
        assert!(mac_address(b"3C-A9-F4-52-7E-18"));
        assert!(mac_address(b"3ca9.f452.7e18"));
        assert!(!mac_address(b"3c:a9:f4-52:7e:18"));
        assert!(!mac_address(b"ff:ff:ff:ff:ff:ff"));
        assert!(!mac_address(b"01:00:5e:12:34:56")); // multicast
        assert!(!mac_address(b"00:00:00:00:00:00"));
        assert!(!mac_address(b"00:00:5e:00:53:2a")); // documentation block
        assert!(!mac_address(b"52:54:00:9d:0e:67")); // a QEMU/KVM guest's
        assert!(!mac_address(b"02:42:ac:11:00:02")); // a Docker container's
        assert!(!mac_address(b"00:01:02:03:04:05")); // placeholders that count
        assert!(!mac_address(b"12:34:56:78:9A:BC"));
        assert!(mac_address(b"00:01:02:03:04:07"));
    }

    #[test]
    fn date_of_birth_calendar() {
        assert!(date_of_birth(b"1984-07-19"));
        assert!(date_of_birth(b"19/07/1984"));
        assert!(date_of_birth(b"07/19/1984")); // month first
        assert!(date_of_birth(b"29.02.2000"));
        assert!(!date_of_birth(b"1984-02-30"));
        assert!(!date_of_birth(b"29.02.1900")); // 1900 was no leap year
        assert!(!date_of_birth(b"1984-07/19"));
        assert!(!date_of_birth(b"1884-07-19"));
        assert!(!date_of_birth(b"84-07-19"));
    }

    #[test]
    fn identifier_validators_are_dispatched() {
        assert!(check(Validator::UkNhsNumber, b"720 929 3515", b"NHS: ", b""));
        assert!(check(Validator::Ipv4Public, b"81.149.37.202", b"ip: ", b"\n"));
        assert!(!check(Validator::Ipv4Public, b"81.149.37.202", b"ip: ", b".7\n"));
        assert!(check(Validator::BitcoinAddress, b"3ECMNrMSFnfR9UBwyyDxLhbVoLUfq5U6Lg", b"", b""));
    }

    #[test]
    fn entropy_values() {
        assert_eq!(shannon_entropy(b"aaaa"), 0.0);
        assert!((shannon_entropy(b"ab") - 1.0).abs() < 1e-4);
        assert!((shannon_entropy(b"0123456789abcdef") - 4.0).abs() < 1e-4);
    }
}
