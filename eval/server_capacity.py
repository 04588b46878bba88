#!/usr/bin/env python3
"""Start SGLang once per KV config and measure what it holds, how fast it runs, and
whether it answers like stock SGLang.

For each config (`bf16` = stock SGLang, otherwise a --kv-compress YAML) this script:
launches `python -m sglang.launch_server` with dummy weights, waits for /health, reads
`max_total_num_tokens` (and the plugin's own report) from /server_info, and then
  - per prompt length: one request for a single token (its latency is the prefill time)
    and one for --max-new-tokens (the difference, per token, is the decode time);
  - sends the last prompt again (--repeats times, streamed: time to first token and decode
    ms/token) to check that the radix cache reuses the (compressed) prefix; with
    --profile-repeat-steps S, once more under SGLang's profiler (its prefill step and S decode
    steps; last of all, as below);
  - optionally (--batch-decode B P N, repeatable): B requests at once, first for 1 token, then for N
    (fresh prompts); the difference gives the batch's decode tokens per second, over
    --batch-rounds rounds (median and range); with
    --profile-decode-steps S, one more such round under SGLang's torch profiler (its
    /start_profile, S decode steps; last of all, since exporting the trace stalls the server
    and the profiler's trace can crash it later), summarized per step by eval/trace_summary.py;
  - optionally (--identical N P): N copies of one P-token prompt at once (the radix cache
    swaps a chunk of one copy for another's cached tokens): all complete, same tokens;
  - optionally (--fidelity-samples K): K fixed prompts, greedy, with log-probabilities; after
    all configs, each one's tokens and log-probabilities are compared with the bf16 run's
    (--fidelity-concurrent sends the K at once, so that requests finish and free their KV
    while others still decode, as under load);
  - optionally (--arrivals N RATE P NEW): N requests arriving at RATE per second (a seeded
    Poisson process), each for NEW/2..NEW tokens, so that requests join and finish while
    others decode (continuous batching, which the batch rounds, all arriving and finishing
    together, never exercise): output tokens per second and request latencies. SGLang's
    own `bench_serving` does the same but needs the model's tokenizer, which a
    dummy-weight checkpoint lacks;
  - optionally (--concurrent): many requests at once, then checks the server is healthy;
records GPU memory, stops the server, and appends everything to a JSON file (rewritten
after every config, so a timeout keeps what was measured).

    python eval/server_capacity.py --model-path M --configs bf16 configs/qwen_8x.yaml \
        --prompt-lens 8192 32704 --out results.json

The stock server runs with the graph settings --kv-compress forces (prefill graph off; decode
graphs off too with SGLANG_KVC_TRITON=0, the torch reference path), so the two differ only in
the KV pool and its attention; the overlap scheduler is on for both unless --server-args
passes --disable-overlap-schedule to both. Stdlib and
sglang_kvc only on the client side, so it runs in the GPU image as is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

COMMON_SERVER_ARGS = [
    "--load-format", "dummy",
    "--skip-tokenizer-init",
    "--attention-backend", "triton",
    "--sampling-backend", "pytorch",
    "--host", "127.0.0.1",
]
VOCAB = 150_000


def stock_settings_like_compressed() -> list[str]:
    """The settings patches.server_args forces with --kv-compress, for the stock run."""
    from sglang_kvc.runtime import triton_kernels_enabled

    flags = ["--disable-prefill-cuda-graph"]
    if not triton_kernels_enabled():
        flags.append("--disable-decode-cuda-graph")
    return flags


def http_json(url: str, payload: dict | None = None, timeout: float = 900) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return time.time() - start
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(2)
    raise TimeoutError(f"not healthy after {timeout} s")


def streamed_json(url: str, payload: dict, timeout: float = 900) -> tuple[dict, list[tuple[float, int]]]:
    """POST with "stream": true; (the last chunk, [(seconds since the request, completion
    tokens so far) per chunk]). SGLang sends server-sent events, `data: {json}` per chunk,
    then `data: [DONE]`."""
    data = json.dumps({**payload, "stream": True}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    last: dict = {}
    arrivals: list[tuple[float, int]] = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            last = json.loads(line[len("data:"):])
            if "error" in last:
                raise RuntimeError(f"streamed request failed: {last['error']}")
            arrivals.append((time.perf_counter() - start, last.get("meta_info", {}).get("completion_tokens", 0)))
    return last, arrivals


def token_timing(arrivals: list[tuple[float, int]]) -> dict:
    """Time to the first token (the prefill, plus the queueing) and the decode time per token
    after it, from a streamed request's chunk arrivals."""
    if not arrivals:
        return {"ttft_s": None, "decode_ms_per_token": None}
    first_s, first_tokens = arrivals[0]
    last_s, last_tokens = arrivals[-1]
    per_token = (last_s - first_s) / (last_tokens - first_tokens) * 1000 if last_tokens > first_tokens else None
    return {"ttft_s": round(first_s, 4),
            "decode_ms_per_token": round(per_token, 2) if per_token is not None else None}


