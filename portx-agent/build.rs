//! Compiles `portx-ebpf` for `bpfel-unknown-none` (through aya-build) so that the agent can embed
//! the object with `include_bytes_aligned!`. Needs `bpf-linker` on PATH and a toolchain with
//! `rust-src` (`cargo xtask setup` installs both). The nightly is used when it has `rust-src`;
//! otherwise stable with `RUSTC_BOOTSTRAP=1` (which builds the same object).
//! `PORTX_EBPF_TOOLCHAIN` overrides the choice.
use std::process::Command;

use anyhow::Context as _;

fn has_rust_src(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustc")
        .args([&format!("+{toolchain}"), "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    out.status.success()
        && std::path::Path::new(&sysroot)
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PORTX_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../portx-common/src");
    let toolchain = match std::env::var("PORTX_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) if has_rust_src("nightly") => "nightly".to_string(),
        Err(_) => {
            println!("cargo:warning=nightly with rust-src not found; building the eBPF object with stable and RUSTC_BOOTSTRAP=1");
            // aya-build reads RUSTC_BOOTSTRAP to decide on -Z build-std; this build script is
            // single-threaded, so setting the variable here is sound.
            std::env::set_var("RUSTC_BOOTSTRAP", "1");
            "stable".to_string()
        }
    };
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
