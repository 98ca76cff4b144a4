//! The demo's screen as text: GPUs with their states, tenants with usage,
//! rates and quotas, the chargeback in money, the scheduler's ranking, and
//! the events seen between two frames. Pure functions of the JSON the
//! agent and the aggregator answer.

use std::collections::BTreeMap;

use serde_json::Value;

const GIB: f64 = (1u64 << 30) as f64;
const MB: f64 = 1e6;

/// The GPU table: one row per GPU and MIG instance, with its state.
pub(crate) fn gpus(snap: &Value) -> String {
    let mut out = format!(
        "{:<8} {:<22} {:<8} {:<6} {:>5} {:>11} {:>7} {:>5}\n",
        "GPU", "MODEL", "PROFILE", "STATE", "UTIL", "MEM GiB", "POWER W", "PROCS"
    );
    for g in snap["gpus"].as_array().into_iter().flatten() {
        let util = g["utilization_ratio"]
            .as_f64()
            .map_or_else(|| "-".into(), |u| format!("{:.0}%", u * 100.0));
        let power = g["power_watts"]
            .as_f64()
            .map_or_else(|| "-".into(), |p| format!("{p:.0}"));
        out.push_str(&format!(
            "{:<8} {:<22} {:<8} {:<6} {:>5} {:>5.1}/{:<5.0} {:>7} {:>5}\n",
            text(&g["gpu"]),
            truncate(text(&g["model"]).trim_start_matches("NVIDIA "), 22),
            g["mig_profile"].as_str().unwrap_or("-"),
            text(&g["state"]),
            util,
            num(&g["memory_used_bytes"]) / GIB,
            num(&g["memory_total_bytes"]) / GIB,
            power,
            g["processes"].as_array().map_or(0, Vec::len),
        ));
    }
    out
}

/// One tenant's numbers, summed over its GPUs.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    gpu_s: f64,
    memory: f64,
    energy_j: f64,
    net: f64,
    pcie: f64,
}

fn usage(snap: &Value) -> BTreeMap<String, Usage> {
    let mut out: BTreeMap<String, Usage> = BTreeMap::new();
    for r in snap["tenant_gpu"].as_array().into_iter().flatten() {
        let u = out.entry(text(&r["tenant"]).to_owned()).or_default();
        u.gpu_s += num(&r["allocated_seconds_total"]);
        u.memory += num(&r["memory_bytes"]);
        u.energy_j += num(&r["energy_joules_total"]);
    }
    for r in snap["tenant_io"].as_array().into_iter().flatten() {
        let u = out.entry(text(&r["tenant"]).to_owned()).or_default();
        u.net += num(&r["network_ingress_bytes_total"]) + num(&r["network_egress_bytes_total"]);
        u.pcie += num(&r["pcie_h2d_bytes_total"])
            + num(&r["pcie_d2h_bytes_total"])
            + num(&r["pcie_other_bytes_total"]);
    }
    out
}

/// The tenant table: GPU time, memory held, energy, network and PCIe
/// (totals and rates since `previous`, `dt` seconds ago), and quotas.
pub(crate) fn tenants(snap: &Value, previous: Option<&Value>, dt: f64) -> String {
    let now = usage(snap);
    let before = previous.map(usage).unwrap_or_default();
    let mut out = format!(
        "{:<14} {:>7} {:>7} {:>9} {:>20} {:>20}  {}\n",
        "TENANT", "GPU s", "MEM GiB", "ENERGY kJ", "NETWORK (per s)", "PCIe (per s)", "QUOTA"
    );
    for (tenant, u) in &now {
        let b = before.get(tenant).copied().unwrap_or(*u);
        let with_rate = |now: f64, then: f64| {
            let rate = if dt > 0.0 {
                (now - then).max(0.0) / dt
            } else {
                0.0
            };
            format!("{} ({})", bytes(now), bytes(rate))
        };
        out.push_str(&format!(
            "{:<14} {:>7.1} {:>7.1} {:>9.2} {:>20} {:>20}  {}\n",
            tenant,
            u.gpu_s,
            u.memory / GIB,
            u.energy_j / 1000.0,
            with_rate(u.net, b.net),
            with_rate(u.pcie, b.pcie),
            quota(snap, tenant),
        ));
    }
    out
}

