//! Checksums providers embed in their tokens. A candidate whose checksum does not hold cannot
//! be a token the provider issued (a made-up example, a test fixture, a mangled copy), so the
//! rule that names the checksum drops it.

use alloc::string::String;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, Engine as _, GeneralPurpose, GeneralPurposeConfig};

/// CRC-32 as zlib, PNG and Ethernet compute it (IEEE 802.3 polynomial, reflected, initial and
/// final XOR `0xFFFF_FFFF`). Bitwise: it runs on a few dozen bytes per candidate.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let low = crc & 1;
            crc >>= 1;
            if low != 0 {
                crc ^= 0xEDB8_8320;
            }
        }
    }
    !crc
}

/// The value of a base-62 numeral in the digits, upper-case, lower-case alphabet (`0`–`9`,
/// `A`–`Z`, `a`–`z`, most significant digit first); `None` for any other byte or a value past
/// `u64`.
fn base62_value(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'A'..=b'Z' => d - b'A' + 10,
            b'a'..=b'z' => d - b'a' + 36,
            _ => return None,
        };
        n.checked_mul(62)?.checked_add(u64::from(v))
    })
}

/// The base-62 digits, in value order.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The six base-62 digits a GitHub-style token ends with for the random part `random`: its
/// CRC-32, zero-padded (for generators of well-formed test tokens).
pub fn base62_crc32_digits(random: &[u8]) -> [u8; 6] {
    let mut n = crc32(random);
    let mut digits = [b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits
}

/// The random part's length in a GitHub-style token, and its checksum's.
const RANDOM_LEN: usize = 30;
const CHECK_LEN: usize = 6;

/// A GitHub-style token (GitHub's `ghp_`, `gho_`, `ghu_`, `ghs_`; npm's `npm_`): its last 36
/// characters are 30 random base-62 characters and the CRC-32 of those 30 bytes as 6 base-62
/// digits (zero-padded). The prefix is not part of the checksum.
pub fn base62_crc32_tail(token: &[u8]) -> bool {
    let Some(tail) = token.len().checked_sub(RANDOM_LEN + CHECK_LEN).map(|at| &token[at..]) else {
        return false;
    };
    let (random, check) = tail.split_at(RANDOM_LEN);
    random.iter().all(u8::is_ascii_alphanumeric) && base62_value(check) == Some(u64::from(crc32(random)))
}

/// Whether `token` is a JSON Web Token as an issuer writes one: three dot-separated base64url
/// parts, the first two decoding to JSON objects and the header naming its signing `alg`. A
/// string that only looks like one (a truncated copy, a made-up example, base64 of something
/// else) is not.
pub fn jwt_structure(token: &[u8]) -> bool {
    let mut parts = token.split(|&b| b == b'.');
    let (Some(header), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let object = |part: &[u8]| {
        BASE64URL
            .decode(part)
            .ok()
            .and_then(|json| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&json).ok())
    };
    object(header).is_some_and(|h| h.get("alg").is_some_and(serde_json::Value::is_string))
        && object(payload).is_some()
}

/// Whether `token` is a PyPI API token as PyPI issues them: `pypi-` and the base64url of a
/// macaroon in the version 2 binary format (libmacaroons'): the version byte 2; a section with
/// an optional location and an identifier; caveat sections, each with an identifier (and
/// optionally a location and a verification id); an empty section; and a 32-byte signature,
/// ending the token. A cut-short copy or made-up characters after the well-known prefix do not
/// decode to that.
pub fn pypi_macaroon(token: &[u8]) -> bool {
    token
        .strip_prefix(b"pypi-")
        .and_then(|encoded| BASE64URL.decode(encoded).ok())
        .is_some_and(|bytes| macaroon_v2(&bytes))
}

/// Field types of a version 2 macaroon (0 ends a section).
const FIELD_LOCATION: u64 = 1;
const FIELD_IDENTIFIER: u64 = 2;
const FIELD_VID: u64 = 4;
const FIELD_SIGNATURE: u64 = 6;
/// The length of a macaroon's signature (HMAC-SHA-256).
const SIGNATURE_LEN: usize = 32;

/// A field of a version 2 macaroon: its type and data; `None` for a section's end.
type Field<'a> = Option<(u64, &'a [u8])>;

/// Reads the fields of a version 2 macaroon.
struct MacaroonReader<'a>(&'a [u8]);

