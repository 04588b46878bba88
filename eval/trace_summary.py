"""Summarize a torch.profiler Chrome trace (what SGLang's /start_profile writes) per step.

    python eval/trace_summary.py TRACE.trace.json.gz --steps 24 [--top 20] [--out summary.json]

For a trace of N forward steps it reports, per step:
  * `span_ms`: first event start to last event end, over N;
  * `gpu_busy_ms`: time at least one GPU kernel runs (overlapping kernels counted once);
  * the kernels, host operators (`cpu_op`, inclusive: nested ops are counted in their
    parents too), CUDA runtime calls (launches, synchronizations, copies) and
    `record_function` ranges (`user_annotation`, e.g. the engine's `kvc.*` ranges) with
    the largest total time, as {name, calls, total_ms, ms_per_step};
  * `sync_sites`: where the host waited on the device (`cudaStreamSynchronize`, and copies
    that wait: device to host, or host to device from pageable memory, told by the GPU copy
    the runtime call is correlated with), by the chain of host operators it happened in
    (outermost three), e.g. `aten::index > aten::nonzero`. Device-to-device copies and
    copies from pinned memory are queued like kernels and left out.
With CUDA-graph replays (decode steps) it also reports `graph_replays`: the steady step
period (replay to replay), its GPU-busy and idle parts and kernels, medians over all but the
first replay, which also holds the end of the prefill before it (the per-step figures above
average that in).
`span_ms` well above `gpu_busy_ms` means the GPU waits for the host: `idle_gaps` says which
launches it waited for and what the launching thread did meanwhile (`idle_gaps` below).

With `--layer-marker OP` (a host operator each layer runs once, e.g. `sglang::apply_rope_inplace`)
it also reports where a one-step trace's host time goes by layer (`layer_periods`): before the
first layer, the first layer, the median later layer and after the last; the later layers'
host operators per layer (outermost ones only) and the time between them; and the median time
of `--yardstick` (default `aten::linear`) calls, to compare the host's speed across traces
taken on different machines.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import itertools
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")
COPY_CALLS = ("cudaMemcpyAsync", "cudaMemcpy")
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


def totals_by_name(events: Iterable[dict]) -> tuple[dict[str, int], dict[str, float]]:
    """(calls, total µs) per event name."""
    calls: dict[str, int] = defaultdict(int)
    total_us: dict[str, float] = defaultdict(float)
    for event in events:
        calls[event["name"]] += 1
        total_us[event["name"]] += event["dur"]
    return calls, total_us


def top_by_total(events: list[dict], steps: int, top: int) -> list[dict]:
    calls, total_us = totals_by_name(events)
    ranked = sorted(total_us, key=total_us.get, reverse=True)[:top]
    return [{"name": name, "calls": calls[name], "total_ms": round(total_us[name] / 1e3, 3),
             "ms_per_step": round(total_us[name] / 1e3 / steps, 4)} for name in ranked]


def sync_sites(events: list[dict], steps: int, top: int) -> list[dict]:
    """Synchronizing runtime calls grouped by the host operators enclosing them (per thread:
    a sweep over start times with a stack of the operators still open)."""
    waiting_copies = {event["args"]["correlation"] for event in events
                      if event.get("cat") == "gpu_memcpy" and "correlation" in event.get("args", {})
                      and _copy_waits(event["name"])}
    by_thread: dict = defaultdict(list)
    for event in events:
        waits = event.get("cat") == "cuda_runtime" and (
            event["name"] in SYNC_CALLS
            or (event["name"] in COPY_CALLS and event.get("args", {}).get("correlation") in waiting_copies))
        if event.get("cat") == "cpu_op" or waits:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    sites = []
    for thread_events in by_thread.values():
        # Enclosing operators first at equal start times (longer first).
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ops: list[dict] = []
        for event in thread_events:
            while open_ops and open_ops[-1]["ts"] + open_ops[-1]["dur"] <= event["ts"]:
                open_ops.pop()
            if event.get("cat") == "cpu_op":
                open_ops.append(event)
            else:
                chain = " > ".join(op["name"] for op in open_ops[:3]) or "(no host operator)"
                sites.append({"name": f"{event['name']} in {chain}", "dur": event["dur"]})
    return top_by_total(sites, steps, top)


def idle_gaps(events: list[dict], steps: int, top: int, min_gap_us: float = 10.0) -> dict:
    """Where the GPU waits for the host: the idle intervals of at least `min_gap_us` between
    kernels (from the first kernel's start to the last one's end), per step; `launched_by`: their
    time by the runtime call that launched the kernel ending each gap and the host operators
    and ranges enclosing that call (outermost three); `host_during`: on the launching threads,
    each host event's overlap with the gaps (inclusive: nested events count in their parents
    too), i.e. what the host was doing while the GPU had nothing to run."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    gaps, busy_until = [], None
    for kernel in kernels:
        if busy_until is not None and kernel["ts"] - busy_until >= min_gap_us:
            gaps.append((busy_until, kernel["ts"], kernel))
        busy_until = max(busy_until or kernel["ts"], kernel["ts"] + kernel["dur"])
    # Triton launches through the driver API (`cuLaunchKernelEx`), torch through the runtime.
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host_by_thread: dict = defaultdict(list)
    for event in events:
        if event.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"):
            host_by_thread[(event.get("pid"), event.get("tid"))].append(event)
    launched_by: dict[str, float] = defaultdict(float)
    during: dict[str, float] = defaultdict(float)
    threads = set()
    for gap_start, gap_end, kernel in gaps:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            launched_by["(launch not in the trace)"] += gap_end - gap_start
            continue
        thread = (launch.get("pid"), launch.get("tid"))
        threads.add(thread)
        enclosing = sorted((e for e in host_by_thread[thread] if e.get("cat") in ("cpu_op", "user_annotation")
                            and e["ts"] <= launch["ts"] < e["ts"] + e["dur"]), key=lambda e: (e["ts"], -e["dur"]))
        chain = " > ".join(e["name"] for e in enclosing[:3]) or "(no host operator)"
        launched_by[f"{launch['name']} in {chain}"] += gap_end - gap_start
    gap_ends = [end for _, end, _ in gaps]  # sorted, as the gaps are
    for thread in threads:
        for event in host_by_thread[thread]:
            event_end = event["ts"] + event["dur"]
            first = bisect.bisect_right(gap_ends, event["ts"])  # the first gap ending after the event starts
            for start, end, _ in itertools.takewhile(lambda gap: gap[0] < event_end, gaps[first:]):
                during[event["name"]] += min(end, event_end) - max(start, event["ts"])

    def ranked(total_us: dict[str, float]) -> list[dict]:
        names = sorted(total_us, key=total_us.get, reverse=True)[:top]
        return [{"name": name, "ms_per_step": round(total_us[name] / 1e3 / steps, 4)} for name in names]

    return {
        "min_gap_us": min_gap_us,
        "gaps_per_step": round(len(gaps) / steps, 1),
        "idle_ms_per_step": round(sum(end - start for start, end, _ in gaps) / 1e3 / steps, 4),
        "launched_by": ranked(launched_by),
        "host_during": ranked(during),
    }


