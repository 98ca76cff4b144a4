//! Splitting each device's time and energy among tenants, so the numbers
//! add up.
//!
//! Over every sampling interval, for each GPU or MIG instance:
//! - **allocated time**: the interval's wall time is split among the
//!   tenants holding a process on the device, in proportion to the GPU
//!   memory they hold (equally when none reports memory); with no holder it
//!   goes to [`TENANT_IDLE`]. So `sum by (gpu)` of allocated seconds equals
//!   the wall time observed.
//! - **SM time**: each process's SM utilization × interval (physical GPUs
//!   only; NVML has no per-process utilization on MIG instances).
//! - **energy** (physical GPUs): the counter's delta is split in two. The
//!   idle draw (the device's idle power × interval, capped at the delta)
//!   goes to the holders by allocation share, or to `_idle` when nobody
//!   holds the GPU; the rest (the active part) goes to the holders by SM
//!   time, or by allocation share when no SM time was sampled. On a MIG
//!   GPU the delta is first split among instances by their compute-slice
//!   fraction, and the slices no instance occupies go to `_idle` on the
//!   parent, with their share of time in GPU-equivalent seconds (wall time
//!   × unoccupied fraction), so parent and instances price to one GPU. Either
//!   way the tenants' energy sums to the device's counter delta.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use crate::snapshot::{TENANT_IDLE, TenantGpuUsage};

/// One process holding a device during an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder<'a> {
    pub tenant: &'a str,
    pub memory_bytes: u64,
    /// SM utilization 0..1, when NVML has a per-process number.
    pub sm_ratio: Option<f64>,
    /// The workload the process is charged to, when one is named.
    pub workload: Option<&'a str>,
}

/// One tenant's share of one device over one interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    pub allocated_seconds: f64,
    pub sm_seconds: Option<f64>,
    pub memory_bytes: u64,
    pub energy_joules: f64,
    /// The part of `allocated_seconds` the device spent `idle` (see
    /// `crate::states`): set by the sampler, which knows the state.
    pub idle_seconds: f64,
}

/// Splits one interval of one device among its holders.
///
/// `energy_joules` is the part of the energy counter's delta that belongs
/// to this device (for a MIG instance, its slice of the parent's delta);
/// `idle_power_watts` is the device's idle draw when known.
///
/// The shares borrow the holders' tenant names: a cycle splits every
/// device, and a key copied per tenant per device was an allocation each.
pub fn split_interval<'a>(
    seconds: f64,
    holders: &[Holder<'a>],
    energy_joules: f64,
    idle_power_watts: Option<f64>,
    per_process_sm: bool,
) -> BTreeMap<&'a str, Share> {
    let mut shares: BTreeMap<&'a str, Share> = BTreeMap::new();
    if holders.is_empty() {
        shares.insert(
            TENANT_IDLE,
            Share {
                allocated_seconds: seconds,
                sm_seconds: per_process_sm.then_some(0.0),
                memory_bytes: 0,
                energy_joules,
                idle_seconds: 0.0,
            },
        );
        return shares;
    }

    // Per tenant, accumulated in its share: memory held (the allocation
    // weight, equal when none known) and SM seconds.
    let sm_of = |share: &Share| share.sm_seconds.unwrap_or(0.0);
    for h in holders {
        let share = shares.entry(h.tenant).or_default();
        share.memory_bytes += h.memory_bytes;
        *share.sm_seconds.get_or_insert(0.0) += h.sm_ratio.unwrap_or(0.0) * seconds;
    }
    // Per-process SM can over-report (sampling skew); a device cannot do
    // more than one second of SM work per second, so scale the sum down.
    let raw_sm: f64 = shares.values().map(sm_of).sum();
    if raw_sm > seconds {
        for share in shares.values_mut() {
            share.sm_seconds = Some(sm_of(share) * (seconds / raw_sm));
        }
    }
    let total_memory: u64 = shares.values().map(|s| s.memory_bytes).sum();
    let tenants = shares.len() as f64;
    let total_sm: f64 = shares.values().map(sm_of).sum();

    let idle_part = idle_power_watts
        .map(|w| (w * seconds).clamp(0.0, energy_joules.max(0.0)))
        .unwrap_or(0.0);
    let active_part = energy_joules - idle_part;

    for share in shares.values_mut() {
        let sm = sm_of(share);
        let w = if total_memory == 0 {
            1.0 / tenants
        } else {
            share.memory_bytes as f64 / total_memory as f64
        };
        let active_share = if total_sm > 0.0 { sm / total_sm } else { w };
        share.allocated_seconds = seconds * w;
        share.sm_seconds = per_process_sm.then_some(sm);
        share.energy_joules = idle_part * w + active_part * active_share;
    }
    shares
}

