//! GPU device access: which NVIDIA character devices a tenant may open.
//!
//! One `cgroup/dev` program (`ebpf/dev.bpf.c`) per tenant with a `gpus`
//! quota, attached to the tenant's cgroup v2 directory and to every cgroup
//! the tenant rules attribute to the tenant (pods, Slurm jobs, …), each
//! through a link that runs beside the owner's own programs, and detached
//! from a cgroup when it goes. It is attached with
//! an empty allow-list (every GPU denied) before the first snapshot, and
//! its allow-list map is updated in place as snapshots map UUIDs to device
//! numbers: no detach/re-attach window. The kernel checks it before the v1
//! devices controller, so the same program serves hybrid and pure v2 hosts
//! (FIELD-NOTES); the v1 `devices` cgroup is not used. The program lives as
//! long as the agent: dropping [`TenantDevices`] detaches it (aya 0.14
//! cannot pin `cgroup/dev` links).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, PerCpuArray},
    programs::{CgroupAttachMode, CgroupDevice, cgroup_device::CgroupDeviceLinkId},
};

use crate::snapshot::GpuSnapshot;

/// Major number of `/dev/nvidiaN` and `nvidiactl`.
pub const NVIDIA_MAJOR: u32 = 195;

/// Why device access could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The BPF object did not load (verifier log included by aya).
    #[error("loading dev.bpf.o: {0}")]
    Load(#[from] aya::EbpfError),
    /// The program could not be loaded or attached.
    #[error("program tally_dev: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// A map could not be read or written.
    #[error("map of dev.bpf.o: {0}")]
    Map(#[from] aya::maps::MapError),
    /// A program or map the object should have is missing.
    #[error("dev.bpf.o has no `{name}`")]
    Missing { name: &'static str },
    /// The tenant's cgroup v2 directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A device number `(major, minor)`.
pub type Dev = (u32, u32);

/// Where the driver describes MIG capability devices (overridable in tests).
#[derive(Debug, Clone)]
pub struct CapsSource {
    /// `/proc/devices`.
    pub proc_devices: PathBuf,
    /// `/proc/driver/nvidia/capabilities`.
    pub capabilities: PathBuf,
}

impl Default for CapsSource {
    fn default() -> Self {
        Self {
            proc_devices: PathBuf::from(crate::paths::PROC_DEVICES),
            capabilities: PathBuf::from(crate::paths::NVIDIA_CAPABILITIES),
        }
    }
}

impl CapsSource {
    /// Major of `nvidia-caps` in `/proc/devices`, when the driver has one.
    pub fn caps_major(&self) -> Option<u32> {
        let text = std::fs::read_to_string(&self.proc_devices).ok()?;
        text.lines().find_map(|l| {
            let (num, name) = l.trim().split_once(' ')?;
            (name.trim() == "nvidia-caps").then(|| num.parse().ok())?
        })
    }

    /// Minor of a capability file's `DeviceFileMinor:` line.
    fn minor(&self, rel: &str) -> Option<u32> {
        let text = std::fs::read_to_string(self.capabilities.join(rel)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("DeviceFileMinor:"))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// The device numbers a `gpus` list allows, given the GPUs of the latest
/// snapshot; and the UUIDs that matched no device there.
///
/// A GPU UUID allows `/dev/nvidia<index>`. A MIG UUID (`gpu` label
/// `<index>/<gi>/<ci>`) allows its parent's `/dev/nvidia<index>` and the
/// `nvidia-caps` minors of its GPU instance and compute instance.
pub fn allowed_devices(
    gpus: &[String],
    snapshot: &[GpuSnapshot],
    caps: &CapsSource,
    caps_major: Option<u32>,
) -> (BTreeSet<Dev>, Vec<String>) {
    let mut out = BTreeSet::new();
    let mut unknown = Vec::new();
    for uuid in gpus {
        let Some(g) = snapshot.iter().find(|g| &g.uuid == uuid) else {
            unknown.push(uuid.clone());
            continue;
        };
        let mut parts = g.gpu.split('/');
        let Some(index) = parts.next().and_then(|i| i.parse::<u32>().ok()) else {
            unknown.push(uuid.clone());
            continue;
        };
        out.insert((NVIDIA_MAJOR, index));
        if let (Some(gi), Some(ci)) = (parts.next(), parts.next())
            && let Some(major) = caps_major
        {
            for rel in [
                format!("gpu{index}/mig/gi{gi}/access"),
                format!("gpu{index}/mig/gi{gi}/ci{ci}/access"),
            ] {
                if let Some(minor) = caps.minor(&rel) {
                    out.insert((major, minor));
                }
            }
        }
    }
    (out, unknown)
}

/// The attached program of one tenant.
#[derive(Debug)]
pub struct TenantDevices {
    ebpf: Ebpf,
    cgroup: PathBuf,
    allowed: BTreeSet<Dev>,
    /// Cgroups attached besides `cgroup` (v2 directories) and their links.
    more: BTreeMap<PathBuf, CgroupDeviceLinkId>,
}

impl TenantDevices {
    /// Loads `dev.bpf.o` and attaches it to `cgroup` (a v2 directory) with
    /// nothing allowed but `nvidiactl`/`nvidia-uvm`.
    pub fn attach(cgroup: &Path, caps_major: Option<u32>) -> Result<Self, DeviceError> {
        let mut ebpf = Ebpf::load(tally_ebpf::DEV)?;
        {
            let map = ebpf
                .map_mut(tally_ebpf::MAP_DEV_CONF)
                .ok_or(DeviceError::Missing {
                    name: tally_ebpf::MAP_DEV_CONF,
                })?;
            let mut conf: Array<_, u32> = Array::try_from(map)?;
            conf.set(0, caps_major.unwrap_or(0), 0)?;
        }
        program(&mut ebpf)?.load()?;
        let mut me = Self {
            ebpf,
            cgroup: cgroup.to_path_buf(),
            allowed: BTreeSet::new(),
            more: BTreeMap::new(),
        };
        me.link(cgroup)?;
        Ok(me)
    }

    fn link(&mut self, cgroup: &Path) -> Result<CgroupDeviceLinkId, DeviceError> {
        let fd = File::open(cgroup).map_err(|source| DeviceError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let prog = program(&mut self.ebpf)?;
        // Single: the only mode aya 0.14 gets through on this kernel (aya
        // #1078); a link still runs beside the cgroup's other programs.
        Ok(prog.attach(&fd, CgroupAttachMode::Single)?)
    }

    /// Attaches the same program (one allow-list) to another cgroup.
    pub fn attach_also(&mut self, cgroup: &Path) -> Result<(), DeviceError> {
        if cgroup == self.cgroup || self.more.contains_key(cgroup) {
            return Ok(());
        }
        let link = self.link(cgroup)?;
        self.more.insert(cgroup.to_path_buf(), link);
        Ok(())
    }

    /// The cgroups attached besides the first.
    pub fn also(&self) -> impl Iterator<Item = &Path> {
        self.more.keys().map(PathBuf::as_path)
    }

    /// Detaches the program from a cgroup [`Self::attach_also`] added.
    pub fn detach_also(&mut self, cgroup: &Path) -> Result<(), DeviceError> {
        let Some(link) = self.more.remove(cgroup) else {
            return Ok(());
        };
        program(&mut self.ebpf)?.detach(link)?;
        Ok(())
    }

    /// Opens the program denied since it was loaded, on every cgroup.
    pub fn denied(&self) -> Result<u64, DeviceError> {
        let map = self
            .ebpf
            .map(tally_ebpf::MAP_DEV_DENIED)
            .ok_or(DeviceError::Missing {
                name: tally_ebpf::MAP_DEV_DENIED,
            })?;
        let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(counts.get(&0, 0)?.iter().sum())
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn allowed(&self) -> &BTreeSet<Dev> {
        &self.allowed
    }

    /// Makes the allow-list exactly `want`; `true` when it changed.
    pub fn set_allowed(&mut self, want: &BTreeSet<Dev>) -> Result<bool, DeviceError> {
        if &self.allowed == want {
            return Ok(false);
        }
        let map = self
            .ebpf
            .map_mut(tally_ebpf::MAP_DEV_ALLOWED)
            .ok_or(DeviceError::Missing {
                name: tally_ebpf::MAP_DEV_ALLOWED,
            })?;
        let mut allowed: BpfHashMap<_, u64, u8> = BpfHashMap::try_from(map)?;
        for &(major, minor) in want.difference(&self.allowed) {
            allowed.insert(u64::from(major) << 32 | u64::from(minor), 1, 0)?;
        }
        for &(major, minor) in self.allowed.difference(want) {
            // Already gone is fine.
            let _ = allowed.remove(&(u64::from(major) << 32 | u64::from(minor)));
        }
        self.allowed = want.clone();
        Ok(true)
    }
}

/// The device program in `ebpf`.
fn program(ebpf: &mut Ebpf) -> Result<&mut CgroupDevice, DeviceError> {
    Ok(ebpf
        .program_mut(tally_ebpf::PROG_DEV)
        .ok_or(DeviceError::Missing {
            name: tally_ebpf::PROG_DEV,
        })?
        .try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(label: &str, uuid: &str) -> GpuSnapshot {
        GpuSnapshot {
            gpu: label.into(),
            uuid: uuid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn uuids_map_to_device_numbers_and_mig_caps() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("devices"),
            "Character devices:\n195 nvidia-frontend\n235 nvidia-caps\n236 nvidia-uvm\n",
        )
        .unwrap();
        let caps = d.path().join("caps");
        std::fs::create_dir_all(caps.join("gpu1/mig/gi2/ci0")).unwrap();
        std::fs::write(
            caps.join("gpu1/mig/gi2/access"),
            "DeviceFileMinor: 21\nDeviceFileMode: 292\n",
        )
        .unwrap();
        std::fs::write(
            caps.join("gpu1/mig/gi2/ci0/access"),
            "DeviceFileMinor: 22\n",
        )
        .unwrap();
        let src = CapsSource {
            proc_devices: d.path().join("devices"),
            capabilities: caps,
        };
        assert_eq!(src.caps_major(), Some(235));
        let snap = [
            gpu("0", "GPU-a"),
            gpu("1", "GPU-b"),
            gpu("1/2/0", "MIG-c"),
            gpu("2", "GPU-d"),
        ];
        let (allowed, unknown) = allowed_devices(
            &["GPU-a".into(), "MIG-c".into(), "GPU-zzz".into()],
            &snap,
            &src,
            src.caps_major(),
        );
        assert_eq!(
            allowed.into_iter().collect::<Vec<_>>(),
            [(195, 0), (195, 1), (235, 21), (235, 22)]
        );
        assert_eq!(unknown, ["GPU-zzz"]);
    }
}
