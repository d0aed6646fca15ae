//! Example guest: delegates the decision to an external service (a Casbin server, OPA, or
//! anything answering in their shape) through the host's HTTP bridge, and maps its answer.
//!
//! The question is `{"subject":…,"object":…,"action":…}`, taken from a JSON API input of that
//! shape or from a forward-auth / ext_authz request (subject = header `x-user`, object = path,
//! action = lower-cased method). It is posted as JSON to the URL in `DECISION_URL`; with
//! `DECISION_FORMAT=opa` it is wrapped as `{"input": …}`, which OPA's data API expects.
//!
//! Recognised answers (2xx, JSON object, exactly one of these keys):
//! `{"allow": bool}` or `{"allowed": bool}` (Casbin-server style, optional `"reason"`),
//! `{"result": bool}` or `{"result": {"allow": bool, "reason": "…"}}` (OPA style). Other keys
//! are ignored. Anything else is denied 502 `unrecognised answer …`; a non-2xx status 502
//! naming it; a call the bridge could not complete 503 naming the error (fail closed).

use std::env::VarError;

use sandgate_guest::{Decision, Input, Request, http};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The variable holding the decision service's URL.
const URL_VAR: &str = "DECISION_URL";

/// The optional variable choosing the request body: `plain` (the default) or `opa`.
const FORMAT_VAR: &str = "DECISION_FORMAT";

/// The answers this policy understands, for the reason of an unrecognised one.
const EXPECTED: &str = r#"expected {"allow": bool}, {"allowed": bool}, {"result": bool} or {"result": {"allow": bool}}"#;

sandgate_guest::policy!(evaluate);

fn evaluate(input: Input<Query>) -> Decision {
    let settings = match Settings::from_env(|name| std::env::var(name)) {
        Ok(settings) => settings,
        Err(reason) => return Decision::deny().status(500).reason(reason),
    };
    decide(&input.input, &settings)
}

/// Either input shape, told apart by the presence of `request`.
#[derive(Debug, Deserialize)]
struct Query {
    subject: Option<String>,
    object: Option<String>,
    action: Option<String>,
    request: Option<Request>,
}

/// The question sent to the decision service.
#[derive(Debug, PartialEq, Eq, Serialize)]
struct Ask<'q> {
    subject: &'q str,
    object: &'q str,
    action: String,
}

/// The body of OPA's data API: the question as the policy's `input`.
#[derive(Serialize)]
struct OpaInput<'a, 'q> {
    input: &'a Ask<'q>,
}

/// How the question is put in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `{"subject":…,"object":…,"action":…}`.
    Plain,
    /// `{"input":{"subject":…,"object":…,"action":…}}`, for OPA's `POST /v1/data/<path>`.
    Opa,
}

/// What the policy is configured with, from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    url: String,
    format: Format,
}

impl Settings {
    /// Reads the variables through `var` (`std::env::var` in the guest); the error is the deny
    /// reason, naming the variable at fault.
    fn from_env(var: impl Fn(&str) -> Result<String, VarError>) -> Result<Self, String> {
        let url = match var(URL_VAR) {
            Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
            Ok(_) => {
                return Err(format!(
                    "{URL_VAR} is empty: set it to the decision service's URL"
                ));
            }
            Err(VarError::NotPresent) => {
                return Err(format!(
                    "{URL_VAR} is not set: give the policy env = [\"{URL_VAR}\"] and set it, e.g. \"http://127.0.0.1:8282/v1/decide\""
                ));
            }
            Err(VarError::NotUnicode(_)) => return Err(format!("{URL_VAR} is not UTF-8")),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "{URL_VAR}={url:?} is not an http:// or https:// URL"
            ));
        }
        let format = match var(FORMAT_VAR) {
            Err(VarError::NotPresent) => Format::Plain,
            Ok(value) => match value.trim() {
                "plain" => Format::Plain,
                "opa" => Format::Opa,
                other => {
                    return Err(format!(
                        "{FORMAT_VAR}={other:?} is not \"plain\" or \"opa\""
                    ));
                }
            },
            Err(VarError::NotUnicode(_)) => return Err(format!("{FORMAT_VAR} is not UTF-8")),
        };
        Ok(Self { url, format })
    }
}

