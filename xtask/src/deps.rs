//! Debian packages the commands need, installed when missing.

use std::process::Command;

use anyhow::bail;

use crate::exec::{exec, is_root};

/// Packages every build and test needs: clang and libbpf headers for the
/// eBPF programs; a C toolchain and kernel headers for the test helpers
/// (fake libcuda, network load); util-linux for `setpriv`.
pub(crate) const BUILD: &[&str] = &[
    "clang",
    "libbpf-dev",
    "llvm",
    "gcc",
    "libc6-dev",
    "linux-libc-dev",
    "util-linux",
];

/// Packages only the end-to-end tests need: tmux, the terminal that
/// `tests/e2e/tests/top.rs` runs `tally top` in; iproute2, whose `ip netns`
/// gives `tests/e2e/tests/partition.rs` its hosts.
pub(crate) const TEST: &[&str] = &["tmux", "iproute2"];

/// True when dpkg has `package` installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing ones of `packages` (as root), or says exactly how.
pub(crate) fn ensure(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: run `sudo apt-get update && sudo apt-get install -y {}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
