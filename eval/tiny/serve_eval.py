"""The tiny model's suites against SGLang servers: stock, and one per compression config.

    python eval/tiny/serve_eval.py --configs bf16 configs/qwen_8x.yaml ... --out DIR \
        [--model-path eval/tiny/model] [--lengths 1024 2048 4096 8192] [--samples 25] \
        [--shared-contexts 20] [--shared-questions 4] [--shared-length 8192] [--shared-task kv|multikey] \
        [--deadline-s 540] [--gpus 2]

Per config it starts `python -m sglang.launch_server` on the bundled model (with
`--kv-compress CONFIG`, or stock for `bf16`; a name:path form such as
`qwen_8x+torch:configs/qwen_8x.yaml` with SGLANG_KVC_TRITON=0 set for the server when the
name ends in `+torch`, =1 for `+triton`; the default is the Triton path), then:

  * suite: the held-out samples of eval/tiny/quality.py (same token ids, same seed), sent as
    `input_ids` to /generate, greedy, stopped at <|im_end|>; exact match of the first line.
    The predictions are kept, so they can be compared one by one with the transformers
    reference path (eval/tiny/quality.py) on the same samples;
  * shared context (--shared-task: key-value lookups, or multi-key needles in filler): one
    document per context and several questions about different needles in it, each a
    separate request whose prompt is document + question (`shared_context_groups`):
      - shared: the first question of a context is answered first, then the others at once,
        so they reuse the document from the radix cache (compressed under the first question);
      - isolated: the radix cache is flushed before every request, so each question
        prefills (and compresses) the document itself;
      - context first: the document alone is sent first (a client caching a context before
        any question), so it is compressed with no question in its window; then every
        question at once, each served the cached document.
    All modes are scored the same way; the gaps are the cost of reusing a compressed prefix.

Writes DIR/serve_eval.json after every config (a deadline or a failure keeps what was
measured) and DIR/serve_eval.md. Server logs: --log-dir (default DIR)/server-NAME.log. With
--gpus N, N servers run at once, one per GPU (each sees only its own; ports --port + i).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from eval.server_capacity import (  # noqa: E402
    gpu_query,
    http_json,
    kvc_environment,
    stock_settings_like_compressed,
    stop,
    wait_healthy,
)
from eval.tiny import tasks  # noqa: E402
from eval.tiny.quality import MODEL_DIR, Suite  # noqa: E402
from eval.tiny.shared_suite import SHARED_TASKS, ContextGroup, shared_context_groups  # noqa: E402
from sglang_kvc import trace as kvc_trace  # noqa: E402

SERVER_ARGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--host", "127.0.0.1",
               "--context-length", "8192", "--mem-fraction-static", "0.5"]


# ---- requests -----------------------------------------------------------------------------------
def answer(url: str, input_ids: list[int], max_new_tokens: int, end_of_answer: int, decode,
           rid: str | None = None) -> dict:
    payload = {"input_ids": input_ids,
               "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                   "stop_token_ids": [end_of_answer]}}
    if rid is not None:  # SGLang's request id (its logs and the kv-compress trace name it)
        payload["rid"] = rid
    result = http_json(url + "/generate", payload)
    meta = result.get("meta_info", {})
    output_ids = [t for t in result.get("output_ids", []) if t != end_of_answer]
    return {"answer": tasks.extract_answer(decode(output_ids)), "cached_tokens": meta.get("cached_tokens")}


def flush_cache(url: str) -> None:
    """SGLang answers /flush_cache with plain text, not JSON."""
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", data=b"{}", method="POST"),
                                timeout=60) as response:
        response.read()


# ---- one server -----------------------------------------------------------------------------------
def run_suite(url, samples, end_of_answer, decode, concurrency: int, name_requests: bool = False) -> dict:
    items = [(task, length, index, sample) for (task, length), group in samples.items()
             for index, sample in enumerate(group)]

    def one(item):
        task, length, index, sample = item
        rid = tasks.sample_id(task, length, index) if name_requests else None
        return item, answer(url, list(sample.prompt_ids), tasks.MAX_NEW_TOKENS[task], end_of_answer, decode, rid)

    correct: dict[str, dict[str, list[int]]] = {}
    predictions = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for (task, length, index, sample), result in pool.map(one, items):
            cell = correct.setdefault(task, {}).setdefault(str(length), [0, 0])
            cell[0] += result["answer"] == sample.answer
            cell[1] += 1
            predictions[tasks.sample_id(task, length, index)] = result["answer"]
    accuracy = {task: {length: hits / total for length, (hits, total) in by_length.items()}
                for task, by_length in correct.items()}
    cells = [value for by_length in accuracy.values() for value in by_length.values()]
    return {"accuracy": accuracy, "mean_accuracy": sum(cells) / len(cells), "predictions": predictions}


def run_shared_context(url, groups: list[ContextGroup], end_of_answer, decode, concurrency: int,
                       max_new: int) -> dict:
    result = {}
    # isolated: nothing reused
    hits = total = 0
    for group in groups:
        for question_ids, expected in group.questions:
            flush_cache(url)
            got = answer(url, list(group.document_ids + question_ids), max_new, end_of_answer, decode)
            hits += got["answer"] == expected
            total += 1
    result["isolated"] = {"accuracy": hits / total, "requests": total}
    # shared: first question alone, then the rest together, reusing the cached document
    hits = total = later_hits = later_total = cached = 0
    flush_cache(url)
    with ThreadPoolExecutor(concurrency) as pool:
        for group in groups:
            prompts = [(list(group.document_ids + q), expected) for q, expected in group.questions]
            first = answer(url, prompts[0][0], max_new, end_of_answer, decode)
            hits += first["answer"] == prompts[0][1]
            total += 1
            for (_, expected), got in zip(prompts[1:], pool.map(
                    lambda p: answer(url, p[0], max_new, end_of_answer, decode), prompts[1:])):
                ok = got["answer"] == expected
                hits += ok
                later_hits += ok
                total += 1
                later_total += 1
                cached += (got["cached_tokens"] or 0) >= len(group.document_ids) - 1
    result["shared"] = {"accuracy": hits / total, "requests": total,
                        "accuracy_of_reusing_requests": later_hits / max(1, later_total),
                        "reusing_requests": later_total, "served_document_from_cache": cached}
    # context first: the document alone (compressed under its own last window, no question in
    # sight), then every question at once, each served the cached document
    hits = total = cached = 0
    flush_cache(url)
    with ThreadPoolExecutor(concurrency) as pool:
        for group in groups:
            answer(url, list(group.document_ids), 1, end_of_answer, decode)
            prompts = [(list(group.document_ids + q), expected) for q, expected in group.questions]
            for (_, expected), got in zip(prompts, pool.map(
                    lambda p: answer(url, p[0], max_new, end_of_answer, decode), prompts)):
                hits += got["answer"] == expected
                total += 1
                cached += (got["cached_tokens"] or 0) >= len(group.document_ids) - 1
    result["context_first"] = {"accuracy": hits / total, "requests": total, "served_document_from_cache": cached}
    return result


def server_command(model_path: Path | str, port: int, config: str | None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The launch command of one server: stock for `config` None, else with --kv-compress;
    `extra_args` last (--server-args, e.g. another chunked-prefill size for both). Stock runs
    use the graph settings --kv-compress forces, so the two differ in the pool only.
    (Until 2026-11-30 stock ran here with decode graphs and the overlap scheduler off, as
    --kv-compress once forced; the bf16 answers in docs/results before then were served so.)"""
    pool = stock_settings_like_compressed() if config is None else ["--kv-compress", str(Path(config).resolve())]
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(Path(model_path).resolve()),
            "--port", str(port), *SERVER_ARGS, *pool, *extra_args]


