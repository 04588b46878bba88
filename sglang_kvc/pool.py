"""The compressed KV pool: SGLang's slot ids stay *logical*, each layer stores tokens in tiers.

SGLang's allocator, `req_to_token` and radix tree keep working on logical token ids,
unchanged, so the radix tree shares compressed prefixes for free. For every layer a
location map says where a logical token lives:

    location[layer, token] = row << 3 | tier      (int32)

    EMPTY     the id holds nothing (free, or not yet written)
    STAGING   bf16 row of the staging tier: prompt tokens until their request's prefill
              completes, decode tokens for `decode_window` steps
    LOWBIT    packed low-bit row (quant.py)
    GUARD     the layer's most important kept tokens, at guard_bits (bf16 by default)
    EVICTED   this layer dropped the token; it costs no row

A staged token is staged in every layer and its staging row (`staging_row[token]`) is
the same in all of them; between two forward passes a token is staged in all layers or
in none. Compression runs layer by layer inside the forward pass (the backend calls
`compress` right after the layer's attention); the staging rows are released after the
last layer. Pyramid budgets give every layer its own row tables and free lists, and an
evicted token returns its rows to them: that is where the memory saving comes from.

Accounting (what `CompressedTokenAllocator.available_size` reports): a staged token
will need at most one row in every layer once it is placed, so the headroom in logical
tokens is `min over layers(free low-bit + free guard rows) - staged tokens`.
"""

from __future__ import annotations

import enum
import logging

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from sglang_kvc.deferred_frees import DeferredFrees
from sglang_kvc.planner import KVPlan, PoolSizes
from sglang_kvc.policy import Selection
from sglang_kvc.quant import hadamard_matrix
from sglang_kvc.stores import DenseStore, PackedStore, RowFreeList

logger = logging.getLogger(__name__)

TIER_BITS = 3
TIER_MASK = (1 << TIER_BITS) - 1


class Tier(enum.IntEnum):
    EMPTY = 0
    STAGING = 1
    LOWBIT = 2
    GUARD = 3
    EVICTED = 4


def encode_location(tier: Tier, rows: torch.Tensor) -> torch.Tensor:
    return ((rows.to(torch.int64) << TIER_BITS) | int(tier)).to(torch.int32)


def tier_of(location: torch.Tensor) -> torch.Tensor:
    return location & TIER_MASK


def row_of(location: torch.Tensor) -> torch.Tensor:
    return (location >> TIER_BITS).to(torch.int64)


class PoolInvariantError(AssertionError):
    pass


