"""SGLang attention backend for the compressed pool.

It subclasses SGLang's Triton backend (so server_args logic keyed on "triton", buffer
shapes and the backend contract stay as SGLang expects) and replaces the metadata and
the two forward paths: K/V go to the pool's staging tier, attention reads every tier
through the location map (engine.CompressedAttention), and prompts are compressed when
their prefill completes.

Decode runs in SGLang's CUDA graphs when the engine takes the Triton path: SGLang's
three-method graph contract maps onto the engine as
    init_cuda_graph_state            nothing to allocate (entry arrays live in the graph pool)
    init_forward_metadata_out_graph  capture: engine.capture_decode on the static buffers;
                                     replay: engine.prepare_replay (host bookkeeping)
    init_forward_metadata_in_graph   nothing (the entry lists are built per layer, in the graph)
Prefill stays eager (server_args keeps the prefill graph off).
"""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from sglang_kvc.engine import BatchInfo, CompressedAttention
from sglang_kvc.pool import CompressedKVPool

logger = logging.getLogger(__name__)

class ExtendRequests:
    """For each request of the next EXTEND pass: does it finish the request's prompt, and
    its request slot on the host.

    Published by the ForwardBatch.init_new hook (patches.scheduler), which still sees the
    ScheduleBatch and its `chunked_req`; read by `init_forward_metadata`. They travel keyed
    by request id because SGLang's runners copy the ForwardBatch into static buffers before
    the backend sees it, dropping any attribute added to it; the ForwardBatch has the slots
    only on the device (reading them back would be a host sync per pass).
    """

    def __init__(self) -> None:
        self._by_rid: dict[str, tuple[bool, int]] = {}

    def publish(self, rids: list[str], last_chunk: list[bool], slots: list[int]) -> None:
        self._by_rid = dict(zip(rids, zip(last_chunk, slots)))

    def lookup(self, rids: list[str] | None) -> tuple[list[bool], list[int]] | None:
        """(last-chunk flags, slots) in the order of `rids`, or None if any is unknown."""
        if not rids or any(rid not in self._by_rid for rid in rids):
            return None
        flags, slots = zip(*(self._by_rid[rid] for rid in rids))
        return list(flags), list(slots)


EXTEND_REQUESTS = ExtendRequests()


class DecodeRequests:
    """For the next DECODE pass: its requests' slots and sequence lengths on the host.

    Published by the same ForwardBatch.init_new hook; read by the pass's metadata (eager) or
    the graph replay's preparation, whose ForwardBatch holds them only on the device (reading
    them back would be a host sync per step). Taken once; a pass of another size, or other
    request ids where the caller has them, gets None (the caller then reads the device)."""

    def __init__(self) -> None:
        self._published: tuple[list[str], list[int], list[int]] | None = None

    def publish(self, rids: list[str], slots: list[int], seq_lens: list[int]) -> None:
        self._published = (rids, slots, seq_lens)

    def take(self, batch_size: int, rids: list[str] | None = None) -> tuple[list[int], list[int]] | None:
        published, self._published = self._published, None
        if published is None or len(published[1]) != batch_size:
            return None
        if rids and list(rids[:batch_size]) != published[0]:
            return None
        return published[1], published[2]


DECODE_REQUESTS = DecodeRequests()


class CompressedAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner, skip_prefill: bool = False, kv_indptr_buf=None):
        super().__init__(model_runner, skip_prefill, kv_indptr_buf)
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, CompressedKVPool):
            raise TypeError(f"CompressedAttnBackend needs a CompressedKVPool, got {type(pool).__name__}")
        self.engine = CompressedAttention(pool, model_runner.req_to_token_pool.req_to_token)
        # Queries arrive in the model's dtype, num_head heads per token.
        self.engine.warm_up_kernels(model_runner.model_config.dtype, self.num_head)
        self._warned_missing_flags = False

    # ---- metadata -------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            return
        if mode.is_mixed() or mode.is_target_verify() or mode.is_draft_extend_v2():
            raise NotImplementedError(f"--kv-compress does not support forward mode {mode.name}")
        last_chunk = slots = None
        if mode.is_decode():
            published = DECODE_REQUESTS.take(forward_batch.batch_size, forward_batch.rids)
            slots = published[0] if published is not None else None
        else:
            published = EXTEND_REQUESTS.lookup(forward_batch.rids)
            if published is not None:
                last_chunk, slots = published
            elif not self._warned_missing_flags:
                # A forward SGLang runs without a ScheduleBatch (e.g. a warm-up pass):
                # treat its prompts as complete.
                logger.info("kv-compress: an extend pass without last-chunk flags; compressing its prompts")
                self._warned_missing_flags = True
        batch = BatchInfo.from_forward_batch(forward_batch, last_chunk, slots)
        self.engine.begin(batch, forward_batch.out_cache_loc)

    # ---- CUDA graphs (decode) ----------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None, cuda_graph_num_kv_splits_buf=None):
        """Nothing to allocate: each captured pass allocates its entry arrays and split-K
        partials from the graph's memory pool while it is recorded."""
        if self.engine.attention_impl != "triton":
            raise RuntimeError(
                "--kv-compress decodes in CUDA graphs only on its Triton path "
                f"(this server runs {self.engine.attention_impl!r}); pass --disable-cuda-graph"
            )

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            raise NotImplementedError(f"--kv-compress captures decode graphs only, not {mode.name}")
        if in_capture:
            self.engine.capture_decode(forward_batch.req_pool_indices, forward_batch.seq_lens, self.max_context_len)
            return
        # A replay view: its tensors are the static buffers padded to the graph's batch
        # size; out_cache_loc is the real batch's (padded slots are 0 in the graph's copy).
        real = forward_batch.batch_size - getattr(forward_batch, "num_padding", 0)
        # SGLang's replay view (build_replay_fb_view) carries no request ids: the batch size decides.
        self.engine.prepare_replay(
            forward_batch.req_pool_indices[:real], forward_batch.seq_lens[:real], forward_batch.out_cache_loc,
            DECODE_REQUESTS.take(real, getattr(forward_batch, "rids", None)),
        )

    def init_forward_metadata_in_graph(self, forward_batch):
        pass

    # ---- forward ---------------------------------------------------------------------------
    def _check_supported(self, layer, sinks, score_mod):
        if sinks is not None or score_mod is not None:
            raise NotImplementedError("--kv-compress does not support attention sinks or score_mod")
        if getattr(layer, "sliding_window_size", -1) not in (-1, None):
            raise NotImplementedError("--kv-compress does not support sliding-window layers")

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, score_mod=None, aux_tensors=None):
        def extend(layer_id, q3, scaling, logit_cap):
            # The new tokens' K/V as just staged, so the extend kernel need not read them back.
            return self.engine.extend(layer_id, q3, scaling, logit_cap, new_kv=(k, v) if save_kv_cache else None)

        return self._forward(extend, q, k, v, layer, forward_batch, save_kv_cache, sinks, score_mod)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, score_mod=None, aux_tensors=None):
        return self._forward(self.engine.decode, q, k, v, layer, forward_batch, save_kv_cache, sinks, score_mod)

    def _forward(self, attend, q, k, v, layer, forward_batch, save_kv_cache, sinks, score_mod):
        """Write the new K/V to staging, then attend over everything the layer holds."""
        self._check_supported(layer, sinks, score_mod)
        if save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = attend(layer.layer_id, q3, layer.scaling, layer.logit_cap or 0.0)
        return out.to(q.dtype).reshape(q3.shape[0], layer.tp_q_head_num * layer.v_head_dim)
