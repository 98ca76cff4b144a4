"""A tiny kustomize renderer for the features deploy/ uses, and only those.

Debian 12 packages no kustomize, so the ops checks render the manifests
themselves: `resources` (files and directories), `labels` (pairs, without
selectors), and `patches` that are either JSON 6902 operation lists with a
`target`, or a strategic-merge document whose only content is
`$patch: delete` (removing a resource). Anything else in a kustomization is
refused with an error, so nobody silently relies on a feature this renderer
does not implement. Where `kubectl kustomize` exists, tests/ops/check.py
also renders with it and requires the same objects.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "labels", "patches"}


class KustomizeError(Exception):
    """The kustomization uses something this renderer cannot do, or is wrong."""


def _key(obj: dict) -> tuple:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    meta = obj.get("metadata", {})
    return (group, obj.get("kind"), meta.get("namespace", ""), meta.get("name"))


def object_key(obj: dict) -> str:
    group, kind, ns, name = _key(obj)
    return f"{kind}.{group or 'core'}/{ns + '/' if ns else ''}{name}"


def _load_docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """Applies JSON 6902 add/remove/replace operations to a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        kind = op["op"]
        if kind == "add":
            if isinstance(parent, list):
                if last == "-":
                    parent.append(copy.deepcopy(op["value"]))
                else:
                    parent.insert(int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise KustomizeError(f"replace of missing path {op['path']}")
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise KustomizeError(f"JSON 6902 op {kind!r} is not supported here")
    return doc


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    meta = obj.get("metadata", {})
    checks = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    for k, v in target.items():
        if k not in checks:
            raise KustomizeError(f"patch target field {k!r} is not supported here")
        if checks[k] != v:
            return False
    return True


def render(directory: pathlib.Path) -> list[dict]:
    """Renders the kustomization in `directory` into a list of objects."""
    directory = pathlib.Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.exists():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: fields not supported by kustomize_lite: {sorted(unknown)}")

    objects: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(_load_docs(path))
        else:
            raise KustomizeError(f"{kfile}: resource {res!r} does not exist")

    for patch in k.get("patches", []):
        if "path" in patch:
            docs = list(yaml.safe_load_all((directory / patch["path"]).read_text()))
            body = docs[0] if len(docs) == 1 else docs
        elif "patch" in patch:
            body = yaml.safe_load(patch["patch"])
        else:
            raise KustomizeError(f"{kfile}: patch without path or patch")
        if isinstance(body, list):
            target = patch.get("target")
            if not target:
                raise KustomizeError(f"{kfile}: JSON 6902 patch needs a target")
            hits = [i for i, o in enumerate(objects) if _matches(o, target)]
            if not hits:
                raise KustomizeError(f"{kfile}: patch target {target} matches nothing")
            for i in hits:
                objects[i] = apply_json6902(objects[i], body)
        elif isinstance(body, dict) and body.get("$patch") == "delete":
            want = _key(body)
            before = len(objects)
            objects = [o for o in objects if _key(o) != want]
            if len(objects) == before:
                raise KustomizeError(f"{kfile}: delete patch matches nothing: {want}")
        else:
            raise KustomizeError(
                f"{kfile}: only JSON 6902 patches and `$patch: delete` are supported here"
            )

    for entry in k.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError(f"{kfile}: labels with selectors/templates are not supported here")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])

    seen = set()
    for obj in objects:
        key = _key(obj)
        if key in seen:
            raise KustomizeError(f"{kfile}: duplicate object {object_key(obj)}")
        seen.add(key)
    return objects
