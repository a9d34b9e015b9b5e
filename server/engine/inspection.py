"""A step's reads and writes inside the model: residual vectors, the logit lens, steering, head ablation.

:meth:`StepInspection.plan` turns the requests' options into per-layer hooks on rows of the
flattened batch (model/hooks.py); after the forward, :meth:`StepInspection.collect` turns the
captured rows into plain records, one transfer per (layer, point). A step whose requests ask for
nothing plans no hooks: the forward runs exactly as without this module.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnserve.model.hooks import LayerHooks
from attnserve.model.llama import LlamaForCausalLM
from attnserve.server.engine.records import LensRow, ResidualRow, ScheduledRequest
from attnserve.server.engine.request import SteerPositions, WeightsDtype

_LENS_ROWS_AT_ONCE = 64  # lens logits held at once: 64 x vocabulary floats (12.6 MB at 49k)
_WIRE = {WeightsDtype.FLOAT16: (torch.float16, "<f2"), WeightsDtype.FLOAT32: (torch.float32, "<f4")}


def due_positions(item: ScheduledRequest, *, include_prompt: bool) -> list[int]:
    """Positions whose rows (attention, residuals, lens) this step owes the request: its prompt rows
    (include_prompt) not yet reported, and the row behind the token it samples."""
    start, end = item.num_computed_tokens, item.seq_len
    due: list[int] = []
    if include_prompt and item.report_prompt_from is not None:
        due = list(range(max(item.report_prompt_from, start), min(item.num_prompt_tokens, end)))
    if item.is_sampling and (not due or due[-1] != end - 1):
        due.append(end - 1)
    return due


@functools.lru_cache(maxsize=256)
def _vector(values: bytes, scale: float) -> torch.Tensor:
    """A steering vector as a float32 tensor times its scale (requests keep theirs for many steps)."""
    return torch.frombuffer(bytearray(values), dtype=torch.float32) * scale


@dataclass
class StepInspection:
    hooks: dict[int, LayerHooks] = field(default_factory=dict)
    # (layer, point) -> {batch row: its index among that point's captured rows}
    reads: dict[tuple[int, str], dict[int, int]] = field(default_factory=dict)
    # Per request (index in the step): its due positions and their batch rows.
    due: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def plan(
        cls, items: Sequence[ScheduledRequest], query_starts: Sequence[int], *, num_heads: int, device: torch.device
    ) -> StepInspection:
        plan = cls()
        steer: dict[tuple[int, str], tuple[list[int], list[torch.Tensor]]] = {}
        scales: dict[int, dict[int, torch.Tensor]] = {}  # layer -> batch row -> (H,) factors
        for i, item in enumerate(items):
            p = item.params
            if p.residuals is None and p.logit_lens is None and p.interventions is None:
                continue
            first_row = query_starts[i] - item.num_computed_tokens  # batch row of position 0
            if p.residuals is not None or p.logit_lens is not None:
                include_prompt = any(o is not None and o.include_prompt for o in (p.residuals, p.logit_lens))
                plan.due[i] = [(pos, first_row + pos) for pos in due_positions(item, include_prompt=include_prompt)]
                for pos, row in plan.due[i]:
                    if p.residuals is not None and (p.residuals.include_prompt or pos >= item.num_prompt_tokens - 1):
                        for layer in p.residuals.layers:
                            for point in p.residuals.points:
                                plan._want(layer, point, row)
                    if p.logit_lens is not None and (p.logit_lens.include_prompt or pos >= item.num_prompt_tokens - 1):
                        for layer in p.logit_lens.layers:
                            plan._want(layer, "resid_post", row)
            if p.interventions is None:
                continue
            positions = range(item.num_computed_tokens, item.seq_len)
            for s in p.interventions.steering:
                chosen = [first_row + pos for pos in positions if _steered(s.positions, pos, item.num_prompt_tokens)]
                if chosen:
                    rows, deltas = steer.setdefault((s.layer, s.point), ([], []))
                    rows += chosen
                    deltas.append(_vector(s.vector, s.scale).expand(len(chosen), -1))
            for a in p.interventions.ablations:
                layer_scales = scales.setdefault(a.layer, {})
                for pos in positions:
                    factors = layer_scales.setdefault(first_row + pos, torch.ones(num_heads))
                    factors[list(a.heads)] *= a.scale
        for (layer, point), rows in plan.reads.items():
            plan._layer(layer).reads[point] = torch.tensor(list(rows), dtype=torch.long, device=device)
        for (layer, point), (rows, deltas) in steer.items():
            plan._layer(layer).steering[point] = (
                torch.tensor(rows, dtype=torch.long, device=device),
                torch.cat(deltas).to(device),
            )
        for layer, by_row in scales.items():
            plan._layer(layer).head_scales = (
                torch.tensor(list(by_row), dtype=torch.long, device=device),
                torch.stack(list(by_row.values())).to(device),
            )
        return plan

    def collect(
        self, items: Sequence[ScheduledRequest], model: LlamaForCausalLM
    ) -> tuple[dict[str, list[ResidualRow]], dict[str, list[LensRow]]]:
        """The captured rows as records, per request id (call after the forward)."""
        captured = {key: self.hooks[key[0]].captured[key[1]] for key in self.reads}
        return self._residual_rows(items, captured), self._lens_rows(items, captured, model)

    def _residual_rows(
        self, items: Sequence[ScheduledRequest], captured: dict[tuple[int, str], torch.Tensor]
    ) -> dict[str, list[ResidualRow]]:
        host: dict[tuple[int, str, WeightsDtype], Any] = {}  # one transfer per (layer, point, dtype)
        out: dict[str, list[ResidualRow]] = {}
        for i, due in self.due.items():
            item, options = items[i], items[i].params.residuals
            if options is None:
                continue
            torch_dtype, wire = _WIRE[options.dtype]
            for pos, row in due:
                if not (options.include_prompt or pos >= item.num_prompt_tokens - 1):
                    continue
                for layer in options.layers:
                    for point in options.points:
                        key = (layer, point, options.dtype)
                        if key not in host:
                            host[key] = captured[(layer, point)].to(torch_dtype).cpu().numpy().astype(wire)
                        values = host[key][self.reads[(layer, point)][row]]
                        out.setdefault(item.request_id, []).append(
                            ResidualRow(point, layer, pos, values.tobytes(), options.dtype)
                        )
        return out

    def _lens_rows(
        self, items: Sequence[ScheduledRequest], captured: dict[tuple[int, str], torch.Tensor], model: LlamaForCausalLM
    ) -> dict[str, list[LensRow]]:
        asking = {i: o for i in self.due if (o := items[i].params.logit_lens) is not None}
        if not asking:
            return {}
        top = max(o.top_k for o in asking.values())
        tops: dict[int, tuple[list[list[int]], list[list[float]]]] = {}
        for layer in sorted({layer for o in asking.values() for layer in o.layers}):
            ids, probs = [], []
            hidden = captured[(layer, "resid_post")]
            # A chunk of rows at a time: a prompt's rows times the vocabulary would be hundreds of MB.
            for rows in hidden.split(_LENS_ROWS_AT_ONCE):
                p, i = model.logit_lens(rows).softmax(dim=-1).topk(top, dim=-1)
                ids += i.cpu().tolist()
                probs += p.cpu().tolist()
            tops[layer] = (ids, probs)
        out: dict[str, list[LensRow]] = {}
        for i, options in asking.items():
            item, k = items[i], options.top_k
            for pos, row in self.due[i]:
                if not (options.include_prompt or pos >= item.num_prompt_tokens - 1):
                    continue
                for layer in options.layers:
                    ids, probs = tops[layer]
                    index = self.reads[(layer, "resid_post")][row]
                    out.setdefault(item.request_id, []).append(LensRow(layer, pos, ids[index][:k], probs[index][:k]))
        return out

    def _want(self, layer: int, point: str, row: int) -> None:
        rows = self.reads.setdefault((layer, point), {})
        rows.setdefault(row, len(rows))

    def _layer(self, layer: int) -> LayerHooks:
        return self.hooks.setdefault(layer, LayerHooks())


def _steered(positions: SteerPositions, position: int, num_prompt_tokens: int) -> bool:
    if positions is SteerPositions.ALL:
        return True
    return (position < num_prompt_tokens) == (positions is SteerPositions.PROMPT)
