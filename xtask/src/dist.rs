//! `cargo xtask dist`: the bundle that travels to a GPU machine.
//!
//! `target/dist/` holds a stripped, LTO-built `tally` (profile
//! `portable`), the GPU check (`tests/gpu/check.sh`, its README) and
//! `gpu-hold`, a small C program that holds GPU memory through the driver
//! API. The machine it goes to has the driver but no toolchain, so nothing
//! in it may need more than glibc: the highest `GLIBC_x.y` symbol version
//! the binaries need is printed (and written to `BUILD-INFO`), and the
//! bundle must stay under [`MAX_BYTES`].

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::exec::{cargo, exec, target_dir, workspace_root};

/// The bundle's size limit (25 MiB): it is copied to a lent machine.
pub(crate) const MAX_BYTES: u64 = 25 << 20;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {}

pub(crate) fn run(_o: Options) -> anyhow::Result<()> {
    exec(cargo().args([
        "build",
        "--profile",
        "portable",
        "-p",
        "tally",
        "--bin",
        "tally",
    ]))?;

    let root = workspace_root();
    let dist = target_dir().join("dist");
    if dist.exists() {
        fs::remove_dir_all(&dist).with_context(|| format!("remove {}", dist.display()))?;
    }
    fs::create_dir_all(&dist).with_context(|| format!("create {}", dist.display()))?;
    copy(&target_dir().join("portable/tally"), &dist.join("tally"))?;
    copy(&root.join("tests/gpu/check.sh"), &dist.join("check.sh"))?;
    copy(&root.join("tests/gpu/README.md"), &dist.join("README.md"))?;
    exec(Command::new("cc").args([
        "-O2".as_ref(),
        "-Wall".as_ref(),
        "-s".as_ref(),
        "-o".as_ref(),
        dist.join("gpu-hold").as_os_str(),
        root.join("tests/gpu/gpu-hold.c").as_os_str(),
    ]))?;

    // The bundled tally must at least start here.
    let version = Command::new(dist.join("tally"))
        .arg("--version")
        .output()
        .context("run target/dist/tally --version")?;
    if !version.status.success() {
        bail!("target/dist/tally --version failed: {}", version.status);
    }
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();

    let mut info = format!("{version}\n");
    for bin in ["tally", "gpu-hold"] {
        let glibc = max_glibc(&dist.join(bin))?;
        let shown = glibc.map_or("none".into(), |(a, b)| format!("GLIBC_{a}.{b}"));
        println!("xtask: dist/{bin} needs glibc symbol versions up to {shown}");
        info.push_str(&format!("{bin}: highest glibc symbol version {shown}\n"));
    }
    fs::write(dist.join("BUILD-INFO"), info).context("write BUILD-INFO")?;

    let mut total = 0;
    for entry in fs::read_dir(&dist)? {
        let entry = entry?;
        let len = entry.metadata()?.len();
        println!(
            "xtask: dist/{:<10} {:>6.2} MiB",
            entry.file_name().to_string_lossy(),
            mib(len)
        );
        total += len;
    }
    println!(
        "xtask: {} holds {:.2} MiB (limit {:.0} MiB); copy it to the GPU machine and run \
         `sudo ./check.sh --tally ./tally --out out`",
        dist.display(),
        mib(total),
        mib(MAX_BYTES)
    );
    if total >= MAX_BYTES {
        bail!(
            "the bundle is {:.2} MiB, over the {:.0} MiB limit",
            mib(total),
            mib(MAX_BYTES)
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))
}

/// The highest `GLIBC_x.y` version among `bin`'s dynamic symbols
/// (`objdump -T`), or `None` for a binary that needs no glibc symbol.
fn max_glibc(bin: &Path) -> anyhow::Result<Option<(u32, u32)>> {
    let out = Command::new("objdump")
        .arg("-T")
        .arg(bin)
        .output()
        .context("run objdump -T (binutils)")?;
    if !out.status.success() {
        bail!("objdump -T {} failed: {}", bin.display(), out.status);
    }
    Ok(glibc_versions(&String::from_utf8_lossy(&out.stdout)).max())
}

/// Every `GLIBC_x.y[.z]` version named in `objdump -T` output, as (x, y).
fn glibc_versions(text: &str) -> impl Iterator<Item = (u32, u32)> + '_ {
    text.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_glibc_version_is_found() {
        let text = "\
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.2.5) write
0000000000000000      DF *UND*  0000000000000000  GLIBC_2.34  __libc_start_main
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.9)  pipe2
0000000000000000  w   D  *UND*  0000000000000000 (GLIBC_PRIVATE) _dl_x
";
        assert_eq!(glibc_versions(text).max(), Some((2, 34)));
        assert_eq!(glibc_versions("no versions").max(), None);
    }
}
