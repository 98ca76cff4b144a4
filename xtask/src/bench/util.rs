//! Plumbing of the benchmarks alone: statistics, /proc readings, processes
//! stopped on drop, BPF run-time statistics. HTTP, metrics, the simulator
//! and cgroups come from the test kit (`tally_e2e`).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::exec::target_dir;

// ------------------------------------------------------------- statistics

/// Median, spread and tail of a set of measurements.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub p99: f64,
}

impl Stats {
    pub(super) fn of(values: &[f64]) -> Stats {
        if values.is_empty() {
            return Stats::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Stats {
            n: v.len(),
            min: v[0],
            median: quantile(&v, 0.5),
            max: v[v.len() - 1],
            p99: quantile(&v, 0.99),
        }
    }

    /// `median (min–max)` with `digits` decimals.
    pub(super) fn show(&self, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
}

/// Quantile `q` of sorted `v` (nearest rank, interpolated).
pub(super) fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

// ------------------------------------------------------------------ /proc

/// The machine's CPU time so far and the part of it the hypervisor gave
/// to other guests (`steal`), in ticks, from `/proc/stat`. On this VM
/// steal, not load average, is what made rates minutes apart differ by
/// half: each figure says how much of its run was taken away.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct CpuTime {
    total: f64,
    steal: f64,
}

impl CpuTime {
    pub(super) fn now() -> CpuTime {
        use procfs::CurrentSI as _;
        procfs::KernelStats::current()
            .map(|k| CpuTime::of(&k.total))
            .unwrap_or_default()
    }

    /// Every state a CPU's time is in (user nice system idle iowait irq
    /// softirq steal; guest time is already in user and nice), and steal.
    fn of(t: &procfs::CpuTime) -> CpuTime {
        let steal = t.steal.unwrap_or(0);
        let total = [t.iowait, t.irq, t.softirq]
            .into_iter()
            .flatten()
            .fold(t.user + t.nice + t.system + t.idle + steal, |sum, v| {
                sum + v
            });
        CpuTime {
            total: total as f64,
            steal: steal as f64,
        }
    }

    /// `stat` read as `/proc/stat` is.
    #[cfg(test)]
    fn parse(stat: &str) -> Option<CpuTime> {
        use procfs::FromReadSI as _;
        let system = procfs::ExplicitSystemInfo {
            boot_time_secs: 0,
            ticks_per_second: 100,
            page_size: 4096,
            is_little_endian: true,
        };
        procfs::KernelStats::from_read(stat.as_bytes(), &system)
            .ok()
            .map(|k| CpuTime::of(&k.total))
    }

    /// Percent of the CPU time since `earlier` that was stolen.
    pub(super) fn stolen_since(&self, earlier: &CpuTime) -> f64 {
        let total = self.total - earlier.total;
        if total <= 0.0 {
            return 0.0;
        }
        (self.steal - earlier.steal) / total * 100.0
    }
}

/// Seconds of `ticks` of `/proc/<pid>/stat`.
pub(super) fn tick_seconds(ticks: u64) -> f64 {
    ticks as f64 / procfs::ticks_per_second() as f64
}

/// CPU seconds (user + system, all threads) a process has used.
pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .with_context(|| format!("process {pid} is gone"))?;
    Ok(tick_seconds(stat.utime + stat.stime))
}

/// CPU seconds of a process, with those of its reaped children, plus
/// those of its live children: PostgreSQL's postmaster and its backends,
/// including the backends of a killed aggregator.
pub(super) fn tree_cpu(pid: u32) -> f64 {
    let mut total = 0;
    for p in procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
    {
        // A process that ended meanwhile is left out.
        let Ok(stat) = p.stat() else { continue };
        if stat.pid == pid as i32 {
            total += stat.utime + stat.stime;
            total += (stat.cutime + stat.cstime).max(0) as u64;
        } else if stat.ppid == pid as i32 {
            total += stat.utime + stat.stime;
        }
    }
    tick_seconds(total)
}

/// CPU seconds per thread group of a process: threads named alike but for
/// a trailing number (`tally-gpu0`, `tally-gpu1`, …) are added up. Each
/// thread's time is its scheduler run time (`task/<tid>/schedstat`): its
/// `stat` gives whole 10 ms ticks, and a split over eight GPU threads that
/// each run a few milliseconds a minute was mostly rounding. The `stat`
/// ticks where `schedstat` is missing.
pub(super) fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = procfs::process::Process::new(pid as i32).and_then(|p| p.tasks()) else {
        return out;
    };
    for task in tasks.flatten() {
        // A thread that ended meanwhile is left out.
        let Ok(stat) = task.stat() else { continue };
        let secs = match task.schedstat() {
            Ok(s) => s.sum_exec_runtime as f64 / 1e9,
            Err(_) => tick_seconds(stat.utime + stat.stime),
        };
        let group = stat.comm.trim_end_matches(|c: char| c.is_ascii_digit());
        *out.entry(group.to_owned()).or_insert(0.0) += secs;
    }
    out
}

/// `after − before` per thread group, largest first.
pub(super) fn thread_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = after
        .iter()
        .map(|(k, a)| (k.clone(), a - before.get(k).copied().unwrap_or(0.0)))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// The machine, for the report's header.
pub(super) fn machine() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{nproc} CPUs ({model}), {mem} RAM, Linux {kernel}")
}

