//! Why a probe is not running ([`ProbeError`]), with the fix for each
//! reason, and the conversions from aya's errors that keep the verifier log.

use std::{io, path::PathBuf};

use aya::{EbpfError, programs::ProgramError};

use crate::paths;

/// Why a probe is not running.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe is switched off in `[probes]`.
    #[error("disabled in the config ([probes] {key} = false)")]
    Disabled { key: &'static str },
    /// bpffs is not mounted and mounting it failed.
    #[error("bpffs is not mounted at {path} and `mount -t bpf` failed: {reason}")]
    Mount { path: PathBuf, reason: String },
    /// The pin directory could not be created or opened.
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    /// Another agent holds the pin directory: attaching again would count
    /// every byte twice into the same maps.
    #[error("another tally agent holds {path} (flock): not attaching a second set of probes")]
    PinDirBusy { path: PathBuf },
    /// The object's maps could not be created or opened.
    #[error("cannot load {object}.bpf.o: {message}")]
    Load {
        object: &'static str,
        message: String,
    },
    /// The kernel refused the program; the verifier's log says why.
    #[error("the kernel refused program {program}: {source}; verifier log:\n{verifier_log}")]
    Verifier {
        program: &'static str,
        source: io::Error,
        verifier_log: String,
    },
    /// The program loaded but could not be attached.
    #[error("cannot attach {program} to {target}: {message}")]
    Attach {
        program: &'static str,
        target: String,
        message: String,
    },
    /// No cgroup v2 hierarchy to attach the network programs to.
    #[error(
        "no cgroup v2 hierarchy at {} or {}",
        paths::CGROUP_ROOT,
        paths::CGROUP_UNIFIED_HYBRID
    )]
    NoCgroup2,
    /// No CUDA driver library to probe.
    #[error("no CUDA driver library found (tried: {tried})")]
    NoCudaLibrary { tried: String },
    /// Libraries were found, but no copy entry point could be probed.
    #[error("no cuMemcpy* entry point could be probed: {details}")]
    NoCopySymbols { details: String },
}

impl ProbeError {
    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        let denied = |m: &str| {
            m.contains("Operation not permitted")
                || m.contains("Permission denied")
                || m.contains("EPERM")
        };
        match self {
            ProbeError::Disabled { .. } => "set it to true to enable",
            ProbeError::Mount { .. } => {
                "mount bpffs (`mount -t bpf -o mode=0700 bpf /sys/fs/bpf`), or run the agent \
                 as root or with CAP_SYS_ADMIN so it mounts it"
            }
            ProbeError::PinDir { .. } => {
                "run the agent as root or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN \
                 (DaemonSet securityContext.capabilities.add, systemd AmbientCapabilities=)"
            }
            ProbeError::PinDirBusy { .. } => {
                "stop the other agent, or give this one another [probes] pin_dir"
            }
            ProbeError::Load { message, .. } | ProbeError::Attach { message, .. }
                if denied(message) =>
            {
                "run the agent as root or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN"
            }
            ProbeError::Verifier { .. } => {
                "the kernel is older or configured differently than this build expects; \
                 report the verifier log"
            }
            ProbeError::Load { .. } | ProbeError::Attach { .. } => {
                "check the kernel has CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_UPROBES \
                 and BTF; `tally doctor` checks each"
            }
            ProbeError::NoCgroup2 => {
                "mount cgroup2 (`mount -t cgroup2 none /sys/fs/cgroup/unified`)"
            }
            ProbeError::NoCudaLibrary { .. } | ProbeError::NoCopySymbols { .. } => {
                "install the NVIDIA driver, or list its libcuda.so.1 in [probes] cuda_libs"
            }
        }
    }

    /// The error and the hint, as shown in `ProbeStatus.error`.
    pub fn explain(&self) -> String {
        format!("{self}; fix: {}", self.hint())
    }
}

/// An error and every `source()` below it, joined with `: `.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        cur = s.source();
    }
    text
}

/// A program load error, keeping the verifier's log.
pub(super) fn load_error(program: &'static str, e: ProgramError) -> ProbeError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => ProbeError::Verifier {
            program,
            source: io_error,
            verifier_log: verifier_log.to_string(),
        },
        other => ProbeError::Attach {
            program,
            target: "the kernel (load)".into(),
            message: chain(&other),
        },
    }
}

/// An object load error: a program's keeps its verifier log, others are `Load`.
pub(super) fn ebpf_error(object: &'static str, e: EbpfError) -> ProbeError {
    match e {
        EbpfError::ProgramError(p) => load_error(object, p),
        other => ProbeError::Load {
            object,
            message: chain(&other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_fix_and_the_verifier_log() {
        let e = ProbeError::Verifier {
            program: "tally_net_egress",
            source: io::Error::from_raw_os_error(13),
            verifier_log: "0: (b7) r0 = 1\ninvalid mem access".into(),
        };
        let text = e.explain();
        assert!(text.contains("invalid mem access"), "{text}");
        assert!(text.contains("fix:"), "{text}");
        let e = ProbeError::Load {
            object: "net",
            message: "map tally_net: Operation not permitted (os error 1)".into(),
        };
        assert!(e.explain().contains("CAP_BPF"), "{}", e.explain());
    }
}