/// Splits one tenant's `share` of a device among the named workloads of
/// its `holders` (the tenant's processes on the device), so that the
/// workloads' parts never add up to more than the share and, with the
/// part outside any named workload, to exactly it. Time and memory go by
/// memory held (equally per process when none reports any), SM time by
/// each workload's SM utilization, and energy as the SM time goes (as
/// time goes where no SM time was sampled): within one tenant the idle
/// and active energy are not told apart.
pub fn split_workloads<'a>(share: &Share, holders: &[Holder<'a>]) -> BTreeMap<&'a str, Share> {
    let mut out: BTreeMap<&'a str, Share> = BTreeMap::new();
    if holders.iter().all(|h| h.workload.is_none()) {
        return out;
    }
    let total_memory: u64 = holders.iter().map(|h| h.memory_bytes).sum();
    let total_sm: f64 = holders.iter().map(|h| h.sm_ratio.unwrap_or(0.0)).sum();
    let n = holders.len() as f64;
    for h in holders {
        let Some(workload) = h.workload else { continue };
        let w = if total_memory == 0 {
            1.0 / n
        } else {
            h.memory_bytes as f64 / total_memory as f64
        };
        let sm = if total_sm > 0.0 {
            h.sm_ratio.unwrap_or(0.0) / total_sm
        } else {
            w
        };
        let part = out.entry(workload).or_default();
        part.allocated_seconds += share.allocated_seconds * w;
        part.idle_seconds += share.idle_seconds * w;
        part.memory_bytes += h.memory_bytes;
        if let Some(s) = share.sm_seconds {
            *part.sm_seconds.get_or_insert(0.0) += s * sm;
        }
        part.energy_joules += share.energy_joules * sm;
    }
    out
}

/// A map keyed by a name, hashed with foldhash (see `crate::pids`): the
/// accounts look a row up per tenant per device every cycle.
type NameMap<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// Cumulative per-(tenant, device) counters; the agent's running total.
///
/// Each device finds its rows by tenant name in a hashed index, so a
/// cycle's shares are looked up by the names they already have (no key
/// built per row, no string compares down a tree). The rows keep their
/// names as `Arc<str>`, made once per tenant and device: the snapshot's
/// copy of every row each cycle copies pointers, not text. A device
/// remembers which rows its last interval set a memory gauge for, so only
/// those are zeroed, not every row scanned.
#[derive(Debug, Default)]
pub struct Accounts {
    /// Per (tenant, device); `mark` beside it.
    rows: Table,
    /// The `add` call that last set each row's shares (`marked`).
    mark: Vec<u64>,
    marked: u64,
    /// The named workloads' part of `rows`, per (tenant, workload, device).
    workloads: Table,
    devices: NameMap<DeviceTotals>,
    /// Each tenant and workload name once, shared by its rows.
    names: HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// The holders list being built, kept for its capacity.
    spare: Vec<usize>,
}

#[derive(Debug)]
struct DeviceTotals {
    /// The device label and UUID, shared by its rows.
    gpu: Arc<str>,
    uuid: Arc<str>,
    /// Wall time accounted: what the device's allocated seconds sum to.
    observed: f64,
    /// Its rows in `Accounts::rows`, by tenant.
    tenants: NameMap<usize>,
    /// Its rows in `Accounts::workloads`, by tenant then workload.
    workloads: NameMap<NameMap<usize>>,
    /// The rows of the last interval's shares.
    holders: Vec<usize>,
}

impl DeviceTotals {
    /// A new, empty row of this device; SM time is counted where `share`
    /// (the row's first) has it.
    fn new_row(
        &self,
        tenant: Arc<str>,
        workload: Option<Arc<str>>,
        share: &Share,
    ) -> TenantGpuUsage {
        TenantGpuUsage {
            tenant,
            gpu: self.gpu.clone(),
            uuid: self.uuid.clone(),
            sm_seconds_total: share.sm_seconds.map(|_| 0.0),
            workload,
            ..Default::default()
        }
    }
}

