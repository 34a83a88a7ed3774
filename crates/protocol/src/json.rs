//! JSON values as the protocol sees them: numbers are IEEE 754 doubles, and
//! hashing uses the JSON Canonicalization Scheme (RFC 8785, "JCS").
//!
//! JCS is small once its hard part, ECMAScript number formatting, is done by
//! `ryu-js`: keys sorted by UTF-16 code units, strings escaped the way
//! `serde_json` already escapes them, no white space. The canonicalisers on
//! crates.io re-parse every key or mishandle `serde_json`'s
//! `arbitrary_precision` numbers, which we need to tell `9007199254740993`
//! from `9007199254740992`; so the serialiser lives here, tested against the
//! RFC's own examples.

use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

/// A value that JCS cannot represent without loss (caller's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// A number outside the range of an IEEE 754 double, such as `1e400`.
    #[error("number {0} is out of the range of a 64-bit floating point number")]
    OutOfRange(String),
    /// An integer that no double holds exactly, such as `9007199254740993`.
    #[error(
        "integer {0} cannot be represented exactly as a 64-bit floating point number (beyond ±2^53); send it as a string"
    )]
    InexactInteger(String),
}

/// Checks one number literal and returns the double it stands for.
pub fn check_number(n: &Number) -> Result<f64, JsonError> {
    let text = n.as_str();
    let value: f64 = text.parse().map_err(|_| JsonError::OutOfRange(text.to_owned()))?;
    if !value.is_finite() {
        return Err(JsonError::OutOfRange(text.to_owned()));
    }
    let is_integer_literal = !text.contains(['.', 'e', 'E']);
    if is_integer_literal && value.abs() >= 9_007_199_254_740_992.0 {
        let digits = text.trim_start_matches('-');
        if exact_decimal(value.abs()) != digits {
            return Err(JsonError::InexactInteger(text.to_owned()));
        }
    }
    Ok(value)
}

/// The exact decimal expansion of a non-negative, integer-valued double.
fn exact_decimal(v: f64) -> String {
    if v < 3.4e38 {
        return (v as u128).to_string();
    }
    // v = mantissa * 2^exp with exp > 0: double a decimal digit vector.
    let bits = v.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1075;
    let mantissa = (bits & ((1 << 52) - 1)) | (1 << 52);
    let mut digits: Vec<u8> = mantissa.to_string().bytes().rev().map(|b| b - b'0').collect();
    for _ in 0..exp {
        let mut carry = 0;
        for d in digits.iter_mut() {
            let x = *d * 2 + carry;
            *d = x % 10;
            carry = x / 10;
        }
        if carry > 0 {
            digits.push(carry);
        }
    }
    digits.iter().rev().map(|d| char::from(b'0' + d)).collect()
}

/// How deeply `v` nests: the number of arrays and objects it is inside of,
/// counting itself. A scalar has depth 0, `{}` and `[1]` depth 1,
/// `{"a": [1]}` depth 2. The depth of a whole document is the number of
/// levels a parser must descend.
///
/// Every answer wraps a change's `data` in a few more levels (at most
/// [`ENVELOPE_DEPTH`]), and JSON parsers refuse documents past their own
/// limit ([`CLIENT_PARSE_DEPTH`] levels for `serde_json`), so the server
/// bounds the depth of what it accepts.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => 0,
    }
}

/// The default bound on the depth of a change's `data` (`max_depth`).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// The most levels any answer adds around a change's `data`, with room to
/// grow: the deepest answers today, push and sync results with
/// `{"results": [{"conflict": {"current": {"data": …}}}]}`, put it inside
/// five (`crates/cli/tests/poison_pills.rs` measures every answer kind).
/// A client must parse answers nested `max_depth + ENVELOPE_DEPTH` levels deep.
pub const ENVELOPE_DEPTH: usize = 8;

/// The most levels a client is expected to parse: what `serde_json` parses
/// at its default recursion limit. That limit is 128, but the parser refuses
/// the level that reaches it, so documents 127 levels deep are the deepest it
/// reads. The server refuses a `max_depth` whose answers could go deeper
/// (`max_depth + ENVELOPE_DEPTH > CLIENT_PARSE_DEPTH`).
pub const CLIENT_PARSE_DEPTH: usize = 127;

// The default must itself be a `max_depth` the server accepts.
const _: () = assert!(DEFAULT_MAX_DEPTH + ENVELOPE_DEPTH <= CLIENT_PARSE_DEPTH);

/// Checks every number inside `v` (see [`check_number`]).
pub fn check_value(v: &Value) -> Result<(), JsonError> {
    match v {
        Value::Number(n) => check_number(n).map(|_| ()),
        Value::Array(items) => items.iter().try_for_each(check_value),
        Value::Object(map) => map.values().try_for_each(check_value),
        Value::Null | Value::Bool(_) | Value::String(_) => Ok(()),
    }
}

/// The JCS form of `v`. Numbers must have passed [`check_value`]; a number
/// that did not is written as its nearest double, or `null` if out of range.
pub fn to_jcs(v: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_jcs(&mut out, v);
    String::from_utf8(out).expect("JCS output is UTF-8")
}

