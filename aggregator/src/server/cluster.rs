//! `GET /api/v1/cluster`, and the view the scheduler extender decides by.

use hyper::{Request, Response, StatusCode, body::Incoming};
use tracing::error;

use super::app::{App, auth_error, problem};
use crate::{
    cluster::ClusterView,
    http::{self, Body},
    ledger::LedgerError,
    time::now_ms,
};

/// Reads the cluster view as of `now_ms` (aggregator clock).
pub(super) async fn load(app: &App, now_ms: i64) -> Result<ClusterView, LedgerError> {
    Ok(ClusterView::build(app.ledger.cluster_rows().await?, now_ms))
}

/// `GET /api/v1/cluster`: admin sees everything, a tenant token its
/// tenant's view ([`ClusterView::for_tenant`]), an agent token gets 403.
pub(super) async fn handle(req: Request<Incoming>, app: &App) -> Response<Body> {
    let role = match app.tokens.authenticate(req.headers()) {
        Ok(r) => r,
        Err(e) => return auth_error(e),
    };
    let only = match role.may_read(None) {
        Ok(t) => t,
        Err(e) => return auth_error(e),
    };
    match load(app, now_ms()).await {
        Ok(view) => {
            let view = view.priced(&app.prices);
            let view = match &only {
                Some(t) => view.for_tenant(t),
                None => view,
            };
            http::json(StatusCode::OK, &view)
        }
        Err(e) => {
            app.metrics.ledger_errors.inc();
            error!(error = %e, "ledger read failed (cluster view)");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ledger unavailable: {e}"),
            )
        }
    }
}
