//! `GET /api/v1/chargeback`: the ledger's usage over a period, priced
//! ([`crate::chargeback`]), as JSON, CSV or FOCUS.

use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
};
use tracing::{debug, error};

use super::{
    app::{App, problem, reader},
    query::query,
};
use crate::{
    chargeback::{self, Basis, GroupBy},
    http::{self, Body},
    time::{parse_time, rfc3339},
};

// The error is the ready response for the client: nothing to box it for.
#[allow(clippy::result_large_err)]
fn period(q: &std::collections::HashMap<String, String>) -> Result<(i64, i64), Response<Body>> {
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
    if to > crate::time::MAX_RFC3339_MS {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "`to` must not be after 9999-12-31T23:59:59Z",
        ));
    }
    Ok((from, to))
}

pub(super) async fn chargeback(req: Request<Incoming>, app: &App) -> Response<Body> {
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
            format!("group_by must be {}", GroupBy::ALL),
        );
    };
    let Some(basis) = Basis::parse(q.get("basis").map_or("allocated", String::as_str)) else {
        return problem(StatusCode::BAD_REQUEST, "basis must be allocated or used");
    };
    let format = q.get("format").map_or("json", String::as_str);
    if !matches!(format, "json" | "csv" | "focus") {
        return problem(StatusCode::BAD_REQUEST, "format must be json, csv or focus");
    }
    let cluster = q.get("cluster").map(String::as_str);
    if let Some(c) = cluster
        && (c.is_empty() || c.len() > tally_contract::wire::MAX_NAME)
    {
        return problem(
            StatusCode::BAD_REQUEST,
            "cluster must be a cluster name (1..=256 bytes)",
        );
    }
    // Held until the body is built ([`App::chargeback_turn`]), also when
    // the client goes away meanwhile: the pricing thread goes on, and a
    // retry must not be priced beside it.
    let queued = std::time::Instant::now();
    let Ok(turn) = app.chargeback_turn.clone().acquire_owned().await else {
        // Only a closed semaphore refuses, and nothing closes it.
        return problem(StatusCode::SERVICE_UNAVAILABLE, "chargeback unavailable");
    };
    let waited = queued.elapsed();
    // Past raw retention the partial hours at the edges are gone: read
    // whole hours, and say so.
    let cutoff = crate::time::before(crate::time::now_ms(), app.raw_retention);
    let rounded = chargeback::hour_bounds(from, to, cutoff);
    let (read_from, read_to) = rounded.unwrap_or((from, to));
    let reads = async {
        if group_by == GroupBy::TenantNode {
            tokio::try_join!(
                app.ledger.gpu_groups(read_from, read_to, cluster),
                app.ledger.io_groups(read_from, read_to, cluster)
            )
        } else {
            tokio::try_join!(
                app.ledger.gpu_groups_by_tenant(read_from, read_to, cluster),
                app.ledger.io_groups_by_tenant(read_from, read_to, cluster)
            )
        }
    };
    // Time of use prices each hour's energy apart: read it per hour.
    let energy = async {
        match (app.prices.energy_tou.is_some(), group_by) {
            (false, _) => Ok(None),
            (true, GroupBy::TenantNode) => app
                .ledger
                .energy_hours(read_from, read_to, cluster)
                .await
                .map(Some),
            (true, _) => app
                .ledger
                .energy_hours_by_tenant(read_from, read_to, cluster)
                .await
                .map(Some),
        }
    };
    let started = std::time::Instant::now();
    let ((gpu, io), energy) = match tokio::try_join!(reads, energy) {
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
    let read = started.elapsed();
    let rounded = rounded.map(|(f, t)| chargeback::Rounded {
        granularity: "hour".into(),
        from: rfc3339(f),
        to: rfc3339(t),
        raw_retention_cutoff: rfc3339(cutoff.max(0)),
    });
    let (prices, format) = (app.prices.clone(), format.to_owned());
    // Pricing and encoding a month by node take seconds of CPU: on a
    // blocking thread, so the runtime's threads go on taking reports.
    let span = tracing::Span::current();
    let work = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let _request = span.enter();
        let mut c = chargeback::compute(
            &prices,
            &gpu,
            &io,
            energy.as_deref(),
            group_by,
            basis,
            rfc3339(from),
            rfc3339(to),
        );
        c.rounded = rounded;
        if let Some(t) = &only {
            c = c.only_tenant(t);
        }
        let priced = started.elapsed();
        let answer = match format.as_str() {
            "csv" => ("text/csv; charset=utf-8", Bytes::from(c.to_csv())),
            "focus" => ("text/csv; charset=utf-8", c.to_focus(&prices).into()),
            _ => ("application/json", c.to_json().into()),
        };
        // Where a slow answer's time went: its turn, the ledger, pricing, or
        // encoding.
        debug!(
            lines = c.lines.len(),
            gpu_groups = gpu.len(),
            waited_s = waited.as_secs_f64(),
            read_s = read.as_secs_f64(),
            priced_s = (priced - read).as_secs_f64(),
            encoded_s = (started.elapsed() - priced).as_secs_f64(),
            "chargeback answered"
        );
        (answer, (c, gpu, io, energy))
    });
    match work.await {
        Ok(((content_type, body), rest)) => {
            // Freed after the answer, off the runtime: a month by node is
            // millions of allocations.
            tokio::task::spawn_blocking(move || drop(rest));
            http::respond(StatusCode::OK, content_type, body)
        }
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("chargeback not priced: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// schemathesis finding (tests/e2e/tests/openapi.rs): a chargeback
    /// period ending after year 9999 (`to=999999999999`) panicked the
    /// handler formatting it, and the client got no answer at all.
    #[test]
    fn periods_beyond_rfc3339_are_refused_not_panicked() {
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
