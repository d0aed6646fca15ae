//! Raw → model: turns the `raw` structs into the validated `Config`, one
//! submodule per concern. Every error names the key path (`policy[0].timeout_ms
//! (policy `authz`)`) and the line. Called by `config::load`/`config::parse`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_spanned::Spanned;

use super::raw::RawConfig;
use super::{Config, ConfigError, TelemetrySettings};

mod egress;
mod engine;
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
        let ebpf = raw.ebpf.and_then(|e| e.mode).unwrap_or_default();
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
