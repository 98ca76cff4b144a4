//! `POST /scheduler/filter` and `POST /scheduler/prioritize`: the
//! extender protocol over HTTP; the decisions are [`crate::scheduler`]'s.

use http_body_util::{BodyExt, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, header::AUTHORIZATION};
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use super::{
    app::{App, auth_error, problem},
    cluster,
};
use crate::{
    auth::AuthError,
    config::{Policy, Role},
    http::{self, Body},
    scheduler::{ExtenderArgs, ExtenderFilterResult, filter_nodes, prioritize_nodes, refuse_all},
    time::now_ms,
};

/// Who may call the extender: anyone without a token when
/// `[scheduler] allow_unauthenticated`, and an admin token always.
#[allow(clippy::result_large_err)]
fn authorize(req: &Request<Incoming>, app: &App) -> Result<(), Response<Body>> {
    if req.headers().get(AUTHORIZATION).is_none() && app.scheduler.allow_unauthenticated {
        return Ok(());
    }
    match app.tokens.authenticate(req.headers()).map_err(auth_error)? {
        Role::Admin => Ok(()),
        _ => Err(auth_error(AuthError::Forbidden {
            action: "call the scheduler extender (admin tokens only)",
        })),
    }
}

#[allow(clippy::result_large_err)]
async fn read_args<T: DeserializeOwned>(
    req: Request<Incoming>,
    app: &App,
) -> Result<T, Response<Body>> {
    authorize(&req, app)?;
    let body = Limited::new(req.into_body(), app.max_body as usize)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body is larger than {} bytes", app.max_body),
                )
            } else {
                problem(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, format!("not an ExtenderArgs: {e}")))
}

fn policy(app: &App) -> Policy {
    Policy::parse(&app.scheduler.policy).unwrap_or(Policy::Binpack)
}

/// `POST /scheduler/filter`.
pub(super) async fn filter(req: Request<Incoming>, app: &App) -> Response<Body> {
    let args: ExtenderArgs = match read_args(req, app).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let now = now_ms();
    let over_budget = over_budget(&args, app);
    let result = match cluster::load(app, now).await {
        Ok(view) => {
            let fits = filter_nodes(&args, &view, now);
            match &over_budget {
                Some(why) => refuse_all(&args, fits, why),
                None => fits,
            }
        }
        Err(e) => {
            app.metrics.ledger_errors.inc();
            warn!(error = %e, "scheduler filter: ledger read failed");
            ExtenderFilterResult {
                error: format!("tally: ledger unavailable: {e}"),
                ..Default::default()
            }
        }
    };
    debug!(
        pod = %args.pod.as_ref().map(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name)).unwrap_or_default(),
        failed = result.failed_nodes.len() + result.failed_and_unresolvable_nodes.len(),
        "scheduler filter"
    );
    http::json(StatusCode::OK, &result)
}

/// Why the pod's tenant may not be scheduled, with `[scheduler]
/// enforce_budgets`: the first of its budgets that is spent (as of the
/// last `/metrics` refresh).
fn over_budget(args: &ExtenderArgs, app: &App) -> Option<String> {
    if !app.scheduler.enforce_budgets {
        return None;
    }
    let tenant = args.pod.as_ref()?.tenant(&app.scheduler.tenant_label)?;
    let cached = app.metrics.cached.read().unwrap_or_else(|e| e.into_inner());
    cached
        .budgets
        .iter()
        .find(|b| b.tenant == tenant && b.is_over())
        .map(|b| b.refusal())
}

/// `POST /scheduler/prioritize`.
pub(super) async fn prioritize(req: Request<Incoming>, app: &App) -> Response<Body> {
    let args: ExtenderArgs = match read_args(req, app).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let now = now_ms();
    let view = match cluster::load(app, now).await {
        Ok(v) => v,
        Err(e) => {
            app.metrics.ledger_errors.inc();
            warn!(error = %e, "scheduler prioritize: ledger read failed");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ledger unavailable: {e}"),
            );
        }
    };
    match prioritize_nodes(&args, &view, policy(app), now) {
        Ok(list) => http::json(StatusCode::OK, &list),
        Err(e) => problem(StatusCode::BAD_REQUEST, e),
    }
}
