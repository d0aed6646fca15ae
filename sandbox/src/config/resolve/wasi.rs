//! Resolves `[policy.wasi]`: groups expanded to the exact preview1 functions,
//! environment variables read, preopened directories canonicalised.

use super::Resolver;
use crate::config::raw::RawWasi;
use crate::config::{Access, ConfigError, Grants, Preopen};
use crate::preview1 as wasi;

impl Resolver<'_> {
    pub(super) fn grants(
        &self,
        key: &dyn Fn(&str) -> String,
        raw: Option<RawWasi>,
    ) -> Result<Grants, ConfigError> {
        let Some(raw) = raw else {
            return Ok(Grants::default());
        };
        let mut grants = Grants {
            on_denied: raw.on_denied.unwrap_or_default(),
            ..Grants::default()
        };
        for item in &raw.allow {
            let word = item.get_ref();
            match wasi::expand_grant(word) {
                Some(functions) => grants.functions.extend(functions.iter().copied()),
                None => {
                    return self.error(
                        Some(item.span()),
                        format!(
                            "{}: `{word}` is neither a group ({}) nor a wasi_snapshot_preview1 function",
                            key("wasi.allow"),
                            wasi::GROUPS.iter().map(|(g, _)| *g).collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
            grants.requested.push(word.clone());
        }
        if !raw.env.is_empty() && !grants.allows("environ_get") {
            return self.error(
                Some(raw.env[0].span()),
                format!(
                    "{}: variables are listed but `env` is not in wasi.allow, so the guest could not read them",
                    key("wasi.env")
                ),
            );
        }
        for var in &raw.env {
            let name = var.get_ref();
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return self.error(
                    Some(var.span()),
                    format!("{}: `{name}` is not a variable name", key("wasi.env")),
                );
            }
            match std::env::var(name) {
                Ok(value) => {
                    grants.env.insert(name.clone(), value);
                }
                Err(_) => grants.env_missing.push(name.clone()),
            }
        }
        for p in &raw.preopens {
            let span = Some(p.span());
            let p = p.get_ref();
            if !grants.allows("path_open") {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is preopened but `fs_read` is not in wasi.allow, so the guest could not open it",
                        key("wasi.preopens"),
                        p.guest
                    ),
                );
            }
            if p.mode == Access::ReadWrite && !grants.allows("fd_write") {
                return self.error(
                    span,
                    format!(
                        "{}: `{}` is mode \"rw\" but `fs_write` is not in wasi.allow, so writes would be refused",
                        key("wasi.preopens"),
                        p.guest
                    ),
                );
            }
            if !p.guest.starts_with('/') || p.guest.split('/').any(|c| c == "..") {
                return self.error(
                    span,
                    format!(
                        "{}: guest path `{}` must be absolute and must not contain `..`",
                        key("wasi.preopens"),
                        p.guest
                    ),
                );
            }
            let host = self.relative(&p.host);
            let host = match host.canonicalize() {
                Ok(h) if h.is_dir() => h,
                Ok(_) => {
                    return self.error(
                        span,
                        format!(
                            "{}: host path {} is not a directory",
                            key("wasi.preopens"),
                            host.display()
                        ),
                    );
                }
                Err(e) => {
                    return self.error(
                        span,
                        format!(
                            "{}: host path {}: {e}",
                            key("wasi.preopens"),
                            host.display()
                        ),
                    );
                }
            };
            grants.preopens.push(Preopen {
                host,
                guest: p.guest.clone(),
                access: p.mode,
            });
        }
        Ok(grants)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{POLICY, Scratch, assert_all_refused, assert_refused};

    fn wasi(body: &str) -> String {
        format!("{POLICY}[policy.wasi]\n{body}")
    }

    #[test]
    fn wasi_grant_errors_name_key_and_line() {
        let preopen = |allow: &str, guest: &str, mode: &str| {
            wasi(&format!(
                "allow = [{allow}]\npreopens = [{{ host = \".\", guest = \"{guest}\", mode = \"{mode}\" }}]\n"
            ))
        };
        assert_all_refused(&[
            (
                &wasi("allow = [\"clock\", \"bogus\"]\n"),
                Some(5),
                "policy[0].wasi.allow (policy `a`)",
                "`bogus` is neither a group (args, env, clock, random",
            ),
            (
                &wasi("allow = [\"clock\"]\nenv = [\"HOME\"]\n"),
                Some(6),
                "policy[0].wasi.env (policy `a`)",
                "`env` is not in wasi.allow",
            ),
            (
                &wasi("allow = [\"env\"]\nenv = [\"A=B\"]\n"),
                Some(6),
                "policy[0].wasi.env (policy `a`)",
                "`A=B` is not a variable name",
            ),
            (
                &preopen("", "/d", "ro"),
                Some(6),
                "policy[0].wasi.preopens (policy `a`)",
                "`/d` is preopened but `fs_read` is not in wasi.allow",
            ),
            (
                &preopen("\"fs_read\"", "/d", "rw"),
                Some(6),
                "policy[0].wasi.preopens (policy `a`)",
                "`/d` is mode \"rw\" but `fs_write` is not in wasi.allow",
            ),
            (
                &preopen("\"fs_read\"", "d", "ro"),
                Some(6),
                "policy[0].wasi.preopens (policy `a`)",
                "guest path `d` must be absolute",
            ),
            (
                &preopen("\"fs_read\"", "/a/../b", "ro"),
                Some(6),
                "policy[0].wasi.preopens (policy `a`)",
                "must not contain `..`",
            ),
        ]);
    }

    #[test]
    fn a_preopen_host_that_is_not_a_directory_is_refused_at_its_line() {
        let scratch = Scratch::new("preopen-host");
        scratch.write("file.txt", "not a directory");
        let preopen = |host: &str| {
            wasi(&format!(
                "allow = [\"fs_read\"]\npreopens = [{{ host = \"{host}\", guest = \"/d\", mode = \"ro\" }}]\n"
            ))
        };
        let key = "policy[0].wasi.preopens (policy `a`)";
        let file = scratch.0.join("file.txt");
        let says = format!("host path {} is not a directory", file.display());
        assert_refused(&scratch.config(), &preopen("file.txt"), Some(6), key, &says);
        let missing = scratch.0.join("missing");
        let says = format!("host path {}: No such file", missing.display());
        assert_refused(&scratch.config(), &preopen("missing"), Some(6), key, &says);
    }
}
