"""DESIGN §2's one-way import rules, checked on the source (no imports executed)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _sources(folder: str) -> list[Path]:
    return [p for p in (REPO / folder).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def test_model_knows_nothing_of_serving() -> None:
    assert _sources("model")
    for path in _sources("model"):
        bad = imported_roots(path) & {"server", "client", "grpc", "grpc_health", "prometheus_client"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_scheduler_side_is_plain_python() -> None:
    for name in ("request.py", "scheduler.py", "block_manager.py"):
        path = REPO / "server" / name
        if path.exists():
            bad = imported_roots(path) & {"torch", "grpc", "model", "numpy"}
            assert not bad, f"server/{name} imports {bad}"


def test_client_installs_without_torch() -> None:
    for path in _sources("client"):
        bad = imported_roots(path) & {"torch", "model", "server", "numpy"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
