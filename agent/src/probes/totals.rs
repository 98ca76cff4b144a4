//! Per-tenant totals from the map readings: live entries summed by tenant,
//! entries of vanished cgroups folded into the persisted state, and the
//! PCIe bytes the devices moved but no probe saw charged to `_unattributed`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
};

use tally_ebpf::{NetValue, PcieValue};
use tracing::warn;

use super::state::{Counters, Part, State, StateFile};
use crate::{
    paths,
    snapshot::{GpuSnapshot, TENANT_UNATTRIBUTED, TenantIoUsage},
    tenants::Resolver,
};

/// The persisted state and what is derived from it between samples.
#[derive(Debug)]
pub(super) struct Totals {
    state: State,
    file: StateFile,
    error_logged: bool,
    /// Tenant each cgroup id was last resolved to: where its counters go
    /// when the cgroup vanishes.
    tenant_of: HashMap<u64, String>,
    /// PCIe probe totals and device totals when this agent started, for the
    /// `_unattributed` remainder (device totals restart with the agent).
    pcie_at_start: Option<(u64, u64, u64)>,
    residual_base: (u64, u64),
    residual_run: (u64, u64),
}

impl Totals {
    /// Reads the state file under `state_dir`; without one (or with one
    /// that cannot be read, logged) totals restart from the maps alone.
    pub(super) fn load(state_dir: &Path) -> Totals {
        let mut file = StateFile::new(state_dir);
        let mut error_logged = false;
        let mut state = match file.load() {
            Ok(s) => s,
            Err(e) => {
                warn!("{e}; probe totals restart from the maps alone");
                error_logged = true;
                State::default()
            }
        };
        state.boot_id = std::fs::read_to_string(paths::BOOT_ID)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Totals {
            residual_base: (state.residual_h2d_bytes, state.residual_d2h_bytes),
            residual_run: (0, 0),
            state,
            file,
            error_logged,
            tenant_of: HashMap::new(),
            pcie_at_start: None,
        }
    }

    /// Reconciles the state with the `part` map just opened; returns the
    /// ids whose entries must be deleted from it (see [`State::adopt`]).
    pub(super) fn adopt(&mut self, part: Part, reused: bool) -> Vec<u64> {
        self.state.adopt(part, reused)
    }

    /// Cumulative per-tenant counters from one reading of the maps. `paths`
    /// holds the cgroup of every id read (`None`: it vanished); the entries
    /// of vanished cgroups are folded into the state, which is saved, and
    /// only then handed to `delete` (net ids, PCIe ids) to remove from the
    /// maps, so a crash in between deletes them at the next start.
    pub(super) fn update(
        &mut self,
        net: &[(u64, NetValue)],
        pcie: &[(u64, PcieValue)],
        paths: &HashMap<u64, Option<String>>,
        resolver: &Resolver,
        gpus: &[GpuSnapshot],
        delete: impl FnOnce(&[u64], &[u64]),
    ) -> Vec<TenantIoUsage> {
        let mut live: BTreeMap<String, Counters> = BTreeMap::new();
        let mut vanished_net = Vec::new();
        let mut vanished_pcie = Vec::new();
        let tenant_for = |path: &str| {
            resolver
                .tenant_for_cgroup(path)
                .unwrap_or_else(|| TENANT_UNATTRIBUTED.to_owned())
        };
        for (id, v) in net {
            match paths.get(id).cloned().flatten() {
                Some(path) => {
                    let tenant = tenant_for(&path);
                    live.entry(tenant.clone()).or_default().add_net(v);
                    self.tenant_of.insert(*id, tenant);
                }
                None => vanished_net.push((*id, *v)),
            }
        }
        for (id, v) in pcie {
            match paths.get(id).cloned().flatten() {
                Some(path) => {
                    let tenant = tenant_for(&path);
                    live.entry(tenant.clone()).or_default().add_pcie(v);
                    self.tenant_of.insert(*id, tenant);
                }
                None => vanished_pcie.push((*id, *v)),
            }
        }

        // Fold vanished cgroups: state first (with the ids pending), then
        // delete the entries; a crash in between deletes them at start.
        if !vanished_net.is_empty() || !vanished_pcie.is_empty() {
            for (id, v) in &vanished_net {
                let tenant = self.vanished_tenant(*id);
                self.state.folded.entry(tenant).or_default().add_net(v);
                self.state.pending_net.push(*id);
            }
            for (id, v) in &vanished_pcie {
                let tenant = self.vanished_tenant(*id);
                self.state.folded.entry(tenant).or_default().add_pcie(v);
                self.state.pending_pcie.push(*id);
            }
            self.state.live = live.clone();
            self.persist();
            let net_ids: Vec<u64> = vanished_net.iter().map(|e| e.0).collect();
            let pcie_ids: Vec<u64> = vanished_pcie.iter().map(|e| e.0).collect();
            delete(&net_ids, &pcie_ids);
            for id in net_ids.iter().chain(&pcie_ids) {
                self.tenant_of.remove(id);
            }
            self.state.pending_net.clear();
            self.state.pending_pcie.clear();
        }
        // Ids resolved long ago whose entries are gone: forget them.
        if self.tenant_of.len() > 4 * (net.len() + pcie.len()) + 1024 {
            let keep: HashSet<u64> = net
                .iter()
                .map(|e| e.0)
                .chain(pcie.iter().map(|e| e.0))
                .collect();
            self.tenant_of.retain(|id, _| keep.contains(id));
        }

        let mut totals = self.state.folded.clone();
        for (tenant, c) in &live {
            totals.entry(tenant.clone()).or_default().add(c);
        }
        self.state.live = live;
        self.add_pcie_residual(&mut totals, gpus);
        self.persist();
        totals
            .iter()
            .filter(|(t, c)| !c.is_zero() || t.as_str() == TENANT_UNATTRIBUTED)
            .map(|(t, c)| c.usage(t))
            .collect()
    }