impl<'a> MacaroonReader<'a> {
    /// An unsigned LEB128 varint of at most 9 bytes.
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(9) {
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some(value);
            }
        }
        None
    }

    /// The next field, `Some(None)` at a section's end, `None` if the bytes end or lie.
    fn field(&mut self) -> Option<Field<'a>> {
        let kind = self.varint()?;
        if kind == 0 {
            return Some(None);
        }
        let len = usize::try_from(self.varint()?).ok()?;
        let data = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(Some((kind, data)))
    }

    /// A section of fields in increasing type order, of the types in `allowed`, through its end;
    /// true if it held an identifier, false if it was empty, `None` if it is malformed.
    fn section(&mut self, allowed: &[u64]) -> Option<bool> {
        let (mut last, mut identified, mut empty) = (0, false, true);
        while let Some((kind, data)) = self.field()? {
            if kind <= last || !allowed.contains(&kind) {
                return None;
            }
            identified |= kind == FIELD_IDENTIFIER && !data.is_empty();
            (last, empty) = (kind, false);
        }
        match (empty, identified) {
            (true, _) => Some(false),
            (false, true) => Some(true),
            (false, false) => None,
        }
    }
}

/// Whether `bytes` are one whole version 2 macaroon (see [`pypi_macaroon`]).
fn macaroon_v2(bytes: &[u8]) -> bool {
    let Some((&2, rest)) = bytes.split_first() else { return false };
    let mut reader = MacaroonReader(rest);
    if reader.section(&[FIELD_LOCATION, FIELD_IDENTIFIER]) != Some(true) {
        return false;
    }
    loop {
        match reader.section(&[FIELD_LOCATION, FIELD_IDENTIFIER, FIELD_VID]) {
            Some(true) => continue,
            Some(false) => break,
            None => return false,
        }
    }
    matches!(reader.field(), Some(Some((FIELD_SIGNATURE, signature))) if signature.len() == SIGNATURE_LEN)
        && reader.0.is_empty()
}

/// base64url as JWTs write it (unpadded; padding tolerated).
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[cfg(test)]
mod tests {
    use super::*;

