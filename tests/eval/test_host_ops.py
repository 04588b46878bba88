"""eval/host_ops.py: the pool's bookkeeping dispatches a bounded number of torch operators."""

from __future__ import annotations

from pathlib import Path

from eval import host_ops

REPO = Path(__file__).resolve().parents[2]


def test_sealing_does_not_loop_over_the_layers_and_the_decode_windows_seal_reads_nothing_back():
    # Layer by layer, a seal of Qwen2.5-7B's 28 layers dispatched ~2,600 operators (eval/host_ops.py
    # at 6e35bff); all layers at once it is ~130, most of them the torch quantizer's.
    counts = host_ops.measure(REPO / "configs" / "qwen_8x_tuned.yaml", requests=4, window_tokens=2,
                              logical_tokens=4096)
    assert counts["seal"]["operators"] < 300
    assert counts["stage"]["operators"] < 20
    assert counts["free"]["operators"] < 400
    # Finding the staged tokens in the map selects by a mask and deduplicates (a GPU sync each);
    # tokens the decode window knows to be staged need neither, nor does staging a step.
    assert counts["seal"]["device_syncs"] >= 2
    assert counts["seal_known"]["device_syncs"] == 0
    assert counts["seal_released"]["device_syncs"] == 0  # finished requests, from the decode window
    # Requests finishing in one step are sealed together: one seal's operators, not one per request.
    assert counts["seal_released_together"]["device_syncs"] == 0
    assert counts["seal_released_together"]["not_views"] < 0.5 * counts["seal_released"]["not_views"]
    assert counts["seal_released_together"]["not_views"] <= counts["seal_known"]["not_views"] + 20
    assert counts["stage"]["device_syncs"] == 0
    # Frees count their rows on the device and hand them back later (sglang_kvc/deferred_frees.py);
    # before 2026-11-30 a free read the counts back at once (5 syncing calls).
    assert counts["free"]["device_syncs"] == 0


def test_a_pass_compresses_every_layer_at_once():
    # A prefill pass scores, selects and places its prompts in every layer at once after the
    # last layer: one prompt's pass outside the scorer is ~230 operators for Qwen2.5-7B's 28
    # layers; layer by layer it was ~111 per layer (~3,100; docs/results/host-ops-prefill-*).
    # Per extra prompt a few operators per layer remain (its scoring queries, kept per layer).
    config = REPO / "configs" / "qwen_8x_tuned.yaml"
    one, four, eight = (host_ops.launching(host_ops.measure_compress_pass(config, prompts, prompt_len=320, q_heads=8,
                                                                          outside="kvc.score"))
                        for prompts in (1, 4, 8))
    layers = 28
    assert one < 400
    assert (eight - four) / 4 / layers < 5


def test_a_pass_of_fresh_prompts_compresses_without_reading_back():
    # Prompts that started without a prefix hold only their own tokens, all still staged: the
    # candidates are known on the host (before 2026-11-30: a nonzero and a count, 2 syncs).
    config = REPO / "configs" / "qwen_8x_tuned.yaml"
    assert [host_ops.compress_pass_syncs(config, prompts, prompt_len=320, q_heads=8) for prompts in (1, 4)] == [0, 0]
