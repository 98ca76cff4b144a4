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

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONTENT_LENGTH, HeaderValue, WWW_AUTHENTICATE},
};
use serde_json::json;
use tracing::{error, warn};

use crate::{
    auth::{AuthError, Tokens},
    chargeback::{self, Basis, GroupBy},
    config::{Prices, Role},
    ledger::{AuditQuery, Ingested, Ledger},
    metrics::Metrics,
};
use tally_contract::wire::{Report, SCHEMA_VERSION};

use crate::http::{self, Body};

/// Everything a request handler needs.
#[derive(Debug)]
pub struct App {
    pub ledger: Ledger,
    pub tokens: Tokens,
    pub prices: Prices,
    pub max_body: u64,
    pub metrics: Metrics,
    pub scheduler: crate::config::SchedulerSection,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn problem(status: StatusCode, reason: impl Into<String>) -> Response<Body> {
    http::json(status, &json!({ "error": reason.into() }))
}

pub(crate) fn auth_error(e: AuthError) -> Response<Body> {
    match e {
        AuthError::Unauthenticated => {
            let mut r = problem(StatusCode::UNAUTHORIZED, e.to_string());
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        AuthError::Forbidden { .. } => problem(StatusCode::FORBIDDEN, e.to_string()),
    }
}

/// 405 with the `Allow` header RFC 9110 requires (a schemathesis finding:
/// it was missing, and `/healthz`, `/readyz` and `/` answered 404).
fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = problem(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Routes one request.
pub async fn route(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::POST, "/api/v1/reports") => ingest(req, &app).await,
        (Method::GET, "/api/v1/reports") => summary(req, &app).await,
        (Method::GET, "/api/v1/chargeback") => chargeback(req, &app).await,
        (Method::GET, "/api/v1/audit") => audit(req, &app).await,
        (Method::GET, "/api/v1/cluster") => crate::cluster::handle(req, &app).await,
        (Method::POST, "/scheduler/filter") => crate::scheduler::filter(req, &app).await,
        (Method::POST, "/scheduler/prioritize") => crate::scheduler::prioritize(req, &app).await,
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

async fn ingest(req: Request<Incoming>, app: &App) -> Response<Body> {
    let started = Instant::now();
    let response = ingest_inner(req, app).await;
    app.metrics
        .ingest_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn ingest_inner(req: Request<Incoming>, app: &App) -> Response<Body> {
    let role = match app.tokens.authenticate(req.headers()) {
        Ok(r) => r,
        Err(e) => {
            app.metrics.report("unauthorized");
            return auth_error(e);
        }
    };
    if let Err(e) = role.may_write() {
        app.metrics.report("forbidden");
        return auth_error(e);
    }
    let too_big = || {
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than {} bytes", app.max_body),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body) {
        app.metrics.report("rejected");
        return too_big();
    }
    let body = match Limited::new(req.into_body(), app.max_body as usize)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            app.metrics.report("rejected");
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_big();
            }
            return problem(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"));
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            app.metrics.report("rejected");
            return problem(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"));
        }
    };
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        other => {
            app.metrics.report("rejected");
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "unsupported schema version {}: this aggregator speaks version {SCHEMA_VERSION}",
                    other.map_or_else(|| "(missing)".to_owned(), |v| v.to_string())
                ),
            );
        }
    }
    let report: Report = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            app.metrics.report("rejected");
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("not a version {SCHEMA_VERSION} report: {e}"),
            );
        }
    };
    if let Err(problems) = report.validate() {
        app.metrics.report("rejected");
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("impossible report: {}", problems.join("; ")),
        );
    }
    let digest = report.digest();
    match app.ledger.ingest(&report, &digest, now_ms()).await {
        Ok(Ingested::Stored { audit_breaks }) => {
            app.metrics.report("stored");
            if !audit_breaks.is_empty() {
                app.metrics
                    .audit_chain_breaks
                    .get_or_create(&crate::metrics::NodeLabel {
                        node: report.node.clone(),
                    })
                    .inc_by(audit_breaks.len() as u64);
                for b in &audit_breaks {
                    warn!(node = %report.node, seq = report.seq, "audit {b}");
                }
            }
            http::json(
                StatusCode::OK,
                &json!({ "status": "stored", "node": report.node, "boot_id": report.boot_id,
                         "seq": report.seq, "audit_chain_breaks": audit_breaks.len() }),
            )
        }
        Ok(Ingested::Duplicate) => {
            app.metrics.report("duplicate");
            http::json(
                StatusCode::ALREADY_REPORTED,
                &json!({ "status": "duplicate", "node": report.node, "boot_id": report.boot_id,
                         "seq": report.seq }),
            )
        }
        Ok(Ingested::Conflict) => {
            app.metrics.report("conflict");
            warn!(node = %report.node, boot_id = %report.boot_id, seq = report.seq,
                  "a different report was already stored under this (node, boot, seq)");
            problem(
                StatusCode::CONFLICT,
                format!(
                    "a different report is already stored for node {} boot {} seq {}",
                    report.node, report.boot_id, report.seq
                ),
            )
        }
        Err(e) => {
            app.metrics.report("error");
            app.metrics.ledger_errors.inc();
            error!(error = %e, node = %report.node, seq = report.seq, "ledger write failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ledger unavailable: {e}"),
            )
        }
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Decodes `%XX` escapes and `+` (form encoding).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a time: RFC 3339 (`2026-11-23T15:00:00Z`) or Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| format!("`{s}` is out of range"));
    }
    // RFC 3339 allows lower-case `t`/`z`; humantime reads only upper case.
    let upper = s.to_ascii_uppercase();
    let (utc, offset_ms) = utc_offset(&upper).unwrap_or((upper, 0));
    humantime::parse_rfc3339_weak(&utc)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time or Unix seconds: {e}"))
        .and_then(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64 - offset_ms)
                .map_err(|_| format!("`{s}` is before 1970"))
        })
}

