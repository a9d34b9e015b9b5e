"""The one-way import rules (README "Layout"), checked on the source (no imports executed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HTTP_LIBRARIES = ("fastapi", "starlette", "uvicorn", "aiohttp", "httpx", "sse_starlette", "http.server")
GRPC = ("grpc", "grpc_health", "grpc_reflection", "attnserve.v1")


def imported_modules(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Every module a file imports, by its full dotted name (``from a.b import c`` gives a.b and a.b.c).
    ``module_level_only`` skips imports inside functions (optional dependencies, imported lazily)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(path: Path, banned: tuple[str, ...]) -> set[str]:
    return {m for m in imported_modules(path) if any(m == b or m.startswith(b + ".") for b in banned)}


def sources(folder: str) -> list[Path]:
    found = [p for p in (REPO / folder).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert found, f"no sources under {folder}/: the layout moved and this test would check nothing"
    return found


def source(relative: str) -> Path:
    path = REPO / relative
    assert path.is_file(), f"{relative} is gone: update the layering rules"
    return path


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: str(p.relative_to(REPO)))
def test_model_knows_nothing_of_serving(path: Path) -> None:
    banned = ("attnserve.server", "attnserve.client", *GRPC, "prometheus_client", *HTTP_LIBRARIES)
    assert not offending(path, banned)


@pytest.mark.parametrize("path", sources("server/engine"), ids=lambda p: str(p.relative_to(REPO)))
def test_engine_knows_no_front_door(path: Path) -> None:
    assert not offending(path, (*GRPC, *HTTP_LIBRARIES, "attnserve.server.api", "prometheus_client"))


@pytest.mark.parametrize(
    "name", ["request", "scheduler", "block_manager", "records", "config", "errors"], ids=lambda n: f"engine/{n}"
)
def test_scheduler_side_is_plain_python(name: str) -> None:
    path = source(f"server/engine/{name}.py")
    assert not offending(path, ("torch", "numpy", "attnserve.model", "attnserve.server.engine.runner"))


@pytest.mark.parametrize("path", sources("server/api"), ids=lambda p: str(p.relative_to(REPO)))
def test_front_doors_never_import_torch(path: Path) -> None:
    assert not offending(path, ("torch", "numpy", "attnserve.server.engine.runner"))


def test_server_help_and_config_do_not_load_torch() -> None:
    """The process wiring imports torch only when it loads the model."""
    code = (
        "import sys, runpy; sys.argv = ['server', '--help']\n"
        "import attnserve.server.app, attnserve.server.config, attnserve.server.api.grpc\n"
        "try:\n    runpy.run_module('attnserve.server', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--max-num-seqs" in proc.stdout


@pytest.mark.parametrize("path", sources("client"), ids=lambda p: str(p.relative_to(REPO)))
def test_client_installs_without_torch(path: Path) -> None:
    assert not offending(path, ("torch", "attnserve.model", "attnserve.server"))
    optional = {m for m in imported_modules(path, module_level_only=True) if m.split(".")[0] in ("numpy", "matplotlib")}
    assert not optional, "numpy and matplotlib are optional for the client: import them where they are used"


@pytest.mark.parametrize(
    "path",
    [*sources("model"), *sources("server"), *sources("client"), *sources("tests"), *sources("bench")],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_everything_imports_through_the_attnserve_namespace(path: Path) -> None:
    """Installed, the folders are attnserve.model / .server / .client: a bare `import server` would break."""
    bare = {m for m in imported_modules(path) if m.split(".")[0] in ("model", "server", "client")}
    assert not bare
