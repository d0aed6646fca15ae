//! The Cedar guest built into sandgate (`engine = "cedar"`): a policy's `.cedar` policies,
//! `.json` entities and optional `.cedarschema` are parsed and validated once, at
//! `sandgate_init`, from the read-only preopens the host mounts for its `files`; every
//! evaluation starts from that state (the snapshot) and answers one request with
//! cedar-policy's authorizer.
//!
//! The host describes the files in `SANDGATE_CEDAR_FILES` (one line per configured entry,
//! `<path in the sandbox>\t<path as the config wrote it>`) and, when the policy sets
//! `principal_header`, names that header in `SANDGATE_CEDAR_PRINCIPAL_HEADER`. Load errors
//! name the file as the config wrote it, with the line and column.
//!
//! The request is the input's `principal`, `action`, `resource` and `context` (DESIGN §2b); an
//! HTTP request (forward-auth, ext_authz) maps as [`http_request`] says. The decision carries
//! the determining policy ids and the evaluation errors in its reason and in the obligations
//! [`POLICIES`] and [`ERRORS`].

use std::fmt::Write as _;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, EntityUid, PolicyId, PolicySet,
    Request, Schema, ValidationMode, Validator,
};
use sandgate_guest::files::File;
use sandgate_guest::{Decision, Input};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// The variable listing the policy's files.
pub const FILES_VAR: &str = "SANDGATE_CEDAR_FILES";
/// The variable naming the header whose value is the principal of an HTTP request.
pub const PRINCIPAL_HEADER_VAR: &str = "SANDGATE_CEDAR_PRINCIPAL_HEADER";
/// The obligation listing the determining policy ids, sorted.
pub const POLICIES: &str = "sandgate.cedar.policies";
/// The obligation listing the evaluation errors, sorted.
pub const ERRORS: &str = "sandgate.cedar.errors";
/// The `context.query` that asks for the loaded policy ids (`sandgate check`).
pub const DESCRIBE: &str = "sandgate.cedar.describe";
/// The entity type of an HTTP request's principal.
pub const USER_TYPE: &str = "User";
/// The principal of an HTTP request without the principal header.
pub const ANONYMOUS: &str = r#"Anonymous::"anonymous""#;

/// The loaded policy: policies, entities and schema, parsed and validated.
pub struct Loaded {
    policies: PolicySet,
    entities: Entities,
    schema: Option<Schema>,
    principal_header: Option<String>,
    /// The policy ids in the order of the files.
    ids: Vec<String>,
}

/// Every evaluation allocates by a pointer bump in one region (the SDK's `DecisionArena`): a
/// decision dirties one contiguous run of pages and frees nothing but its most recent block.
#[global_allocator]
static ALLOCATOR: sandgate_guest::DecisionArena = sandgate_guest::DecisionArena::new();

sandgate_guest::__policy_exports!();

/// ABI v1 export: reads and validates the policy's files once, when the policy loads.
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub extern "C" fn sandgate_init() -> i32 {
    sandgate_guest::__private::init(&STATE, load)
}

static STATE: sandgate_guest::__private::State = sandgate_guest::__private::State::new();

/// Evaluates one ABI v1 input document, as the `sandgate_evaluate` export does.
pub fn sandgate_evaluate_document(document: &[u8]) -> Vec<u8> {
    sandgate_guest::__private::evaluate_with_state(
        &STATE,
        load,
        document,
        |_: Input<IgnoredAny>, loaded: &Loaded| evaluate(document, loaded),
    )
}

/// One configured file, read.
struct Source {
    shown: String,
    text: String,
}

/// The policy's files by kind, in the order the config lists them.
#[derive(Default)]
struct Sources {
    policies: Vec<Source>,
    entities: Vec<Source>,
    schemas: Vec<(Source, bool)>,
}

