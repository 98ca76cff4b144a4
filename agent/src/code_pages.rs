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

use std::{fs, io, ops::Range, path::Path};

use tracing::debug;

/// Pages out the executable's read-only mappings that hold no anonymous
/// pages; returns how many bytes of address space were advised. Once,
/// after start-up: per cycle the hot pages would only fault in again.
pub fn release_start_up_code() -> io::Result<usize> {
    let exe = fs::read_link("/proc/self/exe")?;
    let smaps = fs::read_to_string("/proc/self/smaps")?;
    let mut advised = 0;
    for range in clean_read_only_mappings(&smaps, &exe) {
        page_out(&range)?;
        advised += range.len();
    }
    debug!(bytes = advised, "start-up code paged out");
    Ok(advised)
}

/// Address ranges of `file`'s mappings in `smaps` (`/proc/<pid>/smaps`)
/// that are not writable and hold no anonymous (copied) pages.
fn clean_read_only_mappings(smaps: &str, file: &Path) -> Vec<Range<usize>> {
    let file = file.as_os_str().to_string_lossy();
    let mut out = Vec::new();
    let mut current: Option<Range<usize>> = None;
    for line in smaps.lines() {
        if let Some(anon) = line.strip_prefix("Anonymous:") {
            let clean = anon.trim().strip_suffix("kB").map(str::trim) == Some("0");
            if let Some(range) = current.take().filter(|_| clean) {
                out.push(range);
            }
            continue;
        }
        // A mapping's header: "start-end perms offset dev inode path".
        let mut fields = line.split_whitespace();
        let (Some(span), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = span.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // The path is the rest after offset, device and inode; it may
        // hold spaces.
        let path = line.splitn(6, char::is_whitespace).nth(5).map(str::trim);
        current = (perms.starts_with('r') && !perms.contains('w') && path == Some(&*file))
            .then_some(start..end);
    }
    out
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
        let ranges = clean_read_only_mappings(SMAPS, Path::new("/opt/tally bin/tally"));
        assert_eq!(
            ranges,
            vec![
                0x55d0c0000000..0x55d0c0200000,
                0x55d0c0200000..0x55d0c0800000,
            ]
        );
        assert!(clean_read_only_mappings(SMAPS, Path::new("/opt/other")).is_empty());
    }

    /// Resident kB of `file`'s read-only mappings in this process.
    fn resident_kb(file: &Path) -> u64 {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let file = file.to_string_lossy();
        let mut mine = false;
        let mut total = 0;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if mine {
                    total += rss
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
            } else if line.contains('-') && line.split_whitespace().count() >= 5 {
                let perms = line.split_whitespace().nth(1).unwrap_or("");
                mine = !perms.contains('w') && line.trim_end().ends_with(&*file);
            }
        }
        total
    }

    /// The real thing on this test binary: its code leaves memory (what
    /// other tests run meanwhile comes back, far less than all of it).
    #[test]
    fn the_executables_code_leaves_memory() {
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let before = resident_kb(&exe);
        match release_start_up_code() {
            Ok(advised) => assert!(advised > 0),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                eprintln!("skipped: this kernel has no MADV_PAGEOUT");
                return;
            }
            Err(e) => panic!("page out: {e}"),
        }
        let after = resident_kb(&exe);
        assert!(before > 1024, "{before} kB resident before");
        assert!(
            after < before / 2,
            "{before} kB resident before, {after} kB after"
        );
    }
}
