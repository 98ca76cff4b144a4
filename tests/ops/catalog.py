"""Which component produces each metric the boards and rules use.

Used only to explain a SKIPPED check: when no target exposes a metric, the
reason names the producer and its issue, so a re-run after that work lands
shows the check turning into a pass (or a real failure).

Names not in the metric contract's table (tests/ops/metric-contract.md) (the aggregator's and the report metrics)
are taken from the code of the issue that produces them.
"""

# (prefix or exact name, producer, why it may be absent)
PRODUCERS = [
    ("tally_probe_up", "agent eBPF probes", "issue 3 (eBPF probes) has not landed"),
    ("tally_tenant_network_", "agent eBPF probes", "issue 3 (cgroup_skb network bytes) has not landed"),
    ("tally_tenant_pcie_", "agent eBPF probes", "issue 3 (CUDA copy uprobes) has not landed"),
    ("tally_tenant_quota_", "agent enforcement", "issue 4 (local quota enforcement) has not landed"),
    ("tally_enforcement_actions_total", "agent enforcement", "issue 4 (enforcement actions) has not landed"),
    ("tally_tenant_gpu_unallocated_use", "agent Kubernetes allocation check",
     "the live run has no kubelet, so no pod uses a GPU outside its allocation (tests/e2e/tests/kubernetes.rs proves it)"),
    ("tally_report_", "agent reports", "issue 5 (agent → aggregator reports) has not landed, or [report] is off"),
    ("tally_cluster_", "aggregator", "issue 5 (aggregator /metrics, tally_cluster_tenant_*) has not landed"),
    ("tally_aggregator_", "aggregator", "issue 5 (aggregator ingest/ledger metrics) has not landed"),
    ("tally_gpu_xid_errors_total", "agent NVML events", "no XID was delivered during the run"),
    ("ALERTS", "Prometheus", "no Tally alert was firing"),
]

# Aggregator metrics the boards and rules use (names as issue 5 builds
# them); once `tally aggregator` exists, each must be seen in the live run.
AGGREGATOR_METRICS = [
    "tally_cluster_tenant_gpu_allocated_seconds_total",
    "tally_cluster_tenant_gpu_sm_seconds_total",
    "tally_cluster_tenant_gpu_energy_joules_total",
    "tally_aggregator_node_last_report_timestamp_seconds",
    "tally_aggregator_reports_total",
    "tally_aggregator_ingest_duration_seconds_bucket",
    "tally_aggregator_ledger_errors_total",
    "tally_aggregator_ledger_up",
    "tally_aggregator_ledger_maintenance_passes_total",
    "tally_aggregator_node_clock_skew_seconds",
]

# States the agent exposes only once issue 6 has landed.
LATER_STATES = {
    "idle": "issue 6 (GPU states idle/stuck) has not landed: the agent never reported state=\"idle\"",
    "stuck": "issue 6 (GPU states idle/stuck) has not landed: the agent never reported state=\"stuck\"",
}


def why_absent(metric: str) -> str:
    for prefix, producer, why in PRODUCERS:
        if metric == prefix or metric.startswith(prefix):
            return f"no target exposes {metric} ({producer}): {why}"
    return f"no target exposes {metric}"
