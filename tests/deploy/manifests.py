"""Load and render deploy/kubernetes without kubectl or kustomize.

`render()` does the part of `kustomize build` these manifests use: `resources` (files
and other kustomization directories), strategic-merge `patches` and `images`. The
strategic merge follows the Kubernetes patch strategy of the fields involved: lists
of containers, volumes and env entries merge by `name`, volume mounts by `mountPath`,
ports by `containerPort`; other lists are replaced; `null` deletes a key.
"""

from __future__ import annotations

import argparse
import copy
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
CAPABILITIES_OVERLAY = KUBERNETES / "overlays" / "capabilities"
KUSTOMIZATION = "kustomization.yaml"

Doc = dict[str, Any]

# Strategic-merge keys of the list fields the patches can touch (from the API's
# x-kubernetes-patch-merge-key); any other list is replaced as a whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def load_documents(path: Path) -> list[Doc]:
    """Every non-empty YAML document in *path*."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files(directory: Path = KUBERNETES) -> list[Path]:
    """The YAML files directly in *directory*, kustomization.yaml excluded."""
    return sorted(
        p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.name != KUSTOMIZATION
    )


def kustomization(directory: Path) -> Doc:
    return yaml.safe_load((directory / KUSTOMIZATION).read_text())


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged_list = copy.deepcopy(base)
        for item in patch:
            for i, existing in enumerate(merged_list):
                if existing.get(key) == item.get(key):
                    merged_list[i] = strategic_merge(existing, item)
                    break
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _identity(doc: Doc) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return doc["kind"], meta.get("name", ""), meta.get("namespace", "")


def _pod_specs(doc: Doc) -> list[Doc]:
    spec = doc.get("spec") or {}
    if doc["kind"] == "Pod":
        return [spec]
    template = spec.get("template") or {}
    return [template["spec"]] if "spec" in template else []


def containers(doc: Doc) -> list[Doc]:
    return [
        c
        for pod in _pod_specs(doc)
        for key in ("initContainers", "containers")
        for c in pod.get(key) or ()
    ]


def _set_images(docs: list[Doc], images: list[Doc]) -> None:
    for doc in docs:
        for container in containers(doc):
            name, _, tag = container["image"].rpartition(":")
            for rule in images:
                if rule["name"] == name:
                    container["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"


def render(directory: Path) -> list[Doc]:
    """`kustomize build directory`, for the features these manifests use."""
    spec = kustomization(directory)
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "patches", "images"}
    assert not unsupported, f"{directory}/{KUSTOMIZATION}: render() does not know {unsupported}"
    docs: list[Doc] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        docs.extend(render(path) if path.is_dir() else load_documents(path))
    for patch_ref in spec.get("patches", []):
        assert set(patch_ref) == {"path"}, f"only file patches are rendered here: {patch_ref}"
        for patch in load_documents(directory / patch_ref["path"]):
            matches = [i for i, doc in enumerate(docs) if _identity(doc) == _identity(patch)]
            assert len(matches) == 1, f"patch {patch_ref['path']} matches {len(matches)} objects"
            docs[matches[0]] = strategic_merge(docs[matches[0]], patch)
    _set_images(docs, spec.get("images", []))
    return docs


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def config_file(docs: list[Doc], configmap: str, key: str) -> dict[str, Any]:
    return tomllib.loads(find(docs, "ConfigMap", configmap)["data"][key])


# -- the real CLI --------------------------------------------------------------------


@cache
def cli_subparser(command: str) -> argparse.ArgumentParser:
    """The argparse parser of `tlscap <command>`, from the CLI's own build_parser()."""
    from agent.cli.main import build_parser

    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def long_options(command: str) -> set[str]:
    """`tlscap <command>`'s long options without the leading dashes (help excluded)."""
    return {
        option[2:]
        for action in cli_subparser(command)._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def parse_config(command: str, toml_text: str, tmp_dir: Path) -> argparse.Namespace:
    """What `tlscap <command> --config FILE` makes of a config file: the CLI's own loader
    (agent/cli/config_file.py) and parser, with no TLSCAP_* variables in play."""
    from agent.cli.config_file import expand_argv

    path = tmp_dir / f"{command}.toml"
    path.write_text(toml_text)
    parser = cli_subparser(command)
    return parser.parse_args(expand_argv(parser, ["--config", str(path)], environ={}))