/// Other busy processes right now (compilers of other engineers): the top
/// few by CPU, as `ps` shows them.
pub(super) fn busy_processes() -> String {
    Command::new("ps")
        .args(["-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .take(5)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

// ------------------------------------------------------------------- HTTP

/// One `GET` timed from connect to the last body byte.
#[derive(Debug)]
pub(super) struct Timed {
    pub ms: f64,
    /// The status line and headers, names lower-cased.
    pub head: String,
    pub body: Vec<u8>,
}

/// `GET path` on a new connection, timed. The test kit's client (ureq) is
/// built without optimisation in `cargo xtask`, and at megabyte bodies its
/// reading took more time than the server's answer: the timing would have
/// measured the client. This one asks with `Connection: close` and reads
/// the answer to the end with std's reader (std ships optimised), so what
/// it times is the server and the socket.
pub(super) fn timed_get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Timed> {
    use std::io::{Read as _, Write as _};
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut answer = Vec::with_capacity(4 << 20);
    let t = Instant::now();
    let mut conn = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    conn.write_all(request.as_bytes())?;
    conn.read_to_end(&mut answer)?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("GET {path}: no end of headers in {} bytes", answer.len()))?;
    let head = String::from_utf8_lossy(&answer[..end]).to_lowercase();
    let body = answer.split_off(end + 4);
    if !head.starts_with("http/1.1 200") {
        bail!("GET {path} answered {}", head.lines().next().unwrap_or(""));
    }
    // The whole body came, not a connection cut short.
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    if length != Some(body.len()) {
        bail!(
            "GET {path}: content-length {length:?}, got {} bytes",
            body.len()
        );
    }
    Ok(Timed { ms, head, body })
}

// -------------------------------------------------------------- processes

/// A child process: SIGTERM, then SIGKILL after a grace period, on drop.
pub(super) struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub(super) fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Proc {
            child,
            name: name.to_owned(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited.
    pub(super) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub(super) fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A scratch directory under the target dir, emptied first.
pub(super) fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("bench").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    Ok(dir)
}

/// Number of eBPF programs attached to the cgroup v2 root (bpftool).
pub(super) fn root_programs(mount: &Path) -> Option<usize> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(mount)
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("cgroup_skb") || l.contains("egress") || l.contains("ingress"))
            .count()
    })
}

/// Kernel BPF run-time statistics (`kernel.bpf_stats_enabled`) switched on
/// while alive; the previous setting is restored on drop.
pub(super) struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn enable() -> Option<BpfStats> {
        let previous = fs::read_to_string(BPF_STATS).ok()?.trim().to_owned();
        fs::write(BPF_STATS, "1").ok()?;
        Some(BpfStats { previous })
    }

    /// Runs and nanoseconds so far of every loaded program of `kind`
    /// (bpftool's `type`, e.g. `kprobe` for uprobes, `cgroup_skb`).
    pub(super) fn read(&self, kind: &str) -> (u64, u64) {
        let Ok(out) = Command::new("bpftool")
            .args(["prog", "show", "-j"])
            .output()
        else {
            return (0, 0);
        };
        let progs: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        progs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["type"].as_str() == Some(kind))
            .fold((0, 0), |(c, t), p| {
                (
                    c + p["run_cnt"].as_u64().unwrap_or(0),
                    t + p["run_time_ns"].as_u64().unwrap_or(0),
                )
            })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.previous);
    }
}

/// Removes a bpffs pin directory (unpinning maps and links in it).
pub(super) fn remove_pins(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    /// A thread that burns CPU shows in its group (the number that ends
    /// its name dropped) and in its process's total.
    #[test]
    fn cpu_time_is_read_per_thread_group_and_per_process() {
        let pid = std::process::id();
        let before = super::cpu_seconds(pid).unwrap();
        let burner = std::thread::Builder::new()
            .name("xtask-burn7".into())
            .spawn(|| {
                let start = std::time::Instant::now();
                while start.elapsed() < std::time::Duration::from_millis(300) {
                    std::hint::black_box(0u64);
                }
                super::thread_cpu(std::process::id())
            })
            .unwrap();
        let groups = burner.join().unwrap();
        let burnt = groups.get("xtask-burn").copied().unwrap_or(0.0);
        // Busy for 0.3 s of wall time, on a core shared with others.
        assert!(burnt > 0.05 && burnt < 1.0, "{groups:?}");
        let used = super::cpu_seconds(pid).unwrap() - before;
        // Ticks are 10 ms: the total may round below the thread's own time.
        assert!(used > burnt - 0.05, "process {used} s, thread {burnt} s");
        assert!(super::cpu_seconds(u32::MAX).is_err());
    }

    #[test]
    fn steal_is_the_stolen_share_of_the_cpu_time_between_readings() {
        // The lines /proc/stat always has besides the CPUs'.
        let stat = |cpus: &str| format!("{cpus}ctxt 1\nbtime 1\nprocesses 1\n");
        let before = CpuTime::parse(&stat(
            "cpu  100 0 50 800 10 0 0 40 7 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n",
        ))
        .unwrap();
        let after = CpuTime::parse(&stat("cpu  160 0 60 880 10 0 0 90 9 0\n")).unwrap();
        // 200 ticks passed, 50 of them stolen; guest time is not counted
        // twice.
        assert_eq!(after.stolen_since(&before), 25.0);
        assert_eq!(before.stolen_since(&before), 0.0);
        assert_eq!(CpuTime::parse(&stat("cpu0 1 2 3\n")), None);
        assert_eq!(CpuTime::parse(&stat("cpu  1 2 x 4 5 6 7 8\n")), None);
    }

    use super::*;

    #[test]
    fn stats_and_quantiles() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
        assert_eq!(quantile(&[1.0, 2.0], 0.5), 1.5);
        assert_eq!(s.show(1), "3.0 (1.0–5.0)");
    }
}
