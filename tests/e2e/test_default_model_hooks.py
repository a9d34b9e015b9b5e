"""The default model's residual reads, logit lens, steering and head ablation against transformers
(the same GGUF, dequantized to float32 by both)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnserve.model.hooks import LayerHooks
from attnserve.model.loader import LoadedModel
from tests.model.test_hooks import _ours


@pytest.fixture(scope="module")
def hf_smollm(default_gguf: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_default_model_reads_and_writes_match_transformers(smollm_f32: LoadedModel, hf_smollm) -> None:
    ours, hf = smollm_f32.model, hf_smollm
    tok = smollm_f32.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    rows = torch.arange(len(prompt))
    layers = ours.config.num_layers
    reads = {layer: LayerHooks(reads={"resid_pre": rows, "resid_post": rows}) for layer in (0, 14, layers - 1)}
    logits = _ours(ours, reads, [prompt])
    with torch.inference_mode():
        theirs = hf(torch.tensor([prompt]), output_hidden_states=True)
    scale = max(h.abs().max().item() for h in theirs.hidden_states)
    worst = 0.0
    for layer in (0, 14):
        worst = max(worst, (reads[layer].captured["resid_pre"] - theirs.hidden_states[layer][0]).abs().max().item())
        after = theirs.hidden_states[layer + 1][0]
        worst = max(worst, (reads[layer].captured["resid_post"] - after).abs().max().item())
    print(f"SmolLM2 residual reads vs transformers: max |diff| {worst:.2e} (values up to {scale:.1f})")
    assert worst <= 1e-5 * max(1.0, scale)
    with torch.inference_mode():
        lens = ours.logit_lens(reads[14].captured["resid_post"])
        expected = hf.lm_head(hf.model.norm(reads[14].captured["resid_post"]))
    assert (lens - expected).abs().max().item() <= 1e-3
    assert (logits - theirs.logits[0]).abs().max().item() <= 1e-3

    layer, vector = 10, torch.randn(ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    steered = _ours(
        ours, {layer: LayerHooks(steering={"resid_post": (rows, (4.0 * vector).expand(len(rows), -1))})}, [prompt]
    )
    handle = hf.model.layers[layer].register_forward_hook(
        lambda _m, _a, out: (out[0] + 4.0 * vector, *out[1:]) if isinstance(out, tuple) else out + 4.0 * vector
    )
    try:
        with torch.inference_mode():
            expected = hf(torch.tensor([prompt])).logits[0]
    finally:
        handle.remove()
    print(f"SmolLM2 steered logits vs transformers: max |diff| {(steered - expected).abs().max().item():.2e}")
    assert (steered - expected).abs().max().item() <= 1e-3
    assert torch.equal(steered.argmax(-1), expected.argmax(-1))
