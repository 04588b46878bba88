#!/usr/bin/env python3
"""Start SGLang once per KV config and measure what it holds and whether it answers.

For each config (`bf16` = stock SGLang, otherwise a --kv-compress YAML) this script:
launches `python -m sglang.launch_server` with dummy weights, waits for /health, reads
`max_total_num_tokens` (and the plugin's own report) from /server_info, sends
`input_ids` requests of each prompt length, sends one prompt twice to check that the
radix cache reuses the (compressed) prefix, records GPU memory, stops the server, and
appends everything to a JSON file (rewritten after every config, so a timeout keeps
what was measured).

    python eval/server_capacity.py --model-path M --configs bf16 configs/qwen_8x.yaml \
        --prompt-lens 8192 32704 --out results.json

Stdlib only on the client side, so it runs in the GPU image as is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
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
# Stock runs use the same graph and scheduler settings --kv-compress forces, so the
# two differ only in the KV pool.
STOCK_SAME_AS_COMPRESSED = ["--disable-decode-cuda-graph", "--disable-prefill-cuda-graph", "--disable-overlap-schedule"]
VOCAB = 150_000


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


def generate(url: str, input_ids: list[int], max_new_tokens: int) -> dict:
    payload = {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0},
    }
    start = time.perf_counter()
    result = http_json(url + "/generate", payload)
    elapsed = time.perf_counter() - start
    meta = result.get("meta_info", {})
    return {
        "prompt_tokens": meta.get("prompt_tokens"),
        "cached_tokens": meta.get("cached_tokens"),
        "completion_tokens": meta.get("completion_tokens", len(result.get("output_ids", []))),
        "finish_reason": meta.get("finish_reason"),
        "latency_s": round(elapsed, 3),
        "output_ids_head": result.get("output_ids", [])[:8],
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
    results: list[dict | None] = [None] * len(prompts)

    def send(i: int) -> None:
        try:
            results[i] = generate(url, prompts[i], args.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - counted as a failed request
            results[i] = {"error": f"{type(exc).__name__}: {exc}"}

    start = time.perf_counter()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    time.sleep(5)  # let the scheduler go idle and run its leak check
    completed = sum(1 for r in results if r and r.get("completion_tokens") == args.max_new_tokens)
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
        "cached_tokens_total": sum((r or {}).get("cached_tokens") or 0 for r in results),
        "server_alive": alive,
        "healthy_after": healthy,
        "errors": [r["error"] for r in results if r and "error" in r][:5],
    }
    summary["ok"] = completed == len(prompts) and alive and healthy
    print(f"[pressure] {summary}", flush=True)
    return summary


def gpu_memory_used_mib() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
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
    command += STOCK_SAME_AS_COMPRESSED if config == "bf16" else ["--kv-compress", os.path.abspath(config)]
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
        record["gpu_memory_used_mib"] = gpu_memory_used_mib()
        rng = random.Random(args.seed)
        requests = []
        for prompt_len in args.prompt_lens:
            ids = [rng.randrange(VOCAB) for _ in range(prompt_len)]
            result = generate(url, ids, args.max_new_tokens)
            result["ok"] = result["completion_tokens"] == args.max_new_tokens and result["prompt_tokens"] == prompt_len
            requests.append(result)
            print(f"[{name}] prompt {prompt_len}: {result}", flush=True)
        # The same prompt again: its prefix must come from the radix cache.
        repeat = generate(url, ids, args.max_new_tokens)
        repeat["ok"] = (repeat["cached_tokens"] or 0) >= args.prompt_lens[-1] - 1
        record["repeat_prompt"] = repeat
        print(f"[{name}] repeated prompt: {repeat}", flush=True)
        record["requests"] = requests
        record["ok"] = all(r["ok"] for r in requests) and repeat["ok"]
        if args.concurrent:
            record["pressure"] = pressure(url, process, args)
            record["ok"] = record["ok"] and record["pressure"]["ok"]
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
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[8192, 32704])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--concurrent", type=int, default=0, help="then send this many requests at once")
    parser.add_argument("--pressure-len", type=int, default=8192, help="prompt length of those requests")
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
        "runs": [],
    }
    for config in args.configs:
        report["runs"].append(run_one(args, config, log_dir))
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
