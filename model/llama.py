"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, TinyLlama; Qwen2 with qkv bias).

Forward runs over a *flattened* batch: the new tokens of several sequences one
after another, their K/V stored in a paged cache (see model/attention.py).
Projections are fused (q|k|v and gate|up) so a layer is a handful of large
matmuls; Hugging Face weight names are mapped onto the fused tensors at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.model.attention import AttentionMetadata, captured_attention_weights, native_rows, paged_attention
from attnserve.model.config import ModelConfig
from attnserve.model.errors import ModelLoadError
from attnserve.model.kernels import cpu_native
from attnserve.model.kv_cache import KVCache
from attnserve.model.moe import MoEShard, SparseMoE, moe_param_for
from attnserve.model.packed import Linear, PackedWeight
from attnserve.model.parallel import TensorParallel
from attnserve.model.rope import RotaryEmbedding, rotate_in_place


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight). Gemma (offset 1) stores weight - 1 and normalises in float32."""

    native = False  # set by prepare_for_inference() where the native CPU kernels run

    def __init__(self, size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, residual_delta: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm(x); with ``residual_delta``, x += residual_delta first (in place: x is the residual)."""
        if self.native and x.dim() == 2 and x.is_contiguous():  # one op for the add and the norm
            return torch.ops.attnserve.add_rms_norm(x, residual_delta, self.weight, self.eps, self.offset)
        if residual_delta is not None:
            x += residual_delta
        if self.offset:
            scale = self.weight.float() + self.offset
            return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Under tensor parallelism ``config`` is the rank's shard (its heads) and O is row-parallel."""

    def __init__(self, config: ModelConfig, layer_index: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.tp = tp
        self.first_head = tp.rank * config.num_heads  # this rank's heads, as the hooks number them
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.attention_scale or config.head_dim**-0.5
        self.window = config.layer_window(layer_index)  # None: this layer sees the whole context
        self.softcap = config.attn_logit_softcap
        self.rope_dim = config.rope_dim
        self.uses_local_rope = self.window is not None and config.rope_local_theta is not None
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        # Qwen3: each head of q and k RMS-normalised (weights shared across heads) before RoPE.
        offset = config.norm_offset
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, offset) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, offset) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.q_norm is not None and self.k_norm is not None:  # written back in place, as RoPE is
            qk = self._qk_heads(qkv)
            qk[:, : self.num_heads] = self.q_norm(qk[:, : self.num_heads])
            qk[:, self.num_heads :] = self.k_norm(qk[:, self.num_heads :])
        # Partial rotary (Phi-4-mini) rotates each head's leading rope_dim dims and passes the rest through.
        kv: torch.Tensor | None = None
        if native_rows(meta):  # one native op: q and k rotated in place, k and v stored in the cache
            torch.ops.attnserve.rope_write_kv(
                qkv,
                cos,
                sin,
                layer_cache,
                meta.slot_mapping,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.rope_dim,
            )
        else:
            # q and k are adjacent in qkv: rotated in one go, in place, which leaves k and v adjacent
            # too: the cache takes them in one copy.
            qk = self._qk_heads(qkv)
            rotate_in_place(qk if self.rope_dim == self.head_dim else qk[..., : self.rope_dim], cos, sin)
            kv = qkv[:, self.q_size :].view(num_tokens, 2, self.num_kv_heads, self.head_dim)  # (T, 2, Hkv, D)
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)  # (T, H, D)
        out = paged_attention(
            q,
            kv,
            layer_cache,
            meta,
            layer_index=self.layer_index,
            scale=self.scale,
            window=self.window,
            softcap=self.softcap,
        )
        hooks = meta.hooks.get(self.layer_index) if meta.hooks else None
        if hooks is not None:
            out = hooks.scale_heads(out, first_head=self.first_head)
        return self.tp.all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))

    def _qk_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """(T, H + Hkv, D): the query and key heads of the projections, a view."""
        heads = self.num_heads + self.num_kv_heads
        return qkv[:, : self.q_size + self.kv_size].view(qkv.shape[0], heads, self.head_dim)