/// Rows kept in (tenant, workload, device) order: the order of the
/// snapshot, hence of `/metrics` and the reports. The snapshot lists them
/// by sharing the `Arc`; a cycle copies them on its first write while the
/// last snapshot still holds them, so between cycles there is one copy
/// (two MiB at 8,192 processes), not the accounts' and the snapshot's.
#[derive(Debug, Default)]
struct Table {
    rows: Arc<Vec<TenantGpuUsage>>,
    /// Rows were pushed since the last `sort`.
    unsorted: bool,
}

impl Table {
    /// The rows, to write: a copy if a snapshot still shares them.
    fn rows_mut(&mut self) -> &mut Vec<TenantGpuUsage> {
        Arc::make_mut(&mut self.rows)
    }

    /// Appends `row`; its index holds until the next `sort`.
    fn push(&mut self, row: TenantGpuUsage) -> usize {
        self.unsorted = true;
        let rows = self.rows_mut();
        rows.push(row);
        rows.len() - 1
    }

    /// Puts the rows pushed since the last call in their places; returns
    /// where each row went (`moved[old] == new`) for the indices kept
    /// elsewhere, `None` on a steady node, where no row is new.
    fn sort(&mut self) -> Option<Vec<usize>> {
        if !std::mem::take(&mut self.unsorted) {
            return None;
        }
        let rows = self.rows_mut();
        let mut order: Vec<usize> = (0..rows.len()).collect();
        let key = |i: usize| {
            let r = &rows[i];
            (&*r.tenant, r.workload.as_deref(), &*r.gpu)
        };
        // Stable and adaptive: the sorted run plus the new tail is merged.
        order.sort_by(|&a, &b| key(a).cmp(&key(b)));
        let mut moved = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            moved[old] = new;
        }
        let mut old: Vec<Option<TenantGpuUsage>> = rows.drain(..).map(Some).collect();
        rows.extend(order.iter().map(|&i| old[i].take().expect("each row once")));
        Some(moved)
    }

    /// The rows, in order, shared.
    fn listed(&self) -> Arc<Vec<TenantGpuUsage>> {
        debug_assert!(!self.unsorted, "sorted by every add");
        self.rows.clone()
    }
}

/// `name` as shared by earlier rows, made once when new.
fn intern(names: &mut HashSet<Arc<str>, foldhash::fast::RandomState>, name: &str) -> Arc<str> {
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    let n: Arc<str> = Arc::from(name);
    names.insert(n.clone());
    n
}

/// Adds one interval's `share` over `seconds` to a cumulative row.
fn accumulate(row: &mut TenantGpuUsage, share: &Share, seconds: f64) {
    row.allocated_seconds_total += share.allocated_seconds;
    if let (Some(total), Some(s)) = (row.sm_seconds_total.as_mut(), share.sm_seconds) {
        *total += s;
    }
    row.idle_allocated_seconds_total += share.idle_seconds;
    row.memory_bytes = share.memory_bytes;
    row.memory_byte_seconds_total += share.memory_bytes as f64 * seconds;
    row.energy_joules_total += share.energy_joules;
}

