//! What one read of one GPU charges to whom: pure, no NVML, no clock.
//!
//! Given the interval since the device's last good read and its energy
//! ([`EnergyMeter`]: the counter's delta, or the power integral where the
//! counter is missing or went backwards), [`charges`] returns the (device, shares) rows the
//! sampler adds to its running [`Accounts`](crate::attribution::Accounts).
//! The invariants are [`crate::attribution`]'s: per device, the holders'
//! allocated seconds plus `_idle` sum to the interval, and the tenants'
//! energy sums to the counter's delta (on a MIG GPU, parent and instances
//! together).

use std::collections::BTreeMap;

use crate::{
    attribution::{Holder, Share, split_interval, split_workloads},
    pids::PidMap,
    snapshot::{GpuProcess, GpuSnapshot, TENANT_IDLE, TENANT_UNATTRIBUTED},
};

/// One device's part of an interval, to add to the running totals.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Charge<'a> {
    /// Device label (`"0"`, or `"<index>/<gi>/<ci>"` for a MIG instance).
    pub gpu: &'a str,
    pub uuid: &'a str,
    /// Wall time accounted for the device (GPU-equivalent seconds for the
    /// unoccupied slices of a MIG parent).
    pub seconds: f64,
    pub shares: BTreeMap<&'a str, Share>,
    /// The part of `shares` each named workload used, by (tenant,
    /// workload) ([`split_workloads`]).
    pub workloads: BTreeMap<(&'a str, &'a str), Share>,
}

/// Joules between two readings of NVML's energy counter (mJ); `None` when
/// either is missing or the counter went backwards (a driver reload
/// restarts it).
pub(super) fn energy_delta(previous_mj: Option<u64>, current_mj: Option<u64>) -> Option<f64> {
    match (previous_mj, current_mj) {
        (Some(prev), Some(cur)) if cur >= prev => Some((cur - prev) as f64 / 1000.0),
        _ => None,
    }
}

/// Joules over `seconds` from the power read at its two ends (trapezoid);
/// one reading stands for both when the other is missing.
pub(super) fn power_integral(
    start_w: Option<f64>,
    end_w: Option<f64>,
    seconds: f64,
) -> Option<f64> {
    let mean = match (start_w, end_w) {
        (Some(a), Some(b)) => (a + b) / 2.0,
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => return None,
    };
    Some(mean * seconds)
}

/// A GPU's energy across reads, whatever its counter does: each interval's
/// joules come from the counter's delta when it has one, else from the
/// power integral (no counter, or the counter went backwards). The running
/// total it reports equals the counter while the counter behaves, and
/// carries on from where it was, never backwards, when it does not, so the
/// intervals charged always sum to the total's growth.
#[derive(Debug, Default)]
pub(super) struct EnergyMeter {
    last_mj: Option<u64>,
    last_power_w: Option<f64>,
    /// Reported total minus the counter (J): moves only when an interval
    /// is not charged from the counter.
    offset_j: f64,
    total_j: Option<f64>,
}

impl EnergyMeter {
    /// Takes one good read: `seconds` since the last good read (`None`
    /// after a failed one), the counter (mJ) and power (W) now. Returns
    /// the interval's joules, when known.
    pub(super) fn read(
        &mut self,
        seconds: Option<f64>,
        counter_mj: Option<u64>,
        power_w: Option<f64>,
    ) -> Option<f64> {
        let delta = energy_delta(self.last_mj, counter_mj);
        let energy = match (delta, seconds) {
            (Some(d), _) => Some(d),
            (None, Some(dt)) => power_integral(self.last_power_w, power_w, dt),
            (None, None) => None,
        };
        let counter_j = counter_mj.map_or(0.0, |mj| mj as f64 / 1000.0);
        let total = match (delta, self.total_j) {
            (Some(_), _) => counter_j + self.offset_j,
            (None, None) => counter_j,
            (None, Some(t)) => {
                let total = t + energy.unwrap_or(0.0);
                self.offset_j = total - counter_j;
                total
            }
        };
        self.total_j = Some(total);
        self.last_mj = counter_mj;
        self.last_power_w = power_w;
        energy
    }

