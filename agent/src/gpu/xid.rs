//! XID errors: a thread waits for NVML's XID events and counts them by
//! device; each cycle the sampler ties the new ones to the tenants holding
//! the device and learns which devices had a fatal one.
//!
//! Counts only grow: an XID never "sticks" as a gauge would.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use nvml_wrapper::{Nvml, bitmasks::event::EventTypes, enums::event::XidError, error::NvmlError};
use tracing::warn;

use super::account::holders_of_device;
use crate::snapshot::GpuSnapshot;

/// XID events, filled by the event thread, drained by the sampler.
#[derive(Debug, Default)]
pub(super) struct XidLog {
    /// Events by device UUID and XID code since start.
    counts: HashMap<String, BTreeMap<u64, u64>>,
    /// Events not yet tied to the tenants holding the device.
    pending: Vec<(String, u64)>,
}

impl XidLog {
    /// Counts one event on device `uuid`.
    fn record(&mut self, uuid: String, xid: u64) {
        *self
            .counts
            .entry(uuid.clone())
            .or_default()
            .entry(xid)
            .or_default() += 1;
        self.pending.push((uuid, xid));
    }

    /// Events of device `uuid` since start, by XID code.
    fn counts(&self, uuid: &str) -> BTreeMap<u64, u64> {
        self.counts.get(uuid).cloned().unwrap_or_default()
    }
}

/// The log shared between the event thread and the sampler.
pub(super) type SharedXidLog = Arc<Mutex<XidLog>>;

/// Events of device `uuid` since start, by XID code.
pub(super) fn counts(log: &SharedXidLog, uuid: &str) -> BTreeMap<u64, u64> {
    log.lock().map(|x| x.counts(uuid)).unwrap_or_default()
}

/// The events not yet tied to tenants, taken out of the log.
pub(super) fn take_pending(log: &SharedXidLog) -> Vec<(String, u64)> {
    log.lock()
        .map(|mut x| std::mem::take(&mut x.pending))
        .unwrap_or_default()
}

/// XIDs by the tenants holding their device when they came.
#[derive(Debug, Default)]
pub(super) struct TenantXids {
    /// XIDs that make a device lost.
    fatal: BTreeSet<u64>,
    /// Counts by (device label, tenant), by XID code.
    counts: BTreeMap<(String, String), BTreeMap<u64, u64>>,
}

impl TenantXids {
    pub(super) fn new(fatal: BTreeSet<u64>) -> Self {
        Self {
            fatal,
            counts: BTreeMap::new(),
        }
    }

    /// Ties `pending` XIDs to the tenants holding their device in `gpus`
    /// now, sets every device's `xid_errors_by_tenant`, and returns the
    /// UUIDs that had a fatal XID. A shared device's XID counts for each
    /// of its tenants.
    pub(super) fn tie(
        &mut self,
        pending: Vec<(String, u64)>,
        gpus: &mut [GpuSnapshot],
    ) -> HashSet<String> {
        let mut fatal = HashSet::new();
        for (uuid, xid) in pending {
            if self.fatal.contains(&xid) {
                fatal.insert(uuid.clone());
            }
            let Some(device) = gpus.iter().find(|g| g.uuid == uuid) else {
                continue;
            };
            let gpu = device.gpu.clone();
            let tenants: BTreeSet<String> = holders_of_device(gpus, &uuid)
                .map(|p| p.tenant.to_string())
                .collect();
            warn!(
                gpu = %gpu,
                gpu_uuid = %uuid,
                xid,
                tenants = ?tenants,
                "XID error on a GPU held by these tenants"
            );
            for tenant in tenants {
                *self
                    .counts
                    .entry((gpu.clone(), tenant))
                    .or_default()
                    .entry(xid)
                    .or_default() += 1;
            }
        }
        for g in gpus.iter_mut() {
            g.xid_errors_by_tenant = self
                .counts
                .range((g.gpu.clone(), String::new())..)
                .take_while(|((gpu, _), _)| *gpu == g.gpu)
                .map(|((_, tenant), counts)| (tenant.clone(), counts.clone()))
                .collect();
        }
        fatal
    }
}