    /// base64url of `s`, unpadded.
    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn a_jwt_is_three_parts_with_json_objects_and_an_alg() {
        let jwt = |h: &str, p: &str| alloc::format!("{}.{}.c2lnbmF0dXJlLWJ5dGVz", b64(h), b64(p));
        assert!(jwt_structure(
            jwt(r#"{"alg":"HS256","typ":"JWT"}"#, r#"{"sub":"u-1","exp":1767225600}"#).as_bytes()
        ));
        assert!(jwt_structure(jwt(r#"{"typ":"JWT","alg":"ES384"}"#, "{}").as_bytes()));
        // No alg, alg not a string, payload not an object, header not JSON, mangled base64.
        assert!(!jwt_structure(jwt(r#"{"typ":"JWT"}"#, "{}").as_bytes()));
        assert!(!jwt_structure(jwt(r#"{"alg":256}"#, "{}").as_bytes()));
        assert!(!jwt_structure(jwt(r#"{"alg":"HS256"}"#, "[1,2]").as_bytes()));
        assert!(!jwt_structure(jwt(r#"{"alg":"HS256""#, "{}").as_bytes()));
        let good = jwt(r#"{"alg":"HS256"}"#, r#"{"sub":"someone"}"#);
        let (head, rest) = good.split_once('.').unwrap();
        assert!(
            !jwt_structure(alloc::format!("{}.{rest}", &head[..head.len() - 3]).as_bytes()),
            "cut header"
        );
        assert!(!jwt_structure(alloc::format!("{head}+.{rest}").as_bytes()), "not base64url");
        // Two or four parts.
        assert!(!jwt_structure(b64(r#"{"alg":"HS256"}"#).as_bytes()));
        assert!(!jwt_structure(alloc::format!("{good}.more").as_bytes()));
    }

    #[test]
    fn crc32_is_zlibs() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn base62_reads_digits_upper_then_lower() {
        assert_eq!(base62_value(b"000000"), Some(0));
        assert_eq!(base62_value(b"3jZRME"), Some(0xCBF4_3926));
        assert_eq!(base62_value(b"4gfFC3"), Some(0xFFFF_FFFF));
        assert_eq!(base62_value(b"12_4"), None);
        assert_eq!(base62_value(b"zzzzzzzzzzzzzzz"), None, "past u64");
    }

    #[test]
    fn the_digits_made_for_a_random_part_are_the_ones_checked() {
        assert_eq!(&base62_crc32_digits(b"123456789"), b"3jZRME");
        let random = b"Vb2Nm4Qw6Er8Ty0Ui3Op5As7Df9Gh1";
        let mut token = b"ghp_".to_vec();
        token.extend_from_slice(random);
        token.extend_from_slice(&base62_crc32_digits(random));
        assert!(base62_crc32_tail(&token));
    }

    #[test]
    fn a_token_is_accepted_only_with_its_own_checksum() {
        // Made up here: 30 random characters and their CRC-32 in base 62.
        assert!(base62_crc32_tail(b"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"));
        assert!(base62_crc32_tail(b"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"));
        // One random character changed, or one checksum digit.
        assert!(!base62_crc32_tail(b"ghp_P8SttNBBTi3Ru3MNILoRgtbTJ2VQq43KFX0l"));
        assert!(!base62_crc32_tail(b"ghp_Q8SttNBBTi3Ru3MNILoRgtbTJ2VQq43KFX0k"));
        assert!(!base62_crc32_tail(b"ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"));
        assert!(!base62_crc32_tail(b"short"));
    }

    /// A version 2 macaroon: the header's `(type, data)` fields, each caveat's, the signature.
    fn macaroon(header: &[(u8, &[u8])], caveats: &[&[(u8, &[u8])]], signature: &[u8]) -> alloc::vec::Vec<u8> {
        let mut out = alloc::vec![2u8];
        let mut section = |fields: &[(u8, &[u8])]| {
            for (kind, data) in fields {
                out.push(*kind);
                let mut len = data.len();
                while len >= 0x80 {
                    out.push((len as u8 & 0x7F) | 0x80);
                    len >>= 7;
                }
                out.push(len as u8);
                out.extend_from_slice(data);
            }
            out.push(0);
        };
        section(header);
        for caveat in caveats {
            section(caveat);
        }
        // The empty section that ends the caveats.
        section(&[]);
        out.extend([6, signature.len() as u8]);
        out.extend_from_slice(signature);
        out
    }

    fn pypi(bytes: &[u8]) -> String {
        alloc::format!("pypi-{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    #[test]
    fn a_pypi_token_is_a_whole_version_2_macaroon() {
        let identifier = [b'n'; 200];
        let header: &[(u8, &[u8])] = &[(1, b"pypi.org"), (2, &identifier)];
        let caveat: &[(u8, &[u8])] = &[(2, br#"{"version": 1, "permissions": "user"}"#)];
        let good = macaroon(header, &[caveat, caveat], &[7; 32]);
        assert!(pypi_macaroon(pypi(&good).as_bytes()));
        assert!(
            pypi_macaroon(pypi(&macaroon(&header[1..], &[], &[7; 32])).as_bytes()),
            "no location, no caveat"
        );
        let with_vid: &[(u8, &[u8])] = &[(1, b"elsewhere"), (2, b"third party"), (4, b"vid")];
        assert!(pypi_macaroon(pypi(&macaroon(header, &[with_vid], &[7; 32])).as_bytes()));
        // Cut short anywhere, or one byte more: not a token PyPI wrote.
        let token = pypi(&good);
        for cut in [token.len() - 1, token.len() - 3, token.len() / 2, 20] {
            assert!(!pypi_macaroon(&token.as_bytes()[..cut]), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(!pypi_macaroon(pypi(&longer).as_bytes()));
        // Each part the format asks for.
        let mut v1 = good.clone();
        v1[0] = 1;
        assert!(!pypi_macaroon(pypi(&v1).as_bytes()), "version 1");
        assert!(!pypi_macaroon(pypi(&macaroon(&header[..1], &[], &[7; 32])).as_bytes()), "no identifier");
        let no_id: &[(u8, &[u8])] = &[(1, b"somewhere")];
        assert!(!pypi_macaroon(pypi(&macaroon(header, &[no_id], &[7; 32])).as_bytes()), "caveat without id");
        let reversed: &[(u8, &[u8])] = &[(2, &identifier), (1, b"pypi.org")];
        assert!(!pypi_macaroon(pypi(&macaroon(reversed, &[], &[7; 32])).as_bytes()), "fields out of order");
        let unknown: &[(u8, &[u8])] = &[(2, b"id"), (5, b"?")];
        assert!(!pypi_macaroon(pypi(&macaroon(unknown, &[], &[7; 32])).as_bytes()), "unknown field");
        assert!(!pypi_macaroon(pypi(&macaroon(header, &[], &[7; 31])).as_bytes()), "short signature");
        assert!(!pypi_macaroon(b"pypi-AgEIcHlwaS5vcmcIodtQW8JyyV554BdZTnMpnab3MMzQko496Vw8bGlwbJ38uncSD6A"));
        assert!(!pypi_macaroon(good.as_slice()), "no prefix");
    }
}
