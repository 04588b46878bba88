"""The tiny quality-test model: task generators, tokenizer, model folder, training smoke run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.tiny import model as tiny_model
from eval.tiny import tasks
from eval.tiny import tokenizer as tiny_tokenizer
from eval.tiny import train as tiny_train


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tiny_tokenizer.save_tokenizer(tiny_tokenizer.build_tokenizer(), tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return tiny_tokenizer.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def encode(tokenizer):
    return tasks.TokenizerPieceEncoder(tokenizer)


def _samples(encode, length=512, count=6, seed=7):
    return [
        tasks.make_sample(task, tasks.sample_rng(seed, "test", task, length, index), encode, length)
        for task in tasks.TASK_NAMES
        for index in range(count)
    ]


# ---------------------------------------------------------------------------------------- tasks


def test_generators_are_deterministic_per_seed(encode):
    for task in tasks.TASK_NAMES:
        first = tasks.make_sample(task, tasks.sample_rng(1, "train", task, 512, 0), encode, 512)
        again = tasks.make_sample(task, tasks.sample_rng(1, "train", task, 512, 0), encode, 512)
        other = tasks.make_sample(task, tasks.sample_rng(2, "train", task, 512, 0), encode, 512)
        assert first == again
        assert other.prompt != first.prompt and other.answer != first.answer


def test_samples_do_not_depend_on_the_process_hash_seed():
    """Held-out suites must be the same in every process (vt once drew from a set's order)."""
    script = (
        "from eval.tiny import tasks, tokenizer as t\n"
        "enc = tasks.TokenizerPieceEncoder(t.build_tokenizer())\n"
        "for s in tasks.eval_samples(enc, tasks.TASK_NAMES, (256,), 4, 0)[('vt', 256)]: print(repr(s.prompt))\n"
    )
    root = Path(__file__).resolve().parents[2]
    outputs = {
        subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1 and outputs.pop().count("VAR") > 4


def test_follow_ups_ask_about_other_needles_of_the_same_context(encode):
    for sample in _samples(encode, length=1024, count=4):
        context = tasks.context_of(sample)
        if sample.task == "passkey":
            assert sample.follow_ups == ()
            continue
        assert sample.follow_ups, sample.task
        for question, answer in sample.follow_ups:
            asked = sample.prompt.rsplit("\n\n", 1)[1].split("\n")[0]
            assert answer != sample.answer and question != asked and question.startswith("Question: ")
            if sample.task == "multikey":
                key = re.search(r"number for (\S+) mentioned", question).group(1)
                assert f"for {key} is: {answer}." in context
            elif sample.task == "kv":
                key = re.search(r"key (\S+)\?", question).group(1)
                assert f"\n{key}: {answer}\n" in context
            else:
                value = re.search(r"value (\d+) in", question).group(1)
                names = answer.split()
                assert f"VAR {names[0]} = {value}." in context
                assert all(f"VAR {b} = VAR {a}." in context for a, b in zip(names, names[1:]))


def test_answer_is_in_the_context_exactly_once_and_distractors_differ(encode):
    for sample in _samples(encode):
        context, answer = tasks.context_of(sample), sample.answer
        assert tasks.answer_is_unambiguous(sample)
        if sample.task == "passkey":
            assert context.count(answer) == 1
            decoys = re.findall(r"The (?:[a-z]+ )?(?:code|number) is (\d+)\.", context)
            assert decoys and answer not in decoys
        elif sample.task == "multikey":
            needles = re.findall(r"numbers for ([a-z]+-[a-z]+) is: (\d+)\.", context)
            asked = re.search(r"number for ([a-z]+-[a-z]+) mentioned", sample.prompt).group(1)
            assert len(needles) >= 2 and len({key for key, _ in needles}) == len(needles)
            assert [value for key, value in needles if key == asked] == [answer]
            assert context.count(answer) == 1
        elif sample.task == "kv":
            records = dict(re.findall(r"^([0-9a-f]{4}-[0-9a-f]{4}): (\d{6})$", context, flags=re.M))
            asked = re.search(r"value of key ([0-9a-f-]+)\?", sample.prompt).group(1)
            assert len(re.findall(rf"^{asked}:", context, flags=re.M)) == 1 and records[asked] == answer
            assert context.count(answer) == 1 and len(records) > 10
        else:
            value = re.search(r"assigned the value (\d+)", sample.prompt).group(1)
            starts = re.findall(r"VAR ([A-Z]{5}) = (\d+)\.", context)
            assert len(starts) >= 2 and sorted(v for _, v in starts).count(value) == 1
            names = answer.split()
            assert names[0] == dict((v, n) for n, v in starts)[value]
            for previous, name in zip(names, names[1:]):
                assert context.count(f"VAR {name} = VAR {previous}.") == 1
            assert context.count(value) == 1


def test_prompts_fit_their_token_budget_and_use_it(encode):
    for length in (512, 1024):
        for sample in _samples(encode, length=length, count=3):
            used = len(sample.prompt_ids) + tasks.MAX_NEW_TOKENS[sample.task]
            assert length - 40 <= used <= length, (sample.task, length, used)
            assert sample.prompt.endswith("\nAnswer:")


def test_a_draw_whose_needles_do_not_fit_is_redrawn_and_a_hopeless_length_is_an_error(encode):
    # At 210 tokens some vt draws (3 chains of 5 names) cannot fit; at 256, used in training,
    # rarely enough that only a training run's millions of draws met one (and stopped there).
    length = 210
    misfits = 0
    for index in range(40):
        try:
            tasks.vt_sample(tasks.sample_rng(3, "test", "vt", length, index), encode, length)
        except tasks.PromptDoesNotFit:
            misfits += 1
        sample = tasks.make_sample("vt", tasks.sample_rng(3, "test", "vt", length, index), encode, length)
        assert len(sample.prompt_ids) + tasks.MAX_NEW_TOKENS["vt"] <= length
    assert misfits > 0  # the redraw was exercised
    with pytest.raises(tasks.PromptDoesNotFit, match="vt: 96 tokens cannot hold the prompt"):
        tasks.make_sample("vt", tasks.sample_rng(3, "test", "vt", 96, 0), encode, 96)


def test_prompt_ids_are_the_tokenization_of_the_prompt(encode, tokenizer):
    for sample in _samples(encode, length=1024, count=3):
        assert tuple(tokenizer.encode(sample.prompt, add_special_tokens=False).ids) == sample.prompt_ids
        answer_ids = tokenizer.encode(tasks.completion(sample.answer), add_special_tokens=False).ids
        full = tokenizer.encode(sample.prompt + tasks.completion(sample.answer), add_special_tokens=False).ids
        assert full == [*sample.prompt_ids, *answer_ids]
        assert len(answer_ids) + 1 <= tasks.MAX_NEW_TOKENS[sample.task]


def test_depth_moves_the_needle(encode):
    def needle_position(depth: float) -> float:
        sample = tasks.make_sample("passkey", tasks.sample_rng(0, "test", "passkey", 1024, 0), encode, 1024, depth)
        context = tasks.context_of(sample)
        return context.index("The pass key is") / len(context)

    assert needle_position(0.0) < 0.1 < 0.4 < needle_position(0.5) < 0.6 < 0.9 < needle_position(1.0)


def test_eval_samples_are_held_out_from_training_streams(encode):
    held_out = tasks.eval_samples(encode, ["passkey"], [512], 4, seed=0)[("passkey", 512)]
    dev = tasks.eval_samples(encode, ["passkey"], [512], 4, seed=0, split="dev")[("passkey", 512)]
    rng = tasks.training_rng(seed=0, worker=0)
    training = [tasks.make_sample("passkey", rng, encode, 512) for _ in range(4)]
    answers = [{s.answer for s in samples} for samples in (held_out, dev, training)]
    assert all(len(a) == 4 for a in answers) and not (answers[0] & answers[1] or answers[0] & answers[2])
    assert [s.depth for s in held_out] == [0.125, 0.375, 0.625, 0.875]


def test_exact_match_scoring():
    assert tasks.exact_match(" 48213", "48213")
    assert tasks.exact_match("48213\nmore text", "48213")
    assert tasks.exact_match(" QZXTA MWLEP", "QZXTA MWLEP")
    assert not tasks.exact_match(" 48213.", "48213")
    assert not tasks.exact_match(" 4821", "48213")
    assert not tasks.exact_match(" 482130", "48213")
    assert not tasks.exact_match(" MWLEP QZXTA", "QZXTA MWLEP")
    assert not tasks.exact_match("", "48213")


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips_task_text_and_spells_digits(encode, tokenizer):
    for sample in _samples(encode, count=1):
        text = sample.prompt + tasks.completion(sample.answer)
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text
    for digit in "0123456789":
        assert tokenizer.token_to_id(digit) is not None
    ids = tokenizer.encode("The pass key is 4821395.", add_special_tokens=False).ids
    assert [tokenizer.id_to_token(i) for i in ids[-8:]] == [*"4821395", "."]
    assert 1000 <= tokenizer.get_vocab_size() <= 8192


def test_hf_tokenizer_folder_loads_offline_with_chat_template(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] and (tokenizer_dir / "special_tokens_map.json").exists()
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    rendered = hf.apply_chat_template([{"role": "user", "content": "What is the pass key?"}],
                                      tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n"
    ids = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>") and hf.convert_tokens_to_ids("<|im_end|>") in ids


# ---------------------------------------------------------------------------------- model, train


def test_greedy_generate_with_left_padding_matches_one_by_one(tokenizer_dir, encode):
    model = tiny_model.build_model(tiny_model.config_for_tokenizer(tokenizer_dir, "toy"), seed=3).eval()
    prompts = [s.prompt_ids for s in _samples(encode, length=256, count=1)]
    assert len({len(p) for p in prompts}) > 1
    eos_ids, pad_id = [2, 0], 0
    batched = tiny_train.greedy_generate(model, prompts, 6, eos_ids, pad_id)
    single = [tiny_train.greedy_generate(model, [p], 6, eos_ids, pad_id)[0] for p in prompts]
    assert batched == single and any(batched)


def test_training_example_puts_labels_on_the_answer_only(encode, tokenizer):
    sample = _samples(encode, length=256, count=1)[0]
    eos_id = tokenizer.token_to_id("<|im_end|>")
    ids, labels = tiny_train.training_example(sample, encode, eos_id)
    answer_ids = [*encode(tasks.completion(sample.answer)), eos_id]
    assert len(ids) == len(labels) == len(sample.prompt_ids) + len(answer_ids)
    targets = [(position, label) for position, label in enumerate(labels) if label != -100]
    assert [label for _, label in targets] == answer_ids
    assert all(ids[position + 1] == label for position, label in targets)


def test_training_example_appends_follow_ups_within_their_budget(encode, tokenizer):
    eos_id = tokenizer.token_to_id("<|im_end|>")
    sample = next(s for s in _samples(encode, length=512, count=3) if len(s.follow_ups) >= 2)
    plain_ids, plain_labels = tiny_train.training_example(sample, encode, eos_id)
    for budget in (0, 40, 400):
        ids, labels = tiny_train.training_example(sample, encode, eos_id, follow_up_tokens=budget)
        # The evaluated question comes first, unchanged; follow-ups only add after it.
        assert ids[: len(plain_ids)] == plain_ids and labels[: len(plain_ids) - 1] == plain_labels[:-1]
        assert len(ids) <= len(plain_ids) + budget and len(ids) == len(labels)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        asked = [q for q, _ in sample.follow_ups if q in text]
        assert asked == [q for q, _ in sample.follow_ups][: len(asked)]
        answers = tokenizer.decode([label for label in labels if label != -100], skip_special_tokens=False)
        assert answers == "".join(tasks.completion(a) + "<|im_end|>" for a in [sample.answer, *[
            a for q, a in sample.follow_ups if q in asked]])
        assert (budget == 0) == (len(ids) == len(plain_ids))
    assert len(asked) == len(sample.follow_ups)  # 400 tokens hold them all


def test_context_loss_is_off_by_default_and_adds_prompt_loss(tokenizer_dir, encode, tokenizer):
    model = tiny_model.build_model(tiny_model.config_for_tokenizer(tokenizer_dir, "toy"), seed=1)
    sample = _samples(encode, length=256, count=1)[0]
    ids, labels = tiny_train.training_example(sample, encode, tokenizer.token_to_id("<|im_end|>"))
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    answers = tiny_train.LossTargets.of(ids, labels)
    with_prompt = tiny_train.LossTargets.of(ids, labels, context_fraction=0.25, pad_id=0,
                                            generator=torch.Generator().manual_seed(0))
    answer_only, answer_part = tiny_train.answer_loss(model, ids, answers)
    with_context, same_answer_part = tiny_train.answer_loss(model, ids, with_prompt, context_loss_weight=1.0)
    assert tiny_train.TrainConfig(out=Path(".")).context_loss_weight == 0.0
    assert answer_only == answer_part and torch.allclose(answer_part, same_answer_part)
    assert with_context > answer_only + 1.0  # an untrained model pays ~ln(4096) per prompt token
    # The answer part is the plain cross-entropy of the answer tokens.
    logits = model(input_ids=ids).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[labels[0] != -100], labels[0][labels[0] != -100])
    assert torch.allclose(answer_part, expected, atol=1e-5)


def test_training_loss_needs_no_mask_from_transformers_and_stays_causal(tokenizer_dir, encode, tokenizer, monkeypatch):
    """Building the mask costs a device sync per step (transformers checks for packed rows in
    Python); the training loss passes it as already built, and builds no KV cache either. Same
    logits as the model's own forward on padded rows, and causal: a later token changed leaves
    earlier losses alone."""
    from transformers.models.qwen2 import modeling_qwen2

    model = tiny_model.build_model(tiny_model.config_for_tokenizer(tokenizer_dir, "toy"), seed=2)
    eos_id = tokenizer.token_to_id("<|im_end|>")
    rows = [tiny_train.training_example(sample, encode, eos_id) for sample in _samples(encode, length=256, count=1)[:2]]
    width = max(len(ids) for ids, _ in rows) + 3
    ids = torch.zeros((2, width), dtype=torch.long)
    labels = torch.full((2, width), -100, dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(rows):
        ids[row, : len(row_ids)], labels[row, : len(row_labels)] = torch.tensor(row_ids), torch.tensor(row_labels)
    targets = tiny_train.LossTargets.of(ids, labels)
    logits = model(input_ids=ids).logits.flatten(0, 1)[targets.positions]
    expected = torch.nn.functional.cross_entropy(logits, targets.token_ids)

    def no_mask_building(**kwargs):
        raise AssertionError("answer_loss built a causal mask")

    def no_cache_building(*args, **kwargs):
        raise AssertionError("answer_loss built a KV cache")

    monkeypatch.setattr(modeling_qwen2, "create_causal_mask", no_mask_building)
    monkeypatch.setattr(modeling_qwen2, "DynamicCache", no_cache_building)
    loss, _ = tiny_train.answer_loss(model, ids, targets)
    assert torch.allclose(loss, expected, atol=1e-5)
    changed = ids.clone()
    changed[:, -1] = 7  # past every scored position
    assert torch.allclose(tiny_train.answer_loss(model, changed, targets)[0], loss, atol=1e-6)
    model.config._attn_implementation = "eager"  # would attend to every position without a mask
    with pytest.raises(ValueError, match="SDPA"):
        tiny_train.answer_loss(model, ids, targets)


def test_compiled_layers_keep_attention_out_of_their_graphs_and_train_as_eager(tokenizer_dir, encode, tokenizer):
    """compile_backbone's "layers" scope: each decoder layer traced whole except its attention
    call (which must stay eager to run cuDNN on the GPU), with the eager model's loss and
    gradients. A recording backend stands in for inductor, so the test sees the graphs."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"})
        return graph_module.forward

    eager = tiny_model.build_model(tiny_model.config_for_tokenizer(tokenizer_dir, "toy"), seed=3)
    compiled = tiny_model.build_model(tiny_model.config_for_tokenizer(tokenizer_dir, "toy"), seed=3)
    eos_id = tokenizer.token_to_id("<|im_end|>")
    ids, labels = tiny_train.training_example(_samples(encode, length=256, count=1)[0], encode, eos_id, 64)
    ids, labels = torch.tensor([ids, ids]), torch.tensor([labels, labels])
    targets = tiny_train.LossTargets.of(ids, labels, 0.25, pad_id=0, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        tiny_train.compile_backbone(compiled, "layers", backend=recording_backend)
        for model in (eager, compiled):
            tiny_train.answer_loss(model, ids, targets, context_loss_weight=1.0)[0].backward()
    finally:
        torch._dynamo.reset()
    assert graphs, "nothing was compiled"
    traced = set().union(*graphs)
    assert not any("scaled_dot_product" in target for target in traced)
    assert any("rsqrt" in target for target in traced) and any("silu" in target for target in traced)
    assert any("linear" in target for target in traced)  # projections inside the layer graphs
    for (name, expected), actual in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(actual.grad, expected.grad, atol=1e-5), name
    with pytest.raises(ValueError, match="layers"):
        tiny_train.compile_backbone(compiled, "everything")
    with pytest.raises(ValueError, match="compile_scope"):
        tiny_train.TrainConfig(out=Path("."), compile_scope="model")


def test_loss_targets_pick_answers_and_a_share_of_the_prompt(encode, tokenizer):
    sample = _samples(encode, length=256, count=1)[0]
    ids, labels = tiny_train.training_example(sample, encode, tokenizer.token_to_id("<|im_end|>"), 64)
    pad = tokenizer.token_to_id("<|endoftext|>")
    ids = torch.tensor([ids + [pad] * 10] * 2)  # two rows, padded: padding is never a target
    labels = torch.tensor([labels + [-100] * 10] * 2)
    targets = tiny_train.LossTargets.of(ids, labels, context_fraction=0.5, pad_id=pad,
                                        generator=torch.Generator().manual_seed(1))
    width = ids.shape[1]
    rows, columns = targets.positions // width, targets.positions % width
    answer = labels != -100
    assert int(targets.is_answer.sum()) == int(answer.sum())  # every answer position, once
    assert torch.equal(targets.token_ids[targets.is_answer], labels[rows, columns][targets.is_answer])
    prompt = ~targets.is_answer
    assert torch.equal(targets.token_ids[prompt], ids[rows[prompt], columns[prompt] + 1])
    assert not answer[rows[prompt], columns[prompt]].any() and (targets.token_ids != pad).all()
    share = int(prompt.sum()) / int(((~answer[:, :-1]) & (ids[:, 1:] != pad)).sum())
    assert 0.4 < share < 0.6


def test_curriculum_rejects_lengths_too_short_for_the_tasks():
    with pytest.raises(ValueError):
        tiny_train.TrainConfig(out=Path("."), lengths=(128,))
    with pytest.raises(ValueError, match="follow_up_tokens"):
        tiny_train.TrainConfig(out=Path("."), follow_up_tokens=-1)


def test_task_weights_favour_the_weak_tasks_as_configured():
    defaults = tiny_train.TrainConfig(out=Path("."))
    # The bundled model's rule: a mastered task keeps a ninth of an unlearnt one's weight.
    assert defaults.task_weight(1.0) == 0.25 and defaults.task_weight(0.0) == 2.25
    # Late in a run (the fifth training run's last check: passkey and multikey solved, kv and
    # vt at ~0.94-0.96), the earlier rule (0.5, 1.0) drew solved tasks about half the time,
    # the default a little less; a low floor and a steep slope give the unsolved ones most.
    means = {"passkey": 1.0, "multikey": 0.995, "kv": 0.943, "vt": 0.96}

    def unsolved_share(config):
        weights = {task: config.task_weight(mean) for task, mean in means.items()}
        return (weights["kv"] + weights["vt"]) / sum(weights.values())

    earlier = tiny_train.TrainConfig(out=Path("."), task_weight_floor=0.5, task_weight_per_error=1.0)
    assert 0.5 < unsolved_share(earlier) < 0.55 < unsolved_share(defaults) < 0.6
    sharp = tiny_train.TrainConfig(out=Path("."), task_weight_floor=0.1, task_weight_per_error=4.0)
    assert unsolved_share(sharp) > 0.7
    with pytest.raises(ValueError, match="task_weight_floor"):
        tiny_train.TrainConfig(out=Path("."), task_weight_floor=0.0)
    args = tiny_train.build_parser().parse_args(["--out", "x", "--task-weight-floor", "0.1",
                                                 "--task-weight-per-error", "4"])
    config = tiny_train.config_from_args(args)
    assert (config.task_weight_floor, config.task_weight_per_error) == (0.1, 4.0)


def test_smoke_training_writes_a_loadable_qwen2_folder(tmp_path):
    out = tmp_path / "tiny"
    assert tiny_train.main(["--out", str(out), "--smoke"]) == 0

    assert tiny_model.saved_architecture(out) == ["Qwen2ForCausalLM"]
    for name in ("config.json", "model.safetensors", "generation_config.json", *tiny_model.TOKENIZER_FILES):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    assert log["final"]["steps"] == 6 and set(log["final"]["accuracy"]) == set(tasks.TASK_NAMES)
    assert all(set(cells) == {"256"} for cells in log["final"]["accuracy"].values())
    # Every log line (one per step here) says where the loop's time went.
    assert len(log["train"]) == 6
    for entry in log["train"]:
        assert entry["step_ms"] > 0 and 0 <= entry["data_wait_ms"] and 0 < entry["host_step_ms"] <= entry["step_ms"]

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.head_dim == 16
    inputs = hf_tokenizer("There is an important pass key hidden. Question: What is the pass key?\nAnswer:",
                          return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    # A later run can continue from the folder: same tokenizer, evaluated before its first step.
    again = tmp_path / "again"
    assert tiny_train.main(["--out", str(again), "--smoke", "--init", str(out)]) == 0
    log = json.loads((again / "train_log.json").read_text())
    assert log["evals"][0]["step"] == 0 and log["config"]["init"] == str(out)
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_base_config_is_small_gqa_and_valid_for_sglang(tokenizer_dir, tmp_path):
    model = tiny_model.build_model(tiny_model.config_for_tokenizer(tokenizer_dir, "base"))
    config = model.config
    assert config.num_attention_heads // config.num_key_value_heads == 4 and config.head_dim == 64
    assert config.max_position_embeddings == 8192 and config.tie_word_embeddings
    assert config.vocab_size == tiny_tokenizer.load_tokenizer(tokenizer_dir).get_vocab_size()
    assert 3_000_000 < tiny_model.parameter_count(model) < 5_000_000
    tiny_model.save_model(model, tokenizer_dir, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size < 10 * 2**20

    from sglang.srt.configs.model_config import ModelConfig

    served = ModelConfig(str(tmp_path))
    assert (served.head_dim, served.num_key_value_heads, served.context_len) == (64, 2, 8192)
    assert served.dtype == torch.bfloat16


def test_a_check_opens_stages_for_learnt_lengths_but_only_one_for_time():
    config = tiny_train.TrainConfig(out=Path("."))
    stages = config.curriculum  # 256, 512, 1K, 2K, 4K, 8K

    def accuracy(learnt_up_to: int) -> dict:
        return {task: {str(length): float(length <= learnt_up_to) for length in stages} for task in config.tasks}

    # Nothing learnt, most of the time gone: one stage, not the four whose share is used up
    # (the sixth training run of 2026-11-30 opened 512-4K in one check).
    assert tiny_train.next_stage(0, stages, accuracy(0), progress=0.5, config=config) == 1
    # Early and nothing learnt: stay.
    assert tiny_train.next_stage(0, stages, accuracy(0), progress=0.01, config=config) == 0
    # Learnt up to 1K: through every learnt length, then one more stage if its time is due.
    assert tiny_train.next_stage(0, stages, accuracy(1024), progress=0.01, config=config) == 3
    assert tiny_train.next_stage(0, stages, accuracy(1024), progress=0.5, config=config) == 4
    # Everything learnt: the last stage, never past it.
    assert tiny_train.next_stage(2, stages, accuracy(8192), progress=1.0, config=config) == len(stages) - 1


def test_train_speed_times_the_lengths_mixed_as_training_draws_them(tmp_path):
    """eval.tiny.train_speed's `mixed` row cycles through every length's batches (training's
    later stages draw one length per step: tiny-training-2026-11-30-v10.md), and each variant
    reports what torch.compile did (nothing, eager)."""
    from eval.tiny import train_speed

    assert train_speed.main(["--out", str(tmp_path), "--device", "cpu", "--size", "toy", "--lengths", "256", "512",
                             "--steps", "2", "--loader-seconds", "0.2", "--workers", "0", "--batch-tokens", "2048"]) == 0
    report = json.loads((tmp_path / "train_speed.json").read_text())
    eager = report["steps"]["eager"]
    assert eager["mixed"]["widths"] == [eager["256"]["width"], eager["512"]["width"]]
    assert eager["256"]["width"] != eager["512"]["width"] and eager["mixed"]["wall_ms"] > 0
    assert report["dynamo"]["eager"]["stats"] == {}
