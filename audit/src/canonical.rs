//! RFC 8785 JSON Canonicalization Scheme (JCS): the one encoding every hashed byte goes through.
//!
//! Objects have their members sorted by the UTF-16 code units of their names, strings use the
//! minimal escapes of ECMAScript's `JSON.stringify`, numbers are written the way ECMAScript's
//! `Number.prototype.toString` writes an IEEE 754 double, and there is no whitespace.

use serde_json::{Map, Number, Value};

/// Appends the canonical form of `value` to `out`.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

/// The canonical form of `value` as bytes.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, value);
    out
}

fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    let mut members: Vec<(&String, &Value)> = map.iter().collect();
    members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
    out.push(b'{');
    for (i, (name, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, name);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// Writes a JSON string with exactly the escapes RFC 8785 section 3.2.2.2 prescribes.
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    // JCS numbers are IEEE 754 doubles; integers beyond 2^53 lose precision exactly as they would
    // in any JavaScript consumer, which is what the RFC asks for.
    let v = if let Some(i) = n.as_i64() {
        i as f64
    } else if let Some(u) = n.as_u64() {
        u as f64
    } else {
        n.as_f64().unwrap_or(0.0)
    };
    out.extend_from_slice(format_double(v).as_bytes());
}

/// ECMAScript `Number::toString(x)` for a finite double (ECMA-262, 7.1.12.1).
pub fn format_double(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        // serde_json cannot hold NaN or infinities, so only zero (and -0) lands here.
        return "0".to_owned();
    }
    let sign = if v < 0.0 { "-" } else { "" };
    // Rust's `{:e}` prints the shortest digit string that round-trips, like ECMAScript does.
    let sci = format!("{:e}", v.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    let k = digits.len() as i32;
    let n = exp + 1;
    let body = if k <= n && n <= 21 {
        let mut s = digits.clone();
        s.extend(std::iter::repeat_n('0', (n - k) as usize));
        s
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{}", "0".repeat((-n) as usize), digits)
    } else {
        let e_sign = if n - 1 < 0 { '-' } else { '+' };
        let e = (n - 1).abs();
        if k == 1 {
            format!("{digits}e{e_sign}{e}")
        } else {
            format!("{}.{}e{e_sign}{e}", &digits[..1], &digits[1..])
        }
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_members_by_utf16_code_units() {
        // RFC 8785 section 3.2.3's example: U+20AC sorts before U+1F600 in UTF-16.
        let v = json!({"\u{20ac}": 1, "\u{1f600}": 2, "\r": 3, "1": 4, "\u{0080}": 5, "\u{00f6}": 6});
        let s = String::from_utf8(to_vec(&v)).unwrap();
        assert_eq!(s, "{\"\\r\":3,\"1\":4,\"\u{0080}\":5,\"\u{00f6}\":6,\"\u{20ac}\":1,\"\u{1f600}\":2}");
    }

    #[test]
    fn formats_numbers_like_ecmascript() {
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.5, "-1.5"),
            (4.5, "4.5"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (1e-7, "1e-7"),
            (0.000001, "0.000001"),
            (333333333.3333333, "333333333.3333333"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (9007199254740992.0, "9007199254740992"),
            (123456789012.5, "123456789012.5"),
            (2.5e-5, "0.000025"),
        ];
        for (v, want) in cases {
            assert_eq!(format_double(v), want, "formatting {v:e}");
        }
    }

    #[test]
    fn escapes_only_what_the_rfc_requires() {
        let v = json!("a\"b\\c\u{1}\n\u{7f}é/");
        assert_eq!(String::from_utf8(to_vec(&v)).unwrap(), "\"a\\\"b\\\\c\\u0001\\n\u{7f}é/\"");
    }

    #[test]
    fn writes_nested_values_without_whitespace() {
        let v = json!({"b": [true, null, {"z": 1, "a": "x"}], "a": 10});
        assert_eq!(String::from_utf8(to_vec(&v)).unwrap(), r#"{"a":10,"b":[true,null,{"a":"x","z":1}]}"#);
    }
}
