"""eval/trace_summary.py on a hand-made Chrome trace (what torch.profiler exports)."""

from __future__ import annotations

import gzip
import json

import pytest

from eval import trace_summary


def event(cat, name, ts, dur, correlation=None):
    record = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 0}
    if correlation is not None:
        record["args"] = {"correlation": correlation}
    return record


def two_steps():
    """Two 1000 us steps; the second has a host range (kvc.seal) while the GPU idles."""
    return [
        event("user_annotation", "kvc.prepare_replay", 0, 100),
        event("cuda_runtime", "cudaGraphLaunch", 100, 10),
        event("kernel", "attention", 120, 300),
        event("kernel", "gemm", 300, 400),  # overlaps attention: busy 120-700 = 580
        event("user_annotation", "kvc.seal", 1000, 500),
        event("cpu_op", "aten::index", 1010, 20),
        event("cpu_op", "aten::index", 1040, 80),
        event("cpu_op", "aten::nonzero", 1050, 60),
        event("cuda_runtime", "cudaStreamSynchronize", 1060, 40),  # inside index > nonzero
        event("cuda_runtime", "cudaStreamSynchronize", 1130, 270),  # after both closed
        # Copies: only the pageable host-to-device one waits; device-to-device and pinned are queued.
        event("cpu_op", "aten::to", 1410, 30),
        event("cuda_runtime", "cudaMemcpyAsync", 1412, 5, correlation=7),
        event("cuda_runtime", "cudaMemcpyAsync", 1420, 5, correlation=8),
        event("cuda_runtime", "cudaMemcpyAsync", 1430, 6, correlation=9),
        event("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 1500, 1, correlation=7),
        event("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 1501, 1, correlation=8),
        event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1502, 1, correlation=9),
        event("kernel", "attention", 1500, 300),
        {"ph": "i", "name": "marker", "ts": 1999},  # instant events carry no duration: ignored
        event("kernel", "gemm", 1800, 200),  # ends at 2000
    ]


def test_summary_per_step_and_gpu_busy_union(tmp_path):
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": two_steps()}, handle)
    summary = trace_summary.summarize(trace_summary.load_events(path), steps=2, top=5)
    assert summary["span_ms"] == pytest.approx(1.0)  # 0 .. 2000 us over 2 steps
    assert summary["gpu_busy_ms"] == pytest.approx((580 + 500) / 1e3 / 2)
    assert summary["kernel_launches_per_step"] == 2.0
    attention = next(k for k in summary["kernels"] if k["name"] == "attention")
    assert attention == {"name": "attention", "calls": 2, "total_ms": 0.6, "ms_per_step": 0.3}
    assert [r["name"] for r in summary["ranges"]] == ["kvc.seal", "kvc.prepare_replay"]
    assert summary["runtime"][0]["name"] == "cudaStreamSynchronize"
    assert summary["host_ops"][0] == {"name": "aten::index", "calls": 2, "total_ms": 0.1, "ms_per_step": 0.05}
    assert summary["sync_sites"] == [
        {"name": "cudaStreamSynchronize in (no host operator)", "calls": 1, "total_ms": 0.27, "ms_per_step": 0.135},
        {"name": "cudaStreamSynchronize in aten::index > aten::nonzero", "calls": 1, "total_ms": 0.04,
         "ms_per_step": 0.02},
        {"name": "cudaMemcpyAsync in aten::to", "calls": 1, "total_ms": 0.005, "ms_per_step": 0.0025},
    ]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="steps"):
        trace_summary.summarize(two_steps(), steps=0)
    with pytest.raises(ValueError, match="no complete"):
        trace_summary.summarize([{"ph": "i", "name": "x", "ts": 0}], steps=1)


