//! The aggregator's HTTP API.
//!
//! | route | who | what |
//! | --- | --- | --- |
//! | `POST /api/v1/reports` | agent, admin | ingest one report |
//! | `GET /api/v1/chargeback` | admin, tenant (own lines) | priced usage |
//! | `GET /api/v1/audit` | admin, tenant (own records) | central audit store |
//! | `GET /api/v1/reports` | admin | stored reports per (node, boot) |
//! | `GET /api/v1/cluster` | admin, tenant (no other tenants' names) | nodes, GPUs, capacity, quotas ([`crate::cluster`]) |
//! | `POST /scheduler/filter`, `/scheduler/prioritize` | kube-scheduler (`[scheduler]`) | extender protocol ([`crate::scheduler`]) |
//! | `GET /metrics`, `/healthz`, `/readyz` | anyone | operations |
//!
//! Bad input gets a 4xx with a reason and leaves the ledger unchanged:
//! 400 malformed JSON or query, 401 no/unknown token, 403 wrong role or
//! tenant, 409 a different report under a stored (node, boot, seq), 413 a
//! body over `[aggregator] max_body`, 422 wrong schema version or
//! impossible values. A stored report gets 200, a repeated one 208.

// This file is `server.rs`, not `server/mod.rs` like the ledger's: the
// end-to-end security test reads the routes below from this path, so a
// new endpoint cannot go untested.

use std::sync::Arc;

use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, HeaderValue},
};

use crate::http::{self, Body};

mod app;
mod audit;
mod chargeback;
mod cluster;
mod query;
mod reports;
mod scheduler;

use app::problem;
pub(crate) use app::{App, CredentialFiles};
// The query parsers are fuzzed under these paths (`tests/fuzz`).
pub use query::percent_decode;

pub use crate::time::parse_time;

/// 405 with the `Allow` header RFC 9110 requires (a schemathesis finding:
/// it was missing, and `/healthz`, `/readyz` and `/` answered 404).
fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = problem(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Routes one request.
pub(crate) async fn route(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::POST, "/api/v1/reports") => reports::ingest(req, &app).await,
        (Method::GET, "/api/v1/reports") => reports::summary(req, &app).await,
        (Method::GET, "/api/v1/chargeback") => chargeback::chargeback(req, &app).await,
        (Method::GET, "/api/v1/audit") => audit::audit(req, &app).await,
        (Method::GET, "/api/v1/cluster") => cluster::handle(req, &app).await,
        (Method::POST, "/scheduler/filter") => scheduler::filter(req, &app).await,
        (Method::POST, "/scheduler/prioritize") => scheduler::prioritize(req, &app).await,
        (Method::GET, "/metrics") => http::respond(
            StatusCode::OK,
            crate::metrics::OPENMETRICS,
            app.metrics.encode(),
        ),
        (Method::GET, "/healthz") => http::text(StatusCode::OK, "ok\n"),
        (Method::GET, "/readyz") => match app.ledger.ping().await {
            Ok(()) => http::text(StatusCode::OK, "ready\n"),
            Err(e) => http::text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
        },
        (Method::GET, "/") => http::text(
            StatusCode::OK,
            "tally aggregator: POST /api/v1/reports, GET /api/v1/chargeback /api/v1/audit \
             /api/v1/reports /api/v1/cluster /metrics /healthz /readyz; POST /scheduler/filter \
             /scheduler/prioritize\n",
        ),
        (_, "/api/v1/reports") => method_not_allowed("GET, POST"),
        (_, "/scheduler/filter" | "/scheduler/prioritize") => method_not_allowed("POST"),
        (
            _,
            "/api/v1/chargeback" | "/api/v1/audit" | "/api/v1/cluster" | "/metrics" | "/healthz"
            | "/readyz" | "/",
        ) => method_not_allowed("GET"),
        _ => problem(StatusCode::NOT_FOUND, "not found"),
    }
}
