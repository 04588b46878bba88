"""LongBench v1: templates, truncation, the run/resume path against a local fake server, scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eval import longbench
from eval.client import ServerConfig, read_jsonl, write_jsonl
from eval.longbench import RunConfig
from eval.tokens import PromptTokenizer
from eval_test_support import FIXTURES

DATA_DIR = FIXTURES / "longbench"
FIXTURE_DATASETS = (
    "narrativeqa", "multifieldqa_zh", "gov_report", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)

# What the fake model answers, per record id; the hand-computed scores below follow from these.
CANNED_PREDICTIONS = {
    "nqa-1": "The old lighthouse keeper",
    "nqa-2": "Paris",
    "mfz-1": "答案是北京。",
    "mfz-2": "上海",
    "gr-1": "the cat sat on the mat",
    "vc-1": "我爱北京",
    "trec-1": "Location\nQuestion: Who painted it?",
    "trec-2": "\nNumber or Date",
    "tq-1": "Paris\nPassage: more text",
    "sam-1": "Anna will bring the cake.\nSecond line",
    "sam-2": "",
    "lsht-1": "财经\n体育",
    "pc-1": "There are 7 unique paragraphs out of 10.",
    "pc-2": "3",
    "pre-1": "Paragraph 12 and Paragraph 3",
    "prz-1": "答案是段落5，不是段落15",
    "lcc-1": "\n```python\n# add them\n    return a + b\n```",
    "lcc-2": "x = compute(y)",
    "rb-1": "// TODO\nreturn y",
    "hqe-1": "1932",
    "hqe-2": "Valdora",
    "hqe-3": "Vienna, Austria",
    "hqe-4": "nothing",
}


def fixture_records(longbench_e: bool = False) -> dict[str, list[dict]]:
    names = ("hotpotqa",) if longbench_e else FIXTURE_DATASETS
    return {name: read_jsonl(longbench.data_path(DATA_DIR, name, longbench_e)) for name in names}


def canned_responder(path: str, body: dict) -> str:
    """Find the fixture record whose context is in the prompt and answer its canned prediction."""
    prompt = body["prompt"] if "prompt" in body else body["messages"][0]["content"]
    for longbench_e in (False, True):
        for records in fixture_records(longbench_e).values():
            for record in records:
                if record["context"] in prompt and record["input"] in prompt:
                    return CANNED_PREDICTIONS[record["_id"]]
    raise AssertionError(f"no fixture record matches prompt {prompt[:80]!r}")


@pytest.fixture
def tokenizer_dir(word_tokenizer):
    texts = list(longbench.DATASET_TO_PROMPT.values())
    texts += [r["context"] + " " + r["input"] for records in fixture_records().values() for r in records]
    return word_tokenizer(texts)


def run_longbench(server, tokenizer_dir: Path, out_dir: Path, **overrides) -> dict:
    config = RunConfig(**{
        "data_dir": DATA_DIR, "out_dir": out_dir, "tokenizer_path": str(tokenizer_dir),
        "datasets": FIXTURE_DATASETS, "concurrency": 4, **overrides,
    })
    return longbench.run(config, ServerConfig(base_url=server.url, max_retries=0))


# ---------------------------------------------------------------------------------- templates


def test_config_covers_all_21_datasets_with_spec_budgets():
    assert list(longbench.DATASET_TO_PROMPT) == list(longbench.DATASETS)
    assert list(longbench.DATASET_TO_MAX_NEW_TOKENS) == list(longbench.DATASETS)
    budgets = longbench.DATASET_TO_MAX_NEW_TOKENS
    assert (budgets["narrativeqa"], budgets["multifieldqa_en"], budgets["hotpotqa"], budgets["gov_report"]) == (128, 64, 32, 512)
    assert (budgets["samsum"], budgets["trec"], budgets["lcc"], budgets["passage_count"]) == (128, 64, 64, 32)
    assert sum(longbench.EXPECTED_SAMPLES.values()) == 4750
    assert set(longbench.LONGBENCH_E_DATASETS) < set(longbench.DATASETS) and len(longbench.LONGBENCH_E_DATASETS) == 13


def test_templates_are_verbatim_with_official_typos():
    record = {"context": "CTX", "input": "Q"}
    narrativeqa = longbench.build_prompt("narrativeqa", record)
    assert "Answer the question asconcisely as you can" in narrativeqa
    assert narrativeqa.endswith("\n\nQuestion: Q\n\nAnswer:")
    assert "Article: CTX\n\n Answer the question based on the above article" in longbench.build_prompt("qasper", record)
    assert longbench.build_prompt("lcc", record) == "Please complete the code given below. \nCTXNext line of code:\n"
    assert longbench.build_prompt("repobench-p", record) == "Please complete the code given below. \nCTXQNext line of code:\n"
    assert longbench.build_prompt("passage_count", record).endswith("such as 1, 2, 3, and so on.\n\nThe final answer is: ")


# --------------------------------------------------------------------------------- truncation


def test_truncation_keeps_half_the_budget_from_each_end_and_glues_the_halves(word_tokenizer):
    words = [f"w{i}" for i in range(12)]
    tokenizer = PromptTokenizer.from_path(str(word_tokenizer([" ".join(words)])))
    prompt = " ".join(words)
    # ids = [<s>, w0 .. w11]: 13 > 12, half = 6 -> ids[:6] = <s> w0..w4, ids[-6:] = w6..w11.
    # <s> counts toward the budget but is skipped when decoding; the halves are decoded
    # separately and concatenated without a separator, as upstream (hence "w4w6").
    assert tokenizer.truncate_middle_longbench(prompt, 12) == "w0 w1 w2 w3 w4w6 w7 w8 w9 w10 w11"
    # odd budget: half = int(7 / 2) = 3 -> <s> w0 w1 | w9 w10 w11
    assert tokenizer.truncate_middle_longbench(prompt, 7) == "w0 w1w9 w10 w11"
    assert tokenizer.truncate_middle_longbench(prompt, 13) == prompt  # fits with <s>: unchanged


def test_truncation_v2_decodes_once_and_keeps_extra_tail_token_for_odd_budget(word_tokenizer):
    words = [f"w{i}" for i in range(12)]
    tokenizer = PromptTokenizer.from_path(str(word_tokenizer([" ".join(words)])))
    prompt = " ".join(words)
    # max_len 5: ids[:5 // 2] + ids[-5 // 2:] = ids[:2] + ids[-3:] = <s> w0 + w9 w10 w11
    assert tokenizer.truncate_middle_longbench_v2(prompt, 5) == "w0 w9 w10 w11"
    assert tokenizer.truncate_middle_longbench_v2(prompt, 13) == prompt


# ----------------------------------------------------------------------------- run and resume


def test_run_routes_builds_prompts_and_sets_generation_params(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = canned_responder
    run_longbench(fake_server, tokenizer_dir, tmp_path / "out")

    records = fixture_records()
    assert len(fake_server.requests) == sum(len(r) for r in records.values()) == 19
    newline_id = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]["\n"]
    by_prompt = {request.prompt: request for request in fake_server.requests}
    for dataset, dataset_records in records.items():
        for record in dataset_records:
            request = by_prompt[longbench.build_prompt(dataset, record)]  # untruncated template
            raw = dataset in {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
            assert request.path == ("/v1/completions" if raw else "/v1/chat/completions"), dataset
            if not raw:
                assert request.body["messages"] == [{"role": "user", "content": request.prompt}]
            assert request.body["temperature"] == 0
            assert request.body["max_tokens"] == longbench.DATASET_TO_MAX_NEW_TOKENS[dataset]
            if dataset == "samsum":  # stop on the "\n" token after at least one token
                assert request.body["stop_token_ids"] == [newline_id]
                assert request.body["min_tokens"] == 1
            else:
                assert "stop_token_ids" not in request.body and "stop" not in request.body

    trec_request = by_prompt[longbench.build_prompt("trec", records["trec"][0])]
    assert trec_request.body["prompt"] == (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "Question: What is the capital of Peru?\nType: Location\nQuestion: When was the bridge built?\nType: Date\n"
        "Question: Where is the Louvre?\nType:"
    )
    saved = read_jsonl(tmp_path / "out" / "trec.jsonl")
    assert {r["_id"]: r["pred"] for r in saved} == {"trec-1": CANNED_PREDICTIONS["trec-1"], "trec-2": "\nNumber or Date"}
    assert saved[0]["all_classes"] == records["trec"][0]["all_classes"]


def test_rerun_skips_done_ids_and_retries_only_missing_ones(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = canned_responder
    out_dir = tmp_path / "out"
    run_longbench(fake_server, tokenizer_dir, out_dir)
    assert len(fake_server.requests) == 19

    run_longbench(fake_server, tokenizer_dir, out_dir)
    assert len(fake_server.requests) == 19  # everything was done: nothing sent

    narrativeqa = out_dir / "narrativeqa.jsonl"
    write_jsonl(narrativeqa, [r for r in read_jsonl(narrativeqa) if r["_id"] == "nqa-1"])
    with narrativeqa.open("a", encoding="utf-8") as f:
        f.write('{"_id": "nqa-2", "pr')  # a run killed mid-write leaves a torn line
    summaries = run_longbench(fake_server, tokenizer_dir, out_dir)
    assert len(fake_server.requests) == 20
    assert "Where does Mara travel" in fake_server.requests[-1].prompt
    assert summaries["narrativeqa"].completed == 1 and summaries["trec"].completed == 0
    assert sorted(r["_id"] for r in read_jsonl(narrativeqa)) == ["nqa-1", "nqa-2"]


def test_long_prompts_are_middle_truncated_before_sending(fake_server, tokenizer_dir, tmp_path):
    run_longbench(fake_server, tokenizer_dir, tmp_path / "out", datasets=("narrativeqa",), max_length=20)
    tokenizer = PromptTokenizer.from_path(str(tokenizer_dir))
    record = fixture_records()["narrativeqa"][0]
    full_prompt = longbench.build_prompt("narrativeqa", record)
    expected = tokenizer.truncate_middle_longbench(full_prompt, 20)
    # head: ids[:10] = <s> + 9 tokens; tail: ids[-10:] = ": Who keeps the lighthouse ? \n \n Answer :"
    # (the word-level decoder joins tokens with spaces; the halves are glued as they are)
    assert expected == "You are given a story , which can be: Who keeps the lighthouse ? \n \n Answer :"
    assert expected in [request.prompt for request in fake_server.requests]


# ------------------------------------------------------------------------------------- scoring


def test_score_matches_hand_computed_values(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = canned_responder
    run_longbench(fake_server, tokenizer_dir, tmp_path / "out")
    result = longbench.score_dir(tmp_path / "out")

    assert result["datasets"] == pytest.approx({
        "narrativeqa": 40.0,  # nqa-1: max(F1 vs "lighthouse keeper" = 0.8, vs "mara" = 0); nqa-2: 0 -> 100*0.8/2
        "multifieldqa_zh": 75.0,  # [答案,是,北京] vs [北京] = 0.5; [上海] vs [上海] = 1 -> 100*1.5/2
        "gov_report": 80.0,  # ROUGE-L 2*0.8*0.8/(1.6+1e-8) = 0.7999999950 -> 80.0
        "vcsum": 66.67,  # "我 爱 北京" vs "我 爱 上海": P = R = 2/3 -> 66.666666...
        "trec": 75.0,  # "Location" -> 1; first line "Number or Date" -> [Date, Number] -> 1/2
        "triviaqa": 100.0,  # first line "Paris" == gold "Paris"
        "samsum": 50.0,  # identical first line: 2/(2+1e-8) = 0.999999995; "" -> 0 -> 49.99999975
        "lsht": 100.0,  # first line "财经" -> only class matched
        "passage_count": 75.0,  # [7, 10] vs 7 -> 1/2; [3] vs 3 -> 1 -> 100*1.5/2
        "passage_retrieval_en": 50.0,  # [12, 3] vs 12 -> 1/2
        "passage_retrieval_zh": 50.0,  # [5, 15] vs 5 -> 1/2
        "lcc": 96.5,  # first code line equal -> 1.0; difflib 2*13/28 = 0.929 -> 93 -> 0.93
        "repobench-p": 88.0,  # "return y" vs "return x": 2*7/16 = 0.875 -> round(87.5) = 88
    }, abs=1e-9)
    assert result["num_samples"]["lcc"] == 2

    en, zh = result["summary"]["en"], result["summary"]["zh"]
    # Single-Doc 40; Summ 80; Few-shot (75 + 100 + 50)/3 = 75; Synthetic (75 + 50)/2 = 62.5;
    # Code (96.5 + 88)/2 = 92.25; Multi-Doc absent -> Avg = 349.75 / 5 = 69.95
    assert en["categories"] == {"Single-Doc QA": 40.0, "Summarization": 80.0, "Few-shot": 75.0,
                                "Synthetic": 62.5, "Code": 92.25}
    assert en["avg"] == 69.95 and not en["complete"]
    assert "hotpotqa" in en["missing_datasets"]
    # zh: 75 + 66.67 + 100 + 50 + 92.25 = 383.92 -> / 5 = 76.784
    assert zh["avg"] == 76.78 and zh["missing_datasets"] == ["dureader"]


def test_cli_score_writes_result_json(fake_server, tokenizer_dir, tmp_path, capsys):
    fake_server.responder = canned_responder
    run_longbench(fake_server, tokenizer_dir, tmp_path / "out", datasets=("narrativeqa",))
    assert longbench.main(["score", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["datasets"] == {"narrativeqa": 40.0}
    assert "narrativeqa           40.00  (n=2 of 200)" in capsys.readouterr().out


def test_longbench_e_reads_e_files_and_buckets_by_length(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = canned_responder
    run_longbench(fake_server, tokenizer_dir, tmp_path / "e", datasets=("hotpotqa",), longbench_e=True)
    assert len(fake_server.requests) == 4
    assert all("Passage 1:" in request.prompt for request in fake_server.requests)  # from hotpotqa_e.jsonl
    result = longbench.score_dir(tmp_path / "e", longbench_e=True)
    # lengths 1500 and 3999 -> 0-4k: "1932" = 1; "valdora" vs "valdora city": P=1, R=1/2 -> 2/3
    #   -> mean 0.8333 -> 83.33
    # 4000 -> 4-8k: "vienna austria" vs "vienna": P=1/2, R=1 -> 2/3 -> 66.67
    # 12000 -> 8k+: 0
    assert result["datasets"] == {"hotpotqa": {"0-4k": 83.33, "4-8k": 66.67, "8k+": 0.0}}


def test_empty_length_bucket_is_none():
    records = [{"pred": "1932", "answers": ["1932"], "all_classes": None, "length": 10}]
    assert longbench.score_records_by_length("hotpotqa", records) == {"0-4k": 100.0, "4-8k": None, "8k+": None}


# ------------------------------------------------------------------------------------- compare


def test_compare_scores_common_ids_and_reports_relative_drop(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = canned_responder
    base_dir, compressed_dir = tmp_path / "base", tmp_path / "compressed"
    run_longbench(fake_server, tokenizer_dir, base_dir)
    shutil.copytree(base_dir, compressed_dir)
    narrativeqa = read_jsonl(compressed_dir / "narrativeqa.jsonl")
    for record in narrativeqa:
        record["pred"] = "no idea"
    write_jsonl(compressed_dir / "narrativeqa.jsonl", narrativeqa)
    write_jsonl(compressed_dir / "trec.jsonl", [r for r in read_jsonl(base_dir / "trec.jsonl") if r["_id"] == "trec-1"])

    output = tmp_path / "compare.md"
    assert longbench.main(["compare", str(base_dir), str(compressed_dir), "--output", str(output)]) == 0
    table = output.read_text()
    assert table.startswith("| Dataset | n | Base | Compressed | Rel. drop (%) |\n")
    assert "| narrativeqa | 2 | 40.00 | 0.00 | 100.00 |" in table
    assert "| trec | 1 | 100.00 | 100.00 | 0.00 |" in table  # only trec-1 is in both runs
    assert "| lcc | 2 | 96.50 | 96.50 | 0.00 |" in table
    # base en: Single 40, Summ 80, Few-shot (100 + 100 + 50)/3, Synthetic 62.5, Code 92.25
    #   -> 358.0833 / 5 = 71.62; compressed: Single 0 -> 318.0833 / 5 = 63.62
    # drop = 100 * (71.62 - 63.62) / 71.62 = 11.17
    assert "| **Avg (en), incomplete** |  | 71.62 | 63.62 | 11.17 |" in table


def test_relative_drop():
    assert longbench.relative_drop(50.0, 40.0) == 20.0
    assert longbench.relative_drop(40.0, 50.0) == -25.0  # an improvement is a negative drop
    assert longbench.relative_drop(0.0, 0.0) is None


def test_cli_run_passes_options_through(fake_server, tokenizer_dir, tmp_path):
    fake_server.responder = canned_responder
    argv = ["run", "--data-dir", str(DATA_DIR), "--tokenizer", str(tokenizer_dir), "--out-dir", str(tmp_path),
            "--datasets", "trec,lcc", "--limit", "1", "--base-url", fake_server.url, "--model", "qwen",
            "--concurrency", "2", "--max-retries", "0"]
    assert longbench.main(argv) == 0
    assert sorted(r.body["prompt"][-20:] for r in fake_server.requests) == sorted([
        longbench.build_prompt("trec", fixture_records()["trec"][0])[-20:],
        longbench.build_prompt("lcc", fixture_records()["lcc"][0])[-20:],
    ])
    assert {r.body["model"] for r in fake_server.requests} == {"qwen"}
    assert [r["_id"] for r in read_jsonl(tmp_path / "trec.jsonl")] == ["trec-1"]


def test_cli_rejects_unknown_dataset(tmp_path):
    with pytest.raises(SystemExit, match="unknown dataset"):  # narrativeqa is not in LongBench-E
        longbench.main(["run", "--data-dir", str(DATA_DIR), "--tokenizer", "x", "--out-dir", str(tmp_path),
                        "--e", "--datasets", "narrativeqa"])
