//! Key names: `:` and `=` separate the parts of a key, `{`…`}` is its Cluster hash tag, so
//! those characters (and `%`, the escape) are percent-escaped wherever a part comes from
//! outside — a rule id, a descriptor value, a lease id. Two different parts never escape to
//! the same text, so two counters or leases never share a key by accident.

/// Appends `s` to `out`, percent-escaping `%`, `:`, `=`, `{` and `}`. Runs of other bytes are
/// copied whole: every decision builds a counter key this way, and most parts need no escape.
pub fn escape_into(out: &mut String, s: &str) {
    let mut copied = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escaped = match byte {
            b'%' => "%25",
            b':' => "%3A",
            b'=' => "%3D",
            b'{' => "%7B",
            b'}' => "%7D",
            _ => continue,
        };
        // The escaped characters are ASCII, so `i` is a character boundary.
        out.push_str(&s[copied..i]);
        out.push_str(escaped);
        copied = i + 1;
    }
    out.push_str(&s[copied..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_separators_and_braces() {
        let mut out = String::new();
        escape_into(&mut out, "a:b=c{d}%e/f");
        assert_eq!(out, "a%3Ab%3Dc%7Bd%7D%25e/f");
        let mut out = String::from("x");
        escape_into(&mut out, "é:ü}");
        escape_into(&mut out, "");
        escape_into(&mut out, "plain");
        assert_eq!(out, "xé%3Aü%7Dplain");
    }
}
