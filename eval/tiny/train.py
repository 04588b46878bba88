"""Train the tiny quality-test model on the synthetic long-context tasks.

    python -m eval.tiny.train --out DIR [--device cuda] [--minutes 10] [--lengths 1024 2048 4096 8192]
                              [--seed 0] [--eval-samples 200] [--target 0.95]
    python -m eval.tiny.train --out DIR --smoke       # a few CPU steps, toy model, 256 tokens

What it does:
  * builds the tokenizer (tokenizer.py) into DIR and a fresh Qwen2 model (model.py), or
    continues from a saved folder (--init, its tokenizer kept);
  * streams batches from DataLoader workers: each batch holds samples of one context length
    (about --batch-tokens tokens in all), tasks drawn with weights that favour the tasks the
    last evaluation found weakest;
  * curriculum: --warmup-lengths, then --lengths, one stage at a time; a stage opens when the
    held-out accuracy at the current longest length reaches --advance-at on every task, or
    when its share of the time budget is reached (one such stage per check: next_stage);
    half of every batch draw is the newest length, the rest the shorter ones (so nothing is
    forgotten);
  * each row: a sample's prompt and answer, exactly as evaluation asks it, then within
    --follow-up-tokens more tokens further questions about the same context with their
    answers (tasks.Sample.follow_ups: several answers per context, and for multikey the
    contrast between the keys of one context);
  * loss only on the answer tokens (" " + answer + <|im_end|>) unless --context-loss-weight adds
    next-token loss on prompt tokens; AdamW, linear warm-up then a cosine decay over the time
    budget, bf16 autocast on CUDA, SDPA attention; torch.compile of parts of the model
    (compile_backbone), and with --step-graphs each batch shape's whole step replayed as one
    CUDA graph (step_graphs.py);
  * every --eval-every seconds: greedy decoding with a full KV cache on held-out samples,
    exact match per task and length. When every (task, length) cell reaches --target there,
    the full held-out set (--eval-samples per cell) decides whether to stop;
  * stops when the target holds on the full set or time runs out (keeping room for the final
    evaluation), then saves DIR (config.json, model.safetensors in bf16, tokenizer files,
    generation_config.json) and DIR/train_log.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.tiny import model as tiny_model
from eval.tiny import tasks
from eval.tiny import tokenizer as tiny_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after we tokenize


CONTEXT_LOSS_FRACTION = 0.25  # share of the prompt positions the context loss scores
COMPILE_SCOPES = ("regions", "layers")  # compile_backbone's scopes


@dataclass
class TrainConfig:
    out: Path
    device: str = "cuda"
    minutes: float = 10.0  # the whole run: setup, training, final evaluation, saving
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)  # evaluated, and the end of the curriculum
    warmup_lengths: tuple[int, ...] = (256, 512)  # trained first, evaluated only to advance
    seed: int = 0
    eval_samples: int = 200  # final held-out samples per task and length
    periodic_samples: int = 32  # per task and length, for the periodic check
    target: float = 0.95
    advance_at: float = 0.8
    size: str = "base"
    vocab_size: int = tiny_tokenizer.DEFAULT_VOCAB_SIZE
    batch_tokens: int = 65536
    lr: float = 1e-3  # 2e-3 learnt slower at this size in CPU trials
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup_steps: int = 200
    eval_every: float = 30.0  # seconds
    eval_batch_tokens: int = 262144
    # Share of the training time by which all lengths are in. 0.5 opened 512-2048 at once before
    # vt was learnt at any length, and vt never recovered (tiny-training-2026-11-29-v3.md).
    latest_final_stage_start: float = 0.6
    workers: int = 12
    max_steps: int | None = None
    tasks: tuple[str, ...] = tasks.TASK_NAMES
    log_every: int = 50
    # Off by default (the loss is on answer tokens only). A weight > 0 adds next-token loss on
    # CONTEXT_LOSS_FRACTION of the prompt positions: denser signal, and attention that reads the filler.
    context_loss_weight: float = 0.0
    init: Path | None = None  # start from a saved model folder (and its tokenizer) instead of scratch
    # Room per training row for follow-up questions about the same context (tasks.Sample.follow_ups):
    # several answers per context instead of one, and for multikey the contrast between its keys.
    follow_up_tokens: int = 192
    compile: bool = True  # torch.compile on CUDA (compile_backbone); ignored on the CPU
    compile_scope: str = "regions"  # compile_backbone's scope: "regions" or "layers"
    # CUDA only: replay each batch shape's whole step (forward, backward, clipping, AdamW) as one
    # CUDA graph (eval/tiny/step_graphs.py); the host then queues a few copies per step.
    step_graphs: bool = False
    # How often each task is drawn, from its mean accuracy at the last periodic check:
    # floor + per_error * (1 - accuracy). The defaults (0.25, 2.0: a mastered task keeps a
    # ninth of an unlearnt one's weight) trained the bundled model (v12); the earlier 0.5, 1.0
    # (a third) left solved tasks half the late samples, 0.1, 4.0 collapsed vt
    # (eval/tiny/README.md, runs 5-8).
    task_weight_floor: float = 0.25
    task_weight_per_error: float = 2.0

    @property
    def curriculum(self) -> tuple[int, ...]:
        return tuple(sorted({*self.warmup_lengths, *self.lengths}))

    def __post_init__(self):
        if min(self.curriculum) < tasks.MIN_LENGTH:
            raise ValueError(f"lengths below {tasks.MIN_LENGTH} tokens cannot hold every task's prompt")
        if self.follow_up_tokens < 0:
            raise ValueError(f"follow_up_tokens must be >= 0 (0: one question per row), got {self.follow_up_tokens}")
        if self.step_graphs and not self.device.startswith("cuda"):
            raise ValueError(f"step_graphs needs a CUDA device, got {self.device!r}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {self.compile_scope!r}")
        if self.task_weight_floor <= 0 or self.task_weight_per_error < 0:
            raise ValueError("task_weight_floor must be > 0 (every task keeps being drawn) and task_weight_per_error "
                             f">= 0, got {self.task_weight_floor} and {self.task_weight_per_error}")

    def task_weight(self, mean_accuracy: float) -> float:
        """How often a task is drawn relative to the others, from its mean accuracy."""
        return self.task_weight_floor + self.task_weight_per_error * (1.0 - mean_accuracy)


def smoke_config(out: Path) -> TrainConfig:
    """A CPU run of a few steps that exercises every part (tests use it)."""
    return TrainConfig(
        out=out, device="cpu", minutes=2.0, lengths=(256,), warmup_lengths=(), eval_samples=2,
        periodic_samples=2, size="toy", batch_tokens=1024, warmup_steps=2, eval_every=0.0,
        eval_batch_tokens=2048, workers=0, max_steps=6, log_every=1,
    )


# ------------------------------------------------------------------------------------- batches


@dataclass
class Curriculum:
    """What the main process tells the data workers: the open stage and the task weights."""

    stage: multiprocessing.Value = field(default_factory=lambda: multiprocessing.Value("i", 0))
    task_weights: multiprocessing.Array = field(default_factory=lambda: multiprocessing.Array("d", [1.0] * 8))


def training_example(sample: tasks.Sample, encode: tasks.PieceEncoder, eos_id: int,
                     follow_up_tokens: int = 0) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels[t] is the token at t + 1 where that is an answer token, else
    -100. The prompt and its answer come first, exactly as evaluation asks them; then, within
    `follow_up_tokens` more tokens, the sample's follow-up questions with their answers."""
    ids, is_answer = list(sample.prompt_ids), [False] * len(sample.prompt_ids)

    def add(tokens: Sequence[int], answer: bool) -> None:
        ids.extend(tokens)
        is_answer.extend([answer] * len(tokens))

    add([*encode(tasks.completion(sample.answer)), eos_id], True)
    limit = len(ids) + follow_up_tokens
    for question, answer in sample.follow_ups:
        ask, reply = encode(tasks.follow_up_prompt(question)), [*encode(tasks.completion(answer)), eos_id]
        if len(ids) + len(ask) + len(reply) > limit:
            break
        add(ask, False)
        add(reply, True)
    labels = [token if answer else -100 for token, answer in zip(ids[1:], is_answer[1:])] + [-100]
    return ids, labels