/// Decides one request; see the crate docs.
fn decide(query: &Query, settings: &Settings) -> Decision {
    let ask = match Ask::from_query(query) {
        Ok(ask) => ask,
        Err(denial) => return denial,
    };
    let verdict = match ask_service(&ask, settings) {
        Ok(verdict) => verdict,
        Err(denial) => return denial,
    };
    if verdict.allow {
        let decision = Decision::allow().header("x-user", ask.subject);
        match verdict.reason {
            Some(reason) => decision.reason(reason),
            None => decision,
        }
    } else {
        let mut reason = format!(
            "decision service denies {} {} {}",
            ask.subject, ask.action, ask.object
        );
        if let Some(why) = verdict.reason {
            reason.push_str(": ");
            reason.push_str(&why);
        }
        Decision::deny().status(403).reason(reason)
    }
}

impl<'q> Ask<'q> {
    /// The question in `query`, or the deny for an incomplete one.
    fn from_query(query: &'q Query) -> Result<Self, Decision> {
        let present = |value: &'q Option<String>| {
            value
                .as_deref()
                .map(str::trim)
                .filter(|value| !value.is_empty())
        };
        if let Some(request) = &query.request {
            let subject = request
                .header("x-user")
                .map(str::trim)
                .filter(|user| !user.is_empty())
                .ok_or_else(|| {
                    Decision::deny().status(403).reason(
                        "forward-auth request has no x-user header (set by the authenticating proxy)",
                    )
                })?;
            if request.method.is_empty() || request.path.is_empty() {
                return Err(Decision::deny()
                    .status(400)
                    .reason("forward-auth request has no method or path"));
            }
            return Ok(Self {
                subject,
                object: &request.path,
                action: request.method.to_ascii_lowercase(),
            });
        }
        match (
            present(&query.subject),
            present(&query.object),
            present(&query.action),
        ) {
            (Some(subject), Some(object), Some(action)) => Ok(Self {
                subject,
                object,
                action: action.to_owned(),
            }),
            _ => Err(Decision::deny().status(400).reason(
                "input needs subject, object and action (non-empty strings), or a forward-auth request",
            )),
        }
    }
}

/// The decision service's verdict.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    allow: bool,
    reason: Option<String>,
}

/// Posts the question and reads the verdict, or returns the 500/502/503 saying why there is
/// none.
fn ask_service(ask: &Ask<'_>, settings: &Settings) -> Result<Verdict, Decision> {
    let request = http::Request::post(&settings.url).header("accept", "application/json");
    let request = match settings.format {
        Format::Plain => request.json(ask),
        Format::Opa => request.json(&OpaInput { input: ask }),
    }
    .map_err(|err| Decision::deny().status(500).reason(err.to_string()))?;
    let response = request.send().map_err(|err| {
        sandgate_guest::warn!("decision service at {} failed: {err}", settings.url);
        Decision::deny()
            .status(503)
            .reason(format!("decision service call failed: {err}"))
    })?;
    if !response.is_success() {
        return Err(Decision::deny().status(502).reason(format!(
            "decision service answered HTTP {}",
            response.status
        )));
    }
    read_answer(&response.body).map_err(|problem| {
        Decision::deny().status(502).reason(format!(
            "unrecognised answer from the decision service: {problem}; {EXPECTED}"
        ))
    })
}