    /// Joules drawn so far (the counter's value at the first read, if any).
    pub(super) fn total_joules(&self) -> Option<f64> {
        self.total_j
    }
}

/// The charges of one good read of `device` (with its MIG `instances`).
///
/// `seconds` is the time since the device's last good read (`None` at
/// start or after a failed read); `energy_joules` the energy over the same
/// span ([`EnergyMeter`]); `idle_power_watts` the device's idle draw when
/// known. Time never depends on energy: an interval without a known
/// energy is charged its time with none. Energy drawn while the device
/// could not be read has no tenant that can be told apart, so it goes to
/// `_unattributed` (with no time) rather than being dropped.
pub(super) fn charges<'a>(
    device: &'a GpuSnapshot,
    instances: &'a [GpuSnapshot],
    seconds: Option<f64>,
    energy_joules: Option<f64>,
    idle_power_watts: Option<f64>,
) -> Vec<Charge<'a>> {
    let charge = |d: &'a GpuSnapshot, seconds: f64, shares: BTreeMap<&'a str, Share>| Charge {
        gpu: &d.gpu,
        uuid: &d.uuid,
        seconds,
        workloads: workload_parts(&d.processes, &shares),
        shares,
    };
    let (dt, energy) = match (seconds, energy_joules) {
        (Some(dt), energy) => (dt, energy.unwrap_or(0.0)),
        (None, Some(energy)) => {
            let gap = BTreeMap::from([(
                TENANT_UNATTRIBUTED,
                Share {
                    energy_joules: energy,
                    ..Default::default()
                },
            )]);
            return vec![charge(device, 0.0, gap)];
        }
        (None, None) => return Vec::new(),
    };
    if !device.mig_mode {
        let holders = holders_of(&device.processes);
        let shares = split_interval(dt, &holders, energy, idle_power_watts, true);
        return vec![charge(device, dt, shares)];
    }
    let mut out = Vec::with_capacity(instances.len() + 1);
    let mut occupied = 0.0;
    for inst in instances {
        let fraction = inst.slice_fraction.unwrap_or(0.0);
        occupied += fraction;
        let holders = holders_of(&inst.processes);
        // SM seconds only where GPM measured the instance's activity (see
        // `with_instance_sm`); NVML has no per-process utilization on MIG.
        let measured = inst.utilization_ratio.is_some();
        let shares = split_interval(dt, &holders, energy * fraction, None, measured);
        out.push(charge(inst, dt, shares));
    }
    // Slices carved into no instance are idle capacity, on the parent, in
    // GPU-equivalent seconds: priced like the rest, the parent and its
    // instances add up to the whole GPU.
    let unoccupied = (1.0 - occupied).max(0.0);
    let idle = split_interval(dt * unoccupied, &[], energy * unoccupied, None, false);
    out.push(charge(device, dt * unoccupied, idle));
    out
}

/// Marks all of `charge`'s held time as idle time: the sampler calls it
/// for a device that was `idle` when the interval began. `_idle`'s time
/// is nobody's holding, so it is left out.
pub(super) fn mark_idle(charge: &mut Charge<'_>) {
    for (tenant, share) in &mut charge.shares {
        if *tenant != TENANT_IDLE {
            share.idle_seconds = share.allocated_seconds;
        }
    }
    for part in charge.workloads.values_mut() {
        part.idle_seconds = part.allocated_seconds;
    }
}

/// Each tenant's share split among its named workloads, by (tenant,
/// workload); empty when no process names one.
fn workload_parts<'a>(
    processes: &'a [GpuProcess],
    shares: &BTreeMap<&'a str, Share>,
) -> BTreeMap<(&'a str, &'a str), Share> {
    let mut out = BTreeMap::new();
    if processes.iter().all(|p| p.workload_id.is_none()) {
        return out;
    }
    for (&tenant, share) in shares {
        let holders: Vec<Holder<'a>> = holders_of(processes)
            .into_iter()
            .filter(|h| h.tenant == tenant)
            .collect();
        for (workload, part) in split_workloads(share, &holders) {
            out.insert((tenant, workload), part);
        }
    }
    out
}