def training_batch(config: TrainConfig, length: int, task_weights: Sequence[float], rng, encode: tasks.PieceEncoder,
                   eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch [n, length + follow_up_tokens] of about config.batch_tokens tokens (input ids,
    labels), tasks drawn with `task_weights`."""
    width = length + config.follow_up_tokens
    count = max(1, config.batch_tokens // width)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    labels = torch.full((count, width), -100, dtype=torch.long)
    for row in range(count):
        task = rng.choices(config.tasks, task_weights)[0]
        sample = tasks.make_sample(task, rng, encode, length)
        ids, row_labels = training_example(sample, encode, eos_id, config.follow_up_tokens)
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
    return input_ids, labels


@dataclass
class LossTargets:
    """The positions a batch is scored at, chosen on the host from the CPU batch: position p
    (flat index into the [n, width] batch) is trained to predict `token_ids`. Choosing them
    on the device by boolean indexing would stall every step on a device sync to learn
    their count."""

    positions: torch.Tensor  # int64 [targets]
    token_ids: torch.Tensor  # int64 [targets]
    is_answer: torch.Tensor  # bool [targets]: an answer token (else a prompt token, context loss)
    # bool [targets]: False marks padding (fixed-size buffers of a replayed step: `empty`, `load`); None: all count
    counted: torch.Tensor | None = None

    @classmethod
    def of(cls, input_ids: torch.Tensor, labels: torch.Tensor, context_fraction: float = 0.0,
           pad_id: int = -1, generator: torch.Generator | None = None) -> "LossTargets":
        """Every answer position (labels != -100) and, with `context_fraction` > 0, a random
        share of the prompt positions whose next token is not padding."""
        answer = labels != -100
        context = torch.zeros_like(answer)
        if context_fraction > 0:
            next_ids = input_ids[:, 1:]
            drawn = torch.rand(next_ids.shape, generator=generator) < context_fraction
            context[:, :-1] = ~answer[:, :-1] & (next_ids != pad_id) & drawn
        next_tokens = torch.cat([input_ids[:, 1:], input_ids.new_full((len(input_ids), 1), pad_id)], dim=1)
        chosen = answer | context
        positions = chosen.flatten().nonzero().squeeze(1)
        token_ids = torch.where(answer, labels, next_tokens).flatten()[positions]
        return cls(positions, token_ids, answer.flatten()[positions])

    def __len__(self) -> int:
        return len(self.positions)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.positions, self.token_ids, self.is_answer, self.counted) if t is not None)

    def pin_memory(self) -> "LossTargets":  # the DataLoader's pin_memory thread calls this
        return LossTargets(*(t.pin_memory() for t in self._tensors()))

    def to(self, device, non_blocking: bool = False) -> "LossTargets":
        return LossTargets(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    @classmethod
    def empty(cls, capacity: int, device) -> "LossTargets":
        """`capacity` padding entries (position 0, counted False): buffers for `load`."""
        long = torch.zeros(capacity, dtype=torch.long, device=device)
        flags = torch.zeros(capacity, dtype=torch.bool, device=device)
        return cls(long, long.clone(), flags, flags.clone())

    def load(self, targets: "LossTargets") -> None:
        """Copy `targets` (no padding of its own) into these buffers, in place, and mark the rest
        padding: a replayed CUDA graph reads the same tensors every step. Copies only, no sync."""
        count = len(targets)
        if self.counted is None or targets.counted is not None:
            raise ValueError("cannot load: the buffers must be padded (LossTargets.empty) and the targets not")
        if count > len(self):
            raise ValueError(f"cannot load {count} targets into {len(self)} padded buffers")
        for buffer, values in zip((self.positions, self.token_ids, self.is_answer),
                                  (targets.positions, targets.token_ids, targets.is_answer)):
            buffer[:count].copy_(values, non_blocking=True)
            buffer[count:].zero_()
        self.counted[:count].fill_(True)
        self.counted[count:].fill_(False)


class TrainingBatches(torch.utils.data.IterableDataset):
    """Endless (input ids [n, width], LossTargets) of one curriculum length each; every worker
    has its own seed. The targets are chosen here, off the training process's thread."""

    def __init__(self, config: TrainConfig, tokenizer_dir: Path, curriculum: Curriculum):
        self.config = config
        self.tokenizer_dir = tokenizer_dir
        self.curriculum = curriculum

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        # A continued run (--init) draws a new stream rather than replaying the first run's.
        rng = tasks.training_rng(self.config.seed, worker, str(self.config.init or ""))
        tokenizer = tiny_tokenizer.load_tokenizer(self.tokenizer_dir)
        encode = tasks.TokenizerPieceEncoder(tokenizer)
        eos_id = tokenizer.token_to_id(tiny_tokenizer.EOS_TOKEN)
        pad_id = tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN)
        curriculum = self.config.curriculum
        while True:
            stage = min(self.curriculum.stage.value, len(curriculum) - 1)
            # Half the batches at the newest length, the rest spread over the shorter ones.
            length = curriculum[stage] if stage == 0 or rng.random() < 0.5 else curriculum[rng.randrange(stage)]
            weights = list(self.curriculum.task_weights[: len(self.config.tasks)])
            input_ids, labels = training_batch(self.config, length, weights, rng, encode, eos_id, pad_id)
            context_fraction = CONTEXT_LOSS_FRACTION if self.config.context_loss_weight > 0 else 0.0
            yield input_ids, LossTargets.of(input_ids, labels, context_fraction, pad_id)


