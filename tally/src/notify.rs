//! The service manager's notification protocol (sd_notify(3)) by hand:
//! one datagram to `$NOTIFY_SOCKET` per state change, and the watchdog
//! pings while the sampler keeps publishing.
//!
//! Not the `sd-notify` crate: its 0.5 release sends only to filesystem
//! sockets, and container managers hand out abstract ones (`@…`).

use std::{
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
    time::Duration,
};

use tally_agent::snapshot::Latest;
use tokio_util::sync::CancellationToken;

/// Sends `state` (`READY=1`, `WATCHDOG=1`, `STOPPING=1`); false when
/// there is no socket or the send failed (not run by systemd: fine).
pub(crate) fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a)),
        None => sock.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// Half of `$WATCHDOG_USEC` when the watchdog is meant for this process.
fn watchdog_period() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// `READY=1` once the first sample is published (when `/readyz` turns
/// 200), then `WATCHDOG=1` each half watchdog period in which the sampler
/// published a new snapshot: a hung sampler stops the pings and systemd
/// restarts the agent. `STOPPING=1` on shutdown.
pub(crate) async fn agent(mut latest: Latest, shutdown: CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        r = latest.wait_for(|s| s.samples > 0) => if r.is_err() { return },
    }
    notify("READY=1");
    let mut seen = 0;
    until_shutdown(shutdown, move || {
        let now = latest.borrow().samples;
        std::mem::replace(&mut seen, now) != now
    })
    .await;
}

/// `READY=1` (the ledger is open and the listener bound), then
/// `WATCHDOG=1` each half period while the runtime runs, `STOPPING=1` on
/// shutdown.
pub(crate) async fn aggregator(shutdown: CancellationToken) {
    notify("READY=1");
    until_shutdown(shutdown, || true).await;
}

/// After `READY=1`, for both roles: `WATCHDOG=1` each half watchdog period
/// in which `alive` says so (no pings without `$WATCHDOG_USEC`), then
/// `STOPPING=1` once `shutdown` is cancelled.
async fn until_shutdown(shutdown: CancellationToken, mut alive: impl FnMut() -> bool) {
    let mut tick = watchdog_period().map(tokio::time::interval);
    loop {
        let next = async {
            match tick.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {
                notify("STOPPING=1");
                return;
            }
            _ = next => {
                if alive() {
                    notify("WATCHDOG=1");
                }
            }
        }
    }
}
