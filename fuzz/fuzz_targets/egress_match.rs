//! The egress allowlist matcher. Input: an `egress.allow` prefix on the first
//! line, the URL a guest asks for on the second. A URL the matcher allows has
//! the rule's scheme, host and port, no user information, and a path whose
//! segments begin with the rule's; parsing it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandgate::config::EgressRule;
use url::Url;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((rule_text, url_text)) = text.split_once('\n') else {
        return;
    };
    let (Ok(rule), Ok(url)) = (EgressRule::parse(rule_text), Url::parse(url_text)) else {
        return;
    };
    if !rule.matches(&url) {
        return;
    }
    let prefix = Url::parse(rule_text).expect("a parsed rule is a URL");
    assert_eq!(url.scheme(), prefix.scheme(), "{url} under {rule_text}");
    assert_eq!(url.host(), prefix.host(), "{url} under {rule_text}");
    assert_eq!(url.port_or_known_default(), prefix.port_or_known_default());
    assert!(
        url.username().is_empty() && url.password().is_none(),
        "{url}"
    );
    let mut want: Vec<&str> = prefix.path_segments().into_iter().flatten().collect();
    while want.last().is_some_and(|s| s.is_empty()) {
        want.pop();
    }
    let have: Vec<&str> = url.path_segments().into_iter().flatten().collect();
    assert!(have.starts_with(&want), "{url} under {rule_text}");
    // Nothing past a path prefix that a server could read as another path.
    if !want.is_empty() {
        let path = url.path().to_ascii_lowercase();
        assert!(!path.contains("%2f") && !path.contains("%5c"), "{url}");
    }
    // The bridge sends what it matched: its serialisation parses to itself.
    let again = Url::parse(url.as_str()).expect("a URL's serialisation parses");
    assert_eq!(again, url);
    assert!(rule.matches(&again));
});