def compile_backbone(model: torch.nn.Module, scope: str = "regions",
                     backend: str | Callable = "inductor") -> torch.nn.Module:
    """torch.compile of the model's elementwise-heavy parts, in place. In eager mode a step
    spends most of its device time on separate elementwise kernels (norms, RoPE, SiLU, casts)
    over the 65K-token batch (eval/tiny/train_speed.py --profile). Either way the attention
    call stays eager: compiled, it takes PyTorch's own flash kernel, slower here than the
    cuDNN one eager SDPA picks (the whole model compiled: 1.6x slower steps at 8K,
    docs/results/train-speed-2026-11-29.md).

    scope "regions": the RMSNorms, the MLPs and RoPE, each its own compiled call (~25 per
    forward; the host's guards and wrappers then take as long as the device).
    scope "layers": each decoder layer whole, split at its attention call (which runs outside
    the graph), so a layer is two compiled calls and the residual adds, norms, projections
    and RoPE fuse across module boundaries."""
    from transformers.models.qwen2 import modeling_qwen2

    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    options = {"dynamic": True, "backend": backend}
    if scope == "layers":
        _keep_attention_outside_compiled_graphs()
        for layer in model.model.layers:
            layer.compile(**options)
        model.model.norm.compile(**options)
        return model
    for layer in model.model.layers:
        for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            module.compile(**options)
    model.model.norm.compile(**options)
    # Qwen2Attention.forward looks the function up in its module's globals at every call.
    if not hasattr(modeling_qwen2.apply_rotary_pos_emb, "_torchdynamo_orig_callable"):
        modeling_qwen2.apply_rotary_pos_emb = torch.compile(modeling_qwen2.apply_rotary_pos_emb, **options)
    return model


