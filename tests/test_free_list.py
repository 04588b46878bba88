"""RowFreeList: a device stack of free rows with its height on the host."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_kvc.stores import RowFreeList


def test_a_fresh_list_hands_out_rows_in_order_and_never_row_zero():
    free_list = RowFreeList(5, "cpu")
    assert free_list.alloc(3).tolist() == [1, 2, 3]
    assert free_list.available() == 2 and sorted(free_list.free_rows.tolist()) == [4, 5]


def test_allocated_rows_do_not_change_when_the_stack_is_reused():
    free_list = RowFreeList(4, "cpu")
    first = free_list.alloc(2)
    free_list.free(first.clone())
    second = free_list.alloc(2)
    free_list.free(torch.tensor([4, 3]))  # overwrites the stack slots `second` came from
    assert sorted(first.tolist()) == sorted(second.tolist()) == [1, 2]


def test_exhaustion_and_overflow_are_errors():
    free_list = RowFreeList(2, "cpu")
    with pytest.raises(RuntimeError, match="exhausted"):
        free_list.alloc(3)
    with pytest.raises(RuntimeError, match="overflow"):
        free_list.free(torch.tensor([1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=40))
def test_free_rows_are_always_the_complement_of_the_held_ones(operations):
    num_rows = 12
    free_list, held = RowFreeList(num_rows, "cpu"), []
    for allocate, count in operations:
        if allocate:
            count = min(count, free_list.available())
            rows = free_list.alloc(count).tolist()
            assert len(rows) == count and not set(rows) & set(held)
            held += rows
        else:
            count = min(count, len(held))
            released, held = held[:count], held[count:]
            free_list.free(torch.tensor(released, dtype=torch.int64))
        assert free_list.available() == num_rows - len(held)
        assert sorted(free_list.free_rows.tolist() + held) == list(range(1, num_rows + 1))
    free_list.clear()
    assert free_list.available() == num_rows
