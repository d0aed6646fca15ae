//! Resolves `engine`, `files`, `entrypoint` and `principal_header`: a policy
//! written in a language run by a built-in guest, its files checked and
//! mounted read-only, and the variables that tell the guest where they are.

use serde_spanned::Spanned;

use super::Resolver;
use crate::config::raw::{RawPolicy, RawVersions};
use crate::config::{Access, ConfigError, Grants, ModuleSource, Preopen, VersionSpec, defaults};
use crate::language::{self, Language, LanguageSpec};
use crate::preview1 as wasi;

impl Resolver<'_> {
    /// The language of a policy with `engine`; `None` for a module policy,
    /// which may then set neither `files` nor `entrypoint`.
    pub(super) fn language(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &RawPolicy,
    ) -> Result<Option<LanguageSpec>, ConfigError> {
        let Some(engine) = &raw.engine else {
            for (given, k, engines) in [
                (
                    raw.files.as_ref().map(Spanned::span),
                    "files",
                    "`engine = \"rego\"` or `\"cedar\"`",
                ),
                (
                    raw.entrypoint.as_ref().map(Spanned::span),
                    "entrypoint",
                    "`engine = \"rego\"`",
                ),
                (
                    raw.principal_header.as_ref().map(Spanned::span),
                    "principal_header",
                    "`engine = \"cedar\"`",
                ),
            ] {
                if let Some(span) = given {
                    return self.error(
                        Some(span),
                        format!("{}: only a policy with {engines} has {k}", key(k)),
                    );
                }
            }
            return Ok(None);
        };
        let Some(lang) = Language::parse(engine.get_ref()) else {
            return self.error(
                Some(engine.span()),
                format!(
                    "{}: `{}` is not a policy language sandgate runs; use \"rego\" or \"cedar\", or `module` for a WebAssembly policy",
                    key("engine"),
                    engine.get_ref()
                ),
            );
        };
        let versions = match raw.version.as_ref().map(Spanned::get_ref) {
            Some(RawVersions::Tables(_)) => raw.version.as_ref().map(Spanned::span),
            _ => None,
        };
        for (given, k) in [
            (raw.module.as_ref().map(Spanned::span), "module"),
            (raw.sha256.as_ref().map(Spanned::span), "sha256"),
            (versions, "version"),
        ] {
            if let Some(span) = given {
                return self.error(
                    Some(span),
                    format!(
                        "{}: a policy with `engine = \"{lang}\"` runs the built-in {lang} guest; remove `{k}`",
                        key(k)
                    ),
                );
            }
        }
        let Some(files) = &raw.files else {
            return self.error(
                Some(engine.span()),
                format!(
                    "{}: missing; list the policy's {} files or directories",
                    key("files"),
                    match lang {
                        Language::Rego => ".rego and data",
                        Language::Cedar => ".cedar, entities .json and .cedarschema",
                    }
                ),
            );
        };
        if files.get_ref().is_empty() {
            return self.error(
                Some(files.span()),
                format!("{}: list at least one file or directory", key("files")),
            );
        }
        let mut paths = Vec::with_capacity(files.get_ref().len());
        for (i, file) in files.get_ref().iter().enumerate() {
            let text = file.get_ref();
            let fkey = key(&format!("files[{i}]"));
            if text.is_empty() {
                return self.error(Some(file.span()), format!("{fkey}: must not be empty"));
            }
            let path = self.relative(text);
            match std::fs::canonicalize(&path) {
                Ok(path) => paths.push(path),
                Err(e) => {
                    return self.error(
                        Some(file.span()),
                        format!("{fkey}: cannot read {}: {e}", path.display()),
                    );
                }
            }
        }
        let entrypoint = match (lang, &raw.entrypoint) {
            (Language::Rego, None) => {
                return self.error(
                    Some(engine.span()),
                    format!(
                        "{}: missing; name the rule whose value is the decision, like \"data.httpapi.allow\"",
                        key("entrypoint")
                    ),
                );
            }
            (Language::Rego, Some(entry)) => {
                let text = entry.get_ref();
                let path = text.strip_prefix("data.").unwrap_or("");
                if path.is_empty() || !path.split('.').all(language::is_rego_name) {
                    return self.error(
                        Some(entry.span()),
                        format!(
                            "{}: `{text}` is not a rule reference like \"data.httpapi.allow\"",
                            key("entrypoint")
                        ),
                    );
                }
                Some(text.clone())
            }
            (Language::Cedar, Some(entry)) => {
                return self.error(
                    Some(entry.span()),
                    format!(
                        "{}: a Cedar policy has no entrypoint: its decision is the authorizer's answer",
                        key("entrypoint")
                    ),
                );
            }
            (Language::Cedar, None) => None,
        };
        let principal_header = match (lang, &raw.principal_header) {
            (_, None) => None,
            (Language::Rego, Some(header)) => {
                return self.error(
                    Some(header.span()),
                    format!(
                        "{}: only a policy with `engine = \"cedar\"` has principal_header; a Rego policy reads the headers from input.request.headers",
                        key("principal_header")
                    ),
                );
            }
            (Language::Cedar, Some(header)) => {
                let name = header.get_ref();
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return self.error(
                        Some(header.span()),
                        format!(
                            "{}: `{name}` is not an HTTP header name",
                            key("principal_header")
                        ),
                    );
                }
                Some(name.to_ascii_lowercase())
            }
        };
        Ok(Some(LanguageSpec {
            language: lang,
            files: paths,
            entrypoint,
            principal_header,
        }))
    }

    /// The one version of a language policy: the built-in guest.
    pub(super) fn language_version(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: &RawPolicy,
        language: &LanguageSpec,
    ) -> Result<Vec<VersionSpec>, ConfigError> {
        let name = match raw.version.as_ref().map(|v| (v.span(), v.get_ref())) {
            Some((span, RawVersions::Name(n))) => {
                self.check_name(&key("version"), n, span)?;
                n.clone()
            }
            _ => defaults::VERSION.to_owned(),
        };
        Ok(vec![VersionSpec {
            name,
            module: ModuleSource::Builtin(language.language),
            sha256: None,
            weight: defaults::VERSION_WEIGHT,
        }])
    }

    /// Mounts a language policy's files read-only at `/policy/<n>` (a file's
    /// directory, for a file) and tells the guest where each is. The guest
    /// reads them with `fs_read` and the variables with `env`: no variable
    /// of the daemon's own environment is added.
    pub(super) fn mount_files(&self, language: &LanguageSpec, grants: &mut Grants) {
        let mut listing = String::new();
        for (i, (path, shown)) in language
            .files
            .iter()
            .zip(self.shown_files(language))
            .enumerate()
        {
            let guest = format!("{}/{i}", language::FILES_ROOT);
            let (host, inside) = match (path.is_dir(), path.parent(), path.file_name()) {
                (false, Some(parent), Some(name)) => (
                    parent.to_path_buf(),
                    format!("{guest}/{}", name.to_string_lossy()),
                ),
                _ => (path.clone(), guest.clone()),
            };
            grants.preopens.push(Preopen {
                host,
                guest,
                access: Access::ReadOnly,
            });
            listing.push_str(&format!("{inside}\t{shown}\n"));
        }
        for group in ["fs_read", "env"] {
            if let Some(functions) = wasi::expand_grant(group) {
                grants.functions.extend(functions.iter().copied());
            }
        }
        match language.language {
            Language::Rego => {
                grants
                    .env
                    .insert(language::REGO_FILES_VAR.to_owned(), listing);
                if let Some(entrypoint) = &language.entrypoint {
                    grants
                        .env
                        .insert(language::REGO_ENTRYPOINT_VAR.to_owned(), entrypoint.clone());
                }
            }
            Language::Cedar => {
                grants
                    .env
                    .insert(language::CEDAR_FILES_VAR.to_owned(), listing);
                if let Some(header) = &language.principal_header {
                    grants.env.insert(
                        language::CEDAR_PRINCIPAL_HEADER_VAR.to_owned(),
                        header.clone(),
                    );
                }
            }
        }
    }

    /// The files as an operator knows them: relative to the config's
    /// directory when inside it.
    fn shown_files(&self, language: &LanguageSpec) -> Vec<String> {
        let base = std::fs::canonicalize(&self.base).unwrap_or_else(|_| self.base.clone());
        language
            .files
            .iter()
            .map(|p| {
                p.strip_prefix(&base)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{POLICY, assert_all_refused};

    fn rego(extra: &str) -> String {
        format!("[[policy]]\nname = \"a\"\nengine = \"rego\"\n{extra}")
    }

    fn cedar(extra: &str) -> String {
        format!("[[policy]]\nname = \"a\"\nengine = \"cedar\"\n{extra}")
    }

    #[test]
    fn language_policy_errors_name_key_and_line() {
        assert_all_refused(&[
            (
                "[[policy]]\nname = \"a\"\nengine = \"prolog\"\n",
                Some(3),
                "policy[0].engine (policy `a`)",
                "`prolog` is not a policy language sandgate runs",
            ),
            (
                &rego("module = \"a.wasm\"\nfiles = [\".\"]\nentrypoint = \"data.a.b\"\n"),
                Some(4),
                "policy[0].module (policy `a`)",
                "runs the built-in rego guest; remove `module`",
            ),
            (
                &rego("entrypoint = \"data.a.b\"\n"),
                Some(3),
                "policy[0].files (policy `a`)",
                "missing; list the policy's .rego and data files",
            ),
            (
                &rego("files = []\nentrypoint = \"data.a.b\"\n"),
                Some(4),
                "policy[0].files (policy `a`)",
                "list at least one file or directory",
            ),
            (
                &rego("files = [\"no-such-dir/x.rego\"]\nentrypoint = \"data.a.b\"\n"),
                Some(4),
                "policy[0].files[0] (policy `a`)",
                "cannot read",
            ),
            (
                &rego("files = [\".\"]\n"),
                Some(3),
                "policy[0].entrypoint (policy `a`)",
                "missing; name the rule whose value is the decision",
            ),
            (
                &rego("files = [\".\"]\nentrypoint = \"httpapi.allow\"\n"),
                Some(5),
                "policy[0].entrypoint (policy `a`)",
                "`httpapi.allow` is not a rule reference",
            ),
            (
                &rego("files = [\".\"]\nentrypoint = \"data.a-b\"\n"),
                Some(5),
                "policy[0].entrypoint (policy `a`)",
                "is not a rule reference",
            ),
            (
                &format!("{POLICY}files = [\"x.rego\"]\n"),
                Some(4),
                "policy[0].files (policy `a`)",
                "only a policy with `engine = \"rego\"` or `\"cedar\"` has files",
            ),
            (
                &format!("{POLICY}entrypoint = \"data.a.b\"\n"),
                Some(4),
                "policy[0].entrypoint (policy `a`)",
                "only a policy with `engine = \"rego\"` has entrypoint",
            ),
            (
                &format!("{POLICY}principal_header = \"x-user\"\n"),
                Some(4),
                "policy[0].principal_header (policy `a`)",
                "only a policy with `engine = \"cedar\"` has principal_header",
            ),
            (
                &cedar("files = [\".\"]\nentrypoint = \"data.a.b\"\n"),
                Some(5),
                "policy[0].entrypoint (policy `a`)",
                "a Cedar policy has no entrypoint",
            ),
            (
                &cedar("files = [\".\"]\nprincipal_header = \"x user\"\n"),
                Some(5),
                "policy[0].principal_header (policy `a`)",
                "`x user` is not an HTTP header name",
            ),
            (
                &rego(
                    "files = [\".\"]\nentrypoint = \"data.a.b\"\nprincipal_header = \"x-user\"\n",
                ),
                Some(6),
                "policy[0].principal_header (policy `a`)",
                "only a policy with `engine = \"cedar\"` has principal_header",
            ),
            (
                &cedar(""),
                Some(3),
                "policy[0].files (policy `a`)",
                "missing; list the policy's .cedar, entities .json and .cedarschema files",
            ),
        ]);
    }
}
