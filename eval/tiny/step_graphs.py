"""Training steps replayed as CUDA graphs, one per batch shape.

The tiny model's step is host-bound: at 65,536 tokens per step its kernels keep the H200 busy
for a fraction of the ~30-40 ms the host needs to queue them (Python, autograd, dynamo's guards,
~2,000 launches; docs/results/train-speed-2026-11-30-c.md). A CUDA graph of the whole step
(forward, backward, gradient clipping, fused AdamW) replays those launches in one call, so the
step costs the device's time and the host only copies the next batch into the graph's inputs.

Every batch of one curriculum length has the same [rows, width] shape (train.training_batch),
so a run needs one graph per length. The loss targets vary in number from batch to batch; the
graph scores a fixed `capacity` of them, the rest padding (LossTargets.load). The first batch
of a shape, or one with more targets than its graph holds, is a real step taken eagerly (the
warm-up CUDA graphs need: compilation, cuDNN plans, the optimizer's state), after which the
shape is captured. Gradients are zeroed in place, never freed, on every path: the graphs hold
their addresses.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from eval.tiny import train


@dataclass
class _ShapeGraph:
    graph: torch.cuda.CUDAGraph | None  # None: no capture (CPU, or a test of the buffers)
    input_ids: torch.Tensor
    targets: train.LossTargets  # padded to the capacity
    loss: torch.Tensor | None = None
    answer_part: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return len(self.targets)


class GraphedTrainStep:
    """`step(input_ids, targets) -> (loss, answer part)`, as train.train_step, for batches on the
    host (pinned) or the device. `capture=False` runs the same fixed-size buffers eagerly: what
    the CPU tests check against train_step. `stats` counts captures and eager steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: train.TrainConfig,
                 capture: bool | None = None, headroom: float = 1.1, granularity: int = 1024):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.headroom, self.granularity = headroom, granularity
        self.shapes: dict[tuple[int, ...], _ShapeGraph] = {}
        self.side_stream = torch.cuda.Stream(self.device) if self.capture else None
        self.stats = {"captures": 0, "eager_steps": 0, "replays": 0}

    def _step(self, input_ids: torch.Tensor, targets: train.LossTargets) -> tuple[torch.Tensor, torch.Tensor]:
        return train.train_step(self.model, self.optimizer, input_ids, targets, self.config,
                                autocast=train.autocast_for(self.device.type, cache_enabled=False),
                                grads_to_none=False)

    def _capacity(self, count: int) -> int:
        return self.granularity * math.ceil(count * self.headroom / self.granularity)

    def __call__(self, input_ids: torch.Tensor, targets: train.LossTargets) -> tuple[torch.Tensor, torch.Tensor]:
        shape = tuple(input_ids.shape)
        held = self.shapes.get(shape)
        if held is None or len(targets) > held.capacity:
            return self._eager_then_capture(input_ids, targets)
        held.input_ids.copy_(input_ids, non_blocking=True)
        held.targets.load(targets)
        if held.graph is None:
            return tuple(part.detach() for part in self._step(held.input_ids, held.targets))
        held.graph.replay()
        self.stats["replays"] += 1
        return held.loss.clone(), held.answer_part.clone()

    def _eager_then_capture(self, input_ids, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """A real step on this batch, eagerly (on a side stream when capturing, as graph warm-up
        asks), then buffers of this shape and, when capturing, the step's graph over them."""
        input_ids = input_ids.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        side = self.side_stream
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            loss, answer_part = self._step(input_ids, targets)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        # Detached, here and for the graphs' outputs: a loss that kept its autograd graph would
        # keep the parameters' AccumulateGrad nodes, and with them the stream of the backward
        # that made them, into the next capture (torch warns of a stream mismatch).
        loss, answer_part = loss.detach(), answer_part.detach()
        self.stats["eager_steps"] += 1
        held = _ShapeGraph(None, torch.empty_like(input_ids),
                           train.LossTargets.empty(self._capacity(len(targets)), self.device))
        held.input_ids.copy_(input_ids)
        held.targets.load(targets)
        if self.capture:
            self.shapes.pop(tuple(input_ids.shape), None)  # a smaller graph of this shape is dropped
            held.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(held.graph):
                captured_loss, captured_answer_part = self._step(held.input_ids, held.targets)
            held.loss, held.answer_part = captured_loss.detach(), captured_answer_part.detach()
            del captured_loss, captured_answer_part
            self.stats["captures"] += 1
        self.shapes[tuple(input_ids.shape)] = held
        return loss, answer_part
