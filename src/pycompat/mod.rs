//! What nixpkgs' Python scripts print, byte for byte: JSON as `json.dumps` writes it, and
//! Python's reprs of strings and lists.

pub mod json;

use std::cmp::Ordering;

/// Compares two file names as Python compares the `str`s it decodes them to (UTF-8 with
/// surrogateescape): by code point. For valid UTF-8 that is plain byte order.
pub fn py_name_cmp(a: &[u8], b: &[u8]) -> Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    fn code_points(s: &[u8]) -> impl Iterator<Item = u32> + '_ {
        s.utf8_chunks().flat_map(|chunk| {
            chunk
                .valid()
                .chars()
                .map(|c| c as u32)
                .chain(chunk.invalid().iter().map(|&b| 0xdc00 + b as u32))
        })
    }
    code_points(a).cmp(code_points(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_order_is_code_point_order() {
        assert_eq!(py_name_cmp(b"a", b"b"), Ordering::Less);
        assert_eq!(py_name_cmp("é".as_bytes(), b"z"), Ordering::Greater);
        // U+FFFD (valid, EF BF BD) sorts after a surrogate-escaped byte (U+DCFF).
        assert_eq!(py_name_cmp(b"\xff", "\u{fffd}".as_bytes()), Ordering::Less);
        assert_eq!(py_name_cmp(b"\xff", "\u{d7ff}".as_bytes()), Ordering::Greater);
    }
}