def run_config(args, name: str, config: str | None, samples, groups, tokenizer, end_of_answer, gpu: int = 0) -> dict:
    """One server on GPU `gpu` (its own port, args.port + gpu): start it, run the suites, stop it."""
    port = args.port + gpu
    command = server_command(args.model_path, port, config, shlex.split(args.server_args))
    env = dict(os.environ)
    if args.gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if name.endswith("+triton"):
        env["SGLANG_KVC_TRITON"] = "1"
    elif name.endswith("+torch"):
        env["SGLANG_KVC_TRITON"] = "0"
    if args.trace is not None:
        env[kvc_trace.ENV] = str((args.log_dir / f"trace-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}.jsonl").resolve())
        env[kvc_trace.RIDS_ENV] = args.trace
    record: dict = {"name": name, "config": config, "command": shlex.join(command), "gpu": gpu,
                    "env": {"SGLANG_KVC_TRITON": env.get("SGLANG_KVC_TRITON", "")}}
    log_path = args.log_dir / f"server-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}.log"
    url = f"http://127.0.0.1:{port}"
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    with open(log_path, "w") as log:
        # A neutral working directory: from the repository root, the source folder would
        # shadow the installed package (whose kernels/ and patches/ are mapped into it).
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=args.log_dir.resolve(), env=env)
    try:
        record["startup_s"] = round(wait_healthy(url, process, 300), 1)
        info = http_json(url + "/server_info")
        record["max_total_num_tokens"] = info.get("max_total_num_tokens")
        record["gpu_memory_used_mib"] = gpu_query("memory.used", gpu)
        if samples:
            start = time.time()
            record["suite"] = run_suite(url, samples, end_of_answer, decode, args.concurrency,
                                        name_requests=args.trace is not None)
            record["suite_seconds"] = round(time.time() - start, 1)
        start = time.time()
        if groups:
            record["shared_context"] = run_shared_context(url, groups, end_of_answer, decode, args.concurrency,
                                                          tasks.MAX_NEW_TOKENS[args.shared_task])
            record["shared_context_seconds"] = round(time.time() - start, 1)
        record["ok"] = process.poll() is None
    except Exception as exc:  # noqa: BLE001 - recorded; the next config still runs
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["ok"] = False
    finally:
        stop(process)
        record["server_log_tail"] = log_path.read_text(errors="replace").splitlines()[-30:]
    return record


