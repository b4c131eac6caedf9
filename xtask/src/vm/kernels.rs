//! Debian cloud kernels for the VM tests, fetched without installing them: resolve a meta
//! package (never a pinned version: old ones vanish from the archive) to its image package,
//! `apt-get download` it, and take `vmlinuz` out of it. Suites this machine's apt sources do not
//! have are reached through a private `APT_CONFIG` under `target/vm/apt/<spec>` (the host's
//! /etc/apt is left alone). Downloads are cached under `target/vm/kernels/<spec>`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _};

use crate::cmd;

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub struct Spec {
    /// What `--kernel` accepts.
    pub name: &'static str,
    /// Extra apt source (a private APT_CONFIG is used when set).
    source: Option<&'static str>,
    /// Meta package that depends on the newest image of that line, or — where the suite has
    /// no meta package per line — a `line:` prefix such as `line:linux-image-6.18.`, resolved to
    /// the newest `<prefix>*-cloud-amd64` by version order.
    meta: &'static str,
}

pub const SPECS: &[Spec] = &[
    Spec {
        name: "6.1",
        source: None,
        meta: "linux-image-cloud-amd64",
    },
    Spec {
        name: "6.12",
        source: None,
        meta: "linux-image-6.12-cloud-amd64",
    },
    Spec {
        name: "5.10",
        source: Some("http://deb.debian.org/debian-security bullseye-security main"),
        meta: "linux-image-cloud-amd64",
    },
    Spec {
        name: "6.18",
        source: Some("http://deb.debian.org/debian trixie-backports main"),
        meta: "line:linux-image-6.18.",
    },
    Spec {
        name: "backports",
        source: Some("http://deb.debian.org/debian trixie-backports main"),
        meta: "linux-image-cloud-amd64",
    },
];

pub const DEFAULT: &[&str] = &["6.1", "6.12"];
pub const WIDE: &[&str] = &["5.10", "6.1", "6.12", "6.18", "backports"];

pub fn spec(name: &str) -> anyhow::Result<&'static Spec> {
    SPECS.iter().find(|s| s.name == name).ok_or_else(|| {
        let known: Vec<_> = SPECS.iter().map(|s| s.name).collect();
        anyhow!("unknown kernel `{name}` (known: {})", known.join(", "))
    })
}

/// A kernel ready to boot.
pub struct Kernel {
    pub spec: &'static str,
    /// The image package it came from, e.g. linux-image-6.1.0-47-cloud-amd64.
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Uncompressed modules the guest loads at boot (sock_diag for TCP: Debian builds
    /// inet_diag and tcp_diag as modules, and the initramfs has no modprobe tree).
    pub modules: Vec<PathBuf>,
}

/// Modules to load, in order.
pub const MODULES: &[&str] = &["inet_diag", "tcp_diag"];

/// Finds `name.ko[.xz|.zst]` under the extracted package and writes it uncompressed to `dest`.
fn copy_module(extract: &Path, name: &str, dest: &Path) -> anyhow::Result<()> {
    let out = cmd::output(Command::new("find").arg(extract).args([
        "-name",
        &format!("{name}.ko*"),
        "-path",
        "*/net/ipv4/*",
    ]))?;
    let src = out
        .lines()
        .next()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("module {name} not in the kernel package"))?;
    let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("");
    let data = match ext {
        "ko" => fs::read(&src)?,
        "xz" => cmd::output_bytes(Command::new("xz").arg("-dc").arg(&src))?,
        "zst" => cmd::output_bytes(Command::new("zstd").arg("-dc").arg(&src))?,
        other => bail!(
            "module {} has an unknown compression `{other}`",
            src.display()
        ),
    };
    fs::write(dest, data)?;
    Ok(())
}

fn cached_modules(cache: &Path) -> Vec<PathBuf> {
    MODULES
        .iter()
        .map(|m| cache.join("modules").join(format!("{m}.ko")))
        .collect()
}

fn apt(dir: Option<&Path>, args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    if let Some(d) = dir {
        c.env("APT_CONFIG", d.join("apt.conf"));
    }
    c
}

/// Writes a private apt configuration for one extra suite and updates its lists.
fn private_apt(dir: &Path, source: &str) -> anyhow::Result<()> {
    for sub in [
        "state/lists/partial",
        "cache/archives/partial",
        "sources.list.d",
    ] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let status = dir.join("state/status");
    if !status.exists() {
        fs::write(&status, "")?;
    }
    fs::write(
        dir.join("sources.list"),
        format!("deb [signed-by={KEYRING}] {source}\n"),
    )?;
    let d = dir.display();
    fs::write(
        dir.join("apt.conf"),
        format!(
            "Dir::Etc::SourceList \"{d}/sources.list\";\nDir::Etc::SourceParts \"{d}/sources.list.d\";\n\
             Dir::State \"{d}/state\";\nDir::State::status \"{d}/state/status\";\nDir::Cache \"{d}/cache\";\n\
             APT::Architecture \"amd64\";\nAPT::Get::List-Cleanup \"false\";\n"
        ),
    )?;
    cmd::run(&mut apt(Some(dir), &["apt-get", "update", "-qq"]))
}

