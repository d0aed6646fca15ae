//! Policy languages run by the guests built into sandgate (`engine = "rego"`,
//! `engine = "cedar"`): the embedded guest modules, and how a policy's `files`
//! are handed to them (read-only preopens and variables sandgate composes).
//! Used by `config` when it resolves such a policy, by `policy` when it loads
//! the module, and by `server` for the Data API's query.

use std::fmt;
use std::path::PathBuf;

/// The Rego guest (`guests/rego`), built by `build.rs` for `wasm32-wasip1`.
static REGO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sandgate_rego.wasm"));

/// The Cedar guest (`guests/cedar`), built by `build.rs` for `wasm32-wasip1`.
static CEDAR_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sandgate_cedar.wasm"));

/// Where the guest finds the `n`-th entry of `files`: `/policy/<n>`.
pub const FILES_ROOT: &str = "/policy";
/// One line per entry of `files`: `<path in the sandbox>\t<path as configured>`.
pub const REGO_FILES_VAR: &str = "SANDGATE_REGO_FILES";
/// The entrypoint, e.g. `data.httpapi.authz`.
pub const REGO_ENTRYPOINT_VAR: &str = "SANDGATE_REGO_ENTRYPOINT";
/// The obligation (in the decision's `obligations`) in which the Rego guest returns the value of a Data API
/// query (absent when the value is undefined).
pub const REGO_RESULT: &str = "sandgate.rego.result";
/// The obligation in which the Rego guest reports an evaluation error of a
/// Data API query (the Data API answers it 500, as OPA does).
pub const REGO_ERROR: &str = "sandgate.rego.error";
/// The regorus release the Rego guest is built with.
pub const REGORUS_VERSION: &str = "0.14.1";
/// One line per entry of `files`, as for Rego.
pub const CEDAR_FILES_VAR: &str = "SANDGATE_CEDAR_FILES";
/// The header whose value is an HTTP request's principal (`principal_header`).
pub const CEDAR_PRINCIPAL_HEADER_VAR: &str = "SANDGATE_CEDAR_PRINCIPAL_HEADER";
/// The obligation in which the Cedar guest lists the determining policy ids;
/// for the query [`CEDAR_DESCRIBE`], every loaded policy id.
pub const CEDAR_POLICIES: &str = "sandgate.cedar.policies";
/// The `context.query` asking the Cedar guest for its loaded policy ids.
pub const CEDAR_DESCRIBE: &str = "sandgate.cedar.describe";
/// The principal of an HTTP request without the principal header (docs/config.md).
pub const CEDAR_ANONYMOUS: &str = r#"Anonymous::"anonymous""#;
/// The cedar-policy release the Cedar guest is built with.
pub const CEDAR_VERSION: &str = "4.14.1";

/// A language with a guest built into sandgate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Language {
    Rego,
    Cedar,
}

impl Language {
    /// `engine = "…"`.
    pub fn parse(name: &str) -> Option<Language> {
        match name {
            "rego" => Some(Language::Rego),
            "cedar" => Some(Language::Cedar),
            _ => None,
        }
    }

    /// The guest module that runs this language.
    pub fn module(self) -> &'static [u8] {
        match self {
            Language::Rego => REGO_GUEST,
            Language::Cedar => CEDAR_GUEST,
        }
    }

    /// Whether the guest's init may read `random_get` (answered by the
    /// host's CSPRNG): the Cedar guest's std hash tables draw their keys from
    /// it once, at init, and keep them in the snapshot. The guest is
    /// sandgate's own code and Cedar has no randomness a policy could read;
    /// a user module never gets this (DESIGN §2).
    pub fn seeds_hash_tables_at_init(self) -> bool {
        match self {
            Language::Rego => false,
            Language::Cedar => true,
        }
    }

    /// The engine and its version, as `sandgate check` prints it.
    pub fn engine_version(self) -> String {
        match self {
            Language::Rego => format!("regorus {REGORUS_VERSION}"),
            Language::Cedar => format!("cedar-policy {CEDAR_VERSION}"),
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Language::Rego => "rego",
            Language::Cedar => "cedar",
        })
    }
}

/// A policy written in a language: its files and what it evaluates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanguageSpec {
    pub language: Language,
    /// The `files` entries, canonical, in config order.
    pub files: Vec<PathBuf>,
    /// Rego: the rule whose value is the decision, e.g. `data.httpapi.authz`.
    pub entrypoint: Option<String>,
    /// Cedar: the header naming an HTTP request's principal, lower-case.
    pub principal_header: Option<String>,
}

/// The Rego query of `POST /v1/data/{path}`: `data.` and the path's segments
/// joined by `.`; `None` when a segment is not a plain Rego name (the Data
/// API then answers 400).
pub fn data_query(path: &str) -> Option<String> {
    let mut query = String::from("data");
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        if !is_rego_name(segment) {
            return None;
        }
        query.push('.');
        query.push_str(segment);
    }
    Some(query)
}

/// A Rego variable name: a letter or `_`, then letters, digits and `_`.
pub fn is_rego_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_path_becomes_a_dotted_query_and_odd_segments_are_refused() {
        assert_eq!(
            data_query("httpapi/authz").as_deref(),
            Some("data.httpapi.authz")
        );
        assert_eq!(data_query("httpapi").as_deref(), Some("data.httpapi"));
        assert_eq!(data_query("a/b_2/").as_deref(), Some("data.a.b_2"));
        assert_eq!(data_query("a/b-c"), None);
        assert_eq!(data_query("a/1x"), None);
        assert_eq!(data_query("a/x[0]"), None);
    }

    #[test]
    fn the_language_guests_are_embedded() {
        assert!(Language::Rego.module().starts_with(b"\0asm"));
        assert!(Language::Cedar.module().starts_with(b"\0asm"));
    }
}
