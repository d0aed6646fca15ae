//! Raw → model: turns the `raw` structs into the validated `Config`, one
//! submodule per concern. Every error names the key path (`policy[0].timeout_ms
//! (policy `authz`)`) and the line. Called by `config::load`/`config::parse`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_spanned::Spanned;

use super::raw::RawConfig;
use super::{Config, ConfigError, EbpfMode, TelemetrySettings};

mod abi;
mod egress;
mod engine;
mod language;
mod policy;
mod server;
mod telemetry;
mod wasi;

/// The longest evaluation or egress timeout a policy may set.
const MAX_TIMEOUT_MS: u64 = 60_000;

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates configuration text; `path` locates relative paths and
/// names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let resolver = Resolver {
        text,
        path,
        base: path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| resolver.line(s.start));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            message: e.message().trim_end().to_owned(),
        }
    })?;
    resolver.resolve(raw)
}

struct Resolver<'a> {
    text: &'a str,
    path: &'a Path,
    base: PathBuf,
}

impl Resolver<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        message: String,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: span.map(|s| self.line(s.start)),
            message,
        })
    }

    fn relative(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn resolve(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let audit = self.audit(raw.audit)?;
        let telemetry = match raw.telemetry {
            None => TelemetrySettings::default(),
            Some(t) => self.telemetry(t)?,
        };
        let ebpf = raw.ebpf.as_ref().and_then(|e| e.mode).unwrap_or_default();
        let enforce = raw.ebpf.as_ref().and_then(|e| e.enforce.clone());
        let ebpf_enforce = enforce.as_ref().is_some_and(|e| *e.get_ref());
        if ebpf_enforce && ebpf == EbpfMode::Off {
            return self.error(
                enforce.map(|e| e.span()),
                "ebpf.enforce: true needs the eBPF probes, but [ebpf] mode = \"off\" attaches \
                 none; set mode = \"auto\" or \"required\", or enforce = false"
                    .into(),
            );
        }
        let engine = self.engine(raw.engine)?;
        let reload = self.reload(raw.reload)?;

        let mut policies = Vec::with_capacity(raw.policy.len());
        let mut seen = BTreeSet::new();
        for (index, p) in raw.policy.into_iter().enumerate() {
            if !seen.insert(p.name.get_ref().clone()) {
                return self.error(
                    Some(p.name.span()),
                    format!(
                        "policy[{index}].name: duplicate policy name `{}`",
                        p.name.get_ref()
                    ),
                );
            }
            policies.push(self.policy(index, p, &engine)?);
        }
        Ok(Config {
            source: self.path.to_path_buf(),
            server,
            audit,
            telemetry,
            ebpf,
            ebpf_enforce,
            engine,
            reload,
            policies,
        })
    }

    fn ranged(&self, key: &str, v: &Spanned<u64>, min: u64, max: u64) -> Result<u64, ConfigError> {
        let value = *v.get_ref();
        if value < min || value > max {
            return self.error(
                Some(v.span()),
                format!("{key}: {value} is out of range (allowed {min}..={max})"),
            );
        }
        Ok(value)
    }
}

trait SpannedU32 {
    fn map_u64(&self) -> Spanned<u64>;
}

impl SpannedU32 for Spanned<u32> {
    fn map_u64(&self) -> Spanned<u64> {
        Spanned::new(self.span(), u64::from(*self.get_ref()))
    }
}

/// Whether `name` is an HTTP header name (a token of RFC 9110).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What the resolver's error-path tests share: each feeds a small TOML and
/// checks that the refusal names the key path and the line.
#[cfg(test)]
mod testing {
    use std::path::{Path, PathBuf};

    /// A policy every policy-level case extends; its added lines start at line 4.
    pub const POLICY: &str = "[[policy]]\nname = \"a\"\nmodule = \"a.wasm\"\n";

    /// Asserts that `toml`, read as `path`, is refused with a message that
    /// begins `PATH:LINE: KEY` (no `:LINE` when `line` is `None`) and contains `says`.
    #[track_caller]
    pub fn assert_refused(path: &Path, toml: &str, line: Option<usize>, key: &str, says: &str) {
        let message = match crate::config::parse(toml, path) {
            Ok(_) => panic!("accepted:\n{toml}"),
            Err(e) => e.to_string(),
        };
        let at = line.map(|l| format!(":{l}")).unwrap_or_default();
        let head = format!("{}{at}: {key}", path.display());
        assert!(
            message.starts_with(&head) && message.contains(says),
            "for\n{toml}\nwanted `{head}` … `{says}`, got `{message}`"
        );
    }

    /// Cases that need no file: `(toml, line, key, says)`.
    #[track_caller]
    pub fn assert_all_refused(cases: &[(&str, Option<usize>, &str, &str)]) {
        for (toml, line, key, says) in cases {
            assert_refused(Path::new("sandgate.toml"), toml, *line, key, says);
        }
    }

    /// A fresh directory of this test process, removed on drop.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("sandgate-config-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            Scratch(dir)
        }

        pub fn config(&self) -> PathBuf {
            self.0.join("sandgate.toml")
        }

        pub fn write(&self, name: &str, contents: &str) {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{POLICY, assert_all_refused};

    #[test]
    fn unknown_keys_and_malformed_toml_are_refused_at_their_line() {
        assert_all_refused(&[
            (
                "[server]\nbogus = 1\n",
                Some(2),
                "unknown field `bogus`",
                "expected one of",
            ),
            (
                &format!(
                    "{POLICY}[[policy.version]]\nname = \"v1\"\nmodule = \"v1.wasm\"\nbogus = 1\n"
                ),
                Some(7),
                "unknown field `bogus`",
                "expected one of",
            ),
            ("[server\n", Some(1), "unclosed table", "expected `]`"),
        ]);
    }

    #[test]
    fn a_duplicate_policy_name_is_refused() {
        assert_all_refused(&[(
            &format!("{POLICY}{POLICY}"),
            Some(5),
            "policy[1].name: duplicate policy name `a`",
            "",
        )]);
    }
}