/// Waits for XID events on every GPU and counts them into `log` until
/// `stop`.
pub(super) fn spawn_thread(nvml: &'static Nvml, log: SharedXidLog, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("tally-xid".into())
        .spawn(move || {
            let Ok(mut set) = nvml.create_event_set() else {
                warn!("NVML event sets unavailable: XID errors will not be counted");
                return;
            };
            let count = nvml.device_count().unwrap_or(0);
            for index in 0..count {
                let Ok(device) = nvml.device_by_index(index) else {
                    continue;
                };
                set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(set) => set,
                    Err(e) => {
                        warn!(gpu = index, error = %e.error, "cannot watch XID events");
                        return;
                    }
                };
            }
            while !stop.load(Ordering::Relaxed) {
                match set.wait(500) {
                    Ok(event) => {
                        let Some(XidError::Value(xid)) = event.event_data else {
                            continue;
                        };
                        let uuid = event.device.uuid().unwrap_or_default();
                        if let Ok(mut x) = log.lock() {
                            x.record(uuid, xid);
                        }
                    }
                    Err(NvmlError::Timeout) => {}
                    Err(e) => {
                        warn!(error = %e, "XID event wait failed; retrying in 1s");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the XID thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::GpuProcess;

    fn holder(tenant: &str) -> GpuProcess {
        GpuProcess {
            pid: 1,
            tenant: tenant.into(),
            cgroup: None,
            memory_bytes: 1,
            sm_ratio: None,
            workload: None,
            workload_id: None,
        }
    }

    fn node() -> Vec<GpuSnapshot> {
        vec![
            GpuSnapshot {
                gpu: "0".into(),
                uuid: "GPU-0".into(),
                processes: vec![holder("acme"), holder("beta")],
                ..Default::default()
            },
            GpuSnapshot {
                gpu: "1".into(),
                uuid: "GPU-1".into(),
                mig_mode: true,
                ..Default::default()
            },
            GpuSnapshot {
                gpu: "1/1/0".into(),
                uuid: "MIG-1".into(),
                parent_uuid: Some("GPU-1".into()),
                processes: vec![holder("gamma")],
                ..Default::default()
            },
        ]
    }

    #[test]
    fn the_log_counts_by_device_and_hands_out_pending_once() {
        let log = SharedXidLog::default();
        log.lock().unwrap().record("GPU-0".into(), 13);
        log.lock().unwrap().record("GPU-0".into(), 13);
        log.lock().unwrap().record("GPU-0".into(), 79);
        assert_eq!(counts(&log, "GPU-0"), BTreeMap::from([(13, 2), (79, 1)]));
        assert!(counts(&log, "GPU-1").is_empty());
        assert_eq!(take_pending(&log).len(), 3);
        assert!(take_pending(&log).is_empty());
        // Totals stay after the pending events are taken.
        assert_eq!(counts(&log, "GPU-0")[&13], 2);
    }

    #[test]
    fn a_shared_gpus_xid_counts_for_each_holder_and_accumulates() {
        let mut tx = TenantXids::new(BTreeSet::from([79]));
        let mut gpus = node();
        let fatal = tx.tie(vec![("GPU-0".into(), 13)], &mut gpus);
        assert!(fatal.is_empty());
        let expected = BTreeMap::from([(13, 1)]);
        assert_eq!(gpus[0].xid_errors_by_tenant["acme"], expected);
        assert_eq!(gpus[0].xid_errors_by_tenant["beta"], expected);
        assert!(gpus[1].xid_errors_by_tenant.is_empty());

        // The next cycle's devices carry the running counts.
        let mut gpus = node();
        tx.tie(vec![("GPU-0".into(), 13)], &mut gpus);
        assert_eq!(gpus[0].xid_errors_by_tenant["acme"][&13], 2);
        let mut gpus = node();
        tx.tie(Vec::new(), &mut gpus);
        assert_eq!(gpus[0].xid_errors_by_tenant["beta"][&13], 2);
    }

    #[test]
    fn a_mig_parents_xid_goes_to_its_instances_tenants_and_fatal_is_reported() {
        let mut tx = TenantXids::new(BTreeSet::from([79]));
        let mut gpus = node();
        let fatal = tx.tie(
            vec![("GPU-1".into(), 79), ("GPU-gone".into(), 79)],
            &mut gpus,
        );
        // A fatal XID counts even for a device no longer listed.
        assert_eq!(fatal, HashSet::from(["GPU-1".into(), "GPU-gone".into()]));
        assert_eq!(
            gpus[1].xid_errors_by_tenant,
            BTreeMap::from([("gamma".into(), BTreeMap::from([(79, 1)]))])
        );
        assert!(gpus[0].xid_errors_by_tenant.is_empty());
        assert!(gpus[2].xid_errors_by_tenant.is_empty());
    }
}
