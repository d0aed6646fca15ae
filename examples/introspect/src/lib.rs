//! Example guest: bearer-token authentication by OAuth 2.0 token introspection (RFC 7662),
//! for forward-auth and ext_authz requests.
//!
//! The token of `Authorization: Bearer <token>` is posted to the introspection endpoint named
//! by the environment variable `INTROSPECT_URL`, through the host's HTTP bridge. The guest sends
//! no credentials of its own: the host adds the client authentication the endpoint needs
//! (`[[policy.egress.credentials]]`), so the secret never enters the sandbox. The request is
//! allowed when the answer says `active`, `exp`/`nbf` (when present) hold at the current time,
//! the token has every scope in `REQUIRED_SCOPE`, and it names a user (`sub` or `username`).
//!
//! Deny statuses: 401 no or bad token, 403 valid token without the scope or a user, 502 the
//! endpoint answered but not usefully, 503 the bridge could not complete the call, 500 the
//! policy is misconfigured. Every 401/403 carries the RFC 6750 challenge in the obligation
//! `www-authenticate`, since decision headers are for allowed requests (DESIGN §2).

use std::env::VarError;
use std::time::{SystemTime, UNIX_EPOCH};

use sandgate_guest::{Decision, ForwardAuth, Input, Request, http};
use serde::Deserialize;

/// The variable holding the introspection endpoint's URL.
const URL_VAR: &str = "INTROSPECT_URL";

/// The variable holding the scope (or space-separated scopes) every token must have.
const SCOPE_VAR: &str = "REQUIRED_SCOPE";

/// The obligation carrying the `WWW-Authenticate` challenge of a 401 or 403.
const CHALLENGE: &str = "www-authenticate";

sandgate_guest::policy!(evaluate);

fn evaluate(input: Input<ForwardAuth>) -> Decision {
    let settings = match Settings::from_env(|name| std::env::var(name)) {
        Ok(settings) => settings,
        Err(reason) => return Decision::deny().status(500).reason(reason),
    };
    let Some(now) = unix_now() else {
        return Decision::deny()
            .status(500)
            .reason("the clock reads a time before 1970");
    };
    decide(&input.input.request, &settings, now)
}

/// What the policy is configured with, from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    /// Where the token is introspected.
    url: String,
    /// Scopes the token must all have; never empty.
    required: Vec<String>,
}

impl Settings {
    /// Reads both variables through `var` (`std::env::var` in the guest); the error is the
    /// deny reason, naming the variable at fault.
    fn from_env(var: impl Fn(&str) -> Result<String, VarError>) -> Result<Self, String> {
        let url = required_var(&var, URL_VAR, "http://127.0.0.1:8080/introspect")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "{URL_VAR}={url:?} is not an http:// or https:// URL"
            ));
        }
        let scopes = required_var(&var, SCOPE_VAR, "orders:read")?;
        let required: Vec<String> = scopes
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if let Some(bad) = required.iter().find(|scope| !is_scope_token(scope)) {
            return Err(format!(
                "{SCOPE_VAR}={scopes:?} is malformed: {bad:?} is not a scope token (RFC 6749 §3.3)"
            ));
        }
        Ok(Self { url, required })
    }
}

/// A variable's value, trimmed and non-empty, or the deny reason naming it.
fn required_var(
    var: impl Fn(&str) -> Result<String, VarError>,
    name: &str,
    example: &str,
) -> Result<String, String> {
    match var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        Ok(_) => Err(format!("{name} is empty: set it, e.g. {example:?}")),
        Err(VarError::NotPresent) => Err(format!(
            "{name} is not set: give the policy env = [\"{name}\"] and set it, e.g. {example:?}"
        )),
        Err(VarError::NotUnicode(_)) => Err(format!("{name} is not UTF-8")),
    }
}

/// RFC 6749 scope-token: one or more of `%x21 / %x23-5B / %x5D-7E` (no quote or backslash,
/// so it can be quoted in a challenge as it is).
fn is_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope
            .bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// Seconds since the Unix epoch, `None` when the clock reads before 1970.