def _keep_attention_outside_compiled_graphs() -> None:
    """Make transformers' SDPA attention a graph break for dynamo (it then runs eagerly and
    picks cuDNN). Qwen2Attention looks the function up in transformers' process-wide registry
    at every call, so the wrapped one is registered there; outside torch.compile the wrapper
    only forwards the call."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(attention, "_kvc_outside_compile", False):
        wrapped = torch.compiler.disable(attention)
        wrapped._kvc_outside_compile = True
        ALL_ATTENTION_FUNCTIONS["sdpa"] = wrapped


def causal_mask_mapping(model: torch.nn.Module) -> dict[str, None]:
    """The attention mask of a training batch, passed to the model as already built. Left to
    build it, transformers' Qwen2Model looks at the position ids for rows that pack several
    sequences, in a Python `if` on a device tensor: a device sync in every training step, so
    the host could not prepare the next step while the GPU ran this one. A training row is one
    sequence (padding only at its end, never attended to by a scored position), and SDPA makes
    attention causal from its `is_causal` flag when the mask is None."""
    implementation, layer_types = model.config._attn_implementation, set(model.config.layer_types)
    if implementation != "sdpa" or layer_types != {"full_attention"}:
        raise ValueError("training expects full SDPA attention in every layer (causal without a mask), "
                         f"got {implementation!r} and layer types {sorted(layer_types)}")
    return {"full_attention": None}


def answer_loss(model: torch.nn.Module, input_ids: torch.Tensor, targets: LossTargets,
                context_loss_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, its answer part). The answer part is the mean cross-entropy on
    answer tokens; the LM head runs on the target positions alone (the padded batch never
    needs its [tokens, vocab] logits). Prompt targets (LossTargets.of's context share) add
    `context_loss_weight` times their mean cross-entropy."""
    # use_cache=False: the model's config asks for a KV cache by default, which the forward would
    # fill with every layer's keys and values (host work each step; compiled layers would
    # specialize on the cache's state per layer and recompile until dynamo's limit).
    hidden = model.model(input_ids=input_ids, attention_mask=causal_mask_mapping(model),
                         use_cache=False).last_hidden_state
    logits = model.lm_head(hidden.flatten(0, 1)[targets.positions]).float()
    per_target = F.cross_entropy(logits, targets.token_ids, reduction="none")
    answer_weight = targets.is_answer.float()
    answer = (per_target * answer_weight).sum() / answer_weight.sum().clamp(min=1)
    if context_loss_weight <= 0:
        return answer, answer
    prompt = ~targets.is_answer if targets.counted is None else targets.counted & ~targets.is_answer
    context_weight = prompt.float()
    context = (per_target * context_weight).sum() / context_weight.sum().clamp(min=1)
    return answer + context_loss_weight * context, answer


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """Greedy continuation of left-padded prompts with a full (DynamicCache) KV cache; each
    result stops before its first end token."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(list(eos_ids), device=device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    generated = []
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, eos)
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=out.past_key_values, use_cache=True)
    results = []
    eos_set = set(eos_ids)
    for row in torch.stack(generated, dim=1).tolist():
        end = next((i for i, token in enumerate(row) if token in eos_set), len(row))
        results.append(row[:end])
    return results


def evaluate(model: torch.nn.Module, eval_sets: Mapping[tuple[str, int], Sequence[tasks.Sample]], tokenizer,
             config: TrainConfig, compiled: bool = True) -> dict[str, dict[str, float]]:
    """Exact-match accuracy {task: {length: accuracy}} by greedy decoding with a full cache.
    `compiled=False` runs the `compile_backbone` regions eagerly. Checked because generation's
    shapes could push a region past dynamo's recompile limit, after which training would step
    eagerly too: `eval/tiny/train_speed.py --after-eval` found the compiled steps as fast after
    either kind of evaluation (docs/results/train-speed-2026-11-30.md), so training keeps the default."""
    eos_ids = [tokenizer.token_to_id(tiny_tokenizer.EOS_TOKEN), tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN)]
    pad_id = tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN)
    was_training = model.training
    model.eval()
    accuracy: dict[str, dict[str, float]] = {}
    stance = contextlib.nullcontext() if compiled else torch.compiler.set_stance("force_eager")
    with stance, autocast_for(config.device):
        for (task, length), samples in eval_sets.items():
            per_batch = max(1, config.eval_batch_tokens // length)
            correct = 0
            for start in range(0, len(samples), per_batch):
                batch = samples[start : start + per_batch]
                prompts = [sample.prompt_ids for sample in batch]
                outputs = greedy_generate(model, prompts, tasks.MAX_NEW_TOKENS[task], eos_ids, pad_id)
                correct += sum(tasks.exact_match(tokenizer.decode(ids), s.answer) for ids, s in zip(outputs, batch))
            accuracy.setdefault(task, {})[str(length)] = correct / len(samples)
    model.train(was_training)
    return accuracy


def cells_at_least(accuracy: Mapping[str, Mapping[str, float]], lengths: Sequence[int], threshold: float) -> bool:
    return all(accuracy[task][str(length)] >= threshold for task in accuracy for length in lengths)


def next_stage(stage: int, stages: Sequence[int], accuracy: Mapping[str, Mapping[str, float]], progress: float,
               config: TrainConfig) -> int:
    """The curriculum stage after a check at `progress` (fraction of the training budget).
    A stage opens when the newest length is learnt (several at once if the model masters
    them), or, for time, when its share of the budget is used up (`latest_final_stage_start`):
    at most one per check, since opening several for time skips their lengths (run v6 of
    2026-11-30 opened 512 to 4K in one check; its variable-tracking collapse came from its
    task weights, as run v7 showed, but no length should go untrained)."""
    while stage + 1 < len(stages):
        if cells_at_least(accuracy, [stages[stage]], config.advance_at):
            stage += 1
            continue
        if progress >= config.latest_final_stage_start * (stage + 1) / (len(stages) - 1):
            stage += 1
        break
    return stage


def autocast_for(device: str, cache_enabled: bool = True):
    """bf16 autocast on CUDA (training and evaluation); full fp32 on the CPU. `cache_enabled=False`
    for a step captured as a CUDA graph: the weight-cast cache would hold casts made during
    capture outside the graph's view."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------ training


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine over the share of the time budget used."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warmup * cosine


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms and q/k/v biases
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.step_graphs:
        # A replayed step reads its learning rate and step count from device tensors, so each
        # group gets its own lr tensor (set_learning_rate fills it) and the state stays on the device.
        for group in groups:
            group["lr"] = torch.tensor(config.lr, device=config.device)
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=config.device.startswith("cuda"))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """In place where the groups hold device tensors (step graphs replay the tensor), else as a float."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               targets: LossTargets, config: TrainConfig,
               autocast=None, grads_to_none: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch already on the device; returns (loss, its answer part).
    `grads_to_none=False` zeroes the gradients in place instead of freeing them (CUDA graphs
    of the step keep their addresses); `autocast` replaces autocast_for's context."""
    with autocast_for(config.device) if autocast is None else autocast:
        loss, answer_part = answer_loss(model, input_ids, targets, config.context_loss_weight)
    optimizer.zero_grad(set_to_none=grads_to_none)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss, answer_part


