//! `[probes]`: the config section that says which probes run and where
//! their maps are pinned.

use std::path::PathBuf;

use serde::Deserialize;

use crate::paths;

/// `[probes]`: which eBPF probes run and where they attach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Count network bytes per cgroup (`cgroup_skb` at the v2 root). Default on.
    pub network: bool,
    /// Count host↔device CUDA copies (uprobes on libcuda). Default on.
    pub pcie: bool,
    /// Remember the cgroup of exited processes (raw tracepoints). Default on.
    pub process: bool,
    /// CUDA driver libraries to probe. Default: `libcuda.so.1` as found in
    /// the loader cache (`ldconfig -p`) and the usual driver directories.
    pub cuda_libs: Option<Vec<PathBuf>>,
    /// bpffs directory the maps are pinned in. Default `/sys/fs/bpf/tally`.
    pub pin_dir: PathBuf,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            network: true,
            pcie: true,
            process: true,
            cuda_libs: None,
            pin_dir: PathBuf::from(paths::BPF_PIN_DIR),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn probes_section_parses_and_rejects_unknown_keys() {
        let c = Config::parse(
            "[probes]\npcie = false\ncuda_libs = [\"/opt/nvidia/libcuda.so.1\"]\n\
             pin_dir = \"/sys/fs/bpf/t\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(!c.probes.pcie && c.probes.network && c.probes.process);
        assert_eq!(
            c.probes.cuda_libs,
            Some(vec![PathBuf::from("/opt/nvidia/libcuda.so.1")])
        );
        assert_eq!(c.probes.pin_dir, PathBuf::from("/sys/fs/bpf/t"));
        let d = Config::parse("", Path::new("t.toml")).unwrap().probes;
        assert_eq!(d.pin_dir, PathBuf::from(paths::BPF_PIN_DIR));
        assert!(d.cuda_libs.is_none());

        let err = Config::parse("[probes]\ncuda_lib = []\n", Path::new("t.toml")).unwrap_err();
        assert_eq!(err.problems[0].key, "probes", "{err}");
        assert!(err.to_string().contains("cuda_lib"), "{err}");
    }
}
