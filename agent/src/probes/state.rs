//! What the probes persist in the agent's state directory so that per-tenant
//! counters continue across agent restarts and reboots without resets or
//! double counts.
//!
//! Per-cgroup counters live in pinned maps, which survive an agent restart
//! but not a reboot. The state file keeps what the maps cannot: counters of
//! cgroups that vanished (folded into their tenant, their map entries
//! deleted), the last per-tenant totals of live entries (folded in when the
//! maps turn out to be new, e.g. after a reboot), and the PCIe remainder
//! charged to `_unattributed`.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
};

use rustix::{fs::RenameFlags, io::Errno};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::snapshot::TenantIoUsage;

/// File name under `[agent] state_dir`.
pub const FILE_NAME: &str = "probes-state.json";

/// Counters of one tenant (the numbers of a [`TenantIoUsage`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Counters {
    pub ingress_bytes: u64,
    pub ingress_packets: u64,
    pub ingress_dropped: u64,
    pub egress_bytes: u64,
    pub egress_packets: u64,
    pub egress_dropped: u64,
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    /// Generic copies (`cuMemcpy*` on unified addresses): direction unknown.
    pub other_bytes: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.ingress_bytes += o.ingress_bytes;
        self.ingress_packets += o.ingress_packets;
        self.ingress_dropped += o.ingress_dropped;
        self.egress_bytes += o.egress_bytes;
        self.egress_packets += o.egress_packets;
        self.egress_dropped += o.egress_dropped;
        self.h2d_bytes += o.h2d_bytes;
        self.d2h_bytes += o.d2h_bytes;
        self.other_bytes += o.other_bytes;
    }

    pub fn add_net(&mut self, v: &tally_ebpf::NetValue) {
        self.ingress_bytes += v.ingress_bytes;
        self.ingress_packets += v.ingress_packets;
        self.ingress_dropped += v.ingress_dropped;
        self.egress_bytes += v.egress_bytes;
        self.egress_packets += v.egress_packets;
        self.egress_dropped += v.egress_dropped;
    }

    pub fn add_pcie(&mut self, v: &tally_ebpf::PcieValue) {
        self.h2d_bytes += v.h2d_bytes;
        self.d2h_bytes += v.d2h_bytes;
        self.other_bytes += v.other_bytes;
    }

    /// Only the network part.
    pub fn net_part(&self) -> Counters {
        Counters {
            h2d_bytes: 0,
            d2h_bytes: 0,
            other_bytes: 0,
            ..*self
        }
    }

    /// Only the PCIe part.
    pub fn pcie_part(&self) -> Counters {
        Counters {
            h2d_bytes: self.h2d_bytes,
            d2h_bytes: self.d2h_bytes,
            other_bytes: self.other_bytes,
            ..Counters::default()
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Counters::default()
    }

    pub fn usage(&self, tenant: &str) -> TenantIoUsage {
        TenantIoUsage {
            tenant: tenant.to_owned(),
            network_ingress_bytes_total: self.ingress_bytes,
            network_egress_bytes_total: self.egress_bytes,
            network_ingress_packets_total: self.ingress_packets,
            network_egress_packets_total: self.egress_packets,
            network_ingress_dropped_packets_total: self.ingress_dropped,
            network_egress_dropped_packets_total: self.egress_dropped,
            pcie_h2d_bytes_total: self.h2d_bytes,
            pcie_d2h_bytes_total: self.d2h_bytes,
            pcie_other_bytes_total: self.other_bytes,
        }
    }
}

/// The content of the state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct State {
    /// Boot the pinned maps belong to (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// Counters no longer in any map, per tenant.
    pub folded: BTreeMap<String, Counters>,
    /// Per-tenant sums of the live map entries at the last sample.
    pub live: BTreeMap<String, Counters>,
    /// Cgroup ids folded into `folded` whose map entries may still exist
    /// (the agent stopped between folding and deleting): deleted at start.
    pub pending_net: Vec<u64>,
    pub pending_pcie: Vec<u64>,
    /// Device PCIe bytes no probe saw, charged to `_unattributed`.
    pub residual_h2d_bytes: u64,
    pub residual_d2h_bytes: u64,
}

