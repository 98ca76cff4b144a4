//! Shutdown on SIGINT/SIGTERM: the first signal cancels the token and lets
//! tasks finish within their grace period; a second one exits at once.
//! SIGHUP asks for a reload (the aggregator's credentials).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancels the returned token on the first SIGINT or SIGTERM.
pub(crate) fn shutdown_token() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("shutting down (a second signal exits at once)");
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(token)
}

/// Calls `reload` on every SIGHUP until `shutdown` is cancelled.
pub(crate) fn on_hangup(
    reload: impl Fn() + Send + 'static,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    info!("SIGHUP: reloading credentials");
                    reload();
                }
            }
        }
    });
    Ok(())
}