fn load() -> Result<Loaded, String> {
    // cedar-policy keeps std `HashMap`s, whose keys std draws once per thread
    // from `random_get`. Draw them now, while the host answers it (init of a
    // built-in guest only), so that no evaluation ever asks.
    let _seeded = std::collections::hash_map::RandomState::new();
    let files = std::env::var(FILES_VAR).map_err(|_| {
        format!("{FILES_VAR} is not set: this guest runs only as sandgate's engine = \"cedar\"")
    })?;
    let principal_header = std::env::var(PRINCIPAL_HEADER_VAR)
        .ok()
        .map(|h| h.to_ascii_lowercase());
    let mut sources = Sources::default();
    sandgate_guest::files::walk_listing(&files, |file| add_file(&mut sources, file))?;
    let schema = match sources.schemas.as_slice() {
        [] => None,
        [(source, json)] => Some(parse_schema(source, *json)?),
        [(first, _), (second, _), ..] => {
            return Err(format!(
                "{}: a second schema (the first is {}); give one .cedarschema",
                second.shown, first.shown
            ));
        }
    };
    if sources.policies.is_empty() {
        return Err("the policy's files hold no .cedar policy file".to_owned());
    }
    let (policies, ids) = parse_policies(&sources.policies)?;
    if let Some(schema) = &schema {
        validate(&policies, schema, &sources.policies)?;
    }
    let mut entities = match &schema {
        Some(schema) => schema
            .action_entities()
            .map_err(|e| format!("the schema's actions: {}", chain(&e)))?,
        None => Entities::empty(),
    };
    for source in &sources.entities {
        let more = Entities::from_json_str(&source.text, schema.as_ref())
            .map_err(|e| format!("{}: {}", source.shown, chain(&e)))?;
        entities = entities
            .add_entities(more, schema.as_ref())
            .map_err(|e| format!("{}: {}", source.shown, chain(&e)))?;
    }
    Ok(Loaded {
        policies,
        entities,
        schema,
        principal_header,
        ids,
    })
}

/// Adds one file of the policy's `files` (a listed directory's are walked in name order) by its
/// kind: `.cedar` policies, `.json` entities, a `.cedarschema` (or `.cedarschema.json`) schema.
fn add_file(sources: &mut Sources, file: &File) -> Result<(), String> {
    let name = file.name();
    let read = || {
        file.read().map(|text| Source {
            shown: file.shown.to_owned(),
            text,
        })
    };
    if name.ends_with(".cedarschema.json") {
        sources.schemas.push((read()?, true));
    } else if name.ends_with(".cedarschema") {
        sources.schemas.push((read()?, false));
    } else if name.ends_with(".cedar") {
        sources.policies.push(read()?);
    } else if name.ends_with(".json") {
        sources.entities.push(read()?);
    } else if file.listed {
        return Err(format!(
            "{}: not a .cedar policy file, a .json entities file nor a .cedarschema",
            file.shown
        ));
    }
    // Other files in a listed directory (a README, tests' fixtures) are not policy.
    Ok(())
}

fn parse_schema(source: &Source, json: bool) -> Result<Schema, String> {
    if json {
        return Schema::from_json_str(&source.text)
            .map_err(|e| located(&source.shown, &source.text, &e));
    }
    // Warnings (a shadowed type name) do not refuse the load.
    Schema::from_cedarschema_str(&source.text)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| located(&source.shown, &source.text, &e))
}

/// Parses every policy file: each alone first, so that a syntax error names its file and line,
/// then all as one policy set, so that the ids are `policy0`, `policy1`, … in file order, as
/// cedar-policy gives them to one text. A policy annotated `@id("…")` takes that id. Also
/// returns the ids in file order.
fn parse_policies(files: &[Source]) -> Result<(PolicySet, Vec<String>), String> {
    for source in files {
        PolicySet::from_str(&source.text).map_err(|e| located(&source.shown, &source.text, &e))?;
    }
    let joined = joined(files);
    let parsed = PolicySet::from_str(&joined).map_err(|e| chain(&e))?;
    if let Some(template) = parsed.templates().next() {
        return Err(format!(
            "{}: templates (policies with ?principal or ?resource slots) are not supported",
            template.id()
        ));
    }
    let mut renamed = PolicySet::new();
    let mut ordered: Vec<_> = parsed.policies().collect();
    ordered.sort_by_key(|p| {
        p.id()
            .to_string()
            .strip_prefix("policy")
            .and_then(|n| n.parse::<usize>().ok())
    });
    let mut order = Vec::with_capacity(ordered.len());
    for policy in ordered {
        let policy = match policy.annotation("id") {
            Some(id) => policy.new_id(PolicyId::new(id)),
            None => policy.clone(),
        };
        let id = policy.id().clone();
        renamed
            .add(policy)
            .map_err(|e| format!("policy id `{id}`: {}", chain(&e)))?;
        order.push(id.to_string());
    }
    Ok((renamed, order))
}

