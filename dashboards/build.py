#!/usr/bin/env python3
"""Builds the three Grafana boards of this directory (the JSON files are its
output; tests/ops/check.py fails when they differ from it).

    python3 dashboards/build.py

Every panel queries the `${datasource}` variable; `cluster`, `node`, `gpu`
and `tenant` are template variables. Every series selector of every query
(panels and variables) also matches `cluster=~"$cluster"`, added here, so
one Grafana serves several clusters whose Prometheus sets a `cluster`
label; All (`.*`) also matches series without one. Metric names follow the
README's metric reference.
"""
import json, os, re, sys
DS = {"type": "prometheus", "uid": "${datasource}"}
OUT = os.path.dirname(os.path.abspath(__file__))
CHECK = "--check" in sys.argv  # compare with the files instead of writing them
STALE = []

def ds_var():
    return {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False, "multi": False}


# A series selector: a metric name not followed by `(` (a function), with
# or without its `{…}` (the ops checks find metrics the same way).
SELECTOR = re.compile(r"\b((?:tally|process)_[a-zA-Z0-9_]+|up|ALERTS)\b(?!\s*\()(\{)?")

def with_cluster(expr):
    """`expr` with `cluster=~"$cluster"` in each series selector."""
    return SELECTOR.sub(lambda m: m.group(1) + ('{cluster=~"$cluster", ' if m.group(2) else '{cluster=~"$cluster"}'), expr)

def cluster_var():
    return qvar("cluster", "Cluster", "label_values(tally_build_info, cluster)", scoped=False)

def qvar(name, label, query, multi=True, include_all=True, scoped=True):
    if scoped:
        query = with_cluster(query)
    return {"type": "query", "name": name, "label": label, "datasource": DS,
            "definition": query,
            "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "sort": 1, "multi": multi, "includeAll": include_all,
            **({"allValue": ".*"} if include_all else {}),
            "current": {}, "options": [], "hide": 0, "regex": ""}

class Board:
    def __init__(self, uid, title, desc, variables, tags):
        self.uid, self.title, self.desc, self.vars, self.tags = uid, title, desc, variables, tags
        self.panels, self.x, self.y, self.rowh, self.id = [], 0, 0, 0, 0
    def row(self, title):
        if self.x: self.y += self.rowh; self.x = 0; self.rowh = 0
        self.id += 1
        self.panels.append({"type": "row", "title": title, "id": self.id, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1
    def panel(self, kind, title, targets, w=12, h=8, unit=None, desc="", options=None, field=None, transformations=None, instant=False, table=False):
        if self.x + w > 24: self.y += self.rowh; self.x = 0; self.rowh = 0
        self.id += 1
        tg = []
        for i, t in enumerate(targets):
            expr, legend = (t if isinstance(t, tuple) else (t, ""))
            d = {"refId": chr(65 + i), "datasource": DS, "expr": with_cluster(expr), "legendFormat": legend or "__auto", "range": not instant, "instant": instant, "editorMode": "code"}
            if table: d["format"] = "table"
            tg.append(d)
        defaults = {"unit": unit} if unit else {}
        if field: defaults.update(field)
        p = {"type": kind, "title": title, "description": desc, "id": self.id, "datasource": DS,
             "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}, "targets": tg,
             "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options or {}}
        if transformations: p["transformations"] = transformations
        self.panels.append(p)
        self.x += w; self.rowh = max(self.rowh, h)
    def dump(self, fname):
        d = {"uid": self.uid, "title": self.title, "description": self.desc, "tags": self.tags,
             "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
             "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "timezone": "",
             "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
             "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                        "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                        "name": "Annotations & Alerts", "type": "dashboard"}]},
             "links": [{"title": "Tally boards", "type": "dashboards", "tags": ["tally"], "asDropdown": True, "includeVars": True, "keepTime": True}],
             "templating": {"list": self.vars}, "panels": self.panels}
        text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
        path = os.path.join(OUT, fname)
        if CHECK:
            with open(path) as f:
                if f.read() != text:
                    STALE.append(fname)
        else:
            with open(path, "w") as f:
                f.write(text)

