//! The compiled-module cache trusts nothing it did not write itself: entries
//! planted, copied between digests or altered are refused before anything
//! is deserialised (the pinned module answers, a warning is logged), and a
//! cache directory another user owns or may write is not used at all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sandgate::config::Digest;
use serde_json::Value;

use crate::support::*;

/// What the daemon logs when it refuses a cache entry.
const ENTRY_REFUSED: &str = "cache entry refused, not deserialised";

/// What the daemon logs when it refuses the cache directory.
const DIR_REFUSED: &str = "module cache refused";

/// The compiled entry of `digest` in `cache` (one per digest and engine).
fn entry_of(cache: &Path, digest: &Digest) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(cache)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "cwasm")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&digest.hex()))
        })
        .collect();
    assert_eq!(entries.len(), 1, "one entry for {digest}: {entries:?}");
    entries.into_iter().next().expect("entry")
}

fn compiled_entries(cache: &Path) -> usize {
    std::fs::read_dir(cache).map_or(0, |rd| {
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .count()
    })
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `sandgate check --json`, which must succeed.
fn check_json(config: &Path, cache: &Path) -> Value {
    let out = sandgate(&["check", "--config", utf8(config), "--json"], cache);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    stdout_json(&out)
}

/// The report of policy `name` in `check --json` output.
fn policy<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("policy {name} in {report}"))
}

/// `sandgate eval` of policy `name`; the process must exit by itself with 0.
fn eval(config: &Path, name: &str, cache: &Path) -> (Value, String) {
    let input = write(
        config.parent().expect("config dir"),
        "input.json",
        r#"{"user":"alice"}"#,
    );
    let out = Eval::policy(config, name).input(&input).run(cache);
    assert_eq!(
        out.status.code(),
        Some(0),
        "eval must exit 0 (not die by a signal): {}",
        stderr(&out)
    );
    (stdout_json(&out), stderr(&out))
}

/// Two policies: `allowed` always allows, `denied` always denies.
fn two_policies(dir: &Path) -> (PathBuf, Digest, Digest) {
    let allow = abi_guest("", ALLOW_RESULT);
    let deny = abi_guest("", DENY_RESULT);
    let allow_path = write(dir, "allow.wat", &allow);
    let deny_path = write(dir, "deny.wat", &deny);
    let config = write(
        dir,
        "sandgate.toml",
        &format!(
            "[[policy]]\nname = \"allowed\"\nmodule = \"{}\"\n\n[[policy]]\nname = \"denied\"\nmodule = \"{}\"\n",
            allow_path.display(),
            deny_path.display()
        ),
    );
    (
        config,
        Digest::of(allow.as_bytes()),
        Digest::of(deny.as_bytes()),
    )
}

#[test]
fn an_entry_copied_over_another_policys_entry_is_refused_and_the_pinned_module_answers() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let (config, allow, deny) = two_policies(dir.path());
    let report = check_json(&config, &cache);
    assert_eq!(policy(&report, "allowed")["compiled_from"], "compiled");

    // A valid entry of the denying module, in place of the allowing one's.
    std::fs::copy(entry_of(&cache, &deny), entry_of(&cache, &allow)).expect("copy entry");

    let (decision, logs) = eval(&config, "allowed", &cache);
    assert_eq!(decision, serde_json::json!({"allow": true}), "{logs}");
    assert!(logs.contains(ENTRY_REFUSED), "{logs}");
    assert!(
        logs.contains(&allow.to_string()),
        "names the digest: {logs}"
    );

    // The refused entry was replaced by an intact one.
    let report = check_json(&config, &cache);
    let allowed = policy(&report, "allowed");
    assert_eq!(allowed["compiled_from"], "disk cache");
    assert_eq!(allowed["digest"], allow.to_string());
    let (decision, logs) = eval(&config, "allowed", &cache);
    assert_eq!(decision, serde_json::json!({"allow": true}));
    assert!(!logs.contains(ENTRY_REFUSED), "{logs}");
}

