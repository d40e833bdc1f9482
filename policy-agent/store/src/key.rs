//! Key names: `:` and `=` separate the parts of a key, `{`…`}` is its Cluster hash tag, so
//! those characters (and `%`, the escape) are percent-escaped wherever a part comes from
//! outside — a rule id, a descriptor value, a lease id. Two different parts never escape to
//! the same text, so two counters or leases never share a key by accident.

/// Appends `s` to `out`, percent-escaping `%`, `:`, `=`, `{` and `}`.
pub fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '=' => out.push_str("%3D"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_separators_and_braces() {
        let mut out = String::new();
        escape_into(&mut out, "a:b=c{d}%e/f");
        assert_eq!(out, "a%3Ab%3Dc%7Bd%7D%25e/f");
    }
}