class MLP(nn.Module):
    """Under tensor parallelism ``config`` is the rank's shard (its columns) and down is row-parallel."""

    native = False  # set by prepare_for_inference() where the native CPU kernels run

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.intermediate_size = config.intermediate_size
        self.gelu = config.hidden_act != "silu"
        self.act = partial(F.gelu, approximate="tanh") if self.gelu else F.silu
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:  # act(gate) * up in one op
            hidden = torch.ops.attnserve.gated_act(self.gate_up_proj(x), self.gelu)
        else:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            hidden = self.act(gate) * up
        return self.tp.all_reduce(self.down_proj(hidden))


class DecoderLayer(nn.Module):
    """Pre-norm blocks (Llama: ``post_attention_layernorm`` is the MLP's input norm), or with
    ``sandwich_norms`` (Gemma) a norm on each block's input and on its output."""

    def __init__(self, config: ModelConfig, layer_index: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer_index = layer_index
        norm = partial(RMSNorm, config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_index, tp)
        self.post_attention_layernorm = norm()
        self.mlp: nn.Module = SparseMoE(config, tp) if config.num_experts else MLP(config, tp)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hooks = meta.hooks.get(self.layer_index) if meta.hooks else None
        if hooks is not None:
            x = hooks.at("resid_pre", x.clone())  # a copy: steering writes in place
        if self.sandwich:
            attended = self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, meta)
            attended = self.post_attention_layernorm(attended)
            x = x + (attended if hooks is None else hooks.at("attn_out", attended))
            if hooks is not None:
                x = hooks.at("resid_mid", x)
            out = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x.clone() if x.requires_grad else x  # the residual is updated in place below
            attended = self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, meta)
            if hooks is not None:
                attended = hooks.at("attn_out", attended)
            normed = self.post_attention_layernorm(x, residual_delta=attended)  # x is now resid_mid
            if hooks is not None:
                hooks.at("resid_mid", x)
                if hooks.steers("resid_mid"):  # the norm of the steered residual (row-wise: other rows' bits hold)
                    normed = self.post_attention_layernorm(x)
            out = self.mlp(normed)
        if hooks is None:
            return x + out
        return hooks.at("resid_post", x + hooks.at("mlp_out", out))