def graph_replays(events: list[dict]) -> dict | None:
    """Per CUDA-graph replay (a decode step of SGLang's graphs): from its first kernel to the
    next replay's first kernel, the period, the time the GPU is busy in it and its kernels;
    medians over the replays after the first (the first follows the prefill batch's results,
    which SGLang processes inside the profiled range), and the first separately. None if the
    trace replays fewer than three graphs."""
    launches = {e["args"]["correlation"] for e in events
                if e.get("name") == "cudaGraphLaunch" and "correlation" in e.get("args", {})}
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    starts: dict = {}
    for kernel in kernels:
        correlation = kernel.get("args", {}).get("correlation")
        if correlation in launches:
            starts.setdefault(correlation, kernel["ts"])
    firsts = sorted(starts.values())
    if len(firsts) < 3:
        return None
    steps = []
    for start, end in zip(firsts, firsts[1:]):
        inside = [k for k in kernels if start <= k["ts"] < end]
        busy = busy_time((k["ts"], min(end, k["ts"] + k["dur"])) for k in inside)
        steps.append({"period_ms": (end - start) / 1e3, "busy_ms": busy / 1e3, "kernels": len(inside)})
    later = steps[1:]

    def median(key: str) -> float:
        return round(statistics.median(step[key] for step in later), 4)

    return {
        "replays": len(firsts),
        "period_ms_median": median("period_ms"),
        "busy_ms_median": median("busy_ms"),
        "idle_ms_median": round(statistics.median(step["period_ms"] - step["busy_ms"] for step in later), 4),
        "kernels_median": median("kernels"),
        "period_ms_max": round(max(step["period_ms"] for step in later), 4),
        "first": {key: round(value, 4) for key, value in steps[0].items()},
    }


