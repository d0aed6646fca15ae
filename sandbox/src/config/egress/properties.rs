//! Property tests of the egress matcher against the url crate's own parse:
//! URLs are assembled from the spellings an attacker tries (dot segments,
//! percent-encoding, user information, default ports, host case, IPv6,
//! trailing dots, backslashes, `;` parameters) and every one the matcher
//! allows must name the rule's origin and a path under its prefix, as a server
//! that decodes and normalises the path would read it.

use proptest::prelude::*;
use proptest::sample::select;
use url::Url;

use super::EgressRule;

const RULES: [&str; 5] = [
    "http://127.0.0.1:8080/introspect",
    "http://auth.example/api/v1",
    "https://auth.example/oauth/",
    "http://[::1]:9000/check",
    "http://auth.example",
];

fn scheme() -> impl Strategy<Value = &'static str> {
    select(&["http", "https", "HTTP", "hTTps"][..])
}

fn userinfo() -> impl Strategy<Value = &'static str> {
    select(&["", "", "", "user@", "user:pw@", "127.0.0.1:8080@", "a%40b@"][..])
}

fn host() -> impl Strategy<Value = &'static str> {
    select(
        &[
            "127.0.0.1",
            "2130706433",
            "0x7f.0.0.1",
            "127.1",
            "auth.example",
            "AUTH.Example",
            "auth.example.",
            "auth%2eexample",
            "auth.example.evil",
            "evil.example",
            "[::1]",
            "[0:0:0:0:0:0:0:1]",
            "[::ffff:127.0.0.1]",
            "localhost",
        ][..],
    )
}

fn port() -> impl Strategy<Value = &'static str> {
    select(&["", "", ":80", ":443", ":8080", ":08080", ":9000", ":"][..])
}

fn segment() -> impl Strategy<Value = &'static str> {
    select(
        &[
            "introspect",
            "api",
            "v1",
            "oauth",
            "check",
            "admin",
            "API",
            "%61pi",
            "",
            ".",
            "..",
            "%2e%2e",
            ".%2E",
            "..%2f",
            "..%2F..%2Fadmin",
            "%2F",
            "..;",
            "..;x",
            "%2e%2e;a=b",
            "a%5cb",
            "..%5c",
            "%00",
            "v1;x",
            "\\..",
        ][..],
    )
}

fn separator() -> impl Strategy<Value = &'static str> {
    select(&["/", "/", "/", "\\", "//"][..])
}

fn suffix() -> impl Strategy<Value = &'static str> {
    select(&["", "", "?next=/api/v1", "#/introspect", "?a=..%2f"][..])
}

/// A rule and a URL string a guest might write against it: mostly the rule's
/// own path followed by hostile segments, under a respelled origin.
fn rule_and_url() -> impl Strategy<Value = (&'static str, String)> {
    select(&RULES[..]).prop_flat_map(|rule| {
        let path = Url::parse(rule).map(|u| u.path().trim_end_matches('/').to_owned());
        let head = path.unwrap_or_default();
        (
            Just(rule),
            scheme(),
            userinfo(),
            host(),
            port(),
            prop::bool::weighted(0.8),
            prop::collection::vec((separator(), segment()), 0..5),
            suffix(),
        )
            .prop_map(
                move |(rule, scheme, userinfo, host, port, keep, tail, suffix)| {
                    let head = if keep { head.as_str() } else { "" };
                    let tail: String = tail
                        .into_iter()
                        .map(|(sep, seg)| format!("{sep}{seg}"))
                        .collect();
                    (
                        rule,
                        format!("{scheme}://{userinfo}{host}{port}{head}{tail}{suffix}"),
                    )
                },
            )
    })
}

/// The path as a server that percent-decodes, treats `\` as `/`, drops `;`
/// parameters and resolves dot segments would read it.
fn server_view(path: &str) -> Vec<String> {
    let decoded = String::from_utf8_lossy(&percent_decode(path.as_bytes())).replace('\\', "/");
    let mut out: Vec<String> = Vec::new();
    for segment in decoded.split('/').skip(1) {
        match segment.split(';').next().unwrap_or_default() {
            "." => {}
            ".." => {
                out.pop();
            }
            plain => out.push(plain.to_owned()),
        }
    }
    while out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    out
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8192))]

    /// Whatever the spelling, an allowed URL parses to the rule's scheme,
    /// host and port, carries no user information, and its path, read as a
    /// server reads it, lies under the rule's prefix.
    #[test]
    fn allowed_urls_stay_within_their_rule((rule, text) in rule_and_url()) {
        let Ok(url) = Url::parse(&text) else {
            return Ok(());
        };
        let parsed = EgressRule::parse(rule).map_err(TestCaseError::fail)?;
        if !parsed.matches(&url) {
            return Ok(());
        }
        let prefix = Url::parse(rule).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(url.scheme(), prefix.scheme(), "{} under {}", text, rule);
        prop_assert_eq!(url.host(), prefix.host(), "{} under {}", text, rule);
        prop_assert_eq!(url.port_or_known_default(), prefix.port_or_known_default());
        prop_assert!(url.username().is_empty() && url.password().is_none(), "{}", text);
        let want = server_view(prefix.path());
        let have = server_view(url.path());
        prop_assert!(
            have.starts_with(&want),
            "{} (read as /{}) passed for {}",
            text,
            have.join("/"),
            rule
        );
        // What the bridge sends is what it matched.
        let again = Url::parse(url.as_str()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(parsed.matches(&again));
    }

    /// Plain segments under a rule's prefix are allowed (the property above
    /// is not passing by refusing everything).
    #[test]
    fn plain_paths_under_a_prefix_are_allowed(
        rule in select(&RULES[..]),
        tail in prop::collection::vec("[a-z0-9_-]{1,8}", 0..4),
        query in select(&["", "?a=1", "?next=%2f"][..]),
    ) {
        let base = rule.trim_end_matches('/');
        let text = format!("{base}/{}{query}", tail.join("/"));
        let url = Url::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let parsed = EgressRule::parse(rule).map_err(TestCaseError::fail)?;
        prop_assert!(parsed.matches(&url), "{} refused under {}", text, rule);
    }
}

#[test]
fn encoded_separators_and_parameter_dot_segments_are_refused_under_a_prefix() {
    let rule = EgressRule::parse("http://auth.example/api").unwrap_or_else(|e| panic!("{e}"));
    let url = |s: &str| Url::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    for bypass in [
        "http://auth.example/api/..%2fadmin",
        "http://auth.example/api/..%2Fadmin",
        "http://auth.example/api/..%5cadmin",
        "http://auth.example/api/..;/admin",
        "http://auth.example/api/%2e%2e;x/admin",
        "http://auth.example/api/.;/x",
        "http://auth.example/api/x%00",
    ] {
        assert!(!rule.matches(&url(bypass)), "{bypass} passed for /api");
    }
    // Ordinary parameters and encodings stay allowed.
    assert!(rule.matches(&url("http://auth.example/api/v1;version=2")));
    assert!(rule.matches(&url("http://auth.example/api/a%20b?x=%2f")));
    // Without a path prefix there is no path to escape.
    let host = EgressRule::parse("http://auth.example").unwrap_or_else(|e| panic!("{e}"));
    assert!(host.matches(&url("http://auth.example/api/..%2fadmin")));
}
