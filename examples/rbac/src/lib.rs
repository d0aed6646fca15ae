//! Example guest: role-based access control. A role table maps each role to the actions it may
//! perform on each resource type; the subject is allowed when one of its roles grants the action
//! on the resource type.
//!
//! The table is read from `/data/roles.json` (a read-only preopen) and parsed once, by
//! `sandgate_init` when the policy loads: every evaluation starts from the snapshot holding the
//! parsed table and touches no file. Editing the file is a reload (the daemon watches the
//! preopens of a policy with init), which parses it again. When it cannot be read or parsed, the
//! load is refused with a reason saying so, and the previous table keeps serving.
//!
//! Two input shapes are accepted:
//! - JSON API: `{"subject":{"id":"alice","roles":["viewer"]},"action":"read","resource":{"type":"orders","id":"7"}}`
//! - forward-auth / ext_authz: `{"request":{...}}`. The action comes from the method (GET/HEAD
//!   read, POST create, PUT/PATCH update, DELETE delete), the resource type from the path
//!   `/api/<type>/...`, the subject from header `x-user` and its roles from `x-roles`
//!   (comma-separated). Those headers are trusted as they are: put this policy behind an
//!   authenticating proxy that sets them and strips any the client sent.
//!
//! This module is benchmarked, so input and table borrow their strings from the JSON documents
//! instead of copying them.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _};

use sandgate_guest::{Decision, Input, Request};
use serde::Deserialize;

/// The role table, inside the `/data` preopen.
const ROLE_TABLE: &str = "/data/roles.json";

/// Matches any resource type (as a key) or any action (as a list entry).
const WILDCARD: &str = "*";

// No `DecisionArena`: a decision allocates under 1 KiB, which the system allocator places in
// a hole or two of the small heap init left; the arena's region would only add to the memory
// the host resets after each instance (measured about 4% slower per decision).
sandgate_guest::policy!(evaluate, init = load);

/// Reads and parses the role table, once, at load. Its bytes are kept for the life of the
/// instance (the table borrows its strings from them).
fn load() -> Result<RoleTable<'static>, String> {
    let bytes = read_role_table()
        .map_err(|err| format!("role table {ROLE_TABLE} could not be read: {err}"))?;
    let bytes: &'static [u8] = Vec::leak(bytes);
    serde_json::from_slice(bytes)
        .map_err(|err| format!("role table {ROLE_TABLE} is invalid: {err}"))
}

/// Decides one request; see the crate docs.
fn evaluate(input: Input<Query<'_>>, table: &RoleTable<'static>) -> Decision {
    match Ask::from_query(&input.input) {
        Ok(ask) => decide(&ask, table),
        Err(reason) => Decision::deny().status(403).reason(reason),
    }
}

/// The role table's bytes. One `fd_read` of the size from the metadata: `fs::read` would make a
/// second read to find the end, and each WASI file call costs more than parsing the table.
/// Replace the file atomically (write, then rename): a table changed mid-read refuses the reload
/// unless what was read still parses.
fn read_role_table() -> io::Result<Vec<u8>> {
    let mut file = File::open(ROLE_TABLE)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    let mut table = vec![0; len];
    file.read_exact(&mut table)?;
    Ok(table)
}

/// Either input shape, told apart by which fields are present (one parse, no buffering).
#[derive(Debug, Deserialize)]
struct Query<'a> {
    #[serde(borrow)]
    subject: Option<Subject<'a>>,
    #[serde(borrow)]
    action: Option<Name<'a>>,
    #[serde(borrow)]
    resource: Option<Resource<'a>>,
    request: Option<Request>,
}

#[derive(Debug, Deserialize)]
struct Subject<'a> {
    #[serde(borrow)]
    id: Name<'a>,
    #[serde(borrow, default)]
    roles: Vec<Name<'a>>,
}

#[derive(Debug, Deserialize)]
struct Resource<'a> {
    #[serde(borrow, rename = "type")]
    kind: Name<'a>,
}

/// A JSON string, borrowed from the document unless it contains escapes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(transparent)]
struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

impl Borrow<str> for Name<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// `{"roles": {role: {resource type: [action, ...]}}}`.
#[derive(Debug, Deserialize)]
struct RoleTable<'a> {
    #[serde(borrow)]
    roles: BTreeMap<Name<'a>, BTreeMap<Name<'a>, Vec<Name<'a>>>>,
}

/// The question, whichever shape it came in.
#[derive(Debug, PartialEq, Eq)]
struct Ask<'q> {
    subject: &'q str,
    roles: Vec<&'q str>,
    action: &'q str,
    resource: &'q str,
}