STAT = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value", "graphMode": "area", "textMode": "auto"}
TABLE = {"showHeader": True, "cellHeight": "sm"}
HIDE_TIME = [{"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True}}}]
TS = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"], "showLegend": True}, "tooltip": {"mode": "multi", "sort": "desc"}}
BAR = {"displayMode": "gradient", "orientation": "horizontal", "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "showUnfilled": True}
PHYS = 'gpu!~".+/.+"'  # physical GPUs: MIG instances are gpu="<index>/<gi>/<ci>"

# ---------------------------------------------------------------- overview
b = Board("tally-cluster-overview", "Tally / Cluster GPU overview",
          "Every GPU of the fleet: states, utilization, idle-but-allocated GPUs and their tenants, XID errors, agent and probe health.",
          [ds_var(), cluster_var(), qvar("node", "Node", "label_values(tally_gpu_info, node)"),
           qvar("gpu", "GPU", 'label_values(tally_gpu_info{node=~"$node"}, gpu)')], ["tally", "gpu"])
b.row("Fleet")
b.panel("stat", "Physical GPUs", ['count(tally_gpu_info{node=~"$node", mig_profile=""})'], w=4, h=5, options=STAT)
b.panel("stat", "MIG instances", ['count(tally_gpu_info{node=~"$node", mig_profile!=""}) or vector(0)'], w=4, h=5, options=STAT)
b.panel("stat", "Agents up", ['sum(up{job="tally-agent", node=~"$node"})'], w=4, h=5, options=STAT)
b.panel("stat", "Fleet GPU utilization", [f'avg(tally_gpu_utilization_ratio{{node=~"$node", {PHYS}}})'], w=4, h=5, unit="percentunit", options=STAT)
b.panel("stat", "GPU memory in use", [f'sum(tally_gpu_memory_used_bytes{{node=~"$node", {PHYS}}}) / sum(tally_gpu_memory_total_bytes{{node=~"$node", {PHYS}}})'], w=4, h=5, unit="percentunit", options=STAT)
b.panel("stat", "GPU power", [f'sum(tally_gpu_power_watts{{node=~"$node", {PHYS}}})'], w=4, h=5, unit="watt", options=STAT)
b.row("States")
b.panel("bargauge", "GPUs by state", [('sum by (state) (tally_gpu_state{node=~"$node", gpu=~"$gpu"})', "{{state}}")], w=8, h=8,
        desc="GPUs and MIG instances per state: free (nothing on it), busy, idle (held, no work), stuck (held, no progress), lost.", options=BAR, instant=True)
b.panel("timeseries", "GPUs by state over time", [('sum by (state) (tally_gpu_state{node=~"$node", gpu=~"$gpu"})', "{{state}}")], w=16, h=8,
        options=TS, field={"custom": {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 60, "drawStyle": "line"}})
b.panel("heatmap", "Utilization heatmap", [f'tally_gpu_utilization_ratio{{node=~"$node", gpu=~"$gpu", {PHYS}}}'], w=24, h=9,
        desc="Distribution of GPU utilization across the selected GPUs over time: a band at the bottom is GPUs doing nothing.",
        options={"calculate": True, "calculation": {"yBuckets": {"mode": "count", "value": "10"}}, "yAxis": {"unit": "percentunit", "min": 0, "max": 1},
                 "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "scale": "exponential", "exponent": 0.5, "steps": 64},
                 "cellGap": 1, "legend": {"show": True}, "tooltip": {"show": True, "yHistogram": False}})
b.panel("table", "Idle but allocated GPUs", [('sum by (node, gpu, tenant) (tally_tenant_gpu_memory_bytes{node=~"$node", tenant!="_idle"} > 0) * on (node, gpu) group_left () max by (node, gpu) (tally_gpu_state{node=~"$node", state="idle"} == 1)', "")],
        w=12, h=8, unit="bytes", desc="GPUs the agent marks idle while a tenant holds memory on them: who holds it, and how much.", options=TABLE, transformations=HIDE_TIME, instant=True, table=True)
b.panel("table", "Stuck or lost GPUs", [('tally_gpu_state{node=~"$node", state=~"stuck|lost"} == 1', "")],
        w=12, h=8, options=TABLE, transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}], instant=True, table=True)
b.row("Errors and health")
b.panel("timeseries", "XID errors", [('sum by (node, gpu, xid) (increase(tally_gpu_xid_errors_total{node=~"$node", gpu=~"$gpu"}[$__rate_interval]))', "{{node}} gpu {{gpu}} xid {{xid}}")],
        w=12, h=8, options=TS, field={"custom": {"drawStyle": "bars", "fillOpacity": 80}})
b.panel("table", "XID errors since agent start", [('sum by (node, gpu, xid) (tally_gpu_xid_errors_total{node=~"$node", gpu=~"$gpu"})', "")],
        w=12, h=8, options=TABLE, transformations=HIDE_TIME, instant=True, table=True)
b.panel("table", "eBPF probe health", [('tally_probe_up{node=~"$node"}', "")], w=8, h=8,
        desc="1: the probe is loaded and attached. 0: see the agent's log or `tally doctor` on the node.",
        options=TABLE, transformations=HIDE_TIME, instant=True, table=True,
        field={"mappings": [{"type": "value", "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}], "custom": {"cellOptions": {"type": "color-background"}}})
b.panel("table", "NVML per node", [('tally_nvml_up{node=~"$node"}', "")], w=8, h=8, options=TABLE, transformations=HIDE_TIME, instant=True, table=True,
        field={"mappings": [{"type": "value", "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}], "custom": {"cellOptions": {"type": "color-background"}}})
b.panel("table", "Firing Tally alerts", [('ALERTS{alertname=~"Tally.*", alertstate="firing"}', "")], w=8, h=8,
        options=TABLE, transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True}}}], instant=True, table=True)
b.row("Aggregator")
b.panel("stat", "Ledger", [('min(tally_aggregator_ledger_up)', "")], w=4, h=7, options=STAT, desc="1: every aggregator replica reads its ledger.",
        field={"mappings": [{"type": "value", "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}]})
b.panel("timeseries", "Reports by result", [('sum by (result) (rate(tally_aggregator_reports_total[$__rate_interval]))', "{{result}}")], w=7, h=7, unit="reqps", options=TS,
        desc="stored, duplicate (a retry, stored once), and the refusals: rejected, unauthorized, forbidden, conflict, error.")
b.panel("timeseries", "Ingest latency", [('histogram_quantile(0.99, sum by (le) (rate(tally_aggregator_ingest_duration_seconds_bucket[$__rate_interval])))', "p99"),
                                          ('histogram_quantile(0.5, sum by (le) (rate(tally_aggregator_ingest_duration_seconds_bucket[$__rate_interval])))', "p50")],
        w=6, h=7, unit="s", options=TS)
b.panel("table", "Seconds since each node's last report", [('time() - max by (node) (tally_aggregator_node_last_report_timestamp_seconds{node=~"$node"})', "")], w=7, h=7, unit="s",
        options=TABLE, transformations=HIDE_TIME, instant=True, table=True)
b.dump("tally-cluster-overview.json")

# ---------------------------------------------------------------- tenants
t = Board("tally-tenants", "Tally / Tenants & chargeback",
          "Per-tenant GPU hours (allocated vs used), energy, PCIe and network bytes, quotas, enforcement and cost. The time range is the billing window.",
          [ds_var(), cluster_var(), qvar("node", "Node", "label_values(tally_gpu_info, node)"),
           qvar("tenant", "Tenant", 'label_values(tally_tenant_gpu_allocated_seconds_total{node=~"$node"}, tenant)')], ["tally", "chargeback"])
sel = 'node=~"$node", tenant=~"$tenant"'
t.row("GPU time")
t.panel("bargauge", "GPU hours allocated (window)", [(f'sum by (tenant) (increase(tally_tenant_gpu_allocated_seconds_total{{{sel}}}[$__range])) / 3600', "{{tenant}}")], w=8, h=9, unit="h",
        desc="Wall time each tenant held GPUs (MIG instances count their share of time). _idle: nobody held the GPU.", options=BAR, instant=True)
t.panel("bargauge", "GPU hours used, SM-weighted (window)", [(f'sum by (tenant) (increase(tally_tenant_gpu_sm_seconds_total{{{sel}}}[$__range])) / 3600', "{{tenant}}")], w=8, h=9, unit="h",
        desc="Held time weighted by SM utilization: what the tenant's kernels actually used.", options=BAR, instant=True)
t.panel("bargauge", "Efficiency: used / allocated (window)", [(f'sum by (tenant) (increase(tally_tenant_gpu_sm_seconds_total{{{sel}, tenant!="_idle"}}[$__range])) / sum by (tenant) (increase(tally_tenant_gpu_allocated_seconds_total{{{sel}, tenant!="_idle"}}[$__range]))', "{{tenant}}")],
        w=8, h=9, unit="percentunit", options=BAR, instant=True)
t.panel("timeseries", "GPUs held vs used", [(f'sum by (tenant) (rate(tally_tenant_gpu_allocated_seconds_total{{{sel}, tenant!="_idle"}}[$__rate_interval]))', "{{tenant}} held"),
                                             (f'sum by (tenant) (rate(tally_tenant_gpu_sm_seconds_total{{{sel}, tenant!="_idle"}}[$__rate_interval]))', "{{tenant}} used")],
        w=12, h=8, options=TS, desc="GPUs (equivalents) each tenant holds, and how many of them its kernels keep busy.")
t.panel("timeseries", "GPU memory held", [(f'sum by (tenant) (tally_tenant_gpu_memory_bytes{{{sel}}})', "{{tenant}}")], w=12, h=8, unit="bytes", options=TS)
t.row("Energy and I/O")
t.panel("bargauge", "Energy (window)", [(f'sum by (tenant) (increase(tally_tenant_gpu_energy_joules_total{{{sel}}}[$__range])) / 3600000', "{{tenant}}")], w=8, h=8, unit="kwatth",
        desc="The tenant's share of GPU energy. _idle: the idle draw of GPUs nobody held.", options=BAR, instant=True)
t.panel("timeseries", "PCIe bytes (explicit CUDA copies)", [(f'sum by (tenant, direction) (rate(tally_tenant_pcie_bytes_total{{{sel}}}[$__rate_interval]))', "{{tenant}} {{direction}}")],
        w=8, h=8, unit="Bps", options=TS, desc="h2d/d2h from uprobes on the CUDA copy calls; _unattributed is what the GPU's counters saw beyond them.")
t.panel("timeseries", "Network bytes", [(f'sum by (tenant, direction) (rate(tally_tenant_network_bytes_total{{{sel}}}[$__rate_interval]))', "{{tenant}} {{direction}}")],
        w=8, h=8, unit="Bps", options=TS)
t.panel("timeseries", "Network packets dropped by rate limit", [(f'sum by (tenant, direction) (rate(tally_tenant_network_dropped_packets_total{{{sel}}}[$__rate_interval]))', "{{tenant}} {{direction}}")],
        w=12, h=7, unit="pps", options=TS)
t.panel("bargauge", "Network GiB (window)", [(f'sum by (tenant) (increase(tally_tenant_network_bytes_total{{{sel}}}[$__range])) / 1073741824', "{{tenant}}")], w=12, h=7, unit="none", options=BAR, instant=True)
t.row("Quotas and enforcement")
t.panel("bargauge", "Quota usage vs limit", [(f'max by (tenant, resource) (tally_tenant_quota_usage{{{sel}}}) / max by (tenant, resource) (tally_tenant_quota_limit{{{sel}}} > 0)', "{{tenant}} {{resource}}")],
        w=12, h=8, unit="percentunit", options={**BAR, "minVizValue": 0, "maxVizValue": 1}, instant=True,
        field={"min": 0, "max": 1, "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 0.8}, {"color": "red", "value": 1}]}})
t.panel("table", "Enforcement actions (window)", [(f'sum by (tenant, resource, action) (increase(tally_enforcement_actions_total{{{sel}}}[$__range]))', "")],
        w=12, h=8, options=TABLE, transformations=HIDE_TIME, instant=True, table=True, desc="alert / throttle / terminate actions; every one is in the audit log (GET /api/v1/audit).")
# Priced with the aggregator's own price table (tally_price_*), as the
# chargeback prices: GPU time per model (a MIG instance as its slice of its
# parent's model, tally_gpu_slice_fraction), models without a price at the
# default price, then energy, network and PCIe bytes.
t.row("Cost (this window's usage × the aggregator's price table)")
gpu_by_model = f'sum by (tenant, gpu_model) (increase(tally_tenant_gpu_allocated_seconds_total{{{sel}}}[$__range]) * on (instance, gpu) group_left (gpu_model) tally_gpu_slice_fraction) / 3600'
gpu_cost = (f'({gpu_by_model}) * on (gpu_model) group_left () max by (gpu_model) (tally_price_gpu_hour) '
            f'or on (tenant, gpu_model) ({gpu_by_model}) * on () group_left () max (tally_price_gpu_hour{{gpu_model="default"}})')
per_byte = lambda metric, price: f'sum by (tenant) (increase({metric}{{{sel}}}[$__range])) / 1073741824 * scalar(max({price}))'
cost_items = [("gpu", gpu_cost),
              ("energy", f'sum by (tenant) (increase(tally_tenant_gpu_energy_joules_total{{{sel}}}[$__range])) / 3600000 * scalar(max(tally_price_energy_kwh))'),
              ("network", per_byte("tally_tenant_network_bytes_total", "tally_price_network_gib")),
              ("pcie", per_byte("tally_tenant_pcie_bytes_total", "tally_price_pcie_gib"))]
by_item = " or ".join(f'label_replace({e}, "item", "{item}", "", "")' for item, e in cost_items)
t.panel("bargauge", "Estimated cost (window)", [(f'sum by (tenant) ({by_item})', "{{tenant}}")],
        w=8, h=9, unit="none", options=BAR, instant=True,
        desc="The agents' counters for the window, priced with the aggregator's price table (tally_price_*) as the chargeback prices: GPU time per model and MIG fraction, energy, network and PCIe. The bill is the chargeback API (GET /api/v1/chargeback, `tally report`), which reads the ledger.")
t.panel("table", "Cost by item (window)", [(f'sum by (tenant, item) ({by_item})', "")],
        w=8, h=9, options=TABLE, transformations=HIDE_TIME, instant=True, table=True)
t.panel("table", "Price table (aggregator)", [('max by (gpu_model, currency) (tally_price_gpu_hour)', "")],
        w=8, h=9, options=TABLE, transformations=HIDE_TIME, instant=True, table=True,
        desc="Price per GPU-hour of each model in the aggregator's [prices] table; gpu_model=\"default\" prices every other model.")
t.row("Chargeback (aggregator ledger, whole cluster)")
ts = 'tenant=~"$tenant"'
gpu_h = f'sum by (tenant) (increase(tally_cluster_tenant_gpu_allocated_seconds_total{{{ts}}}[$__range])) / 3600'
kwh = f'sum by (tenant) (increase(tally_cluster_tenant_gpu_energy_joules_total{{{ts}}}[$__range])) / 3600000'
t.panel("bargauge", "Cluster GPU hours allocated (window)", [(gpu_h, "{{tenant}}")], w=8, h=9, unit="h", options=BAR, instant=True)
t.panel("bargauge", "Cluster GPU hours used, SM-weighted (window)", [(f'sum by (tenant) (increase(tally_cluster_tenant_gpu_sm_seconds_total{{{ts}}}[$__range])) / 3600', "{{tenant}}")], w=8, h=9, unit="h", options=BAR, instant=True)
t.panel("bargauge", "Cluster energy (window)", [(kwh, "{{tenant}}")], w=8, h=9, unit="kwatth", options=BAR, instant=True)
t.panel("timeseries", "Cluster network and PCIe bytes", [(f'sum by (tenant, direction) (rate(tally_cluster_tenant_network_bytes_total{{{ts}}}[$__rate_interval]))', "{{tenant}} net {{direction}}"),
                                                         (f'sum by (tenant, direction) (rate(tally_cluster_tenant_pcie_bytes_total{{{ts}}}[$__rate_interval]))', "{{tenant}} pcie {{direction}}")],
        w=24, h=8, unit="Bps", options=TS, desc="From the ledger: every node's reports, so a node that was unreachable fills in when its spool is replayed.")
t.dump("tally-tenants.json")

# ---------------------------------------------------------------- node
n = Board("tally-node", "Tally / Node detail",
          "One node: its GPUs and MIG slices, which tenants hold them, and what the agent itself costs.",
          [ds_var(), cluster_var(), qvar("node", "Node", "label_values(tally_gpu_info, node)", multi=False, include_all=False),
           qvar("gpu", "GPU", 'label_values(tally_gpu_info{node=~"$node"}, gpu)')], ["tally", "gpu"])
ns = 'node=~"$node", gpu=~"$gpu"'
n.row("GPUs")
n.panel("table", "GPUs and MIG instances", [(f'tally_gpu_info{{{ns}}}', "")], w=12, h=8, options=TABLE, instant=True, table=True,
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True, "instance": True}}}])
n.panel("table", "State", [(f'tally_gpu_state{{{ns}}} == 1', "")], w=12, h=8, options=TABLE, instant=True, table=True,
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True, "instance": True}}}])
n.panel("table", "MIG slices", [(f'(tally_gpu_state{{{ns}}} == 1) * on (node, gpu) group_left (model, mig_profile) tally_gpu_info{{{ns}, mig_profile!=""}}', "")],
        w=12, h=8, options=TABLE, instant=True, table=True, desc="Each MIG instance, its profile and its current state (free slices are what a scheduler can still place).",
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True, "instance": True}}}])
n.panel("table", "Processes' tenants (GPU memory held)", [(f'sum by (gpu, tenant) (tally_tenant_gpu_memory_bytes{{{ns}}})', "")], w=12, h=8, unit="bytes",
        options=TABLE, instant=True, table=True, transformations=HIDE_TIME)
