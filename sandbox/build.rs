//! Builds the eBPF programs of `ebpf-probes/` for `bpfel-unknown-none`
//! (nightly Rust with `rust-src`, linked by `bpf-linker`) and leaves the
//! object in `OUT_DIR`, where `src/probes.rs` embeds it in the daemon.
//!
//! `AYA_BUILD_SKIP=1` builds a daemon without probes: the object is then
//! empty and the daemon says so wherever probes are reported.
//!
//! It also builds the language guests of `guests/` (Rego and Cedar)
//! for `wasm32-wasip1` with the `guest` profile, in a target directory of its
//! own under `OUT_DIR` (so the nested cargo never waits on the outer build's
//! lock), and leaves `sandgate_rego.wasm` and `sandgate_cedar.wasm` in `OUT_DIR`, where
//! `src/language.rs` embeds it.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

const OBJECT: &str = "sandgate-probes";

/// The language guests: package, and the module it builds.
const GUESTS: [(&str, &str); 2] = [
    ("sandgate-rego", "sandgate_rego.wasm"),
    ("sandgate-cedar", "sandgate_cedar.wasm"),
];

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let workspace =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?).join("..");
    build_guests(&workspace, &out_dir)?;
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if skip {
        fs::write(out_dir.join(OBJECT), [])?;
        println!("cargo:warning=AYA_BUILD_SKIP is set: this daemon is built without eBPF probes");
        return Ok(());
    }
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?)
        .join("..")
        .join("ebpf-probes");
    let root = root.to_str().context("the ebpf-probes path is not UTF-8")?;
    let package = aya_build::Package {
        name: "sandgate-ebpf-probes",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly).context(
        "cannot build the eBPF probes (ebpf-probes/): they need nightly Rust with rust-src and \
         bpf-linker (scripts/setup installs both); AYA_BUILD_SKIP=1 builds a daemon without probes",
    )?;
    anyhow::ensure!(
        out_dir.join(OBJECT).is_file(),
        "building ebpf-probes/ produced no {OBJECT} object"
    );
    Ok(())
}

/// Builds the language guests with a nested cargo for `wasm32-wasip1`.
fn build_guests(workspace: &Path, out_dir: &Path) -> anyhow::Result<()> {
    // The workspace manifest holds the `guest` profile the guests build with.
    for watched in [
        "guests",
        "guest-sdk/src",
        "guest-sdk/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let target_dir = out_dir.join("guests");
    // One cargo run per guest: built together, the guests would share one
    // set of features per dependency, and cedar-policy's (serde_json's
    // `preserve_order`, an IndexMap seeded by std's RandomState) would make
    // the Rego guest draw random numbers at evaluation, which its grants
    // refuse.
    for (package, _) in GUESTS {
        build_guest(workspace, &target_dir, package)?;
    }
    let built = target_dir.join("wasm32-wasip1").join("guest");
    for (package, module) in GUESTS {
        fs::copy(built.join(module), out_dir.join(module))
            .with_context(|| format!("building {package} produced no {module}"))?;
    }
    Ok(())
}

/// Builds one language guest for `wasm32-wasip1` into `target_dir`.
fn build_guest(workspace: &Path, target_dir: &Path, package: &str) -> anyhow::Result<()> {
    // The guests are built by the default toolchain (the one `scripts/setup`
    // gives the `wasm32-wasip1` target), also when the outer build runs on
    // another one, as the fuzz targets do on nightly.
    let mut command = Command::new("cargo");
    command
        .current_dir(workspace)
        .args([
            "build",
            "--locked",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip1",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .args(["-p", package]);
    // The outer build's compiler settings are for the host, not the guests.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        command.env_remove(key);
    }
    // Cargo reads a build script's stdout as instructions: keep the nested
    // build's output on stderr.
    let status = command
        .stdout(std::io::stderr())
        .status()
        .context("cannot run cargo to build the language guests (guests/)")?;
    anyhow::ensure!(
        status.success(),
        "building the language guest {package} (guests/) for wasm32-wasip1 failed ({status}); \
         the target is installed with `rustup target add wasm32-wasip1`"
    );
    Ok(())
}