def _copy_waits(copy_name: str) -> bool:
    """The GPU copy's name, e.g. 'Memcpy HtoD (Pageable -> Device)': does its runtime call
    return only when the copy is done?"""
    return "DtoH" in copy_name or "Pageable" in copy_name


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
    summary["sync_sites"] = sync_sites(events, steps, top)
    summary["idle_gaps"] = idle_gaps(events, steps, top)
    replays = graph_replays(events)
    if replays is not None:
        summary["graph_replays"] = replays
    return summary


HOST_CATEGORIES = ("cpu_op", "cuda_runtime", "cuda_driver")


def top_level_host_ops(events: list[dict], start: float, end: float, layers: int, top: int) -> dict:
    """Host events in [start, end) not nested in another one (an operator, a runtime or driver
    call: what the host did, each counted once), by name, per layer over `layers` layers;
    and the time between them (Python outside any operator: argument handling, Triton's
    launcher)."""
    host = sorted((e for e in events if e.get("cat") in HOST_CATEGORIES and start <= e["ts"] < end),
                  key=lambda e: (e["ts"], -e["dur"]))
    outer, covered_until = [], float("-inf")
    for event in host:
        if event["ts"] >= covered_until:
            outer.append(event)
            covered_until = event["ts"] + event["dur"]
    calls, total_us = totals_by_name(outer)
    names = sorted(total_us, key=total_us.get, reverse=True)[:top]
    return {
        "between_ops_ms_per_layer": round((end - start - sum(total_us.values())) / 1e3 / layers, 3),
        "ops": [{"name": name, "calls_per_layer": round(calls[name] / layers, 2),
                 "us_per_layer": round(total_us[name] / layers, 1)} for name in names],
    }


def layer_periods(events: list[dict], marker: str, yardstick: str = "aten::linear", top: int = 20) -> dict:
    """Host time of a one-step trace by layer, from the start times of `marker` (once per layer),
    in ms: `before_first_layer`, `first_layer`, `median_layer` (the later ones),
    `after_last_layer` (from the last layer's marker to the end of the step), and the median
    duration of `yardstick` calls in µs; with three or more layers, what the host did in the
    later layers' periods (`top_level_host_ops`, per layer). The step is SGLang's `step[...]`
    range when the trace holds one (the trace itself runs on into the next batch, whose
    `run_batch` range also holds the profiler's own stop), else the whole trace."""
    events = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    starts = sorted(e["ts"] for e in events if e.get("name") == marker)
    if len(starts) < 2:
        raise ValueError(f"{marker!r} occurs {len(starts)} times: a layer marker must occur once per layer")
    steps = [e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("step[")]
    bounds = steps if len(steps) == 1 else events
    trace_start = min(e["ts"] for e in bounds)
    trace_end = max(e["ts"] + e["dur"] for e in bounds)
    periods = [later - earlier for earlier, later in zip(starts, starts[1:])]
    yardstick_us = sorted(e["dur"] for e in events if e.get("name") == yardstick)
    return {
        "layers": len(starts),
        "before_first_layer_ms": round((starts[0] - trace_start) / 1e3, 3),
        "first_layer_ms": round(periods[0] / 1e3, 3),
        "median_layer_ms": round(statistics.median(periods[1:]) / 1e3, 3) if len(periods) > 1 else None,
        "after_last_layer_ms": round((trace_end - starts[-1]) / 1e3, 3),
        "yardstick": yardstick,
        "yardstick_median_us": round(statistics.median(yardstick_us), 1) if yardstick_us else None,
        "later_layers": (top_level_host_ops(events, starts[1], starts[-1], len(starts) - 2, top)
                         if len(starts) > 2 else None),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="forward steps the trace holds")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--layer-marker", help="a host operator each layer runs once: adds `layer_periods`")
    parser.add_argument("--yardstick", default="aten::linear", help="host operator whose median time is reported")
    args = parser.parse_args(argv)
    events = load_events(args.trace)
    summary = summarize(events, args.steps, args.top)
    if args.layer_marker:
        summary["layer_periods"] = layer_periods(events, args.layer_marker, args.yardstick, args.top)
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
