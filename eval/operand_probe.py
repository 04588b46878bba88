"""Probe kernels (compiled, never run): how Triton 3.6 brings a tile of unpacked codes to an mma
operand on sm_90, in the decode kernel's two dot forms, stripped of everything else. Each loop
unpacks a block of packed words and feeds one dot; `eval/compile_kernels.py` compiles them
("operand probe" cases) and counts the loop's shared-memory stores, ldmatrix and barriers: a
round trip through shared memory shows there (docs/kernels.md, "Twenty-eighth session").

ORDER 0 is the kernel's pair order (columns 2s + t of each word: slot s, half t); the keys'
ORDER 1 is lane order (lane q of a quad takes whole words, `_pair_order(LANE_ORDER=True)`), the
values' ORDER 1 natural channel order (16w + 8t + s)."""
import triton
import triton.language as tl

BLOCK = 64  # entries per block of the wgmma probes (the engine's BLOCK_N)
MMA_V2_BLOCK = 32  # entries per block of the mma.sync probe (v4's BLOCK_N)


@triton.jit
def _slot_pairs(words, BITS: tl.constexpr):
    """(words >> BITS * s) & pair mask | fp16 1024 in each half, s = 0 .. slots / 2 - 1, joined
    with the slot's bits last (top bit first)."""
    HALF: tl.constexpr = 16 // BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    tiles = ()
    for slot in tl.static_range(HALF):
        tiles = tiles + (((words >> (slot * BITS)) & MASK) | 0x64006400,)
    LEVELS: tl.constexpr = 3 if HALF == 8 else 2
    for level in tl.static_range(LEVELS):
        joined = ()
        for index in tl.static_range(HALF >> (level + 1)):
            joined = joined + (tl.join(tiles[index], tiles[index + (HALF >> (level + 1))]),)
        tiles = joined
    return tiles[0]


@triton.jit
def key_tile_probe(words_ptr, q_ptr, out_ptr, n_blocks, ORDER: tl.constexpr):
    """logits^T += codes . q (v5's key dot): 4-bit codes, 64 channels = 8 words, the tile wgmma's
    A operand."""
    rows = tl.arange(0, 64)
    q = tl.load(q_ptr + rows[:, None] * 16 + tl.arange(0, 16)[None, :])
    acc = tl.zeros([64, 16], dtype=tl.float32)
    for block in range(n_blocks):
        words = tl.load(words_ptr + block * 512 + rows[:, None] * 8 + tl.arange(0, 8)[None, :])
        if ORDER == 0:
            pairs = _slot_pairs(words, 4)  # [64, 8 words, 2, 2]
        else:
            pairs = tl.permute(_slot_pairs(tl.reshape(words, [64, 4, 2]), 4), (0, 3, 4, 2, 1))
        codes = tl.reshape(tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)), [64, 64])
        acc += tl.dot(codes.to(tl.float16, bitcast=True), q)
    tl.store(out_ptr + rows[:, None] * 16 + tl.arange(0, 16)[None, :], acc)


@triton.jit
def value_tile_probe(words_ptr, p_ptr, out_ptr, n_blocks):
    """acc^T += codes^T . p (v5's value dot): 2-bit codes in pair order, 64 channels = 4 words,
    codes^T wgmma's A operand."""
    rows = tl.arange(0, 64)
    acc = tl.zeros([64, 16], dtype=tl.float32)
    for block in range(n_blocks):
        p = tl.load(p_ptr + block * 1024 + rows[:, None] * 16 + tl.arange(0, 16)[None, :])
        words = tl.load(words_ptr + block * 256 + rows[:, None] * 4 + tl.arange(0, 4)[None, :])
        pairs = _slot_pairs(words, 2)  # [64, 4 words, 2, 2, 2]
        codes = tl.reshape(tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)), [64, 64])
        acc += tl.dot(tl.trans(codes.to(tl.float16, bitcast=True) - 1024.0), p)
    tl.store(out_ptr + rows[:, None] * 16 + tl.arange(0, 16)[None, :], acc)


@triton.jit
def value_tile_mma_v2_probe(words_ptr, p_ptr, out_ptr, n_blocks, ORDER: tl.constexpr):
    """acc += p . codes (v4's value dot, mma.sync): 16 query rows, 32 entries, 2-bit codes of 64
    channels, codes the B operand."""
    entries = tl.arange(0, 32)
    heads = tl.arange(0, 16)
    acc = tl.zeros([16, 64], dtype=tl.float32)
    for block in range(n_blocks):
        p = tl.load(p_ptr + block * 512 + heads[:, None] * 32 + entries[None, :])
        words = tl.load(words_ptr + block * 128 + entries[:, None] * 4 + tl.arange(0, 4)[None, :])
        halves = tl.join(_slot_pairs(words, 2).to(tl.int16), (_slot_pairs(words, 2) >> 16).to(tl.int16))
        if ORDER == 1:
            halves = tl.permute(halves, (0, 1, 5, 2, 3, 4))  # [32, word, half, slot bits]
        codes = tl.reshape(halves, [32, 64]).to(tl.float16, bitcast=True) - 1024.0
        acc += tl.dot(p, codes)
    tl.store(out_ptr + heads[:, None] * 64 + tl.arange(0, 64)[None, :], acc)
