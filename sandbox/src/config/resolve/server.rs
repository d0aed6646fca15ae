//! Resolves `[server]`, `[audit]` and `[reload]`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_spanned::Spanned;

use super::Resolver;
use crate::config::raw::{RawAudit, RawReload, RawServer};
use crate::config::{
    AuditSettings, AuditTarget, ConfigError, MaxConnections, ReloadSettings, ServerSettings,
    defaults,
};
use crate::seccomp::Mode;

impl Resolver<'_> {
    pub(super) fn audit(&self, raw: Option<RawAudit>) -> Result<AuditSettings, ConfigError> {
        let target = match raw.and_then(|a| a.path) {
            None => AuditTarget::Stdout,
            Some(p) if p.get_ref() == "-" => AuditTarget::Stdout,
            Some(p) if p.get_ref().is_empty() => {
                return self.error(Some(p.span()), "audit.path: must not be empty".into());
            }
            Some(p) => AuditTarget::File(self.relative(p.get_ref())),
        };
        Ok(AuditSettings { target })
    }

    pub(super) fn reload(&self, raw: Option<RawReload>) -> Result<ReloadSettings, ConfigError> {
        let mut settings = ReloadSettings::default();
        let Some(raw) = raw else {
            return Ok(settings);
        };
        settings.watch = raw.watch.unwrap_or(settings.watch);
        if let Some(ms) = &raw.debounce_ms {
            settings.debounce =
                Duration::from_millis(self.ranged("reload.debounce_ms", ms, 0, 60_000)?);
        }
        Ok(settings)
    }

    pub(super) fn socket_addr(
        &self,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().or_else(|_| {
            self.error(
                Some(value.span()),
                format!(
                    "{key}: `{}` is not an address like 127.0.0.1:8181",
                    value.get_ref()
                ),
            )
        })
    }

    pub(super) fn server(&self, raw: Option<RawServer>) -> Result<ServerSettings, ConfigError> {
        let default_listen: SocketAddr = defaults::LISTEN
            .parse()
            .expect("the default listen address is valid");
        let raw = raw.unwrap_or_default();
        let listen = match &raw.listen {
            Some(l) => self.socket_addr("server.listen", l)?,
            None => default_listen,
        };
        let grpc_listen = match &raw.grpc_listen {
            Some(l) => Some(self.socket_addr("server.grpc_listen", l)?),
            None => None,
        };
        let max_body_bytes = match raw.max_body_bytes {
            Some(v) => self.ranged("server.max_body_bytes", &v, 1, 1 << 30)?,
            None => defaults::MAX_INPUT_BYTES,
        };
        let millis = |key: &str, v: &Option<Spanned<u64>>, default: u64| match v {
            Some(v) => self.ranged(key, v, 1, 3_600_000).map(Duration::from_millis),
            None => Ok(Duration::from_millis(default)),
        };
        let header_read_timeout = millis(
            "server.header_read_timeout_ms",
            &raw.header_read_timeout_ms,
            defaults::HEADER_READ_TIMEOUT_MS,
        )?;
        let idle_timeout = millis(
            "server.idle_timeout_ms",
            &raw.idle_timeout_ms,
            defaults::IDLE_TIMEOUT_MS,
        )?;
        let max_connections = match &raw.max_connections {
            Some(v) => MaxConnections {
                limit: self.ranged("server.max_connections", v, 1, 10_000_000)?,
                derived_from: None,
            },
            None => MaxConnections::derived(open_files_limit()),
        };
        let syscall_filter = match &raw.syscall_filter {
            Some(v) => match Mode::parse(v.get_ref()) {
                Some(mode) => mode,
                None => {
                    return self.error(
                        Some(v.span()),
                        format!(
                            "server.syscall_filter: `{}` is not one of {}",
                            v.get_ref(),
                            Mode::NAMES
                        ),
                    );
                }
            },
            None => Mode::default(),
        };
        Ok(ServerSettings {
            listen,
            grpc_listen,
            max_body_bytes,
            header_read_timeout,
            idle_timeout,
            max_connections,
            forward_auth_headers: raw.forward_auth_headers.unwrap_or_default(),
            syscall_filter,
        })
    }
}

/// The soft RLIMIT_NOFILE of this process (65536 when it is unlimited).
fn open_files_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(65_536)
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_all_refused;

    #[test]
    fn server_audit_and_reload_errors_name_key_and_line() {
        assert_all_refused(&[
            (
                "[audit]\npath = \"\"\n",
                Some(2),
                "audit.path",
                "must not be empty",
            ),
            (
                "[reload]\ndebounce_ms = 60001\n",
                Some(2),
                "reload.debounce_ms",
                "60001 is out of range (allowed 0..=60000)",
            ),
            (
                "[server]\nlisten = \"localhost\"\n",
                Some(2),
                "server.listen",
                "`localhost` is not an address like 127.0.0.1:8181",
            ),
            (
                "[server]\n\ngrpc_listen = \"127.0.0.1\"\n",
                Some(3),
                "server.grpc_listen",
                "is not an address",
            ),
            (
                "[server]\nmax_body_bytes = 0\n",
                Some(2),
                "server.max_body_bytes",
                "0 is out of range (allowed 1..=1073741824)",
            ),
            (
                "[server]\nheader_read_timeout_ms = 0\n",
                Some(2),
                "server.header_read_timeout_ms",
                "out of range (allowed 1..=3600000)",
            ),
            (
                "[server]\nidle_timeout_ms = 3600001\n",
                Some(2),
                "server.idle_timeout_ms",
                "out of range (allowed 1..=3600000)",
            ),
            (
                "[server]\nmax_connections = 0\n",
                Some(2),
                "server.max_connections",
                "out of range (allowed 1..=10000000)",
            ),
            (
                "[server]\n\nsyscall_filter = \"strict\"\n",
                Some(3),
                "server.syscall_filter",
                "`strict` is not one of \"enforce\", \"log\" or \"off\"",
            ),
        ]);
    }
}
