//! `GET /api/v1/audit`: the central audit store.

use hyper::{Request, Response, StatusCode, body::Incoming};
use serde_json::json;

use super::{
    app::{App, problem, reader},
    query::query,
};
use crate::{
    http::{self, Body},
    ledger::audit::AuditQuery,
    time::parse_time,
};

pub(super) async fn audit(req: Request<Incoming>, app: &App) -> Response<Body> {
    let q = query(&req);
    let only = match reader(&req, app, q.get("tenant").map(String::as_str)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let from = match q.get("from").map(|s| parse_time(s)).transpose() {
        Ok(v) => v.unwrap_or(0),
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let to = match q.get("to").map(|s| parse_time(s)).transpose() {
        Ok(v) => v.unwrap_or(i64::MAX),
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let limit = match q.get("limit").map(|s| s.parse::<i64>()) {
        None => 1000,
        Some(Ok(n)) if (1..=100_000).contains(&n) => n,
        Some(_) => return problem(StatusCode::BAD_REQUEST, "limit must be 1..=100000"),
    };
    let query = AuditQuery {
        from_ms: from,
        to_ms: to,
        tenant: only,
        node: q.get("node").cloned(),
        limit,
    };
    match app.ledger.audit(&query).await {
        Ok(rows) => {
            let breaks = rows.iter().filter(|r| !r.chain_ok).count();
            http::json(
                StatusCode::OK,
                &json!({ "records": rows, "chain_breaks": breaks }),
            )
        }
        Err(e) => {
            app.metrics.ledger_errors.inc();
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ledger unavailable: {e}"),
            )
        }
    }
}