impl Accounts {
    /// Device `gpu`'s totals, made on its first interval; its rows get
    /// `uuid` from the interval that makes them.
    fn device<'m>(
        devices: &'m mut NameMap<DeviceTotals>,
        gpu: &str,
        uuid: &str,
    ) -> &'m mut DeviceTotals {
        if !devices.contains_key(gpu) {
            let gpu: Arc<str> = Arc::from(gpu);
            devices.insert(
                gpu.clone(),
                DeviceTotals {
                    gpu,
                    uuid: Arc::from(uuid),
                    observed: 0.0,
                    tenants: NameMap::default(),
                    workloads: NameMap::default(),
                    holders: Vec::new(),
                },
            );
        }
        let device = devices.get_mut(gpu).expect("inserted above");
        if *device.uuid != *uuid {
            device.uuid = Arc::from(uuid);
        }
        device
    }

    /// Adds one interval's shares of device `gpu` (`uuid`), and sets the
    /// memory gauge of tenants that no longer hold it to zero.
    pub fn add(&mut self, gpu: &str, uuid: &str, seconds: f64, shares: &BTreeMap<&str, Share>) {
        let device = Self::device(&mut self.devices, gpu, uuid);
        device.observed += seconds;
        self.marked += 1;
        let mut holders = std::mem::take(&mut self.spare);
        holders.clear();
        for (&tenant, share) in shares {
            let i = match device.tenants.get(tenant) {
                Some(&i) => i,
                None => {
                    let tenant = intern(&mut self.names, tenant);
                    let i = self.rows.push(device.new_row(tenant.clone(), None, share));
                    self.mark.push(0);
                    device.tenants.insert(tenant, i);
                    i
                }
            };
            accumulate(&mut self.rows.rows_mut()[i], share, seconds);
            self.mark[i] = self.marked;
            holders.push(i);
        }
        for &i in &device.holders {
            if self.mark[i] != self.marked {
                self.rows.rows_mut()[i].memory_bytes = 0;
            }
        }
        self.spare = std::mem::replace(&mut device.holders, holders);
        if let Some(moved) = self.rows.sort() {
            let mut mark = vec![0; self.mark.len()];
            for (old, &new) in moved.iter().enumerate() {
                mark[new] = self.mark[old];
            }
            self.mark = mark;
            for d in self.devices.values_mut() {
                d.tenants.values_mut().for_each(|i| *i = moved[*i]);
                d.holders.iter_mut().for_each(|i| *i = moved[*i]);
            }
        }
    }

    /// Adds one interval's workload parts of device `gpu` (`uuid`), keyed
    /// by (tenant, workload), over `seconds` ([`split_workloads`]).
    pub fn add_workloads(
        &mut self,
        gpu: &str,
        uuid: &str,
        seconds: f64,
        parts: &BTreeMap<(&str, &str), Share>,
    ) {
        if parts.is_empty() {
            return;
        }
        let device = Self::device(&mut self.devices, gpu, uuid);
        for (&(tenant, workload), share) in parts {
            let found = device.workloads.get(tenant).and_then(|w| w.get(workload));
            let i = match found {
                Some(&i) => i,
                None => {
                    let tenant = intern(&mut self.names, tenant);
                    let workload = intern(&mut self.names, workload);
                    let row = device.new_row(tenant.clone(), Some(workload.clone()), share);
                    let i = self.workloads.push(row);
                    device
                        .workloads
                        .entry(tenant)
                        .or_default()
                        .insert(workload, i);
                    i
                }
            };
            accumulate(&mut self.workloads.rows_mut()[i], share, seconds);
        }
        if let Some(moved) = self.workloads.sort() {
            for d in self.devices.values_mut() {
                for rows in d.workloads.values_mut() {
                    rows.values_mut().for_each(|i| *i = moved[*i]);
                }
            }
        }
    }

    /// The named workloads' cumulative rows (`Snapshot::workload_gpu`),
    /// in (tenant, workload, device) order.
    pub fn workload_rows(&self) -> Vec<TenantGpuUsage> {
        self.workloads.listed().to_vec()
    }

    /// Every (tenant, device) row, in (tenant, device) order, shared until
    /// the next cycle writes.
    pub fn rows(&self) -> Arc<Vec<TenantGpuUsage>> {
        self.rows.listed()
    }

    /// Wall time accounted for device `gpu` so far.
    pub fn observed_seconds(&self, gpu: &str) -> f64 {
        self.devices.get(gpu).map_or(0.0, |d| d.observed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(tenant: &str, memory_bytes: u64, sm: f64) -> Holder<'_> {
        Holder {
            tenant,
            memory_bytes,
            sm_ratio: Some(sm),
            workload: None,
        }
    }

    fn sum<F: Fn(&Share) -> f64>(s: &BTreeMap<&str, Share>, f: F) -> f64 {
        s.values().map(f).sum()
    }

    #[test]
    fn nobody_holding_means_idle_gets_everything() {
        let s = split_interval(2.0, &[], 140.0, Some(70.0), true);
        assert_eq!(s.len(), 1);
        assert_eq!(s[TENANT_IDLE].allocated_seconds, 2.0);
        assert_eq!(s[TENANT_IDLE].energy_joules, 140.0);
    }

    #[test]
    fn shared_gpu_time_and_energy_add_up() {
        // acme holds 3/4 of the memory and does 80 % SM; beta 1/4 and 10 %.
        let holders = [h("acme", 3 << 30, 0.8), h("beta", 1 << 30, 0.1)];
        let s = split_interval(1.0, &holders, 500.0, Some(70.0), true);
        assert!((sum(&s, |x| x.allocated_seconds) - 1.0).abs() < 1e-12);
        assert!((sum(&s, |x| x.energy_joules) - 500.0).abs() < 1e-9);
        assert!((s["acme"].allocated_seconds - 0.75).abs() < 1e-12);
        // Idle 70 J by allocation (52.5 / 17.5), active 430 J by SM (8:1).
        let acme = 52.5 + 430.0 * 8.0 / 9.0;
        assert!((s["acme"].energy_joules - acme).abs() < 1e-9);
        assert_eq!(s["acme"].sm_seconds, Some(0.8));
    }

    #[test]
    fn two_processes_of_one_tenant_are_one_share() {
        let holders = [h("acme", 1 << 30, 0.3), h("acme", 1 << 30, 0.4)];
        let s = split_interval(1.0, &holders, 100.0, None, true);
        assert_eq!(s.len(), 1);
        assert_eq!(s["acme"].allocated_seconds, 1.0);
        assert_eq!(s["acme"].memory_bytes, 2 << 30);
        assert!((s["acme"].sm_seconds.unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(s["acme"].energy_joules, 100.0);
    }

    #[test]
    fn sm_seconds_never_exceed_wall_time() {
        let holders = [h("a", 1, 0.9), h("b", 1, 0.6)];
        let s = split_interval(2.0, &holders, 0.0, None, true);
        let total: f64 = s.values().filter_map(|x| x.sm_seconds).sum();
        assert!((total - 2.0).abs() < 1e-12, "{total}");
        assert!((s["a"].sm_seconds.unwrap() - 1.2).abs() < 1e-12);
    }

    #[test]
    fn no_memory_and_no_sm_split_equally() {
        let holders = [h("a", 0, 0.0), h("b", 0, 0.0)];
        let s = split_interval(1.0, &holders, 10.0, None, false);
        assert_eq!(s["a"].allocated_seconds, 0.5);
        assert_eq!(s["b"].energy_joules, 5.0);
        assert_eq!(s["a"].sm_seconds, None);
    }

    #[test]
    fn idle_draw_above_the_delta_is_capped() {
        // Counter moved less than idle power × time (rounding, a reset).
        let s = split_interval(1.0, &[h("a", 1, 0.5)], 30.0, Some(70.0), true);
        assert_eq!(s["a"].energy_joules, 30.0);
    }

    #[test]
    fn accounts_accumulate_and_zero_memory_of_leavers() {
        let mut acc = Accounts::default();
        let s1 = split_interval(1.0, &[h("a", 100, 0.5)], 10.0, None, true);
        acc.add("0", "GPU-x", 1.0, &s1);
        let s2 = split_interval(1.0, &[], 5.0, None, true);
        acc.add("0", "GPU-x", 1.0, &s2);
        let rows = acc.rows();
        let a = rows.iter().find(|r| &*r.tenant == "a").unwrap();
        assert_eq!(a.memory_bytes, 0);
        assert_eq!(a.memory_byte_seconds_total, 100.0);
        assert_eq!(a.allocated_seconds_total, 1.0);
        let idle = rows.iter().find(|r| &*r.tenant == TENANT_IDLE).unwrap();
        assert_eq!(idle.allocated_seconds_total, 1.0);
        assert_eq!(acc.observed_seconds("0"), 2.0);
        assert_eq!(acc.observed_seconds("1"), 0.0);
        assert_eq!(idle.energy_joules_total, 5.0);
    }

    /// Rows come out in (tenant, device) order however they were made
    /// (the order of `/metrics`), share one name per tenant, and keep
    /// accumulating in place once the index is rebuilt around new rows.
    #[test]
    fn rows_are_listed_by_tenant_then_device() {
        let mut acc = Accounts::default();
        let one = |tenant| split_interval(1.0, &[h(tenant, 1, 0.5)], 2.0, None, true);
        acc.add("1", "GPU-1", 1.0, &one("b"));
        acc.add("0", "GPU-0", 1.0, &one("c"));
        acc.add("1/1/0", "MIG-1", 1.0, &one("a"));
        acc.add("0", "GPU-0", 1.0, &one("b"));
        acc.add("1", "GPU-1", 1.0, &one("b"));
        let rows = acc.rows();
        let keys: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (&*r.tenant, &*r.gpu, &*r.uuid))
            .collect();
        assert_eq!(
            keys,
            [
                ("a", "1/1/0", "MIG-1"),
                ("b", "0", "GPU-0"),
                ("b", "1", "GPU-1"),
                ("c", "0", "GPU-0"),
            ]
        );
        assert_eq!(rows[2].allocated_seconds_total, 2.0);
        assert_eq!(rows[2].energy_joules_total, 4.0);
        // "c" left device 0 when "b" came: its gauge is zero, b's is not.
        assert_eq!((rows[3].memory_bytes, rows[1].memory_bytes), (0, 1));
        assert!(Arc::ptr_eq(&rows[1].tenant, &rows[2].tenant));
        assert_eq!(acc.observed_seconds("0"), 2.0);
    }

    /// A listing shares the rows until the next interval writes them; the
    /// listing a snapshot holds never changes under it.
    #[test]
    fn a_listing_is_shared_and_never_written_after() {
        let mut acc = Accounts::default();
        let one = |tenant| split_interval(1.0, &[h(tenant, 1, 0.5)], 2.0, None, true);
        acc.add("0", "GPU-0", 1.0, &one("b"));
        let first = acc.rows();
        assert!(Arc::ptr_eq(&first, &acc.rows()));
        acc.add("0", "GPU-0", 1.0, &one("a"));
        let second = acc.rows();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].allocated_seconds_total, 1.0);
        assert_eq!(second.len(), 2);
        assert_eq!(&*second[1].tenant, "b");
        assert_eq!(second[1].allocated_seconds_total, 1.0);
        assert_eq!(second[1].memory_bytes, 0);
        // Nobody holds the rows any more: written in place.
        drop((first, second));
        let before = Arc::as_ptr(&acc.rows.rows);
        acc.add("0", "GPU-0", 1.0, &one("a"));
        assert_eq!(Arc::as_ptr(&acc.rows.rows), before);
        assert_eq!(acc.rows()[0].allocated_seconds_total, 2.0);
    }

    /// Workload rows come out by (tenant, workload, device) and add up
    /// per row across intervals.
    #[test]
    fn workload_rows_are_listed_by_tenant_workload_then_device() {
        let mut acc = Accounts::default();
        let share = Share {
            allocated_seconds: 1.0,
            ..Default::default()
        };
        let parts = |keys: &[(&'static str, &'static str)]| {
            keys.iter()
                .map(|&k| (k, share.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        acc.add_workloads("1", "GPU-1", 1.0, &parts(&[("a", "j2"), ("b", "j1")]));
        acc.add_workloads("0", "GPU-0", 1.0, &parts(&[("a", "j2"), ("a", "j1")]));
        acc.add_workloads("1", "GPU-1", 1.0, &parts(&[("a", "j2")]));
        let rows = acc.workload_rows();
        let keys: Vec<(&str, Option<&str>, &str)> = rows
            .iter()
            .map(|r| (&*r.tenant, r.workload.as_deref(), &*r.gpu))
            .collect();
        assert_eq!(
            keys,
            [
                ("a", Some("j1"), "0"),
                ("a", Some("j2"), "0"),
                ("a", Some("j2"), "1"),
                ("b", Some("j1"), "1"),
            ]
        );
        assert_eq!(rows[2].allocated_seconds_total, 2.0);
        assert!(acc.rows().is_empty());
    }

    /// A tenant's named workloads take their part of its share by memory
    /// (SM and energy by SM work); with the part outside them, they add up
    /// to the share.
    #[test]
    fn workloads_split_their_tenants_share() {
        let share = Share {
            allocated_seconds: 6.0,
            sm_seconds: Some(3.0),
            memory_bytes: 6,
            energy_joules: 90.0,
            idle_seconds: 3.0,
        };
        let holder = |w: Option<&'static str>, memory_bytes, sm| Holder {
            tenant: "a",
            memory_bytes,
            sm_ratio: Some(sm),
            workload: w,
        };
        let parts = split_workloads(
            &share,
            &[
                holder(Some("j1"), 1, 0.1),
                holder(Some("j2"), 3, 0.2),
                holder(Some("j1"), 1, 0.1),
                holder(None, 1, 0.6),
            ],
        );
        assert_eq!(parts.keys().copied().collect::<Vec<_>>(), ["j1", "j2"]);
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} != {b}");
        close(parts["j1"].allocated_seconds, 2.0);
        close(parts["j2"].allocated_seconds, 3.0);
        close(parts["j1"].sm_seconds.unwrap(), 0.6);
        close(parts["j2"].sm_seconds.unwrap(), 0.6);
        close(parts["j1"].energy_joules, 18.0);
        close(parts["j2"].energy_joules, 18.0);
        // Idle time goes as the held time goes.
        close(parts["j1"].idle_seconds, 1.0);
        close(parts["j2"].idle_seconds, 1.5);
        assert_eq!(parts["j1"].memory_bytes, 2);
        assert!(split_workloads(&share, &[holder(None, 1, 0.5)]).is_empty());
    }
}
