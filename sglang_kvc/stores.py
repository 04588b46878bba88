"""Physical KV stores (one per tier) and their per-layer row free lists.

A store holds, for every layer, a table of rows; a row holds one token's K and V for
all KV heads of that layer. Row 0 of every table is never handed out: it absorbs the
writes of padded tokens, as slot 0 does in SGLang's own pool. The layers' tables are
views of one allocation per component (`LayerTables`), so work that touches every layer
(sealing the decode window) is one gather or one kernel launch instead of one per layer.

    DenseStore   bf16 rows (staging, and the guard tier at 16 bits)
    PackedStore  packed low-bit codes + fp16 (scale, minimum) per group (see quant.py)

Stores know nothing about logical token ids; `pool.CompressedKVPool` maps those to
(tier, row) per layer.
"""

from __future__ import annotations

import itertools

import torch

from sglang_kvc.quant import PackedFormat, dequantize, quantize
from sglang_kvc.runtime import triton_kernels_enabled


class RowFreeList:
    """Free rows of one table: a stack on the device whose free part, `buffer[top:]`, the host
    tracks by `top`, so neither side needs a device sync. Allocation pops from the top,
    freeing pushes onto it; both move only the rows concerned (a list that is concatenated
    on free copies every free row of a multi-million-row tier each time)."""

    def __init__(self, num_rows: int, device) -> None:
        self.num_rows = num_rows
        self.device = device
        self._stack = torch.empty(num_rows, dtype=torch.int64, device=device)
        self.clear()

    def clear(self) -> None:
        torch.arange(1, self.num_rows + 1, out=self._stack)  # a fresh list hands out 1, 2, 3, ...
        self._top = 0

    def available(self) -> int:
        return self.num_rows - self._top

    @property
    def free_rows(self) -> torch.Tensor:
        """The free rows (a view; for checks)."""
        return self._stack[self._top :]

    @property
    def buffer(self) -> torch.Tensor:
        """The whole allocation (for byte counts)."""
        return self._stack

    def alloc(self, count: int, copy: bool = True) -> torch.Tensor:
        """`count` free rows as a new tensor; with `copy=False` a view of the stack, valid
        until the next `free` on this list writes over it (for a caller that hands it to a
        device op at once: that op, queued first, reads it first)."""
        if count > self.available():
            raise RuntimeError(f"row free list exhausted: asked {count}, have {self.available()}")
        rows = self._stack[self._top : self._top + count]
        self._top += count
        return rows.clone() if copy else rows

    def free(self, rows: torch.Tensor) -> None:
        count = rows.numel()
        if count == 0:
            return
        if count > self._top:
            raise RuntimeError(f"row free list overflow: {count} rows freed, {self._top} in use of {self.num_rows}")
        self._top -= count
        self._stack[self._top : self._top + count] = rows.reshape(-1)


class LayerTables:
    """Every layer's table of one component (e.g. the K codes) as views of one flat tensor:
    `layers[l]` is `[rows_l + 1, *row_shape]` and its row r is row `offsets[l] + r` of `flat`."""

    def __init__(self, rows_per_layer: list[int], row_shape: tuple[int, ...], dtype, device):
        sizes = [rows + 1 for rows in rows_per_layer]
        self.flat = torch.zeros((sum(sizes), *row_shape), dtype=dtype, device=device)
        self.layers = list(self.flat.split(sizes))
        self.offsets = torch.tensor([0, *itertools.accumulate(sizes[:-1])], dtype=torch.int64, device=device)

    def flat_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[layers, n] per-layer rows -> the same rows' indices into `flat`."""
        return self.offsets[:, None] + rows.to(torch.int64)


