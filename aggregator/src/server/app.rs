//! What every handler shares: the application state and the error
//! responses.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE},
};
use serde_json::json;

use crate::{
    audit_keys::NodeKeys,
    auth::{AuthError, Tokens},
    config::{Prices, Role, SchedulerSection},
    http::{self, Body},
    ledger::Ledger,
    metrics::Metrics,
};

/// Everything a request handler needs.
#[derive(Debug)]
pub(crate) struct App {
    pub ledger: Ledger,
    pub tokens: Tokens,
    /// The nodes' audit keys; replaced whole on reload.
    pub audit_keys: RwLock<Arc<NodeKeys>>,
    /// The credential files as the last reload (or the start) saw them.
    /// Every reload, SIGHUP or change poll, sets it under this lock, so a
    /// change is reloaded once whichever notices it first.
    pub credentials_seen: Mutex<CredentialFiles>,
    /// Shared with the chargeback's pricing thread: one copy per request
    /// would clone every string and table of `[prices]`.
    pub prices: Arc<Prices>,
    pub max_body: u64,
    pub metrics: Metrics,
    pub scheduler: SchedulerSection,
    /// `[[budget]]`: priced in the background refresh, read from
    /// [`Metrics::cached`].
    pub budgets: Vec<crate::config::Budget>,
    /// `[ledger] raw_retention`: chargeback further back reads whole hours.
    pub raw_retention: std::time::Duration,
    /// Chargebacks are read, priced and encoded one at a time: a month by
    /// tenant and node at 1,000 nodes holds ~0.7–0.9 GB until its body is
    /// built, and two at once would pass the 1 GiB the deployment allows.
    pub chargeback_turn: Arc<tokio::sync::Semaphore>,
}

/// The credential files' paths, each with its size and modification time
/// (`None`: unreadable), sorted by path.
pub(crate) type CredentialFiles = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

/// A JSON error body: `{"error": reason}`.
pub(crate) fn problem(status: StatusCode, reason: impl Into<String>) -> Response<Body> {
    http::json(status, &json!({ "error": reason.into() }))
}

/// 401 (with `WWW-Authenticate: Bearer`), 403, or 429 (with
/// `Retry-After`).
pub(crate) fn auth_error(e: AuthError) -> Response<Body> {
    match e {
        AuthError::Unauthenticated => {
            let mut r = problem(StatusCode::UNAUTHORIZED, e.to_string());
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        AuthError::Forbidden { .. } => problem(StatusCode::FORBIDDEN, e.to_string()),
        AuthError::RateLimited { retry_after_s } => {
            let mut r = problem(StatusCode::TOO_MANY_REQUESTS, e.to_string());
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_s));
            r
        }
    }
}

/// The tenant a reader is limited to (`None`: all), or the response that
/// refuses it.
#[allow(clippy::result_large_err)]
pub(crate) fn reader(
    req: &Request<Incoming>,
    app: &App,
    asked: Option<&str>,
) -> Result<Option<String>, Response<Body>> {
    let role: Role = app.tokens.authenticate(req.headers()).map_err(auth_error)?;
    role.may_read(asked).map_err(auth_error)
}