/// The verdict in a 2xx body, or what is wrong with it.
fn read_answer(body: &[u8]) -> Result<Verdict, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|err| format!("the body is not JSON ({err})"))?;
    let Value::Object(answer) = value else {
        return Err(format!("the body is JSON {}, not an object", kind(&value)));
    };
    let keys: Vec<&str> = ["allow", "allowed", "result"]
        .into_iter()
        .filter(|key| answer.contains_key(*key))
        .collect();
    match keys[..] {
        [] if answer.is_empty() => Err(
            "an empty object (OPA answers so when the rule is undefined for the input)".to_owned(),
        ),
        [] => Err("no allow, allowed or result key".to_owned()),
        ["result"] => match &answer["result"] {
            Value::Bool(allow) => Ok(Verdict {
                allow: *allow,
                reason: None,
            }),
            Value::Object(result) => verdict(result, "result.allow"),
            other => Err(format!("result is {}", kind(other))),
        },
        [key] => verdict(&answer, key),
        _ => Err(format!("it has more than one of {}", keys.join(", "))),
    }
}

/// `{"<allow key>": bool, "reason": "…"}`; `name` is the allow key's path for messages.
fn verdict(object: &Map<String, Value>, name: &str) -> Result<Verdict, String> {
    let key = name.rsplit('.').next().unwrap_or(name);
    let allow = match object.get(key) {
        Some(Value::Bool(allow)) => *allow,
        Some(other) => return Err(format!("{name} is {}, not a boolean", kind(other))),
        None => return Err(format!("{name} is missing")),
    };
    let reason = match object.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(reason)) => Some(reason.clone()),
        Some(other) => return Err(format!("reason is {}, not a string", kind(other))),
    };
    Ok(Verdict { allow, reason })
}

