"""Summarize a torch.profiler Chrome trace (what SGLang's /start_profile writes) per step.

    python eval/trace_summary.py TRACE.trace.json.gz --steps 24 [--top 20] [--out summary.json]

For a trace of N forward steps it reports, per step:
  * `span_ms`: first event start to last event end, over N;
  * `gpu_busy_ms`: time at least one GPU kernel runs (overlapping kernels counted once);
  * the kernels, host operators (`cpu_op`, inclusive: nested ops are counted in their
    parents too), CUDA runtime calls (launches, synchronizations, copies) and
    `record_function` ranges (`user_annotation`, e.g. the engine's `kvc.*` ranges) with
    the largest total time, as {name, calls, total_ms, ms_per_step}.
`span_ms` well above `gpu_busy_ms` means the GPU waits for the host: the host-side ranges
and runtime calls then say where the step goes.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

CATEGORIES = {"kernels": "kernel", "host_ops": "cpu_op", "runtime": "cuda_runtime", "ranges": "user_annotation"}


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def top_by_total(events: list[dict], steps: int, top: int) -> list[dict]:
    calls: dict[str, int] = defaultdict(int)
    total_us: dict[str, float] = defaultdict(float)
    for event in events:
        calls[event["name"]] += 1
        total_us[event["name"]] += event["dur"]
    ranked = sorted(total_us, key=total_us.get, reverse=True)[:top]
    return [{"name": name, "calls": calls[name], "total_ms": round(total_us[name] / 1e3, 3),
             "ms_per_step": round(total_us[name] / 1e3 / steps, 4)} for name in ranked]


def summarize(events: list[dict], steps: int, top: int = 20) -> dict:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    events = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]  # complete events
    if not events:
        raise ValueError("the trace holds no complete ('X') events")
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    by_category = {key: [e for e in events if e.get("cat") == cat] for key, cat in CATEGORIES.items()}
    kernels = by_category["kernels"]
    summary = {
        "steps": steps,
        "span_ms": round((end - start) / 1e3 / steps, 4),
        "gpu_busy_ms": round(busy_time((e["ts"], e["ts"] + e["dur"]) for e in kernels) / 1e3 / steps, 4),
        "kernel_launches_per_step": round(len(kernels) / steps, 1),
    }
    for key, selected in by_category.items():
        summary[key] = top_by_total(selected, steps, top)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="forward steps the trace holds")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    summary = summarize(load_events(args.trace), args.steps, args.top)
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