/// Splits a numeric RFC 3339 offset (`+01:00`) off a time, which humantime
/// does not read (a schemathesis finding: such times were refused): the
/// time as UTC text and the offset in milliseconds.
fn utc_offset(s: &str) -> Option<(String, i64)> {
    let b = s.as_bytes();
    let n = b.len();
    if n < 7 || !s.is_ascii() || b[n - 3] != b':' {
        return None;
    }
    let sign = match b[n - 6] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = [b[n - 5], b[n - 4], b[n - 2], b[n - 1]];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let d = |i: usize| i64::from(digits[i] - b'0');
    let (hours, minutes) = (d(0) * 10 + d(1), d(2) * 10 + d(3));
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some((
        format!("{}Z", &s[..n - 6]),
        sign * (hours * 3600 + minutes * 60) * 1000,
    ))
}

/// The last instant RFC 3339 can write (9999-12-31T23:59:59.999Z).
const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

pub(crate) fn rfc3339(ms: i64) -> String {
    // humantime's Display fails beyond year 9999, and `to_string` panics.
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.clamp(0, MAX_RFC3339_MS) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

// The error is the ready response for the client: nothing to box it for.
#[allow(clippy::result_large_err)]
fn period(q: &HashMap<String, String>) -> Result<(i64, i64), Response<Body>> {
    let get = |k: &str| {
        q.get(k).ok_or_else(|| {
            problem(
                StatusCode::BAD_REQUEST,
                format!("`{k}` is required (RFC 3339 time or Unix seconds)"),
            )
        })
    };
    let from = parse_time(get("from")?).map_err(|e| problem(StatusCode::BAD_REQUEST, e))?;
    let to = parse_time(get("to")?).map_err(|e| problem(StatusCode::BAD_REQUEST, e))?;
    if to <= from {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "`to` must be after `from`",
        ));
    }
    // The answer names the period in RFC 3339, which ends with year 9999.
    if to > MAX_RFC3339_MS {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "`to` must not be after 9999-12-31T23:59:59Z",
        ));
    }
    Ok((from, to))
}

#[allow(clippy::result_large_err)]
fn reader(
    req: &Request<Incoming>,
    app: &App,
    asked: Option<&str>,
) -> Result<Option<String>, Response<Body>> {
    let role: Role = app.tokens.authenticate(req.headers()).map_err(auth_error)?;
    role.may_read(asked).map_err(auth_error)
}