/// The policy files as one text, each on its own lines.
fn joined(files: &[Source]) -> String {
    let mut joined = String::new();
    for source in files {
        joined.push_str(&source.text);
        joined.push('\n');
    }
    joined
}

/// Checks the policies against the schema (strict mode, as the Cedar CLI's `validate`); any
/// error refuses the load with the validator's messages, each at its file and line.
fn validate(policies: &PolicySet, schema: &Schema, files: &[Source]) -> Result<(), String> {
    let result = Validator::new(schema.clone()).validate(policies, ValidationMode::Strict);
    if result.validation_passed() {
        return Ok(());
    }
    let joined = joined(files);
    let messages: Vec<String> = result
        .validation_errors()
        .map(|e| {
            let (shown, text, offset) = match first_offset(e) {
                Some(offset) => locate_in_files(files, offset),
                None => ("the policies", joined.as_str(), None),
            };
            let mut message = match offset {
                Some(offset) => format!("{shown}:{}: ", line_col(text, offset)),
                None => format!("{shown}: "),
            };
            // The validator's message names the policy (`for policy `…`, …`).
            message.push_str(&chain(e));
            message
        })
        .collect();
    Err(format!(
        "the policies do not validate against the schema: {}",
        messages.join("; ")
    ))
}

/// The file holding byte `offset` of the joined policy text, and the offset within it.
fn locate_in_files(files: &[Source], offset: usize) -> (&str, &str, Option<usize>) {
    let mut start = 0;
    for source in files {
        let end = start + source.text.len() + 1;
        if offset < end {
            return (&source.shown, &source.text, Some(offset - start));
        }
        start = end;
    }
    ("the policies", "", None)
}

fn first_offset(diagnostic: &dyn miette::Diagnostic) -> Option<usize> {
    diagnostic.labels()?.next().map(|l| l.offset())
}

/// `line:column` (both from 1) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{line}:{column}")
}

/// A diagnostic as one line: `file:line:column: message`, where the error
/// points into the file; then its help when it has some.
fn located(shown: &str, text: &str, diagnostic: &dyn miette::Diagnostic) -> String {
    let mut message = match first_offset(diagnostic) {
        Some(offset) => format!("{shown}:{}: {}", line_col(text, offset), chain(diagnostic)),
        None => format!("{shown}: {}", chain(diagnostic)),
    };
    if let Some(help) = diagnostic.help() {
        let _ = write!(message, " ({help})");
    }
    message
}

/// An error and its causes on one line; cedar-policy's parse errors hold
/// several, one per related diagnostic.
fn chain(error: &dyn miette::Diagnostic) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            let _ = write!(message, ": {text}");
        }
        source = cause.source();
    }
    if let Some(related) = error.related() {
        for other in related {
            let text = other.to_string();
            if !message.contains(&text) {
                let _ = write!(message, "; {text}");
            }
        }
    }
    message.replace('\n', " ")
}

/// The request's parts as the input gives them.
#[derive(Deserialize)]
struct Parts {
    principal: Value,
    action: Value,
    resource: Value,
    #[serde(default)]
    context: Option<Value>,
}

/// The parts of the input document this guest reads: the caller's input, and the query the
/// host may name in the context.
#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    input: Value,
    #[serde(default)]
    context: QueryContext,
}

#[derive(Default, Deserialize)]
struct QueryContext {
    query: Option<String>,
}

