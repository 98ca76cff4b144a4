//! Network rate quotas: the token buckets of `ebpf/net.bpf.c`.
//!
//! The network probe (`crate::probes`) loads `net.bpf.c` and pins its maps
//! by name in `[probes] pin_dir`; the enforcer opens the bucket maps there
//! and keeps one entry per tenant and direction, keyed by the tenant
//! cgroup's v2 id, plus the level of tenant cgroups in the hierarchy. An
//! entry is rewritten only when the rate or the cgroup changes (a rewrite
//! refills the bucket).

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
use tally_ebpf::NetBucket;

use crate::enforce::{cgroup::TenantTree, quota::Quota};

/// Smallest burst: loopback GSO skbs reach ~64 KiB, and a bucket that
/// cannot hold a few of them collapses TCP far below the rate (FIELD-NOTES:
/// 64 KiB gave 0.32 of the rate, 256 KiB 0.97).
pub const MIN_BURST: u64 = 512 * 1024;

/// Burst for a rate: 100 ms worth of it, at least [`MIN_BURST`].
pub fn burst_for(rate: u64) -> u64 {
    (rate / 10).max(MIN_BURST)
}

/// Direction of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub fn resource(self) -> &'static str {
        match self {
            Direction::Egress => "network_egress",
            Direction::Ingress => "network_ingress",
        }
    }
}

/// The buckets the enforcer wants: `(tenant, direction) → (cgroup id, rate)`.
pub type Wanted = BTreeMap<(String, Direction), (u64, u64)>;

/// Level of a cgroup path in its hierarchy (`/` = 0, `/a/b` = 2).
pub fn level(path: &str) -> u32 {
    path.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// What the tree and the quotas ask for; tenants whose v2 cgroup does not
/// exist (yet) are left out.
pub fn wanted(tree: &TenantTree, quotas: &BTreeMap<String, Quota>) -> (Wanted, Option<u32>) {
    let mut out = Wanted::new();
    let mut lvl = None;
    let Some(h) = tree.layout.unified.as_ref() else {
        return (out, None);
    };
    for (tenant, q) in quotas {
        for (dir, rate) in [
            (Direction::Egress, q.network_egress),
            (Direction::Ingress, q.network_ingress),
        ] {
            let Some(rate) = rate else { continue };
            let path = tree.tenant_path(h, tenant);
            let Ok(meta) = std::fs::metadata(h.dir(&path)) else {
                continue;
            };
            lvl = Some(level(&path));
            out.insert((tenant.clone(), dir), (meta.ino(), rate));
        }
    }
    (out, lvl)
}

/// The pinned bucket maps, once the network probe has pinned them.
#[derive(Debug)]
pub struct Buckets {
    pin_dir: PathBuf,
    maps: Option<Maps>,
    written: Wanted,
    level: Option<u32>,
}

struct Maps {
    conf: Array<MapData, u32>,
    egress: BpfHashMap<MapData, u64, NetBucket>,
    ingress: BpfHashMap<MapData, u64, NetBucket>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps { conf, egress, ingress }")
    }
}

fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &str) -> Result<T, MapError> {
    let data = MapData::from_pin(dir.join(name))?;
    T::try_from(Map::from_map_data(data)?)
}

impl Buckets {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            maps: None,
            written: Wanted::new(),
            level: None,
        }
    }

    /// Whether the maps are open (the network probe is loaded).
    pub fn ready(&self) -> bool {
        self.maps.is_some()
    }

    /// Makes the maps hold exactly `want`; returns the buckets written or
    /// removed as `(tenant, direction, Some(rate) | None)`. `Err` when the
    /// maps are not pinned (yet) or cannot be written.
    #[allow(clippy::type_complexity)]
    pub fn sync(
        &mut self,
        want: &Wanted,
        level: Option<u32>,
    ) -> Result<Vec<(String, Direction, Option<u64>)>, MapError> {
        if self.maps.is_none() {
            let conf = open(&self.pin_dir, tally_ebpf::MAP_BUCKET_CONF)?;
            let egress = open(&self.pin_dir, tally_ebpf::MAP_BUCKET_EGRESS)?;
            let ingress = open(&self.pin_dir, tally_ebpf::MAP_BUCKET_INGRESS)?;
            let mut maps = Maps {
                conf,
                egress,
                ingress,
            };
            // Buckets of an earlier run are not ours any more.
            for m in [&mut maps.egress, &mut maps.ingress] {
                let stale: Vec<u64> = m.keys().flatten().collect();
                for k in stale {
                    let _ = m.remove(&k);
                }
            }
            self.maps = Some(maps);
            self.written.clear();
            self.level = None;
        }
        let Some(maps) = self.maps.as_mut() else {
            return Ok(Vec::new());
        };
        let mut changes = Vec::new();
        let lvl = level.unwrap_or(0);
        if self.level != Some(lvl) {
            maps.conf.set(0, lvl, 0)?;
            self.level = Some(lvl);
        }
        for ((tenant, dir), (id, rate)) in want {
            let key = (tenant.clone(), *dir);
            if self.written.get(&key) == Some(&(*id, *rate)) {
                continue;
            }
            let map = match dir {
                Direction::Egress => &mut maps.egress,
                Direction::Ingress => &mut maps.ingress,
            };
            if let Some((old_id, _)) = self.written.get(&key)
                && old_id != id
            {
                let _ = map.remove(old_id);
            }
            let burst = burst_for(*rate);
            map.insert(
                *id,
                NetBucket {
                    rate: *rate,
                    burst,
                    tokens: burst,
                    ..NetBucket::default()
                },
                0,
            )?;
            self.written.insert(key, (*id, *rate));
            changes.push((tenant.clone(), *dir, Some(*rate)));
        }
        for ((tenant, dir), (id, _)) in self.written.extract_if(.., |k, _| !want.contains_key(k)) {
            let map = match dir {
                Direction::Egress => &mut maps.egress,
                Direction::Ingress => &mut maps.ingress,
            };
            let _ = map.remove(&id);
            changes.push((tenant, dir, None));
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_holds_large_skbs() {
        assert_eq!(burst_for(1_000_000), MIN_BURST);
        assert_eq!(burst_for(12_500_000), 1_250_000);
    }

    #[test]
    fn levels_count_components() {
        assert_eq!(level("/"), 0);
        assert_eq!(level("/tally/acme"), 2);
        assert_eq!(level("/e2e/tally/acme/"), 3);
    }
}
