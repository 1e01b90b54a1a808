//! A string that never shows itself in logs, `Debug` output or printed configuration.

use std::fmt;

use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret prints as, wherever it is printed.
pub const REDACTED: &str = "[redacted]";

/// A configuration secret. `Debug` and `Serialize` print [`REDACTED`] (or `""` when unset, so
/// `config check` still shows that it is missing); only [`Secret::expose`] reveals it.
#[derive(Clone, Default)]
pub struct Secret(Option<SecretString>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let value: String = value.into();
        if value.is_empty() {
            Self(None)
        } else {
            Self(Some(SecretString::from(value)))
        }
    }

    /// The secret itself. Call it only where the value is used, never to log it.
    pub fn expose(&self) -> &str {
        self.0.as_ref().map(|s| s.expose_secret()).unwrap_or("")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_empty() { "\"\"" } else { REDACTED })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.is_empty() { "" } else { REDACTED })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// A PostgreSQL URL whose password never prints.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The URL with any password replaced by [`REDACTED`], safe to log and print.
    pub fn redacted(&self) -> String {
        redact_url_password(&self.0)
    }
}

/// Replaces every password a connection string can carry by [`REDACTED`], read the way the
/// drivers read them, and where they differ, the way that hides more:
/// - in a URL, the user information runs to the first `@` anywhere after the scheme for
///   tokio-postgres (so a `/` or `?` in an unencoded password does not end it) and to the
///   last `@` before the path or query for lapin's URL parser (so an `@` in the password does
///   not), so up to whichever comes later;
/// - a query parameter whose name, percent-decoded, is `password` (tokio-postgres), whatever
///   its value holds;
/// - in the `key=value` form, the `password` value, quoted or not.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return redact_keyword_password(url);
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    // Query parameters first: a `@` in one must not be taken for the end of a user name.
    let rest = redact_query_passwords(rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last `@` of the authority comes after any first `@`, when there is one.
    let user_end = rest[..authority_end].rfind('@').or_else(|| rest.find('@'));
    let mut out = String::from(head);
    let rest = match user_end {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon + 1]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            &rest[at..]
        }
        None => &rest[..],
    };
    out.push_str(rest);
    out
}

/// The values of `password` parameters in `rest` (a URL after its scheme) replaced. The query
/// may start at any `?` (one may be inside the user's password), so a parameter may start after
/// any `?` or `&` past the first `?`; a password's value runs to the next `&`, a `?` in it
/// included, as the driver reads it.
fn redact_query_passwords(rest: &str) -> String {
    let Some(query) = rest.find('?') else {
        return rest.to_owned();
    };
    let mut out = String::with_capacity(rest.len());
    let (mut copied, mut start) = (0, query + 1);
    while start <= rest.len() {
        let end = rest[start..].find('&').map_or(rest.len(), |j| start + j);
        match rest[start..end].split_once('=') {
            Some((k, _)) if percent_decode_str(k).decode_utf8_lossy() == "password" => {
                let value = start + k.len() + 1;
                out.push_str(&rest[copied..value]);
                out.push_str(REDACTED);
                (copied, start) = (end, end + 1);
            }
            // Not a password: the next parameter may start after a `?` inside this one.
            _ => match rest[start..].find(['?', '&']) {
                Some(j) => start += j + 1,
                None => break,
            },
        }
    }
    out.push_str(&rest[copied..]);
    out
}

