//! The one tokio runtime of a long-running role (agent, aggregator) or of
//! a client command (`tally report`).

use std::future::Future;

/// Runs `task` on a two-worker runtime; `None` (and a line on stderr) when
/// the runtime cannot start. Blocking work (NVML, kernel maps) runs on the
/// agent's own threads, so two workers serve HTTP and I/O.
pub(crate) fn block_on<T>(task: impl Future<Output = T>) -> Option<T> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tally-rt")
        .build()
    {
        Ok(rt) => Some(rt.block_on(task)),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            None
        }
    }
}
