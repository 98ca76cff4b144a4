//! Hostile input against the real aggregator: every route of its router
//! (read from `aggregator/src/server.rs`, so a new endpoint cannot be
//! missed) with no token, a wrong token, an agent token and another
//! tenant's token; oversized bodies and headers; absurd query ranges; and
//! no token ever in the log.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::time::Duration;

use tally_contract::wire::{GpuUsage, Report, SCHEMA_VERSION};
use tally_e2e::{
    aggregator_support::{
        ACME_TOKEN, ADMIN_TOKEN, AGENT_TOKEN, Aggregator, router_routes as routes, sqlite,
    },
    http_request, now_ms,
};

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Access {
    /// Health and metrics: anyone (no tenant data).
    Public,
    /// Agents (and admins) write reports.
    Write,
    /// Readers: admin everything, a tenant its own lines.
    Read,
    /// kube-scheduler's extender calls: admin (or unauthenticated when
    /// configured so; it is not here).
    Scheduler,
}

fn access(method: &str, path: &str) -> Access {
    match (method, path) {
        (_, "/metrics" | "/healthz" | "/readyz" | "/") => Access::Public,
        ("POST", "/api/v1/reports") => Access::Write,
        ("GET", "/api/v1/reports" | "/api/v1/chargeback" | "/api/v1/audit" | "/api/v1/cluster") => {
            Access::Read
        }
        ("POST", "/scheduler/filter" | "/scheduler/prioritize") => Access::Scheduler,
        other => panic!(
            "route {other:?} is not classified in tests/e2e/tests/security.rs: say who may use it"
        ),
    }
}

const WRONG_TOKEN: &str = "wrong-token-0123456789abcdef";

fn report(seq: u64, tenants: &[&str]) -> Report {
    let end = now_ms();
    Report {
        version: SCHEMA_VERSION,
        node: "sec-node".into(),
        boot_id: "boot-1".into(),
        seq,
        interval_start_ms: end - 10_000,
        interval_end_ms: end,
        gpu_usage: tenants
            .iter()
            .map(|t| GpuUsage {
                tenant: (*t).into(),
                gpu: "0".into(),
                uuid: "GPU-sec-0".into(),
                model: "NVIDIA H100 80GB HBM3".into(),
                mig_profile: None,
                slice_fraction: 1.0,
                allocated_us: 4_000_000,
                sm_us: Some(1_000_000),
                memory_byte_seconds: 1 << 30,
                energy_mj: 1_000_000,
                workload: None,
                idle_us: 0,
            })
            .collect(),
        io_usage: vec![],
        gpus: vec![],
        audit: vec![],
        report_interval_ms: None,
        tenant_quotas: vec![],
        cluster: None,
    }
}

fn call(
    agg: &Aggregator,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http_request(agg.addr, method, path, &headers, body).expect("request")
}

/// A query that names `tenant` on every read route, over the last day.
fn query(path: &str, tenant: &str) -> String {
    let to = now_ms() / 1000 + 60;
    let from = to - 86_400;
    format!("{path}?from={from}&to={to}&tenant={tenant}&group_by=tenant")
}