/// A MIG instance's processes with its GPM SM `activity` (0..1) shared
/// among them by the memory they hold (equally when none reports any):
/// GPM measures the instance, not its processes. Without a measurement
/// they get none.
pub(super) fn with_instance_sm(
    mut processes: Vec<GpuProcess>,
    activity: Option<f64>,
) -> Vec<GpuProcess> {
    let Some(activity) = activity else {
        return processes;
    };
    let total: u64 = processes.iter().map(|p| p.memory_bytes).sum();
    let n = processes.len() as f64;
    for p in &mut processes {
        let weight = if total == 0 {
            1.0 / n
        } else {
            p.memory_bytes as f64 / total as f64
        };
        p.sm_ratio = Some(activity * weight);
    }
    processes
}

/// Mean SM ratio per pid over NVML's `(pid, timestamp µs, sm)` samples,
/// and the newest timestamp seen (at least `cursor`), so that no sample is
/// counted twice.
pub(super) fn mean_sm(samples: &[(u32, u64, f64)], cursor: u64) -> (PidMap<f64>, u64) {
    let mut cursor = cursor;
    let mut sums: PidMap<(f64, u32)> = PidMap::default();
    for &(pid, ts, sm) in samples {
        cursor = cursor.max(ts);
        let e = sums.entry(pid).or_default();
        e.0 += sm;
        e.1 += 1;
    }
    let means = sums
        .into_iter()
        .map(|(pid, (sum, n))| (pid, sum / f64::from(n)))
        .collect();
    (means, cursor)
}

/// Processes holding the device `uuid`: its own, or for a physical GPU in
/// MIG mode, those of all its instances.
pub(super) fn holders_of_device<'a>(
    gpus: &'a [GpuSnapshot],
    uuid: &'a str,
) -> impl Iterator<Item = &'a GpuProcess> + 'a {
    gpus.iter()
        .filter(move |g| g.uuid == uuid || g.parent_uuid.as_deref() == Some(uuid))
        .flat_map(|g| g.processes.iter())
}