/// First `Depends:` of `package` whose name starts with `prefix`.
fn depends(dir: Option<&Path>, package: &str, prefix: &str) -> anyhow::Result<Option<String>> {
    let out = cmd::output(&mut apt(dir, &["apt-cache", "depends", package]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends: "))
        .map(str::trim)
        .find(|d| d.starts_with(prefix))
        .map(str::to_string))
}

/// The newest `<prefix>*-cloud-amd64` image package (Debian versions sort like `sort -V`).
fn newest(dir: Option<&Path>, prefix: &str) -> anyhow::Result<String> {
    let pattern = format!(
        "^{}[0-9.]+\\+deb[0-9]+-cloud-amd64$",
        prefix.replace('.', "\\.")
    );
    let found = cmd::output(&mut apt(
        dir,
        &["apt-cache", "search", "--names-only", &pattern],
    ))?;
    let mut names: Vec<&str> = found.lines().filter_map(|l| l.split(' ').next()).collect();
    names.sort_by_key(|n| version_key(n));
    names
        .last()
        .map(|s| s.to_string())
        .ok_or_else(|| anyhow!("no package matches {pattern}"))
}

/// Numeric parts of a package name, for version ordering (6.18.9 < 6.18.15).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let boot = dir.join("boot");
    if let Ok(rd) = fs::read_dir(&boot) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("vmlinuz") {
                return Some(e.path());
            }
        }
    }
    let modules = dir.join("usr/lib/modules");
    for e in fs::read_dir(modules).ok()?.flatten() {
        let p = e.path().join("vmlinuz");
        if p.exists() {
            return Some(p);
        }
    }
    None
}

fn download_and_extract(dir: Option<&Path>, package: &str, into: &Path) -> anyhow::Result<()> {
    // The cache under target/ belongs to root: download as root, not as apt's sandbox user.
    let args = [
        "apt-get",
        "download",
        "-qq",
        "-o",
        "APT::Sandbox::User=root",
        package,
    ];
    let download = || cmd::run(apt(dir, &args).current_dir(into));
    if download().is_err() {
        // Stale package lists name versions the archive no longer has: refresh once.
        cmd::run(&mut apt(dir, &["apt-get", "update", "-qq"]))?;
        download()?;
    }
    let deb = fs::read_dir(into)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .ok_or_else(|| anyhow!("apt-get download left no {package}_*.deb"))?;
    let extract = into.join("extract");
    fs::create_dir_all(&extract)?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extract))
}

/// Fetches (or reuses the cached copy of) the kernel for `spec`.
pub fn fetch(root: &Path, spec: &'static Spec) -> anyhow::Result<Kernel> {
    let cache = root.join("target/vm/kernels").join(spec.name);
    let vmlinuz = cache.join("vmlinuz");
    let pkg_file = cache.join("package");
    // `package` is written last: its presence means the cache is complete.
    if vmlinuz.exists() && pkg_file.exists() {
        return Ok(Kernel {
            spec: spec.name,
            package: fs::read_to_string(&pkg_file)?.trim().to_string(),
            vmlinuz,
            modules: cached_modules(&cache),
        });
    }
    let started = std::time::Instant::now();
    let work = cache.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let private = spec
        .source
        .map(|_| root.join("target/vm/apt").join(spec.name));
    if let (Some(dir), Some(source)) = (&private, spec.source) {
        private_apt(dir, source).with_context(|| format!("apt lists for {source}"))?;
    } else if depends(None, spec.meta, "linux-image-")
        .ok()
        .flatten()
        .is_none()
    {
        cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    }
    let dir = private.as_deref();
    let image = match spec.meta.strip_prefix("line:") {
        Some(prefix) => newest(dir, prefix)?,
        None => depends(dir, spec.meta, "linux-image-")?
            .ok_or_else(|| anyhow!("{} has no linux-image dependency", spec.meta))?,
    };
    download_and_extract(dir, &image, &work)?;
    if find_vmlinuz(&work.join("extract")).is_none() {
        // Newer packages keep the image in linux-binary-<version>.
        let binary = depends(dir, &image, "linux-binary-")?
            .ok_or_else(|| anyhow!("{image} has neither vmlinuz nor a linux-binary dependency"))?;
        download_and_extract(dir, &binary, &work)?;
    }
    let found = find_vmlinuz(&work.join("extract"))
        .ok_or_else(|| anyhow!("no vmlinuz found in {image}"))?;
    fs::copy(&found, &vmlinuz).with_context(|| format!("copying {}", found.display()))?;
    fs::create_dir_all(cache.join("modules"))?;
    if copy_module(
        &work.join("extract"),
        MODULES[0],
        &cached_modules(&cache)[0],
    )
    .is_err()
    {
        // Newer packages keep modules in linux-modules-<version>.
        let modules = depends(dir, &image, "linux-modules-")?
            .ok_or_else(|| anyhow!("{image} has no modules and no linux-modules dependency"))?;
        download_and_extract(dir, &modules, &work)?;
    }
    for (name, dest) in MODULES.iter().zip(cached_modules(&cache)) {
        copy_module(&work.join("extract"), name, &dest)?;
    }
    fs::write(&pkg_file, &image)?;
    let _ = fs::remove_dir_all(&work);
    eprintln!(
        "kernel {}: {image} in {:.1} s",
        spec.name,
        started.elapsed().as_secs_f64()
    );
    if !vmlinuz.exists() {
        bail!("kernel {} not cached", spec.name);
    }
    Ok(Kernel {
        spec: spec.name,
        package: image,
        vmlinuz,
        modules: cached_modules(&cache),
    })
}