# ---- report ---------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    suite = report["suite"]
    shared_setup = report["shared_context"]
    columns = [(task, str(length)) for task in suite["tasks"] for length in suite["lengths"]] if suite["samples"] else []
    lines = [f"# Tiny model on SGLang servers ({report['date']}, {report['device']})", "",
             f"`{report['command']}`", "",
             f"sglang {report['versions']['sglang']}, torch {report['versions']['torch']}. Suite: "
             + (f"{suite['samples']} held-out samples per cell (seed {suite['seed']}), greedy, exact match. "
                if suite["samples"] else "not run. ")
             + f"Shared context: {shared_setup['contexts']} {shared_setup.get('task', 'kv')} contexts x "
             f"{shared_setup['questions']} questions at {shared_setup['length']} tokens."
             + "".join(f" `{name}={value}`." for name, value in report.get("environment", {}).items()), "",
             "| server | mean acc | rel. to bf16 | " + "".join(f"{t} {n} | " for t, n in columns)
             + "shared-context isolated | shared | reusing requests | doc from cache | context first |",
             "|---|---:|---:|" + "---:|" * len(columns) + "---:|---:|---:|---:|---:|"]
    base = next((r for r in report["servers"] if r["name"] == "bf16" and "suite" in r), None)
    for record in report["servers"]:
        if "error" in record and "suite" not in record and "shared_context" not in record:
            lines.append(f"| {record['name']} | error: {record['error']} |")
            continue
        s = record.get("suite")
        head = ["-", "-"] if s is None else [
            f"{s['mean_accuracy']:.3f}",
            f"{100 * s['mean_accuracy'] / base['suite']['mean_accuracy']:.1f}%" if base else "-"]
        cells = [f"{s['accuracy'].get(t, {}).get(n, float('nan')):.2f}" if s else "-" for t, n in columns]
        shared = record.get("shared_context")
        tail = (["-"] * 5 if not shared else
                [f"{shared['isolated']['accuracy']:.2f}", f"{shared['shared']['accuracy']:.2f}",
                 f"{shared['shared']['accuracy_of_reusing_requests']:.2f}",
                 f"{shared['shared']['served_document_from_cache']}/{shared['shared']['reusing_requests']}",
                 f"{shared['context_first']['accuracy']:.2f}" if "context_first" in shared else "-"])
        lines.append(f"| {record['name']} | " + " | ".join(head + cells + tail) + " |")
    return "\n".join(lines) + "\n"


def run_servers(configs: list[tuple[str, str | None]], gpus: int, run_one, deadline_at: float | None,
                on_record=None) -> list[dict]:
    """`run_one(name, config, gpu)` for every config, up to `gpus` at once (one per GPU), started
    in the configs' order; none starts after the time `deadline_at` (its record says so).
    `on_record(records)` sees the records so far (config order, finished ones only) after each
    one ends."""
    records: list[dict | None] = [None] * len(configs)
    free_gpus: queue.Queue[int] = queue.Queue()
    for gpu in range(gpus):
        free_gpus.put(gpu)
    lock = threading.Lock()

    def one(index: int) -> None:
        name, config = configs[index]
        gpu = free_gpus.get()
        try:
            if deadline_at is not None and time.time() > deadline_at:
                record = {"name": name, "error": "not run: deadline"}
            else:
                record = run_one(name, config, gpu)
        finally:
            free_gpus.put(gpu)
        with lock:
            records[index] = record
            if on_record is not None:
                on_record([r for r in records if r is not None])

    with ThreadPoolExecutor(gpus) as pool:
        list(pool.map(one, range(len(configs))))
    return [r for r in records if r is not None]