class Trainer:
    """One run: model, optimizer, data workers, evaluations, the log."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.started = time.monotonic()
        self.deadline = self.started + config.minutes * 60
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        self.tokenizer, self.model = self._tokenizer_and_model()
        if config.compile and config.device.startswith("cuda"):
            compile_backbone(self.model, self.config.compile_scope)
        # Generation's shapes (a cache, one-token steps) could recompile whole layers until
        # dynamo's limit sends them back to eager mode for training too (not measured; the
        # regions were checked to be safe, evaluate's docstring), so layers evaluate eagerly.
        self.evaluation_compiled = config.compile_scope == "regions"
        self.model.train()
        self.optimizer = make_optimizer(self.model, config)
        self.graphed_step = None
        if config.step_graphs:
            from eval.tiny.step_graphs import GraphedTrainStep  # it builds on this module

            self.graphed_step = GraphedTrainStep(self.model, self.optimizer, config)
        encode = tasks.TokenizerPieceEncoder(self.tokenizer)
        self.stages = config.curriculum
        # Periodic checks ("dev" samples) cover every curriculum length: the log shows the whole
        # picture, and a resumed model opens at once the stages it already masters. The final
        # ("eval") set covers --lengths and is only used once the dev checks pass.
        self.periodic_sets = tasks.eval_samples(encode, config.tasks, self.stages, config.periodic_samples,
                                                config.seed, split="dev")
        self.final_sets = tasks.eval_samples(encode, config.tasks, config.lengths, config.eval_samples, config.seed)
        self.curriculum = Curriculum()
        self.log: dict = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "parameters": tiny_model.parameter_count(self.model),
            "vocab_size": self.tokenizer.get_vocab_size(),
            "train": [], "evals": [],
        }
        # Room kept for the final evaluation and saving; re-estimated after every periodic check.
        self.min_final_eval_reserve = 30.0 if config.device.startswith("cuda") else 5.0
        self.final_eval_reserve = self.min_final_eval_reserve
        self.step = 0
        self.tokens_seen = 0

    def _tokenizer_and_model(self):
        config, out = self.config, self.out
        out.mkdir(parents=True, exist_ok=True)
        if config.init is None:
            tokenizer = tiny_tokenizer.build_tokenizer(config.vocab_size, config.seed)
            tiny_tokenizer.save_tokenizer(tokenizer, out)
            model = tiny_model.build_model(tiny_model.config_for_tokenizer(out, config.size), config.seed)
            return tokenizer, model.to(config.device)
        for name in tiny_model.TOKENIZER_FILES:
            if (Path(config.init) / name).resolve() != (out / name).resolve():
                (out / name).write_bytes((Path(config.init) / name).read_bytes())
        return tiny_tokenizer.load_tokenizer(out), tiny_model.load_model(config.init).to(config.device)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def train_budget(self, train_started: float) -> float:
        return max(1.0, self.deadline - self.final_eval_reserve - train_started)

    def periodic_check(self, progress: float) -> bool:
        """Evaluate, open curriculum stages, reweight tasks; True when the target is confirmed
        on the full held-out set."""
        config, curriculum = self.config, self.curriculum
        eval_started = time.monotonic()
        accuracy = evaluate(self.model, self.periodic_sets, self.tokenizer, config, self.evaluation_compiled)
        entry = {"step": self.step, "time": self.elapsed(), "stage": self.stages[curriculum.stage.value],
                 "samples": config.periodic_samples, "accuracy": accuracy}
        stage = next_stage(curriculum.stage.value, self.stages, accuracy, progress, config)
        if stage != curriculum.stage.value:
            curriculum.stage.value = stage
            entry["opened"] = self.stages[stage]
        # Draw the weakest tasks more often (TrainConfig.task_weight).
        for index, task in enumerate(config.tasks):
            curriculum.task_weights[index] = config.task_weight(sum(accuracy[task].values()) / len(accuracy[task]))
        seconds = time.monotonic() - eval_started
        # The final set, in prompt tokens, is this many times the periodic one.
        final_share = sum(length * len(samples) for (_, length), samples in self.final_sets.items()) / sum(
            length * len(samples) for (_, length), samples in self.periodic_sets.items())
        final_estimate = seconds * final_share
        passed = False
        if curriculum.stage.value == len(self.stages) - 1 and cells_at_least(accuracy, config.lengths, config.target):
            full_started = time.monotonic()
            entry["full_accuracy"] = evaluate(self.model, self.final_sets, self.tokenizer, config, self.evaluation_compiled)
            passed = cells_at_least(entry["full_accuracy"], config.lengths, config.target)
            final_estimate = time.monotonic() - full_started
        # The latest estimate, not the largest: the first check runs cold (CUDA and kernel
        # warm-up: 23 s against 3-5 s later in eval/tiny/model/train_log.json) and would
        # otherwise hold back minutes of training.
        self.final_eval_reserve = max(self.min_final_eval_reserve, 1.5 * final_estimate + 10)
        entry["eval_seconds"] = round(time.monotonic() - eval_started, 1)
        self.log["evals"].append(entry)
        print(json.dumps(entry), flush=True)
        return passed

    def run(self) -> dict:
        config = self.config
        print(f"model: {self.log['parameters']:,} parameters, vocab {self.log['vocab_size']}, "
              f"device {config.device}", flush=True)
        batches = torch.utils.data.DataLoader(
            TrainingBatches(config, self.out, self.curriculum), batch_size=None, num_workers=config.workers,
            pin_memory=config.device.startswith("cuda"), **({"prefetch_factor": 4} if config.workers else {}),
        )
        train_started = time.monotonic()
        passed = config.init is not None and self.periodic_check(0.0)
        last_check, losses = time.monotonic(), []
        # Where the loop's time goes between log lines, periodic checks excluded: blocked on the
        # data workers, and queueing the steps on the host (copies, forward, backward, optimizer),
        # against the wall time per step (the log line's read-back waits for the device).
        loop = {"data_wait": 0.0, "host_step": 0.0}
        interval_started = fetch_started = time.monotonic()
        check_seconds = 0.0
        stream = iter(batches)
        for input_ids, targets in stream:
            now = time.monotonic()
            loop["data_wait"] += now - fetch_started
            progress = (now - train_started) / self.train_budget(train_started)
            if passed or progress >= 1.0 or (config.max_steps is not None and self.step >= config.max_steps):
                break
            lr = learning_rate(config, self.step, progress)
            set_learning_rate(self.optimizer, lr)
            if self.graphed_step is not None:  # copies the pinned batch into its graph's inputs
                loss, answer_part = self.graphed_step(input_ids, targets)
            else:
                targets = targets.to(config.device, non_blocking=True)
                input_ids = input_ids.to(config.device, non_blocking=True)
                loss, answer_part = train_step(self.model, self.optimizer, input_ids, targets, config)
            loop["host_step"] += time.monotonic() - now
            self.step += 1
            self.tokens_seen += input_ids.numel()
            losses.append(torch.stack([loss.detach(), answer_part.detach()]))
            if self.step % config.log_every == 0:
                mean_loss, mean_answer_loss = torch.stack(losses).mean(0).tolist()
                wall = time.monotonic() - interval_started - check_seconds
                entry = {"step": self.step, "time": self.elapsed(), "length": input_ids.shape[1],
                         "loss": round(mean_loss, 4), "answer_loss": round(mean_answer_loss, 4),
                         "lr": round(lr, 6), "tokens": self.tokens_seen,
                         "stage": self.stages[self.curriculum.stage.value],
                         "step_ms": round(1e3 * wall / config.log_every, 2),
                         **{f"{name}_ms": round(1e3 * seconds / config.log_every, 2) for name, seconds in loop.items()}}
                loop = dict.fromkeys(loop, 0.0)
                interval_started, check_seconds, losses = time.monotonic(), 0.0, []
                self.log["train"].append(entry)
                print(json.dumps(entry), flush=True)
            if time.monotonic() - last_check >= config.eval_every:
                check_started = time.monotonic()
                passed = self.periodic_check(progress)
                last_check = time.monotonic()
                check_seconds += last_check - check_started
            fetch_started = time.monotonic()
        del stream  # stops the data workers before the final evaluation
        return self.finish(passed, train_started)

    def finish(self, passed: bool, train_started: float) -> dict:
        config = self.config
        train_seconds = time.monotonic() - train_started
        if passed:
            final = self.log["evals"][-1]["full_accuracy"]
        else:
            final = evaluate(self.model, self.final_sets, self.tokenizer, config, self.evaluation_compiled)
        self.log["final"] = {
            "accuracy": final,
            "task_mean": {task: sum(cells.values()) / len(cells) for task, cells in final.items()},
            "target": config.target, "eval_samples": config.eval_samples,
            "passed": cells_at_least(final, config.lengths, config.target),
            "steps": self.step, "tokens": self.tokens_seen, "train_seconds": round(train_seconds, 1),
            "tokens_per_second": round(self.tokens_seen / max(1e-9, train_seconds)),
        }
        if self.graphed_step is not None:
            self.log["final"]["step_graphs"] = dict(self.graphed_step.stats)
        tiny_model.save_model(self.model, self.out, self.out)
        self.log["final"]["total_seconds"] = self.elapsed()
        (self.out / "train_log.json").write_text(json.dumps(self.log, indent=1) + "\n")
        print(json.dumps(self.log["final"]), flush=True)
        return self.log


def train(config: TrainConfig) -> dict:
    return Trainer(config).run()


# ----------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(out=Path("."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--minutes", type=float, default=defaults.minutes, help="wall-clock budget of the whole run")
    p.add_argument("--lengths", nargs="+", type=int, default=list(defaults.lengths))
    p.add_argument("--warmup-lengths", nargs="*", type=int, default=list(defaults.warmup_lengths))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--eval-samples", type=int, default=defaults.eval_samples, help="per task and length")
    p.add_argument("--periodic-samples", type=int, default=defaults.periodic_samples)
    p.add_argument("--target", type=float, default=defaults.target)
    p.add_argument("--size", choices=sorted(tiny_model.SIZES), default=defaults.size)
    p.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--eval-every", type=float, default=defaults.eval_every, help="seconds")
    p.add_argument("--workers", type=int, default=defaults.workers, help="data worker processes")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tasks", nargs="+", choices=tasks.TASK_NAMES, default=list(tasks.TASK_NAMES))
    p.add_argument("--context-loss-weight", type=float, default=defaults.context_loss_weight,
                   help="> 0 adds next-token loss on prompt tokens (default: answer tokens only)")
    p.add_argument("--init", type=Path, default=None, help="continue from a saved model folder")
    p.add_argument("--follow-up-tokens", type=int, default=defaults.follow_up_tokens,
                   help="room per training row for follow-up questions about its context (0: one question)")
    p.add_argument("--task-weight-floor", type=float, default=defaults.task_weight_floor,
                   help="a task's draw weight is FLOOR + PER_ERROR x (1 - its mean accuracy at the last check)")
    p.add_argument("--task-weight-per-error", type=float, default=defaults.task_weight_per_error)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="train in plain eager mode (default on CUDA: compile_backbone)")
    p.add_argument("--compile-scope", choices=COMPILE_SCOPES, default=defaults.compile_scope,
                   help="what compile_backbone compiles: norms, MLPs and RoPE apart, or whole decoder layers")
    p.add_argument("--step-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA: replay each batch shape's whole training step as one CUDA graph (eval/tiny/step_graphs.py)")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps of a toy model at 256 tokens")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.smoke:
        return replace(smoke_config(args.out), init=args.init)
    return TrainConfig(
        out=args.out, device=args.device, minutes=args.minutes, lengths=tuple(args.lengths),
        warmup_lengths=tuple(args.warmup_lengths), seed=args.seed, eval_samples=args.eval_samples,
        periodic_samples=args.periodic_samples, target=args.target, size=args.size,
        batch_tokens=args.batch_tokens, lr=args.lr, eval_every=args.eval_every, workers=args.workers,
        max_steps=args.max_steps, tasks=tuple(args.tasks), context_loss_weight=args.context_loss_weight,
        init=args.init, follow_up_tokens=args.follow_up_tokens, compile=args.compile,
        compile_scope=args.compile_scope, step_graphs=args.step_graphs,
        task_weight_floor=args.task_weight_floor, task_weight_per_error=args.task_weight_per_error,
    )


def main(argv: Sequence[str] | None = None) -> int:
    train(config_from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
