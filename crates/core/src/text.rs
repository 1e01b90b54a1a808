//! Text shown to people: operators' terminals and log lines.

/// `s` with its control characters shown escaped (`\u{1b}`, `\n`, `\t`), so text that came from
/// a database or a request (a job's kind or error, a stored URL) can neither break a line's
/// layout nor drive the terminal it is printed on.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `s` cut to its first `max` characters, with `…` when something was cut: for echoing an
/// input (an id, a flag's value) in an error without echoing all of a huge one.
pub fn shorten(s: &str, max: usize) -> String {
    // At most `max` bytes is at most `max` characters: nothing to walk (every request's path
    // is shortened for its log line).
    if s.len() <= max {
        return s.to_owned();
    }
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// A TOML parse error's message without the lines of the file it quotes (`2 | key = "…"` and
/// the caret under it): the line at fault may hold a secret (a password in a URL), and the
/// message goes to a terminal and to logs. The line and column it names are kept.
pub fn without_source_excerpts(message: &str) -> String {
    let excerpt = |line: &str| {
        let t = line.trim_start();
        t.starts_with('|')
            || t.split_once(" |")
                .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
    };
    message
        .lines()
        .filter(|l| !excerpt(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(escape_controls("a\u{1b}[2Jb\nc\té"), "a\\u{1b}[2Jb\\nc\\té");
        assert_eq!(escape_controls("plain text"), "plain text");
    }

    #[test]
    fn long_input_is_shortened_on_a_character_boundary() {
        assert_eq!(shorten("short", 64), "short");
        assert_eq!(shorten("abcdef", 3), "abc…");
        assert_eq!(shorten("ééééé", 2), "éé…");
        assert_eq!(shorten(&"x".repeat(100_000), 64).chars().count(), 65);
    }

    #[test]
    fn a_toml_error_keeps_its_position_and_loses_the_quoted_line() {
        let e = toml::from_str::<toml::Table>("a = 1\nurl = \"postgres://u:s3cret@h/db\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("s3cret"), "the raw message quotes the line: {e}");
        let shown = without_source_excerpts(&e);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("line 2"), "{shown}");
    }
}