/// Which map a reconciliation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Net,
    Pcie,
}

impl State {
    /// Reconciles the state with the `part` map just opened; returns the
    /// cgroup ids whose entries must be deleted from it.
    ///
    /// A map that already existed (`reused`, an agent restart) may still
    /// hold entries folded before the agent stopped: those are returned.
    /// A map created now (first start, after a reboot, pins removed)
    /// starts from zero, so the last live totals of that part move into
    /// `folded` and the per-tenant totals stay where they were.
    pub fn adopt(&mut self, part: Part, reused: bool) -> Vec<u64> {
        let pending = match part {
            Part::Net => std::mem::take(&mut self.pending_net),
            Part::Pcie => std::mem::take(&mut self.pending_pcie),
        };
        if reused {
            return pending;
        }
        for (tenant, live) in &mut self.live {
            let (moved, kept) = match part {
                Part::Net => (live.net_part(), live.pcie_part()),
                Part::Pcie => (live.pcie_part(), live.net_part()),
            };
            if !moved.is_zero() {
                self.folded.entry(tenant.clone()).or_default().add(&moved);
            }
            *live = kept;
        }
        self.live.retain(|_, c| !c.is_zero());
        Vec::new()
    }
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The file is not what this agent writes.
    #[error("{path}: not a probes state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The state file and the last content written to it.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// Where the next write goes before it trades names with `path`.
    spare: PathBuf,
    written: Option<String>,
    /// Both files, kept open once a write by name has left them in place.
    open: Option<Pair>,
    /// Writes in place since the last one whose data went to disk first.
    unsynced: u32,
}

/// The state file and the spare, open: a write rewrites the spare's
/// blocks in place and trades names, with no open, truncation or close.
#[derive(Debug)]
struct Pair {
    /// Named `path` now.
    current: Slot,
    /// Named `spare` now: the next write goes here.
    spare: Slot,
}

#[derive(Debug)]
struct Slot {
    file: File,
    /// Device and inode: the name must still lead to this file.
    id: (u64, u64),
    len: u64,
}

impl Slot {
    fn open(path: &Path) -> io::Result<Slot> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        Ok(Slot {
            id: (meta.dev(), meta.ino()),
            len: meta.len(),
            file,
        })
    }

    /// Whether `path` still leads to this file.
    fn named(&self, path: &Path) -> io::Result<bool> {
        let st = rustix::fs::stat(path)?;
        Ok((st.st_dev, st.st_ino) == self.id)
    }
}

/// One write in place in this many goes to disk (`fdatasync`) before the
/// names trade: after a power loss the state file is then at most about
/// twice this many writes old (the two files take turns, and an odd count
/// syncs each in turn), where a write by name is bounded by the journal's
/// commit interval.
const SYNC_EVERY: u32 = 3;

