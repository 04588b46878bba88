"""Where a training step of the tiny model spends its time, on the device it will train on.

    python -m eval.tiny.train_speed --out DIR [--size deep] [--lengths 256 1024 4096 8192]
                                    [--steps 20] [--loader-seconds 20] [--compile [--step-graphs] [--after-eval N]]

Per curriculum length, on batches made exactly as training makes them (eval/tiny/train.py):
  * `wall_ms`: steps queued back to back, one sync at the end (what training gets);
  * `device_ms`: the same steps' time on the device's stream (CUDA events around each); it
    includes the time the GPU waits for the host's launches, so it follows `wall_ms` either way;
  * `host_ms`: the host's time to queue one step (Python, autograd, launches);
  * `sync_sites` (CUDA): where one step waits for the device, if anywhere;
  * with `--profile`, `busy_ms`: the kernels' own time per step (the profiler's self CUDA
    total). `busy_ms` well below `wall_ms` means the host bounds training, not the GPU
    (docs/results/train-speed-2026-11-30-c.md: compiled steps at short lengths).
With more than one length, a `mixed` row times steps that cycle through every length's batches,
as training's later stages draw a different length each step (a compiled model then meets
every shape in turn; `tiny-training-2026-11-30-v10.md`), and `dynamo` counts what each
variant compiled for its steps, before any `--after-eval` evaluation (torch._dynamo's counters:
frames compiled, recompilations included; graphs).
Then the data workers alone: batches and tokens per second at the final curriculum stage with
training's worker count. `--compile` repeats the step timing with torch.compile, of regions
and then of whole layers (train.compile_backbone's scopes), and with `--step-graphs` (CUDA)
of each scope's whole steps replayed as CUDA graphs (eval/tiny/step_graphs.py; given pinned
host batches, as in training); `--after-eval N` then times each
compiled model's steps again after an evaluation of N samples per task and length (eager,
then for the regions compiled), as training's periodic checks run between its steps.
Writes DIR/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from eval.tiny import model as tiny_model
from eval.tiny import step_graphs
from eval.tiny import tasks
from eval.tiny import tokenizer as tiny_tokenizer
from eval.tiny import train


def time_steps(step, batches, steps: int, cuda: bool) -> dict:
    """step(input ids, targets) over `batches`, cycled."""
    for input_ids, targets in batches[:3]:  # warm-up (and compilation, or capture)
        step(input_ids, targets)
    if cuda:
        torch.cuda.synchronize()
    events, host = [], []
    started = time.perf_counter()
    for index in range(steps):
        input_ids, targets = batches[index % len(batches)]
        queued = time.perf_counter()
        if cuda:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        step(input_ids, targets)
        if cuda:
            events[-1][1].record()
        host.append(time.perf_counter() - queued)
    if cuda:
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / steps
    device = sorted(b.elapsed_time(e) for b, e in events)[steps // 2] if cuda else None
    return {"wall_ms": round(wall * 1e3, 2), "device_ms": device and round(device, 2),
            "host_ms": round(sorted(host)[steps // 2] * 1e3, 2)}


def sync_sites(step, batch) -> list[str]:
    """Where one training step waits for the device (torch's sync debug mode): each
    synchronizing call as "file:line". A step that syncs cannot overlap the host's next
    batch with the device's work."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]


def profile_table(step, batches, cuda: bool) -> tuple[str, float | None]:
    """The 20 most expensive operations of a step per batch in `batches`, and the device's busy
    time per step in ms (None on the CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for input_ids, targets in batches:
            step(input_ids, targets)
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = profiler.key_averages()
    # As the table's "Self CUDA time total": the kernels' own events, not the operators that
    # launched them (which carry the same time again).
    busy_us = sum(event.self_device_time_total for event in averages
                  if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False))
    table = averages.table(sort_by=sort_by, row_limit=20, max_name_column_width=60)
    return table, round(busy_us / 1e3 / len(batches), 2) if cuda else None


def dynamo_counts() -> dict:
    """What torch.compile did since the counters were cleared (torch._dynamo.utils.counters):
    `frames` ok counts every compilation of a frame, recompilations included; `stats` the
    graphs made (unique_graphs) and the calls captured; `graph_breaks` their count."""
    counters = torch._dynamo.utils.counters
    return {"frames": dict(counters["frames"]), "stats": dict(counters["stats"]),
            "graph_breaks": sum(counters["graph_break"].values())}


def loader_rate(config: train.TrainConfig, tokenizer_dir: Path, seconds: float) -> dict:
    curriculum = train.Curriculum()
    curriculum.stage.value = len(config.curriculum) - 1
    loader = torch.utils.data.DataLoader(train.TrainingBatches(config, tokenizer_dir, curriculum), batch_size=None,
                                         num_workers=config.workers, pin_memory=config.device.startswith("cuda"),
                                         **({"prefetch_factor": 4} if config.workers else {}))
    stream = iter(loader)
    for _ in range(max(1, 2 * config.workers)):  # every worker started
        next(stream)
    batches = tokens = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        input_ids, _ = next(stream)
        batches += 1
        tokens += input_ids.numel()
    elapsed = time.perf_counter() - started
    del stream
    return {"workers": config.workers, "batches_per_s": round(batches / elapsed, 1),
            "tokens_per_s": round(tokens / elapsed)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", choices=sorted(tiny_model.SIZES), default="deep")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loader-seconds", type=float, default=20.0)
    p.add_argument("--context-loss-weight", type=float, default=1.0)
    p.add_argument("--batch-tokens", type=int, default=train.TrainConfig(out=Path(".")).batch_tokens)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    p.add_argument("--step-graphs", action="store_true",
                   help="with --compile: also each compile scope's steps replayed as CUDA graphs (step_graphs.py)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    p.add_argument("--profile", action="store_true",
                   help="print each length's 20 most expensive operations (torch.profiler)")
    p.add_argument("--workers", type=int, default=train.TrainConfig(out=Path(".")).workers)
    p.add_argument("--after-eval", type=int, default=0, metavar="SAMPLES",
                   help="with --compile: then run a periodic check's evaluation (SAMPLES per task and length), "
                        "eager, and time the compiled steps again; for the compiled regions then the same with "
                        "the evaluation compiled, and time them once more")
    args = p.parse_args(argv)
    if args.step_graphs and not (args.compile and args.device.startswith("cuda")):
        p.error("--step-graphs needs --compile and a CUDA --device (the graphs replay compiled steps)")
    config = train.TrainConfig(out=args.out, device=args.device, context_loss_weight=args.context_loss_weight,
                               batch_tokens=args.batch_tokens, workers=args.workers)
    cuda = args.device.startswith("cuda")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "size": args.size, "batch_tokens": args.batch_tokens, "steps": {},
              "dynamo": {}}
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = tiny_tokenizer.build_tokenizer(config.vocab_size, 0)
        tiny_tokenizer.save_tokenizer(tokenizer, Path(tokenizer_dir))
        encode = tasks.TokenizerPieceEncoder(tokenizer)
        eos_id, pad_id = (tokenizer.token_to_id(t) for t in (tiny_tokenizer.EOS_TOKEN, tiny_tokenizer.PAD_TOKEN))
        rng = random.Random(0)
        host_batches = {}  # as the data workers hand them over (pinned on CUDA)
        for length in args.lengths:
            made = [train.training_batch(config, length, [1.0] * len(config.tasks), rng, encode, eos_id, pad_id)
                    for _ in range(3)]
            host_batches[length] = [(ids, train.LossTargets.of(ids, labels, train.CONTEXT_LOSS_FRACTION, pad_id))
                                    for ids, labels in made]
            if cuda:
                host_batches[length] = [(ids.pin_memory(), targets.pin_memory())
                                        for ids, targets in host_batches[length]]
        device_batches = {length: [(ids.to(args.device), targets.to(args.device)) for ids, targets in made]
                          for length, made in host_batches.items()}
        # (name, what to compile, whether the step is replayed as CUDA graphs)
        variants = [("eager", lambda m: m, False)]
        if args.compile:  # regions before layers: the layers' scope wraps transformers' attention for good
            variants += [("compiled", train.compile_backbone, False)]
            if args.step_graphs:
                variants += [("compiled, step graphs", train.compile_backbone, True)]
            variants += [("compiled layers", lambda m: train.compile_backbone(m, "layers"), False)]
            if args.step_graphs:
                variants += [("compiled layers, step graphs", lambda m: train.compile_backbone(m, "layers"), True)]
        for name, wrap, graphs in variants:
            torch._dynamo.utils.counters.clear()
            variant_config = replace(config, step_graphs=graphs)
            model = tiny_model.build_model(tiny_model.config_for_tokenizer(Path(tokenizer_dir), args.size)).to(args.device)
            optimizer = train.make_optimizer(model, variant_config)
            model = wrap(model)
            if graphs:  # training hands the graphs pinned host batches
                graphed = step_graphs.GraphedTrainStep(model, optimizer, variant_config)
                step, batches = graphed, host_batches
            else:
                def step(input_ids, targets, model=model, optimizer=optimizer):
                    return train.train_step(model, optimizer, input_ids, targets, config)
                batches = device_batches
            for length in args.lengths:
                started = time.perf_counter()
                result = time_steps(step, batches[length], args.steps, cuda)
                result["width"] = batches[length][0][0].shape[1]
                result["first_seconds"] = round(time.perf_counter() - started, 1)
                result["tokens_per_s"] = round(batches[length][0][0].numel() / (result["wall_ms"] / 1e3))
                if cuda:
                    result["sync_sites"] = sync_sites(step, batches[length][0])
                report["steps"].setdefault(name, {})[str(length)] = result
                print(name, length, json.dumps(result), flush=True)
                if args.profile:
                    table, result["busy_ms"] = profile_table(step, batches[length], cuda)
                    print(table, f"busy_ms {result['busy_ms']}", sep="\n", flush=True)
            if len(args.lengths) > 1:
                # One batch of each length in turn, as training's later stages draw them.
                mixed = [batch for group in zip(*(batches[length] for length in args.lengths)) for batch in group]
                result = time_steps(step, mixed, args.steps, cuda)
                result["widths"] = [batches[length][0][0].shape[1] for length in args.lengths]
                result["tokens_per_s"] = round(sum(ids.numel() for ids, _ in mixed) / len(mixed) / (result["wall_ms"] / 1e3))
                report["steps"][name]["mixed"] = result
                print(name, "mixed", json.dumps(result), flush=True)
            if graphs:
                report["steps"][name]["graph_stats"] = dict(graphed.stats)
            report["dynamo"][name] = dynamo_counts()
            if name != "eager" and args.after_eval:
                eval_sets = tasks.eval_samples(encode, config.tasks, args.lengths, args.after_eval, 0, split="dev")
                # Eager evaluation first: a region pushed back to eager by the compiled one would
                # stay so for good and hide the first comparison. Training evaluates compiled
                # layers eagerly only (Trainer.evaluation_compiled).
                evaluations = [(f"{name}, after an eager evaluation", False)]
                if name == "compiled":
                    evaluations.append((f"{name}, after a compiled evaluation", True))
                for label, compiled in evaluations:
                    started = time.perf_counter()
                    train.evaluate(model, eval_sets, tokenizer, config, compiled=compiled)
                    evaluation_s = round(time.perf_counter() - started, 1)
                    for length in args.lengths:
                        result = time_steps(step, batches[length], args.steps, cuda)
                        result["evaluation_seconds"] = evaluation_s
                        report["steps"].setdefault(label, {})[str(length)] = result
                        print(label, length, json.dumps(result), flush=True)
        report["loader"] = loader_rate(config, Path(tokenizer_dir), args.loader_seconds)
        print("loader", json.dumps(report["loader"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
