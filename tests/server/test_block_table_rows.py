"""The runner's persistent block-table rows stay equal to the scheduler's tables, step after step."""

from __future__ import annotations

import torch

from attnserve.server.engine.block_manager import NULL_BLOCK
from attnserve.server.engine.block_table_rows import BlockTableRows
from attnserve.server.engine.records import ScheduledRequest
from attnserve.server.engine.request import SamplingParams


def item(request_id: str, table: list[int]) -> ScheduledRequest:
    return ScheduledRequest(request_id, [1], 0, table, SamplingParams(), 0, 1, True)


def test_rows_follow_growing_tables_and_freed_rows_are_reused_clean() -> None:
    rows = BlockTableRows(num_rows=2, width=2)
    a, b = [3, 4], [7]
    assert rows.rows([item("a", a), item("b", b)])[:, :2].tolist() == [[3, 4], [7, 0]]
    a.append(9)  # grows past the width: the table widens
    b.append(8)
    got = rows.rows([item("b", b), item("a", a)])
    assert got[:, :3].tolist() == [[7, 8, 0], [3, 4, 9]]
    rows.forget(["a"])
    c = [5]
    got = rows.rows([item("c", c), item("b", b)])  # c takes a's row: nothing of a's left in it
    assert got[0].tolist()[:3] == [5, 0, 0] and got[1].tolist()[:2] == [7, 8]
    assert rows.rows([item(f"r{i}", [i]) for i in range(3)]).shape[0] == 3  # more than the rows: it grows


def test_a_preempted_request_comes_back_with_new_blocks() -> None:
    rows = BlockTableRows()
    rows.rows([item("a", [1, 2, 3])])
    rows.forget(["a"])  # preempted: its blocks went back
    assert rows.rows([item("a", [6, 7, 8])])[0, :3].tolist() == [6, 7, 8]
    assert torch.equal(rows.rows([item("a", [6, 7, 8])]), rows.rows([item("a", [6, 7, 8])]))


def test_entries_released_out_of_a_window_are_nulled_in_the_row() -> None:
    rows = BlockTableRows()
    table = [3, 4, 5]
    assert rows.rows([item("a", table)])[0, :3].tolist() == [3, 4, 5]
    table[:2] = [NULL_BLOCK, NULL_BLOCK]  # the block manager released the first two
    table.append(6)
    released = ScheduledRequest("a", [1], 0, table, SamplingParams(), 0, 1, True, num_released_blocks=2)
    assert rows.rows([released])[0, :4].tolist() == [NULL_BLOCK, NULL_BLOCK, 5, 6]
