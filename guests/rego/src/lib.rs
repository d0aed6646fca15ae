//! The Rego guest built into sandgate (`engine = "rego"`): a policy's `.rego` modules and data
//! files are parsed once, at `sandgate_init`, from the read-only preopens the host mounts for
//! its `files`; every evaluation starts from that parsed engine (the snapshot), sets the input
//! and evaluates one query with regorus.
//!
//! The host describes the files in two environment variables it composes itself (no variable
//! of the daemon's own environment is passed): `SANDGATE_REGO_FILES`, one line per configured
//! entry, `<path in the sandbox>\t<path as the config wrote it>`, and `SANDGATE_REGO_ENTRYPOINT`.
//! Errors name the file as the config wrote it, with regorus's line and column.
//!
//! The entrypoint's value becomes the decision as DESIGN §2b says ([`decide`]). When the host
//! asks for another document (`POST /v1/data/{path}` passes `context.query`), the decision
//! carries the query's value in the obligation [`RESULT`] (absent when undefined).

use std::sync::Mutex;

use regorus::{Engine, Value};
use sandgate_guest::files::File;
use sandgate_guest::{Decision, Input};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The variable listing the policy's files.
pub const FILES_VAR: &str = "SANDGATE_REGO_FILES";
/// The variable naming the entrypoint, e.g. `data.httpapi.authz`.
pub const ENTRYPOINT_VAR: &str = "SANDGATE_REGO_ENTRYPOINT";
/// The obligation carrying the value of `context.query` for the Data API.
pub const RESULT: &str = "sandgate.rego.result";
/// The obligation carrying the engine's error for a Data API query.
pub const ERROR: &str = "sandgate.rego.error";

/// The parsed policy: regorus needs `&mut` to evaluate, and a guest has one thread, so the
/// mutex is never contended.
pub struct Loaded {
    engine: Mutex<Engine>,
    entrypoint: String,
}

/// Every evaluation allocates by a pointer bump in one region (the SDK's `DecisionArena`): a
/// decision dirties one contiguous run of pages and frees nothing but its most recent block.
/// Rego evaluation makes many short-lived values, so the region is larger than the default.
#[global_allocator]
static ALLOCATOR: sandgate_guest::DecisionArena<{ 1 << 20 }> = sandgate_guest::DecisionArena::new();

sandgate_guest::__policy_exports!();

/// ABI v1 export: parses the policy's files once, when the policy loads.
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

/// The parts of the input document this guest reads: the caller's input as written, and the
/// query the host may name in the context.
#[derive(Deserialize)]
struct Document<'a> {
    #[serde(borrow)]
    input: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    context: QueryContext,
}

#[derive(Default, Deserialize)]
struct QueryContext {
    query: Option<String>,
}

fn load() -> Result<Loaded, String> {
    let files = std::env::var(FILES_VAR).map_err(|_| {
        format!("{FILES_VAR} is not set: this guest runs only as sandgate's engine = \"rego\"")
    })?;
    let entrypoint =
        std::env::var(ENTRYPOINT_VAR).map_err(|_| format!("{ENTRYPOINT_VAR} is not set"))?;
    let mut engine = Engine::new();
    engine.set_gather_prints(true);
    sandgate_guest::files::walk_listing(&files, |file| add_file(&mut engine, file))?;
    let packages = engine.get_packages().map_err(|e| e.to_string())?;
    if packages.is_empty() {
        return Err("the policy's files hold no .rego module".to_owned());
    }
    let entry_package = entrypoint.rsplit_once('.').map_or("", |(p, _)| p);
    if !packages
        .iter()
        .any(|p| p == &entrypoint || p == entry_package || p.starts_with(&format!("{entrypoint}.")))
    {
        return Err(format!(
            "entrypoint {entrypoint} is in none of the packages the files define ({})",
            packages.join(", ")
        ));
    }
    // Prepare the engine now, as an embedder's long-lived engine is: rule
    // analysis and scheduling, imports, loop hoisting. They depend on the
    // files only, so the snapshot keeps their result and no decision repeats
    // them; a policy regorus cannot schedule is refused at load. The query
    // evaluates no rule, so nothing is printed.
    engine
        .eval_query("true".to_owned(), false)
        .map_err(|e| one_line(&e.to_string()))?;
    Ok(Loaded {
        engine: Mutex::new(engine),
        entrypoint,
    })
}

/// Adds one file of the policy's `files`: a `.rego` module, or `.json`/`.yaml` data merged at
/// the root when listed itself, or placed under its directories' path when found in a listed
/// directory, as OPA's loader does.
fn add_file(engine: &mut Engine, file: &File) -> Result<(), String> {
    let shown = file.shown;
    let data = match file.extension() {
        "rego" => {
            engine
                .add_policy(shown.to_owned(), file.read()?)
                .map_err(|e| one_line(&e.to_string()))?;
            return Ok(());
        }
        "json" => Value::from_json_str(&file.read()?).map_err(|e| format!("{shown}: {e}"))?,
        "yaml" | "yml" => {
            Value::from_yaml_str(&file.read()?).map_err(|e| format!("{shown}: {e}"))?
        }
        _ if file.listed => {
            return Err(format!(
                "{shown}: not a .rego module nor a .json/.yaml data file"
            ));
        }
        // Other files in a listed directory (a README, tests' fixtures) are not policy.
        _ => return Ok(()),
    };
    if !matches!(data, Value::Object(_)) && file.dirs.is_empty() {
        return Err(format!("{shown}: data at the root must be a JSON object"));
    }
    let mut nested = data;
    for key in file.dirs.iter().rev() {
        let mut object = Value::new_object();
        object
            .as_object_mut()
            .map_err(|e| e.to_string())?
            .insert(Value::from(key.as_str()), nested);
        nested = object;
    }
    engine.add_data(nested).map_err(|e| format!("{shown}: {e}"))
}