class CompressedKVPool(MHATokenToKVPool):
    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool = False,
        *,
        plan: KVPlan,
        sizes: PoolSizes,
        start_layer: int | None = None,
        end_layer: int | None = None,
        **unsupported,
    ):
        if page_size != 1:
            raise ValueError(f"--kv-compress supports page_size 1 only, got {page_size}")
        if head_num != plan.shape.kv_heads or head_dim != plan.shape.head_dim:
            raise ValueError(
                f"pool shape (kv heads {head_num}, head_dim {head_dim}) does not match the "
                f"plan ({plan.shape.kv_heads}, {plan.shape.head_dim})"
            )
        if sizes.logical_tokens != size:
            raise ValueError(f"pool size {size} != planned logical tokens {sizes.logical_tokens}")
        self.plan = plan
        self.config = plan.config
        self.sizes = sizes
        # Set by the engine's `decode_window.DecodeWindow`: what the host knows of each request
        # slot's staged decode tokens (the scheduler's release hook reaches it through the pool).
        self.decode_window = None
        # Set by the allocator's `evictable_rows.EvictableRows`, whose noted tokens must be
        # counted before compression changes how many rows a token holds (`_rows_will_change`).
        self.evictable_rows = None
        # Requests in prefill whose cached chunk the radix cache swapped for tokens another
        # request had cached (patches.radix_cache); the engine reads and clears it each pass.
        self.chunks_matched_in_tree: set[str] = set()
        # The stock constructor calls _create_buffers(), which builds our tiers.
        super().__init__(
            size,
            page_size,
            dtype,
            head_num,
            head_dim,
            layer_num,
            device,
            enable_memory_saver,
            start_layer=start_layer,
            end_layer=end_layer,
            enable_alt_stream=False,
            enable_kv_cache_copy=False,
        )

    # ---- construction --------------------------------------------------------------------
    def _create_buffers(self):
        sizes, plan, dev = self.sizes, self.plan, self.device
        heads, dim = self.head_num, self.head_dim
        self.staging = DenseStore([sizes.staging_rows] * self.layer_num, heads, dim, self.dtype, dev)
        self.staging_free = RowFreeList(sizes.staging_rows, dev)
        self.lowbit = PackedStore(list(sizes.lowbit_rows), heads, plan.key_format, plan.value_format, dev)
        self.lowbit_free = [RowFreeList(r, dev) for r in sizes.lowbit_rows]
        if plan.guard_format is None:
            self.guard = DenseStore(list(sizes.guard_rows), heads, dim, torch.bfloat16, dev)
        else:
            self.guard = PackedStore(list(sizes.guard_rows), heads, plan.guard_format, plan.guard_format, dev)
        self.guard_free = [RowFreeList(r, dev) for r in sizes.guard_rows]
        self.stores = {Tier.STAGING: self.staging, Tier.LOWBIT: self.lowbit, Tier.GUARD: self.guard}

        self.location = torch.zeros((self.layer_num, self.size + 1), dtype=torch.int32, device=dev)
        self.staging_row = torch.zeros(self.size + 1, dtype=torch.int64, device=dev)
        self.staged_count = 0
        self.deferred_frees = DeferredFrees()
        self.rotation = (
            hadamard_matrix(dim, dev)
            if self.config.quantization.key_transform == "hadamard"
            else None
        )
        # Only for shape introspection by SGLang (TritonAttnBackend reads v_head_dim off
        # get_value_buffer(0)); nothing may index these by logical token id.
        self.k_buffer, self.v_buffer = self.staging.k, self.staging.v
        self.k_scale_buffer = self.v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        self._kv_buffer_descs = []

    def get_kv_size_bytes(self):
        """(key-side, value-side) bytes; maps and free lists are counted on the key side."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        stores = self.stores.values()
        key = nbytes([t for s in stores for t in s.key_tensors()])
        key += nbytes([self.location, self.staging_row])
        key += nbytes([f.buffer for f in (self.staging_free, *self.lowbit_free, *self.guard_free)])
        value = nbytes([t for s in stores for t in s.value_tensors()])
        return key, value

    def clear_state(self) -> None:
        """Forget every token (SGLang's flush_cache clears the allocator, which calls this)."""
        self.location.zero_()
        self.staging_row.zero_()
        self.staged_count = 0
        self.deferred_frees.clear()
        self.staging_free.clear()
        for free_list in self.lowbit_free + self.guard_free:
            free_list.clear()

    # ---- key transform ---------------------------------------------------------------------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the key transform to keys (on write) or queries (on read)."""
        if self.rotation is None:
            return x
        return (x.float() @ self.rotation).to(x.dtype)

    # ---- writes ------------------------------------------------------------------------------
    def set_kv_buffer(
        self,
        layer,
        loc_info,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale=None,
        v_scale=None,
        layer_id_override=None,
        dcp_kv_mask=None,
    ):
        """Write new tokens' K/V to their staging rows, which `stage` gave them before the
        pass. Only device ops with the shapes of `loc`: this runs inside SGLang's captured
        decode graph (padded slots are id 0, whose staging row 0 absorbs the write)."""
        if k_scale is not None or v_scale is not None or dcp_kv_mask is not None:
            raise NotImplementedError("--kv-compress does not take KV scales or DCP masks")
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        self.staging.write_slots(layer_id - self.start_layer, loc, self.staging_row, self.rotate(cache_k), cache_v)

    def stage(self, tokens: torch.Tensor) -> None:
        """Give a forward pass's new tokens a staging row (the same in every layer), before
        the pass: the allocation is host bookkeeping, so it cannot run inside a CUDA graph."""
        count = tokens.numel()
        if count > self.staging_free.available():
            self.return_freed_rows(wait=True)  # rows of freed staged tokens may be pending
        if count > self.staging_free.available():
            raise RuntimeError(
                f"kv-compress staging tier exhausted ({count} new tokens, "
                f"{self.staging_free.available()} free rows); it is sized from "
                f"--chunked-prefill-size and --max-running-requests"
            )
        rows = self.staging_free.alloc(count)
        self.staging_row[tokens] = rows
        self.location[:, tokens] = encode_location(Tier.STAGING, rows)
        self.staged_count += count

    # ---- reads -------------------------------------------------------------------------------
    def gather(self, layer: int, tokens: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized (rotated) K, V of `tokens` in `layer` and a mask of those the layer
        holds (evicted and empty ids read as zeros and are masked out)."""
        location = self.location[layer, tokens]
        tiers, rows = tier_of(location), row_of(location)
        shape = (tokens.numel(), self.head_num, self.head_dim)
        k = torch.zeros(shape, dtype=dtype, device=tokens.device)
        v = torch.zeros(shape, dtype=dtype, device=tokens.device)
        for tier, store in self.stores.items():
            where = (tiers == tier).nonzero().squeeze(1)
            if where.numel():
                k[where], v[where] = store.read(layer, rows[where], dtype)
        held = (tiers == Tier.STAGING) | (tiers == Tier.LOWBIT) | (tiers == Tier.GUARD)
        return k, v, held

    def staged_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.staging_row[tokens] > 0

    # ---- compression ---------------------------------------------------------------------------
    def compress(self, layer: int, tokens: torch.Tensor, selection: Selection, keys: torch.Tensor | None = None) -> None:
        """Place the selected staged `tokens` of one layer in the guard / low-bit tiers and
        mark the rest evicted. Staging rows stay until `release_staging`. `keys`: their
        staged keys if the caller has read them already (for scoring). K and V are read as
        stored (the tiers' writers convert), and values only for the kept tokens."""
        self._rows_will_change()
        rows = self.staging_row[tokens]
        # Every candidate is marked evicted, then placing the kept ones overwrites theirs (the
        # same stream orders the writes). Selecting the evicted ones instead would need their
        # count on the host, and `map[index] = scalar` copies the scalar from pageable host
        # memory: device syncs in every layer of a prefill (serving-profile-2026-11-29.md).
        self.location[layer].index_fill_(0, tokens.to(torch.int64), int(Tier.EVICTED))
        for kept, tier in ((selection.guarded, Tier.GUARD), (selection.lowbit, Tier.LOWBIT)):
            kept_rows = rows[kept]
            k = keys[kept] if keys is not None else self.staging.read_keys(layer, kept_rows, self.staging.dtype)
            self._place(layer, tokens[kept], k, self.staging.read_values(layer, kept_rows, self.staging.dtype), tier)

    def _rows_will_change(self) -> None:
        """Compression turns staged tokens (a row each, as `rows_held` counts them) into evicted
        ones (none): the admission counter counts its noted tokens first, as they are now."""
        if self.evictable_rows is not None:
            self.evictable_rows.flush()

    def compress_layers(self, layers: range, tokens: torch.Tensor, selection: Selection, keys: torch.Tensor,
                        guarded_per_layer: list[int], lowbit_per_layer: list[int]) -> None:
        """`compress` for several layers at once. The candidates are `tokens` in every layer of
        `layers`, concatenated layer by layer (len(layers) x n); `selection` indexes that
        concatenation with each layer's guarded (and low-bit) tokens together, in layer order,
        `guarded_per_layer[j]` (`lowbit_per_layer[j]`) of them for layers[j]; `keys`: the
        candidates' staged keys in the same order. With room in every layer's tiers the
        placing is one write per tier for all layers (a pass finishing many short prompts
        paid ~40 launches per layer); otherwise layer by layer, spilling as `compress` does."""
        self._rows_will_change()
        count = tokens.numel()
        fits = all(self.guard_free[layer].available() >= guarded and self.lowbit_free[layer].available() >= lowbit
                   for layer, guarded, lowbit in zip(layers, guarded_per_layer, lowbit_per_layer))
        if not fits:
            guard_start, lowbit_start = 0, 0
            for j, layer in enumerate(layers):
                # This layer's items, moved into its own 0..n-1 range (host counts: no sync).
                guarded = selection.guarded[guard_start : guard_start + guarded_per_layer[j]] - j * count
                lowbit = selection.lowbit[lowbit_start : lowbit_start + lowbit_per_layer[j]] - j * count
                guard_start += guarded_per_layer[j]
                lowbit_start += lowbit_per_layer[j]
                layer_selection = Selection(kept=torch.cat((guarded, lowbit)), guarded=guarded, lowbit=lowbit,
                                            scores=selection.scores[j * count : (j + 1) * count])
                self.compress(layer, tokens, layer_selection, keys=keys[j * count : (j + 1) * count])
            return
        layer_ids = torch.arange(layers.start, layers.stop, device=tokens.device)
        self.location[layers.start : layers.stop].index_fill_(1, tokens.to(torch.int64), int(Tier.EVICTED))
        staging_rows = self.staging_row[tokens]
        for picked, tier, per_layer in ((selection.guarded, Tier.GUARD, guarded_per_layer),
                                        (selection.lowbit, Tier.LOWBIT, lowbit_per_layer)):
            if picked.numel() == 0:
                continue
            layer_of, candidate = layer_ids[picked // count], picked % count
            # The free lists' views are read by the cat below, queued before any later free.
            rows = torch.cat([self._free_list(tier, layer).alloc(number, copy=False)
                              for layer, number in zip(layers, per_layer)])
            values = self.staging.read_values_at(layer_of, staging_rows[candidate])
            self.stores[tier].write_at(layer_of, rows, keys[picked], values)
            self.location[layer_of, tokens[candidate]] = encode_location(tier, rows)

    def migrate(self, layer: int, tokens: torch.Tensor) -> None:
        """Move staged tokens (decode tokens leaving the window, sealed tails) to low-bit."""
        k, v = self.staging.read(layer, self.staging_row[tokens], self.staging.dtype)
        self._place(layer, tokens, k, v, Tier.LOWBIT)

    def _place(self, layer: int, tokens, k, v, preferred: Tier) -> None:
        """Write into the preferred tier; what does not fit there goes to the other one
        (the accounting guarantees their free rows together suffice)."""
        other = Tier.LOWBIT if preferred == Tier.GUARD else Tier.GUARD
        start = 0
        for tier in (preferred, other):
            free_list = self._free_list(tier, layer)
            count = min(tokens.numel() - start, free_list.available())
            if count <= 0:
                continue
            rows = free_list.alloc(count)
            part = slice(start, start + count)
            self.stores[tier].write(layer, rows, k[part], v[part])
            self.location[layer, tokens[part]] = encode_location(tier, rows)
            start += count
        if start < tokens.numel():
            raise RuntimeError(
                f"kv-compress layer {layer}: no free rows for {tokens.numel() - start} tokens "
                f"(accounting bug: available_size() should have prevented this)"
            )

    def release_staging(self, tokens: torch.Tensor) -> None:
        """After every layer has placed `tokens`, return their staging rows."""
        self.staging_free.free(self.staging_row[tokens])
        self.staging_row.index_fill_(0, tokens.to(torch.int64), 0)  # a scalar fill, not a host-to-device copy
        self.staged_count -= tokens.numel()

    def seal(self, tokens: torch.Tensor) -> None:
        """Outside a forward pass: quantize whatever of `tokens` is still staged, in every
        layer, and release their staging rows: the last decode tokens of a finished request,
        a prompt whose prefill was aborted (so tokens kept by the radix tree never pin staging
        rows), decode tokens leaving the window of a request the decode window does not know.
        Finding the staged ones reads the map back (a host sync on a GPU)."""
        self.seal_staged(tokens[self.staged_mask(tokens)].unique())

    def seal_staged(self, tokens: torch.Tensor) -> None:
        """`seal` for tokens the caller knows to be staged and distinct: no device read, so no
        host sync (the decode window's seals, `decode_window.DecodeWindow`)."""
        count = tokens.numel()
        if count == 0:
            return
        if all(free_list.available() >= count for free_list in self.lowbit_free):
            self._seal_all_layers(tokens)
        else:  # some layer's low-bit tier is short: place layer by layer, spilling to the guard tier
            for layer in range(self.layer_num):
                self.migrate(layer, tokens)
        self.release_staging(tokens)

    def _seal_all_layers(self, tokens: torch.Tensor) -> None:
        """`migrate` for every layer at once (every layer has the low-bit rows): one gather
        of the staged K/V, one quantize-and-scatter per K and V, one location write. Layer by
        layer this was ~10 launches and their host work per layer, every few decode steps."""
        # One copy of the 28 free-list views (torch.stack), not one per layer.
        rows = torch.stack([free_list.alloc(tokens.numel(), copy=False) for free_list in self.lowbit_free])
        staging_rows = self.staging_row[tokens].expand(self.layer_num, -1)
        k, v = self.staging.read_layers(staging_rows)
        self.lowbit.write_layers(rows, k, v)
        self.location[:, tokens] = encode_location(Tier.LOWBIT, rows)

    # ---- freeing ----------------------------------------------------------------------------------
    def free_tokens(self, tokens: torch.Tensor, wait: bool = False) -> None:
        """Return every row `tokens` hold, in every layer and tier. The map forgets them at
        once (an id may be handed out again right away); the rows go back to their free
        lists when the device has counted them (`deferred_frees`: no host sync here), or
        before returning with `wait` (a caller that needs the rows now, e.g. the radix
        cache evicting until enough are free)."""
        if tokens.numel() == 0:
            return
        tokens = tokens.to(torch.int64)
        # SGLang's padding id 0 holds nothing; it is left out of the counts rather than out
        # of `tokens` (a boolean selection is a host sync).
        real = tokens > 0
        locations = self.location[:, tokens]
        tiers, rows = tier_of(locations), row_of(locations)
        # Every layer's low-bit rows, then its guard rows, first in its row of `ordered`
        # (a stable sort on the tier); the staged tokens' staging rows likewise.
        lowbit, guard = (tiers == Tier.LOWBIT) & real, (tiers == Tier.GUARD) & real
        rank = torch.where(lowbit, 0, torch.where(guard, 1, 2)).to(torch.int8)
        ordered = rows.gather(1, torch.argsort(rank, dim=1, stable=True))
        staging_rows = self.staging_row[tokens]
        staged = (staging_rows > 0) & real
        staging_rows = staging_rows[torch.argsort((~staged).to(torch.int8), stable=True)]
        counts = torch.cat((lowbit.sum(1), guard.sum(1), staged.sum().reshape(1)))
        self.location.index_fill_(1, tokens, int(Tier.EMPTY))
        self.staging_row.index_fill_(0, tokens, 0)
        self.deferred_frees.push(counts, ordered, staging_rows)
        self.return_freed_rows(wait=wait)

    def return_freed_rows(self, wait: bool = False) -> None:
        """Put the rows of frees the device has counted back on their free lists (with
        `wait`, of every pending free, waiting for the device)."""
        layers = self.layer_num
        for freed in self.deferred_frees.completed(wait=wait):
            counts = freed.counts.numpy().tolist()  # a host tensor by now: no device read
            for layer in range(layers):
                lowbit_count, guard_count = counts[layer], counts[layers + layer]
                self.lowbit_free[layer].free(freed.ordered_rows[layer, :lowbit_count])
                self.guard_free[layer].free(freed.ordered_rows[layer, lowbit_count : lowbit_count + guard_count])
            staged_count = counts[2 * layers]
            self.staging_free.free(freed.staging_rows[:staged_count])
            self.staged_count -= staged_count

    # ---- accounting -------------------------------------------------------------------------------
    def _free_list(self, tier: Tier, layer: int) -> RowFreeList:
        return self.lowbit_free[layer] if tier == Tier.LOWBIT else self.guard_free[layer]

    def free_rows(self, layer: int) -> int:
        return self.lowbit_free[layer].available() + self.guard_free[layer].available()

    def headroom_tokens(self) -> int:
        """Logical tokens that can still be admitted: every staged token will take at most
        one row per layer when placed, so it is charged a row in every layer now. Rows of
        frees still being counted on the device are not in it yet (a lower bound)."""
        self.return_freed_rows()
        return min(self.free_rows(layer) for layer in range(self.layer_num)) - self.staged_count

    def row_usage(self) -> float:
        """Fraction of the rows in use, charged as `headroom_tokens` charges them, in the
        layer that limits admission (fewest free rows): 0 when nothing is held, 1 when no
        token can be admitted."""
        tightest = min(range(self.layer_num), key=self.free_rows)
        rows = self.lowbit_free[tightest].num_rows + self.guard_free[tightest].num_rows
        return 1.0 - max(0, self.headroom_tokens()) / rows

    def rows_held(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per layer, rows that freeing `tokens` would return (staged tokens count as the
        row each will take when placed, matching `headroom_tokens`)."""
        tiers = tier_of(self.location[:, tokens])
        return ((tiers != Tier.EMPTY) & (tiers != Tier.EVICTED)).sum(dim=1)

    def check_invariants(self, full: bool = True) -> None:
        """Every row is either free or held by exactly one token; staged tokens are staged in
        all layers; counters match the maps. `full=False` skips the per-row uniqueness sort
        (the scheduler's idle check). Works one layer at a time, so its temporaries stay
        small next to the pool. Raises PoolInvariantError."""
        self.return_freed_rows(wait=True)
        problems = []
        staged_tokens = (self.staging_row > 0).nonzero().squeeze(1)
        if int(staged_tokens.numel()) != self.staged_count:
            problems.append(f"staged_count {self.staged_count} != staged tokens {staged_tokens.numel()}")
        if self.staging_free.available() + self.staged_count != self.staging_free.num_rows:
            problems.append("staging rows leaked or double freed")
        for layer in range(self.layer_num):
            tiers = tier_of(self.location[layer])
            staged_here = int((tiers == Tier.STAGING).sum())
            if staged_here != self.staged_count:
                problems.append(f"layer {layer}: {staged_here} tokens staged, expected {self.staged_count}")
            if staged_tokens.numel():
                where = self.location[layer, staged_tokens]
                if not bool((tier_of(where) == Tier.STAGING).all()) or not bool(
                    (row_of(where) == self.staging_row[staged_tokens]).all()
                ):
                    problems.append(f"layer {layer}: a staged token is not in its staging row")
            for tier, free_list in ((Tier.LOWBIT, self.lowbit_free[layer]), (Tier.GUARD, self.guard_free[layer])):
                held = int((tiers == tier).sum())
                if held + free_list.available() != free_list.num_rows:
                    problems.append(
                        f"layer {layer} {tier.name}: {held} held + {free_list.available()} free "
                        f"!= {free_list.num_rows} rows"
                    )
                elif full and free_list.num_rows:
                    rows = row_of(self.location[layer][tiers == tier])
                    every_row = torch.sort(torch.cat((rows, free_list.free_rows))).values
                    if not torch.equal(every_row, torch.arange(1, free_list.num_rows + 1, device=rows.device)):
                        problems.append(f"layer {layer} {tier.name}: a row is held twice or lost")
            del tiers
        if problems:
            raise PoolInvariantError("; ".join(problems))

    # ---- unsupported stock paths ---------------------------------------------------------------
    def _unsupported(self, what: str):
        raise NotImplementedError(f"{what} is not supported with --kv-compress")

    def get_cpu_copy(self, indices, mamba_indices=None):
        self._unsupported("CPU offload of the KV cache")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        self._unsupported("CPU offload of the KV cache")

    def get_contiguous_buf_infos(self):
        self._unsupported("PD disaggregation")

    def move_kv_cache(self, *args, **kwargs):
        self._unsupported("speculative decoding")
