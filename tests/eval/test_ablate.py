"""eval/ablate.py's `long` group: every variant at the base config's planned ratio."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval import ablate
from eval.tiny import quality
from sglang_kvc.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_long_variants_sit_at_the_base_ratio_and_differ_in_one_knob():
    base = load_config(REPO / "configs" / "qwen_8x_tuned.yaml")
    target = quality.planned_ratio(base)
    configs = ablate._long(base)
    assert len(configs) == 1 + len(ablate.LONG_VARIANTS)
    for config, (label, sparsity, quantization) in zip(configs[1:], ablate.LONG_VARIANTS):
        assert quality.planned_ratio(config) == pytest.approx(target, abs=0.02), label
        for key, value in sparsity.items():
            assert getattr(config.sparsity, key) == value, label
        for key, value in quantization.items():
            assert getattr(config.quantization, key) == value, label
    by_label = dict(zip((label for label, _, _ in ablate.LONG_VARIANTS), configs[1:]))
    # Sparsity knobs cost no bytes: same retain ratio; more bits per kept token: fewer kept.
    assert by_label["pooling 63"].sparsity.retain_ratio == base.sparsity.retain_ratio
    assert by_label["K4V4 g64"].sparsity.retain_ratio < base.sparsity.retain_ratio
    assert by_label["K3V2 g64"].sparsity.retain_ratio > base.sparsity.retain_ratio
    # The base guards 10% at bf16; at 8 bits the same guard share leaves room for more tokens.
    assert by_label["guard 0.1 8-bit"].sparsity.retain_ratio > base.sparsity.retain_ratio


def test_long_group_only_runs_when_asked():
    assert "long" not in ablate.DEFAULT_GROUPS and "long" in ablate.GROUPS


def test_chosen_variants_keep_the_named_ones_and_name_what_there_is():
    import argparse

    parser = argparse.ArgumentParser(prog="x")
    base = REPO / "configs" / "qwen_8x_tuned.yaml"
    chosen = ablate.chosen_variants(parser, base, ["long"], ["long: observation window 4"])
    assert list(chosen) == ["long: observation window 4"]
    group, config = chosen["long: observation window 4"]
    assert group == "long" and config.sparsity.observation_window == 4
    with pytest.raises(SystemExit):
        ablate.chosen_variants(parser, base, ["long"], ["long: no such knob"])


def test_long_group_leaves_out_what_the_base_cannot_take():
    """A base keeping 0.884 of the prompt (qwen_5x_tuned before its guard): a pyramid of
    slope 0.25 would ask its first layer for more than the whole prompt, so that variant is
    skipped, not the whole group."""
    tuned = load_config(REPO / "configs" / "qwen_5x_tuned.yaml")
    base = ablate.variant(tuned, "keeps 0.884", sparsity={"retain_ratio": 0.884},
                          quantization={"guard_fraction": 0.0})
    names = [config.name for config in ablate._long(base)]
    assert "long: pyramid slope 0.25" not in names
    assert "long: observation window 16" in names and names[0] == "long: base (keeps 0.884)"


def test_paired_summary_against_hand_computed_values():
    from eval.tiny.paired import summary

    # 10 samples: b alone right on 3, a alone right on 1, the rest tied.
    wins = [1, 1, 1, -1, 0, 0, 0, 0, 0, 0]
    result = summary(wins, accuracy_a=0.5)
    assert result["difference"] == 0.2 and result["accuracy_b"] == 0.7
    assert (result["right_only_with_a"], result["right_only_with_b"]) == (1, 3)
    # mean 0.2; deviations: 3 x 0.8, 1 x -1.2, 6 x -0.2 -> sum of squares 3.6; var 0.4; se sqrt(0.04)
    assert result["paired_se"] == pytest.approx(0.2, abs=1e-4)
    # sign test, 4 discordant, 1 of the smaller side: 2 * (1 + 4) / 16
    assert result["sign_test_p"] == pytest.approx(0.625)


def test_paired_refuses_reports_of_different_suites():
    from eval.tiny.paired import paired

    a = {"suite": {"tasks": ["kv"], "lengths": [1024], "samples": 5, "seed": 0}, "predictions": {}}
    b = {"suite": {"tasks": ["kv"], "lengths": [1024], "samples": 5, "seed": 1}, "predictions": {}}
    with pytest.raises(ValueError, match="different suites"):
        paired(a, "x", "x", report_b=b)


def test_paired_reads_server_reports_as_transformers_reports():
    """A serve_eval.py report (`servers[i].suite.predictions`, by server name) gives the same
    {config: {id: answer}} as a quality.py report; servers that failed (no suite) are skipped."""
    from eval.tiny.paired import predictions

    answers = {"kv-1024-0": "123456", "kv-1024-1": "654321"}
    server_report = {"suite": {}, "servers": [{"name": "qwen_8x_tuned", "suite": {"predictions": answers}},
                                              {"name": "broken", "suite": None}]}
    assert predictions(server_report) == {"qwen_8x_tuned": answers}
    assert predictions({"suite": {}, "predictions": {"full": answers}}) == {"full": answers}


class _StubEvaluator:
    """Gold answers for a suite without generating samples: kv-1024-{0,1} -> "1", "2"."""

    def samples(self, suite):
        from types import SimpleNamespace

        return {("kv", 1024): [SimpleNamespace(answer="1"), SimpleNamespace(answer="2")]}


def _report(seed: int, a_answers: list[str], b_answers: list[str]) -> dict:
    suite = {"tasks": ["kv"], "lengths": [1024], "samples": 2, "seed": seed}
    ids = ["kv-1024-0", "kv-1024-1"]
    return {"suite": suite, "predictions": {"a": dict(zip(ids, a_answers)), "b": dict(zip(ids, b_answers))}}


def test_paired_pools_reports_of_other_seeds_and_refuses_a_suite_twice():
    from eval.tiny.paired import paired

    seed0 = _report(0, ["1", "2"], ["1", "x"])  # b loses one
    seed1 = _report(1, ["x", "2"], ["1", "2"])  # b wins one
    pooled = paired(seed0, "a", "b", evaluator=_StubEvaluator(), pool=[seed1])
    assert pooled["samples"] == 4
    assert (pooled["right_only_with_a"], pooled["right_only_with_b"]) == (1, 1)
    assert pooled["accuracy_a"] == 0.75 and pooled["accuracy_b"] == 0.75
    with pytest.raises(ValueError, match="pooled twice"):
        paired(seed0, "a", "b", evaluator=_StubEvaluator(), pool=[seed1, seed1])


def test_paired_pools_a_suite_whose_b_comes_from_another_report():
    from eval.tiny.paired import paired

    seed0 = _report(0, ["1", "2"], ["1", "x"])  # b loses one
    seed1_a = _report(1, ["x", "2"], ["x", "x"])  # this report's own b would lose one more
    seed1_b = {"suite": seed1_a["suite"], "predictions": {"b": {"kv-1024-0": "1", "kv-1024-1": "2"}}}
    pooled = paired(seed0, "a", "b", evaluator=_StubEvaluator(), pool=[(seed1_a, seed1_b)])
    assert (pooled["right_only_with_a"], pooled["right_only_with_b"]) == (1, 1)
    other_seed = _report(2, ["1", "2"], ["1", "2"])
    with pytest.raises(ValueError, match="different suites"):
        paired(seed0, "a", "b", evaluator=_StubEvaluator(), pool=[(seed1_a, other_seed)])


# ---- --server: the variants served by SGLang (eval/tiny/serve_eval.py) ------------------------------


def _served_variants():
    import argparse

    parser = argparse.ArgumentParser(prog="x")
    return ablate.chosen_variants(parser, REPO / "configs" / "qwen_8x_tuned.yaml", ["mode", "long"],
                                  ["quantize-only", "long: observation window 4", "long: K4V4 g64"])


def test_served_variants_are_files_the_server_loads_as_the_same_configs(tmp_path):
    from eval.tiny.serve_eval import parse_config
    from sglang_kvc.config import config_to_dict

    variants = _served_variants()
    specs = ablate.write_variant_configs(variants, tmp_path / "configs")
    assert len(specs) == len(variants) == 3
    for spec, (name, (_, config)) in zip(specs, variants.items()):
        served_name, path = parse_config(spec)  # names may hold a colon ("long: ...")
        assert served_name == name
        assert Path(path).parent == tmp_path / "configs"
        assert config_to_dict(load_config(path)) == config_to_dict(config)


def _serve_report(variants, stock_tokens=1000, failed=None):
    suite = {"tasks": ["passkey", "kv"], "lengths": [1024], "samples": 2, "seed": 6}

    def server(name, passkey, kv, tokens):
        answers = {"passkey-1024-0": "1", "passkey-1024-1": "2" if passkey == 1.0 else "x",
                   "kv-1024-0": "3", "kv-1024-1": "4" if kv == 1.0 else "x"}
        return {"name": name, "max_total_num_tokens": tokens,
                "suite": {"accuracy": {"passkey": {"1024": passkey}, "kv": {"1024": kv}},
                          "mean_accuracy": (passkey + kv) / 2, "predictions": answers}}

    names = list(variants)
    servers = [server("bf16", 1.0, 1.0, stock_tokens), server(names[0], 1.0, 0.5, 4 * stock_tokens),
               server(names[1], 0.5, 0.5, 8 * stock_tokens)]
    servers.append({"name": names[2], "error": failed or "not run: deadline"})
    return {"date": "2026-12-01T00:00:00+00:00", "command": "serve", "device": "NVIDIA H200",
            "versions": {"sglang": "0.5.17", "torch": "2.11.0"}, "suite": suite, "servers": servers}


def test_server_report_compares_each_served_variant_with_stock_sglang(tmp_path):
    from eval.tiny.compare import predictions

    variants = _served_variants()
    names = list(variants)
    report = ablate.server_report(_serve_report(variants), variants, ablate.planned_ratios(variants),
                                  "python -m eval.ablate --server", "model")
    results = report["results"]
    assert list(results) == [quality.FULL, names[0], names[1]]
    assert results[names[0]]["relative_accuracy"] == pytest.approx(0.75)
    assert results[names[1]]["relative_accuracy"] == pytest.approx(0.5)
    assert results[names[0]]["measured_ratio"] == 4.0 and results[names[1]]["measured_ratio"] == 8.0
    assert results[names[1]]["planned_ratio"] == pytest.approx(quality.planned_ratio(variants[names[1]][1]))
    assert report["not_served"] == {names[2]: "not run: deadline"}
    assert set(report["groups"]) == {names[0], names[1]}
    assert predictions(report)[names[1]]["passkey-1024-1"] == "x"  # paired.py reads its answers
    table = quality.markdown_table(report)
    assert f"| {names[1]} | " in table and "| 8.00x | 0.500 | 50.0% |" in table
    ablate.plot(report, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_server_report_needs_stock_answers():
    variants = _served_variants()
    served = _serve_report(variants)
    served["servers"][0] = {"name": "bf16", "error": "RuntimeError: server exited"}
    with pytest.raises(ValueError, match="stock server answered no suite .RuntimeError: server exited"):
        ablate.server_report(served, variants, ablate.planned_ratios(variants), "x", "model")


def test_deadline_and_serve_report_are_for_served_ablations_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--out", str(tmp_path), "--deadline-s", "100"])
    assert "--deadline-s applies to --server only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.main(["--out", str(tmp_path), "--serve-report", "x.json"])
    assert "--serve-report applies to --server only" in capsys.readouterr().err


def test_a_served_ablation_is_rebuilt_from_a_serve_eval_report(tmp_path):
    import json

    variants = _served_variants()
    names = list(variants)
    served = tmp_path / "serve_eval.json"
    served.write_text(json.dumps(_serve_report(variants)))
    out = tmp_path / "out"
    assert ablate.main(["--server", "--serve-report", str(served), "--out", str(out),
                        "--base", str(REPO / "configs" / "qwen_8x_tuned.yaml"), "--only", "mode", "long",
                        "--variants", *names]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["results"]) == [quality.FULL, names[0], names[1]]
    markdown = (out / "ablation.md").read_text()
    assert "Measured ratio: server KV capacity" in markdown and f"Not served: {names[2]} (not run: deadline)" in markdown
    assert (out / "ablation.png").stat().st_size > 0


def test_variants_with_the_same_settings_share_one_server(tmp_path):
    import argparse

    variants = ablate.chosen_variants(argparse.ArgumentParser(prog="x"), REPO / "configs" / "qwen_8x.yaml",
                                      ["mode", "budget", "scoring"], None)  # a pyramid base
    server_of = ablate.same_settings_as(variants)
    assert server_of["budget pyramid (base)"] == server_of["scoring window (base)"] == "hybrid (base)"
    assert server_of["budget uniform"] == "budget uniform"  # qwen_8x's budget is a pyramid
    specs = ablate.write_variant_configs(variants, tmp_path)
    assert len(specs) == len(variants) - 2 and not any("(base)" in spec and "hybrid" not in spec for spec in specs)
    record = {"max_total_num_tokens": 3000, "suite": {"accuracy": {"kv": {"1024": 1.0}}, "mean_accuracy": 1.0,
                                                        "predictions": {"kv-1024-0": "1"}}}
    served = {"date": "d", "device": "NVIDIA H200", "versions": {}, "suite": {"tasks": ["kv"], "lengths": [1024]},
              "servers": [{"name": "bf16", **record, "max_total_num_tokens": 1000}, {"name": "hybrid (base)", **record}]}
    report = ablate.server_report(served, variants, ablate.planned_ratios(variants), "x", "model")
    assert report["results"]["scoring window (base)"]["server"] == "hybrid (base)"
    assert report["results"]["budget pyramid (base)"]["measured_ratio"] == 3.0
    assert "budget uniform" in report["not_served"]
    # two calls of one sweep may each have served the same settings: each variant keeps its own answers
    served["servers"].append({"name": "scoring window (base)", **record, "max_total_num_tokens": 2000})
    report = ablate.server_report(served, variants, ablate.planned_ratios(variants), "x", "model")
    assert report["results"]["scoring window (base)"]["server"] == "scoring window (base)"
    assert report["results"]["scoring window (base)"]["measured_ratio"] == 2.0
    assert report["results"]["budget pyramid (base)"]["server"] == "hybrid (base)"


def test_budget_and_transform_groups_switch_whatever_the_base_has():
    """qwen_8x_tuned is uniform and has no key transform: its groups must still hold a pyramid
    and a Hadamard variant, each one field away from the base."""
    from sglang_kvc.config import config_to_dict

    base = load_config(REPO / "configs" / "qwen_8x_tuned.yaml")
    budgets = {config.name: config for config in ablate._budget(base)}
    assert set(budgets) == {"budget uniform (base)", "budget pyramid"}
    transform = ablate._transform(base)[0]
    assert transform.name == "key transform hadamard"
    for changed, section, field in ((budgets["budget pyramid"], "sparsity", "budget"),
                                    (transform, "quantization", "key_transform")):
        a, b = config_to_dict(base), config_to_dict(changed)
        assert a[section][field] != b[section][field]
        a[section].pop(field), b[section].pop(field), a.pop("name"), b.pop("name")
        assert a == b
    pyramid_base = load_config(REPO / "configs" / "qwen_8x.yaml")
    assert {config.name for config in ablate._budget(pyramid_base)} == {"budget uniform", "budget pyramid (base)"}


def test_a_sweep_served_over_several_calls_is_reported_as_one(tmp_path):
    import json

    variants = _served_variants()
    names = list(variants)
    whole = _serve_report(variants)
    first = {**whole, "servers": whole["servers"][:2] + [{"name": names[1], "error": "not run: deadline"}]}
    second = {**whole, "date": "2026-12-01T01:00:00+00:00", "command": "serve --no-stock",
              "servers": whole["servers"][2:]}
    files = []
    for index, report in enumerate((first, second)):
        files.append(tmp_path / f"serve_eval-{index}.json")
        files[-1].write_text(json.dumps(report))
    out = tmp_path / "out"
    assert ablate.main(["--server", "--serve-report", *map(str, files), "--out", str(out),
                        "--base", str(REPO / "configs" / "qwen_8x_tuned.yaml"), "--only", "mode", "long",
                        "--variants", *names]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["results"]) == [quality.FULL, names[0], names[1]]
    # the second call's answers replace the first call's deadline record; stock came from the first
    assert report["results"][names[1]]["measured_ratio"] == 8.0
    assert report["not_served"] == {names[2]: "not run: deadline"}
    assert [source["date"] for source in report["sources"]] == [first["date"], second["date"]]


def test_serve_reports_of_other_samples_or_a_server_twice_do_not_merge():
    variants = _served_variants()
    report = _serve_report(variants)
    other_seed = {**report, "suite": {**report["suite"], "seed": 7}}
    with pytest.raises(ValueError, match="b.json ran another suite"):
        ablate.merge_serve_reports([report, other_seed], ["a.json", "b.json"])
    with pytest.raises(ValueError, match="'bf16' answered in both a.json and b.json"):
        ablate.merge_serve_reports([report, report], ["a.json", "b.json"])


def test_no_stock_is_for_runs_that_start_servers(tmp_path, capsys):
    for extra in ([], ["--server", "--serve-report", "x.json"]):
        with pytest.raises(SystemExit):
            ablate.main(["--out", str(tmp_path), "--no-stock", *extra])
        assert "--no-stock applies to --server runs that start servers" in capsys.readouterr().err


def test_no_stock_serves_the_variants_only_and_leaves_the_report_for_later(tmp_path, monkeypatch, capsys):
    import json

    from eval.tiny import serve_eval

    variants = _served_variants()
    asked = {}

    def fake_serve_eval(argv):  # stands in for the servers; records what it was asked to serve
        asked["configs"] = argv[argv.index("--configs") + 1:argv.index("--out")]
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        report = _serve_report(variants)
        (out / "serve_eval.json").write_text(json.dumps({**report, "servers": report["servers"][1:]}))
        return 0

    monkeypatch.setattr(serve_eval, "main", fake_serve_eval)
    out = tmp_path / "out"
    assert ablate.main(["--server", "--no-stock", "--out", str(out), "--base",
                        str(REPO / "configs" / "qwen_8x_tuned.yaml"), "--only", "mode", "long",
                        "--variants", *variants]) == 0
    assert [spec.split(":")[0] for spec in asked["configs"]] == [name.split(":")[0] for name in variants]
    assert not (out / "ablation.json").exists()
    assert "build the report with --serve-report" in capsys.readouterr().out


def test_a_served_ablation_json_stands_in_for_its_serve_eval_json():
    variants = _served_variants()
    served = _serve_report(variants)
    report = ablate.server_report(served, variants, ablate.planned_ratios(variants), "x", "model")
    planned = ablate.planned_ratios(variants)
    again = ablate.server_report(ablate.served_records(report), variants, planned, "x", "model")
    assert again["results"] == report["results"] and again["predictions"] == report["predictions"]
    assert again["not_served"] == {list(variants)[2]: "not run"}  # a failed server leaves no result behind
    with pytest.raises(ValueError, match="neither a serve_eval.json nor a served ablation"):
        ablate.served_records({**report, "measured_ratio_basis": "bf16 bytes / compressed bytes"})


def test_the_reference_path_evaluates_each_setting_once(tmp_path, monkeypatch):
    import json

    evaluated = []
    original = quality.TinyEvaluator.evaluate

    def counting(self, name, config, samples, progress=True):
        evaluated.append(name)
        return original(self, name, config, samples, progress=False)

    monkeypatch.setattr(quality.TinyEvaluator, "evaluate", counting)
    out = tmp_path / "out"
    assert ablate.main(["--out", str(out), "--base", str(REPO / "configs" / "qwen_8x_tuned.yaml"),
                        "--only", "mode", "scoring", "--variants", "hybrid (base)", "scoring window (base)",
                        "pooling kernel 1", "--tasks", "passkey", "--lengths", "1024", "--samples", "1"]) == 0
    assert evaluated == [quality.FULL, "hybrid (base)", "pooling kernel 1"]  # the window-scored base is the hybrid
    results = json.loads((out / "ablation.json").read_text())["results"]
    assert list(results) == [quality.FULL, "hybrid (base)", "scoring window (base)", "pooling kernel 1"]
    assert results["scoring window (base)"]["name"] == "scoring window (base)"
    assert results["scoring window (base)"]["config"]["name"] == "scoring window (base)"
    assert results["scoring window (base)"]["accuracy"] == results["hybrid (base)"]["accuracy"]