def generate(url: str, input_ids: list[int], max_new_tokens: int, logprobs: bool = False,
             stream: bool = False) -> dict:
    """One greedy request; with `stream`, also its time to first token and decode time per
    token (`token_timing`)."""
    payload = {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0},
        "return_logprob": logprobs,
    }
    start = time.perf_counter()
    if stream:
        result, arrivals = streamed_json(url + "/generate", payload)
    else:
        result = http_json(url + "/generate", payload)
    elapsed = time.perf_counter() - start
    meta = result.get("meta_info", {})
    record = {
        "prompt_tokens": meta.get("prompt_tokens"),
        "cached_tokens": meta.get("cached_tokens"),
        "completion_tokens": meta.get("completion_tokens", len(result.get("output_ids", []))),
        "finish_reason": meta.get("finish_reason"),
        "latency_s": round(elapsed, 4),
        "output_ids_head": result.get("output_ids", [])[:8],
    }
    if logprobs:
        record["output_ids"] = result.get("output_ids", [])
        record["output_logprobs"] = [entry[0] for entry in meta.get("output_token_logprobs", [])]
    if stream:
        record.update(token_timing(arrivals))
    return record


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(length)]


def timed_prompt(url: str, rng: random.Random, prompt_len: int, max_new_tokens: int) -> dict:
    """A prompt for one token (prefill time) and another of the same length for
    max_new_tokens: the difference per extra token is the decode time per token. A first
    request of that length warms the server up (Triton compiles kernels for new shapes on
    first use). Fresh random prompts, so none hits the radix cache."""
    generate(url, random_prompt(rng, prompt_len), 2)
    prefill = generate(url, random_prompt(rng, prompt_len), 1)
    ids = random_prompt(rng, prompt_len)
    result = generate(url, ids, max_new_tokens)
    result["ids"] = ids
    result["prefill_s"] = prefill["latency_s"]
    if max_new_tokens > 1:
        result["decode_ms_per_token"] = round(
            (result["latency_s"] - prefill["latency_s"]) / (max_new_tokens - 1) * 1000, 2
        )
    result["ok"] = (
        result["completion_tokens"] == max_new_tokens
        and result["prompt_tokens"] == prompt_len
        and prefill["completion_tokens"] == 1
    )
    return result


def repeat_prompts(url: str, prompts: list[list[int]], times: int, max_new_tokens: int) -> list[dict]:
    """Each of `prompts` sent again `times` times in a row, streamed (time to first token);
    ok when all but its last token came from the radix cache."""
    repeats = []
    for ids in prompts:
        for _ in range(times):
            repeat = generate(url, ids, max_new_tokens, stream=True)
            repeat["ok"] = (repeat["cached_tokens"] or 0) >= len(ids) - 1
            repeats.append(repeat)
    return repeats


def concurrently(url: str, prompts: list[list[int]], max_new_tokens: int, logprobs: bool = False,
                 stall_s: float | None = None, on_stall=None) -> tuple[float, list[dict]]:
    """Send all prompts at once; (wall seconds, results; failures as {"error": ...}). The wall
    ends when the last request returns (each thread notes its own end: the polling loop
    below only watches for stalls: its 0.2 s period quantized the walls of serving runs 29-43,
    docs/results/serving-2026-11-30-h.md). With `stall_s`: if no request
    finishes for that long, call `on_stall()` and stop waiting (the unfinished ones count
    as failed; the wall is then the time waited)."""
    results: list[dict] = [{} for _ in prompts]
    ended = [0.0] * len(prompts)

    def send(i: int) -> None:
        try:
            results[i] = generate(url, prompts[i], max_new_tokens, logprobs=logprobs)
        except Exception as exc:  # noqa: BLE001 - counted as a failed request
            results[i] = {"error": f"{type(exc).__name__}: {exc}"}
        ended[i] = time.perf_counter()

    start = time.perf_counter()
    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    finished, last_progress = 0, start
    while finished < len(threads):
        time.sleep(0.2)
        now_finished = sum(not thread.is_alive() for thread in threads)
        if now_finished != finished:
            finished, last_progress = now_finished, time.perf_counter()
        elif stall_s is not None and time.perf_counter() - last_progress > stall_s:
            if on_stall is not None:
                on_stall()
            for i, thread in enumerate(threads):
                if thread.is_alive():
                    results[i] = {"error": f"stalled: no request finished for {stall_s:g} s"}
            return time.perf_counter() - start, results
    return max(ended, default=start) - start, results