impl<'q> Ask<'q> {
    fn from_query(query: &'q Query<'_>) -> Result<Self, String> {
        if let Some(request) = &query.request {
            return Self::from_request(request);
        }
        match (&query.subject, &query.action, &query.resource) {
            (Some(subject), Some(action), Some(resource)) => Ok(Self {
                subject: &subject.id.0,
                roles: subject.roles.iter().map(|role| &*role.0).collect(),
                action: &action.0,
                resource: &resource.kind.0,
            }),
            _ => Err(
                "input needs subject.id, action and resource.type, or a forward-auth request"
                    .to_owned(),
            ),
        }
    }

    fn from_request(request: &'q Request) -> Result<Self, String> {
        let subject = request
            .header("x-user")
            .map(str::trim)
            .filter(|user| !user.is_empty())
            .ok_or("forward-auth request has no x-user header (set by the authenticating proxy)")?;
        let action = action_of(&request.method)
            .ok_or_else(|| format!("method {:?} maps to no action", request.method))?;
        let mut segments = request.path_segments();
        let resource = match (segments.next(), segments.next()) {
            (Some("api"), Some(kind)) => kind,
            _ => return Err(format!("path {:?} is not /api/<type>/...", request.path)),
        };
        let roles = request
            .header("x-roles")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|role| !role.is_empty())
            .collect();
        Ok(Self {
            subject,
            roles,
            action,
            resource,
        })
    }
}

/// The action a forward-auth method stands for.
fn action_of(method: &str) -> Option<&'static str> {
    const ACTIONS: [(&str, &str); 6] = [
        ("GET", "read"),
        ("HEAD", "read"),
        ("POST", "create"),
        ("PUT", "update"),
        ("PATCH", "update"),
        ("DELETE", "delete"),
    ];
    ACTIONS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(method))
        .map(|&(_, action)| action)
}

/// Allows when one of the subject's roles grants the action on the resource type.
fn decide(ask: &Ask<'_>, table: &RoleTable<'_>) -> Decision {
    if table.grants(ask) {
        Decision::allow()
            .header("x-user", ask.subject)
            .header("x-roles", ask.roles.join(","))
    } else {
        Decision::deny().status(403).reason(format!(
            "{} may not {} {}: no role in [{}] grants it",
            ask.subject,
            ask.action,
            ask.resource,
            ask.roles.join(", ")
        ))
    }
}

