"""Just enough of kustomize to render gruflow's k8s/ offline (kustomize is not installed here).

Supports what k8s/ uses and nothing more: ``resources`` (files and directories), ``namespace``,
``labels`` (metadata labels only), ``images`` and ``patches`` (strategic merge patches that name their
target, and JSON 6902 patches with a ``target`` selector). A test compares the result with
``kubectl kustomize`` where kubectl exists, so this stays honest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# kinds that have no namespace (of those gruflow's manifests could use)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}
# list fields merged element-wise by their "name" (Kubernetes' patch merge key for these fields)
MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes"}
SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or a patch matches nothing."""


def load_documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` would print (in resource order)."""
    directory = Path(directory)
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, objects, patch)
    if "namespace" in kustomization:
        _set_namespace(objects, kustomization["namespace"])
    for group in kustomization.get("labels", []):
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise KustomizeError("labels with includeSelectors/includeTemplates are not supported")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _apply_patch(directory: Path, objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    if "path" in patch:
        body: Any = load_documents(directory / patch["path"])
        body = body[0] if len(body) == 1 else body
    else:
        body = yaml.safe_load(patch["patch"])
    if isinstance(body, list):  # JSON 6902 operations on every object the target selects
        target = patch.get("target") or {}
        hits = [o for o in objects if all(o.get(k) == v if k in ("kind", "apiVersion") else
                                           o.get("metadata", {}).get(k) == v for k, v in target.items())]
        if not hits:
            raise KustomizeError(f"patch target {target} matches no object")
        for obj in hits:
            for op in body:
                _json6902(obj, op)
        return
    hits = [o for o in objects if o["kind"] == body["kind"] and o["metadata"]["name"] == body["metadata"]["name"]]
    if len(hits) != 1:
        raise KustomizeError(f"patch {body['kind']}/{body['metadata']['name']} matches {len(hits)} objects")
    merged = strategic_merge(hits[0], body)
    hits[0].clear()
    hits[0].update(merged)


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """Maps merge recursively, named lists (containers, env, volumes) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base and v is not None else copy.deepcopy(v)
        return out
    if key in MERGE_BY_NAME and isinstance(base, list) and isinstance(patch, list):
        out = copy.deepcopy(base)
        for item in patch:
            same = [i for i, b in enumerate(out) if b.get("name") == item.get("name")]
            if same:
                out[same[0]] = strategic_merge(out[same[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _json6902(obj: dict[str, Any], op: dict[str, Any]) -> None:
    if op["op"] not in ("add", "replace", "remove"):
        raise KustomizeError(f"JSON patch op {op['op']!r} is not supported")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node: Any = obj
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif op["op"] == "replace" and not isinstance(node, list) and last not in node:
        raise KustomizeError(f"JSON patch replaces a missing path {op['path']}")
    elif isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), op["value"]) if op["op"] == "add" else \
            node.__setitem__(int(last), op["value"])
    else:
        node[last] = op["value"]


def _set_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
        elif obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace


def _set_image(objects: list[dict[str, Any]], image: dict[str, Any]) -> None:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name != image["name"]:
                continue
            new = image.get("newName", name)
            new_tag = image.get("newTag", tag)
            container["image"] = f"{new}:{new_tag}" if new_tag else new
