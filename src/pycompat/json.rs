//! JSON and string formatting exactly as CPython prints them.
//!
//! The image config's digest is the image ID, so to give the same ID as nixpkgs for the same
//! inputs we serialize as `json.dumps(value, indent=4)` does (ASCII-only, Python's float repr,
//! keys in insertion order), and write history comments with Python's `repr` of a list.

use serde_json::Value;

/// `json.dumps(value, indent=4)`.
pub fn dumps_indent4(value: &Value) -> String {
    let mut out = String::with_capacity(1024);
    write_value(value, 0, &mut out);
    out
}

fn newline_indent(level: usize, out: &mut String) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(value: &Value, level: usize, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&float_repr(n.as_f64().unwrap_or(0.0)));
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(level + 1, out);
                write_value(item, level + 1, out);
            }
            newline_indent(level, out);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(level + 1, out);
                write_string(k, out);
                out.push_str(": ");
                write_value(v, level + 1, out);
            }
            newline_indent(level, out);
            out.push('}');
        }
    }
}

/// A JSON string with `ensure_ascii=True`.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-tripping digits, in positional notation for
/// decimal exponents from -4 to 15 and scientific notation (at least two exponent digits)
/// otherwise.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            let (int_part, frac) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (format!("{digits:0<int_len$}"), "0".to_string())
            };
            format!("{sign}{int_part}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// Python's `repr(str)`.
pub fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if !is_printable(c) => {
                let n = c as u32;
                if n <= 0xff {
                    out.push_str(&format!("\\x{n:02x}"));
                } else if n <= 0xffff {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// An approximation of `str.isprintable` for non-ASCII characters: control, format and
/// separator characters are not printable. Store path names are ASCII, so this only matters for
/// unusual base image layer names.
fn is_printable(c: char) -> bool {
    let n = c as u32;
    !(c.is_control()
        || matches!(n, 0xa0 | 0xad | 0x1680 | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x3000 | 0xfeff)
        || (0xe000..=0xf8ff).contains(&n)
        || (0xfff0..=0xfffb).contains(&n))
}

/// Python's `repr(list_of_str)`, as in the history comment `store paths: [...]`.
pub fn list_repr<S: AsRef<str>>(items: &[S]) -> String {
    let parts: Vec<String> = items.iter().map(|s| str_repr(s.as_ref())).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dumps_matches_python_layout() {
        let v: Value = serde_json::from_str(
            r#"{"b": 1, "a": [], "c": {}, "d": [1, "x\u00e9\n"], "e": {"z": null, "y": true}}"#,
        )
        .unwrap();
        assert_eq!(
            dumps_indent4(&v),
            "{\n    \"b\": 1,\n    \"a\": [],\n    \"c\": {},\n    \"d\": [\n        1,\n        \"x\\u00e9\\n\"\n    ],\n    \"e\": {\n        \"z\": null,\n        \"y\": true\n    }\n}"
        );
    }

    #[test]
    fn strings_escape_like_ensure_ascii() {
        let v = json!("\u{1f600}\u{7f}\u{1}/\"\\");
        assert_eq!(dumps_indent4(&v), "\"\\ud83d\\ude00\\u007f\\u0001/\\\"\\\\\"");
    }

    #[test]
    fn floats_like_python() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-0.0, "-0.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e300, "1.5e+300"),
            (2.5e-7, "2.5e-07"),
        ] {
            assert_eq!(float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn repr_like_python() {
        assert_eq!(list_repr(&["/nix/store/a", "b"]), "['/nix/store/a', 'b']");
        assert_eq!(list_repr::<&str>(&[]), "[]");
        assert_eq!(str_repr("it's"), "\"it's\"");
        assert_eq!(str_repr("a'\"b"), "'a\\'\"b'");
        assert_eq!(str_repr("tab\there\u{1}é"), "'tab\\there\\x01é'");
    }
}