/// [`redact_url_password`] for the `host=… password=…` form.
fn redact_keyword_password(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut rest = conn;
    while let Some(i) = rest.find("password") {
        let (before, from) = rest.split_at(i);
        let after = from["password".len()..].trim_start();
        // After whitespace, or straight after a quoted value (`host='db'password=…`).
        let keyword =
            before.is_empty() || before.ends_with(char::is_whitespace) || before.ends_with('\'');
        let Some(value) = after.strip_prefix('=').filter(|_| keyword) else {
            out.push_str(&rest[..i + "password".len()]);
            rest = &rest[i + "password".len()..];
            continue;
        };
        out.push_str(before);
        out.push_str("password=");
        out.push_str(REDACTED);
        let value = value.trim_start();
        let end = match value.strip_prefix('\'') {
            // Quoted: up to the closing quote, past backslash escapes.
            Some(quoted) => {
                let mut escaped = false;
                let close = quoted.char_indices().find(|&(_, c)| {
                    let closes = !escaped && c == '\'';
                    escaped = !escaped && c == '\\';
                    closes
                });
                close.map_or(value.len(), |(j, _)| j + 2)
            }
            // Unquoted: up to whitespace not escaped by a backslash (`pa\ ss`).
            None => {
                let mut escaped = false;
                value
                    .char_indices()
                    .find(|&(_, c)| {
                        let ends = !escaped && c.is_whitespace();
                        escaped = !escaped && c == '\\';
                        ends
                    })
                    .map_or(value.len(), |(j, _)| j)
            }
        };
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// Redacted, and with control characters escaped: a URL read from the catalog is printed on
/// operators' terminals.
impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::text::escape_controls(&self.redacted()))
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(DatabaseUrl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print_their_value() {
        let s = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{REDACTED}\"")
        );
        assert_eq!(s.expose(), "hunter2-hunter2");
        assert!(Secret::new("").is_empty());
    }

    #[test]
    fn database_url_passwords_are_redacted() {
        let u = DatabaseUrl::new("postgres://app:s3cret@db.example:5432/cat");
        assert_eq!(
            u.to_string(),
            "postgres://app:[redacted]@db.example:5432/cat"
        );
        assert!(!format!("{u:?}").contains("s3cret"));
        assert_eq!(
            redact_url_password("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(redact_url_password("not a url"), "not a url");
    }

    #[test]
    fn passwords_are_redacted_in_every_form_the_driver_reads() {
        for (given, shown) in [
            // A `/` in an unencoded password: the driver reads up to the first `@`.
            (
                "postgres://app:pa/ss@db/cat",
                "postgres://app:[redacted]@db/cat",
            ),
            (
                "postgres://app@db/cat?sslmode=disable&password=s3cret&x=1",
                "postgres://app@db/cat?sslmode=disable&password=[redacted]&x=1",
            ),
            (
                "host=db user=app password=s3cret dbname=cat",
                "host=db user=app password=[redacted] dbname=cat",
            ),
            (
                "host=db password = 's3 \\'cret' dbname=cat",
                "host=db password=[redacted] dbname=cat",
            ),
            ("password=s3cret", "password=[redacted]"),
            (
                "host=db user=passwordless dbname=cat",
                "host=db user=passwordless dbname=cat",
            ),
            ("postgres://db/cat", "postgres://db/cat"),
            // lapin's URL parser ends the user information at the last `@`.
            (
                "amqp://app:p@ssw0rd@broker/%2f",
                "amqp://app:[redacted]@broker/%2f",
            ),
            // tokio-postgres's at the first, past a `?`.
            (
                "postgres://app:p?ss@db/cat",
                "postgres://app:[redacted]@db/cat",
            ),
            (
                "postgres://app:p?ss@db/cat?password=s3cret",
                "postgres://app:[redacted]@db/cat?password=[redacted]",
            ),
            // A `?` in the parameter's value is part of it.
            (
                "postgres://db/cat?password=ab?cd&x=1",
                "postgres://db/cat?password=[redacted]&x=1",
            ),
            (
                "postgres://db/cat?x=1&password=a?password=b&y=2",
                "postgres://db/cat?x=1&password=[redacted]&y=2",
            ),
            (
                "postgres://user:pw@host:5432/db?sslmode=require",
                "postgres://user:[redacted]@host:5432/db?sslmode=require",
            ),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:[redacted]@127.0.0.1:5672/%2f",
            ),
            // An `@` in a query parameter's password.
            (
                "postgres://db/cat?password=s3@cret&x=1",
                "postgres://db/cat?password=[redacted]&x=1",
            ),
            (
                "postgres://app@db/cat?password=s3@cret",
                "postgres://app@db/cat?password=[redacted]",
            ),
            // A parameter name the driver decodes.
            (
                "postgres://app@db/cat?pass%77ord=s3cret",
                "postgres://app@db/cat?pass%77ord=[redacted]",
            ),
            (
                "postgres://app@db/cat?application_name=a@b",
                "postgres://app@db/cat?application_name=a@b",
            ),
            // Straight after a quoted value, and an escaped space in an unquoted one.
            (
                "host='db'password=s3cret dbname=cat",
                "host='db'password=[redacted] dbname=cat",
            ),
            (
                "host=db password=pa\\ ss dbname=cat",
                "host=db password=[redacted] dbname=cat",
            ),
        ] {
            assert_eq!(redact_url_password(given), shown, "{given}");
        }
    }
}
