//! Times simulated NVML calls for `cargo xtask bench --only sim`.
//!
//! `sim_calls LIB [SECONDS]` loads the simulator at `LIB` (so a baseline
//! build can be timed too) with the scenario and state directory from the
//! environment, and prints one `<call> <wall ns> <cpu ns> <calls>` line
//! (per call) for each call the agent's NVML threads make most, each timed
//! on GPU 0 for about `SECONDS` (default 1). CPU time is this thread's
//! (`/proc/thread-self/schedstat`), which a loaded machine moves far less
//! than wall time.
// Examples use a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;

fn main() {
    let mut args = std::env::args().skip(1);
    let lib = args.next().expect("usage: sim_calls LIB [SECONDS]");
    let seconds: f64 = args
        .next()
        .map_or(1.0, |s| s.parse().expect("SECONDS is a number"));
    let budget = Duration::from_secs_f64(seconds);
    let nvml = Nvml::builder()
        .lib_path(lib.as_ref())
        .init()
        .expect("nvml init");
    let dev = nvml.device_by_index(0).expect("GPU 0");
    let listed = dev.running_compute_processes().expect("processes").len();
    println!("listed {listed}");
    // nvml-wrapper asks for the count, then for the list: two C calls.
    time("running_compute_processes", budget, || {
        dev.running_compute_processes().map(|p| p.len() as u64)
    });
    time("total_energy_consumption", budget, || {
        dev.total_energy_consumption()
    });
    time("utilization_rates", budget, || {
        dev.utilization_rates().map(|u| u64::from(u.gpu))
    });
}

/// Calls `f` for about `budget` (at least three times) and prints the
/// means.
fn time<E: std::fmt::Debug>(name: &str, budget: Duration, mut f: impl FnMut() -> Result<u64, E>) {
    f().expect(name);
    let cpu = cpu_ns();
    let start = Instant::now();
    let mut calls = 0u64;
    let mut sink = 0u64;
    while calls < 3 || start.elapsed() < budget {
        sink = sink.wrapping_add(f().expect(name));
        calls += 1;
    }
    let ns = start.elapsed().as_nanos() / u128::from(calls);
    let cpu = (cpu_ns() - cpu) / u128::from(calls);
    println!("{name} {ns} {cpu} {calls}");
    std::hint::black_box(sink);
}

/// CPU time of this thread, ns (the first field of its schedstat).
fn cpu_ns() -> u128 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let first = text.split_whitespace().next().expect("schedstat field");
    first.parse().expect("schedstat is numbers")
}
