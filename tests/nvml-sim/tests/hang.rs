//! The `hang/<index>` fault: every query of that GPU (and of its MIG
//! instances) blocks until the marker is removed, then answers normally;
//! other GPUs keep answering meanwhile.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

mod common;

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{A100, H100_MIG, Sim};
use nvml_sim::state;

/// Polls `done` until `limit` passes, checking that it stays empty: the
/// hung call must not have returned while its marker exists.
fn still_blocked<T>(done: &mpsc::Receiver<T>, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done.try_recv().is_ok() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn a_hung_gpu_blocks_its_queries_and_only_its_queries() {
    let sim = Sim::new(&format!("{H100_MIG}{A100}"));
    let nvml = sim.nvml();
    let hung = nvml.device_by_index(0).unwrap();
    let mig = hung.mig_device_by_index(1).unwrap();
    let other = nvml.device_by_index(1).unwrap();
    let _p = sim.spawn(0, Some(1), 2048, 0.5);
    let expected_mig_used = mig.memory_info().unwrap().used;

    state::set_hang(&sim.state, 0, true).unwrap();
    assert!(state::hang_file(&sim.state, 0).exists());
    std::thread::scope(|s| {
        let (tx_gpu, rx_gpu) = mpsc::channel();
        let (tx_mig, rx_mig) = mpsc::channel();
        let hung = &hung;
        let mig = &mig;
        s.spawn(move || {
            let r = hung.power_usage();
            tx_gpu.send(r.is_ok()).unwrap();
        });
        s.spawn(move || {
            let r = mig.memory_info().map(|m| m.used);
            tx_mig.send(r.ok()).unwrap();
        });
        // The other GPU answers while GPU 0 hangs, many times over.
        for _ in 0..10 {
            other
                .memory_info()
                .expect("a GPU that does not hang answers");
            other.power_usage().expect("power of the other GPU");
        }
        assert!(
            still_blocked(&rx_gpu, Duration::from_millis(300)),
            "a query of the hung GPU returned while hang/0 existed"
        );
        assert!(
            still_blocked(&rx_mig, Duration::from_millis(100)),
            "a query of a MIG instance of the hung GPU returned while hang/0 existed"
        );
        state::set_hang(&sim.state, 0, false).unwrap();
        assert!(
            rx_gpu.recv_timeout(Duration::from_secs(30)).unwrap(),
            "after the hang the GPU answers normally"
        );
        assert_eq!(
            rx_mig.recv_timeout(Duration::from_secs(30)).unwrap(),
            Some(expected_mig_used),
            "after the hang the MIG instance answers its real memory"
        );
    });
    // Nothing is left blocked: another query answers at once.
    assert!(hung.memory_info().is_ok());
}

#[test]
fn a_hung_gpu_that_is_also_lost_answers_lost_once_released() {
    let sim = Sim::new(A100);
    let nvml = sim.nvml();
    let d = nvml.device_by_index(0).unwrap();
    state::set_hang(&sim.state, 0, true).unwrap();
    state::set_lost(&sim.state, 0, true).unwrap();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let d = &d;
        s.spawn(move || {
            let r = d.memory_info();
            tx.send(matches!(r, Err(nvml_wrapper::error::NvmlError::GpuLost)))
                .unwrap();
        });
        assert!(still_blocked(&rx, Duration::from_millis(200)));
        state::set_hang(&sim.state, 0, false).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_secs(30)).unwrap(),
            "released, the lost GPU says GPU_IS_LOST"
        );
    });
}
