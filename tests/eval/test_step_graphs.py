"""eval/tiny/step_graphs.py: training steps over fixed-size buffers (CPU, no capture) must train
exactly as train.train_step does; on CUDA the captured graphs must too (run on the device)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from eval.tiny import model as tiny_model
from eval.tiny import step_graphs
from eval.tiny import tasks
from eval.tiny import tokenizer as tiny_tokenizer
from eval.tiny import train as tiny_train


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tiny_tokenizer.save_tokenizer(tiny_tokenizer.build_tokenizer(), tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="module")
def batches(tokenizer_dir):
    """Training batches as training makes them, at two lengths (two shapes), targets drawn anew
    for each (their count varies), on the host."""
    tokenizer = tiny_tokenizer.load_tokenizer(tokenizer_dir)
    encode = tasks.TokenizerPieceEncoder(tokenizer)
    eos_id, pad_id = (tokenizer.token_to_id(t) for t in (tiny_tokenizer.EOS_TOKEN, tiny_tokenizer.PAD_TOKEN))
    config = tiny_train.TrainConfig(out=Path("."), device="cpu", batch_tokens=2048, follow_up_tokens=64)
    rng = random.Random(random.randrange(1 << 30))
    made = []
    for length in (256, 384, 256, 256, 384, 256):
        ids, labels = tiny_train.training_batch(config, length, [1.0] * len(config.tasks), rng, encode, eos_id, pad_id)
        made.append((ids, tiny_train.LossTargets.of(ids, labels, tiny_train.CONTEXT_LOSS_FRACTION, pad_id,
                                                    generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))))
    return made


def _model_and_optimizer(tokenizer_dir, config, seed=5):
    model = tiny_model.build_model(tiny_model.config_for_tokenizer(tokenizer_dir, "toy"), seed=seed).to(config.device)
    return model, tiny_train.make_optimizer(model, config)


def test_padded_targets_give_the_loss_of_the_unpadded_ones(tokenizer_dir, batches):
    model, _ = _model_and_optimizer(tokenizer_dir, tiny_train.TrainConfig(out=Path("."), device="cpu"))
    ids, targets = batches[0]
    padded = tiny_train.LossTargets.empty(len(targets) + 37, "cpu")
    padded.positions.fill_(3)  # stale values from an earlier batch must not leak in
    padded.is_answer.fill_(True)
    padded.load(targets)
    assert padded.counted.sum() == len(targets) and not padded.is_answer[len(targets):].any()
    for weight in (0.0, 1.0):
        expected = tiny_train.answer_loss(model, ids, targets, weight)
        got = tiny_train.answer_loss(model, ids, padded, weight)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-6), weight
    with pytest.raises(ValueError, match="cannot load"):
        tiny_train.LossTargets.empty(len(targets) - 1, "cpu").load(targets)


def test_fixed_buffer_steps_train_as_train_step(tokenizer_dir, batches):
    """Same parameters after every step; a new shape, or more targets than a shape's buffers
    hold, takes an eager step and makes new buffers."""
    config = tiny_train.TrainConfig(out=Path("."), device="cpu", context_loss_weight=1.0)
    reference, reference_optimizer = _model_and_optimizer(tokenizer_dir, config)
    model, optimizer = _model_and_optimizer(tokenizer_dir, config)
    # Capacity exactly the first count of each shape: a later batch with more targets regrows it.
    graphed = step_graphs.GraphedTrainStep(model, optimizer, config, capture=False, headroom=1.0, granularity=1)
    expected_eager = 0
    capacity: dict[tuple[int, ...], int] = {}
    first_ids, first_targets = batches[0]
    fewer = tiny_train.LossTargets(*(t[: len(first_targets) // 2] for t in
                                     (first_targets.positions, first_targets.token_ids, first_targets.is_answer)))
    for ids, targets in [(first_ids, fewer), *batches]:  # batches[0] then needs larger buffers
        shape = tuple(ids.shape)
        if shape not in capacity or len(targets) > capacity[shape]:
            expected_eager += 1
            capacity[shape] = len(targets)
        expected = tiny_train.train_step(reference, reference_optimizer, ids, targets, config)
        got = graphed(ids, targets)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-5)
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert torch.allclose(a, b, atol=1e-5), name
    assert graphed.stats["eager_steps"] == expected_eager
    assert {shape: held.capacity for shape, held in graphed.shapes.items()} == capacity
    assert expected_eager >= 3 and len(graphed.shapes) == 2 and graphed.stats["captures"] == 0


def test_step_graphs_need_cuda(tokenizer_dir, tmp_path, capsys):
    from eval.tiny import train_speed

    with pytest.raises(SystemExit):
        train_speed.main(["--out", str(tmp_path), "--device", "cpu", "--compile", "--step-graphs"])
    assert "--step-graphs needs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="step_graphs"):
        tiny_train.TrainConfig(out=Path("."), device="cpu", step_graphs=True)
    # eval/gpu/train_tiny.sh passes --step-graphs before the caller's arguments, which win
    parse = tiny_train.build_parser().parse_args
    assert parse(["--out", "x", "--step-graphs"]).step_graphs
    assert not parse(["--out", "x", "--step-graphs", "--no-step-graphs"]).step_graphs
    config = tiny_train.TrainConfig(out=Path("."), device="cpu")
    model, optimizer = _model_and_optimizer(tokenizer_dir, config)
    with pytest.raises(ValueError, match="CUDA"):
        step_graphs.GraphedTrainStep(model, optimizer, config, capture=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
@pytest.mark.parametrize("scope", ["regions", "layers"])
def test_replayed_graphs_train_as_eager_steps(tokenizer_dir, batches, scope):
    """Captured steps (pinned host batches, as training hands them over) against eager steps of
    the same compiled model, same autocast, same batches, from the same weights: each step's
    loss agrees (a graph that read stale inputs would not), and the two runs' weights end far
    closer to each other than to where they started (bf16 and atomics make them differ a little,
    and Adam moves nearly-zero gradients by a full step)."""
    config = tiny_train.TrainConfig(out=Path("."), device="cuda", context_loss_weight=1.0, step_graphs=True)
    reference, reference_optimizer = _model_and_optimizer(tokenizer_dir, config)
    model, optimizer = _model_and_optimizer(tokenizer_dir, config)
    initial = [p.detach().clone() for p in model.parameters()]
    for compiled in (reference, model):
        tiny_train.compile_backbone(compiled, scope)
    graphed = step_graphs.GraphedTrainStep(model, optimizer, config)
    for index, (ids, targets) in enumerate(batches * 2):
        lr = config.lr * (index + 1) / 12  # a changing rate: the graphs read the lr tensor
        for each in (reference_optimizer, optimizer):
            tiny_train.set_learning_rate(each, lr)
        expected = tiny_train.train_step(reference, reference_optimizer, ids.cuda(), targets.to("cuda"), config,
                                         autocast=tiny_train.autocast_for("cuda", cache_enabled=False))
        got = graphed(ids.pin_memory(), targets.pin_memory())
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, rtol=1e-2, atol=1e-3), (index, float(a), float(b))
    torch.cuda.synchronize()
    assert graphed.stats["captures"] >= 2 and graphed.stats["replays"] >= len(batches)
    apart = sum(float((a - b).float().norm() ** 2) for a, b in zip(model.parameters(), reference.parameters())) ** 0.5
    moved = sum(float((b - c).float().norm() ** 2) for b, c in zip(reference.parameters(), initial)) ** 0.5
    assert apart < 0.1 * moved, (apart, moved)
