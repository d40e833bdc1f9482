//! Kubernetes resource quantities (`100m`, `128Mi`, `1.5`, `2e3`), parsed only far enough to
//! refuse a malformed annotation at admission, naming it, and to compare a request with a
//! limit. The API server keeps the text the user wrote.

/// The quantity's value in base units (cores, bytes).
pub fn parse(text: &str) -> Result<f64, String> {
    let bad = || format!("{text:?} is not a Kubernetes quantity (for example 100m, 1.5, 128Mi, 1G)");
    let split =
        text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let digits = number.strip_prefix(['+', '-']).unwrap_or(number);
    if digits.is_empty() || digits == "." || digits.contains(['+', '-']) || digits.matches('.').count() > 1 {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: i32 = exponent[1..].parse().map_err(|_| bad())?;
            10f64.powi(power)
        }
        _ => return Err(bad()),
    };
    if value < 0.0 {
        return Err(format!("{text:?} is negative"));
    }
    Ok(value * scale)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn the_forms_kubernetes_accepts() {
        for (text, value) in [
            ("1", 1.0),
            ("100m", 0.1),
            ("1.5", 1.5),
            (".5", 0.5),
            ("128Mi", 134_217_728.0),
            ("1G", 1e9),
            ("2e3", 2000.0),
            ("+3k", 3000.0),
        ] {
            let parsed = parse(text).expect(text);
            assert!((parsed - value).abs() < 1e-9 * value.max(1.0), "{text}: {parsed}");
        }
    }

    #[test]
    fn malformed_and_negative_quantities_are_refused() {
        for text in ["", "lots", "1.2.3", "Mi", "12 Mi", "1mi", "1e", "--1", "-1", "."] {
            assert!(parse(text).is_err(), "{text:?} accepted");
        }
    }
}
