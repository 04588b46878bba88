"""The sglang-kvc compression policy inside a Hugging Face transformers forward pass.

A reference path for quality tests on the CPU and a cross-check of the SGLang path
(`engine.py` + `pool.py`): the same scorer, selection and quantizer, applied to a
transformers `Cache`, so any Qwen2/Llama-style model can run

    cache = CompressedCache(config, model)
    model.generate(input_ids, past_key_values=cache, do_sample=False, max_new_tokens=32)

or `generate_with_cache(model, ids, config, max_new_tokens)` (prefill + greedy decode).

What happens, as in SGLang:
  * the prompt's forward attends to every prompt token (bf16, like SGLang's staging tier);
  * right after it, each layer scores the prompt with its last `observation_window`
    queries (`ObservationWindowScorer`; with `sparsity.scoring: context`, with at most
    2W queries sampled across the prompt, `ContextScorer` and `context_queries.py`),
    keeps `config.layer_budget(retain_l, N)` tokens
    (`select_tokens`: sinks and recent window forced in), stores the `guard_count` best
    at guard precision and the rest through the low-bit quantizer; evicted tokens are
    dropped from the layer's tensors. Kept keys keep their original RoPE (keys are
    cached post-RoPE, as in SGLang), and positions keep counting logical tokens;
  * decode tokens stay bf16 for `decode_window` steps, then go through the low-bit quantizer.

How this maps onto transformers 5.x:
  * Window queries: a forward pre-hook on every attention module recomputes the last W
    queries of the prompt from the hidden states the module receives (its own `q_proj`,
    optional `q_norm`, and its modeling file's `apply_rotary_pos_emb` on the W rows only),
    before the module calls `past_key_values.update`. In context mode it recomputes the
    sampled rows instead (`context_query_positions(0, N, W)`: the prompt is one piece
    here). The hook is installed once per model and does nothing for other caches.
  * Quantization error: the cache stores, in the model dtype, what attention would read
    back from the pool: `H^T . dequant(quant(H . k))` for keys under the Hadamard transform
    (H is orthonormal and symmetric), `dequant(quant(v))` for values. Attention then needs
    no change; SGLang computes `(H q) . dequant(...)` in fp32 instead, which is the same
    product up to the model dtype's rounding of the stored keys.
  * Eviction makes layers hold different numbers of keys; a decode step (one query)
    may see every key its layer holds, so the cache reports a one-key mask that
    broadcasts over any layer's length (see `CompressedLayer.get_mask_sizes`).

A later request on a cached (compressed) prefix, as the radix cache serves it:
`prefill_cache(model, prefix_ids, config)` then `answer_after_prefix(model, cache, rest_ids, n)`
(the rest goes in one token per forward, on a copy of the cache).

Limits: batch size 1; a prompt arrives in one forward pass (no chunked prefill, no
second multi-token extend after compression); full-attention layers only.
"""

from __future__ import annotations

import copy
import enum
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from sglang_kvc.config import CompressionConfig
from sglang_kvc.context_queries import context_query_positions
from sglang_kvc.planner import FREE_LIST_ENTRY_BYTES, LOCATION_BYTES, KVPlan, ModelShape, plan_for
from sglang_kvc.policy import TokenScorer, scorer_from_config, select_for_layer
from sglang_kvc.quant import PackedFormat, dequantize, hadamard_matrix, quantize

# The pool stores every bf16 tier (staging, guard at 16 bits) as bfloat16, whatever the
# model computes in; SGLang serves these models in bf16.
POOL_DTYPE = torch.bfloat16


class TokenTier(enum.IntEnum):
    """Where the SGLang pool would hold a kept token (same values as `pool.Tier`, which
    is not imported here because it pulls in SGLang)."""

    STAGING = 1
    LOWBIT = 2
    GUARD = 3


def model_shape(model_config) -> ModelShape:
    """The planner's view of a transformers config (its decoder part)."""
    text = model_config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    return ModelShape(
        num_layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        context_len=getattr(text, "max_position_embeddings", 32768),
    )


def _round_to_pool(x: torch.Tensor) -> torch.Tensor:
    """What a bf16 tier holds, in the caller's dtype."""
    return x.to(POOL_DTYPE).to(x.dtype)


