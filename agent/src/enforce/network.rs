//! Network rate quotas: the token buckets of `ebpf/net.bpf.c`.
//!
//! The network probe (`crate::probes`) loads `net.bpf.c` and pins its maps
//! by name in `[probes] pin_dir`; the enforcer opens them there and keeps
//! one bucket per tenant and direction, keyed by a tenant key of its own,
//! and one `tally_cgroup_tenant` entry per cgroup attributed to such a
//! tenant (its `tally/<tenant>` and every cgroup the rules match), so every
//! cgroup of a tenant spends from the same bucket. A bucket is rewritten
//! only when its rate changes (a rewrite refills it); a cgroup's entry is
//! removed when the cgroup goes.
//! The program remembers each socket's tenant; after the entries or the
//! level change, the enforcer bumps `tally_tenant_generation` so sockets
//! resolve theirs again.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
use tally_ebpf::NetBucket;

use crate::enforce::{attributed::Attributed, cgroup::Hierarchy, quota::Quota};

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

/// The buckets the enforcer wants: `(tenant, direction) → rate`.
pub type Wanted = BTreeMap<(String, Direction), u64>;

/// The cgroups whose packets are policed: `v2 id → (tenant, level)`.
pub type Members = BTreeMap<u64, (String, u32)>;

/// Level of a cgroup path in its hierarchy (`/` = 0, `/a/b` = 2).
pub fn level(path: &str) -> u32 {
    path.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// Whether a quota asks for a network rate.
pub fn rated(q: &Quota) -> bool {
    q.network_egress.is_some() || q.network_ingress.is_some()
}

/// The buckets the quotas ask for.
pub fn wanted(quotas: &BTreeMap<String, Quota>) -> Wanted {
    let mut out = Wanted::new();
    for (tenant, q) in quotas {
        for (dir, rate) in [
            (Direction::Egress, q.network_egress),
            (Direction::Ingress, q.network_ingress),
        ] {
            if let Some(rate) = rate {
                out.insert((tenant.clone(), dir), rate);
            }
        }
    }
    out
}

/// The attributed cgroups (of the v2 hierarchy `h`) of tenants with a
/// rate; cgroups that vanished since the walk are left out.
pub fn members(h: &Hierarchy, cgroups: &Attributed, quotas: &BTreeMap<String, Quota>) -> Members {
    cgroups
        .iter()
        .filter(|(_, t)| quotas.get(*t).is_some_and(rated))
        .filter_map(|(path, t)| {
            let meta = std::fs::metadata(h.dir(path)).ok()?;
            Some((meta.ino(), (t.clone(), level(path))))
        })
        .collect()
}

/// A bucket written (`Some(rate)`) or removed (`None`).
pub type Change = (String, Direction, Option<u64>);

/// The pinned bucket maps, once the network probe has pinned them.
#[derive(Debug)]
pub struct Buckets {
    pin_dir: PathBuf,
    maps: Option<Maps>,
    written: Wanted,
    /// Cgroup id → tenant key, as written.
    members: BTreeMap<u64, u64>,
    /// Tenant → its key in the maps (0 means "no tenant" to the program).
    keys: BTreeMap<String, u64>,
    level: Option<u32>,
    /// Members or level written since the generation was last bumped (kept
    /// across a failed sync, so the next one bumps it).
    unannounced: bool,
}

struct Maps {
    conf: Array<MapData, u32>,
    generation: Array<MapData, u64>,
    cgroups: BpfHashMap<MapData, u64, u64>,
    egress: BpfHashMap<MapData, u64, NetBucket>,
    ingress: BpfHashMap<MapData, u64, NetBucket>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps { conf, generation, cgroups, egress, ingress }")
    }
}

/// Why the buckets were not written.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The network probe has not pinned its maps there (not loaded yet,
    /// or loaded with another `pin_dir`).
    #[error("map {name} is not pinned in {} (is the network probe loaded?): {source}", dir.display())]
    NotPinned {
        dir: PathBuf,
        name: &'static str,
        source: MapError,
    },
    /// A map refused an entry: most likely full (`TALLY_MAX_CGROUPS`
    /// attributed cgroups, 4,096 tenant buckets a direction).
    #[error("map {name} refused an entry (full?): {source}")]
    Write {
        name: &'static str,
        source: MapError,
    },
}

fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, SyncError> {
    let not_pinned = |source| SyncError::NotPinned {
        dir: dir.to_path_buf(),
        name,
        source,
    };
    let data = MapData::from_pin(dir.join(name)).map_err(not_pinned)?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(not_pinned)
}

fn write(name: &'static str) -> impl Fn(MapError) -> SyncError {
    move |source| SyncError::Write { name, source }
}

fn clear<V: aya::Pod>(m: &mut BpfHashMap<MapData, u64, V>) {
    let stale: Vec<u64> = m.keys().flatten().collect();
    for k in stale {
        let _ = m.remove(&k);
    }
}

