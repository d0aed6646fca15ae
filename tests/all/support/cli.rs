//! The `sandgate` binary run as a command (`eval`, `check`, `trace`, …) with
//! a private module cache, and the one `sandgate eval` invocation the tests
//! repeat: a config, a policy, an input file and an audit log read back.

use std::path::Path;
use std::process::{Command, Output};

use super::{audit_lines, sandgate_bin, write};

/// Runs `sandgate` with `args`, with a private module cache.
pub fn sandgate(args: &[&str], cache: &Path) -> Output {
    sandgate_with_stdin(args, cache, None)
}

pub fn sandgate_with_stdin(args: &[&str], cache: &Path, stdin: Option<&[u8]>) -> Output {
    sandgate_with_env(args, cache, stdin, &[])
}

/// Runs `sandgate` with extra environment variables.
pub fn sandgate_with_env(
    args: &[&str],
    cache: &Path,
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> Output {
    use std::io::Write;
    let mut child = Command::new(sandgate_bin())
        .args(args)
        .envs(env.iter().copied())
        .env("SANDGATE_CACHE_DIR", cache)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sandgate");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("wait for sandgate")
}

/// Parses the decision JSON a command printed on stdout.
pub fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One `sandgate eval` run: what it evaluates (a bare module or a policy of
/// a config), then its input, audit log and environment.
///
/// `Eval::module(&wasm).input(&file).run(&cache)` runs
/// `sandgate eval --module <wasm> --input <file>` with its module cache in `cache`.
pub struct Eval {
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    env: Vec<(String, String)>,
}

impl Eval {
    /// `sandgate eval --module module`, with no grants.
    pub fn module(module: &Path) -> Eval {
        Eval::new(&["--module", utf8(module)])
    }

    /// `sandgate eval --config config --policy name`.
    pub fn policy(config: &Path, name: &str) -> Eval {
        Eval::new(&["--config", utf8(config), "--policy", name])
    }

    fn new(args: &[&str]) -> Eval {
        Eval {
            args: std::iter::once("eval")
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
            stdin: None,
            env: Vec::new(),
        }
    }

    /// Adds `flag value` (e.g. `--module` replacing a config's module).
    pub fn arg(mut self, flag: &str, value: &str) -> Eval {
        self.args.extend([flag.to_owned(), value.to_owned()]);
        self
    }

    /// Reads the input document from the file at `path`.
    pub fn input(self, path: &Path) -> Eval {
        self.arg("--input", utf8(path))
    }

    /// Reads the input document from stdin (`--input -`), fed `input`.
    pub fn stdin(mut self, input: &[u8]) -> Eval {
        self.stdin = Some(input.to_vec());
        self.arg("--input", "-")
    }

    /// Writes the decision's audit lines to `path`.
    pub fn audit(self, path: &Path) -> Eval {
        self.arg("--audit", utf8(path))
    }

    /// Runs with the environment variables `env` added.
    pub fn env(mut self, env: &[(&str, &str)]) -> Eval {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Runs it with its module cache in `cache`.
    pub fn run(&self, cache: &Path) -> Output {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        sandgate_with_env(&args, cache, self.stdin.as_deref(), &env)
    }

    /// Runs it on the input document `input` written into `dir`, auditing to
    /// `dir/audit.jsonl` (emptied first); returns the output and the audit
    /// lines of this run.
    pub fn run_audited(
        self,
        dir: &Path,
        input: &str,
        cache: &Path,
    ) -> (Output, Vec<serde_json::Value>) {
        let input = write(dir, "input.json", input);
        let audit = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&audit);
        let out = self.input(&input).audit(&audit).run(cache);
        (out, audit_lines(&audit))
    }
}

/// A path as the UTF-8 argument the CLI takes.
fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}
