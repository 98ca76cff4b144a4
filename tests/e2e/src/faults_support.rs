//! Fixtures of the fault-injection and least-privilege tests
//! (`tests/faults.rs`, `tests/privileges.rs`): a hung simulated GPU that is
//! released on drop, a wall clock that can be moved for one process, a
//! process forced onto a given pid, and `/proc/<pid>/status` readings.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Cgroup, ChildGuard, SimNode};

/// The `hang/<index>` fault of the simulator, lifted on drop so that no
/// thread of the agent under test stays blocked after the test.
pub struct Hang {
    marker: PathBuf,
}

impl Hang {
    /// Makes every NVML query of GPU `index` block until dropped.
    pub fn start(node: &SimNode, index: u32) -> Hang {
        let dir = node.state.join("hang");
        fs::create_dir_all(&dir).expect("hang dir");
        let marker = dir.join(index.to_string());
        fs::write(&marker, "").expect("mark hung");
        Hang { marker }
    }

    /// Lifts the fault now.
    pub fn release(self) {}
}

impl Drop for Hang {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.marker);
    }
}

/// An `LD_PRELOAD` library that shifts `CLOCK_REALTIME` (and its coarse
/// variant) of the process that loads it by the number of seconds written
/// in a file, re-read on every call: the wall clock can jump while the
/// monotonic clock runs on. `faketime` does the same and is not packaged
/// on every machine this runs on; this is 30 lines of C built with `cc`
/// (or clang).
pub struct WallClock {
    pub library: PathBuf,
    pub offset_file: PathBuf,
}

const CLOCK_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

int clock_gettime(clockid_t id, struct timespec *ts) {
    static clock_gettime_fn real;
    if (!real) real = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        const char *file = getenv("TALLY_TEST_CLOCK_OFFSET_FILE");
        if (file) {
            int fd = open(file, O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                char buf[32] = {0};
                ssize_t n = read(fd, buf, sizeof buf - 1);
                close(fd);
                if (n > 0) ts->tv_sec += atol(buf);
            }
        }
    }
    return r;
}
"#;

impl WallClock {
    /// Builds the library in `dir` with an offset of 0.
    pub fn build(dir: &Path) -> WallClock {
        let source = dir.join("clock-shim.c");
        let library = dir.join("libclock-shim.so");
        let offset_file = dir.join("clock-offset");
        fs::write(&source, CLOCK_SHIM).expect("write clock shim");
        fs::write(&offset_file, "0").expect("write clock offset");
        // `cc` where there is one, else clang (which the eBPF build needs
        // anyway, so `cargo xtask test` installs it).
        let compile = |compiler: &str| {
            Command::new(compiler)
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(&library)
                .arg(&source)
                .arg("-ldl")
                .output()
        };
        let out = compile("cc")
            .or_else(|_| compile("clang"))
            .expect("run cc or clang");
        assert!(
            out.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        WallClock {
            library,
            offset_file,
        }
    }

    /// Environment for a process whose wall clock this controls.
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [
            ("LD_PRELOAD", self.library.clone()),
            ("TALLY_TEST_CLOCK_OFFSET_FILE", self.offset_file.clone()),
        ]
    }

    /// Moves the controlled wall clock to `seconds` from the real one.
    pub fn set_offset(&self, seconds: i64) {
        let tmp = self.offset_file.with_extension("tmp");
        fs::write(&tmp, seconds.to_string()).expect("write offset");
        fs::rename(&tmp, &self.offset_file).expect("rename offset");
    }
}

/// Starts `program args…` in `cgroup` as pid `pid`, by setting the pid
/// namespace's last allocated pid (`/proc/sys/kernel/ns_last_pid`, root
/// only) right before the fork. Other processes fork too, so it retries;
/// `None` when the pid never came out (or is taken).
pub fn spawn_as_pid(cgroup: &Cgroup, pid: u32, program: &str, args: &[&str]) -> Option<ChildGuard> {
    for _ in 0..200 {
        if Path::new(&format!("/proc/{pid}")).exists() {
            return None;
        }
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let child = ChildGuard(
            cgroup
                .command(program, args)
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("spawn"),
        );
        if child.pid() == pid {
            // Wait until the shell has moved itself into the cgroup.
            crate::wait_for(
                "the process to enter its cgroup",
                std::time::Duration::from_secs(10),
                || {
                    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
                    text.lines()
                        .any(|l| l.strip_prefix("0::") == Some(cgroup.path.as_str()))
                        .then_some(())
                },
            );
            return Some(child);
        }
        drop(child);
    }
    None
}

/// A field of `/proc/<pid>/status` (`VmRSS`, `CapEff`, `NoNewPrivs`, …),
/// without its unit.
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().trim_end_matches(" kB").to_owned())
}

/// Resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// A capability mask of `/proc/<pid>/status` (`CapEff`, `CapBnd`, …).
pub fn cap_mask(pid: u32, field: &str) -> u64 {
    status_field(pid, field)
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or_else(|| panic!("no {field} for pid {pid}"))
}
