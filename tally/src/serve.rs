//! Serving HTTP for both roles: a hyper HTTP/1 server that hands each
//! request to the role's route function, plain or TLS, and drains on
//! shutdown: it stops accepting, asks every open connection to finish its
//! current request, and waits for them (at most [`DRAIN_GRACE`]).

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

/// How long open connections get to finish once shutdown begins.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Binds `addr`, naming the address when it cannot.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Serves `route` on `listener` until `shutdown` is cancelled, speaking TLS
/// on every connection when `tls` is given (a failed handshake closes that
/// connection only); returns once every connection has drained.
pub(crate) async fn serve<F, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    route: F,
    shutdown: CancellationToken,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let route = Arc::new(route);
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let route = route.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => connection(stream, peer, route, shutdown).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => connection(stream, peer, route, shutdown).await,
                    Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN_GRACE, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            grace = ?DRAIN_GRACE,
            "connections still open after the drain grace; closing them"
        );
    }
}

/// Serves HTTP/1 on one connection, plain or TLS; on shutdown the current
/// request is answered and the connection closed.
async fn connection<I, F, Fut>(io: I, peer: SocketAddr, route: Arc<F>, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = service_fn(move |req| {
        let route = route.clone();
        async move { Ok::<_, Infallible>(route(req).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use hyper::StatusCode;

    use super::*;

    /// A request in flight when shutdown begins is answered whole, and
    /// `serve` returns only after it has been.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_drains_the_request_in_flight() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let route = |_req: Request<Incoming>| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut r = Response::new(Full::new(Bytes::from_static(b"slow but whole")));
            *r.status_mut() = StatusCode::OK;
            r
        };
        let server = tokio::spawn(serve(listener, None, route, shutdown.clone()));
        let client =
            tokio::spawn(
                async move { reqwest::get(format!("http://{addr}/")).await?.text().await },
            );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cancelled = Instant::now();
        shutdown.cancel();
        server.await.unwrap();
        assert!(
            cancelled.elapsed() >= Duration::from_millis(300),
            "serve returned before the request in flight was answered"
        );
        assert_eq!(client.await.unwrap().unwrap(), "slow but whole");
        // Nothing is accepted after shutdown.
        assert!(reqwest::get(format!("http://{addr}/")).await.is_err());
    }
}