/// A tenant's quotas: usage over limit, OVER when above, and the actions
/// taken so far (`throttle ×12`).
pub(crate) fn quota(snap: &Value, tenant: &str) -> String {
    let mut parts = Vec::new();
    for q in snap["tenant_quotas"].as_array().into_iter().flatten() {
        if q["tenant"] != tenant {
            continue;
        }
        let resource = text(&q["resource"]);
        let limit = num(&q["limit"]);
        let usage = q["usage"].as_f64();
        let scale = |v: f64| match resource {
            "gpu_memory" | "memory" => format!("{:.1} GiB", v / GIB),
            "network_egress" | "network_ingress" => format!("{:.1} MB/s", v / MB),
            _ => format!("{v:.1}"),
        };
        let mut s = format!(
            "{resource} {}/{}",
            usage.map_or_else(|| "?".into(), &scale),
            scale(limit)
        );
        if usage.is_some_and(|u| u > limit) {
            s.push_str(" OVER");
        }
        for a in snap["enforcement_actions"].as_array().into_iter().flatten() {
            if a["tenant"] == tenant && a["resource"] == resource {
                let action = text(&a["action"]);
                let done = if action == "throttle" {
                    "throttled"
                } else {
                    action
                };
                s.push_str(&format!(", {done} ×{}", num(&a["total"])));
            }
        }
        parts.push(s);
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

/// The chargeback lines of the run, in money, with their total.
pub(crate) fn chargeback(cb: &Value) -> String {
    let currency = text(&cb["currency"]);
    let mut out = format!(
        "{:<14} {:>10} {:>10} {:>9} {:>9} {:>12}\n",
        "TENANT",
        "GPU h",
        "kWh",
        "NET GiB",
        "PCIe GiB",
        format!("COST {currency}")
    );
    for l in cb["lines"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<14} {:>10.4} {:>10.5} {:>9.4} {:>9.4} {:>12}\n",
            text(&l["tenant"]),
            num(&l["gpu_hours"]),
            num(&l["energy_kwh"]),
            num(&l["network_gib"]),
            num(&l["pcie_gib"]),
            text(&l["cost"]),
        ));
    }
    out.push_str(&format!("{:<14} {:>55}\n", "total", text(&cb["total"])));
    out
}

/// The extender's `HostPriorityList` as `(host, score)`.
pub(crate) fn scores(list: &Value) -> Vec<(String, i64)> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                text(&h["Host"]).to_owned(),
                h["Score"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

/// The ranking line: nodes, best first.
pub(crate) fn ranking(scores: &[(String, i64)]) -> String {
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let ranked: Vec<String> = sorted.iter().map(|(h, s)| format!("{h} {s}/10")).collect();
    format!(
        "scheduler ranking (POST /scheduler/prioritize, a pod asking 1 nvidia.com/gpu): {}",
        ranked.join(", ")
    )
}

/// What changed between two frames, one line each: GPU states, quota
/// actions, the node's score.
pub(crate) fn events(
    before: Option<&Value>,
    now: &Value,
    scores_before: &[(String, i64)],
    scores_now: &[(String, i64)],
) -> Vec<String> {
    let mut out = Vec::new();
    let states = |s: &Value| -> BTreeMap<String, (String, String)> {
        s["gpus"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                (
                    text(&g["gpu"]).to_owned(),
                    (text(&g["state"]).to_owned(), text(&g["model"]).to_owned()),
                )
            })
            .collect()
    };
    let was = before.map(states).unwrap_or_default();
    for (gpu, (state, model)) in states(now) {
        let old = was.get(&gpu).map(|w| w.0.as_str());
        if old.is_some_and(|o| o != state) && matches!(state.as_str(), "idle" | "stuck" | "lost") {
            let why = match state.as_str() {
                "idle" => "held but doing nothing",
                "stuck" => "pinned at 100 % while its process makes no progress",
                _ => "not answering",
            };
            out.push(format!("GPU {gpu} ({model}) is now {state}: {why}"));
        }
    }
    let actions = |s: &Value| -> BTreeMap<(String, String, String), f64> {
        s["enforcement_actions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    (
                        text(&a["tenant"]).to_owned(),
                        text(&a["resource"]).to_owned(),
                        text(&a["action"]).to_owned(),
                    ),
                    num(&a["total"]),
                )
            })
            .collect()
    };
    let acted = before.map(actions).unwrap_or_default();
    for ((tenant, resource, action), total) in actions(now) {
        if total > 0.0 && !acted.contains_key(&(tenant.clone(), resource.clone(), action.clone())) {
            out.push(format!(
                "quota: tenant {tenant} is over its {resource} quota ({}): {action}",
                quota(now, &tenant)
            ));
        }
    }
    for (host, score) in scores_now {
        let old = scores_before.iter().find(|(h, _)| h == host).map(|s| s.1);
        if old.is_some_and(|o| o != *score) {
            out.push(format!(
                "scheduler: {host} now scores {score}/10 (was {}/10)",
                old.unwrap_or(0)
            ));
        }
    }
    out
}

