"""Every package folder ships: pyproject.toml lists the packages one by one (the namespace mapping
needs it), so a new folder that is not listed would be missing from a wheel, and from the image."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def listed(pyproject: Path) -> set[str]:
    return set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])


def folders(root: str, namespace: str) -> set[str]:
    base = REPO / root
    return {
        ".".join([namespace, *init.parent.relative_to(base).parts])
        for init in base.rglob("__init__.py")
        if "build" not in init.parts
    }


def test_the_server_distribution_lists_every_package() -> None:
    found = folders("model", "attnserve.model") | folders("server", "attnserve.server")
    assert found == listed(REPO / "pyproject.toml")


def test_the_client_distribution_lists_every_package() -> None:
    assert folders("client", "attnserve.client") | {"attnserve.v1"} == listed(REPO / "client/pyproject.toml")