fn holders_of(processes: &[GpuProcess]) -> Vec<Holder<'_>> {
    processes
        .iter()
        .map(|p| Holder {
            tenant: &p.tenant,
            memory_bytes: p.memory_bytes,
            sm_ratio: p.sm_ratio,
            workload: p.workload_id.as_deref(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{attribution::Accounts, snapshot::TenantGpuUsage};

    fn proc(pid: u32, tenant: &str, memory_bytes: u64, sm: Option<f64>) -> GpuProcess {
        GpuProcess {
            pid,
            tenant: tenant.into(),
            cgroup: None,
            memory_bytes,
            sm_ratio: sm,
            workload: None,
            workload_id: None,
        }
    }

    fn gpu(label: &str, processes: Vec<GpuProcess>) -> GpuSnapshot {
        GpuSnapshot {
            gpu: label.to_owned(),
            uuid: format!("GPU-{label}"),
            processes,
            ..Default::default()
        }
    }

    fn instance(label: &str, fraction: f64, processes: Vec<GpuProcess>) -> GpuSnapshot {
        GpuSnapshot {
            gpu: label.to_owned(),
            uuid: format!("MIG-{label}"),
            mig_mode: true,
            parent_uuid: Some("GPU-2".into()),
            slice_fraction: Some(fraction),
            processes,
            ..Default::default()
        }
    }

    fn close(a: f64, b: f64, what: &str) {
        assert!(
            (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
            "{what}: {a} != {b}"
        );
    }

    fn allocated(c: &Charge<'_>) -> f64 {
        c.shares.values().map(|s| s.allocated_seconds).sum()
    }

    fn energy(charges: &[Charge<'_>]) -> f64 {
        charges
            .iter()
            .flat_map(|c| c.shares.values())
            .map(|s| s.energy_joules)
            .sum()
    }

    fn rows(charges: &[Charge<'_>]) -> Vec<TenantGpuUsage> {
        let mut acc = Accounts::default();
        for c in charges {
            acc.add(c.gpu, c.uuid, c.seconds, &c.shares);
        }
        acc.rows().to_vec()
    }

    #[test]
    fn energy_delta_is_joules_and_restarts_on_a_reset() {
        assert_eq!(energy_delta(Some(1_000), Some(3_500)), Some(2.5));
        assert_eq!(energy_delta(Some(3_500), Some(1_000)), None);
        assert_eq!(energy_delta(None, Some(1_000)), None);
        assert_eq!(energy_delta(Some(1_000), None), None);
    }

    #[test]
    fn shared_gpu_holders_and_idle_sum_to_the_interval_and_the_delta() {
        let d = gpu(
            "0",
            vec![
                proc(1, "acme", 8 << 30, Some(0.5)),
                proc(2, "beta", 4 << 30, Some(0.2)),
            ],
        );
        let c = charges(&d, &[], Some(0.2), Some(77.0), Some(70.0));
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].gpu, c[0].uuid), ("0", "GPU-0"));
        assert_eq!(c[0].seconds, 0.2);
        close(allocated(&c[0]), 0.2, "allocated");
        close(energy(&c), 77.0, "energy");
        close(
            c[0].shares["acme"].allocated_seconds,
            0.2 * 2.0 / 3.0,
            "acme",
        );
        assert!(c[0].shares["acme"].sm_seconds.is_some());
    }

    /// An idle device's interval is idle time for its holders and their
    /// workloads, all of their held time; `_idle` holds nothing.
    #[test]
    fn marking_idle_makes_the_held_time_idle_time() {
        let mut p = proc(1, "acme", 8 << 30, Some(0.0));
        p.workload_id = Some("j1".into());
        let d = gpu("0", vec![p, proc(2, "beta", 4 << 30, Some(0.0))]);
        let mut c = charges(&d, &[], Some(3.0), Some(30.0), Some(70.0));
        for share in c[0].shares.values() {
            assert_eq!(share.idle_seconds, 0.0, "not idle until marked");
        }
        mark_idle(&mut c[0]);
        close(c[0].shares["acme"].idle_seconds, 2.0, "acme");
        close(c[0].shares["beta"].idle_seconds, 1.0, "beta");
        close(c[0].workloads[&("acme", "j1")].idle_seconds, 2.0, "j1");

        let nobody = gpu("1", vec![]);
        let mut c = charges(&nobody, &[], Some(3.0), Some(30.0), Some(70.0));
        mark_idle(&mut c[0]);
        assert_eq!(c[0].shares[TENANT_IDLE].idle_seconds, 0.0);
    }

    #[test]
    fn nobody_holding_charges_the_interval_to_idle() {
        let idle = gpu("1", vec![]);
        let c = charges(&idle, &[], Some(1.5), Some(105.0), Some(70.0));
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].shares.keys().copied().collect::<Vec<_>>(),
            [TENANT_IDLE]
        );
        assert_eq!(c[0].shares[TENANT_IDLE].allocated_seconds, 1.5);
        assert_eq!(c[0].shares[TENANT_IDLE].energy_joules, 105.0);
    }

    #[test]
    fn energy_across_a_failed_read_is_unattributed_without_time() {
        let d = gpu("0", vec![proc(1, "acme", 1, Some(0.5))]);
        let c = charges(&d, &[], None, Some(42.0), Some(70.0));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].seconds, 0.0);
        assert_eq!(
            c[0].shares.keys().copied().collect::<Vec<_>>(),
            [TENANT_UNATTRIBUTED]
        );
        assert_eq!(c[0].shares[TENANT_UNATTRIBUTED].energy_joules, 42.0);
        assert_eq!(allocated(&c[0]), 0.0);
    }

    #[test]
    fn nothing_is_charged_without_an_interval_or_an_energy_delta() {
        let d = gpu("0", vec![proc(1, "acme", 1, Some(0.5))]);
        assert!(charges(&d, &[], None, None, None).is_empty());
    }

    #[test]
    fn time_is_charged_without_an_energy_reading() {
        let d = gpu("0", vec![proc(1, "acme", 1, Some(0.5))]);
        let c = charges(&d, &[], Some(1.0), None, None);
        assert_eq!(c.len(), 1);
        close(allocated(&c[0]), 1.0, "allocated");
        assert_eq!(c[0].shares["acme"].sm_seconds, Some(0.5));
        assert_eq!(energy(&c), 0.0);
    }

    #[test]
    fn power_integral_is_the_trapezoid() {
        assert_eq!(power_integral(Some(100.0), Some(300.0), 2.0), Some(400.0));
        assert_eq!(power_integral(None, Some(300.0), 2.0), Some(600.0));
        assert_eq!(power_integral(None, None, 2.0), None);
    }

    #[test]
    fn the_meter_follows_the_counter_while_it_behaves() {
        let mut m = EnergyMeter::default();
        assert_eq!(m.read(None, Some(5_000), Some(70.0)), None);
        assert_eq!(m.total_joules(), Some(5.0));
        assert_eq!(m.read(Some(1.0), Some(75_000), Some(70.0)), Some(70.0));
        assert_eq!(m.total_joules(), Some(75.0));
    }

    #[test]
    fn without_a_counter_the_meter_integrates_power_from_zero() {
        let mut m = EnergyMeter::default();
        assert_eq!(m.read(None, None, Some(100.0)), None);
        assert_eq!(m.total_joules(), Some(0.0));
        assert_eq!(m.read(Some(2.0), None, Some(200.0)), Some(300.0));
        assert_eq!(m.read(Some(1.0), None, Some(200.0)), Some(200.0));
        assert_eq!(m.total_joules(), Some(500.0));
    }

    #[test]
    fn a_counter_reset_charges_that_interval_from_power_and_never_goes_back() {
        let mut m = EnergyMeter::default();
        m.read(None, Some(900_000), Some(100.0));
        // Driver reload: the counter restarts near 0.
        assert_eq!(m.read(Some(1.0), Some(2_000), Some(100.0)), Some(100.0));
        assert_eq!(m.total_joules(), Some(1000.0));
        // From there the counter's deltas count again, on top.
        assert_eq!(m.read(Some(1.0), Some(102_000), Some(100.0)), Some(100.0));
        assert_eq!(m.total_joules(), Some(1100.0));
    }

    #[test]
    fn energy_across_a_failed_read_stays_on_the_total() {
        let mut m = EnergyMeter::default();
        m.read(None, Some(1_000), Some(70.0));
        assert_eq!(m.read(None, Some(8_000), Some(70.0)), Some(7.0));
        assert_eq!(m.total_joules(), Some(8.0));
    }

    #[test]
    fn mig_instances_and_parent_add_up_to_one_gpu() {
        let parent = GpuSnapshot {
            mig_mode: true,
            ..gpu("2", vec![])
        };
        // 3/7 held by two tenants, 1/7 held by one, 1/7 empty, 2/7 carved
        // into no instance.
        let instances = [
            instance(
                "2/1/0",
                3.0 / 7.0,
                vec![
                    proc(1, "gamma", 3 << 30, None),
                    proc(2, "beta", 1 << 30, None),
                ],
            ),
            instance("2/2/0", 1.0 / 7.0, vec![proc(3, "beta", 1 << 30, None)]),
            instance("2/3/0", 1.0 / 7.0, vec![]),
        ];
        let dt = 2.0;
        let c = charges(&parent, &instances, Some(dt), Some(700.0), Some(50.0));
        assert_eq!(
            c.iter().map(|c| c.gpu).collect::<Vec<_>>(),
            ["2/1/0", "2/2/0", "2/3/0", "2"]
        );
        // Each instance's holders plus `_idle` fill the interval.
        for inst in &c[..3] {
            assert_eq!(inst.seconds, dt);
            close(allocated(inst), dt, inst.gpu);
            assert!(inst.shares.values().all(|s| s.sm_seconds.is_none()));
        }
        assert_eq!(
            c[2].shares.keys().copied().collect::<Vec<_>>(),
            [TENANT_IDLE]
        );
        // The parent carries the unoccupied 2/7, in GPU-equivalent seconds.
        close(c[3].seconds, dt * 2.0 / 7.0, "parent seconds");
        assert_eq!(
            c[3].shares.keys().copied().collect::<Vec<_>>(),
            [TENANT_IDLE]
        );
        close(allocated(&c[3]), c[3].seconds, "parent allocated");
        // Energy by slice fraction, summing to the parent's delta.
        close(energy(&c), 700.0, "energy");
        close(
            c[0].shares.values().map(|s| s.energy_joules).sum(),
            300.0,
            "3g energy",
        );
        // GPU-equivalent time: instances by fraction plus the parent's
        // unoccupied seconds is the wall time.
        let equivalent: f64 = c[..3]
            .iter()
            .zip(&instances)
            .map(|(c, i)| c.seconds * i.slice_fraction.unwrap())
            .sum::<f64>()
            + c[3].seconds;
        close(equivalent, dt, "GPU-equivalent seconds");
    }

    #[test]
    fn a_fully_carved_mig_gpu_leaves_the_parent_nothing() {
        let parent = GpuSnapshot {
            mig_mode: true,
            ..gpu("2", vec![])
        };
        let instances = [
            instance("2/1/0", 4.0 / 7.0, vec![proc(1, "a", 1, None)]),
            instance("2/2/0", 3.0 / 7.0, vec![]),
        ];
        let c = charges(&parent, &instances, Some(1.0), Some(70.0), None);
        assert_eq!(c[2].seconds, 0.0);
        close(energy(&c[2..]), 0.0, "parent energy");
        close(energy(&c), 70.0, "energy");
    }

    #[test]
    fn accounted_rows_sum_by_gpu_to_observed_time() {
        let parent = GpuSnapshot {
            mig_mode: true,
            ..gpu("2", vec![])
        };
        let instances = [instance("2/1/0", 3.0 / 7.0, vec![proc(1, "a", 1, None)])];
        let whole = gpu("0", vec![proc(2, "b", 1, Some(0.4))]);
        let mut all = charges(&whole, &[], Some(1.0), Some(100.0), None);
        all.extend(charges(&parent, &instances, Some(1.0), Some(70.0), None));
        let rows = rows(&all);
        for c in &all {
            let sum: f64 = rows
                .iter()
                .filter(|r| &*r.gpu == c.gpu)
                .map(|r| r.allocated_seconds_total)
                .sum();
            close(sum, c.seconds, c.gpu);
        }
    }

    #[test]
    fn mean_sm_averages_new_samples_and_advances_the_cursor() {
        let (means, cursor) = mean_sm(&[(1, 10, 0.2), (1, 20, 0.4), (2, 15, 0.9)], 5);
        close(means[&1], 0.3, "pid 1");
        assert_eq!(means[&2], 0.9);
        assert_eq!(cursor, 20);
        let (means, cursor) = mean_sm(&[], 20);
        assert!(means.is_empty());
        assert_eq!(cursor, 20);
    }

    #[test]
    fn gpm_activity_is_shared_by_memory_and_gives_sm_seconds_on_mig() {
        let procs = with_instance_sm(
            vec![proc(1, "a", 3 << 30, None), proc(2, "b", 1 << 30, None)],
            Some(0.8),
        );
        close(procs[0].sm_ratio.unwrap(), 0.6, "a");
        close(procs[1].sm_ratio.unwrap(), 0.2, "b");
        assert!(
            with_instance_sm(vec![proc(1, "a", 1, None)], None)[0]
                .sm_ratio
                .is_none()
        );
        let parent = GpuSnapshot {
            mig_mode: true,
            ..gpu("2", vec![])
        };
        let measured = GpuSnapshot {
            utilization_ratio: Some(0.8),
            ..instance("2/1/0", 4.0 / 7.0, procs)
        };
        let measured = [measured];
        let c = charges(&parent, &measured, Some(2.0), Some(70.0), None);
        close(c[0].shares["a"].sm_seconds.unwrap(), 1.2, "a's SM seconds");
        close(c[0].shares["b"].sm_seconds.unwrap(), 0.4, "b's SM seconds");
        close(energy(&c), 70.0, "energy");
    }

    #[test]
    fn a_mig_parent_is_held_by_its_instances_processes() {
        let parent = gpu("2", vec![]);
        let gpus = [
            parent,
            instance("2/1/0", 0.5, vec![proc(1, "a", 1, None)]),
            gpu("0", vec![proc(2, "b", 1, None)]),
        ];
        let pids = |uuid| {
            holders_of_device(&gpus, uuid)
                .map(|p| p.pid)
                .collect::<Vec<_>>()
        };
        assert_eq!(pids("GPU-2"), [1]);
        assert_eq!(pids("MIG-2/1/0"), [1]);
        assert_eq!(pids("GPU-0"), [2]);
    }
}
