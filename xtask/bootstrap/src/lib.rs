//! Debian packages the xtask commands need, installed when missing (as
//! root), or the exact `apt-get` line to run (otherwise).
//!
//! Shared by the bootstrap binary ([`BUILD`], before the xtask is
//! compiled) and the xtask itself (packages only some commands need).

use std::{io, process::Command};

/// Packages every build and test needs, installed by the bootstrap before
/// every `cargo xtask` command: clang and libbpf headers for the eBPF
/// programs; a C toolchain and kernel headers for the test helpers (fake
/// libcuda, network load); util-linux for `setpriv`.
pub const BUILD: &[&str] = &[
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
pub const TEST: &[&str] = &["tmux", "iproute2"];

/// True when dpkg has `package` installed.
pub fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing ones of `packages`.
pub fn ensure(packages: &[&str]) -> io::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    install(&missing)
}

/// Installs `packages` with apt-get as root; otherwise fails with the
/// command to run.
pub fn install(packages: &[&str]) -> io::Result<()> {
    let list = packages.join(" ");
    if !is_root() {
        return Err(io::Error::other(format!(
            "missing Debian packages: run `sudo apt-get update && sudo apt-get install -y {list}`"
        )));
    }
    eprintln!("xtask: installing {list}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// True when the effective uid is 0 (read from /proc: no libc binding).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {shown}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{shown} failed: {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_tells_an_installed_package_from_an_absent_one() {
        // dpkg itself is on every Debian machine these commands run on.
        assert!(installed("dpkg"));
        assert!(!installed("tally-no-such-package"));
    }

    #[test]
    fn nothing_is_installed_when_nothing_is_missing() {
        // No apt-get run (it would fail without root, and take minutes with
        // it): every package named is there.
        ensure(&["dpkg", "coreutils"]).expect("nothing to install");
    }

    #[test]
    fn cargo_xtask_starts_here_and_this_needs_nothing_but_rust() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let config = std::fs::read_to_string(root.join(".cargo/config.toml")).expect("config");
        let alias = r#"xtask = "run --quiet --package xtask-bootstrap --""#;
        assert!(
            config.lines().any(|l| l.trim() == alias),
            "`cargo xtask` must start with the bootstrap ({alias}):\n{config}"
        );
        // Anything it depended on could itself need a package it installs.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["tree", "--offline", "-p", "xtask-bootstrap"])
            .args(["-e", "normal,build", "--prefix", "none"])
            .current_dir(&root)
            .output()
            .expect("cargo tree");
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            tree.lines().count(),
            1,
            "the bootstrap must depend on nothing:\n{tree}"
        );
    }
}
