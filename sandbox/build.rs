//! Builds the eBPF programs of `ebpf-probes/` for `bpfel-unknown-none`
//! (nightly Rust with `rust-src`, linked by `bpf-linker`) and leaves the
//! object in `OUT_DIR`, where `src/probes.rs` embeds it in the daemon.
//!
//! `AYA_BUILD_SKIP=1` builds a daemon without probes: the object is then
//! empty and the daemon says so wherever probes are reported.

use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

const OBJECT: &str = "sandgate-probes";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
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