def parse_config(text: str) -> tuple[str, str | None]:
    if text == "bf16":
        return "bf16", None
    if ":" in text:  # the last colon: names may hold one (eval/ablate.py's "long: ..."), paths do not
        name, path = text.rsplit(":", 1)
        return name, path
    return Path(text).stem, text


def main(argv: list[str] | None = None) -> int:
    import importlib.metadata

    import torch
    from tokenizers import Tokenizer

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, help="bf16, a YAML path, or NAME:PATH")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-path", type=Path, default=MODEL_DIR)
    parser.add_argument("--tasks", nargs="+", default=["passkey", "kv"], choices=tasks.TASK_NAMES)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--samples", type=int, default=25, help="per (task, length); 0: no suite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-contexts", type=int, default=20)
    parser.add_argument("--shared-questions", type=int, default=4)
    parser.add_argument("--shared-length", type=int, default=8192)
    parser.add_argument("--shared-task", default="kv", choices=SHARED_TASKS,
                        help="what the shared documents hold (see shared_context_groups)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--server-args", default="",
                        help="more launch_server flags for every server, one string "
                             "(e.g. \"--chunked-prefill-size 16384 --disable-cuda-graph\")")
    parser.add_argument("--port", type=int, default=30123, help="the first server's; GPU i's serves on port + i")
    parser.add_argument("--gpus", type=int, default=1,
                        help="servers at once, one per GPU (CUDA_VISIBLE_DEVICES), e.g. 2 on a two-GPU machine")
    parser.add_argument("--log-dir", type=Path, help="server logs (default: --out); their tails go to the JSON")
    parser.add_argument("--trace", nargs="?", const="", default=None, metavar="RID_PREFIXES",
                        help="name each suite request TASK-LENGTH-INDEX and have the server write what each "
                             "holds per layer to LOG_DIR/trace-NAME.jsonl (sglang_kvc/trace.py; slow, diagnosis "
                             "only); with a value, only rids starting with one of its comma-separated prefixes")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no new server after this many seconds")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus: at least 1, got {args.gpus}")
    args.log_dir = args.log_dir or args.out
    for folder in (args.out, args.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.time()

    tokenizer = Tokenizer.from_file(str(args.model_path / "tokenizer.json"))
    encode = tasks.TokenizerPieceEncoder(tokenizer)
    end_of_answer = tokenizer.token_to_id("<|im_end|>")
    suite = Suite(tuple(args.tasks), tuple(args.lengths), args.samples, args.seed)
    samples = tasks.eval_samples(encode, suite.tasks, suite.lengths, suite.samples, suite.seed) if suite.samples else {}
    groups = shared_context_groups(encode, args.shared_contexts, args.shared_questions, args.shared_length, args.seed,
                                   args.shared_task)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "eval/tiny/serve_eval.py", *argv]),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {"sglang": importlib.metadata.version("sglang"), "torch": torch.__version__},
        "environment": kvc_environment(),
        "suite": {"tasks": list(suite.tasks), "lengths": list(suite.lengths), "samples": suite.samples,
                  "seed": suite.seed},
        "shared_context": {"task": args.shared_task, "contexts": len(groups), "questions": args.shared_questions,
                           "length": args.shared_length},
        "servers": [],
    }
    def run_one(name: str, config: str | None, gpu: int) -> dict:
        record = run_config(args, name, config, samples, groups, tokenizer, end_of_answer, gpu)
        print(f"[{name}] gpu {gpu}, startup {record.get('startup_s')} s, suite "
              f"{(record.get('suite') or {}).get('mean_accuracy')}, shared "
              f"{json.dumps({k: v.get('accuracy') for k, v in record.get('shared_context', {}).items()})}, "
              f"error {record.get('error')}", flush=True)
        return record

    def write(records: list[dict]) -> None:  # after every server: a deadline or a failure keeps the rest
        report["servers"] = records
        (args.out / "serve_eval.json").write_text(json.dumps(report, indent=1))
        (args.out / "serve_eval.md").write_text(markdown(report))

    deadline_at = None if args.deadline_s is None else started + args.deadline_s
    run_servers([parse_config(text) for text in args.configs], args.gpus, run_one, deadline_at, write)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
