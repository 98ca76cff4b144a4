#!/usr/bin/env python3
"""Generates deploy/base/prometheusrule.yaml from alerts/tally-rules.yml.

    python3 tests/ops/gen_prometheusrule.py          # write the file
    python3 tests/ops/gen_prometheusrule.py --check  # exit 1 if it is stale

alerts/tally-rules.yml is the source of truth (promtool-tested); the
PrometheusRule is the same groups wrapped for prometheus-operator.
"""

import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT / "alerts" / "tally-rules.yml"
TARGET = ROOT / "deploy" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from alerts/tally-rules.yml by tests/ops/gen_prometheusrule.py.
# Do not edit: change the rules there, then run the generator
# (tests/ops/check.py fails when this file is stale).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def source_groups():
    """The rule groups of alerts/tally-rules.yml."""
    return yaml.safe_load(SOURCE.read_text())["groups"]


def render() -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "tally",
            "namespace": "tally",
            "labels": {"app.kubernetes.io/name": "tally"},
        },
        "spec": {"groups": source_groups()},
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)
    return HEADER + body


def main(argv) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python3 tests/ops/gen_prometheusrule.py")
            return 1
        print(f"{TARGET.relative_to(ROOT)} matches {SOURCE.relative_to(ROOT)}")
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
