//! Keeping secrets out of what is printed: `Debug` output and configuration errors.

use std::ops::Range;

/// What a secret field shows in `Debug` output: whether it is set, never its value.
pub fn secret_field(value: &Option<String>) -> &'static str {
    match value {
        Some(_) => "Some(<redacted>)",
        None => "None",
    }
}

/// A configuration file's parse error without the quoted source line TOML parsers add: that
/// line may be the one holding a token (a missing quote after `token = "...`). Keeps the
/// parser's message and says where (line and column, 1-based).
pub fn config_error(message: &str, span: Option<Range<usize>>, text: &str) -> String {
    let message = message.trim().replace('\n', " ");
    match span {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_error_names_the_place_not_the_text() {
        let text = "url = \"x\"\ntoken = \"ferry_abc_secret\nmore";
        let start = text.find("ferry").unwrap();
        let e = config_error("invalid basic string\n", Some(start..start + 3), text);
        assert_eq!(e, "invalid basic string (line 2, column 10)");
        assert!(!e.contains("secret"));
        assert_eq!(secret_field(&Some("s".into())), "Some(<redacted>)");
    }
}