n.panel("timeseries", "Utilization", [(f'tally_gpu_utilization_ratio{{{ns}}}', "gpu {{gpu}}")], w=12, h=8, unit="percentunit", options=TS, field={"min": 0, "max": 1})
n.panel("timeseries", "GPU memory used", [(f'tally_gpu_memory_used_bytes{{{ns}}}', "gpu {{gpu}} used"), (f'tally_gpu_memory_total_bytes{{{ns}}}', "gpu {{gpu}} total")], w=12, h=8, unit="bytes", options=TS)
n.panel("timeseries", "Tenants holding each GPU", [(f'sum by (gpu, tenant) (rate(tally_tenant_gpu_allocated_seconds_total{{{ns}}}[$__rate_interval]))', "gpu {{gpu}} {{tenant}}")], w=12, h=8, unit="percentunit",
        options=TS, field={"custom": {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 50}}, desc="Share of wall time each tenant held the GPU or MIG instance (_idle: nobody).")
n.panel("timeseries", "Power and energy rate", [(f'tally_gpu_power_watts{{{ns}}}', "gpu {{gpu}} power"), (f'rate(tally_gpu_energy_joules_total{{{ns}}}[$__rate_interval])', "gpu {{gpu}} energy rate")], w=12, h=8, unit="watt", options=TS)
n.panel("timeseries", "Temperature", [(f'tally_gpu_temperature_celsius{{{ns}}}', "gpu {{gpu}}")], w=12, h=8, unit="celsius", options=TS)
n.panel("timeseries", "PCIe throughput", [(f'rate(tally_gpu_pcie_bytes_total{{{ns}}}[$__rate_interval])', "gpu {{gpu}} {{direction}}")], w=12, h=8, unit="Bps", options=TS)
n.panel("timeseries", "Network by tenant", [('sum by (tenant, direction) (rate(tally_tenant_network_bytes_total{node=~"$node"}[$__rate_interval]))', "{{tenant}} {{direction}}")], w=12, h=8, unit="Bps", options=TS)
n.panel("timeseries", "PCIe copies by tenant", [('sum by (tenant, direction) (rate(tally_tenant_pcie_bytes_total{node=~"$node"}[$__rate_interval]))', "{{tenant}} {{direction}}")], w=12, h=8, unit="Bps", options=TS)
n.row("Agent")
n.panel("timeseries", "Agent CPU", [('rate(process_cpu_seconds_total{job="tally-agent", node=~"$node"}[$__rate_interval])', "cpu")], w=6, h=7, unit="percentunit", options=TS,
        desc="Cores the agent uses (1 = one full core).")