def scheduler_pids(server: subprocess.Popen) -> list[int]:
    """The server's scheduler processes (SGLang titles them `sglang::scheduler...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != server.pid:
                continue
            if b"sglang::scheduler" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def diagnose_stall(server: subprocess.Popen, dumps: int = 3, interval_s: float = 2.0) -> dict:
    """What a server that stopped finishing requests is doing: the GPU's utilization (a kernel
    that never ends keeps it busy; a scheduler that admits nothing leaves it idle) and, via
    the handlers of sglang_kvc.diagnostics, each scheduler's KV accounting (SIGUSR2) and its
    Python stacks (SIGUSR1), written to the server log, the stacks `dumps` times `interval_s`
    apart (the same frame every time: blocked there)."""
    pids = scheduler_pids(server)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)
    utilization = []
    for _ in range(dumps):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        utilization.append(gpu_query("utilization.gpu"))
        time.sleep(interval_s)
    return {"scheduler_pids": pids, "stack_dumps_in_log": dumps if pids else 0,
            "gpu_utilization_pct": utilization}


def batch_decode(url: str, rng: random.Random, batch: int, prompt_len: int, max_new_tokens: int,
                 rounds: int = 1) -> dict:
    """`batch` requests at once for one token, then `batch` fresh ones for max_new_tokens:
    the extra wall time is the batch decoding max_new_tokens - 1 steps. Repeated `rounds`
    times with fresh prompts; the medians are reported with the range, since one server's
    rounds differ by several percent (serving-2026-11-29-v5.md: stock 1948-2168 tok/s)."""
    concurrently(url, [random_prompt(rng, prompt_len) for _ in range(batch)], 2)  # warm-up
    per_round, errors = [], []
    for _ in range(rounds):
        prefill_wall, prefill_results = concurrently(url, [random_prompt(rng, prompt_len) for _ in range(batch)], 1)
        full_wall, full_results = concurrently(url, [random_prompt(rng, prompt_len) for _ in range(batch)],
                                               max_new_tokens)
        decode_s = full_wall - prefill_wall
        completed = sum(1 for r in full_results if r.get("completion_tokens") == max_new_tokens)
        round_errors = [r["error"] for r in prefill_results + full_results if "error" in r]
        # A round with failed requests has no throughput (a refused connection returns at once).
        measured = completed == batch and not round_errors and decode_s > 0
        per_round.append({
            "prefill_wall_s": round(prefill_wall, 3),
            "full_wall_s": round(full_wall, 3),
            "completed": completed,
            "decode_tokens_per_s": round(batch * (max_new_tokens - 1) / decode_s, 1) if measured else None,
        })
        errors += round_errors
    throughputs = [r["decode_tokens_per_s"] for r in per_round if r["decode_tokens_per_s"] is not None]
    summary = {
        "batch": batch,
        "prompt_len": prompt_len,
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "prefill_wall_s": statistics.median(r["prefill_wall_s"] for r in per_round),
        "full_wall_s": statistics.median(r["full_wall_s"] for r in per_round),
        "completed": min(r["completed"] for r in per_round),
        "decode_tokens_per_s": statistics.median(throughputs) if throughputs else None,
        "decode_tokens_per_s_range": [min(throughputs), max(throughputs)] if throughputs else None,
        "per_round": per_round,
        "errors": errors[:5],
    }
    summary["ok"] = summary["completed"] == batch and not errors
    return summary


def identical_prompts(url: str, rng: random.Random, count: int, prompt_len: int, max_new_tokens: int) -> dict:
    """`count` copies of one fresh prompt sent at once: the radix cache sees the same content
    from requests admitted together, and with a prompt below the chunked-prefill size one copy
    fits a pass whole while the next is chunked there, so the tree gives the copy cached second
    the other's tokens for their common chunk (a case that crashed the compressed server's
    candidates until `7a2dfda`). Ok when every copy completes and all give the same greedy
    tokens."""
    ids = random_prompt(rng, prompt_len)
    wall, results = concurrently(url, [ids] * count, max_new_tokens)
    completed = [r for r in results if r.get("completion_tokens") == max_new_tokens]
    heads = {tuple(r.get("output_ids_head", [])) for r in completed}
    return {
        "count": count, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
        "wall_s": round(wall, 3), "completed": len(completed),
        "cached_tokens": [r.get("cached_tokens") for r in results],
        "same_output": len(heads) == 1,
        "errors": [r["error"] for r in results if "error" in r][:5],
        "ok": len(completed) == count and len(heads) == 1,
    }


def batch_decode_shapes(url: str, rng: random.Random, shapes: list[list[int]], rounds: int) -> dict:
    """`batch_decode` for each (batch, prompt_len, new_tokens) shape on one server: the first
    as "batch_decode" (what earlier reports hold), the others as "batch_decode_more"."""
    results = [batch_decode(url, rng, batch, prompt_len, new_tokens, rounds) for batch, prompt_len, new_tokens in shapes]
    return {"batch_decode": results[0], **({"batch_decode_more": results[1:]} if len(results) > 1 else {})}


def staggered_arrivals(url: str, rng: random.Random, count: int, rate: float, prompt_len: int,
                       max_new_tokens: int) -> dict:
    """`count` fresh prompts arriving as a Poisson process of `rate` requests per second,
    each asking for between max_new_tokens // 2 and max_new_tokens tokens (both drawn from
    `rng`, so every server gets the same schedule): the output tokens per second over the
    whole run and the requests' latencies."""
    offsets, elapsed = [], 0.0
    for _ in range(count):
        elapsed += rng.expovariate(rate)
        offsets.append(elapsed)
    lengths = [rng.randint(max(1, max_new_tokens // 2), max_new_tokens) for _ in range(count)]
    prompts = [random_prompt(rng, prompt_len) for _ in range(count)]
    results: list[dict] = [{} for _ in range(count)]
    start = time.perf_counter()

    def send(i: int) -> None:
        time.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        sent = time.perf_counter()
        try:
            results[i] = generate(url, prompts[i], lengths[i])
            results[i]["latency_s"] = time.perf_counter() - sent
        except Exception as exc:  # noqa: BLE001 - counted as a failed request
            results[i] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    completed = [r for r, wanted in zip(results, lengths) if r.get("completion_tokens") == wanted]
    latencies = sorted(r["latency_s"] for r in completed)
    summary = {
        "requests": count, "rate_per_s": rate, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
        "completed": len(completed),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(sum(r["completion_tokens"] for r in completed) / wall, 1),
        "latency_s": {"median": round(statistics.median(latencies), 3),
                      "p90": round(latencies[int(0.9 * (len(latencies) - 1))], 3),
                      "max": round(latencies[-1], 3)} if latencies else None,
        "errors": [r["error"] for r in results if "error" in r][:5],
    }
    summary["ok"] = summary["completed"] == count
    return summary


def profiled(url: str, trace_dir: Path, steps: int, send, stages: tuple[str, ...],
             timeout: float = 300) -> dict[str, dict]:
    """Run `send()` under SGLang's profiler by stage (its /start_profile: the first prefill
    steps and then `steps` decode steps, each stage its own trace); per stage in `stages`
    ("EXTEND", "DECODE"), the new trace's per-step summary (eval/trace_summary.py) over
    `steps` steps for DECODE and over the one prefill step profiled for EXTEND."""
    import trace_summary  # eval/trace_summary.py, next to this script

    trace_dir.mkdir(parents=True, exist_ok=True)
    before = {stage: set(trace_dir.glob(f"*{stage}*.trace.json.gz")) for stage in stages}
    request = urllib.request.Request(
        url + "/start_profile", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"output_dir": str(trace_dir.resolve()), "num_steps": steps, "profile_by_stage": True,
                         "activities": ["CPU", "GPU"], "with_stack": False}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
    send()
    summaries: dict[str, dict] = {}
    deadline = time.monotonic() + timeout  # a trace is written after its stage's last profiled step
    while time.monotonic() < deadline and len(summaries) < len(stages):
        for stage in stages:
            traces = set(trace_dir.glob(f"*{stage}*.trace.json.gz")) - before[stage]
            if stage not in summaries and traces:
                time.sleep(2)  # let the writer finish the file
                trace = max(traces, key=lambda path: path.stat().st_mtime)
                stage_steps = steps if stage == "DECODE" else 1
                summaries[stage] = {"trace": trace.name,
                                    **trace_summary.summarize(trace_summary.load_events(trace), stage_steps)}
        time.sleep(1)
    missing = [stage for stage in stages if stage not in summaries]
    if missing:
        raise TimeoutError(f"no {'/'.join(missing)} trace in {trace_dir} after {timeout} s")
    return summaries


def profile_batch_decode(url: str, rng: random.Random, batch: int, prompt_len: int, max_new_tokens: int,
                         steps: int, trace_dir: Path) -> dict:
    """One more batch round with the profiler on for `steps` decode steps; the decode
    trace's per-step summary."""
    if steps >= max_new_tokens - 1:
        raise ValueError(f"--profile-decode-steps ({steps}) must be below the batch's new tokens - 1")
    prompts = [random_prompt(rng, prompt_len) for _ in range(batch)]
    summary = profiled(url, trace_dir, steps, lambda: concurrently(url, prompts, max_new_tokens), ("DECODE",))
    return {"batch": batch, "prompt_len": prompt_len, **summary["DECODE"]}


def profile_repeat(url: str, ids: list[int], max_new_tokens: int, steps: int, trace_dir: Path) -> dict:
    """The repeated prompt once more with the profiler on: its prefill step (a radix-cache
    hit: one new token over the cached prefix) and its first `steps` decode steps."""
    if steps >= max_new_tokens - 1:
        raise ValueError(f"--profile-repeat-steps ({steps}) must be below --max-new-tokens - 1")
    sent: dict = {}
    summary = profiled(url, trace_dir, steps, lambda: sent.update(generate(url, ids, max_new_tokens, stream=True)),
                       ("EXTEND", "DECODE"))
    return {"request": sent, "prefill": summary["EXTEND"], "decode": summary["DECODE"]}


def fidelity_samples(url: str, seed: int, count: int, prompt_len: int, max_new_tokens: int,
                     at_once: bool = False) -> list[dict]:
    """The same `count` prompts for every config (seeded), greedy, with log-probabilities;
    one after another, or all at once (`at_once`)."""
    rng = random.Random(seed + 7)
    prompts = [random_prompt(rng, prompt_len) for _ in range(count)]
    if at_once:
        _, results = concurrently(url, prompts, max_new_tokens, logprobs=True)
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise RuntimeError(f"{len(failed)} of {count} fidelity requests failed: {failed[0]}")
    else:
        results = [generate(url, prompt, max_new_tokens, logprobs=True) for prompt in prompts]
    return [{key: result[key] for key in ("output_ids", "output_logprobs", "cached_tokens")} for result in results]


def compare_with_stock(samples: list[dict], stock: list[dict]) -> dict:
    """Greedy agreement with the stock run: per sample, how many leading tokens match (the
    contexts are identical up to the first difference, so only there are log-probabilities
    comparable) and |log-prob difference| of the tokens in that matching prefix."""
    matched, compared, diffs = [], [], []
    for ours, theirs in zip(samples, stock, strict=True):
        length = min(len(ours["output_ids"]), len(theirs["output_ids"]))
        prefix = next((i for i in range(length) if ours["output_ids"][i] != theirs["output_ids"][i]), length)
        matched.append(prefix)
        compared.append(length)
        diffs += [abs(a - b) for a, b in zip(ours["output_logprobs"][:prefix], theirs["output_logprobs"][:prefix])]
    return {
        "samples": len(samples),
        "identical_samples": sum(m == c for m, c in zip(matched, compared)),
        "matching_prefix_fraction": round(sum(matched) / max(1, sum(compared)), 4),
        "first_difference_at": [m if m < c else None for m, c in zip(matched, compared)],
        "logprob_abs_diff_mean": round(sum(diffs) / len(diffs), 5) if diffs else None,
        "logprob_abs_diff_max": round(max(diffs), 5) if diffs else None,
        "tokens_compared": len(diffs),
    }


def pressure(url: str, process: subprocess.Popen, args) -> dict:
    """Many requests at once (half share a prefix, so the radix cache is shared and then
    evicted under pressure); afterwards the server must be alive, idle and healthy (its
    idle check raises on a leaked slot or row)."""
    rng = random.Random(args.seed + 1)
    shared_prefix = [rng.randrange(VOCAB) for _ in range(args.pressure_len // 2)]
    prompts = []
    for i in range(args.concurrent):
        tail_len = args.pressure_len - (len(shared_prefix) if i % 2 else 0)
        head = shared_prefix if i % 2 else []
        prompts.append(head + [rng.randrange(VOCAB) for _ in range(tail_len)])
    stall: dict = {}
    wall, results = concurrently(url, prompts, args.max_new_tokens, stall_s=args.stall_s,
                                 on_stall=lambda: stall.update(diagnose_stall(process)))
    time.sleep(5)  # let the scheduler go idle and run its leak check
    completed = sum(1 for r in results if r.get("completion_tokens") == args.max_new_tokens)
    alive = process.poll() is None
    try:
        with urllib.request.urlopen(url + "/health", timeout=30) as response:
            healthy = response.status == 200
    except (urllib.error.URLError, OSError):
        healthy = False
    summary = {
        "requests": len(prompts),
        "prompt_len": args.pressure_len,
        "completed": completed,
        "wall_s": round(wall, 1),
        "cached_tokens_total": sum(r.get("cached_tokens") or 0 for r in results),
        "server_alive": alive,
        "healthy_after": healthy,
        "errors": [r["error"] for r in results if "error" in r][:5],
    }
    if stall:
        summary["stall"] = stall
    summary["ok"] = completed == len(prompts) and alive and healthy
    print(f"[pressure] {summary}", flush=True)
    return summary


def kvc_environment() -> dict[str, str]:
    """The SGLANG_KVC_* variables the servers inherit (a decode kernel in place of the engine's
    choice, the torch reference path, a trace): part of what a run measured."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("SGLANG_KVC_")}


def gpu_query(field: str, gpu: int = 0) -> int | None:
    """One `nvidia-smi --query-gpu` integer field of GPU `gpu` (None without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-i", str(gpu), f"--query-gpu={field}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_one(args, config: str, log_dir: Path) -> dict:
    name = "bf16" if config == "bf16" else Path(config).stem
    # Absolute paths and a neutral working directory: run from the repository root,
    # `python -m` would import the source folder sglang_kvc/ instead of the installed
    # package (whose kernels/ and patches/ are mapped into it).
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", os.path.abspath(args.model_path),
               "--port", str(args.port), *COMMON_SERVER_ARGS, *args.server_args]
    command += stock_settings_like_compressed() if config == "bf16" else ["--kv-compress", os.path.abspath(config)]
    record: dict = {"config": name, "command": " ".join(command)}
    log_path = log_dir / f"server-{name}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_dir.resolve()
        )
    url = f"http://127.0.0.1:{args.port}"
    try:
        record["startup_s"] = round(wait_healthy(url, process, args.startup_timeout), 1)
        info = http_json(url + "/server_info")
        record["max_total_num_tokens"] = info.get("max_total_num_tokens")
        record["max_running_requests"] = info.get("max_running_requests")
        record["kv_compress"] = info.get("kv_compress")
        record["gpu_memory_used_mib"] = gpu_query("memory.used")
        record["cuda_graph"] = {key: info.get(key) for key in
                                ("disable_cuda_graph", "disable_decode_cuda_graph", "disable_prefill_cuda_graph",
                                 "cuda_graph_max_bs")}
        record["overlap_schedule"] = not info.get("disable_overlap_schedule", True)
        rng = random.Random(args.seed)
        requests, prompt_ids = [], []
        for prompt_len in args.prompt_lens:
            result = timed_prompt(url, rng, prompt_len, args.max_new_tokens)
            ids = result.pop("ids")
            prompt_ids.append(ids)
            requests.append(result)
            print(f"[{name}] prompt {prompt_len}: {result}", flush=True)
        if args.repeat_earlier and len(prompt_ids) > 1:
            record["earlier_repeats"] = repeat_prompts(url, prompt_ids[:-1], 1, args.max_new_tokens)
            for repeat in record["earlier_repeats"]:
                print(f"[{name}] earlier prompt repeated: {repeat}", flush=True)
        # The same prompt again (--repeats times): its prefix must come from the radix cache.
        if args.prompt_lens and args.repeats:
            repeats = repeat_prompts(url, [ids], args.repeats, args.max_new_tokens)
            for repeat in repeats:
                print(f"[{name}] repeated prompt: {repeat}", flush=True)
            record["repeat_prompt"] = repeats[0]
            record["repeat_latencies_s"] = [r["latency_s"] for r in repeats]
            record["repeat_ttft_s"] = [r["ttft_s"] for r in repeats]
            record["repeat_decode_ms_per_token"] = [r["decode_ms_per_token"] for r in repeats]
            record["repeat_prompt"]["ok"] = all(r["ok"] for r in repeats)
        record["requests"] = requests
        record["ok"] = (all(r["ok"] for r in requests + record.get("earlier_repeats", []))
                        and record.get("repeat_prompt", {"ok": True})["ok"])
        if args.batch_decode:
            record.update(batch_decode_shapes(url, rng, args.batch_decode, args.batch_rounds))
            for result in [record["batch_decode"], *record.get("batch_decode_more", [])]:
                print(f"[{name}] batch decode: {result}", flush=True)
                record["ok"] = record["ok"] and result["ok"]
        if args.arrivals:
            count, rate, prompt_len, max_new = args.arrivals
            record["arrivals"] = staggered_arrivals(url, rng, int(count), rate, int(prompt_len), int(max_new))
            print(f"[{name}] arrivals: {record['arrivals']}", flush=True)
            record["ok"] = record["ok"] and record["arrivals"]["ok"]
        if args.identical:
            count, prompt_len = args.identical
            record["identical"] = identical_prompts(url, rng, count, prompt_len, args.max_new_tokens)
            print(f"[{name}] identical prompts: {record['identical']}", flush=True)
            record["ok"] = record["ok"] and record["identical"]["ok"]
        if args.fidelity_samples:
            record["fidelity_samples"] = fidelity_samples(
                url, args.seed, args.fidelity_samples, args.fidelity_len, args.fidelity_new_tokens,
                at_once=args.fidelity_concurrent,
            )
        if args.concurrent:
            record["pressure"] = pressure(url, process, args)
            record["ok"] = record["ok"] and record["pressure"]["ok"]
        # Last: a profiled server may die later of a segmentation fault in the torch
        # profiler's trace destructor, whenever the garbage collector reaches it (runs 20b and
        # 23: during the next workload), so nothing runs on a server after its profile.
        if args.profile_repeat_steps:
            record["repeat_profile"] = profile_repeat(
                url, ids, args.max_new_tokens, args.profile_repeat_steps, log_dir / f"profile-repeat-{name}")
            print(f"[{name}] repeat profile: " + json.dumps(
                {stage: {k: record["repeat_profile"][stage][k] for k in ("span_ms", "gpu_busy_ms",
                                                                         "kernel_launches_per_step")}
                 for stage in ("prefill", "decode")}), flush=True)
        elif args.profile_decode_steps:
            batch, prompt_len, max_new = args.batch_decode[0]
            record["decode_profile"] = profile_batch_decode(
                url, rng, batch, prompt_len, max_new, args.profile_decode_steps, log_dir / f"profile-{name}")
            print(f"[{name}] decode profile: " + json.dumps(
                {k: record["decode_profile"][k] for k in ("span_ms", "gpu_busy_ms", "kernel_launches_per_step")}),
                flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded, and the next config still runs
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["ok"] = False
        print(f"[{name}] FAILED: {record['error']}", flush=True)
    finally:
        stop(process)
        record["server_log_tail"] = log_path.read_text(errors="replace").splitlines()[-40:]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--configs", nargs="+", required=True, help="'bf16' or paths to --kv-compress YAMLs")
    parser.add_argument("--prompt-lens", type=int, nargs="*", default=[8192, 32704],
                        help="single-request lengths (none: skip that phase and the repeated prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1,
                        help="send the last prompt again this many times (0 with --profile-repeat-steps: profile "
                             "the first repeat)")
    parser.add_argument("--repeat-earlier", action="store_true",
                        help="before those repeats, send every earlier --prompt-lens prompt again once (is a first "
                             "repeat's extra time paid once per server or once per cached prompt?)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--batch-decode", type=int, nargs=3, action="append", metavar=("BATCH", "PROMPT_LEN", "NEW_TOKENS"),
                        help="decode throughput of BATCH requests at once; repeatable (one server, several shapes; "
                             "the profile takes the first)")
    parser.add_argument("--batch-rounds", type=int, default=3,
                        help="repeat the batch round this often (fresh prompts), report medians and the range")
    parser.add_argument("--profile-decode-steps", type=int, default=0,
                        help="then profile this many decode steps of one more batch round (needs --batch-decode)")
    parser.add_argument("--profile-repeat-steps", type=int, default=0,
                        help="instead, profile the repeated prompt once more: its prefill step and this many "
                             "decode steps (needs --prompt-lens)")
    parser.add_argument("--arrivals", type=float, nargs=4, metavar=("COUNT", "RATE", "PROMPT_LEN", "NEW_TOKENS"),
                        help="COUNT requests arriving at RATE per second (Poisson), each for NEW_TOKENS/2..NEW_TOKENS")
    parser.add_argument("--identical", type=int, nargs=2, metavar=("COUNT", "PROMPT_LEN"),
                        help="COUNT copies of one prompt at once (PROMPT_LEN below the chunked-prefill size)")
    parser.add_argument("--fidelity-samples", type=int, default=0, help="greedy prompts compared with the bf16 run")
    parser.add_argument("--fidelity-len", type=int, default=4096)
    parser.add_argument("--fidelity-new-tokens", type=int, default=32)
    parser.add_argument("--fidelity-concurrent", action="store_true",
                        help="send the fidelity prompts all at once instead of one after another")
    parser.add_argument("--concurrent", type=int, default=0, help="then send this many requests at once")
    parser.add_argument("--pressure-len", type=int, default=8192, help="prompt length of those requests")
    parser.add_argument("--stall-s", type=float, default=45,
                        help="if none of those requests finishes for this long, record the GPU's utilization "
                             "and the schedulers' Python stacks (in the server log) and stop waiting")
    parser.add_argument("--out", required=True)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()

    out = Path(args.out)
    log_dir = Path(args.log_dir or out.parent)
    log_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "script": "eval/server_capacity.py " + " ".join(sys.argv[1:]),
        "gpu": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else None,
        "sglang_version": package_version("sglang"),
        "environment": kvc_environment(),
        "runs": [],
    }
    if args.repeats < (0 if args.profile_repeat_steps else 1):
        parser.error(f"--repeats must be at least 1 (0 with --profile-repeat-steps: the profile is then the first "
                     f"repeat), got {args.repeats}")
    if args.batch_rounds < 1:
        parser.error(f"--batch-rounds must be at least 1, got {args.batch_rounds}")
    if args.profile_decode_steps and not args.batch_decode:
        parser.error("--profile-decode-steps profiles the --batch-decode round: give --batch-decode")
    if args.profile_repeat_steps and not args.prompt_lens:
        parser.error("--profile-repeat-steps profiles the repeated prompt: give --prompt-lens")
    if args.profile_repeat_steps and args.profile_decode_steps:
        parser.error("one profile per server (a profiled server may crash later): give --profile-repeat-steps "
                     "or --profile-decode-steps")
    if args.arrivals:
        count, rate, prompt_len, new_tokens = args.arrivals
        if not (rate > 0 and all(value >= 1 and value.is_integer() for value in (count, prompt_len, new_tokens))):
            parser.error("--arrivals needs whole COUNT, PROMPT_LEN, NEW_TOKENS >= 1 and RATE > 0, "
                         f"got {args.arrivals}")
    if args.fidelity_samples and "bf16" not in args.configs:
        parser.error("--fidelity-samples compares with the stock run: include bf16 in --configs")
    for config in args.configs:
        report["runs"].append(run_one(args, config, log_dir))
        out.write_text(json.dumps(report, indent=1))
    stock = next((r for r in report["runs"] if r["config"] == "bf16"), None)
    if args.fidelity_samples and stock and "fidelity_samples" in stock:
        for run in report["runs"]:
            if run is not stock and "fidelity_samples" in run:
                run["fidelity"] = compare_with_stock(run["fidelity_samples"], stock["fidelity_samples"])
                print(f"[{run['config']}] against bf16: {run['fidelity']}", flush=True)
        out.write_text(json.dumps(report, indent=1))
    return 0 if all(r["ok"] for r in report["runs"]) else 1


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
