//! Hands back the pages of the agent's own code and constants that only
//! start-up needed.
//!
//! The kernel maps an executable's pages 64 KiB at a time around each
//! fault ("fault-around"), so start-up (argument and config parsing, BTF,
//! probe loading, the first enforcement pass) leaves about 8 MiB of the
//! binary resident, where the steady cycle and the scrapes touch under
//! 4 MiB (`cargo xtask bench`, §2). Once start-up is over, the agent asks
//! the kernel to reclaim its read-only file mappings (`MADV_PAGEOUT`):
//! clean pages of a file, dropped from memory as the kernel would under
//! pressure, and faulted in again, from the page cache or the disk, where
//! the next cycle needs them. Mappings holding copied-on-write pages
//! (relocated constants) are left alone: reclaiming those would mean swap.

use std::{io, ops::Range, path::Path};

use procfs::process::{MMPermissions, MMapPath, MemoryMap, Process};
use tracing::debug;

use crate::cgroupfs::proc_error;

/// Pages out the executable's read-only mappings that hold no anonymous
/// pages; returns how many bytes of address space were advised. Once,
/// after start-up: per cycle the hot pages would only fault in again.
pub fn release_start_up_code() -> io::Result<usize> {
    let me = Process::myself().map_err(proc_error)?;
    let exe = me.exe().map_err(proc_error)?;
    let mut advised = 0;
    for map in &me.smaps().map_err(proc_error)? {
        if is_clean_read_only_of(map, &exe) {
            let range = map.address.0 as usize..map.address.1 as usize;
            page_out(&range)?;
            advised += range.len();
        }
    }
    debug!(bytes = advised, "start-up code paged out");
    Ok(advised)
}

/// Whether `map` is one of `file`'s mappings, not writable, and holds no
/// anonymous (copied) pages.
fn is_clean_read_only_of(map: &MemoryMap, file: &Path) -> bool {
    map.perms.contains(MMPermissions::READ)
        && !map.perms.contains(MMPermissions::WRITE)
        && matches!(&map.pathname, MMapPath::Path(p) if p == file)
        && map.extension.map.get("Anonymous") == Some(&0)
}

/// `madvise(MADV_PAGEOUT)` over `range`; a kernel without it (before
/// 5.4) answers `EINVAL`, which leaves the pages where they are.
#[allow(unsafe_code)]
fn page_out(range: &Range<usize>) -> io::Result<()> {
    // SAFETY: the range is a whole mapping of this process, page-aligned
    // as the kernel listed it; MADV_PAGEOUT only reclaims its clean file
    // pages, which fault in again on the next access, so no memory the
    // program holds changes.
    let rc = unsafe {
        nix::libc::madvise(
            range.start as *mut nix::libc::c_void,
            range.len(),
            nix::libc::MADV_PAGEOUT,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0200000 r--p 00000000 fe:01 123 /opt/tally bin/tally
Rss:                1024 kB
Anonymous:             0 kB
55d0c0200000-55d0c0800000 r-xp 00200000 fe:01 123 /opt/tally bin/tally
Rss:                8000 kB
Anonymous:             0 kB
55d0c0800000-55d0c0900000 r--p 00800000 fe:01 123 /opt/tally bin/tally
Rss:                1024 kB
Anonymous:           900 kB
55d0c0900000-55d0c0910000 rw-p 00900000 fe:01 123 /opt/tally bin/tally
Rss:                  64 kB
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 fe:01 456 /usr/lib/libc.so.6
Rss:                 800 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
Rss:                 100 kB
Anonymous:           100 kB
";

    #[test]
    fn only_the_executables_clean_read_only_mappings_are_chosen() {
        use procfs::{FromBufRead as _, process::MemoryMaps};
        let maps = MemoryMaps::from_buf_read(SMAPS.as_bytes()).unwrap();
        let chosen = |file: &str| -> Vec<(u64, u64)> {
            maps.iter()
                .filter(|m| is_clean_read_only_of(m, Path::new(file)))
                .map(|m| m.address)
                .collect()
        };
        assert_eq!(
            chosen("/opt/tally bin/tally"),
            vec![
                (0x55d0c0000000, 0x55d0c0200000),
                (0x55d0c0200000, 0x55d0c0800000),
            ]
        );
        assert!(chosen("/opt/other").is_empty());
    }

    /// A MiB of this binary's read-only data that only the test below
    /// touches: other tests, running meanwhile, fault the code they run
    /// back in, never this.
    static COLD: [u8; 1 << 20] = [7; 1 << 20];

    /// How many of `bytes`' pages are mapped in (`/proc/self/pagemap`'s
    /// present bit, readable without privileges).
    fn present_pages(bytes: &[u8]) -> usize {
        use std::os::unix::fs::FileExt as _;
        let page = rustix::param::page_size();
        let first = bytes.as_ptr() as usize / page;
        let last = (bytes.as_ptr() as usize + bytes.len() - 1) / page;
        let mut entries = vec![0u8; (last - first + 1) * 8];
        std::fs::File::open("/proc/self/pagemap")
            .unwrap()
            .read_exact_at(&mut entries, first as u64 * 8)
            .unwrap();
        entries
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
            .count()
    }

    /// The real thing on this test binary: a part of its read-only data,
    /// touched, leaves memory.
    #[test]
    fn the_executables_code_leaves_memory() {
        let cold = std::hint::black_box(&COLD);
        let page = rustix::param::page_size();
        for i in (0..cold.len()).step_by(page) {
            // Read through `black_box`: the compiler may not skip it.
            std::hint::black_box(cold[i]);
        }
        let before = present_pages(cold);
        match release_start_up_code() {
            Ok(advised) => assert!(advised > 0),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                eprintln!("skipped: this kernel has no MADV_PAGEOUT");
                return;
            }
            Err(e) => panic!("page out: {e}"),
        }
        let after = present_pages(cold);
        assert!(
            before >= cold.len() / page,
            "{before} pages resident before"
        );
        assert!(
            after < before / 2,
            "{before} pages resident before, {after} after"
        );
    }
}