#[test]
fn every_route_enforces_its_tokens_and_tenant_scope() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        &dir.path().join("agg"),
        &sqlite(dir.path()),
        // The extender answers without a token only when configured to
        // (kube-scheduler often sends none); here every route needs one.
        "max_body = \"64KiB\"\n\n[scheduler]\nallow_unauthenticated = false\n",
    );
    let body = serde_json::to_vec(&report(1, &["acme", "beta"])).unwrap();
    let (status, text) = call(&agg, "POST", "/api/v1/reports", Some(AGENT_TOKEN), &body);
    assert_eq!(status, 200, "{text}");

    let scheduler_body = br#"{"Pod":{"spec":{"containers":[]}},"NodeNames":["sec-node"]}"#;
    for (method, path) in routes() {
        let a = access(&method, &path);
        let body: &[u8] = match (a, method.as_str()) {
            (Access::Write, _) => &body,
            (Access::Scheduler, _) => scheduler_body,
            _ => b"",
        };
        let target = if a == Access::Read {
            query(&path, "beta")
        } else {
            path.clone()
        };
        let what = format!("{method} {path}");
        for token in [None, Some(WRONG_TOKEN)] {
            let (status, text) = call(&agg, &method, &target, token, body);
            match a {
                Access::Public => assert!(
                    status == 200 || status == 503,
                    "{what} without a valid token: {status} {text}"
                ),
                _ => assert_eq!(status, 401, "{what} with {token:?}: {text}"),
            }
        }
        // An agent token writes reports and nothing else.
        let (status, text) = call(&agg, &method, &target, Some(AGENT_TOKEN), body);
        match a {
            Access::Public => assert_eq!(status, 200, "{what}: {text}"),
            Access::Write => assert!(status == 200 || status == 208, "{what}: {status} {text}"),
            Access::Read | Access::Scheduler => {
                assert_eq!(status, 403, "{what} with the agent token: {text}")
            }
        }
        // A tenant token: never another tenant's data, never a write.
        let (status, text) = call(&agg, &method, &target, Some(ACME_TOKEN), body);
        match a {
            Access::Public => assert_eq!(status, 200, "{what}: {text}"),
            Access::Write | Access::Scheduler => {
                assert_eq!(status, 403, "{what} with a tenant token: {text}")
            }
            Access::Read => {
                assert!(
                    status == 403 || !text.contains("beta"),
                    "{what}: acme's token reached beta's data ({status}): {text}"
                );
                // Without naming a tenant it sees its own lines only.
                let (status, text) =
                    call(&agg, &method, &query(&path, "acme"), Some(ACME_TOKEN), b"");
                assert!(status < 500, "{what} for acme: {status} {text}");
                assert!(
                    !text.contains("\"beta\""),
                    "{what}: beta in acme's answer: {text}"
                );
            }
        }
        // The admin token reaches every route.
        let (status, text) = call(&agg, &method, &target, Some(ADMIN_TOKEN), body);
        assert!(
            status < 400 || (a == Access::Write && status == 409),
            "{what} with the admin token: {status} {text}"
        );
    }

    // Bounded requests: a body over max_body is refused before it is read.
    let big = vec![b' '; 200 * 1024];
    let (status, _) = call(&agg, "POST", "/api/v1/reports", Some(AGENT_TOKEN), &big);
    assert_eq!(status, 413, "an oversized body");
    // An oversized header block is refused, and the server stays up.
    let huge = "x".repeat(1 << 20);
    let r = http_request(
        agg.addr,
        "GET",
        "/healthz",
        &[("X-Filler", huge.as_str())],
        b"",
    );
    if let Ok((status, _)) = r {
        assert!(
            status == 431 || status == 400,
            "a 1 MiB header got {status}"
        );
    }
    assert_eq!(call(&agg, "GET", "/healthz", None, b"").0, 200);
    // Absurd ranges are answered (or refused) promptly, not computed.
    for q in [
        "/api/v1/chargeback?from=0&to=253402300799&group_by=tenant",
        "/api/v1/chargeback?from=-9223372036854775808&to=9223372036854775807",
        "/api/v1/audit?from=0&to=99999999999999999999",
        "/api/v1/reports?from=1&to=0",
    ] {
        let (status, text) = call(&agg, "GET", q, Some(ADMIN_TOKEN), b"");
        assert!(status < 500, "{q}: {status} {text}");
    }
    // No token, right or wrong, is ever logged.
    std::thread::sleep(Duration::from_millis(300));
    let log = agg.log_text();
    for t in [AGENT_TOKEN, ADMIN_TOKEN, ACME_TOKEN, WRONG_TOKEN] {
        assert!(!log.contains(t), "a token is in the aggregator's log");
    }
}
