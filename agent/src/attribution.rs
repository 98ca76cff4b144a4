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

use std::collections::BTreeMap;

use crate::snapshot::{TENANT_IDLE, TenantGpuUsage};

/// One process holding a device during an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder<'a> {
    pub tenant: &'a str,
    pub memory_bytes: u64,
    /// SM utilization 0..1, when NVML has a per-process number.
    pub sm_ratio: Option<f64>,
}

/// One tenant's share of one device over one interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    pub allocated_seconds: f64,
    pub sm_seconds: Option<f64>,
    pub memory_bytes: u64,
    pub energy_joules: f64,
}

/// Splits one interval of one device among its holders.
///
/// `energy_joules` is the part of the energy counter's delta that belongs
/// to this device (for a MIG instance, its slice of the parent's delta);
/// `idle_power_watts` is the device's idle draw when known.
pub fn split_interval(
    seconds: f64,
    holders: &[Holder<'_>],
    energy_joules: f64,
    idle_power_watts: Option<f64>,
    per_process_sm: bool,
) -> BTreeMap<String, Share> {
    let mut shares: BTreeMap<String, Share> = BTreeMap::new();
    if holders.is_empty() {
        shares.insert(
            TENANT_IDLE.to_owned(),
            Share {
                allocated_seconds: seconds,
                sm_seconds: per_process_sm.then_some(0.0),
                memory_bytes: 0,
                energy_joules,
            },
        );
        return shares;
    }

    // Allocation weight per tenant: memory held, or equal when none known.
    let mut memory: BTreeMap<&str, u64> = BTreeMap::new();
    let mut sm: BTreeMap<&str, f64> = BTreeMap::new();
    for h in holders {
        *memory.entry(h.tenant).or_default() += h.memory_bytes;
        *sm.entry(h.tenant).or_default() += h.sm_ratio.unwrap_or(0.0) * seconds;
    }
    // Per-process SM can over-report (sampling skew); a device cannot do
    // more than one second of SM work per second, so scale the sum down.
    let raw_sm: f64 = sm.values().sum();
    if raw_sm > seconds {
        for v in sm.values_mut() {
            *v *= seconds / raw_sm;
        }
    }
    let total_memory: u64 = memory.values().sum();
    let tenants = memory.len() as f64;
    let weight = |tenant: &str| -> f64 {
        if total_memory == 0 {
            1.0 / tenants
        } else {
            memory[tenant] as f64 / total_memory as f64
        }
    };
    let total_sm: f64 = sm.values().sum();

    let idle_part = idle_power_watts
        .map(|w| (w * seconds).clamp(0.0, energy_joules.max(0.0)))
        .unwrap_or(0.0);
    let active_part = energy_joules - idle_part;

    for (&tenant, &mem) in &memory {
        let w = weight(tenant);
        let active_share = if total_sm > 0.0 {
            sm[tenant] / total_sm
        } else {
            w
        };
        shares.insert(
            tenant.to_owned(),
            Share {
                allocated_seconds: seconds * w,
                sm_seconds: per_process_sm.then(|| sm[tenant]),
                memory_bytes: mem,
                energy_joules: idle_part * w + active_part * active_share,
            },
        );
    }
    shares
}

/// Cumulative per-(tenant, device) counters; the agent's running total.
#[derive(Debug, Default)]
pub struct Accounts {
    rows: BTreeMap<(String, String), TenantGpuUsage>,
    /// Wall time accounted per device: what the allocated seconds sum to.
    observed: BTreeMap<String, f64>,
}

impl Accounts {
    /// Adds one interval's shares of device `gpu` (`uuid`), and sets the
    /// memory gauge of tenants that no longer hold it to zero.
    pub fn add(&mut self, gpu: &str, uuid: &str, seconds: f64, shares: &BTreeMap<String, Share>) {
        *self.observed.entry(gpu.to_owned()).or_default() += seconds;
        for ((_, g), row) in self.rows.iter_mut() {
            if g == gpu {
                row.memory_bytes = 0;
            }
        }
        for (tenant, share) in shares {
            let row = self
                .rows
                .entry((tenant.clone(), gpu.to_owned()))
                .or_insert_with(|| TenantGpuUsage {
                    tenant: tenant.clone(),
                    gpu: gpu.to_owned(),
                    uuid: uuid.to_owned(),
                    sm_seconds_total: share.sm_seconds.map(|_| 0.0),
                    ..Default::default()
                });
            row.allocated_seconds_total += share.allocated_seconds;
            if let (Some(total), Some(s)) = (row.sm_seconds_total.as_mut(), share.sm_seconds) {
                *total += s;
            }
            row.memory_bytes = share.memory_bytes;
            row.memory_byte_seconds_total += share.memory_bytes as f64 * seconds;
            row.energy_joules_total += share.energy_joules;
        }
    }

    pub fn rows(&self) -> Vec<TenantGpuUsage> {
        self.rows.values().cloned().collect()
    }

    /// Wall time accounted for device `gpu` so far.
    pub fn observed_seconds(&self, gpu: &str) -> f64 {
        self.observed.get(gpu).copied().unwrap_or(0.0)
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
        }
    }

    fn sum<F: Fn(&Share) -> f64>(s: &BTreeMap<String, Share>, f: F) -> f64 {
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
        let a = rows.iter().find(|r| r.tenant == "a").unwrap();
        assert_eq!(a.memory_bytes, 0);
        assert_eq!(a.memory_byte_seconds_total, 100.0);
        assert_eq!(a.allocated_seconds_total, 1.0);
        let idle = rows.iter().find(|r| r.tenant == TENANT_IDLE).unwrap();
        assert_eq!(idle.allocated_seconds_total, 1.0);
        assert_eq!(acc.observed_seconds("0"), 2.0);
        assert_eq!(acc.observed_seconds("1"), 0.0);
        assert_eq!(idle.energy_joules_total, 5.0);
    }
}