/// Bytes in decimal units, one decimal (`52.1 MB`).
fn bytes(v: f64) -> String {
    let mut v = v;
    for unit in ["B", "kB", "MB", "GB"] {
        if v < 1000.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1000.0;
    }
    format!("{v:.1} TB")
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn snap(state: &str, throttles: u64) -> Value {
        json!({
            "gpus": [{"gpu": "1", "model": "NVIDIA H100 80GB HBM3", "state": state,
                      "utilization_ratio": 1.0, "memory_used_bytes": 0, "memory_total_bytes": 0,
                      "processes": []}],
            "tenant_gpu": [{"tenant": "beta", "gpu": "1", "allocated_seconds_total": 3.0,
                            "memory_bytes": 48u64 << 30, "energy_joules_total": 1500.0}],
            "tenant_io": [{"tenant": "beta", "network_egress_bytes_total": 2_000_000,
                           "pcie_h2d_bytes_total": 1_000_000}],
            "tenant_quotas": [{"tenant": "beta", "resource": "gpu_memory",
                               "limit": (32u64 << 30) as f64, "usage": (48u64 << 30) as f64}],
            "enforcement_actions": if throttles > 0 {
                json!([{"tenant": "beta", "resource": "gpu_memory", "action": "throttle", "total": throttles}])
            } else { json!([]) },
        })
    }

    #[test]
    fn a_state_change_a_first_action_and_a_new_score_are_events() {
        let a = snap("busy", 0);
        let b = snap("stuck", 2);
        let e = events(
            Some(&a),
            &b,
            &[("demo-node".into(), 10)],
            &[("demo-node".into(), 4)],
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("GPU 1 (NVIDIA H100 80GB HBM3) is now stuck"));
        assert!(e[1].contains("beta is over its gpu_memory quota"), "{e:?}");
        assert_eq!(e[2], "scheduler: demo-node now scores 4/10 (was 10/10)");
        assert!(events(Some(&b), &b, &[], &[]).is_empty());
    }

    #[test]
    fn tables_show_quota_rates_and_money() {
        let q = quota(&snap("busy", 3), "beta");
        assert_eq!(q, "gpu_memory 48.0 GiB/32.0 GiB OVER, throttled ×3");
        let mut before = snap("busy", 0);
        before["tenant_io"] = json!([{"tenant": "beta"}]);
        let t = tenants(&snap("busy", 0), Some(&before), 2.0);
        assert!(t.contains("2.0 MB (1.0 MB)"), "{t}");
        assert!(t.contains("1.0 MB (500.0 kB)"), "{t}");
        let cb = json!({"currency": "USD", "total": "1.50",
                        "lines": [{"tenant": "beta", "gpu_hours": 0.01, "cost": "1.50"}]});
        assert!(chargeback(&cb).contains("COST USD"));
        let r = ranking(&scores(
            &json!([{"Host": "b", "Score": 0}, {"Host": "a", "Score": 10}]),
        ));
        assert!(r.ends_with("a 10/10, b 0/10"), "{r}");
    }
}