/// Appends the JCS form of `v` to `out`.
pub fn write_jcs(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => match n.as_f64().filter(|f| f.is_finite()) {
            Some(f) => write_f64(out, f),
            None => out.extend_from_slice(b"null"),
        },
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_jcs(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

/// Appends a double in ECMAScript `Number.prototype.toString` form.
pub fn write_f64(out: &mut Vec<u8>, f: f64) {
    let mut buf = ryu_js::Buffer::new();
    out.extend_from_slice(buf.format_finite(f).as_bytes());
}

/// Appends a JSON string with JCS escaping (which is `serde_json`'s escaping).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Appends the JCS form of an object.
pub fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    out.push(b'{');
    // serde_json's map is ordered by code point, which equals UTF-16 order
    // unless a key holds characters from U+E000 up; only then re-sort.
    let needs_resort = map.keys().any(|k| k.chars().any(|c| c >= '\u{e000}'));
    if needs_resort {
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_by(|a, b| utf16_cmp(a.0, b.0));
        write_entries(out, entries.into_iter());
    } else {
        write_entries(out, map.iter());
    }
    out.push(b'}');
}

fn write_entries<'a>(out: &mut Vec<u8>, entries: impl Iterator<Item = (&'a String, &'a Value)>) {
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_jcs(out, v);
    }
}

/// Compares two strings by their UTF-16 code units, as JCS sorts keys.
pub fn utf16_cmp(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(s: &str) -> Number {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn rfc8785_number_examples() {
        // RFC 8785 appendix B, as far as JSON text can express them.
        let cases = [
            ("0", "0"),
            ("-0", "0"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("9007199254740992", "9007199254740992"),
            ("295147905179352825856", "295147905179352830000"),
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("0.000001", "0.000001"),
            ("1e-7", "1e-7"),
            ("4.50", "4.5"),
            ("2e-3", "0.002"),
            ("0.1", "0.1"),
            ("333333333.33333329", "333333333.3333333"),
        ];
        for (input, expected) in cases {
            let v = Value::Number(num(input));
            check_value(&v).unwrap();
            assert_eq!(to_jcs(&v), expected, "input {input}");
        }
    }

    #[test]
    fn rfc8785_structure_example() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        let v: Value = serde_json::from_str(input).unwrap();
        assert_eq!(to_jcs(&v), expected);
    }

    #[test]
    fn rfc8785_sorting_example() {
        let input = r#"{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}"#;
        let v: Value = serde_json::from_str(input).unwrap();
        let expected = "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
        assert_eq!(to_jcs(&v), expected);
    }

    /// `levels` arrays, one inside the other, around `1`.
    fn nested_text(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn serde_json_parses_exactly_client_parse_depth_levels() {
        let deepest = nested_text(CLIENT_PARSE_DEPTH);
        let v: Value = serde_json::from_str(&deepest).expect("serde_json parses CLIENT_PARSE_DEPTH levels");
        assert_eq!(depth(&v), CLIENT_PARSE_DEPTH);
        let err = serde_json::from_str::<Value>(&nested_text(CLIENT_PARSE_DEPTH + 1)).unwrap_err();
        assert!(err.to_string().contains("recursion limit exceeded"), "{err}");
        // Typed answers count the same levels as `Value`: objects of structs, arrays of `Vec`s.
        #[derive(serde::Deserialize)]
        struct Outer {
            #[allow(dead_code)]
            a: Vec<Value>,
        }
        let typed = |levels: usize| format!("{{\"a\":{}}}", nested_text(levels - 1));
        assert!(serde_json::from_str::<Outer>(&typed(CLIENT_PARSE_DEPTH)).is_ok());
        assert!(serde_json::from_str::<Outer>(&typed(CLIENT_PARSE_DEPTH + 1)).is_err());
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(depth(&serde_json::json!(1)), 0);
        assert_eq!(depth(&serde_json::json!({})), 1);
        assert_eq!(depth(&serde_json::json!([1, [2, {"a": []}], 3])), 4);
    }

    #[test]
    fn inexact_integers_and_out_of_range_are_refused() {
        assert!(matches!(check_number(&num("9007199254740993")), Err(JsonError::InexactInteger(_))));
        assert!(matches!(check_number(&num("-9007199254740993")), Err(JsonError::InexactInteger(_))));
        assert!(matches!(check_number(&num("18446744073709551617")), Err(JsonError::InexactInteger(_))));
        assert!(matches!(check_number(&num("1e400")), Err(JsonError::OutOfRange(_))));
        assert!(check_number(&num("9007199254740994")).is_ok());
        assert!(check_number(&num("18446744073709551616")).is_ok());
        assert!(check_number(&num("1e21")).is_ok());
        assert!(check_number(&num("0.1")).is_ok());
        // 2^200, written out in full, is exactly a double.
        let two_200 = "1606938044258990275541962092341162602522202993782792835301376";
        assert!(check_number(&num(two_200)).is_ok());
        let two_200_plus_one = "1606938044258990275541962092341162602522202993782792835301377";
        assert!(check_number(&num(two_200_plus_one)).is_err());
    }
}
