"""`attnserve generate --attention-png` with the heatmap options, against a real (tiny) server."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attnserve.client import __main__ as cli
from attnserve.client.client import Client
from tests.server.server_process import ServerProcess


def test_the_server_reduces_the_heads_unless_each_head_is_drawn() -> None:
    def asked(head: str | int, grid: bool = False) -> str:
        return cli._reduction(argparse.Namespace(attention_head=head, attention_grid=grid))

    assert (asked("mean"), asked("max"), asked(2), asked("mean", grid=True)) == ("mean", "max", "none", "none")
    assert cli._head("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        cli._head("third")


def test_a_bad_head_is_refused_before_anything_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "Hi", "--attention-png", "x.png", "--attention-head", "-2"])
    assert exit_.value.code == 2 and "--attention-head" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("heatmap-cli") / "server.log"
    server = ServerProcess(["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB"]).start(log)
    try:
        yield server.wait_serving()
    finally:
        server.stop()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every generate_stream call the CLI makes."""
    calls: list[dict[str, Any]] = []
    original = Client.generate_stream

    def spy(self: Client, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Client, "generate_stream", spy)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "reduction"),
    [
        ([], "mean"),
        (["--attention-head", "max", "--attention-log"], "max"),
        (["--attention-head", "1", "--attention-hide-sink"], "none"),
        (["--attention-grid", "--attention-hide-sink", "--attention-log", "--attention-layer", "0"], "none"),
    ],
    ids=["mean", "max-log", "head-sink", "grid"],
)
def test_generate_writes_the_heatmap(
    tiny: ServerProcess, sent: list[dict[str, Any]], tmp_path: Path, options: list[str], reduction: str
) -> None:
    pytest.importorskip("matplotlib", reason="--attention-png needs matplotlib (attnserve-client[plot])")
    png = tmp_path / "attn.png"
    argv = ["generate", "Hello", "--target", tiny.target, "--max-tokens", "4", "--attention-png", str(png), *options]
    assert cli.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(c["head_reduction"], c["include_prompt"]) for c in sent] == [(reduction, True)]


@pytest.mark.slow
@pytest.mark.parametrize(("options", "hidden"), [([], True), (["--no-attention-hide-sink"], False)])
def test_the_sink_is_hidden_by_default_as_in_the_explorer(
    tiny: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: list[str], hidden: bool
) -> None:
    """The first token takes most of every row: on a linear scale it would leave the rest dark."""
    pytest.importorskip("matplotlib", reason="--attention-png needs matplotlib (attnserve-client[plot])")
    from attnserve.client import heatmap

    seen: list[bool] = []
    original = heatmap.render_png

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["hide_sink"])
        return original(*args, **kwargs)

    monkeypatch.setattr(heatmap, "render_png", spy)
    png = str(tmp_path / "a.png")
    argv = ["generate", "Hello", "--target", tiny.target, "--max-tokens", "2", "--attention-png", png, *options]
    assert cli.main(argv) == 0
    assert seen == [hidden]


@pytest.mark.slow
def test_a_head_past_the_models_heads_says_so(tiny: ServerProcess, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--attention-png needs matplotlib (attnserve-client[plot])")
    argv = [
        "generate",
        "Hello",
        "--target",
        tiny.target,
        "--max-tokens",
        "2",
        "--attention-png",
        str(tmp_path / "a.png"),
    ]
    with pytest.raises(SystemExit, match="--attention-head: head 99: the rows hold 4 head"):
        cli.main([*argv, "--attention-head", "99"])
