//! URLs for messages and printed configuration, without their secrets.

use url::{Position, Url};

/// What stands in for a hidden part.
const REDACTED: &str = "<redacted>";

/// `url` as it may be shown: the scheme, user, host, port and path stay; the password and the
/// whole query (and fragment) become `<redacted>`, since a query can carry a secret
/// (`?password=`, `?sslpassword=`, a token) under any name.
///
/// The parts are the ones a URL parser reads (the `url` crate, which the database drivers use
/// too), so what is hidden is what a driver would take as a secret. A string that does not
/// parse as a URL, or names a user without `//` (where a parser reads no userinfo), shows at
/// most its scheme. A URL with nothing to hide is returned as given.
pub fn redact_url(url: &str) -> String {
    if url.is_empty() {
        // No URL (a setting left empty): nothing to hide.
        return String::new();
    }
    let Ok(parsed) = Url::parse(url) else {
        return hidden(url);
    };
    if !parsed.has_authority() && url.contains('@') {
        return hidden(url);
    }
    let password = parsed.password().is_some();
    let query = parsed.query().is_some() || parsed.fragment().is_some();
    if !password && !query {
        return url.to_owned();
    }
    let mut shown = if password {
        format!(
            "{}{REDACTED}{}",
            &parsed[..Position::BeforePassword],
            &parsed[Position::AfterPassword..Position::AfterPath]
        )
    } else {
        parsed[..Position::AfterPath].to_owned()
    };
    if query {
        shown.push('?');
        shown.push_str(REDACTED);
    }
    shown
}

/// Everything after the scheme hidden.
fn hidden(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            format!("{scheme}://{REDACTED}")
        }
        _ => REDACTED.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn an_empty_setting_stays_empty() {
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn hides_the_password() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/approvals"),
            "postgres://app:<redacted>@db:5432/approvals"
        );
        assert_eq!(
            redact_url("postgres://:s3cret@db/approvals"),
            "postgres://:<redacted>@db/approvals"
        );
        // A password holding an `@` (unencoded): the userinfo ends at the last one.
        assert_eq!(
            redact_url("postgres://app:s3@cret@db/approvals"),
            "postgres://app:<redacted>@db/approvals"
        );
    }

    #[test]
    fn hides_the_query_which_may_hold_a_password() {
        for url in [
            "postgres://app@db/approvals?password=s3cret",
            "postgres://app@db/approvals?sslmode=require&sslpassword=s3cret",
            "postgres://app:s3cret@db/approvals?password=s3cret",
            "https://idp.example/jwks?token=s3cret",
            "postgres://app@db/approvals#s3cret",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("s3cret"), "{url} shows as {shown}");
            assert!(shown.ends_with("?<redacted>"), "{url} shows as {shown}");
        }
        assert_eq!(
            redact_url("postgres://app@db/approvals?password=x"),
            "postgres://app@db/approvals?<redacted>"
        );
    }

    #[test]
    fn keeps_a_url_with_nothing_to_hide() {
        for url in [
            "postgres://app@db:5432/approvals",
            "postgresql://db/approvals",
            "sqlite://approvals.db",
            "sqlite:approvals.db",
            "sqlite::memory:",
            "http://127.0.0.1:4317",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn shows_only_the_scheme_of_what_does_not_parse() {
        // An unencoded `/` in the password ends the authority early: no parser reads it.
        assert_eq!(
            redact_url("postgres://app:s3/cret@db/approvals"),
            "postgres://<redacted>"
        );
        assert_eq!(redact_url("app:s3cret@db/approvals"), "<redacted>");
        assert_eq!(redact_url("not a url s3cret"), "<redacted>");
    }
}
