//! Plain YAML scalars that parsers read differently: Envoy's YAML reader takes `052304` for an
//! octal number and `1e3` for a string where sesame's (YAML 1.2) reads a decimal and a float. A
//! bootstrap that holds one is given to Envoy as written, not re-serialised, since the rewrite
//! would change what it means.

use std::path::Path;

/// The first plain scalar of the YAML file `path` whose meaning depends on the parser, if any.
pub fn ambiguous_scalar(path: &Path) -> Option<String> {
    if path.extension().is_some_and(|e| e == "json") {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().flat_map(plain_values).find(|value| ambiguous(value)).map(str::to_string)
}

/// The plain scalars of one line: the values of `key: value` and `- value`, in block style and
/// inside flow collections (`{ port_value: 8080 }`), without comments; quoted ones left out.
fn plain_values(line: &str) -> Vec<&str> {
    let line = line.split(" #").next().unwrap_or(line);
    line.split(['{', '}', '[', ']', ','])
        .filter_map(|part| {
            let part = part.trim().trim_start_matches("- ").trim();
            let value = part.split_once(": ").map_or(part, |(_, value)| value).trim();
            let first = value.chars().next()?;
            (!matches!(first, '"' | '\'' | '|' | '>' | '&' | '*' | '!' | '#' | '-')).then_some(value)
        })
        .collect()
}

fn ambiguous(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    // Octal in YAML 1.1; a number with an exponent but no dot (a string to Envoy's reader);
    // booleans of YAML 1.1 only; sexagesimal numbers.
    (value.len() > 1 && value.starts_with('0') && digits(value))
        || lower
            .split_once('e')
            .is_some_and(|(mantissa, exp)| digits(mantissa) && digits(exp.trim_start_matches(['+', '-'])))
        || matches!(lower.as_str(), "y" | "n" | "yes" | "no" | "on" | "off")
        || value.split(':').count() > 1 && value.split(':').all(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_that_parsers_read_differently_are_found_and_quoted_ones_are_not() {
        let found = |line: &str| plain_values(line).into_iter().any(ambiguous);
        for line in [
            "port_value: 052304",
            "stat_prefix: 1e3",
            "  enabled: yes",
            "- off",
            "timeout: 1:30",
            "    address: { socket_address: { address: 127.0.0.1, port_value: 052304 } }",
        ] {
            assert!(found(line), "{line}");
        }
        for line in [
            "port_value: 10000",
            "stat_prefix: \"1e3\"",
            "name: yes_listener",
            "value: 0",
            "ratio: 1.5e3",
            "    address: { socket_address: { address: 127.0.0.1, port_value: 8080 } }",
            "  - name: \"on\"",
        ] {
            assert!(!found(line), "{line}");
        }
    }
}