# Hugging Face parameter names -> (our parameter, which shard of a fused tensor).
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED_SHARDS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. ``forward(input_ids, positions, kv_cache, attn_metadata) -> logits``.

    With ``tp`` of size N (model/parallel.py) it is one rank's shard: ``config`` stays the whole
    model's, ``local_config`` has the rank's heads and columns (its layers and KV cache are built
    from it), and every rank runs the same forward, meeting the others at the collectives.
    """

    _packed_head: PackedWeight | None = None  # the tied head, packed by prepare_for_inference()

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp = tp or TensorParallel()
        tp.check(config)
        self.config = config
        self.local_config = local = tp.local_config(config)
        vocab_rows = tp.vocab_rows(config.vocab_size)[1]
        self.embed_tokens = nn.Embedding(vocab_rows, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(local, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, vocab_rows, bias=False)
        self.rotary = RotaryEmbedding(config)
        # Gemma 3: sliding layers rotate with their own, unscaled base.
        local = config.rope_local_theta
        self.local_rotary = RotaryEmbedding(config.replace(rope_theta=local, rope_scaling=None)) if local else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Logits (float32) for the rows in ``attn_metadata.logits_indices`` (every row if None).

        For the rows asked in ``attn_metadata.attention_requests``, the queries are kept in
        ``attn_metadata.captured_queries``; :meth:`attention_weights` turns them into weights.
        """
        x = self.embed(input_ids)  # (T, hidden)
        if self.config.scale_embeddings:  # by sqrt(hidden) rounded to the model's dtype, as Gemma does
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        cos, sin = self.rotary(positions, x.dtype)
        local = self.local_rotary(positions, x.dtype) if self.local_rotary is not None else (cos, sin)
        for layer, layer_cache in zip(self.layers, kv_cache.layers, strict=True):
            layer_cos, layer_sin = local if layer.self_attn.uses_local_rope else (cos, sin)
            x = layer(x, layer_cos, layer_sin, layer_cache, attn_metadata)
        if attn_metadata.logits_indices is not None:
            x = x[attn_metadata.logits_indices]
        return self.logit_lens(x)  # the last layer's lens is the model's own logits (rows, vocab)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T, hidden) embeddings; under tensor parallelism each rank looks up the ids in its vocabulary
        rows (zeros for the rest) and the sum over ranks is the embedding, exactly."""
        if not self.tp.enabled:
            return self.embed_tokens(input_ids)
        start, rows = self.tp.vocab_rows(self.config.vocab_size)
        local = input_ids - start
        outside = (local < 0) | (local >= rows)
        x = self.embed_tokens(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(x)

    def logit_lens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) that the final norm and the unembedding make of residual rows (n, hidden)."""
        x = self.norm(hidden if hidden.dtype == self.dtype else hidden.to(self.dtype))
        if self.lm_head is not None:
            logits = self.lm_head(x).float()
        elif self._packed_head is not None:
            logits = self._packed_head(x).float()
        else:
            logits = F.linear(x, self.embed_tokens.weight).float()
        if self.tp.enabled:  # each rank's vocabulary rows, in rank order, the padding cut off
            logits = self.tp.all_gather(logits, dim=-1)[:, : self.config.vocab_size]
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def attention_weights(
        self, meta: AttentionMetadata, kv_cache: KVCache, *, seq: int, layer: int
    ) -> tuple[int, torch.Tensor]:
        """After a forward: (first position, weights (H, n, first + n) float32) of the rows the
        metadata asked for, sequence ``seq`` at layer ``layer``, read from the paged cache (every
        head: under tensor parallelism, gathered from the ranks that hold them)."""
        attention = self.layers[layer].self_attn
        first, weights = captured_attention_weights(
            meta,
            kv_cache.layers[layer],
            seq=seq,
            layer=layer,
            scale=attention.scale,
            window=attention.window,
            softcap=attention.softcap,
        )
        return first, self.tp.all_gather(weights, dim=0)

    def prepare_for_inference(self) -> LlamaForCausalLM:
        """Re-pack weights into the fastest layout for this device and dtype; call after loading."""
        # Built (the first time on this machine) here, before serving, never inside a step.
        native = self.device.type == "cpu" and cpu_native.available()
        for module in self.modules():
            if isinstance(module, Linear | SparseMoE):
                module.pack()
            if isinstance(module, RMSNorm | MLP):
                module.native = native
        self._packed_head = None if self.lm_head is not None else PackedWeight.pack(self.embed_tokens.weight, None)
        return self

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters.

        Raises ModelLoadError on a shape mismatch, an unknown name, or a parameter
        that no tensor filled.
        """
        for module in self.modules():  # packed copies would go stale
            if isinstance(module, Linear | SparseMoE):
                module.packed = None
        self._packed_head = None
        params = dict(self.named_parameters())
        expected = {name: 1 for name in params}
        for name in params:
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                expected[name] = 3
            elif name.endswith("gate_up_proj.weight"):
                expected[name] = 2
            elif name.endswith("mlp.gate_up"):  # experts: gate and up of each
                expected[name] = 2 * self.config.num_experts
            elif name.endswith("mlp.down"):
                expected[name] = self.config.num_experts
        filled: dict[str, int] = {}
        for hf_name, tensor in weights:
            if hf_name == "rope_freqs.weight":
                self.rotary.set_freq_factors(tensor)
                continue
            target = self._param_for(hf_name)
            if target is None:
                continue
            param_name, shard = target
            if param_name not in params:
                raise ModelLoadError(f"checkpoint tensor {hf_name} has no place in a {self.config.architecture} model")
            dest = self._shard_view(params[param_name], param_name, shard)
            tensor = self._rank_slice(param_name, shard, tensor)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dest.shape)} "
                    "(does the config match the weights?)"
                )
            with torch.no_grad():
                dest.copy_(tensor)
            # A fused tensor given whole (Phi-3's qkv_proj and gate_up_proj) fills every shard at once.
            filled[param_name] = filled.get(param_name, 0) + (expected[param_name] if shard is None else 1)
        missing = [n for n, count in expected.items() if filled.get(n, 0) < count]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ModelLoadError(f"checkpoint lacks tensors for {shown}")

    def _param_for(self, hf_name: str) -> tuple[str, int | MoEShard | None] | None:
        if hf_name == "model.embed_tokens.weight":
            return "embed_tokens.weight", None
        if hf_name == "model.norm.weight":
            return "norm.weight", None
        if hf_name == "lm_head.weight":
            return None if self.lm_head is None else ("lm_head.weight", None)
        match = _LAYER_NAME.match(hf_name)
        if match is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                return None  # derived data some old checkpoints carry
            raise ModelLoadError(f"checkpoint tensor {hf_name} is not a Llama-family weight")
        index, rest = match.groups()
        if rest.endswith("rotary_emb.inv_freq"):
            return None
        if self.config.num_experts and (moe := moe_param_for(rest)) is not None:
            return f"layers.{index}.{moe[0]}", moe[1]
        module, _, kind = rest.rpartition(".")
        if module in _FUSED_SHARDS:
            fused, shard = _FUSED_SHARDS[module]
            return f"layers.{index}.{fused}.{kind}", shard
        return f"layers.{index}.{rest}", None

    def _shard_view(self, param: torch.Tensor, name: str, shard: int | MoEShard | None) -> torch.Tensor:
        if shard is None:
            return param
        if isinstance(shard, tuple):  # one expert's matrix of a fused expert tensor
            layer = self.layers[int(name.split(".")[1])]
            assert isinstance(layer.mlp, SparseMoE)
            return layer.mlp.expert_view(name, shard)
        c = self.local_config
        sizes = [c.q_size, c.kv_size, c.kv_size] if "qkv_proj" in name else [c.intermediate_size] * 2
        start = sum(sizes[:shard])
        return param.narrow(0, start, sizes[shard])

    def _rank_slice(self, name: str, shard: int | MoEShard | None, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole-model tensor bound for parameter ``name`` (``shard``: the
        section of a fused parameter it fills; None: the whole parameter). Identity at TP=1."""
        tp, c = self.tp, self.config
        if not tp.enabled:
            return tensor
        if name in ("embed_tokens.weight", "lm_head.weight"):
            start, rows = tp.vocab_rows(c.vocab_size)
            part = tensor[start : start + rows]
            return torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
        d = c.head_dim
        heads, kv_heads = tp.part(c.num_heads), tp.kv_heads(c)
        columns = tp.part(c.intermediate_size)
        if "qkv_proj" in name:  # rows: q | k | v, each cut to this rank's heads
            ranges = [(heads[0] * d, heads[1] * d)] + [(kv_heads[0] * d, kv_heads[1] * d)] * 2
            return _sections(tensor, 0, [c.q_size, c.kv_size, c.kv_size], ranges, shard)
        if "gate_up_proj" in name:
            return _sections(tensor, 0, [c.intermediate_size] * 2, [columns] * 2, shard)
        if name.endswith("o_proj.weight"):
            return tensor.narrow(1, heads[0] * d, heads[1] * d)
        if name.endswith("down_proj.weight"):
            return tensor.narrow(1, *columns)
        if name.endswith("mlp.gate_up") or name.endswith("mlp.down"):
            expert_columns = tp.part(c.expert_intermediate_size)
            if isinstance(shard, tuple):  # one expert's (I, h) gate or up, or its (h, I) down
                return tensor.narrow(1 if name.endswith("down") else 0, *expert_columns)
            if name.endswith("down"):  # (E, h, I)
                return tensor.narrow(2, *expert_columns)
            return _sections(tensor, 1, [c.expert_intermediate_size] * 2, [expert_columns] * 2, None)
        return tensor  # norms, the router, biases of replicated layers: every rank holds them whole

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (dummy models): normal(0, std) matrices, unit norms.

        The whole model's tensors are drawn one at a time, in one order, and each rank keeps its
        part: every tensor-parallel size holds the same model.
        """
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            whole = dict(LlamaForCausalLM(self.config).named_parameters())
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    drawn = torch.randn(whole[name].shape, generator=gen) * std
                    param.copy_(self._rank_slice(name, None, drawn))


def _sections(
    tensor: torch.Tensor,
    dim: int,
    sizes: list[int],
    ranges: list[tuple[int, int]],
    shard: int | MoEShard | None,
) -> torch.Tensor:
    """The rank's rows of a fused tensor's sections: section ``shard`` alone, or (None) every section
    of the whole fused tensor, each cut to its (start, length) and put back together."""
    if isinstance(shard, int):
        return tensor.narrow(dim, *ranges[shard])
    parts = tensor.split(sizes, dim=dim)
    return torch.cat([part.narrow(dim, *r) for part, r in zip(parts, ranges, strict=True)], dim=dim)
