//! One reader thread per GPU, so that an NVML call that hangs stalls only
//! its own device: the sampler waits for each answer until a deadline,
//! marks a device that misses it, and sends it no new request until the
//! hung call returns.

use std::{
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    time::{Duration, Instant},
};

use nvml_wrapper::{Nvml, error::NvmlError};
use tracing::warn;

use super::read::{RawDevice, ReaderState, read_device};

type Answer = Result<RawDevice, NvmlError>;

/// What became of one device's read this cycle.
#[derive(Debug)]
pub(super) enum Outcome {
    Read(Box<RawDevice>),
    Failed(NvmlError),
    /// The read did not answer within the deadline (now or in an earlier
    /// cycle, and is still running).
    Hung {
        since: Duration,
    },
}

struct Worker {
    requests: Sender<u64>,
    answers: Receiver<Answer>,
    /// Set while a request is out; a hung call keeps it set.
    outstanding: Option<Instant>,
}

/// The reader threads, by device index.
#[derive(Default)]
pub(super) struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Reads devices `0..count` in parallel, each with its utilization
    /// cursor, waiting at most until `deadline` for all of them.
    pub(super) fn read_all(
        &mut self,
        nvml: &'static Nvml,
        cursors: &[u64],
        timeout: Duration,
    ) -> Vec<Outcome> {
        let count = cursors.len();
        while self.workers.len() < count {
            match spawn(nvml, self.workers.len() as u32) {
                Some(w) => self.workers.push(w),
                None => break,
            }
        }
        let now = Instant::now();
        for (w, cursor) in self.workers.iter_mut().zip(cursors) {
            if w.outstanding.is_none() && w.requests.send(*cursor).is_ok() {
                w.outstanding = Some(now);
            }
        }
        let deadline = now + timeout;
        (0..count)
            .map(|i| {
                let Some(w) = self.workers.get_mut(i) else {
                    return Outcome::Failed(NvmlError::Unknown);
                };
                let Some(sent) = w.outstanding else {
                    return Outcome::Failed(NvmlError::Unknown);
                };
                let wait = deadline.saturating_duration_since(Instant::now());
                match w.answers.recv_timeout(wait) {
                    Ok(answer) => {
                        w.outstanding = None;
                        match answer {
                            Ok(raw) => Outcome::Read(Box::new(raw)),
                            Err(e) => Outcome::Failed(e),
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => Outcome::Hung {
                        since: sent.elapsed(),
                    },
                    Err(RecvTimeoutError::Disconnected) => Outcome::Failed(NvmlError::Unknown),
                }
            })
            .collect()
    }
}

fn spawn(nvml: &'static Nvml, index: u32) -> Option<Worker> {
    let (requests, rx) = mpsc::channel::<u64>();
    let (tx, answers) = mpsc::channel::<Answer>();
    let spawned = std::thread::Builder::new()
        .name(format!("tally-gpu{index}"))
        .spawn(move || {
            let mut state = ReaderState::default();
            for cursor in rx {
                if tx
                    .send(read_device(nvml, index, cursor, &mut state))
                    .is_err()
                {
                    return;
                }
            }
        });
    match spawned {
        Ok(_) => Some(Worker {
            requests,
            answers,
            outstanding: None,
        }),
        Err(e) => {
            warn!(gpu = index, error = %e, "cannot start a GPU reader thread");
            None
        }
    }
}
