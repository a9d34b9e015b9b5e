"""Each running request's block table as a row of one persistent host tensor.

The scheduler's block tables only grow while a request runs, so a step writes just the
blocks added since the last one (a block every block_size tokens of a decode) instead of
rebuilding a (batch, blocks) tensor from Python lists: the difference between ~3 ms and
~0.4 ms of host time per step at batch 256 and 2,048 tokens of context. Entries released
out of a sliding window only grow too (from the front): they are overwritten with the null
block as they come, so a row never names a block its request gave back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from attnserve.server.engine.block_manager import NULL_BLOCK
from attnserve.server.engine.records import ScheduledRequest


class BlockTableRows:
    def __init__(self, num_rows: int = 64, width: int = 64) -> None:
        self.table = torch.zeros(num_rows, width, dtype=torch.int32)
        self._row: dict[str, int] = {}  # request id -> its row
        self._known: dict[str, int] = {}  # request id -> blocks already written in its row
        self._released: dict[str, int] = {}  # request id -> leading entries of its row nulled
        self._free = list(range(num_rows - 1, -1, -1))

    def forget(self, request_ids: Iterable[str]) -> None:
        """Finished or preempted requests: their rows are free (a preempted one comes back with new blocks)."""
        for request_id in request_ids:
            row = self._row.pop(request_id, None)
            if row is not None:
                self._known.pop(request_id)
                self._released.pop(request_id, None)
                self._free.append(row)

    def rows(self, items: Sequence[ScheduledRequest]) -> torch.Tensor:
        """(len(items), width) int32: each item's block table, brought up to date with only its new blocks."""
        index = []
        for item in items:
            row = self._row.get(item.request_id)
            if row is None:
                row = self._row[item.request_id] = self._take_row()
                self._known[item.request_id] = 0
                self.table[row].zero_()  # no stale blocks of the row's last owner past the new ones
            known, table = self._known[item.request_id], item.block_table
            if len(table) > known:
                if len(table) > self.table.shape[1]:
                    self._widen(len(table))
                self.table[row, known : len(table)] = torch.tensor(table[known:], dtype=torch.int32)
                self._known[item.request_id] = len(table)
            released = self._released.get(item.request_id, 0)
            if item.num_released_blocks > released:  # entries written before they were released
                self.table[row, released : item.num_released_blocks] = NULL_BLOCK
                self._released[item.request_id] = item.num_released_blocks
            index.append(row)
        return self.table[torch.tensor(index, dtype=torch.long)]

    def _take_row(self) -> int:
        if not self._free:  # more requests in a step than rows: grow (rare; sized from max_num_seqs)
            rows = self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        return self._free.pop()

    def _widen(self, width: int) -> None:
        wider = torch.zeros(self.table.shape[0], max(width, 2 * self.table.shape[1]), dtype=torch.int32)
        wider[:, : self.table.shape[1]] = self.table
        self.table = wider