fn unix_now() -> Option<u64> {
    Some(SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// Authenticates one request at `now` (Unix seconds); see the crate docs.
fn decide(request: &Request, settings: &Settings, now: u64) -> Decision {
    let token = match bearer_token(request) {
        Ok(token) => token,
        Err(denial) => return denial,
    };
    match introspect(&settings.url, token) {
        Ok(answer) => judge(&answer, &settings.required, now),
        Err(denial) => denial,
    }
}

/// The bearer token of the request, or the 401 for its absence.
fn bearer_token(request: &Request) -> Result<&str, Decision> {
    let Some(value) = request.header("authorization") else {
        return Err(unauthenticated(
            "no bearer token: the request has no authorization header",
            "Bearer",
        ));
    };
    let value = value.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthenticated(
            "no bearer token: the authorization header uses another scheme",
            "Bearer",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(unauthenticated(
            "no bearer token: the authorization header has an empty bearer token",
            "Bearer",
        ));
    }
    if !is_b64token(token) {
        return Err(unauthenticated(
            "malformed bearer token: expected `Bearer <token>` with the token's characters limited to letters, digits and -._~+/ (RFC 6750 §2.1)",
            r#"Bearer error="invalid_token""#,
        ));
    }
    Ok(token)
}

/// RFC 6750 b64token: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// A 401 with its challenge.
fn unauthenticated(reason: &str, challenge: &str) -> Decision {
    Decision::deny()
        .status(401)
        .reason(reason)
        .obligation(CHALLENGE, challenge)
}

/// The fields of an RFC 7662 introspection answer this policy reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Introspection {
    active: bool,
    scope: Option<String>,
    sub: Option<String>,
    username: Option<String>,
    client_id: Option<String>,
    /// Unix seconds; fractional values are accepted, as NumericDate allows them.
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// Asks the endpoint about `token`: the introspection answer, or the 502/503 saying why there
/// is none.
fn introspect(url: &str, token: &str) -> Result<Introspection, Decision> {
    // No authorization header: the host adds the client credentials for this URL.
    let response = http::Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(introspection_form(token))
        .send()
        .map_err(|err| {
            sandgate_guest::warn!("token introspection at {url} failed: {err}");
            Decision::deny()
                .status(503)
                .reason(format!("token introspection failed: {err}"))
        })?;
    if !response.is_success() {
        let hint = if matches!(response.status, 401 | 403) {
            " (check the client credentials the host adds for this endpoint)"
        } else {
            ""
        };
        return Err(Decision::deny().status(502).reason(format!(
            "introspection endpoint answered HTTP {}{hint}",
            response.status
        )));
    }
    serde_json::from_slice(&response.body).map_err(|err| {
        Decision::deny().status(502).reason(format!(
            "introspection endpoint sent no valid RFC 7662 answer: {err}"
        ))
    })
}

/// The request body of RFC 7662 §2.1.
fn introspection_form(token: &str) -> String {
    format!(
        "token={}&token_type_hint=access_token",
        form_urlencode(token)
    )
}

/// `application/x-www-form-urlencoded` encoding of one value: letters, digits and `*-._` as
/// they are, space as `+`, every other byte as `%XX`.
fn form_urlencode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                encoded.push(char::from(byte));
            }
            b' ' => encoded.push('+'),
            _ => {
                encoded.push('%');
                encoded.push(char::from(HEX[usize::from(byte >> 4)]));
                encoded.push(char::from(HEX[usize::from(byte & 0x0f)]));
            }
        }
    }
    encoded
}

