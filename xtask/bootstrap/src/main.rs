//! `cargo xtask …` (the alias in `.cargo/config.toml`) runs this first: it
//! installs the Debian packages every build needs, then becomes
//! `cargo run --package xtask -- …`.
//!
//! The xtask proper cannot do this itself: it links the agent (through the
//! test kit), and the agent's eBPF programs are compiled by clang in
//! `tally-ebpf`'s build script, so on a machine without clang `xtask` is
//! never built and never gets to install it.

use std::{
    env,
    os::unix::process::CommandExt as _,
    process::{Command, ExitCode},
};

fn main() -> ExitCode {
    if let Err(e) = xtask_bootstrap::ensure(xtask_bootstrap::BUILD) {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // exec, not a child: signals (Ctrl-C in the demo) and the exit status
    // are the xtask's own.
    let e = Command::new(&cargo)
        .args(["run", "--quiet", "--package", "xtask", "--"])
        .args(env::args_os().skip(1))
        .exec();
    eprintln!("xtask: cannot run {}: {e}", cargo.to_string_lossy());
    ExitCode::FAILURE
}
