//! The network probe: `cgroup_skb` ingress and egress programs attached at
//! the cgroup v2 root, counting bytes and packets per cgroup id.

use std::{fs::File, path::Path};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
};
use tally_ebpf::NetValue;

use super::{
    PinDir,
    error::{ProbeError, chain, load_error},
    load::{load_object, program, take_map},
    maps::{self, CgroupCounters},
    state::Part,
    totals::Totals,
};

/// Loaded network programs and their map.
pub(super) struct NetProbe {
    _ebpf: Ebpf,
    pub(super) map: CgroupCounters<NetValue>,
}

/// Loads `net.bpf.o` and attaches both programs at `root`. Returns the
/// ingress and egress results, or `Err` when the object could not be used
/// at all (both programs report that).
pub(super) fn start(
    pin: &PinDir,
    root: Option<&Path>,
    totals: &mut Totals,
) -> Result<(NetProbe, [Result<(), ProbeError>; 2]), ProbeError> {
    let root = root.ok_or(ProbeError::NoCgroup2)?;
    let (mut ebpf, reused) = load_object(pin, "net", tally_ebpf::NET, tally_ebpf::MAP_NET)?;
    let mut map: CgroupCounters<NetValue> = take_map(&mut ebpf, "net", tally_ebpf::MAP_NET)?;
    maps::remove(&mut map, &totals.adopt(Part::Net, reused));
    let mut attach = |name: &'static str, kind: CgroupSkbAttachType| {
        let target = root.display().to_string();
        let cgroup = File::open(root).map_err(|e| ProbeError::Attach {
            program: name,
            target: target.clone(),
            message: e.to_string(),
        })?;
        let prog: &mut CgroupSkb = program(&mut ebpf, "net", name)?;
        prog.load().map_err(|e| load_error(name, e))?;
        // Single: the only mode this kernel accepts for links (aya #1078);
        // links coexist with other programs on the same cgroup.
        prog.attach(cgroup, kind, CgroupAttachMode::Single)
            .map_err(|e| ProbeError::Attach {
                program: name,
                target,
                message: chain(&e),
            })?;
        Ok(())
    };
    let ingress = attach("tally_net_ingress", CgroupSkbAttachType::Ingress);
    let egress = attach("tally_net_egress", CgroupSkbAttachType::Egress);
    Ok((NetProbe { _ebpf: ebpf, map }, [ingress, egress]))
}