impl Buckets {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            maps: None,
            written: Wanted::new(),
            members: BTreeMap::new(),
            keys: BTreeMap::new(),
            level: None,
            unannounced: false,
        }
    }

    /// Whether the maps are open (the network probe is loaded).
    pub fn ready(&self) -> bool {
        self.maps.is_some()
    }

    /// How many cgroups are policed now.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    fn key(&mut self, tenant: &str) -> u64 {
        let next = self.keys.len() as u64 + 1;
        *self.keys.entry(tenant.to_owned()).or_insert(next)
    }

    /// Makes the maps hold exactly `want` and `members`; returns the
    /// buckets written or removed, as `(tenant, direction, Some(rate) |
    /// None)`. `Err` when the maps are not pinned (yet)
    /// or cannot be written.
    pub fn sync(&mut self, want: &Wanted, members: &Members) -> Result<Vec<Change>, SyncError> {
        if self.maps.is_none() {
            let mut maps = Maps {
                conf: open(&self.pin_dir, tally_ebpf::MAP_BUCKET_CONF)?,
                generation: open(&self.pin_dir, tally_ebpf::MAP_TENANT_GENERATION)?,
                cgroups: open(&self.pin_dir, tally_ebpf::MAP_CGROUP_TENANT)?,
                egress: open(&self.pin_dir, tally_ebpf::MAP_BUCKET_EGRESS)?,
                ingress: open(&self.pin_dir, tally_ebpf::MAP_BUCKET_INGRESS)?,
            };
            // Entries of an earlier run are not ours any more.
            clear(&mut maps.cgroups);
            clear(&mut maps.egress);
            clear(&mut maps.ingress);
            self.maps = Some(maps);
            self.written.clear();
            self.members.clear();
            self.level = None;
            self.unannounced = true;
        }
        let keys: BTreeMap<String, u64> = want
            .keys()
            .map(|(t, _)| t.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|t| {
                let k = self.key(&t);
                (t, k)
            })
            .collect();
        let Some(maps) = self.maps.as_mut() else {
            return Ok(Vec::new());
        };
        let mut changes = Vec::new();
        for ((tenant, dir), rate) in want {
            let key = (tenant.clone(), *dir);
            if self.written.get(&key) == Some(rate) {
                continue;
            }
            let (map, name) = match dir {
                Direction::Egress => (&mut maps.egress, tally_ebpf::MAP_BUCKET_EGRESS),
                Direction::Ingress => (&mut maps.ingress, tally_ebpf::MAP_BUCKET_INGRESS),
            };
            let burst = burst_for(*rate);
            let bucket = NetBucket {
                rate: *rate,
                burst,
                tokens: burst,
                ..NetBucket::default()
            };
            map.insert(keys[tenant], bucket, 0).map_err(write(name))?;
            self.written.insert(key, *rate);
            changes.push((tenant.clone(), *dir, Some(*rate)));
        }
        for ((tenant, dir), _) in self.written.extract_if(.., |k, _| !want.contains_key(k)) {
            let map = match dir {
                Direction::Egress => &mut maps.egress,
                Direction::Ingress => &mut maps.ingress,
            };
            if let Some(k) = self.keys.get(&tenant) {
                let _ = map.remove(k);
            }
            changes.push((tenant, dir, None));
        }
        // Members: the gone ones first, so a full map makes room; new ones
        // are written before the level that reaches them.
        for (id, _) in self
            .members
            .extract_if(.., |id, _| !members.contains_key(id))
        {
            // Already gone (the kernel frees nothing here) is fine.
            let _ = maps.cgroups.remove(&id);
            self.unannounced = true;
        }
        let deepest = members.values().map(|(_, l)| *l).max().unwrap_or(0);
        for (id, (tenant, _)) in members {
            let Some(&k) = keys.get(tenant) else { continue };
            if self.members.get(id) != Some(&k) {
                maps.cgroups
                    .insert(*id, k, 0)
                    .map_err(write(tally_ebpf::MAP_CGROUP_TENANT))?;
                self.members.insert(*id, k);
                self.unannounced = true;
            }
        }
        let lvl = deepest.min(super::attributed::MAX_LEVEL);
        if self.level != Some(lvl) {
            maps.conf
                .set(0, lvl, 0)
                .map_err(write(tally_ebpf::MAP_BUCKET_CONF))?;
            self.level = Some(lvl);
            self.unannounced = true;
        }
        // After the writes: the program reads the generation before it
        // walks, so a socket resolved during them walks again.
        if self.unannounced {
            let next = maps.generation.get(&0, 0).unwrap_or(0).wrapping_add(1);
            maps.generation
                .set(0, next, 0)
                .map_err(write(tally_ebpf::MAP_TENANT_GENERATION))?;
            self.unannounced = false;
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