/// The decision for an introspection answer at `now` (Unix seconds).
fn judge(answer: &Introspection, required: &[String], now: u64) -> Decision {
    let invalid_token =
        |reason: String| unauthenticated(&reason, r#"Bearer error="invalid_token""#);
    // Whole seconds: a token expiring within the current second is already expired.
    let now_secs = now as f64;
    if !answer.active {
        return invalid_token("token is not active".to_owned());
    }
    if let Some(exp) = answer.exp
        && exp <= now_secs
    {
        return invalid_token(format!(
            "token expired: exp {exp} is not after the current time {now}"
        ));
    }
    if let Some(nbf) = answer.nbf
        && nbf > now_secs
    {
        return invalid_token(format!(
            "token is not valid yet: nbf {nbf} is after the current time {now}"
        ));
    }

    let granted: Vec<&str> = answer
        .scope
        .as_deref()
        .unwrap_or_default()
        .split(' ')
        .filter(|scope| !scope.is_empty())
        .collect();
    let missing: Vec<&str> = required
        .iter()
        .map(String::as_str)
        .filter(|scope| !granted.contains(scope))
        .collect();
    if !missing.is_empty() {
        let has = if granted.is_empty() {
            "none".to_owned()
        } else {
            granted.join(" ")
        };
        return Decision::deny()
            .status(403)
            .reason(format!(
                "token lacks scope {} (token scopes: {has})",
                missing.join(" ")
            ))
            .obligation(
                CHALLENGE,
                format!(
                    r#"Bearer error="insufficient_scope", scope="{}""#,
                    required.join(" ")
                ),
            );
    }

    let Some(user) = [&answer.sub, &answer.username]
        .into_iter()
        .flatten()
        .find(|user| !user.is_empty())
    else {
        return Decision::deny()
            .status(403)
            .reason("token names no user: the introspection answer has neither sub nor username");
    };
    let scopes = granted.join(" ");
    let mut headers = vec![("x-user", user.as_str()), ("x-scopes", scopes.as_str())];
    if let Some(client_id) = answer.client_id.as_deref().filter(|id| !id.is_empty()) {
        headers.push(("x-client-id", client_id));
    }
    let mut decision = Decision::allow();
    for (name, value) in headers {
        // The values come from the endpoint: refuse what would break or split the header.
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Decision::deny().status(502).reason(format!(
                "introspection answer holds control characters in the value for header {name}"
            ));
        }
        decision = decision.header(name, value);
    }
    decision
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use serde_json::{Value, json};

    use super::*;

    const URL: &str = "http://127.0.0.1:8080/introspect";
    /// 2026-11-23T10:00:00Z.
    const NOW: u64 = 1_795_428_000;

    fn settings(required: &str) -> Settings {
        Settings {
            url: URL.to_owned(),
            required: required.split(' ').map(String::from).collect(),
        }
    }

    fn request_with(authorization: Option<&str>) -> Request {
        let mut input =
            json!({"request": {"method": "GET", "path": "/api/orders/7", "headers": {}}});
        if let Some(value) = authorization {
            input["request"]["headers"]["authorization"] = value.into();
        }
        serde_json::from_value::<ForwardAuth>(input)
            .expect("forward-auth input")
            .request
    }

    /// Decides with the bridge answering `answer` (status 200) and returns the decision and
    /// the requests the guest sent.
    fn decide_with_answer(
        authorization: Option<&str>,
        required: &str,
        answer: Result<http::Response, http::Error>,
    ) -> (Value, Vec<http::Request>) {
        let sent = Rc::new(RefCell::new(Vec::new()));
        let log = Rc::clone(&sent);
        let _bridge = http::mock(move |request| {
            log.borrow_mut().push(request.clone());
            answer.clone()
        });
        let decision = decide(&request_with(authorization), &settings(required), NOW);
        let sent = sent.borrow().clone();
        (serde_json::to_value(decision).expect("serialises"), sent)
    }

    fn ok(body: Value) -> Result<http::Response, http::Error> {
        Ok(http::Response::new(200, body.to_string()))
    }

    #[test]
    fn active_token_with_the_scope_is_allowed_with_user_and_scopes() {
        let (decision, sent) = decide_with_answer(
            Some("Bearer mF_9.B5f-4.1JqM"),
            "orders:read",
            ok(json!({
                "active": true, "scope": "orders:read profile", "sub": "alice",
                "client_id": "shop-web", "username": "alice@example.com",
                "exp": NOW + 60, "iat": NOW - 60, "token_type": "Bearer"
            })),
        );
        assert_eq!(
            decision,
            json!({"allow": true, "headers": {
                "x-user": "alice", "x-scopes": "orders:read profile", "x-client-id": "shop-web"
            }})
        );
        assert_eq!(sent.len(), 1);
    }

    #[test]
    fn introspection_request_is_a_form_post_without_credentials() {
        let (_, sent) = decide_with_answer(
            Some("Bearer a+b/c~d="),
            "orders:read",
            ok(json!({"active": false})),
        );
        let [request] = &sent[..] else {
            panic!("one request expected, got {sent:?}");
        };
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, URL);
        assert_eq!(
            request.headers,
            [
                (
                    "content-type".to_owned(),
                    "application/x-www-form-urlencoded".to_owned()
                ),
                ("accept".to_owned(), "application/json".to_owned()),
            ]
        );
        assert!(
            !request
                .headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        );
        assert_eq!(
            request.body.as_deref(),
            Some(&b"token=a%2Bb%2Fc%7Ed%3D&token_type_hint=access_token"[..])
        );
    }

    #[test]
    fn username_stands_in_for_a_missing_sub() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:read",
            ok(json!({"active": true, "scope": "orders:read", "username": "bob"})),
        );
        assert_eq!(
            decision,
            json!({"allow": true, "headers": {"x-user": "bob", "x-scopes": "orders:read"}})
        );
    }

    #[test]
    fn inactive_token_is_denied_401_invalid_token() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:read",
            ok(json!({"active": false})),
        );
        assert_eq!(
            decision,
            json!({
                "allow": false, "status": 401, "reason": "token is not active",
                "obligations": {"www-authenticate": "Bearer error=\"invalid_token\""}
            })
        );
    }

    #[test]
    fn expired_token_is_denied_401_even_when_reported_active() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:read",
            ok(json!({"active": true, "scope": "orders:read", "sub": "alice", "exp": NOW})),
        );
        assert_eq!(decision["allow"], false);
        assert_eq!(decision["status"], 401);
        assert_eq!(
            decision["reason"],
            format!("token expired: exp {NOW} is not after the current time {NOW}")
        );
        assert_eq!(
            decision["obligations"]["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
    }

    #[test]
    fn token_not_valid_yet_is_denied_401() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:read",
            ok(json!({"active": true, "scope": "orders:read", "sub": "alice", "nbf": NOW + 5})),
        );
        assert_eq!(decision["status"], 401);
        let reason = decision["reason"].as_str().expect("reason");
        assert!(reason.starts_with("token is not valid yet"), "{reason}");
    }

    #[test]
    fn missing_scope_is_denied_403_insufficient_scope() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:write",
            ok(json!({"active": true, "scope": "orders:read profile", "sub": "alice"})),
        );
        assert_eq!(
            decision,
            json!({
                "allow": false, "status": 403,
                "reason": "token lacks scope orders:write (token scopes: orders:read profile)",
                "obligations": {
                    "www-authenticate": "Bearer error=\"insufficient_scope\", scope=\"orders:write\""
                }
            })
        );
    }

    #[test]
    fn scopes_must_match_whole_and_all_required() {
        let answer = json!({"active": true, "scope": "orders:reader", "sub": "alice"});
        let (decision, _) = decide_with_answer(Some("Bearer t"), "orders:read", ok(answer));
        assert_eq!(decision["status"], 403);
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "a b",
            ok(json!({"active": true, "sub": "x", "scope": "b"})),
        );
        assert_eq!(decision["reason"], "token lacks scope a (token scopes: b)");
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "a",
            ok(json!({"active": true, "sub": "x"})),
        );
        assert_eq!(
            decision["reason"],
            "token lacks scope a (token scopes: none)"
        );
    }

    #[test]
    fn token_without_a_user_is_denied_403() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:read",
            ok(json!({"active": true, "scope": "orders:read", "client_id": "batch-job"})),
        );
        assert_eq!(decision["allow"], false);
        assert_eq!(decision["status"], 403);
    }

    #[test]
    fn no_token_is_denied_401_with_a_bare_challenge_and_no_call() {
        for authorization in [None, Some("Basic czZCaGRSa3F0Mzo="), Some("Bearer")] {
            let (decision, sent) = decide_with_answer(authorization, "orders:read", ok(json!({})));
            assert_eq!(decision["allow"], false, "{authorization:?}");
            assert_eq!(decision["status"], 401, "{authorization:?}");
            let reason = decision["reason"].as_str().expect("reason");
            assert!(reason.starts_with("no bearer token"), "{reason}");
            assert_eq!(decision["obligations"]["www-authenticate"], "Bearer");
            assert!(sent.is_empty(), "{authorization:?}");
        }
    }

    #[test]
    fn malformed_token_is_denied_401_without_a_call() {
        for authorization in ["Bearer a b", "Bearer t\"oken", "Bearer ==", "Bearer tök"] {
            let (decision, sent) =
                decide_with_answer(Some(authorization), "orders:read", ok(json!({})));
            assert_eq!(decision["status"], 401, "{authorization}");
            let reason = decision["reason"].as_str().expect("reason");
            assert!(reason.starts_with("malformed bearer token"), "{reason}");
            assert_eq!(
                decision["obligations"]["www-authenticate"],
                "Bearer error=\"invalid_token\""
            );
            assert!(sent.is_empty(), "{authorization}");
        }
    }

    #[test]
    fn timeout_fails_closed_with_503() {
        let (decision, _) =
            decide_with_answer(Some("Bearer t"), "orders:read", Err(http::Error::Timeout));
        assert_eq!(
            decision,
            json!({"allow": false, "status": 503, "reason": "token introspection failed: http call timed out"})
        );
    }

    #[test]
    fn every_bridge_error_fails_closed_with_503_naming_it() {
        for error in [
            http::Error::EgressDenied,
            http::Error::Connection,
            http::Error::ResponseTooLarge,
            http::Error::InvalidRequest,
            http::Error::BudgetExhausted,
            http::Error::MalformedResponse("bad".into()),
        ] {
            let expected = format!("token introspection failed: {error}");
            let (decision, _) = decide_with_answer(Some("Bearer t"), "orders:read", Err(error));
            assert_eq!(decision["allow"], false);
            assert_eq!(decision["status"], 503);
            assert_eq!(decision["reason"], expected);
        }
    }

    #[test]
    fn endpoint_errors_and_bad_answers_are_502() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:read",
            Ok(http::Response::new(401, r#"{"error":"invalid_client"}"#)),
        );
        assert_eq!(decision["status"], 502);
        assert_eq!(
            decision["reason"],
            "introspection endpoint answered HTTP 401 (check the client credentials the host adds for this endpoint)"
        );
        for body in [
            r#"{"scope":"orders:read"}"#,
            r#"{"active":"true"}"#,
            "<html>",
        ] {
            let (decision, _) = decide_with_answer(
                Some("Bearer t"),
                "orders:read",
                Ok(http::Response::new(200, body)),
            );
            assert_eq!(decision["status"], 502, "{body}");
            let reason = decision["reason"].as_str().expect("reason");
            assert!(
                reason.starts_with("introspection endpoint sent no valid RFC 7662 answer"),
                "{reason}"
            );
        }
    }

    #[test]
    fn control_characters_from_the_endpoint_never_reach_a_header() {
        let (decision, _) = decide_with_answer(
            Some("Bearer t"),
            "orders:read",
            ok(json!({"active": true, "scope": "orders:read", "sub": "alice\r\nx-admin: 1"})),
        );
        assert_eq!(decision["allow"], false);
        assert_eq!(decision["status"], 502);
    }

    #[test]
    fn settings_name_the_variable_at_fault() {
        let env = |url: Option<&str>, scope: Option<&str>| {
            let (url, scope) = (url.map(String::from), scope.map(String::from));
            Settings::from_env(move |name| {
                match name {
                    URL_VAR => url.clone(),
                    SCOPE_VAR => scope.clone(),
                    _ => None,
                }
                .ok_or(VarError::NotPresent)
            })
        };
        assert_eq!(
            env(Some(URL), Some(" orders:read  profile ")),
            Ok(Settings {
                url: URL.to_owned(),
                required: vec!["orders:read".into(), "profile".into()]
            })
        );
        let cases = [
            (None, Some("a"), "INTROSPECT_URL is not set"),
            (
                Some("ftp://x"),
                Some("a"),
                "INTROSPECT_URL=\"ftp://x\" is not",
            ),
            (Some(URL), None, "REQUIRED_SCOPE is not set"),
            (Some(URL), Some("  "), "REQUIRED_SCOPE is empty"),
            (
                Some(URL),
                Some("a\"b"),
                "REQUIRED_SCOPE=\"a\\\"b\" is malformed",
            ),
        ];
        for (url, scope, expected) in cases {
            let reason = env(url, scope).expect_err(expected);
            assert!(reason.starts_with(expected), "{reason}");
        }
    }

    #[test]
    fn form_encoding_escapes_everything_but_unreserved() {
        assert_eq!(form_urlencode("aZ09*-._"), "aZ09*-._");
        assert_eq!(form_urlencode("a b&c=d+é"), "a+b%26c%3Dd%2B%C3%A9");
    }

    #[test]
    fn clock_reads_after_the_epoch() {
        assert!(unix_now().expect("clock after 1970") > 1_600_000_000);
    }

    #[test]
    fn shipped_sample_is_a_bearer_request() {
        let input: ForwardAuth =
            serde_json::from_str(include_str!("../input.json")).expect("sample parses");
        assert!(bearer_token(&input.request).is_ok());
    }

    #[test]
    fn input_without_a_request_is_denied_by_the_sdk() {
        let output = sandgate_evaluate_document(br#"{"input":{"subject":"alice"}}"#);
        let decision: Value = serde_json::from_slice(&output).expect("json");
        assert_eq!(decision["allow"], false);
        let reason = decision["reason"].as_str().expect("reason");
        assert!(reason.starts_with("invalid input"), "{reason}");
    }
}
