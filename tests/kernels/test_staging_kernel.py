"""kernels/staging.py (`write_staged`) against the torch scatter it replaces, in the Triton
interpreter: fresh random data, poisoned tables, strided inputs, padded slots (id 0)."""

from __future__ import annotations

import pytest
import torch

from sglang_kvc.kernels.staging import write_staged

ROWS, IDS = 40, 64


def staging_map(gen, device):
    """Logical id -> staging row: a permutation of rows 1.. for ids 1.., id 0 -> row 0."""
    staging_row = torch.zeros(IDS, dtype=torch.int64, device=device)
    staging_row[1:ROWS] = torch.randperm(ROWS - 1, generator=gen, device=device) + 1
    return staging_row


@pytest.mark.parametrize("heads,head_dim", [(4, 128), (2, 64), (3, 96)])
@pytest.mark.parametrize("num_tokens", [1, 7, 30])
def test_matches_the_torch_scatter(heads, head_dim, num_tokens, gen, device):
    staging_row = staging_map(gen, device)
    slots = torch.randperm(ROWS - 1, generator=gen, device=device)[:num_tokens] + 1
    # K as a column slice of a fused qkv-like tensor (token stride > heads * head_dim).
    fused = torch.randn((num_tokens, 3 * heads * head_dim), generator=gen, device=device).to(torch.bfloat16)
    k = fused[:, heads * head_dim : 2 * heads * head_dim].view(num_tokens, heads, head_dim)
    v = torch.randn((num_tokens, heads, head_dim), generator=gen, device=device)  # float32, converted on store
    k_table = torch.full((ROWS, heads, head_dim), float("nan"), dtype=torch.bfloat16, device=device)
    v_table = torch.full_like(k_table, float("nan"))
    write_staged(slots, staging_row, k, v, k_table, v_table)

    rows = staging_row[slots]
    assert torch.equal(k_table[rows], k) and torch.equal(v_table[rows], v.to(torch.bfloat16))
    untouched = torch.ones(ROWS, dtype=torch.bool, device=device)
    untouched[rows] = False
    assert k_table[untouched].isnan().all() and v_table[untouched].isnan().all(), "rows outside the slots written"


def test_padded_slots_write_only_row_zero(gen, device):
    """CUDA-graph padding: slot id 0 maps to staging row 0 and writes nothing else."""
    staging_row = staging_map(gen, device)
    slots = torch.tensor([5, 0, 9, 0], device=device)
    k, v = (torch.randn((4, 2, 64), generator=gen, device=device) for _ in range(2))
    k_table = torch.full((ROWS, 2, 64), float("nan"), device=device)
    v_table = torch.full_like(k_table, float("nan"))
    write_staged(slots, staging_row, k, v, k_table, v_table)
    for index in (0, 2):
        assert torch.equal(k_table[staging_row[slots[index]]], k[index])
    assert not k_table[0].isnan().any()  # one of the padded tokens' K
    written = {0, int(staging_row[5]), int(staging_row[9])}
    others = [row for row in range(ROWS) if row not in written]
    assert k_table[others].isnan().all()


def test_rejects_mismatched_shapes(device):
    staging_row = torch.zeros(IDS, dtype=torch.int64, device=device)
    table = torch.zeros((ROWS, 2, 64), device=device)
    with pytest.raises(ValueError, match="must be"):
        write_staged(torch.tensor([1, 2], device=device), staging_row, torch.zeros((3, 2, 64), device=device),
                     torch.zeros((3, 2, 64), device=device), table, table.clone())
    with pytest.raises(ValueError, match="do not fit"):
        write_staged(torch.tensor([1], device=device), staging_row, torch.zeros((1, 4, 64), device=device),
                     torch.zeros((1, 4, 64), device=device), table, table.clone())
