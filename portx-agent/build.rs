//! Compiles `portx-ebpf` for `bpfel-unknown-none` (through aya-build) so that the agent can embed
//! the object with `include_bytes_aligned!`. Needs a toolchain with `rust-src` and `bpf-linker` on
//! PATH; `cargo xtask setup` installs both. `PORTX_EBPF_TOOLCHAIN` picks the rustup toolchain
//! (default `nightly`; `stable` with `RUSTC_BOOTSTRAP=1` works too).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PORTX_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../portx-common/src");
    let toolchain = std::env::var("PORTX_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let package = aya_build::Package {
        name: "portx-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../portx-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).with_context(|| {
        format!(
            "building the eBPF programs with the `{toolchain}` toolchain failed; \
             run `cargo xtask setup` (rust-src + bpf-linker) first"
        )
    })
}
