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
/// parser's message and says where: the key of that line (keys are no secret) and the line
/// and column (1-based).
pub fn config_error(message: &str, span: Option<Range<usize>>, text: &str) -> String {
    let message = message.trim().replace('\n', " ");
    let Some(span) = span else {
        return message;
    };
    let before = &text[..floor_boundary(text, span.start)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        });
    match key {
        Some(key) => format!("{message} (key `{key}`, line {line}, column {column})"),
        None => format!("{message} (line {line}, column {column})"),
    }
}

/// The largest char boundary at or before `at` (a span from a parser of this very text is on
/// one; this keeps a wrong one from panicking).
fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_error_names_the_place_not_the_text() {
        let text = "url = \"x\"\ntoken = \"ferry_abc_secret\nmore";
        let start = text.find("ferry").unwrap();
        let e = config_error("invalid basic string\n", Some(start..start + 3), text);
        assert_eq!(e, "invalid basic string (key `token`, line 2, column 10)");
        assert!(!e.contains("secret"));
        assert_eq!(secret_field(&Some("s".into())), "Some(<redacted>)");
    }
}
