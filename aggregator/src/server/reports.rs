//! `POST /api/v1/reports` (ingest) and `GET /api/v1/reports` (what is
//! stored).

use std::time::Instant;

use http_body_util::{BodyExt, Limited};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{CONTENT_LENGTH, DATE},
};
use serde_json::json;
use tally_contract::wire::{Report, SCHEMA_VERSION};
use tracing::{error, info, warn};

use super::app::{App, auth_error, problem};
use crate::{
    auth::AuthError,
    http::{self, Body},
    ledger::ingest::Ingested,
    metrics::NodeLabel,
    time::{MAX_CLOCK_SKEW_MS, clock_skew_ms, now_ms, refiled_interval},
};

pub(super) async fn ingest(req: Request<Incoming>, app: &App) -> Response<Body> {
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
        Err(e @ AuthError::RateLimited { .. }) => {
            app.metrics.report("rate_limited");
            return auth_error(e);
        }
        Err(e) => {
            app.metrics.report("unauthorized");
            return auth_error(e);
        }
    };
    if let Err(e) = role.may_write() {
        app.metrics.report("forbidden");
        return auth_error(e);
    }
    let received_ms = now_ms();
    let skew_ms = clock_skew_ms(
        req.headers().get(DATE).and_then(|v| v.to_str().ok()),
        received_ms,
    );
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
    let mut report = match decode(&body) {
        Ok(r) => r,
        Err((status, reason)) => {
            app.metrics.report("rejected");
            return problem(status, reason);
        }
    };
    if let Err(problems) = report.validate() {
        app.metrics.report("rejected");
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("impossible report: {}", problems.join("; ")),
        );
    }
    // The digest is of the report as sent: a retry is still recognised.
    let digest = report.digest();
    if let Some(skew_ms) = skew_ms {
        refile(app, &mut report, skew_ms);
    }
    let keys = app
        .audit_keys
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match app
        .ledger
        .ingest(&report, &digest, received_ms, &keys)
        .await
    {
        Ok(Ingested::Stored { audit_breaks }) => {
            app.metrics.report("stored");
            if !audit_breaks.is_empty() {
                app.metrics
                    .audit_chain_breaks
                    .get_or_create(&NodeLabel {
                        node: report.node.as_str().into(),
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
        Ok(Ingested::Expired) => {
            app.metrics.report("expired");
            warn!(node = %report.node, boot_id = %report.boot_id, seq = report.seq,
                  "report refused: its claim is past raw retention and was removed");
            problem(
                StatusCode::CONFLICT,
                format!(
                    "node {} boot {} seq {} is at or below the claims removed by raw retention: \
                     stored once already, or too late to be counted",
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

/// The report in `body`, parsed once where it is one this aggregator
/// speaks (every report but a refused one). A body that is not takes the
/// slower way that tells why: malformed JSON, another schema version
/// (checked before the fields, which another version may name
/// differently), or a field that does not fit: the answer's status and
/// reason.
fn decode(body: &[u8]) -> Result<Report, (StatusCode, String)> {
    if let Ok(r) = serde_json::from_slice::<Report>(body)
        && r.version == SCHEMA_VERSION
    {
        return Ok(r);
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        other => {
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "unsupported schema version {}: this aggregator speaks version {SCHEMA_VERSION}",
                    other.map_or_else(|| "(missing)".to_owned(), |v| v.to_string())
                ),
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("not a version {SCHEMA_VERSION} report: {e}"),
        )
    })
}

/// Measures the node's clock against ours and, when it is skewed, files the
/// report's interval by our clock: usage belongs to the hour it happened
/// in, not to the hour a wrong clock says (docs/aggregator.md).
fn refile(app: &App, report: &mut Report, skew_ms: i64) {
    let refiled = refiled_interval(report.interval_start_ms, report.interval_end_ms, skew_ms);
    match app.metrics.clock_skew(&report.node, skew_ms) {
        Some(true) => warn!(node = %report.node, skew_seconds = skew_ms as f64 / 1000.0,
                            tolerance_seconds = MAX_CLOCK_SKEW_MS / 1000,
                            "node clock is skewed: its reports are filed by the aggregator's clock"),
        Some(false) => info!(node = %report.node, skew_seconds = skew_ms as f64 / 1000.0,
                             "node clock is back in step: its reports are filed as sent"),
        None => {}
    }
    if let Some((start, end)) = refiled {
        report.interval_start_ms = start;
        report.interval_end_ms = end;
    }
}

/// `GET /api/v1/reports`: admin only.
pub(super) async fn summary(req: Request<Incoming>, app: &App) -> Response<Body> {
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
    use crate::ledger::ingest::tests::report;

    /// The one parse gives what the parse through a `Value` gave, and a
    /// body only the `Value` way reads (a key given twice: the last one
    /// wins) is still taken, as before the one parse.
    #[test]
    fn a_report_is_read_as_the_value_way_read_it() {
        let r = report("n1", 7);
        let body = serde_json::to_vec(&r).unwrap();
        let once = decode(&body).unwrap();
        let via_value: Report =
            serde_json::from_value(serde_json::from_slice(&body).unwrap()).unwrap();
        assert_eq!(once.digest(), via_value.digest());
        assert_eq!(once.digest(), r.digest());

        let text = String::from_utf8(body).unwrap();
        let twice = text.replacen("{", "{\"node\":\"first\",", 1);
        let read = decode(twice.as_bytes()).unwrap();
        assert_eq!(read.node, "n1");

        let status = |b: &[u8]| decode(b).unwrap_err().0;
        assert_eq!(status(b"{\"version\": 1, "), StatusCode::BAD_REQUEST);
        let other = text.replacen(
            &format!("\"version\":{SCHEMA_VERSION}"),
            "\"version\":99",
            1,
        );
        assert_ne!(other, text);
        assert_eq!(status(other.as_bytes()), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status(b"[1]"), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