fn evaluate(document: &[u8], loaded: &Loaded) -> Decision {
    let document: Document = match serde_json::from_slice(document) {
        Ok(d) => d,
        Err(e) => return Decision::deny().reason(format!("invalid input: {e}")),
    };
    if document.context.query.as_deref() == Some(DESCRIBE) {
        return Decision::deny()
            .reason("the policy ids")
            .obligation(POLICIES, loaded.ids.clone());
    }
    let request = match request(&document.input, loaded) {
        Ok(request) => request,
        Err(message) => return Decision::deny().reason(format!("invalid input: {message}")),
    };
    let authorizer = Authorizer::new();
    let response = authorizer.is_authorized(&request, &loaded.policies, &loaded.entities);
    let mut policies: Vec<String> = response
        .diagnostics()
        .reason()
        .map(ToString::to_string)
        .collect();
    policies.sort();
    let mut errors: Vec<String> = response.diagnostics().errors().map(|e| chain(e)).collect();
    errors.sort();
    let allow = response.decision() == CedarDecision::Allow;
    let mut reason = match (allow, policies.is_empty()) {
        (_, false) => format!(
            "{} by {}",
            if allow { "permitted" } else { "forbidden" },
            policies.join(", ")
        ),
        (_, true) => "no permit policy applies".to_owned(),
    };
    if !errors.is_empty() {
        let _ = write!(reason, "; errors: {}", errors.join("; "));
    }
    let decision = if allow {
        Decision::allow()
    } else {
        Decision::deny()
    };
    decision
        .reason(reason)
        .obligation(POLICIES, policies)
        .obligation(ERRORS, errors)
}

/// The Cedar request for an input: its `principal`, `action`, `resource` and `context`, or an
/// HTTP request (`{"request": …}`, forward-auth and ext_authz) mapped by [`http_request`].
fn request(input: &Value, loaded: &Loaded) -> Result<Request, String> {
    let parts = match input.get("request") {
        Some(http) if input.get("principal").is_none() => http_request(http, loaded)?,
        _ => Parts::deserialize(input).map_err(|e| {
            format!(
                "{e}; a Cedar request has `principal`, `action`, `resource` and optional `context`"
            )
        })?,
    };
    let principal = uid("principal", &parts.principal)?;
    let action = uid("action", &parts.action)?;
    let resource = uid("resource", &parts.resource)?;
    let context = match parts.context {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(context @ Value::Object(_)) => context,
        Some(_) => return Err("`context` is not an object".to_owned()),
    };
    let context = Context::from_json_value(context, loaded.schema.as_ref().map(|s| (s, &action)))
        .map_err(|e| format!("context: {}", chain(&e)))?;
    Request::new(principal, action, resource, context, loaded.schema.as_ref())
        .map_err(|e| format!("the request does not match the schema: {}", chain(&e)))
}

/// An entity UID: `Type::"id"`, or `{"type": …, "id": …}`.
fn uid(part: &str, value: &Value) -> Result<EntityUid, String> {
    match value {
        Value::String(text) => EntityUid::from_str(text).map_err(|e| {
            format!(
                "`{part}` is not an entity like User::\"alice\": {}",
                chain(&e)
            )
        }),
        Value::Object(_) => {
            EntityUid::from_json(value.clone()).map_err(|e| format!("`{part}`: {e}"))
        }
        _ => Err(format!(
            "`{part}` is neither an entity string like User::\"alice\" nor {{\"type\", \"id\"}}"
        )),
    }
}

/// An HTTP request as a Cedar request (docs/config.md): the principal is
/// `User::"<value of the principal header>"` when the policy names a header
/// and the request has it, otherwise `Anonymous::"anonymous"`; the action is
/// `Action::"<METHOD>"`; the resource `Path::"<path>"`; the context is the request itself
/// (`method`, `path`, `query`, `host`, `headers`, `source`).
fn http_request(http: &Value, loaded: &Loaded) -> Result<Parts, String> {
    let text = |name: &str| http.get(name).and_then(Value::as_str).unwrap_or_default();
    let method = text("method");
    if method.is_empty() {
        return Err("the HTTP request has no method".to_owned());
    }
    let principal = loaded
        .principal_header
        .as_deref()
        .and_then(|h| http.get("headers")?.get(h)?.as_str())
        .filter(|v| !v.is_empty())
        .map(|v| serde_json::json!({"type": USER_TYPE, "id": v}))
        .unwrap_or_else(|| Value::String(ANONYMOUS.to_owned()));
    Ok(Parts {
        principal,
        action: serde_json::json!({"type": "Action", "id": method}),
        resource: serde_json::json!({"type": "Path", "id": text("path")}),
        context: Some(http.clone()),
    })
}
