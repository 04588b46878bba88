"""quantize_into against quant.quantize: codes and (scale, minimum) bit-exact, written
only to the destination rows, every other row left as poisoned."""

from __future__ import annotations

import pytest
import torch

from sglang_kvc.kernels.quantize import quantize_into, write_packed
from sglang_kvc.quant import PackedFormat, quantize
from sglang_kvc.stores import PackedStore

HEADS = 2


def random_tokens(num_tokens, heads, head_dim, dtype, gen, device):
    """Never zeros: an offset and a spread that differ per token and head, so group
    ranges (and scales) vary by orders of magnitude."""
    shape = (num_tokens, heads, 1)
    offset = torch.randn(shape, generator=gen, device=device) * 4
    spread = torch.rand(shape, generator=gen, device=device) * 10 + 0.01
    x = torch.randn((num_tokens, heads, head_dim), generator=gen, device=device) * spread + offset
    return x.to(dtype)


def poisoned_tables(num_rows, heads, fmt, gen, device):
    codes = torch.randint(-(2**31), 2**31 - 1, (num_rows, heads, fmt.words), generator=gen,
                          device=device, dtype=torch.int32)
    scale_min = torch.full((num_rows, heads, fmt.groups, 2), float("nan"), dtype=torch.float16, device=device)
    return codes, scale_min


def distinct_rows(count, num_rows, gen, device):
    """`count` distinct rows out of 1..num_rows-1 (row 0 is never handed out)."""
    return torch.randperm(num_rows - 1, generator=gen, device=device)[:count] + 1


def check_written(x, rows, codes, scale_min, fmt, poison_codes):
    expected_codes, expected_scale_min = quantize(x, fmt)
    assert torch.equal(codes[rows], expected_codes), "codes differ from quant.quantize"
    assert torch.equal(scale_min[rows], expected_scale_min), "(scale, minimum) differ from quant.quantize"
    untouched = torch.ones(codes.shape[0], dtype=torch.bool, device=codes.device)
    untouched[rows] = False
    assert torch.equal(codes[untouched], poison_codes[untouched]), "a row outside `rows` was written"
    assert scale_min[untouched].isnan().all(), "a row outside `rows` was written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_reference(bits, group_size, dtype, gen, device):
    fmt = PackedFormat(bits, 64, group_size)
    num_tokens, num_rows = 7, 12
    x = random_tokens(num_tokens, HEADS, fmt.head_dim, dtype, gen, device)
    rows = distinct_rows(num_tokens, num_rows, gen, device)
    codes, scale_min = poisoned_tables(num_rows, HEADS, fmt, gen, device)
    poison = codes.clone()
    quantize_into(x, rows, codes, scale_min, fmt)
    check_written(x, rows, codes, scale_min, fmt, poison)


@pytest.mark.parametrize(
    "bits,head_dim,group_size,num_tokens",
    [
        (3, 128, 16, 1),  # 8 groups, words span groups
        (3, 128, 128, 1),  # one group, 13 words (the last one partial)
        (2, 96, 32, 7),  # head_dim and group count not powers of two
        (4, 256, 16, 1),  # the largest head_dim with the most groups
        (8, 32, 16, 33),
    ],
)
def test_shapes(bits, head_dim, group_size, num_tokens, gen, device):
    fmt = PackedFormat(bits, head_dim, group_size)
    num_rows = num_tokens + 3
    x = random_tokens(num_tokens, HEADS, head_dim, torch.bfloat16, gen, device)
    rows = distinct_rows(num_tokens, num_rows, gen, device)
    codes, scale_min = poisoned_tables(num_rows, HEADS, fmt, gen, device)
    poison = codes.clone()
    quantize_into(x, rows, codes, scale_min, fmt)
    check_written(x, rows, codes, scale_min, fmt, poison)


def test_strided_input(gen, device):
    """x is a view into a larger buffer (like K inside a fused QKV projection)."""
    fmt = PackedFormat(3, 64, 32)
    num_tokens, num_rows = 7, 10
    fused = random_tokens(num_tokens, 3 * HEADS, 80, torch.bfloat16, gen, device)
    x = fused[:, 1::3, 5 : 5 + fmt.head_dim]
    assert not x.is_contiguous()
    rows = distinct_rows(num_tokens, num_rows, gen, device)
    codes, scale_min = poisoned_tables(num_rows, HEADS, fmt, gen, device)
    poison = codes.clone()
    quantize_into(x, rows, codes, scale_min, fmt)
    check_written(x, rows, codes, scale_min, fmt, poison)


