"""Physical KV stores (one per tier) and their per-layer row free lists.

A store holds, for every layer, a table of rows; a row holds one token's K and V for
all KV heads of that layer. Row 0 of every table is never handed out: it absorbs the
writes of padded tokens, as slot 0 does in SGLang's own pool.

    DenseStore   bf16 rows (staging, and the guard tier at 16 bits)
    PackedStore  packed low-bit codes + fp16 (scale, minimum) per group (see quant.py)

Stores know nothing about logical token ids; `pool.CompressedKVPool` maps those to
(tier, row) per layer.
"""

from __future__ import annotations

import torch

from sglang_kvc.quant import PackedFormat, dequantize, quantize
from sglang_kvc.runtime import triton_kernels_enabled


class RowFreeList:
    """Free rows of one table, handed out like SGLang's TokenToKVPoolAllocator hands
    out slots: a tensor of free row ids on the device, sliced on alloc, appended on
    free. The count is known on the host without a device sync."""

    def __init__(self, num_rows: int, device) -> None:
        self.num_rows = num_rows
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.free_rows = torch.arange(1, self.num_rows + 1, dtype=torch.int64, device=self.device)

    def available(self) -> int:
        return len(self.free_rows)

    def alloc(self, count: int) -> torch.Tensor:
        if count > len(self.free_rows):
            raise RuntimeError(f"row free list exhausted: asked {count}, have {len(self.free_rows)}")
        rows, self.free_rows = self.free_rows[:count], self.free_rows[count:]
        return rows

    def free(self, rows: torch.Tensor) -> None:
        if rows.numel():
            self.free_rows = torch.cat((self.free_rows, rows.to(torch.int64)))


class DenseStore:
    """bf16 rows: `k[layer][row] -> [heads, head_dim]`."""

    def __init__(self, rows_per_layer: list[int], heads: int, head_dim: int, dtype, device):
        self.rows_per_layer = rows_per_layer
        self.dtype = dtype
        self.k = [torch.zeros((r + 1, heads, head_dim), dtype=dtype, device=device) for r in rows_per_layer]
        self.v = [torch.zeros((r + 1, heads, head_dim), dtype=dtype, device=device) for r in rows_per_layer]

    @staticmethod
    def bytes_per_row(heads: int, head_dim: int, dtype=torch.bfloat16) -> int:
        return 2 * heads * head_dim * dtype.itemsize

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][rows] = k.to(self.dtype)
        self.v[layer][rows] = v.to(self.dtype)

    def read(self, layer: int, rows: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][rows].to(dtype), self.read_values(layer, rows, dtype)

    def read_values(self, layer: int, rows: torch.Tensor, dtype) -> torch.Tensor:
        return self.v[layer][rows].to(dtype)

    def key_tensors(self) -> list[torch.Tensor]:
        return list(self.k)

    def value_tensors(self) -> list[torch.Tensor]:
        return list(self.v)


class PackedStore:
    """Low-bit rows: codes `[row, heads, words]` int32 and `[row, heads, groups, 2]` fp16
    (scale, minimum), separately for K and V (they may use different bit widths)."""

    def __init__(
        self,
        rows_per_layer: list[int],
        heads: int,
        key_format: PackedFormat,
        value_format: PackedFormat,
        device,
    ):
        self.rows_per_layer = rows_per_layer
        self.key_format = key_format
        self.value_format = value_format

        def table(rows: int, fmt: PackedFormat):
            codes = torch.zeros((rows + 1, heads, fmt.words), dtype=torch.int32, device=device)
            scale_min = torch.zeros((rows + 1, heads, fmt.groups, 2), dtype=torch.float16, device=device)
            return codes, scale_min

        self.k_codes, self.k_scale_min, self.v_codes, self.v_scale_min = [], [], [], []
        for rows in rows_per_layer:
            kc, ks = table(rows, key_format)
            vc, vs = table(rows, value_format)
            self.k_codes.append(kc)
            self.k_scale_min.append(ks)
            self.v_codes.append(vc)
            self.v_scale_min.append(vs)

    @staticmethod
    def bytes_per_row(heads: int, key_format: PackedFormat, value_format: PackedFormat) -> int:
        return heads * (key_format.bytes_per_head() + value_format.bytes_per_head())

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.is_cuda and triton_kernels_enabled():
            # One fused launch per K / V, bit-exact with the torch path below (tested in
            # tests/kernels); imported here so CPU-only users never import Triton.
            from sglang_kvc.kernels.quantize import write_packed

            write_packed(self, layer, rows, k, v)
            return
        k_codes, k_scale_min = quantize(k, self.key_format)
        v_codes, v_scale_min = quantize(v, self.value_format)
        self.k_codes[layer][rows] = k_codes
        self.k_scale_min[layer][rows] = k_scale_min
        self.v_codes[layer][rows] = v_codes
        self.v_scale_min[layer][rows] = v_scale_min

    def read(self, layer: int, rows: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k = dequantize(self.k_codes[layer][rows], self.k_scale_min[layer][rows], self.key_format, dtype)
        v = dequantize(self.v_codes[layer][rows], self.v_scale_min[layer][rows], self.value_format, dtype)
        return k, v

    def key_tensors(self) -> list[torch.Tensor]:
        return [*self.k_codes, *self.k_scale_min]

    def value_tensors(self) -> list[torch.Tensor]:
        return [*self.v_codes, *self.v_scale_min]