class DenseStore:
    """bf16 rows: `k[layer][row] -> [heads, head_dim]`."""

    def __init__(self, rows_per_layer: list[int], heads: int, head_dim: int, dtype, device):
        self.rows_per_layer = rows_per_layer
        self.dtype = dtype
        self.k_tables = LayerTables(rows_per_layer, (heads, head_dim), dtype, device)
        self.v_tables = LayerTables(rows_per_layer, (heads, head_dim), dtype, device)
        self.k, self.v = self.k_tables.layers, self.v_tables.layers

    @staticmethod
    def bytes_per_row(heads: int, head_dim: int, dtype=torch.bfloat16) -> int:
        return 2 * heads * head_dim * dtype.itemsize

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][rows] = k.to(self.dtype)
        self.v[layer][rows] = v.to(self.dtype)

    def write_slots(self, layer: int, slots: torch.Tensor, slot_rows: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """`write` to rows `slot_rows[slots]`: on the GPU one launch for the lookup and both
        tables (the staging insert of every layer call, kernels/staging.py), else three."""
        if k.is_cuda and triton_kernels_enabled():
            from sglang_kvc.kernels.staging import write_staged

            write_staged(slots, slot_rows, k, v, self.k[layer], self.v[layer])
            return
        self.write(layer, slot_rows[slots], k, v)

    def read(self, layer: int, rows: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read_keys(layer, rows, dtype), self.read_values(layer, rows, dtype)

    def read_keys(self, layer: int, rows: torch.Tensor, dtype) -> torch.Tensor:
        return self.k[layer][rows].to(dtype)

    def read_values(self, layer: int, rows: torch.Tensor, dtype) -> torch.Tensor:
        return self.v[layer][rows].to(dtype)

    def read_layers(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [layers, n, heads, head_dim] in the store's dtype: row rows[l, i] of every
        layer l, in one gather each."""
        index = self.k_tables.flat_rows(rows)
        return self.k_tables.flat[index], self.v_tables.flat[index]

    def read_keys_layers(self, layers: range, rows: torch.Tensor) -> torch.Tensor:
        """K [len(layers), n, heads, head_dim] as stored: row rows[i] of each of `layers`."""
        return self.k_tables.flat[self.k_tables.offsets[layers.start : layers.stop, None] + rows.to(torch.int64)]

    def read_values_at(self, layers: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """V [n, heads, head_dim] as stored: row rows[i] of layer layers[i], one gather."""
        return self.v_tables.flat[self.v_tables.offsets[layers] + rows]

    def write_at(self, layers: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` of token i to row rows[i] of layer layers[i], any mix of layers in one
        scatter per K and V."""
        index = self.k_tables.offsets[layers] + rows
        self.k_tables.flat[index] = k.to(self.dtype)
        self.v_tables.flat[index] = v.to(self.dtype)

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

        def tables(fmt: PackedFormat) -> tuple[LayerTables, LayerTables]:
            return (LayerTables(rows_per_layer, (heads, fmt.words), torch.int32, device),
                    LayerTables(rows_per_layer, (heads, fmt.groups, 2), torch.float16, device))

        self.k_code_tables, self.k_scale_min_tables = tables(key_format)
        self.v_code_tables, self.v_scale_min_tables = tables(value_format)
        self.k_codes, self.k_scale_min = self.k_code_tables.layers, self.k_scale_min_tables.layers
        self.v_codes, self.v_scale_min = self.v_code_tables.layers, self.v_scale_min_tables.layers

    @staticmethod
    def bytes_per_row(heads: int, key_format: PackedFormat, value_format: PackedFormat) -> int:
        return heads * (key_format.bytes_per_head() + value_format.bytes_per_head())

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self._quantize_into((self.k_codes[layer], self.k_scale_min[layer], self.v_codes[layer],
                             self.v_scale_min[layer]), rows, k, v)

    def write_layers(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` for every layer at once: token i of layer l ([layers, n] `rows`, K and V
        [layers, n, heads, head_dim]) goes to row rows[l, i] of layer l; one quantize launch
        per K and V on the GPU."""
        tables = (self.k_code_tables.flat, self.k_scale_min_tables.flat, self.v_code_tables.flat,
                  self.v_scale_min_tables.flat)
        self._quantize_into(tables, self.k_code_tables.flat_rows(rows).flatten(), k.flatten(0, 1), v.flatten(0, 1))

    def write_at(self, layers: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` of token i to row rows[i] of layer layers[i], any mix of layers in one
        quantize launch per K and V on the GPU."""
        tables = (self.k_code_tables.flat, self.k_scale_min_tables.flat, self.v_code_tables.flat,
                  self.v_scale_min_tables.flat)
        self._quantize_into(tables, self.k_code_tables.offsets[layers] + rows.to(torch.int64), k, v)

    def _quantize_into(self, tables: tuple[torch.Tensor, ...], rows: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> None:
        """K and V [n, heads, head_dim] quantized into rows `rows` of `tables` (K codes, K pairs,
        V codes, V pairs): one layer's views or the flat all-layer tables."""
        k_codes, k_pairs, v_codes, v_pairs = tables
        if k.is_cuda and triton_kernels_enabled():
            # One fused launch per K / V, bit-exact with the torch path below (tested in
            # tests/kernels); imported here so CPU-only users never import Triton.
            from sglang_kvc.kernels.quantize import quantize_into

            quantize_into(k, rows, k_codes, k_pairs, self.key_format)
            quantize_into(v, rows, v_codes, v_pairs, self.value_format)
            return
        k_codes[rows], k_pairs[rows] = quantize(k, self.key_format)
        v_codes[rows], v_pairs[rows] = quantize(v, self.value_format)

    def read(self, layer: int, rows: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k = dequantize(self.k_codes[layer][rows], self.k_scale_min[layer][rows], self.key_format, dtype)
        v = dequantize(self.v_codes[layer][rows], self.v_scale_min[layer][rows], self.value_format, dtype)
        return k, v

    def key_tensors(self) -> list[torch.Tensor]:
        return [*self.k_codes, *self.k_scale_min]

    def value_tensors(self) -> list[torch.Tensor]:
        return [*self.v_codes, *self.v_scale_min]
