"""eval/host_ops.py: the pool's bookkeeping dispatches a bounded number of torch operators."""

from __future__ import annotations

from pathlib import Path

from eval import host_ops

REPO = Path(__file__).resolve().parents[2]


def test_sealing_does_not_loop_over_the_layers():
    # Layer by layer, a seal of Qwen2.5-7B's 28 layers dispatched ~2,600 operators (eval/host_ops.py
    # at 6e35bff); all layers at once it is ~130, most of them the torch quantizer's.
    counts = host_ops.measure(REPO / "configs" / "qwen_8x_tuned.yaml", requests=4, window_tokens=2,
                              logical_tokens=4096)
    assert counts["seal"]["operators"] < 300
    assert counts["stage"]["operators"] < 20
    assert counts["free"]["operators"] < 400


def test_compressing_more_prompts_in_a_pass_adds_few_operators_outside_scoring():
    # One layer of a prefill pass: scoring is per prompt (each prompt's own queries); keeping,
    # guarding and placing run once for all prompts. A loop of select_tokens was ~15 operators
    # per prompt on top of the scorer's.
    config = REPO / "configs" / "qwen_8x_tuned.yaml"
    four, eight = (host_ops.launching(host_ops.measure_compress_layer(config, prompts, prompt_len=320, q_heads=8,
                                                                      outside="kvc.score")) for prompts in (4, 8))
    assert (eight - four) / 4 < 8
