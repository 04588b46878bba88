"""The report of eval/tiny/serve_eval.py (the servers run on the GPU); its shared-context
groups are tested with eval/tiny/shared_suite.py."""

from __future__ import annotations

from eval.server_capacity import stock_settings_like_compressed
from eval.tiny.serve_eval import markdown, parse_config, server_command


def test_config_names():
    assert parse_config("bf16") == ("bf16", None)
    assert parse_config("configs/qwen_8x.yaml") == ("qwen_8x", "configs/qwen_8x.yaml")
    assert parse_config("qwen_8x+triton:configs/qwen_8x.yaml") == ("qwen_8x+triton", "configs/qwen_8x.yaml")
    assert parse_config("long: pooling 63:/tmp/a/03-long-pooling-63.yaml") == (
        "long: pooling 63", "/tmp/a/03-long-pooling-63.yaml")


def test_stock_servers_differ_from_compressed_ones_in_the_pool_only():
    """Stock takes the graph settings --kv-compress forces (decode graphs and the overlap
    scheduler as the compressed server has them), nothing more."""
    stock = server_command("eval/tiny/model", 30000, None)
    compressed = server_command("eval/tiny/model", 30000, "configs/qwen_8x_tuned.yaml")
    assert stock[-len(stock_settings_like_compressed()):] == stock_settings_like_compressed()
    assert "--disable-overlap-schedule" not in stock and "--kv-compress" not in stock
    assert compressed[:len(stock) - len(stock_settings_like_compressed())] == stock[:len(stock) - len(stock_settings_like_compressed())]
    assert compressed[-2] == "--kv-compress" and compressed[-1].endswith("configs/qwen_8x_tuned.yaml")
    extra = ["--chunked-prefill-size", "16384"]
    assert server_command("eval/tiny/model", 30000, "configs/qwen_8x_tuned.yaml", extra) == compressed + extra
    assert server_command("eval/tiny/model", 30000, None, extra) == stock + extra


def test_markdown_reports_relative_accuracy_and_errors():
    report = {
        "date": "d", "device": "H200", "command": "c", "versions": {"sglang": "0.5.17", "torch": "2.11"},
        "suite": {"tasks": ["kv"], "lengths": [1024], "samples": 2, "seed": 0},
        "shared_context": {"contexts": 1, "questions": 2, "length": 1024},
        "servers": [
            {"name": "bf16", "suite": {"mean_accuracy": 0.8, "accuracy": {"kv": {"1024": 0.8}}}},
            {"name": "x", "suite": {"mean_accuracy": 0.4, "accuracy": {"kv": {"1024": 0.4}}},
             "shared_context": {"isolated": {"accuracy": 0.5},
                                "shared": {"accuracy": 0.25, "accuracy_of_reusing_requests": 0.0,
                                           "served_document_from_cache": 1, "reusing_requests": 1}}},
            {"name": "y", "error": "RuntimeError: boom"},
        ],
    }
    table = markdown(report)
    assert "| x | 0.400 | 50.0% | 0.40 | 0.50 | 0.25 | 0.00 | 1/1 | - |" in table
    assert "| y | error: RuntimeError: boom |" in table
    assert "1 kv contexts x 2 questions" in table


def test_markdown_without_the_suite_shows_the_shared_context_only():
    report = {
        "date": "d", "device": "H200", "command": "c", "versions": {"sglang": "0.5.17", "torch": "2.11"},
        "suite": {"tasks": ["kv"], "lengths": [1024], "samples": 0, "seed": 0},
        "shared_context": {"task": "multikey", "contexts": 1, "questions": 2, "length": 1024},
        "servers": [
            {"name": "x", "shared_context": {"isolated": {"accuracy": 1.0},
                                             "shared": {"accuracy": 0.5, "accuracy_of_reusing_requests": 0.0,
                                                        "served_document_from_cache": 1, "reusing_requests": 1},
                                             "context_first": {"accuracy": 0.25}}},
        ],
    }
    table = markdown(report)
    assert "Suite: not run. Shared context: 1 multikey contexts x 2 questions" in table
    assert "| x | - | - | 1.00 | 0.50 | 0.00 | 1/1 | 0.25 |" in table
    assert "SGLANG_KVC" not in table


def test_the_report_names_the_servers_sglang_kvc_environment(monkeypatch):
    """A decode kernel put in by SGLANG_KVC_DECODE_KERNEL (or any SGLANG_KVC_* the servers
    inherit) is recorded with the run and shown under its table."""
    from eval.server_capacity import kvc_environment

    monkeypatch.delenv("SGLANG_KVC_TRITON", raising=False)
    monkeypatch.setenv("SGLANG_KVC_DECODE_KERNEL", "v5:64:r168")
    monkeypatch.setenv("SGLANG_KVCX", "not ours")
    environment = kvc_environment()
    assert environment.get("SGLANG_KVC_DECODE_KERNEL") == "v5:64:r168" and "SGLANG_KVCX" not in environment
    report = {
        "date": "d", "device": "H200", "command": "c", "versions": {"sglang": "0.5.17", "torch": "2.11"},
        "environment": {"SGLANG_KVC_DECODE_KERNEL": "v5:64:r168"},
        "suite": {"tasks": ["kv"], "lengths": [1024], "samples": 2, "seed": 0},
        "shared_context": {"contexts": 0, "questions": 2, "length": 1024},
        "servers": [{"name": "x", "suite": {"mean_accuracy": 0.5, "accuracy": {"kv": {"1024": 0.5}}}}],
    }
    assert "`SGLANG_KVC_DECODE_KERNEL=v5:64:r168`." in markdown(report)