/// regorus's parse errors are drawn over several lines (`--> file:line:col`,
/// the source line, `error: …`); the load error is one line naming the file,
/// line and column, then the message.
fn one_line(message: &str) -> String {
    let location = message
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("--> "));
    let error = message
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("error: "));
    match (location, error) {
        (Some(location), Some(error)) => format!("{}: {error}", location.trim()),
        _ => message.trim().to_owned(),
    }
}

fn evaluate(document: &[u8], loaded: &Loaded) -> Decision {
    let document: Document<'_> = match serde_json::from_slice(document) {
        Ok(d) => d,
        Err(e) => return Decision::deny().reason(format!("invalid input: {e}")),
    };
    let input = match document.input {
        Some(raw) => match Value::from_json_str(raw.get()) {
            Ok(v) => v,
            Err(e) => return Decision::deny().reason(format!("invalid input: {e}")),
        },
        None => Value::Null,
    };
    let Ok(mut engine) = loaded.engine.lock() else {
        return Decision::deny().reason("the engine is unusable after an earlier panic");
    };
    let query = document.context.query.as_deref();
    let result = query_value(&mut engine, input, query.unwrap_or(&loaded.entrypoint));
    if let Ok(prints) = engine.take_prints() {
        for line in prints {
            sandgate_guest::log::write(sandgate_guest::log::Level::Info, &line);
        }
    }
    match (query, result) {
        (Some(_), Err(message)) => Decision::deny()
            .reason(format!("evaluation error: {message}"))
            .obligation(ERROR, message),
        (None, Err(message)) => Decision::deny().reason(format!("evaluation error: {message}")),
        (Some(_), Ok(Some(value))) => {
            let allow = value == Value::Bool(true);
            match to_json(&value) {
                Ok(json) => verdict(allow).obligation(RESULT, json),
                Err(e) => Decision::deny().reason(e),
            }
        }
        (Some(_), Ok(None)) => Decision::deny().reason("undefined"),
        (None, Ok(value)) => decide(&loaded.entrypoint, value),
    }
}

/// The value of `query` for `input`; `None` when undefined.
fn query_value(engine: &mut Engine, input: Value, query: &str) -> Result<Option<Value>, String> {
    engine.set_input(input);
    let results = engine
        .eval_query(query.to_owned(), false)
        .map_err(|e| one_line(&e.to_string()))?;
    Ok(results
        .result
        .into_iter()
        .next()
        .and_then(|r| r.expressions.into_iter().next())
        .map(|e| e.value)
        .filter(|v| *v != Value::Undefined))
}

fn to_json(value: &Value) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|e| format!("the result is not JSON: {e}"))
}

/// The decision for the entrypoint's value (DESIGN §2b): a boolean is `allow`; an object is
/// read as opa-envoy-plugin reads its result; undefined denies with reason `undefined`.
pub fn decide(entrypoint: &str, value: Option<Value>) -> Decision {
    let Some(value) = value else {
        return Decision::deny().reason("undefined");
    };
    match &value {
        Value::Bool(allow) => verdict(*allow),
        Value::Object(fields) => {
            let field = |name: &str| fields.get(&Value::from(name));
            let allow = match field("allowed").or_else(|| field("allow")) {
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Decision::deny()
                        .reason(format!("{entrypoint}: `allowed` is not a boolean"));
                }
                None => {
                    return Decision::deny()
                        .reason(format!("{entrypoint}: the result has no `allowed` boolean"));
                }
            };
            let mut decision = verdict(allow);
            if let Some(status) = field("http_status") {
                match status.as_u64().ok().filter(|s| (100..=599).contains(s)) {
                    Some(s) => decision = decision.status(s as u16),
                    None => {
                        return Decision::deny().reason(format!(
                            "{entrypoint}: `http_status` is not a status 100-599"
                        ));
                    }
                }
            }
            if let Some(body) = field("body") {
                match body {
                    Value::String(s) => decision = decision.reason(s.to_string()),
                    other => match other.to_json_str() {
                        Ok(text) => decision = decision.reason(text),
                        Err(e) => return Decision::deny().reason(e.to_string()),
                    },
                }
            }
            if let Some(headers) = field("headers") {
                let Value::Object(headers) = headers else {
                    return Decision::deny()
                        .reason(format!("{entrypoint}: `headers` is not an object"));
                };
                for (name, value) in headers.iter() {
                    let (Value::String(name), Some(value)) = (name, header_value(value)) else {
                        return Decision::deny().reason(format!(
                            "{entrypoint}: a header value is not a string or an array of strings"
                        ));
                    };
                    decision = decision.header(name.to_string(), value);
                }
            }
            decision
        }
        other => Decision::deny().reason(format!(
            "{entrypoint} is {}, not a boolean or an object",
            kind(other)
        )),
    }
}

fn verdict(allow: bool) -> Decision {
    if allow {
        Decision::allow()
    } else {
        Decision::deny()
    }
}

/// A header's value: a string, or (as opa-envoy-plugin allows) an array of strings joined as
/// one list-valued header.
fn header_value(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.to_string()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Some(s.to_string()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(", ")),
        _ => None,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Set(_) => "a set",
        Value::Object(_) => "an object",
        Value::Undefined => "undefined",
    }
}
