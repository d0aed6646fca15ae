//! The example policies, built for wasm32-wasip1 by the test run and
//! evaluated with their own `policy.toml`.

use std::path::{Path, PathBuf};

use crate::support::*;

/// Copies `examples/<name>` (config, data, inputs) into a temp dir whose config
/// points at the built module, so tests may edit the data freely.
fn example(name: &str, module: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let src = repo_root().join("examples").join(name);
    copy_dir(&src.join("data"), &dir.path().join("data"));
    let toml = std::fs::read_to_string(src.join("policy.toml")).expect("policy.toml");
    let built = guest(module);
    let toml: String = toml
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("module =") {
                format!("module = \"{}\"", built.display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = write(dir.path(), "policy.toml", &toml);
    (dir, config)
}

fn copy_dir(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in entries.flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

fn eval(
    config: &Path,
    policy: &str,
    input: &str,
    env: &[(&str, &str)],
) -> (std::process::Output, Vec<serde_json::Value>) {
    let dir = config.parent().expect("config dir");
    Eval::policy(config, policy)
        .env(env)
        .run_audited(dir, input, &dir.join("cache"))
}

#[test]
fn rbac_allows_by_role_and_reads_its_table_from_the_read_only_preopen() {
    let (dir, config) = example("rbac", "rbac");
    let sample = std::fs::read_to_string(repo_root().join("examples/rbac/input.json"))
        .expect("sample input");
    let (out, audit) = eval(&config, "rbac", &sample, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision = stdout_json(&out);
    assert_eq!(decision["allow"], true, "{decision}");
    assert_eq!(decision["headers"]["x-user"], "alice");
    assert!(
        audit.iter().all(|l| l["kind"] != "wasi_denied"),
        "rbac needs nothing it is not granted: {audit:?}"
    );

    let delete = r#"{"subject":{"id":"alice","roles":["viewer"]},"action":"delete","resource":{"type":"orders","id":"7"}}"#;
    let decision = stdout_json(&eval(&config, "rbac", delete, &[]).0);
    assert_eq!(decision["allow"], false);
    assert_eq!(decision["status"], 403);
    let reason = decision["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("alice") && reason.contains("delete") && reason.contains("orders"),
        "{reason}"
    );

    // The table is read on every evaluation: granting viewers delete changes the answer.
    std::fs::write(
        dir.path().join("data/roles.json"),
        r#"{"roles":{"viewer":{"orders":["read","delete"]}}}"#,
    )
    .expect("edit roles");
    assert_eq!(
        stdout_json(&eval(&config, "rbac", delete, &[]).0)["allow"],
        true
    );

    // No readable table: fail closed, saying why.
    std::fs::remove_file(dir.path().join("data/roles.json")).expect("remove roles");
    let decision = stdout_json(&eval(&config, "rbac", &sample, &[]).0);
    assert_eq!(decision["allow"], false);
    assert!(
        decision["reason"]
            .as_str()
            .is_some_and(|r| r.contains("roles.json")),
        "{decision}"
    );
}

#[test]
fn rbac_answers_forward_auth_requests() {
    let (_dir, config) = example("rbac", "rbac");
    let sample = std::fs::read_to_string(repo_root().join("examples/rbac/forward-auth-input.json"))
        .expect("sample");
    let decision = stdout_json(&eval(&config, "rbac", &sample, &[]).0);
    assert!(decision["allow"].is_boolean(), "{decision}");
    let get = r#"{"request":{"method":"GET","path":"/api/orders/7","headers":{"x-user":"bob","x-roles":"viewer"}}}"#;
    let decision = stdout_json(&eval(&config, "rbac", get, &[]).0);
    assert_eq!(decision["allow"], true, "{decision}");
    assert_eq!(decision["headers"]["x-user"], "bob");
    let post = r#"{"request":{"method":"POST","path":"/api/orders","headers":{"x-user":"bob","x-roles":"viewer"}}}"#;
    assert_eq!(
        stdout_json(&eval(&config, "rbac", post, &[]).0)["allow"],
        false
    );
}

#[test]
fn abac_owner_allows_owners_only_within_the_configured_hours() {
    let (_dir, config) = example("abac-owner", "abac_owner");
    let own = r#"{"subject":{"id":"alice"},"resource":{"type":"orders","id":"7","owner":"alice"}}"#;
    let other = r#"{"subject":{"id":"bob"},"resource":{"type":"orders","id":"7","owner":"alice"}}"#;
    let always = [("ABAC_BUSINESS_HOURS", "0-24")];
    let (out, audit) = eval(&config, "abac-owner", own, &always);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_json(&out)["allow"],
        true,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        audit.iter().all(|l| l["kind"] != "wasi_denied"),
        "{audit:?}"
    );
    assert_eq!(
        stdout_json(&eval(&config, "abac-owner", other, &always).0)["allow"],
        false
    );

    // A window that excludes the current hour denies even the owner.
    let hour = time::OffsetDateTime::now_utc().hour();
    let closed = if hour < 12 { "12-24" } else { "0-12" };
    let decision = stdout_json(
        &eval(
            &config,
            "abac-owner",
            own,
            &[("ABAC_BUSINESS_HOURS", closed)],
        )
        .0,
    );
    assert_eq!(decision["allow"], false, "{decision}");

    // Unset: deny, naming the variable (no silent default).
    let decision = stdout_json(&eval(&config, "abac-owner", own, &[]).0);
    assert_eq!(decision["allow"], false);
    assert!(
        decision["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ABAC_BUSINESS_HOURS")),
        "{decision}"
    );
}

#[test]
fn snoop_is_refused_everything_and_every_attempt_is_audited() {
    let (dir, config) = example("snoop", "snoop");
    let (out, audit) = eval(&config, "snoop", "{}", &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision = stdout_json(&out);
    assert_eq!(decision["allow"], false);
    let attempts = &decision["obligations"]["attempts"];
    for key in [
        "escape_passwd",
        "absolute_passwd",
        "environ",
        "random",
        "sock_accept",
        "sock_send",
        "write_ro_preopen",
        "unlink_ro_preopen",
    ] {
        assert_eq!(
            attempts[key], 76,
            "{key} must get ERRNO_NOTCAPABLE: {decision}"
        );
    }
    let calls: Vec<(&str, &str)> = audit
        .iter()
        .filter(|l| l["kind"] == "wasi_denied")
        .map(|l| {
            (
                l["call"].as_str().unwrap_or(""),
                l["detail"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            ("path_open", "../../etc/passwd"),
            ("path_open", "/etc/passwd"),
            ("environ_sizes_get", "environment"),
            ("random_get", "16 bytes"),
            ("sock_accept", "fd 3"),
            ("sock_send", "fd 3"),
            ("path_open", "pwned.txt"),
            ("path_unlink_file", "readme.txt"),
        ],
        "{audit:?}"
    );
    assert!(dir.path().join("data/readme.txt").exists());
    assert!(!dir.path().join("data/pwned.txt").exists());
    // What the guest printed is in the daemon log, not in the answer.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy=snoop"));
}
