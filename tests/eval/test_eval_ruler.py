"""RULER-style suite: deterministic generation, task structure, token budgets, scoring, run."""

from __future__ import annotations

import re

import pytest

from eval import ruler
from eval.client import ServerConfig, read_jsonl
from eval.ruler import GenerateConfig, string_match_all, string_match_part
from eval.tokens import PromptTokenizer
from eval_test_support import build_word_tokenizer

LENGTH = 1000
SEVEN_DIGITS = re.compile(r"^\d{7}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # An empty vocabulary is enough: every word is one [UNK] token, and only counts matter here.
    folder = build_word_tokenizer(tmp_path_factory.mktemp("tokenizer"), [], add_bos=True)
    return PromptTokenizer.from_path(str(folder))


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {name: ruler.generate_task(name, tokenizer, LENGTH, 3, seed=7) for name in ruler.TASKS}


def test_generation_is_deterministic_for_a_seed(tokenizer, samples):
    again = ruler.generate_task("niah_multikey_2", tokenizer, LENGTH, 3, seed=7)
    assert again == samples["niah_multikey_2"]
    other_seed = ruler.generate_task("niah_multikey_2", tokenizer, LENGTH, 3, seed=8)
    assert [s["outputs"] for s in other_seed] != [s["outputs"] for s in again]
    # samples differ from each other within a run
    assert len({s["input"] for s in samples["niah_single_2"]}) == 3


def test_samples_fill_but_never_exceed_the_token_budget(tokenizer, samples):
    for name, task_samples in samples.items():
        for sample in task_samples:
            tokens = tokenizer.count(sample["input"] + sample["answer_prefix"])
            assert sample["length"] == tokens + ruler.TASKS[name].tokens_to_generate
            assert sample["length"] <= LENGTH, name
            # one more haystack unit would not fit; units are at most ~40 tokens here
            assert sample["length"] > LENGTH - 60, name


def test_single_needle_uses_singular_wording(samples):
    sample = samples["niah_single_1"][0]
    (value,) = sample["outputs"]
    assert SEVEN_DIGITS.match(value)
    key = re.search(r"One of the special magic numbers for (\S+) is: " + value + r"\.", sample["input"]).group(1)
    assert sample["input"].startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert sample["input"].endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert sample["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
    assert ruler.NOISE_SENTENCE + "\n" + ruler.NOISE_SENTENCE in sample["input"]  # noise haystack
    assert re.fullmatch(r"[a-z]+-[a-z]+", key)


def test_essay_haystack_uses_our_filler(samples):
    sample = samples["niah_single_2"][0]
    assert ruler.essay_sentences()[0] in sample["input"]
    assert ruler.NOISE_SENTENCE not in sample["input"]
    assert UUID.match(samples["niah_single_3"][0]["outputs"][0])


def test_multikey_hides_four_needles_and_asks_one(samples):
    sample = samples["niah_multikey_1"][0]
    assert sample["input"].count("One of the special magic numbers for") == 4
    assert len(sample["outputs"]) == 1


def test_needle_haystack_distractors_never_reuse_the_key(samples):
    sample = samples["niah_multikey_3"][0]
    key = re.search(r"What is the special magic uuid for (\S+) mentioned", sample["input"]).group(1)
    assert UUID.match(key) and UUID.match(sample["outputs"][0])
    assert sample["input"].count(f"for {key} is:") == 1
    needles = re.findall(r"One of the special magic uuids for \S+ is: \S+\.", sample["input"])
    assert len(needles) > 5  # the haystack is made of distractor needles


def test_multivalue_uses_plural_wording(samples):
    sample = samples["niah_multivalue"][0]
    assert len(sample["outputs"]) == 4
    key = re.search(r"What are all the special magic numbers for (\S+) mentioned", sample["input"]).group(1)
    assert sample["input"].startswith("Some special magic numbers are hidden within the following text.")
    for value in sample["outputs"]:
        assert f"One of the special magic numbers for {key} is: {value}." in sample["input"]
    assert sample["answer_prefix"] == f" The special magic numbers for {key} mentioned in the provided text are"


def test_multiquery_asks_four_keys(samples):
    sample = samples["niah_multiquery"][0]
    assert len(sample["outputs"]) == 4
    query = re.search(r"What are all the special magic numbers for (.+) mentioned", sample["input"]).group(1)
    keys = re.fullmatch(r"(\S+), (\S+), (\S+), and (\S+)", query).groups()
    for key, value in zip(keys, sample["outputs"]):
        assert f"One of the special magic numbers for {key} is: {value}." in sample["input"]


def test_variable_tracking_chain_and_one_shot_example(samples):
    sample = samples["vt"][0]
    names = sample["outputs"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", name) for name in names)
    value = re.search(rf"VAR {names[0]} = (\d{{5}})\n", sample["input"]).group(1)
    positions = [sample["input"].index(f"VAR {names[0]} = {value}")]
    positions += [sample["input"].index(f"VAR {names[i + 1]} = VAR {names[i]}") for i in range(4)]
    assert positions == sorted(positions)  # assignments appear in chain order
    assert sample["answer_prefix"] == (
        " Answer: According to the chain(s) of variable assignment in the text above, "
        f"5 variables are assigned the value {value}, they are: "
    )
    # the one-shot example (3-letter names, answered) comes first, then the real question
    example, question = sample["input"].split("\n\nMemorize and track", 1)
    assert example.startswith("Memorize and track the chain(s) of variable assignment")
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}$", example)
    assert question.endswith(f"Question: Find all variables that are assigned the value {value} in the text above.")


def test_budget_too_small_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="exceeds the token budget"):
        ruler.generate_task("vt", tokenizer, 100, 1, seed=1)


def test_largest_fitting_size():
    assert ruler.largest_fitting_size(lambda size: size <= 37, minimum=0) == 37
    assert ruler.largest_fitting_size(lambda size: size <= 5, minimum=5) == 5


# ------------------------------------------------------------------------------------- scoring


def test_string_match_all_and_part():
    predictions = ["1234567 and 7654321", "only 1234567", "NOTHING"]
    references = [["1234567", "7654321"], ["1234567", "7654321"], ["x"]]
    # all: (2/2 + 1/2 + 0) / 3 * 100 = 50.0
    assert string_match_all(predictions, references) == 50.0
    # part: (1 + 1 + 0) / 3 * 100 = 66.666... -> 66.67
    assert string_match_part(predictions, references) == 66.67
    # case-insensitive substring
    assert string_match_all(["The Answer Is ABCDE"], [["abcde"]]) == 100.0


def test_postprocess_replaces_control_characters():
    assert ruler.postprocess_prediction("  12\x0034\t56\n ") == "12\n34\n56"


# ---------------------------------------------------------------------------------------- run


def test_generate_run_and_score(fake_server, tokenizer, tmp_path):
    config = GenerateConfig("unused", tmp_path / "data", tasks=("niah_single_1", "vt"), lengths=(LENGTH,),
                            num_samples=2, seed=3)
    paths = ruler.generate(config, tokenizer)
    assert paths == [tmp_path / "data" / str(LENGTH) / "niah_single_1.jsonl", tmp_path / "data" / str(LENGTH) / "vt.jsonl"]
    data = {p.stem: read_jsonl(p) for p in paths}

    # The fake model answers NIAH right and VT with two of the five names.
    answers = {s["input"] + s["answer_prefix"]: s for samples in data.values() for s in samples}

    def responder(path, body):
        sample = answers[body["prompt"]]
        outputs = sample["outputs"]
        return f" {outputs[0]}." if sample["task"] == "niah_single_1" else " ".join(outputs[:2])

    fake_server.responder = responder
    ruler.run(tmp_path / "data", tmp_path / "preds", ServerConfig(base_url=fake_server.url, max_retries=0), 2)
    assert len(fake_server.requests) == 4
    for request in fake_server.requests:
        sample = answers[request.body["prompt"]]  # input + answer_prefix, raw
        assert request.path == "/v1/completions"
        assert request.body["max_tokens"] == {"niah_single_1": 128, "vt": 30}[sample["task"]]
        assert request.body["temperature"] == 0

    result = ruler.score_dir(tmp_path / "preds")
    # niah: 100; vt: 2/5 per sample -> 40.0; average of the two tasks: 70.0
    assert result[str(LENGTH)]["tasks"] == {"niah_single_1": 100.0, "vt": 40.0}
    assert result[str(LENGTH)]["average"] == 70.0

    ruler.run(tmp_path / "data", tmp_path / "preds", ServerConfig(base_url=fake_server.url, max_retries=0), 2)
    assert len(fake_server.requests) == 4  # resumed: all done