@pytest.mark.parametrize("step_kind", ["power_of_two", "fp16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ties_and_near_ties(bits, step_kind, gen, device):
    """Groups spanning [m, m + max_code * step]; the other values sit at m + (c + 0.5) * step.
    With a power-of-two step those are exact ties (torch.round: to the even code). With
    any fp16 step they are near ties, where only a correctly rounded division (div_rn,
    not the GPU's default approximate one) reproduces torch's codes."""
    fmt = PackedFormat(bits, 64, 16)
    max_code = fmt.max_code
    if step_kind == "power_of_two":
        step = 2.0 ** torch.randint(-3, 3, (1,), generator=gen, device=device).item()
    else:
        step = (torch.rand(1, generator=gen, device=device) * 2 + 0.01).half().item()
    minimum = torch.randint(-8, 8, (1,), generator=gen, device=device).item() * step
    halves = torch.randint(0, max_code, (HEADS, fmt.head_dim), generator=gen, device=device) + 0.5
    x = (halves * step + minimum).float()
    x[:, :: fmt.group_size] = minimum
    x[:, 1 :: fmt.group_size] = minimum + max_code * step
    x = x.unsqueeze(0)
    rows = torch.tensor([2], device=device)
    codes, scale_min = poisoned_tables(4, HEADS, fmt, gen, device)
    poison = codes.clone()
    quantize_into(x, rows, codes, scale_min, fmt)
    check_written(x, rows, codes, scale_min, fmt, poison)


def test_constant_groups(gen, device):
    """A constant fp16-exact group has scale 0. A constant group that fp16 cannot hold
    exactly gets a tiny scale of either sign from quant.quantize (max - fp16(min)); its
    codes are 0 either way, and the kernel must reproduce that scale too."""
    fmt = PackedFormat(4, 64, 32)
    x = random_tokens(3, HEADS, fmt.head_dim, torch.float32, gen, device)
    constant = torch.randn(3, 1, device=device, generator=gen)
    x[:, 0, :32] = constant.half().float()  # fp16-exact
    x[:, 1, 32:] = constant + 1e-3 * torch.rand(3, 1, device=device, generator=gen)
    rows = torch.tensor([3, 1, 2], device=device)
    codes, scale_min = poisoned_tables(5, HEADS, fmt, gen, device)
    poison = codes.clone()
    quantize_into(x, rows, codes, scale_min, fmt)
    check_written(x, rows, codes, scale_min, fmt, poison)
    assert (scale_min[rows, 0, 0, 0] == 0).all()


def test_write_packed_matches_store_write(gen, device):
    key_format, value_format = PackedFormat(3, 64, 32), PackedFormat(2, 64, 64)
    num_tokens, num_rows = 5, 9
    reference = PackedStore([num_rows, num_rows], HEADS, key_format, value_format, device)
    kernel = PackedStore([num_rows, num_rows], HEADS, key_format, value_format, device)
    k = random_tokens(num_tokens, HEADS, 64, torch.bfloat16, gen, device)
    v = random_tokens(num_tokens, HEADS, 64, torch.bfloat16, gen, device)
    rows = distinct_rows(num_tokens, num_rows + 1, gen, device)
    reference.write(1, rows, k, v)
    write_packed(kernel, 1, rows, k, v)
    for name in ("k_codes", "k_scale_min", "v_codes", "v_scale_min"):
        for layer in (0, 1):
            assert torch.equal(getattr(kernel, name)[layer], getattr(reference, name)[layer]), name


def test_no_tokens_is_a_no_op(gen, device):
    fmt = PackedFormat(2, 64, 32)
    codes, scale_min = poisoned_tables(4, HEADS, fmt, gen, device)
    poison = codes.clone()
    x = torch.empty((0, HEADS, 64), device=device)
    quantize_into(x, torch.empty(0, dtype=torch.int64, device=device), codes, scale_min, fmt)
    assert torch.equal(codes, poison) and scale_min.isnan().all()


def test_rejects_mismatched_tables(gen, device):
    fmt = PackedFormat(2, 64, 32)
    x = random_tokens(2, HEADS, 64, torch.bfloat16, gen, device)
    rows = torch.tensor([1, 2], device=device)
    codes, scale_min = poisoned_tables(4, HEADS, PackedFormat(4, 64, 32), gen, device)
    with pytest.raises(ValueError, match="codes_table"):
        quantize_into(x, rows, codes, scale_min, fmt)