def test_layer_periods_of_a_one_step_trace(tmp_path):
    """Three layers marked by `rope` at 100, 400 and 600 us; the trace runs 50 .. 1000 us."""
    events = [event("cpu_op", "step", 50, 950),
              event("cpu_op", "rope", 100, 10), event("cpu_op", "aten::linear", 120, 30),
              event("cpu_op", "rope", 400, 10), event("cpu_op", "aten::linear", 420, 50),
              event("cpu_op", "rope", 600, 10), event("cpu_op", "aten::linear", 620, 40)]
    # The later layers: one period (400 .. 600 us), rope 10 + linear 50 us in it; nested
    # operators count in their parent only.
    events.append(event("cpu_op", "aten::addmm", 430, 20))
    periods = trace_summary.layer_periods(events, "rope")
    assert periods == {"layers": 3, "before_first_layer_ms": 0.05, "first_layer_ms": 0.3, "median_layer_ms": 0.2,
                       "after_last_layer_ms": 0.4, "yardstick": "aten::linear", "yardstick_median_us": 40,
                       "later_layers": {"between_ops_ms_per_layer": 0.14, "ops": [
                           {"name": "aten::linear", "calls_per_layer": 1.0, "us_per_layer": 50.0},
                           {"name": "rope", "calls_per_layer": 1.0, "us_per_layer": 10.0}]}}
    with pytest.raises(ValueError, match="once per layer"):
        trace_summary.layer_periods(events, "absent")
    # SGLang's step range bounds it when there is one (the trace runs on into the next batch).
    stepped = events + [event("user_annotation", "step[EXTEND bs=1 toks=1]", 80, 820),
                        event("user_annotation", "scheduler.run_batch", 950, 400)]
    assert trace_summary.layer_periods(stepped, "rope") == periods | {"before_first_layer_ms": 0.02,
                                                                      "after_last_layer_ms": 0.3}
    assert trace_summary.layer_periods(events[:5], "rope")["later_layers"] is None  # two layers: no later ones
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    out = tmp_path / "s.json"
    assert trace_summary.main([str(path), "--steps", "1", "--layer-marker", "rope", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["layer_periods"] == periods


def test_idle_gaps_name_the_late_launches_and_what_the_host_did_meanwhile():
    """Kernels busy 50-300, 500-600, 605-700, 900-1000 us: two gaps of 200 us (the 5 us one is
    below the threshold). The first ends with a graph launched after the host's prepare range
    synced; the second with a kernel that `aten::add` launched (as Triton does, through the driver)."""
    launch = "cuda_runtime"
    events = [
        event("user_annotation", "step[DECODE]", 0, 2000),
        event("cpu_op", "aten::mm", 15, 15), event(launch, "cudaLaunchKernel", 20, 5, correlation=1),
        event("kernel", "gemm", 50, 250, correlation=1),
        event("user_annotation", "kvc.prepare_replay", 250, 220),
        event("cpu_op", "aten::nonzero", 300, 100), event(launch, "cudaStreamSynchronize", 310, 80),
        event(launch, "cudaGraphLaunch", 480, 10, correlation=2),
        event("kernel", "attention", 500, 100, correlation=2),
        event("kernel", "merge", 605, 95, correlation=3),
        # Triton launches through the driver API.
        event("cpu_op", "aten::add", 870, 15), event("cuda_driver", "cuLaunchKernelEx", 880, 3, correlation=4),
        event("kernel", "add", 900, 100, correlation=4),
    ]
    gaps = trace_summary.summarize(events, steps=1, top=10)["idle_gaps"]
    assert gaps["gaps_per_step"] == 2 and gaps["idle_ms_per_step"] == pytest.approx(0.4)
    assert gaps["launched_by"] == [
        {"name": "cudaGraphLaunch in step[DECODE]", "ms_per_step": 0.2},
        {"name": "cuLaunchKernelEx in step[DECODE] > aten::add", "ms_per_step": 0.2},
    ]
    assert gaps["host_during"] == [
        {"name": "step[DECODE]", "ms_per_step": 0.4},
        {"name": "kvc.prepare_replay", "ms_per_step": 0.17},
        {"name": "aten::nonzero", "ms_per_step": 0.1},
        {"name": "cudaStreamSynchronize", "ms_per_step": 0.08},
        {"name": "aten::add", "ms_per_step": 0.015},
        {"name": "cudaGraphLaunch", "ms_per_step": 0.01},
        {"name": "cuLaunchKernelEx", "ms_per_step": 0.003},
    ]


def test_graph_replays_give_the_steady_step_and_the_first_apart():
    """Four replays starting at 0, 1000, 1500 and 2000 us (the first step long: it follows the
    prefill); each replay's kernels busy 400 us, the second has a kernel of the next step's
    host work (a 50 us copy) in its period too."""
    events = []
    for replay, start in enumerate((0, 1000, 1500, 2000)):
        events += [event("cuda_runtime", "cudaGraphLaunch", start - 20, 5, correlation=replay),
                   event("kernel", "gemm", start, 300, correlation=replay),
                   event("kernel", "attention", start + 300, 100, correlation=replay)]
    events.append(event("kernel", "copy", 1450, 50, correlation=99))
    replays = trace_summary.graph_replays(events)
    assert replays["replays"] == 4
    assert replays["first"] == {"period_ms": 1.0, "busy_ms": 0.4, "kernels": 2}
    # Later periods: 500 us each; busy 450 and 400 us; kernels 3 and 2.
    assert replays["period_ms_median"] == 0.5 and replays["busy_ms_median"] == 0.425
    assert replays["idle_ms_median"] == 0.075 and replays["kernels_median"] == 2.5
    assert trace_summary.graph_replays(events[:6]) is None  # two replays: no steady step
    assert "graph_replays" in trace_summary.summarize(events, steps=4)
