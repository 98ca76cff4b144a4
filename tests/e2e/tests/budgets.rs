//! Tenant budgets against the real aggregator on SQLite: a report of
//! today's usage spends a tenant's day budget past 100 %; `/metrics`
//! shows the spent ratio, the amount, the limit and the projection; and
//! with `[scheduler] enforce_budgets` the extender's filter refuses that
//! tenant's pod on every node, with the reason, while another tenant's
//! pod (named by the tenant label) still fits.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::time::Duration;

use serde_json::{Value, json};
use tally_e2e::{
    Metrics,
    aggregator_support::{AGENT_TOKEN, Aggregator, sqlite},
    now_ms, wait_for,
};

const LONG: Duration = Duration::from_secs(30);

const BUDGETS: &str = r#"
[scheduler]
enforce_budgets = true

[[budget]]
tenant = "acme"
period = "day"
amount = 20.0

[[budget]]
tenant = "beta"
period = "month"
gpu_hours = 1.0
"#;

/// 10 s of an H100 (9000/h: 25.00) and 3 kJ (1000/kWh: 0.83) for acme,
/// ending a second ago: 25.83 of its 20.00 day.
fn report_of_today() -> Value {
    let end = now_ms() - 1_000;
    json!({
        "version": 1,
        "node": "n1",
        "boot_id": "boot-1",
        "seq": 1,
        "interval_start_ms": end - 10_000,
        "interval_end_ms": end,
        "gpu_usage": [{
            "tenant": "acme", "gpu": "0", "uuid": "GPU-0",
            "model": "NVIDIA H100 80GB HBM3", "slice_fraction": 1.0,
            "allocated_us": 10_000_000, "sm_us": 5_000_000,
            "memory_byte_seconds": 10_u64 << 30, "energy_mj": 3_000_000
        }],
        "io_usage": [],
        "gpus": [{
            "gpu": "0", "uuid": "GPU-0", "model": "NVIDIA H100 80GB HBM3",
            "health": "ok", "state": "free", "memory_used_bytes": 0,
            "memory_total_bytes": 85_899_345_920_u64, "processes": 0
        }],
        "audit": [],
        "report_interval_ms": 10_000
    })
}

/// `ExtenderArgs` for a one-GPU pod in `namespace` with `labels`, on n1.
fn args(namespace: &str, labels: Value) -> Value {
    json!({
        "Pod": {
            "metadata": {"name": "train-1", "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "t", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
        },
        "Nodes": null,
        "NodeNames": ["n1"]
    })
}

fn filter(agg: &Aggregator, body: &Value) -> Value {
    let r = agg
        .client(None)
        .post_json("/scheduler/filter", body.to_string().as_bytes())
        .expect("POST /scheduler/filter");
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).expect("ExtenderFilterResult")
}

#[test]
fn a_tenant_over_budget_is_measured_and_refused_by_the_extender() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(&dir.path().join("agg"), &sqlite(dir.path()), BUDGETS);

    // Before any usage: nothing spent, and acme's pod fits.
    let ratio = |m: &Metrics, tenant: &str, period: &str, unit: &str| {
        m.value(
            "tally_tenant_budget_used_ratio",
            &[("tenant", tenant), ("period", period), ("unit", unit)],
        )
    };
    wait_for("budgets on /metrics", LONG, || {
        (ratio(&agg.metrics(), "acme", "day", "USD") == Some(0.0)).then_some(())
    });
    let fits = filter(&agg, &args("acme", json!({})));
    assert!(
        fits["FailedNodes"]
            .as_object()
            .is_none_or(|f| f.values().all(|why| !why.to_string().contains("budget"))),
        "{fits}"
    );

    let body = report_of_today().to_string();
    let (status, text) = agg.post(body.as_bytes(), Some(AGENT_TOKEN));
    assert_eq!(status, 200, "{text}");
    let m = wait_for("acme's spend on /metrics", LONG, || {
        let m = agg.metrics();
        (ratio(&m, "acme", "day", "USD")? > 0.0).then_some(m)
    });
    let acme = [("tenant", "acme"), ("period", "day"), ("unit", "USD")];
    assert_eq!(m.value("tally_tenant_budget_used", &acme), Some(25.83));
    assert_eq!(m.value("tally_tenant_budget_limit", &acme), Some(20.0));
    assert_eq!(
        ratio(&m, "acme", "day", "USD"),
        Some(1.0),
        "all of it, capped"
    );
    let projected = m.value("tally_tenant_budget_projected", &acme).unwrap();
    assert!(projected >= 25.83, "the day is not over: {projected}");
    let beta = ratio(&m, "beta", "month", "gpu_hours");
    assert_eq!(beta, Some(0.0), "beta spent nothing");

    // acme's pod is refused on every node, with the reason.
    let refused = filter(&agg, &args("acme", json!({})));
    let why = refused["FailedNodes"]["n1"]
        .as_str()
        .unwrap_or_else(|| panic!("n1 not refused: {refused}"));
    assert!(
        why.contains("tenant acme is over its day budget") && why.contains("25.83 of 20 USD"),
        "{why}"
    );
    assert_eq!(refused["NodeNames"], json!([]), "{refused}");
    // A pod labelled for beta, in acme's namespace, is beta's: it fits.
    let other = filter(&agg, &args("acme", json!({"tally.dev/tenant": "beta"})));
    assert_eq!(other["NodeNames"], json!(["n1"]), "{other}");
}