impl RoleTable<'_> {
    fn grants(&self, ask: &Ask<'_>) -> bool {
        ask.roles.iter().any(|role| {
            let Some(by_type) = self.roles.get(*role) else {
                return false;
            };
            [ask.resource, WILDCARD]
                .into_iter()
                .filter_map(|kind| by_type.get(kind))
                .flatten()
                .any(|action| action.0 == ask.action || action.0 == WILDCARD)
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const SHIPPED_TABLE: &str = include_str!("../data/roles.json");

    fn query(input: &str) -> Query<'_> {
        serde_json::from_str(input).expect("valid query")
    }

    fn decide_with(table: &str, input: &str) -> Value {
        let table: RoleTable<'_> = serde_json::from_str(table).expect("valid table");
        let query = query(input);
        let decision = match Ask::from_query(&query) {
            Ok(ask) => decide(&ask, &table),
            Err(reason) => Decision::deny().status(403).reason(reason),
        };
        serde_json::to_value(decision).expect("serialises")
    }

    #[test]
    fn viewer_may_read_orders() {
        let decision = decide_with(
            SHIPPED_TABLE,
            r#"{"subject":{"id":"alice","roles":["viewer"]},"action":"read","resource":{"type":"orders","id":"7"}}"#,
        );
        assert_eq!(
            decision,
            json!({"allow": true, "headers": {"x-user": "alice", "x-roles": "viewer"}})
        );
    }

    #[test]
    fn viewer_may_not_create_orders_and_the_reason_names_who_what_and_where() {
        let decision = decide_with(
            SHIPPED_TABLE,
            r#"{"subject":{"id":"alice","roles":["viewer","guest"]},"action":"create","resource":{"type":"orders"}}"#,
        );
        assert_eq!(
            decision,
            json!({
                "allow": false,
                "status": 403,
                "reason": "alice may not create orders: no role in [viewer, guest] grants it"
            })
        );
    }

    #[test]
    fn wildcards_grant_any_type_and_action() {
        let table = r#"{"roles":{"admin":{"*":["*"]},"auditor":{"*":["read"]}}}"#;
        let admin = r#"{"subject":{"id":"root","roles":["admin"]},"action":"delete","resource":{"type":"anything"}}"#;
        assert_eq!(decide_with(table, admin)["allow"], true);
        let auditor = r#"{"subject":{"id":"au","roles":["auditor"]},"action":"read","resource":{"type":"invoices"}}"#;
        assert_eq!(decide_with(table, auditor)["allow"], true);
        let auditor_writes = auditor.replace(r#""read""#, r#""update""#);
        assert_eq!(decide_with(table, &auditor_writes)["allow"], false);
    }

    #[test]
    fn subject_without_roles_is_denied() {
        let decision = decide_with(
            SHIPPED_TABLE,
            r#"{"subject":{"id":"nobody"},"action":"read","resource":{"type":"orders"}}"#,
        );
        assert_eq!(decision["allow"], false);
    }

    #[test]
    fn escaped_strings_are_read_too() {
        let decision = decide_with(
            r#"{"roles":{"vi\u0065wer":{"orders":["read"]}}}"#,
            r#"{"subject":{"id":"o\"brien","roles":["viewer"]},"action":"read","resource":{"type":"orders"}}"#,
        );
        assert_eq!(decision["headers"]["x-user"], "o\"brien");
    }

    #[test]
    fn forward_auth_maps_method_path_and_headers() {
        let query = query(
            r#"{"request":{"method":"PATCH","path":"/api/orders/7","query":"",
                "headers":{"x-user":"bob","x-roles":"viewer, editor,"}}}"#,
        );
        let ask = Ask::from_query(&query).expect("valid");
        assert_eq!(
            ask,
            Ask {
                subject: "bob",
                roles: vec!["viewer", "editor"],
                action: "update",
                resource: "orders"
            }
        );
    }

    #[test]
    fn every_method_maps_to_its_action() {
        for (method, action) in [
            ("GET", Some("read")),
            ("head", Some("read")),
            ("POST", Some("create")),
            ("PUT", Some("update")),
            ("PATCH", Some("update")),
            ("DELETE", Some("delete")),
            ("OPTIONS", None),
            ("", None),
        ] {
            assert_eq!(action_of(method), action, "{method}");
        }
    }

    #[test]
    fn forward_auth_without_user_method_or_api_path_is_denied() {
        let cases = [
            (
                r#"{"request":{"method":"GET","path":"/api/orders"}}"#,
                "no x-user header",
            ),
            (
                r#"{"request":{"method":"TRACE","path":"/api/orders","headers":{"x-user":"a"}}}"#,
                "method \"TRACE\" maps to no action",
            ),
            (
                r#"{"request":{"method":"GET","path":"/static/app.js","headers":{"x-user":"a"}}}"#,
                "is not /api/<type>/",
            ),
            (
                r#"{"request":{"method":"GET","path":"/api","headers":{"x-user":"a"}}}"#,
                "is not /api/<type>/",
            ),
        ];
        for (input, expected) in cases {
            let query = query(input);
            let reason = Ask::from_query(&query).expect_err(input);
            assert!(reason.contains(expected), "{reason}");
        }
    }

    #[test]
    fn incomplete_api_input_is_denied() {
        let reason = Ask::from_query(&query(r#"{"subject":{"id":"a"},"action":"read"}"#))
            .expect_err("no resource");
        assert!(reason.contains("resource.type"), "{reason}");
    }

    #[test]
    fn unreadable_role_table_fails_closed() {
        // Host builds have no /data preopen, so the table is missing here.
        let output = sandgate_evaluate_document(
            br#"{"input":{"subject":{"id":"alice","roles":["admin"]},"action":"read","resource":{"type":"orders"}}}"#,
        );
        let decision: Value = serde_json::from_slice(&output).expect("json");
        assert_eq!(decision["allow"], false);
        assert_eq!(decision["status"], 500);
        let reason = decision["reason"].as_str().expect("reason");
        assert!(
            reason.starts_with("init failed: role table /data/roles.json could not be read"),
            "{reason}"
        );
    }

    #[test]
    fn input_of_the_wrong_type_is_denied_by_the_sdk() {
        let output = sandgate_evaluate_document(br#"{"input":{"action":7}}"#);
        let decision: Value = serde_json::from_slice(&output).expect("json");
        assert_eq!(decision["allow"], false);
        assert!(
            decision["reason"]
                .as_str()
                .expect("reason")
                .starts_with("invalid input")
        );
    }

    #[test]
    fn shipped_samples_parse() {
        for sample in [
            include_str!("../input.json"),
            include_str!("../forward-auth-input.json"),
        ] {
            // The samples are the caller's input; the host wraps them in {"input": …}.
            let query = query(sample);
            let table: RoleTable<'_> = serde_json::from_str(SHIPPED_TABLE).expect("table");
            let ask = Ask::from_query(&query).expect("complete sample");
            assert!(decide(&ask, &table).allow, "{sample}");
        }
    }
}