def test_compare_matches_servers_to_reference_configs_and_pairs_kernel_paths():
    from eval.tiny.compare import compare

    reference = {"full": {"kv-1024-0": "1", "kv-1024-1": "2"}, "c": {"kv-1024-0": "1", "kv-1024-1": "9"}}
    servers = {"bf16": {"kv-1024-0": "1", "kv-1024-1": "2"}, "c": {"kv-1024-0": "1", "kv-1024-1": "2"},
               "c+triton": {"kv-1024-0": "7", "kv-1024-1": "2"}}
    rows = {(row["left"], row["right"]): row["agreement"] for row in compare(reference, servers)}
    assert rows[("transformers full", "server bf16")] == 1.0
    assert rows[("transformers c", "server c")] == 0.5
    assert rows[("transformers c", "server c+triton")] == 0.0
    assert rows[("server c", "server c+triton")] == 0.5
    assert len(rows) == 4


def test_servers_run_one_per_gpu_at_once_in_config_order():
    import threading
    import time

    from eval.tiny.serve_eval import run_servers

    busy: set[int] = set()
    lock = threading.Lock()
    overlaps = []

    def run_one(name, config, gpu):
        with lock:
            assert gpu not in busy  # one server per GPU at a time
            busy.add(gpu)
            overlaps.append(len(busy))
        time.sleep(0.2)
        with lock:
            busy.discard(gpu)
        return {"name": name, "config": config, "gpu": gpu}

    seen = []
    configs = [("bf16", None), ("a", "a.yaml"), ("b", "b.yaml"), ("c", "c.yaml")]
    start = time.time()
    records = run_servers(configs, 2, run_one, None, lambda records: seen.append([r["name"] for r in records]))
    assert time.time() - start < 0.7  # two at a time: ~0.4 s, one at a time would be 0.8 s
    assert [r["name"] for r in records] == ["bf16", "a", "b", "c"] and max(overlaps) == 2
    assert {r["gpu"] for r in records} == {0, 1}
    assert len(seen) == 4 and seen[-1] == ["bf16", "a", "b", "c"]
    late = run_servers(configs[:2], 1, run_one, time.time() - 1, None)
    assert late == [{"name": "bf16", "error": "not run: deadline"}, {"name": "a", "error": "not run: deadline"}]


def test_compare_takes_runs_of_one_seed_and_count_on_the_samples_they_share(tmp_path):
    import json

    import pytest

    from eval.tiny.compare import compare, load_runs

    reference = {"suite": {"tasks": ["kv"], "lengths": [4096], "samples": 2, "seed": 8},
                 "predictions": {"full": {"kv-4096-0": "1", "kv-4096-1": "2"}}}
    server = {"suite": {"tasks": ["kv", "vt"], "lengths": [2048, 4096], "samples": 2, "seed": 8},
              "servers": [{"name": "bf16", "suite": {"predictions": {"kv-4096-0": "1", "kv-4096-1": "5",
                                                                     "vt-2048-0": "x"}}}]}
    paths = [tmp_path / "reference.json", tmp_path / "server.json"]
    for path, report in zip(paths, (reference, server)):
        path.write_text(json.dumps(report))
    rows = compare(*load_runs(paths[0], paths[1:]))
    assert [(row["agreement"], row["samples"]) for row in rows] == [(0.5, 2)]
    paths[1].write_text(json.dumps({**server, "suite": {**server["suite"], "seed": 9}}))
    with pytest.raises(SystemExit, match="seed 9 differs .* no sample is the same"):
        load_runs(paths[0], paths[1:])
    # Another sample count: the same ids are other prompts (the needle depth depends on it).
    paths[1].write_text(json.dumps({**server, "suite": {**server["suite"], "samples": 3}}))
    with pytest.raises(SystemExit, match="3 samples per cell, .*: 2: the needle depth .* different prompts"):
        load_runs(paths[0], paths[1:])


def test_a_sample_id_names_another_prompt_under_another_sample_count():
    """Why compare checks the count: sample i's needle sits at depth (i + 0.5) / count."""
    from tokenizers import Tokenizer

    from eval.tiny import tasks
    from eval.tiny.quality import MODEL_DIR

    encode = tasks.TokenizerPieceEncoder(Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")))
    two, four = (tasks.eval_samples(encode, ("kv",), (1024,), count, seed=8)[("kv", 1024)] for count in (2, 4))
    assert two[0].answer == four[0].answer  # the same records and question ...
    assert list(two[0].prompt_ids) != list(four[0].prompt_ids)  # ... with the needle elsewhere


def test_compare_counts_right_answers_and_agreement_on_right_or_wrong():
    from eval.tiny.compare import compare

    gold = {"kv-1024-0": "1", "kv-1024-1": "2", "kv-1024-2": "3"}
    reference = {"c": {"kv-1024-0": "1", "kv-1024-1": "7", "kv-1024-2": "8"}}
    servers = {"c": {"kv-1024-0": "1", "kv-1024-1": "9", "kv-1024-2": "3"}}
    [row] = compare(reference, servers, gold)
    assert row["agreement"] == 1 / 3  # only the first answer is the same string
    assert (row["right_left"], row["right_right"]) == (1, 2)
    assert row["same_correctness"] == 2 / 3  # both right on 0, both wrong (differently) on 1
    assert row["right_by_cell"] == {"kv-1024": [1, 2, 3]}


def test_compare_pairs_a_config_the_two_runs_name_differently():
    from eval.tiny.compare import compare

    reference = {"hybrid (base)": {"kv-1024-0": "1"}}
    servers = {"qwen_12x_tuned": {"kv-1024-0": "1"}}
    assert compare(reference, servers) == []
    [row] = compare(reference, servers, same={"qwen_12x_tuned": "hybrid (base)"})
    assert (row["left"], row["right"], row["agreement"]) == ("transformers hybrid (base)", "server qwen_12x_tuned", 1.0)
