//! What the language-guest tests (`rego`, `cedar`) share: a module cache per
//! language, filled once by `sandgate check` on that language's example (the
//! guest modules are large: compiling one takes tens of seconds in a debug
//! build on a busy machine), and daemons started on it and waited on until
//! every policy settled, allowing for the policies' snapshot compiles; and
//! the seeded generator of their differential tests' inputs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::{Daemon, repo_root, sandgate};

/// How long a language daemon's policies may take to settle.
const SETTLE: Duration = Duration::from_secs(600);

/// A module cache shared by one language's tests.
pub struct SharedCache {
    /// The cache directory, relative to the repository root.
    dir: &'static str,
    /// The example config `sandgate check` fills it from, relative to the
    /// repository root.
    example: &'static str,
    filled: OnceLock<(PathBuf, String)>,
}

impl SharedCache {
    pub const fn new(dir: &'static str, example: &'static str) -> SharedCache {
        SharedCache {
            dir,
            example,
            filled: OnceLock::new(),
        }
    }

    /// The cache directory and the stdout of the `sandgate check` that
    /// filled it (on first use; later callers wait for it).
    pub fn filled(&self) -> (PathBuf, String) {
        self.filled
            .get_or_init(|| {
                let cache = repo_root().join(self.dir);
                let config = repo_root().join(self.example);
                let out = sandgate(
                    &["check", "--config", &config.display().to_string()],
                    &cache,
                );
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                (cache, String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .clone()
    }

    /// The cache directory (see [`SharedCache::filled`]).
    pub fn dir(&self) -> PathBuf {
        self.filled().0
    }

    /// A new module cache in `dir` holding only this cache's key and compiled
    /// modules: no module compiles again, while every policy's init runs
    /// (an init result cached by an earlier test run would skip it, and with
    /// it whatever init does that a test looks at).
    pub fn compiled_only(&self, dir: &Path) -> PathBuf {
        let from = tokio::task::block_in_place(|| self.dir());
        let to = dir.join("compiled-only-cache");
        std::fs::create_dir_all(&to).expect("cache dir");
        for entry in std::fs::read_dir(&from).expect("list the shared cache") {
            let path = entry.expect("cache entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name == "cache.key" || name.ends_with(".cwasm") {
                // `copy` keeps the owner-only mode the cache requires.
                std::fs::copy(&path, to.join(&*name)).expect("copy a cache entry");
            }
        }
        to
    }

    /// Starts the daemon of `config` on this cache and waits until `/readyz`
    /// says every policy settled (loaded or failed); returns the daemon and
    /// that answer's status and body.
    pub async fn start(&self, config: &Path, client: &reqwest::Client) -> (Daemon, u16, Value) {
        let cache = tokio::task::block_in_place(|| self.dir());
        let daemon = Daemon::start(config, &cache);
        let (status, body) = daemon.until_settled(client, SETTLE).await;
        (daemon, status, body)
    }
}

/// A tiny deterministic generator (xorshift64*), so a failure names the
/// seed and the case that reproduce it.
pub struct Seeded(pub u64);

impl Seeded {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}