n.panel("timeseries", "Agent RSS", [('process_resident_memory_bytes{job="tally-agent", node=~"$node"}', "rss")], w=6, h=7, unit="bytes", options=TS)
n.panel("timeseries", "Sample duration", [('tally_sample_duration_seconds{node=~"$node"}', "last cycle"), ('rate(tally_samples_total{node=~"$node"}[$__rate_interval])', "cycles/s")], w=6, h=7, unit="s", options=TS)
n.panel("stat", "Report spool", [('tally_report_spool_reports{node=~"$node"}', "")], w=3, h=7, options=STAT, desc="Reports waiting for the aggregator.")
n.panel("table", "Probes", [('tally_probe_up{node=~"$node"}', "")], w=3, h=7, options=TABLE, instant=True, table=True,
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True, "job": True, "instance": True, "node": True}}}])
n.panel("timeseries", "Reports to the aggregator", [('rate(tally_report_sent_reports_total{node=~"$node"}[$__rate_interval])', "sent"),
                                                    ('rate(tally_report_send_failures_total{node=~"$node"}[$__rate_interval])', "failed (retried)"),
                                                    ('rate(tally_report_spool_dropped_reports_total{node=~"$node"}[$__rate_interval])', "dropped")],
        w=24, h=7, unit="reqps", options=TS)
n.dump("tally-node.json")

if CHECK and STALE:
    sys.exit(f"stale (edit dashboards/build.py, then run it): {', '.join(STALE)}")
