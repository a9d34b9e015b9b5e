"""Tokenize and Generate build a prompt the same way, for a model whose tokenizer adds a BOS token:
text gets the BOS, a chat (whose template writes its own special tokens) gets nothing added."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from tokenizers import processors

from attnserve.client import Client
from attnserve.model.tokenizer import Tokenizer
from tests.helpers import save_tiny_hf_model
from tests.server.server_process import ServerProcess

pytestmark = pytest.mark.slow  # a real server process on an HF folder
BOS = 0  # "<|endoftext|>" in the byte-level vocabulary


@pytest.fixture(scope="module")
def bos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bos-model")
    save_tiny_hf_model(folder, bos_token_id=BOS)
    backend = Tokenizer.byte_level(384).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", BOS)]
    )
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    server = ServerProcess(["--model", str(folder), "--dtype", "float32", "--kv-cache-memory", "16MiB"])
    server.start(folder / "server.log")
    try:
        yield server.wait_serving()
    finally:
        server.stop()


def test_text_prompt_gets_the_bos_in_tokenize_and_generate(bos_server: ServerProcess) -> None:
    with Client(bos_server.target, timeout=60) as client:
        ids = list(client.tokenize("hello there").token_ids)
        reply = client.generate("hello there", max_tokens=4, ignore_eos=True, temperature=0)
        same = client.generate(token_ids=ids, max_tokens=4, ignore_eos=True, temperature=0)
    assert ids[0] == BOS and len(ids) == 1 + len("hello there")
    assert reply.usage.prompt_tokens == len(ids)
    assert list(reply.completions[0].token_ids) == list(same.completions[0].token_ids)


def test_chat_prompt_is_the_same_in_tokenize_and_generate(bos_server: ServerProcess) -> None:
    messages = [("system", "Be brief."), ("user", "Hi!")]
    with Client(bos_server.target, timeout=60) as client:
        ids = list(client.tokenize(messages=messages).token_ids)
        reply = client.generate(messages=messages, max_tokens=4, ignore_eos=True, temperature=0)
        same = client.generate(token_ids=ids, max_tokens=4, ignore_eos=True, temperature=0)
    assert BOS not in ids, "the chat template writes its own special tokens: nothing is added"
    assert reply.usage.prompt_tokens == len(ids)
    assert list(reply.completions[0].token_ids) == list(same.completions[0].token_ids)