/// Written state is padded with spaces (which JSON ignores) to a multiple
/// of this, so a write in place keeps the file's length and blocks.
const BLOCK: usize = 4096;

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        let path = state_dir.join(FILE_NAME);
        Self {
            spare: path.with_extension("json.spare"),
            path,
            written: None,
            open: None,
            unsynced: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; default when there is no file yet. A state file
    /// that does not parse (a write in place torn by a power loss) gives
    /// way to the spare, the write before it, when that one parses.
    pub fn load(&mut self) -> Result<State, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let (state, text) = match serde_json::from_str(&text) {
            Ok(state) => (state, text),
            Err(source) => {
                let spare = std::fs::read_to_string(&self.spare)
                    .ok()
                    .and_then(|t| Some((serde_json::from_str(&t).ok()?, t)));
                let Some(spare) = spare else {
                    return Err(StateError::Parse {
                        path: self.path.clone(),
                        source,
                    });
                };
                warn!(
                    "{}: not a probes state file ({source}); read the write before it, {}",
                    self.path.display(),
                    self.spare.display()
                );
                spare
            }
        };
        self.written = Some(text.trim_end().to_owned());
        Ok(state)
    }

    /// Writes `state` when it changed, atomically: into the spare file
    /// (`probes-state.json.spare`), which then trades names with the state
    /// file in one step (`renameat2(RENAME_EXCHANGE)`), so the two files
    /// take turns and no write creates or deletes an inode. The agent
    /// writes every cycle.
    ///
    /// Once both files exist they stay open, and a write rewrites the
    /// spare's blocks in place ([`Self::save_in_place`]), without the open
    /// with truncation, the freeing of the block and the writeback ext4
    /// starts at the close (`auto_da_alloc`): the two ways timed on ext4
    /// took 140 and 62 µs of system time per write (`perf` of the agent
    /// had put the old way near a tenth of its CPU, more than that timing
    /// gives). A write by name ([`Self::save_by_name`])
    /// is the way back whenever that fails: no files yet, a file replaced or
    /// removed behind the agent's back, a filesystem without the exchange.
    pub fn save(&mut self, state: &State) -> Result<(), StateError> {
        let text = serde_json::to_string_pretty(state).expect("plain data serializes");
        if self.written.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        if let Some(pair) = self.open.take() {
            match self.save_in_place(pair, &text) {
                Ok(pair) => {
                    self.open = Some(pair);
                    self.written = Some(text);
                    return Ok(());
                }
                Err(e) => debug!(
                    path = %self.path.display(),
                    error = %e,
                    "state written in place failed; writing it by name"
                ),
            }
        }
        self.save_by_name(&text)?;
        self.written = Some(text);
        // Both files in place: the next write goes into the spare as it is.
        self.open = match (Slot::open(&self.path), Slot::open(&self.spare)) {
            (Ok(current), Ok(spare)) => Some(Pair { current, spare }),
            _ => None,
        };
        Ok(())
    }

    /// `text`, padded, over the spare's bytes, then the names traded.
    ///
    /// Crash safety: the spare is the file nobody reads, and the names
    /// trade only after the write, so an agent killed at any point leaves
    /// the state file whole. A power loss can find a block rewritten in
    /// place older than its name (ordered mode orders only newly allocated
    /// blocks before the journal commit): one write in [`SYNC_EVERY`] goes
    /// to disk first, which bounds how far behind; a block torn mid-write
    /// does not parse, and [`Self::load`] then reads the spare.
    fn save_in_place(&mut self, mut pair: Pair, text: &str) -> io::Result<Pair> {
        // Someone else's file at the spare's name is never traded in.
        if !pair.spare.named(&self.spare)? {
            return Err(io::Error::other("the spare was replaced"));
        }
        let len = (text.len() + 1).div_ceil(BLOCK) * BLOCK;
        let mut padded = String::with_capacity(len);
        padded.push_str(text);
        padded.push('\n');
        padded.extend(std::iter::repeat_n(' ', len - padded.len()));
        pair.spare.file.write_all_at(padded.as_bytes(), 0)?;
        if pair.spare.len != len as u64 {
            pair.spare.file.set_len(len as u64)?;
            pair.spare.len = len as u64;
        }
        self.unsynced += 1;
        if self.unsynced >= SYNC_EVERY {
            pair.spare.file.sync_data()?;
            self.unsynced = 0;
        }
        self.exchange()?;
        Ok(Pair {
            current: pair.spare,
            spare: pair.current,
        })
    }

    /// `text` into a new spare file's content (truncated, then closed,
    /// which makes ext4 start its writeback: `auto_da_alloc`), which then
    /// trades names with the state file; where the exchange is not
    /// supported (or there is no state file yet), a plain rename.
    ///
    /// Crash safety is the rename-over's: in `data=ordered` newly allocated
    /// blocks reach the disk before the journal commit that carries the
    /// exchange.
    fn save_by_name(&mut self, text: &str) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        // The directory is made when a write finds it missing (the first,
        // or after someone removed it), not asked for on every write.
        if let Err(e) = std::fs::write(&self.spare, text) {
            let dir = self
                .path
                .parent()
                .filter(|_| e.kind() == io::ErrorKind::NotFound);
            let Some(dir) = dir else { return Err(io(e)) };
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::write(&self.spare, text).map_err(io)?;
        }
        match self.exchange() {
            Ok(()) => {}
            // No state file yet, or a filesystem without the exchange.
            Err(Errno::NOENT | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                std::fs::rename(&self.spare, &self.path).map_err(io)?;
            }
            Err(e) => return Err(io(e.into())),
        }
        Ok(())
    }

    /// The spare and the state file trade names in one step.
    fn exchange(&self) -> rustix::io::Result<()> {
        let cwd = rustix::fs::CWD;
        rustix::fs::renameat_with(cwd, &self.spare, cwd, &self.path, RenameFlags::EXCHANGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_skips_unchanged_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = StateFile::new(dir.path());
        assert_eq!(file.load().unwrap(), State::default());
        let mut state = State {
            boot_id: "b".into(),
            ..Default::default()
        };
        state.folded.insert(
            "acme".into(),
            Counters {
                egress_bytes: 7,
                ..Default::default()
            },
        );
        file.save(&state).unwrap();
        let mtime = std::fs::metadata(file.path()).unwrap().modified().unwrap();
        file.save(&state).unwrap();
        assert_eq!(
            std::fs::metadata(file.path()).unwrap().modified().unwrap(),
            mtime
        );
        let mut again = StateFile::new(dir.path());
        assert_eq!(again.load().unwrap(), state);
    }

    /// The directory is made by the first write, and again by a write
    /// that finds it removed.
    #[test]
    fn a_missing_directory_is_made_by_the_write() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        let mut file = StateFile::new(&dir);
        for n in 1..3 {
            let state = State {
                residual_h2d_bytes: n,
                ..Default::default()
            };
            file.save(&state).unwrap();
            assert_eq!(StateFile::new(&dir).load().unwrap(), state);
            std::fs::remove_dir_all(root.path().join("a")).unwrap();
        }
    }

    /// Later writes swap the state file with the spare: the two inodes
    /// take turns, and the state file always holds the newest state.
    #[test]
    fn writes_take_turns_between_two_inodes() {
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().unwrap();
        let mut file = StateFile::new(dir.path());
        let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let spare = file.path().with_extension("json.spare");
        let mut inodes = std::collections::BTreeSet::new();
        for n in 0..4 {
            let state = State {
                residual_h2d_bytes: n,
                ..Default::default()
            };
            file.save(&state).unwrap();
            inodes.insert(inode(file.path()));
            assert_eq!(StateFile::new(dir.path()).load().unwrap(), state);
            if n > 0 {
                let previous: State =
                    serde_json::from_str(&std::fs::read_to_string(&spare).unwrap()).unwrap();
                assert_eq!(
                    previous.residual_h2d_bytes,
                    n - 1,
                    "the spare is one write behind"
                );
                inodes.insert(inode(&spare));
            }
        }
        assert_eq!(
            inodes.len(),
            2,
            "two inodes in turn, none made after the first two"
        );
    }

    /// Once both files exist, writes go into the spare in place, padded
    /// to whole blocks; a spare replaced behind the agent's back is never
    /// traded in, and the write goes by name instead.
    #[test]
    fn writes_in_place_and_by_name_when_the_spare_was_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = StateFile::new(dir.path());
        let spare = file.path().with_extension("json.spare");
        let state = |n| State {
            residual_h2d_bytes: n,
            ..Default::default()
        };
        for n in 0..5 {
            file.save(&state(n)).unwrap();
            assert_eq!(StateFile::new(dir.path()).load().unwrap(), state(n));
        }
        for p in [file.path(), &spare] {
            let len = std::fs::metadata(p).unwrap().len();
            assert_eq!(len % BLOCK as u64, 0, "{} padded: {len}", p.display());
        }
        std::fs::remove_file(&spare).unwrap();
        std::fs::write(&spare, "someone else's").unwrap();
        file.save(&state(5)).unwrap();
        assert_eq!(StateFile::new(dir.path()).load().unwrap(), state(5));
        // And in place again after it.
        file.save(&state(6)).unwrap();
        assert_eq!(StateFile::new(dir.path()).load().unwrap(), state(6));
        let previous: State =
            serde_json::from_str(&std::fs::read_to_string(&spare).unwrap()).unwrap();
        assert_eq!(previous, state(5));
    }

    /// A state file that does not parse (a block torn by a power loss)
    /// gives way to the spare, the write before it; with neither, an error.
    #[test]
    fn a_torn_state_file_gives_way_to_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = StateFile::new(dir.path());
        let state = |n| State {
            residual_h2d_bytes: n,
            ..Default::default()
        };
        for n in 0..4 {
            file.save(&state(n)).unwrap();
        }
        std::fs::write(file.path(), "{\"boot_id\": \"b").unwrap();
        let mut again = StateFile::new(dir.path());
        assert_eq!(again.load().unwrap(), state(2));
        // Its next write is whole again.
        again.save(&state(9)).unwrap();
        assert_eq!(StateFile::new(dir.path()).load().unwrap(), state(9));
        std::fs::write(file.path(), "{").unwrap();
        std::fs::write(file.path().with_extension("json.spare"), "[").unwrap();
        assert!(matches!(
            StateFile::new(dir.path()).load(),
            Err(StateError::Parse { .. })
        ));
    }

    fn c(egress: u64, h2d: u64) -> Counters {
        Counters {
            egress_bytes: egress,
            h2d_bytes: h2d,
            ..Default::default()
        }
    }

    fn total(s: &State, tenant: &str) -> Counters {
        let mut t = Counters::default();
        for map in [&s.folded, &s.live] {
            if let Some(x) = map.get(tenant) {
                t.add(x);
            }
        }
        t
    }

    #[test]
    fn a_reused_map_gets_its_pending_deletes() {
        let mut s = State {
            pending_net: vec![7, 8],
            pending_pcie: vec![9],
            ..Default::default()
        };
        s.live.insert("acme".into(), c(10, 20));
        let before = s.clone();
        assert_eq!(s.adopt(Part::Net, true), [7, 8]);
        assert_eq!(s.adopt(Part::Pcie, true), [9]);
        assert_eq!(s.live, before.live, "live totals untouched");
        assert_eq!(s.folded, before.folded);
        assert!(s.pending_net.is_empty() && s.pending_pcie.is_empty());
    }

    #[test]
    fn a_new_map_moves_only_its_part_of_the_live_totals_into_folded() {
        let mut s = State {
            pending_net: vec![7],
            ..Default::default()
        };
        s.folded.insert("acme".into(), c(1, 2));
        s.live.insert("acme".into(), c(10, 20));
        s.live.insert("beta".into(), c(5, 0));
        let acme = total(&s, "acme");
        let beta = total(&s, "beta");

        // A new net map (e.g. after a reboot): nothing to delete in it.
        assert!(s.adopt(Part::Net, false).is_empty());
        assert_eq!(total(&s, "acme"), acme, "acme total unchanged");
        assert_eq!(total(&s, "beta"), beta, "beta total unchanged");
        assert_eq!(s.live["acme"], c(0, 20), "pcie part still live");
        assert!(!s.live.contains_key("beta"));

        assert!(s.adopt(Part::Pcie, false).is_empty());
        assert_eq!(total(&s, "acme"), acme);
        assert!(s.live.is_empty());
        assert_eq!(s.folded["acme"], c(11, 22));
    }

    #[test]
    fn a_foreign_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "not json").unwrap();
        let err = StateFile::new(dir.path()).load().unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }
}
