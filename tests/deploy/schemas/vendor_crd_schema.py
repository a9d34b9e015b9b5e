"""Vendor one version's OpenAPI v3 schema out of a CustomResourceDefinition, for tests/deploy.

    python tests/deploy/schemas/vendor_crd_schema.py CRD.yaml --version v1 --source "..." > OUT.json

Keeps the validation schema of ``spec.versions[NAME].schema.openAPIV3Schema`` as the CRD has it,
less what does not validate a manifest: ``description`` texts and the ``status`` subtree (the
controller writes status, manifests never carry it). ``--source`` goes into ``$comment``, which
JSON Schema ignores. No network: fetch the CRD yourself, at a release tag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def strip_descriptions(node: object) -> object:
    """Drop ``description`` annotations, but never a property that happens to be named so."""
    if isinstance(node, list):
        return [strip_descriptions(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: strip_descriptions(schema) for name, schema in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd", type=Path)
    p.add_argument("--version", required=True, help="the CRD version's name, e.g. v1")
    p.add_argument("--source", required=True, help="where the CRD came from: repository, tag, commit, path")
    a = p.parse_args()
    crd = yaml.safe_load(a.crd.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == a.version]
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    comment = f"{group}/{a.version} {kind}: openAPIV3Schema of {a.source}; descriptions and status removed"
    json.dump({"$comment": comment, **schema}, sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