    fn vanished_tenant(&self, id: u64) -> String {
        self.tenant_of
            .get(&id)
            .cloned()
            .unwrap_or_else(|| TENANT_UNATTRIBUTED.to_owned())
    }

    /// Device PCIe bytes (NVML, integrated since this agent started) minus
    /// the bytes every probe counted since then, never below what was
    /// already reported: charged to `_unattributed`, never spread.
    fn add_pcie_residual(&mut self, totals: &mut BTreeMap<String, Counters>, gpus: &[GpuSnapshot]) {
        // Physical GPUs only (MIG instances carry no PCIe counters). NVML's
        // RX is what the device received (host→device), TX what it sent.
        let mut have = false;
        let (mut dev_h2d, mut dev_d2h) = (0u64, 0u64);
        for g in gpus.iter().filter(|g| g.parent_uuid.is_none()) {
            if let Some(rx) = g.pcie_rx_bytes_total {
                dev_h2d += rx.max(0.0) as u64;
                have = true;
            }
            if let Some(tx) = g.pcie_tx_bytes_total {
                dev_d2h += tx.max(0.0) as u64;
                have = true;
            }
        }
        let probe_h2d: u64 = totals.values().map(|c| c.h2d_bytes).sum();
        let probe_d2h: u64 = totals.values().map(|c| c.d2h_bytes).sum();
        let probe_other: u64 = totals.values().map(|c| c.other_bytes).sum();
        let start = *self
            .pcie_at_start
            .get_or_insert((probe_h2d, probe_d2h, probe_other));
        if have {
            let seen = (
                probe_h2d.saturating_sub(start.0),
                probe_d2h.saturating_sub(start.1),
                probe_other.saturating_sub(start.2),
            );
            let (h2d, d2h) = unseen((dev_h2d, dev_d2h), seen);
            self.residual_run.0 = self.residual_run.0.max(h2d);
            self.residual_run.1 = self.residual_run.1.max(d2h);
        }
        self.state.residual_h2d_bytes = self.residual_base.0 + self.residual_run.0;
        self.state.residual_d2h_bytes = self.residual_base.1 + self.residual_run.1;
        let u = totals.entry(TENANT_UNATTRIBUTED.to_owned()).or_default();
        u.h2d_bytes += self.state.residual_h2d_bytes;
        u.d2h_bytes += self.state.residual_d2h_bytes;
    }

    /// Saves the state; a failure is logged once until a save succeeds.
    pub(super) fn persist(&mut self) {
        match self.file.save(&self.state) {
            Ok(()) => self.error_logged = false,
            Err(e) if !self.error_logged => {
                warn!(
                    "{e}; probe counters of vanished cgroups will not survive an agent restart \
                     (make [agent] state_dir writable)"
                );
                self.error_logged = true;
            }
            Err(_) => {}
        }
    }
}

/// Device bytes `(h2d, d2h)` no probe saw, given the probes' `(h2d, d2h,
/// other)`: each direction beyond its directed copies, less the generic
/// copies (direction unknown), taken from host→device first, where
/// unified-memory copies mostly go (inputs), then device→host. So
/// `_unattributed` is NVML's total minus everything the probes saw.
fn unseen(device: (u64, u64), seen: (u64, u64, u64)) -> (u64, u64) {
    let h2d = device.0.saturating_sub(seen.0);
    let d2h = device.1.saturating_sub(seen.1);
    let from_h2d = seen.2.min(h2d);
    (h2d - from_h2d, d2h.saturating_sub(seen.2 - from_h2d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_copies_come_off_the_unattributed_remainder_h2d_first() {
        assert_eq!(unseen((1000, 500), (100, 50, 0)), (900, 450));
        assert_eq!(unseen((1000, 500), (100, 50, 300)), (600, 450));
        assert_eq!(unseen((1000, 500), (100, 50, 1000)), (0, 350));
        assert_eq!(unseen((10, 5), (100, 50, 7)), (0, 0));
    }
}