async fn chargeback(req: Request<Incoming>, app: &App) -> Response<Body> {
    let q = query(&req);
    let only = match reader(&req, app, q.get("tenant").map(String::as_str)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (from, to) = match period(&q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(group_by) = GroupBy::parse(q.get("group_by").map_or("tenant", String::as_str)) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "group_by must be tenant, tenant,gpu_model or tenant,node",
        );
    };
    let Some(basis) = Basis::parse(q.get("basis").map_or("allocated", String::as_str)) else {
        return problem(StatusCode::BAD_REQUEST, "basis must be allocated or used");
    };
    let format = q.get("format").map_or("json", String::as_str);
    if !matches!(format, "json" | "csv" | "focus") {
        return problem(StatusCode::BAD_REQUEST, "format must be json, csv or focus");
    }
    let (gpu, io) = match tokio::try_join!(
        app.ledger.gpu_groups(from, to),
        app.ledger.io_groups(from, to)
    ) {
        Ok(x) => x,
        Err(e) => {
            app.metrics.ledger_errors.inc();
            error!(error = %e, "ledger read failed");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ledger unavailable: {e}"),
            );
        }
    };
    let mut c = chargeback::compute(
        &app.prices,
        &gpu,
        &io,
        group_by,
        basis,
        rfc3339(from),
        rfc3339(to),
    );
    if let Some(t) = &only {
        c = c.only_tenant(t);
    }
    match format {
        "csv" => http::respond(StatusCode::OK, "text/csv; charset=utf-8", c.to_csv()),
        "focus" => http::respond(StatusCode::OK, "text/csv; charset=utf-8", c.to_focus()),
        _ => http::json(StatusCode::OK, &c),
    }
}

async fn audit(req: Request<Incoming>, app: &App) -> Response<Body> {
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

async fn summary(req: Request<Incoming>, app: &App) -> Response<Body> {
    let role = match app.tokens.authenticate(req.headers()) {
        Ok(r) => r,
        Err(e) => return auth_error(e),
    };
    if let Err(e) = role.must_be_admin() {
        return auth_error(e);
    }
    match app.ledger.report_summary().await {
        Ok(rows) => http::json(StatusCode::OK, &json!({ "reports": rows })),
        Err(e) => {
            app.metrics.ledger_errors.inc();
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ledger unavailable: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_escapes() {
        assert_eq!(parse_time("10").unwrap(), 10_000);
        assert_eq!(parse_time("1970-01-01T00:00:10Z").unwrap(), 10_000);
        assert!(parse_time("yesterday").is_err());
        assert_eq!(percent_decode("tenant%2Cnode"), "tenant,node");
        assert_eq!(percent_decode("a+b%"), "a b%");
        assert_eq!(rfc3339(10_000), "1970-01-01T00:00:10Z");
    }

    /// schemathesis finding: RFC 3339 times with a numeric offset or in
    /// lower case were refused as "not an RFC 3339 time".
    #[test]
    fn rfc3339_offsets_and_lower_case_are_read() {
        let utc = parse_time("2026-11-23T15:00:00Z").unwrap();
        assert_eq!(parse_time("2026-11-23T16:30:00+01:30").unwrap(), utc);
        assert_eq!(parse_time("2026-11-23T10:00:00-05:00").unwrap(), utc);
        assert_eq!(parse_time("2026-11-23t15:00:00z").unwrap(), utc);
        assert_eq!(
            parse_time("2026-11-23T15:00:00.250+00:00").unwrap(),
            utc + 250
        );
        assert!(parse_time("2026-11-23T15:00:00+24:00").is_err());
        assert!(parse_time("2026-11-23").is_err());
    }

    /// schemathesis finding (tests/e2e/tests/openapi.rs): a chargeback
    /// period ending after year 9999 (`to=999999999999`) panicked the
    /// handler formatting it, and the client got no answer at all.
    #[test]
    fn periods_beyond_rfc3339_are_refused_not_panicked() {
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
        let q = |from: &str, to: &str| {
            HashMap::from([
                ("from".to_owned(), from.to_owned()),
                ("to".to_owned(), to.to_owned()),
            ])
        };
        let refused = period(&q("0", "999999999999")).unwrap_err();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            period(&q("0", "253402300799")).unwrap(),
            (0, 253_402_300_799_000)
        );
    }
}
