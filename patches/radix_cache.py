"""Hooks on SGLang's RadixCache: keep `EvictableRows` (the rows held by unlocked nodes, per
layer) in step with the tree's own `evictable_size_` bookkeeping, so that the admission check
reads a counter instead of walking the tree (sglang_kvc/evictable_rows.py says why it is exact).

    inc_lock_ref   a node that was unlocked becomes locked     rows off
    dec_lock_ref   a node whose last lock goes becomes unlocked rows on
    insert         a new node starts unlocked                   rows on
    evict          unlocked nodes are freed                     rows off, before the free
Splitting a node moves tokens between two nodes with the same lock count: no change.

And around cache_unfinished_req: a request whose chunk the tree swapped for tokens another
request cached is noted for the engine (`chunk_matching_the_tree`).
"""

from __future__ import annotations

import torch

from sglang_kvc.allocator import compressed_allocator_of


def _counter(tree):
    allocator = compressed_allocator_of(tree)
    return allocator.evictable_rows if allocator is not None and not tree.disable else None


def _values_on_path(tree, node, lock_ref: int) -> torch.Tensor | None:
    """Token ids of the nodes from `node` up to the root whose lock count is `lock_ref`."""
    values = []
    while node is not None and node is not tree.root_node:
        if node.lock_ref == lock_ref and len(node.value):
            values.append(node.value)
        node = node.parent
    return torch.cat(values) if values else None


def lock_takes_rows_off(original, tree, node, *args, **kwargs):
    """AROUND RadixCache.inc_lock_ref."""
    counter = _counter(tree)
    if counter is not None:
        locking = _values_on_path(tree, node, lock_ref=0)
        if locking is not None:
            counter.remove(locking)
    return original(tree, node, *args, **kwargs)


def unlock_puts_rows_on(original, tree, node, *args, **kwargs):
    """AROUND RadixCache.dec_lock_ref."""
    counter = _counter(tree)
    unlocking = _values_on_path(tree, node, lock_ref=1) if counter is not None else None
    result = original(tree, node, *args, **kwargs)
    if unlocking is not None:
        counter.add(unlocking)
    return result


def new_node_puts_rows_on(original, tree, *args, **kwargs):
    """AROUND RadixCache.insert: a node it creates is unlocked (it adds the node's tokens to
    `evictable_size_`) and is the one it returns."""
    counter = _counter(tree)
    before = tree.evictable_size_
    result = original(tree, *args, **kwargs)
    if counter is not None and tree.evictable_size_ > before:
        counter.add(result.last_device_node.value)
    return result


def chunk_matching_the_tree(original, tree, req, *args, **kwargs):
    """AROUND RadixCache.cache_unfinished_req. When another request cached the same content
    first (two identical prompts admitted together, one of them chunked), the radix cache
    frees the request's own tokens for the chunk and gives it the tree's, which the other
    request may have compressed already or may compress later: note the request, so that the
    engine reads which of its tokens are staged from the staging map instead of assuming
    all of them are (engine.staged_chunks_maybe_shared)."""
    allocator = compressed_allocator_of(tree)
    if allocator is None or tree.disable:
        return original(tree, req, *args, **kwargs)
    freed_before = allocator.segment_tokens_freed
    result = original(tree, req, *args, **kwargs)
    if allocator.segment_tokens_freed != freed_before:
        allocator.pool.chunks_matched_in_tree.add(req.rid)
    return result


def eviction_takes_rows_off(original, tree, *args, **kwargs):
    """AROUND RadixCache.evict: it frees each evicted node with `free_segment`, which takes
    the node's rows off the counter while this is on (the allocator's `evicting_from_tree`).
    Those frees wait for the device (eviction runs for allocations, outside SGLang's free
    groups), so the exact counts cost no further wait: refresh the admission bound with them
    (else it stays low by a row per layer for every evicted token until a later copy lands,
    and admits a fraction of what fits)."""
    allocator = compressed_allocator_of(tree)
    if allocator is None or tree.disable:
        return original(tree, *args, **kwargs)
    with allocator.evicting_from_tree():
        result = original(tree, *args, **kwargs)
    if result.num_tokens_evicted:
        allocator.evictable_rows.refresh()
    return result