def _packed_round_trip(x: torch.Tensor, fmt: PackedFormat) -> torch.Tensor:
    """quant.py's codes and (scale, minimum) for `x`, dequantized: float32."""
    return dequantize(*quantize(x, fmt), fmt)


@dataclass(frozen=True)
class _LayerPolicy:
    """Everything a layer needs to compress, shared by all layers of one cache."""

    config: CompressionConfig
    plan: KVPlan
    scorer: TokenScorer
    key_rotation: torch.Tensor | None  # float32 Hadamard matrix, or None

    def key_readback(self, k: torch.Tensor, fmt: PackedFormat) -> torch.Tensor:
        """Staged keys [..., head_dim] as read back from packed rows of format `fmt`. Under
        the Hadamard transform the pool quantizes the bf16 staging copy of `H . k`; attention
        here reads the result rotated back (H is symmetric and orthonormal: H^T = H)."""
        if self.key_rotation is None:
            return _packed_round_trip(k, fmt).to(k.dtype)
        rotation = self.key_rotation.to(k.device)
        rotated = (k.float() @ rotation).to(POOL_DTYPE)
        return (_packed_round_trip(rotated, fmt) @ rotation).to(k.dtype)

    @staticmethod
    def value_readback(v: torch.Tensor, fmt: PackedFormat) -> torch.Tensor:
        return _packed_round_trip(v, fmt).to(v.dtype)

    def store_guarded(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = self.plan.guard_format
        if fmt is None:  # bf16 guard tier: the staged bf16 values as they are
            return k, v
        return self.key_readback(k, fmt), self.value_readback(v, fmt)

    def store_lowbit(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_readback(k, self.plan.key_format), self.value_readback(v, self.plan.value_format)


class CompressedLayer(CacheLayerMixin):
    """One layer's kept tokens: `keys`/`values` [1, kv_heads, kept, head_dim] as attention
    reads them back from the pool, their original `positions` and `tiers` [kept]."""

    is_sliding = False

    def __init__(self, policy: _LayerPolicy, layer_idx: int, retain_ratio: float):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.retain_ratio = retain_ratio
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.positions = torch.empty(0, dtype=torch.int64)
        self.tiers = torch.empty(0, dtype=torch.int8)
        self.seen_tokens = 0  # logical tokens: prompt + decode, evicted ones included
        self.window_queries: torch.Tensor | None = None  # set by the pre-hook for the prompt
        self.window_positions: range | None = None  # their prompt positions (set with them)
        self.prompt_scores: torch.Tensor | None = None  # kept for inspection and cross-checks

    @property
    def awaiting_prompt(self) -> bool:
        return self.seen_tokens == 0

    # ---- CacheLayerMixin --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.positions = self.positions.to(self.device)
        self.tiers = self.tiers.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise NotImplementedError(
                f"CompressedCache holds one sequence (batch size 1), got batch {key_states.shape[0]}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = _round_to_pool(key_states), _round_to_pool(value_states)
        if self.awaiting_prompt:
            # The prompt's own forward attends to all of it; the layer keeps its selection.
            self._compress_prompt(keys, values)
            return keys, values
        if key_states.shape[-2] != 1:
            raise NotImplementedError(
                "CompressedCache takes one token per forward after the prompt (greedy decode); "
                f"got {key_states.shape[-2]} tokens"
            )
        return self._append_decode_token(keys, values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.awaiting_prompt:
            return query_length, 0
        # One decode query sees every key its layer holds, and layers hold different
        # numbers of keys: a one-key mask at the query's own position allows everything
        # and broadcasts over any layer's length (eager adds it, sdpa skips it).
        return 1, self.seen_tokens

    def get_seq_length(self) -> int:
        """Logical length (what positions count), not the number of kept keys."""
        return self.seen_tokens

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("CompressedCache cannot be cropped, reordered or batch-expanded")

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported

    # ---- compression -------------------------------------------------------------------------
    def _compress_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.window_queries is None:
            raise RuntimeError(
                f"layer {self.layer_idx}: no scoring queries were captured; build "
                f"the cache with the model that runs it: CompressedCache(config, model)"
            )
        policy = self.policy
        num_tokens = keys.shape[-2]
        positions = torch.arange(num_tokens, device=keys.device)
        window_q = self.window_queries[0].transpose(0, 1)  # [W, q_heads, head_dim]
        span = self.window_positions  # a range: the last W positions, or the sampled ones
        window_positions = positions[span.start : span.stop : span.step]
        self.window_queries = self.window_positions = None
        token_keys = keys[0].transpose(0, 1)  # [N, kv_heads, head_dim]
        token_values = values[0].transpose(0, 1)
        selection = select_for_layer(
            policy.config, policy.scorer, self.retain_ratio, window_q, window_positions, token_keys, positions, num_tokens
        )
        guard_k, guard_v = policy.store_guarded(token_keys[selection.guarded], token_values[selection.guarded])
        low_k, low_v = policy.store_lowbit(token_keys[selection.lowbit], token_values[selection.lowbit])
        kept = torch.cat((selection.guarded, selection.lowbit))
        order = torch.argsort(kept)  # position order, for readability; attention does not care
        tiers = torch.cat(
            (
                torch.full_like(selection.guarded, TokenTier.GUARD, dtype=torch.int8),
                torch.full_like(selection.lowbit, TokenTier.LOWBIT, dtype=torch.int8),
            )
        )
        self.positions = kept[order]
        self.tiers = tiers[order]
        self.keys = torch.cat((guard_k, low_k))[order].transpose(0, 1).unsqueeze(0)
        self.values = torch.cat((guard_v, low_v))[order].transpose(0, 1).unsqueeze(0)
        self.prompt_scores = selection.scores
        self.seen_tokens = num_tokens

    def _append_decode_token(self, key: torch.Tensor, value: torch.Tensor):
        position = self.seen_tokens
        keys = torch.cat((self.keys, key), dim=-2)
        values = torch.cat((self.values, value), dim=-2)
        self.positions = torch.cat((self.positions, torch.tensor([position], device=self.device)))
        self.tiers = torch.cat((self.tiers, torch.tensor([TokenTier.STAGING], dtype=torch.int8, device=self.device)))
        self.seen_tokens += 1
        # As in SGLang, after this step's attention the token `decode_window` steps old
        # leaves staging (with decode_window 0, the new token itself).
        leaving = (self.tiers == TokenTier.STAGING) & (
            self.positions <= position - self.policy.config.quantization.decode_window
        )
        stored_keys, stored_values = keys, values
        if bool(leaving.any()):
            rows = leaving.nonzero().squeeze(1)
            low_k, low_v = self.policy.store_lowbit(keys[0, :, rows], values[0, :, rows])
            stored_keys, stored_values = keys.clone(), values.clone()
            stored_keys[0, :, rows], stored_values[0, :, rows] = low_k, low_v
            self.tiers[rows] = TokenTier.LOWBIT
        self.keys, self.values = stored_keys, stored_values
        return keys, values

    # ---- inspection ----------------------------------------------------------------------------
    def count(self, tier: TokenTier) -> int:
        return int((self.tiers == tier).sum())


class CompressedCache(Cache):
    """A transformers `Cache` that applies the sglang-kvc policy (see the module docstring).

    `model` supplies the shape (for budgets and byte sizes) and gets the window-query
    hook; the cache then works with `model.generate` or a hand-written decode loop."""

    def __init__(self, config: CompressionConfig, model: torch.nn.Module):
        self.model_shape = model_shape(model.config)
        self.plan = plan_for(config, self.model_shape)  # also checks group size / Hadamard vs head_dim
        self.config = config
        layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"CompressedCache supports full-attention layers only, got {sorted(set(layer_types))}")
        rotation = (
            hadamard_matrix(self.model_shape.head_dim, "cpu")
            if config.quantization.key_transform == "hadamard"
            else None
        )
        policy = _LayerPolicy(config, self.plan, scorer_from_config(config), rotation)
        retain = self.plan.layer_retain_ratios
        super().__init__(layers=[CompressedLayer(policy, i, retain[i]) for i in range(self.model_shape.num_layers)])
        attach_window_query_hooks(model)

    # ---- bytes, in the sglang-kvc pool's terms ---------------------------------------------------
    def kv_byte_breakdown(self) -> dict[str, int]:
        """What these tokens would occupy in the sglang-kvc pool, with the planner's row sizes
        and metadata (`KVPlan.prompt_bytes` for a just-compressed prompt):
        guard and low-bit rows per layer, plus one int64 free-list entry per row; a staged
        (decode) token holds one bf16 staging row spanning all layers, plus its entry; every
        logical token has a location per layer and SGLang's logical free-list slot."""
        plan, layers = self.plan, self.layers
        guard_rows = sum(layer.count(TokenTier.GUARD) for layer in layers)
        lowbit_rows = sum(layer.count(TokenTier.LOWBIT) for layer in layers)
        staged_tokens = layers[0].count(TokenTier.STAGING)  # staged in every layer alike
        logical_tokens = self.get_seq_length()
        breakdown = {
            "guard": guard_rows * plan.guard_row_bytes,
            "lowbit": lowbit_rows * plan.lowbit_row_bytes,
            "staging": staged_tokens * (plan.staging_row_bytes + FREE_LIST_ENTRY_BYTES),
            "metadata": (guard_rows + lowbit_rows) * FREE_LIST_ENTRY_BYTES
            + logical_tokens * (self.model_shape.num_layers * LOCATION_BYTES + FREE_LIST_ENTRY_BYTES),
        }
        breakdown["total"] = sum(breakdown.values())
        return breakdown

    def kv_bytes(self) -> int:
        return self.kv_byte_breakdown()["total"]

    def bf16_kv_bytes(self) -> int:
        """The same logical tokens in a stock bf16 KV pool."""
        return self.get_seq_length() * self.model_shape.bf16_bytes_per_token()

    def kept_tokens(self) -> list[int]:
        return [int(layer.positions.numel()) for layer in self.layers]


# ---- observation-window queries -----------------------------------------------------------------

_HOOK_ATTRIBUTE = "_sglang_kvc_window_hook"


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx") and hasattr(m, "head_dim")]


def attach_window_query_hooks(model: torch.nn.Module) -> None:
    """Install (once) the pre-hook that hands each attention module's prompt scoring
    queries (the last W, or in context mode the sampled ones) to a CompressedCache. It
    returns at once for any other cache."""
    modules = _attention_modules(model)
    if len(modules) != model_shape(model.config).num_layers:
        raise TypeError(
            f"{type(model).__name__}: found {len(modules)} attention modules with q_proj for "
            f"{model_shape(model.config).num_layers} layers; CompressedCache supports "
            f"Qwen2/Llama-style attention"
        )
    for module in modules:
        if getattr(module, _HOOK_ATTRIBUTE, None) is None:
            _rotary_function(module)  # fail now, not in the middle of a forward
            handle = module.register_forward_pre_hook(_capture_window_queries, with_kwargs=True)
            setattr(module, _HOOK_ATTRIBUTE, handle)


def detach_window_query_hooks(model: torch.nn.Module) -> None:
    for module in _attention_modules(model):
        handle = getattr(module, _HOOK_ATTRIBUTE, None)
        if handle is not None:
            handle.remove()
            setattr(module, _HOOK_ATTRIBUTE, None)


def _rotary_function(module: torch.nn.Module):
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise TypeError(
            f"{type(module).__name__}: its modeling file has no apply_rotary_pos_emb; "
            f"CompressedCache supports Qwen2/Llama-style attention"
        )
    return rope


def _capture_window_queries(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache):
        return
    layer = cache.layers[module.layer_idx]
    if not layer.awaiting_prompt:
        return
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
    sparsity = cache.config.sparsity
    num_tokens = hidden.shape[1]
    if sparsity.scoring == "context":
        # The prompt's first forward: hidden row i is position i.
        positions = context_query_positions(0, num_tokens, sparsity.observation_window)
        index = torch.arange(positions.start, positions.stop, positions.step, device=hidden.device)

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(1, index)
    else:
        window = min(sparsity.observation_window, num_tokens)
        positions = range(num_tokens - window, num_tokens)

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x[:, -window:]

    with torch.no_grad():
        # The module's own projection (and q_norm, as in Qwen3) and RoPE, on those rows only.
        rows = pick(hidden)
        queries = module.q_proj(rows).view(*rows.shape[:-1], -1, module.head_dim)
        if getattr(module, "q_norm", None) is not None:
            queries = module.q_norm(queries)
        queries = queries.transpose(1, 2)
        queries, _ = _rotary_function(module)(queries, queries, pick(cos), pick(sin))
    layer.window_queries = queries  # [1, q_heads, W, head_dim]
    layer.window_positions = positions


# ---- prefill + greedy decode ---------------------------------------------------------------------


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens only
    step_logits: torch.Tensor  # [new tokens, vocab] float32: the logits each token was chosen from
    kv_bytes: int  # the KV cache at the end, in the pool it would live in
    bf16_kv_bytes: int  # the same tokens in a stock bf16 pool
    cache: Cache


def _prompt_ids(tokenized_or_ids, device) -> torch.Tensor:
    """[1, T] int64 from token ids (a sequence, [T] or [1, T] tensor) or a tokenizer's output."""
    ids = tokenized_or_ids["input_ids"] if isinstance(tokenized_or_ids, Mapping) else tokenized_or_ids
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor(list(ids) if isinstance(ids, Sequence) else ids, dtype=torch.int64)
    ids = ids.to(device=device, dtype=torch.int64)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"expected the token ids of one non-empty prompt, got shape {tuple(ids.shape)}")
    return ids


def _prefill(model, prompt_ids, config: CompressionConfig | None) -> tuple[Cache, torch.Tensor]:
    """The prompt's forward into a new cache (full with None, else compressed at its end):
    (cache, float32 logits of the prompt's last position)."""
    device = next(model.parameters()).device
    input_ids = _prompt_ids(prompt_ids, device)
    cache: Cache = DynamicCache(config=model.config) if config is None else CompressedCache(config, model)
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
    return cache, logits


def _forward_one(model, cache: Cache, token: int) -> torch.Tensor:
    """One token's forward on `cache`: float32 logits of its position."""
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                 use_cache=True).logits[0, -1].float()


def _decode_greedily(model, cache: Cache, logits: torch.Tensor, max_new_tokens: int,
                     eos_token_id: int | None) -> GenerationResult:
    """Greedy tokens from `logits` (the last prompt position's) on, one forward per token."""
    tokens: list[int] = []
    logits_per_step: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if step:
            logits = _forward_one(model, cache, tokens[-1])
        token = int(torch.argmax(logits))
        tokens.append(token)
        logits_per_step.append(logits.cpu())
        if token == eos_token_id:
            break
    if isinstance(cache, CompressedCache):
        kv, bf16 = cache.kv_bytes(), cache.bf16_kv_bytes()
    else:
        kv = bf16 = cache.get_seq_length() * model_shape(model.config).bf16_bytes_per_token()
    step_logits = torch.stack(logits_per_step) if logits_per_step else torch.empty(0)
    return GenerationResult(tokens, step_logits, kv, bf16, cache)


@torch.no_grad()
def generate_with_cache(
    model,
    tokenizer_or_ids,
    config: CompressionConfig | None,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
) -> GenerationResult:
    """Prefill the prompt, then decode greedily, with a full `DynamicCache` (config None)
    or a `CompressedCache(config)`. `tokenizer_or_ids`: the tokenizer's output for one
    prompt (a mapping with `input_ids`) or the ids themselves. Stops after
    `max_new_tokens` or at `eos_token_id`."""
    cache, logits = _prefill(model, tokenizer_or_ids, config)
    return _decode_greedily(model, cache, logits, max_new_tokens, eos_token_id)


@torch.no_grad()
def prefill_cache(model, prompt_ids, config: CompressionConfig | None) -> Cache:
    """A cache holding `prompt_ids` after their forward pass (compressed at its end with a
    config, full with None), for later requests that continue it: `answer_after_prefix`."""
    return _prefill(model, prompt_ids, config)[0]


@torch.no_grad()
def answer_after_prefix(
    model, prefix_cache: Cache, continuation_ids, max_new_tokens: int, *, eos_token_id: int | None = None
) -> GenerationResult:
    """A later request whose prompt is the cached prefix + `continuation_ids`, as when the radix
    cache serves the prefix: the continuation goes in one token per forward on a copy of
    `prefix_cache` (which stays as it was), then greedy decoding.

    The continuation is not compressed with the prefix (SGLang compresses only a request's
    uncached tokens, and keeps every token of a tail shorter than `min_prompt_len`); here its
    tokens pass through the decode window like decoded tokens, so they stay bf16 for
    `decode_window` steps where SGLang stores them low-bit (or guarded) once its prompt ends."""
    cache = copy.deepcopy(prefix_cache)
    for token in _prompt_ids(continuation_ids, "cpu")[0].tolist():
        logits = _forward_one(model, cache, token)
    return _decode_greedily(model, cache, logits, max_new_tokens, eos_token_id)
