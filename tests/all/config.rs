//! Configuration (DESIGN §5): unknown keys and bad values are errors naming
//! the key and line; `check` prints what each policy is really granted.

use crate::support::*;

fn check(toml: &str) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempdir();
    write(&dir.path().join("data"), "roles.json", "{}");
    let module = write(dir.path(), "ok.wat", &abi_guest("", ALLOW_RESULT));
    let config = write(
        dir.path(),
        "sandgate.toml",
        &toml.replace("MODULE", module.to_str().expect("UTF-8 path")),
    );
    let out = sandgate(
        &["check", "--config", config.to_str().expect("UTF-8 path")],
        &dir.path().join("c"),
    );
    (out, dir)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unknown_keys_are_errors_naming_the_key_and_line() {
    let (out, _d) = check("[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\ntimeout = 5\n");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("sandgate.toml:4") && err.contains("unknown field `timeout`"),
        "{err}"
    );

    let (out, _d) = check("[server]\nlisten = \"127.0.0.1:1\"\nlisten_grpc = \"x\"\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("sandgate.toml:3"), "{}", stderr(&out));
}

#[test]
fn bad_values_are_errors_naming_the_key_and_line() {
    for (toml, line, needle) in [
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\ntimeout_ms = 0\n",
            4,
            "timeout_ms (policy `p`): 0 is out of range",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\nfail_mode = \"maybe\"\n",
            4,
            "maybe",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n[policy.wasi]\nallow = [\"clock\", \"network\"]\n",
            5,
            "`network` is neither a group",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n[policy.wasi]\non_denied = \"ignore\"\n",
            5,
            "ignore",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\nsha256 = \"abc\"\n",
            4,
            "not a sha256 digest",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"https://example.com/p.wasm\"\n",
            3,
            "pinned with `sha256`",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n[policy.wasi]\nallow = [\"fs_read\"]\npreopens = [{ host = \"data\", guest = \"/data\", mode = \"rw\" }]\n",
            6,
            "`fs_write` is not in wasi.allow",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n[policy.wasi]\npreopens = [{ host = \"data\", guest = \"/data\", mode = \"ro\" }]\n",
            5,
            "`fs_read` is not in wasi.allow",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n[policy.wasi]\nallow = [\"fs_read\"]\npreopens = [{ host = \"missing\", guest = \"/data\", mode = \"ro\" }]\n",
            6,
            "missing",
        ),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n[policy.wasi]\nenv = [\"TZ\"]\n",
            5,
            "`env` is not in wasi.allow",
        ),
        ("[server]\nlisten = \"localhost\"\n", 2, "server.listen"),
        (
            "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\n",
            5,
            "duplicate policy name",
        ),
    ] {
        let (out, _d) = check(toml);
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("sandgate.toml:{line}")),
            "line {line} for {toml}: {err}"
        );
        assert!(err.contains(needle), "{needle} for {toml}: {err}");
    }
}

#[test]
fn digest_mismatch_is_refused_naming_both_digests() {
    let zero = "0".repeat(64);
    let (out, _d) = check(&format!(
        "[[policy]]\nname = \"p\"\nmodule = \"MODULE\"\nsha256 = \"{zero}\"\n"
    ));
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("config pins sha256:{zero}")) && err.contains("has digest sha256:"),
        "{err}"
    );
}

#[test]
fn check_prints_the_effective_grants_of_every_policy() {
    let toml = "[[policy]]\nname = \"orders\"\nmodule = \"MODULE\"\ntimeout_ms = 40\n[policy.wasi]\nallow = [\"clock\", \"fs_read\"]\npreopens = [{ host = \"data\", guest = \"/data\", mode = \"ro\" }]\n";
    let (out, dir) = check(toml);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policy orders"), "{text}");
    assert!(text.contains("timeout 40 ms"), "{text}");
    assert!(
        text.contains("clock_time_get")
            && text.contains("path_open")
            && !text.contains("random_get"),
        "{text}"
    );
    assert!(text.contains("-> /data (ro)"), "{text}");

    let config = dir.path().join("sandgate.toml");
    let out = sandgate(
        &[
            "check",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--json",
        ],
        &dir.path().join("c"),
    );
    let report = stdout_json(&out);
    let p = &report["policies"][0];
    assert_eq!(p["name"], "orders");
    assert_eq!(p["wasi"]["on_denied"], "errno");
    assert_eq!(p["wasi"]["preopens"][0]["mode"], "ro");
    assert!(
        p["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
}

#[test]
fn check_fails_when_a_module_is_missing() {
    let (out, _d) = check("[[policy]]\nname = \"p\"\nmodule = \"nowhere.wasm\"\n");
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("nowhere.wasm"), "{}", stderr(&out));
}
