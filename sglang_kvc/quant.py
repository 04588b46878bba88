"""Packed low-bit KV format and its torch reference quantizer.

One token's K (or V) for one KV head is `head_dim` values. They are split into groups
of `group_size` channels; each group gets an asymmetric (scale, minimum) pair in fp16
and every value becomes a `bits`-bit code:  value ~= code * scale + minimum.

Codes are packed little-end-first into int32 words, `32 // bits` codes per word
(3-bit packs 10 per word and leaves 2 bits unused, so no code straddles a word: the
attention kernel can dequantize a code with one load, one shift and one mask).

This module is the numerical reference for the Triton kernels in `sglang_kvc.kernels`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class PackedFormat:
    bits: int
    head_dim: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.head_dim % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide head_dim {self.head_dim}"
            )

    @property
    def codes_per_word(self) -> int:
        return 32 // self.bits

    @property
    def words(self) -> int:
        return math.ceil(self.head_dim / self.codes_per_word)

    @property
    def groups(self) -> int:
        return self.head_dim // self.group_size

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def bytes_per_head(self) -> int:
        """Codes plus the fp16 (scale, minimum) pairs of one token and one head."""
        return self.words * 4 + self.groups * 2 * SCALE_DTYPE.itemsize


def pack_codes(codes: torch.Tensor, fmt: PackedFormat) -> torch.Tensor:
    """[..., head_dim] integer codes in [0, 2**bits) -> [..., words] int32."""
    cpw = fmt.codes_per_word
    padded = torch.zeros(
        (*codes.shape[:-1], fmt.words * cpw), dtype=torch.int64, device=codes.device
    )
    padded[..., : fmt.head_dim] = codes.to(torch.int64)
    shifts = torch.arange(cpw, device=codes.device, dtype=torch.int64) * fmt.bits
    words = (padded.view(*codes.shape[:-1], fmt.words, cpw) << shifts).sum(-1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(words: torch.Tensor, fmt: PackedFormat) -> torch.Tensor:
    """[..., words] int32 -> [..., head_dim] int64 codes."""
    cpw = fmt.codes_per_word
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(cpw, device=words.device, dtype=torch.int64) * fmt.bits
    codes = (unsigned.unsqueeze(-1) >> shifts) & fmt.max_code
    return codes.reshape(*words.shape[:-1], fmt.words * cpw)[..., : fmt.head_dim]


def quantize(x: torch.Tensor, fmt: PackedFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_dim] float -> (words [..., words] int32, scale_min [..., groups, 2] fp16).

    The codes are computed against the fp16-rounded scale and minimum actually stored,
    so dequantization error is bounded by half a (stored) step plus fp16 rounding.
    """
    grouped = x.float().reshape(*x.shape[:-1], fmt.groups, fmt.group_size)
    minimum = grouped.amin(-1).to(SCALE_DTYPE)
    maximum = grouped.amax(-1)
    scale = ((maximum - minimum.float()) / fmt.max_code).to(SCALE_DTYPE)
    # A constant group has scale 0: every code is 0 and dequantizes to the minimum.
    safe_scale = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale.float()))
    codes = torch.round((grouped - minimum.float().unsqueeze(-1)) / safe_scale.unsqueeze(-1))
    codes = codes.clamp_(0, fmt.max_code).reshape(*x.shape[:-1], fmt.head_dim)
    scale_min = torch.stack((scale, minimum), dim=-1)
    return pack_codes(codes, fmt), scale_min


def dequantize(
    words: torch.Tensor, scale_min: torch.Tensor, fmt: PackedFormat, dtype=torch.float32
) -> torch.Tensor:
    codes = unpack_codes(words, fmt).float()
    grouped = codes.reshape(*codes.shape[:-1], fmt.groups, fmt.group_size)
    scale = scale_min[..., 0].float().unsqueeze(-1)
    minimum = scale_min[..., 1].float().unsqueeze(-1)
    return (grouped * scale + minimum).reshape(*codes.shape).to(dtype)


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(dim: int) -> torch.Tensor:
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two dimension, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)  # exact; callers cast to their dtype
    while h.shape[0] < dim:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(dim)


def hadamard_matrix(dim: int, device, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal, symmetric Hadamard matrix H (H @ H = I): rotating both q and k by H
    leaves every q . k unchanged while spreading outlier channels over the head."""
    return _hadamard_cpu(dim).to(device=device, dtype=dtype)