/// A JSON value's kind, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use serde_json::json;

    use super::*;

    const URL: &str = "http://127.0.0.1:8282/v1/decide";
    const ALICE_READS: &str = r#"{"subject":"alice","object":"/orders/7","action":"read"}"#;

    fn plain() -> Settings {
        Settings {
            url: URL.to_owned(),
            format: Format::Plain,
        }
    }

    /// Decides `input` with the bridge answering `answer` and returns the decision and the
    /// requests the guest sent.
    fn decide_with(
        input: &str,
        settings: &Settings,
        answer: Result<http::Response, http::Error>,
    ) -> (Value, Vec<http::Request>) {
        let sent = Rc::new(RefCell::new(Vec::new()));
        let log = Rc::clone(&sent);
        let _bridge = http::mock(move |request| {
            log.borrow_mut().push(request.clone());
            answer.clone()
        });
        let query: Query = serde_json::from_str(input).expect("valid query");
        let decision = decide(&query, settings);
        let sent = sent.borrow().clone();
        (serde_json::to_value(decision).expect("serialises"), sent)
    }

    fn answering(body: &str) -> Value {
        decide_with(ALICE_READS, &plain(), Ok(http::Response::new(200, body))).0
    }

    #[test]
    fn json_question_is_posted_as_json() {
        let (_, sent) = decide_with(
            ALICE_READS,
            &plain(),
            Ok(http::Response::new(200, r#"{"allow":true}"#)),
        );
        let [request] = &sent[..] else {
            panic!("one request expected, got {sent:?}");
        };
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, URL);
        assert_eq!(
            request.headers,
            [
                ("accept".to_owned(), "application/json".to_owned()),
                ("content-type".to_owned(), "application/json".to_owned()),
            ]
        );
        let body: Value =
            serde_json::from_slice(request.body.as_deref().unwrap_or_default()).expect("json");
        assert_eq!(
            body,
            json!({"subject": "alice", "object": "/orders/7", "action": "read"})
        );
    }

    #[test]
    fn opa_format_wraps_the_question_in_input() {
        let settings = Settings {
            format: Format::Opa,
            ..plain()
        };
        let (decision, sent) = decide_with(
            ALICE_READS,
            &settings,
            Ok(http::Response::new(200, r#"{"result":{"allow":true}}"#)),
        );
        assert_eq!(decision["allow"], true);
        let body: Value =
            serde_json::from_slice(sent[0].body.as_deref().unwrap_or_default()).expect("json");
        assert_eq!(
            body,
            json!({"input": {"subject": "alice", "object": "/orders/7", "action": "read"}})
        );
    }

    #[test]
    fn forward_auth_maps_user_path_and_lower_cased_method() {
        let (decision, sent) = decide_with(
            r#"{"request":{"method":"DELETE","path":"/orders/7","query":"x=1",
                "headers":{"x-user":"bob","authorization":"Bearer secret"}}}"#,
            &plain(),
            Ok(http::Response::new(200, r#"{"allowed":false}"#)),
        );
        let body: Value =
            serde_json::from_slice(sent[0].body.as_deref().unwrap_or_default()).expect("json");
        assert_eq!(
            body,
            json!({"subject": "bob", "object": "/orders/7", "action": "delete"})
        );
        assert_eq!(
            decision,
            json!({"allow": false, "status": 403, "reason": "decision service denies bob delete /orders/7"})
        );
    }

    #[test]
    fn every_recognised_allow_shape_allows_with_x_user() {
        for body in [
            r#"{"allow":true}"#,
            r#"{"allowed":true}"#,
            r#"{"result":true}"#,
            r#"{"result":{"allow":true}}"#,
            r#"{"decision_id":"d-1","result":{"allow":true,"reason":null}}"#,
        ] {
            assert_eq!(
                answering(body),
                json!({"allow": true, "headers": {"x-user": "alice"}}),
                "{body}"
            );
        }
    }

    #[test]
    fn every_recognised_deny_shape_denies_403() {
        for body in [
            r#"{"allow":false}"#,
            r#"{"allowed":false}"#,
            r#"{"result":false}"#,
            r#"{"result":{"allow":false}}"#,
        ] {
            assert_eq!(
                answering(body),
                json!({"allow": false, "status": 403, "reason": "decision service denies alice read /orders/7"}),
                "{body}"
            );
        }
    }

    #[test]
    fn the_service_reason_is_passed_on() {
        let decision = answering(r#"{"result":{"allow":false,"reason":"orders are frozen"}}"#);
        assert_eq!(
            decision["reason"],
            "decision service denies alice read /orders/7: orders are frozen"
        );
        let decision = answering(r#"{"allow":true,"reason":"owner"}"#);
        assert_eq!(decision["allow"], true);
        assert_eq!(decision["reason"], "owner");
    }

    #[test]
    fn anything_else_is_an_unrecognised_answer_502() {
        for (body, problem) in [
            ("{}", "an empty object"),
            (r#"{"decision":"allow"}"#, "no allow, allowed or result key"),
            (r#"{"allow":"true"}"#, "allow is a string, not a boolean"),
            (r#"{"allowed":1}"#, "allowed is a number, not a boolean"),
            (r#"{"result":{"allowed":true}}"#, "result.allow is missing"),
            (r#"{"result":[true]}"#, "result is an array"),
            (
                r#"{"allow":true,"result":false}"#,
                "more than one of allow, result",
            ),
            (r#"{"allow":true,"reason":7}"#, "reason is a number"),
            ("true", "the body is JSON a boolean, not an object"),
            ("<html>", "the body is not JSON"),
            ("", "the body is not JSON"),
        ] {
            let decision = answering(body);
            assert_eq!(decision["allow"], false, "{body}");
            assert_eq!(decision["status"], 502, "{body}");
            let reason = decision["reason"].as_str().expect("reason");
            assert!(
                reason.starts_with("unrecognised answer from the decision service: ")
                    && reason.contains(problem)
                    && reason.ends_with(EXPECTED),
                "{body}: {reason}"
            );
        }
    }

    #[test]
    fn non_2xx_is_502_naming_the_status() {
        let (decision, _) = decide_with(
            ALICE_READS,
            &plain(),
            Ok(http::Response::new(500, r#"{"allow":true}"#)),
        );
        assert_eq!(
            decision,
            json!({"allow": false, "status": 502, "reason": "decision service answered HTTP 500"})
        );
    }

    #[test]
    fn bridge_errors_fail_closed_with_503_naming_them() {
        for error in [
            http::Error::EgressDenied,
            http::Error::Timeout,
            http::Error::Connection,
            http::Error::ResponseTooLarge,
            http::Error::InvalidRequest,
            http::Error::BudgetExhausted,
            http::Error::MalformedResponse("bad".into()),
        ] {
            let expected = format!("decision service call failed: {error}");
            let (decision, _) = decide_with(ALICE_READS, &plain(), Err(error));
            assert_eq!(
                decision,
                json!({"allow": false, "status": 503, "reason": expected})
            );
        }
        let (decision, _) = decide_with(ALICE_READS, &plain(), Err(http::Error::Timeout));
        assert_eq!(
            decision["reason"],
            "decision service call failed: http call timed out"
        );
    }

    #[test]
    fn incomplete_questions_are_denied_without_a_call() {
        for (input, status, expected) in [
            (
                r#"{"subject":"alice","action":"read"}"#,
                400,
                "input needs subject",
            ),
            (
                r#"{"subject":" ","object":"/o","action":"read"}"#,
                400,
                "input needs subject",
            ),
            (
                r#"{"request":{"method":"GET","path":"/orders"}}"#,
                403,
                "no x-user header",
            ),
            (
                r#"{"request":{"path":"/orders","headers":{"x-user":"a"}}}"#,
                400,
                "no method or path",
            ),
        ] {
            let (decision, sent) = decide_with(
                input,
                &plain(),
                Ok(http::Response::new(200, r#"{"allow":true}"#)),
            );
            assert_eq!(decision["allow"], false, "{input}");
            assert_eq!(decision["status"], status, "{input}");
            let reason = decision["reason"].as_str().expect("reason");
            assert!(reason.contains(expected), "{reason}");
            assert!(sent.is_empty(), "{input}");
        }
    }

    #[test]
    fn settings_name_the_variable_at_fault() {
        let env = |url: Option<&str>, format: Option<&str>| {
            let (url, format) = (url.map(String::from), format.map(String::from));
            Settings::from_env(move |name| {
                match name {
                    URL_VAR => url.clone(),
                    FORMAT_VAR => format.clone(),
                    _ => None,
                }
                .ok_or(VarError::NotPresent)
            })
        };
        assert_eq!(env(Some(URL), None), Ok(plain()));
        assert_eq!(
            env(Some(URL), Some("opa")).map(|settings| settings.format),
            Ok(Format::Opa)
        );
        for (url, format, expected) in [
            (None, None, "DECISION_URL is not set"),
            (Some(""), None, "DECISION_URL is empty"),
            (Some("file:///x"), None, "DECISION_URL=\"file:///x\" is not"),
            (
                Some(URL),
                Some("casbin"),
                "DECISION_FORMAT=\"casbin\" is not",
            ),
        ] {
            let reason = env(url, format).expect_err(expected);
            assert!(reason.starts_with(expected), "{reason}");
        }
    }

    #[test]
    fn shipped_samples_ask_about_alice_and_order_7() {
        for (sample, action) in [
            (include_str!("../input.json"), "read"),
            (include_str!("../forward-auth-input.json"), "get"),
        ] {
            let query: Query = serde_json::from_str(sample).expect("sample parses");
            let ask = Ask::from_query(&query).expect("complete sample");
            assert_eq!(
                ask,
                Ask {
                    subject: "alice",
                    object: "/orders/7",
                    action: action.into()
                }
            );
        }
    }

    #[test]
    fn input_of_the_wrong_type_is_denied_by_the_sdk() {
        let output = sandgate_evaluate_document(br#"{"input":{"subject":7}}"#);
        let decision: Value = serde_json::from_slice(&output).expect("json");
        assert_eq!(decision["allow"], false);
        let reason = decision["reason"].as_str().expect("reason");
        assert!(reason.starts_with("invalid input"), "{reason}");
    }
}
