//! sandgate's eBPF programs (see `programs`; the BPF LSM programs of
//! `[ebpf] enforce` are in `enforce`). Built for `bpfel-unknown-none`
//! by the sandgate crate's build script; on any other target this is an
//! empty program, so workspace-wide builds and lints work everywhere.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod enforce;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "sandgate-probes is an eBPF object: the sandgate crate's build script builds it for \
         bpfel-unknown-none and embeds it in the daemon"
    );
    std::process::exit(2);
}