#[test]
fn a_mutated_entry_with_a_recomputed_plain_checksum_is_never_deserialised() {
    use sha2::Digest as _;
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let (config, allow, _) = two_policies(dir.path());
    check_json(&config, &cache);

    // Rewrite the allow document inside the compiled code, then fix up the
    // 32 bytes after the 8-byte format tag as a plain sha256 of the rest.
    let entry = entry_of(&cache, &allow);
    let mut bytes = std::fs::read(&entry).expect("read entry");
    let needle = br#"{"allow":true}"#;
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the guest's data is in the compiled entry");
    bytes[at..at + needle.len()].copy_from_slice(br#"{"allow":nope}"#);
    let sum = sha2::Sha256::digest(&bytes[40..]);
    bytes[8..40].copy_from_slice(&sum);
    std::fs::write(&entry, &bytes).expect("write forged entry");

    let (decision, logs) = eval(&config, "allowed", &cache);
    assert_eq!(decision, serde_json::json!({"allow": true}), "{logs}");
    assert!(logs.contains(ENTRY_REFUSED), "{logs}");
    let report = check_json(&config, &cache);
    assert_eq!(policy(&report, "allowed")["compiled_from"], "disk cache");
}

/// Serves one module over loopback HTTP and counts the requests.
struct ModuleServer {
    url: String,
    served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ModuleServer {
    async fn start(bytes: Vec<u8>) -> ModuleServer {
        let served = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&served);
        let app = axum::Router::new().route(
            "/m.wasm",
            axum::routing::get(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                let bytes = bytes.clone();
                async move { bytes }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind module server");
        let url = format!(
            "http://{}/m.wasm",
            listener.local_addr().expect("module server address")
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ModuleServer { url, served, task }
    }
}

impl Drop for ModuleServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_entry_does_not_defeat_the_sha256_pin_of_a_url_module() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let (files, _, deny) = two_policies(dir.path());
    let allow = abi_guest("", ALLOW_RESULT).into_bytes();
    let pinned = Digest::of(&allow);
    let server = ModuleServer::start(allow).await;

    // A valid entry (of the denying module) planted under the pinned digest's name.
    let (files_, cache_) = (files.clone(), cache.clone());
    tokio::task::spawn_blocking(move || check_json(&files_, &cache_))
        .await
        .expect("check");
    let denying = entry_of(&cache, &deny);
    let name = denying
        .file_name()
        .and_then(|n| n.to_str())
        .expect("entry name")
        .replace(&deny.hex(), &pinned.hex());
    std::fs::copy(&denying, cache.join(name)).expect("plant entry");

    let config = write(
        dir.path(),
        "remote.toml",
        &format!(
            "[engine]\nallow_insecure_http = true\n\n[[policy]]\nname = \"remote\"\nmodule = \"{}\"\nsha256 = \"{}\"\n",
            server.url,
            pinned.hex()
        ),
    );
    let (config_, cache_) = (config.clone(), cache.clone());
    let (report, (decision, logs)) = tokio::task::spawn_blocking(move || {
        (
            check_json(&config_, &cache_),
            eval(&config_, "remote", &cache_),
        )
    })
    .await
    .expect("check and eval");
    let remote = policy(&report, "remote");
    assert_eq!(remote["compiled_from"], "compiled", "{report}");
    assert_eq!(remote["fetched_from"], "network", "{report}");
    assert!(server.served.load(Ordering::Relaxed) >= 1);
    assert_eq!(decision, serde_json::json!({"allow": true}), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_writable_cache_dir_is_refused_and_reported_while_the_daemon_serves() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).expect("cache dir");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let module = write(dir.path(), "allow.wat", &abi_guest("", ALLOW_RESULT));
    let config = write(
        dir.path(),
        "sandgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n{}",
            policy_toml(&module, "")
        ),
    );
    let daemon = Daemon::start(&config, &cache);
    let client = client();
    let ready = daemon.ready(&client).await;
    assert_eq!(ready["module_cache"]["state"], "refused", "{ready}");
    let reason = ready["module_cache"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("writable by its group or others"),
        "{ready}"
    );
    let answer = json_body(
        client
            .post(daemon.url("/v1/policies/p/evaluate"))
            .body("{}")
            .send()
            .await
            .expect("evaluate"),
    )
    .await;
    assert_eq!(answer["allow"], true, "{answer}");
    let logs = daemon.logs();
    assert!(logs.contains(DIR_REFUSED), "{logs}");
    assert!(logs.contains(utf8(&cache)), "names the directory: {logs}");
    // Nothing was read from, or written to, the refused directory.
    assert_eq!(compiled_entries(&cache), 0);
    assert!(!cache.join("cache.key").exists());
}

#[test]
fn a_cache_dir_of_another_user_or_writable_by_its_group_is_refused_by_check() {
    let dir = tempdir();
    let module = write(dir.path(), "allow.wat", &abi_guest("", ALLOW_RESULT));
    let config = write(dir.path(), "sandgate.toml", &policy_toml(&module, ""));

    let group_writable = dir.path().join("group");
    std::fs::create_dir(&group_writable).expect("dir");
    std::fs::set_permissions(&group_writable, std::fs::Permissions::from_mode(0o770))
        .expect("chmod");
    // Another user's directory: as root, one given away; else the root directory.
    let foreign = if rustix::process::geteuid().is_root() {
        let foreign = dir.path().join("foreign");
        std::fs::create_dir(&foreign).expect("dir");
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
        foreign
    } else {
        PathBuf::from("/")
    };
    for (cache, reason) in [
        (&group_writable, "writable by its group or others"),
        (&foreign, "not by the daemon's uid"),
    ] {
        let out = sandgate(&["check", "--config", utf8(&config)], cache);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
        assert!(
            text.contains("module cache refused") && text.contains(reason),
            "{text}"
        );
        assert!(stderr(&out).contains(DIR_REFUSED), "{}", stderr(&out));
        let report = check_json(&config, cache);
        assert_eq!(report["module_cache"]["state"], "refused", "{report}");
        assert_eq!(policy(&report, "p")["compiled_from"], "compiled");
        assert_eq!(compiled_entries(cache), 0, "nothing written to {cache:?}");
    }
}
