"""Ablations of the compression policy on the tiny model, as one command.

    python -m eval.ablate --out DIR [--base configs/qwen_8x.yaml] [--device cuda] \
        [--tasks passkey kv] [--lengths 1024 2048 4096] [--samples 30] [--only GROUP ...]

Variants are derived from one base config (dataclasses.replace, then the same validation
as a YAML file) so that each differs from it in the named way only:

  shipped     the configs/*.yaml shipped with the project (the seed's three and the tuned ones)
  mode        sparsify-only (every kept token bf16) / quantize-only (retain 1.0) / hybrid (base)
  budget      uniform vs pyramid layer budgets (the base's marked)
  ratio       quantization-only bits sweep; hybrid retain sweep at 4-bit (2x-16x)
  transform   the base's key transform switched (Hadamard <-> none), and 2-bit quantize-only
              with each
  guard       guard tier on / off
  scoring     pooling kernel (neighbours kept with an attended token); window-scored (base)
              vs context-scored (`sparsity.scoring: context`: queries sampled across the
              whole prompt, question-independent) at the base's retain ratio
  long        one knob at a time at the base's *planned ratio*: every variant's retain_ratio
              is re-solved (`at_ratio`) so that the planner gives the base's ratio again
              (pooling, temperature, observation/recent/sink windows, pyramid budgets,
              key/value bits and group size); meant for long prompts (--lengths 4096 8192)

`--variants NAME ...` runs only the named variants of the chosen groups (the full cache
always runs first), e.g. to re-run the best of a screen with more samples.

Every variant runs through the transformers reference path (eval/tiny/quality.py) on the
same held-out samples; the full cache runs first. Output: DIR/ablation.json (all accuracies,
both ratios, the configs), DIR/ablation.md (table), DIR/ablation.png (accuracy relative to
the full cache against the measured compression ratio).

With `--server` (a GPU machine with SGLang, e.g. after `source eval/gpu/setup.sh`) the same
variants are served instead: each is written to DIR/configs/*.yaml and started as an SGLang
server with `--kv-compress` by eval/tiny/serve_eval.py (stock SGLang first, as the full
cache), on the same held-out samples. Its measured ratio is then the server's KV capacity:
`max_total_num_tokens` over stock's at the same memory (the pool sized by the planner for the
served model). DIR/serve/serve_eval.json keeps every server's answers (eval/tiny/paired.py).
A server takes about 45 s to start, so a device call of 10 minutes serves 8-10 variants per
GPU (`--gpus 2` on a two-GPU machine runs two at once): choose them with --only / --variants,
and --deadline-s. `--serve-report FILE ...` builds the report from serve_eval.json files
already written (a call cut short keeps one per server; a served ablation.json stands in for
one that did not come back), merged when there are several: a sweep split over device calls
serves stock SGLang in its first call only (`--no-stock` in the others, which then write
serve_eval.json and no report) and is reported as one. The planned ratio reads
tests/data/qwen2.5-7b-instruct/config.json: keep tests/data on the device. A device call
returns at most 8 files from $OUT: copy serve/serve_eval.json up and pack the rest
(`tar czf $OUT/logs.tgz -C $OUT DIR`), or the answers may stay behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from eval.tiny import quality
from sglang_kvc.config import CompressionConfig, ConfigError, config_from_dict, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "configs" / "qwen_8x.yaml"


def variant(base: CompressionConfig, name: str, sparsity: dict | None = None,
            quantization: dict | None = None) -> CompressionConfig:
    """`base` with some fields replaced, validated like a YAML file."""
    as_dict = dataclasses.asdict(base)
    as_dict["name"] = name
    as_dict["sparsity"].update(sparsity or {})
    as_dict["quantization"].update(quantization or {})
    return config_from_dict(as_dict)


def retain(ratio: float) -> dict:
    """Sparsity fields for a retain ratio: no pyramid where it would ask the first layer to
    keep more than the whole prompt (config validation rejects that)."""
    return {"retain_ratio": ratio, **({"budget": "uniform"} if ratio > 0.6 else {})}


def _shipped(base: CompressionConfig) -> list[CompressionConfig]:
    return [load_config(path) for path in sorted((REPO / "configs").glob("*.yaml"))]


def _mode(base: CompressionConfig) -> list[CompressionConfig]:
    return [
        variant(base, "sparsify-only", quantization={"guard_fraction": 1.0, "guard_bits": 16}),
        variant(base, "quantize-only", sparsity=retain(1.0)),
        variant(base, "hybrid (base)"),
    ]


def _marked_if_base(name: str, base_value, value) -> str:
    """A variant's name, marked where its setting is the base's (the row equals the base)."""
    return f"{name} (base)" if base_value == value else name


def _budget(base: CompressionConfig) -> list[CompressionConfig]:
    """Both budgets, whichever the base has (a pyramid the base's retain ratio cannot take is
    left out, with a note)."""
    configs = []
    for budget in ("uniform", "pyramid"):
        try:
            configs.append(variant(base, _marked_if_base(f"budget {budget}", base.sparsity.budget, budget),
                                   sparsity={"budget": budget}))
        except ConfigError as exc:
            print(f"[ablate] budget {budget} left out for {base.name}: {exc}", file=sys.stderr)
    return configs


QUANTIZE_ONLY_BITS = ((8, 8), (4, 4), (4, 2), (2, 4), (3, 2), (2, 2))
HYBRID_RETAIN = (0.75, 0.5, 0.35, 0.25, 0.18, 0.12)


def _ratio(base: CompressionConfig) -> list[CompressionConfig]:
    quantize_only = [
        variant(base, f"quantize-only K{k}V{v}", sparsity=retain(1.0),
                quantization={"key_bits": k, "value_bits": v, "guard_fraction": 0.0})
        for k, v in QUANTIZE_ONLY_BITS
    ]
    hybrid = [
        variant(base, f"hybrid K4V4 retain {ratio}", sparsity=retain(ratio),
                quantization={"key_bits": 4, "value_bits": 4, "guard_fraction": 0.1})
        for ratio in HYBRID_RETAIN
    ]
    return quantize_only + hybrid


def _transform(base: CompressionConfig) -> list[CompressionConfig]:
    two_bit = {"key_bits": 2, "value_bits": 2, "guard_fraction": 0.0}
    other = "hadamard" if base.quantization.key_transform == "none" else "none"
    return [
        variant(base, f"key transform {other}", quantization={"key_transform": other}),
        variant(base, "quantize-only K2V2 hadamard", sparsity=retain(1.0),
                quantization={**two_bit, "key_transform": "hadamard"}),
        variant(base, "quantize-only K2V2 none", sparsity=retain(1.0),
                quantization={**two_bit, "key_transform": "none"}),
    ]


def _guard(base: CompressionConfig) -> list[CompressionConfig]:
    return [variant(base, "guard off", quantization={"guard_fraction": 0.0})]


def _scoring(base: CompressionConfig) -> list[CompressionConfig]:
    pooling = [variant(base, f"pooling kernel {kernel}", sparsity={"pooling_kernel": kernel})
               for kernel in (1, 15, 31, 63)]
    return pooling + [variant(base, _marked_if_base(f"scoring {scoring}", base.sparsity.scoring, scoring),
                              sparsity={"scoring": scoring})
                      for scoring in ("window", "context")]


def at_ratio(config: CompressionConfig, target: float, decimals: int = 3) -> CompressionConfig:
    """`config` with `sparsity.retain_ratio` (rounded to `decimals`) set so that the
    planner's ratio (`quality.planned_ratio`: Qwen2.5-7B, 32K prompt, incl. metadata) is as
    close to `target` as that rounding allows. The ratio falls as the retain ratio rises, so
    a bisection finds it; a target out of reach gives the nearest end of the valid range
    (a pyramid's first layer may not keep more than the whole prompt)."""
    s = config.sparsity
    step = 10.0 ** -decimals
    top = 1.0 if s.budget == "uniform" else 1.0 / (1.0 + s.pyramid_slope)
    lo, hi = step, math.floor(top / step + 1e-9) * step

    def ratio(retain_ratio: float) -> float:
        return quality.planned_ratio(variant(config, config.name, sparsity={"retain_ratio": retain_ratio}))

    if ratio(hi) >= target:
        best = hi
    elif ratio(lo) <= target:
        best = lo
    else:
        a, b = lo, hi  # ratio(a) > target >= ratio(b)
        for _ in range(40):
            mid = (a + b) / 2
            a, b = (mid, b) if ratio(mid) > target else (a, mid)
        candidates = {min(hi, max(lo, round(math.floor(a / step) * step, decimals))),
                      min(hi, max(lo, round(math.ceil(b / step) * step, decimals)))}
        best = min(sorted(candidates), key=lambda r: abs(ratio(r) - target))
    return variant(config, config.name, sparsity={"retain_ratio": round(best, decimals)})


# (label, sparsity fields, quantization fields): one change from the base each.
LONG_VARIANTS: tuple[tuple[str, dict, dict], ...] = (
    ("pooling 47", {"pooling_kernel": 47}, {}),
    ("pooling 63", {"pooling_kernel": 63}, {}),  # the largest the config allows
    ("temperature 0.5", {"temperature": 0.5}, {}),
    ("temperature 2.0", {"temperature": 2.0}, {}),
    ("observation window 4", {"observation_window": 4}, {}),
    ("observation window 8", {"observation_window": 8}, {}),
    ("observation window 16", {"observation_window": 16}, {}),
    ("observation window 64", {"observation_window": 64}, {}),
    ("recent window 16", {"recent_window": 16}, {}),
    ("recent window 128", {"recent_window": 128}, {}),
    ("sinks 16", {"sink_tokens": 16}, {}),
    ("pyramid slope 0.25", {"budget": "pyramid", "pyramid_slope": 0.25}, {}),
    ("pyramid slope 0.5", {"budget": "pyramid", "pyramid_slope": 0.5}, {}),
    ("K4V2 g32", {}, {"key_bits": 4, "value_bits": 2, "group_size": 32}),
    ("K3V2 g64", {}, {"key_bits": 3, "value_bits": 2, "group_size": 64}),
    ("K3V2 g64 hadamard", {}, {"key_bits": 3, "value_bits": 2, "group_size": 64, "key_transform": "hadamard"}),
    ("K3V3 g64", {}, {"key_bits": 3, "value_bits": 3, "group_size": 64}),
    ("K4V3 g64", {}, {"key_bits": 4, "value_bits": 3, "group_size": 64}),
    ("K4V4 g64", {}, {"key_bits": 4, "value_bits": 4, "group_size": 64}),
    ("K8V2 g64", {}, {"key_bits": 8, "value_bits": 2, "group_size": 64}),
    # qwen_5x_tuned's lost samples are mostly its 4-bit keys' (eval.tiny.attribute): every key
    # at 8 bits instead of a bf16 guard for the best tenth.
    ("K8V2 g64, no guard", {}, {"key_bits": 8, "value_bits": 2, "group_size": 64, "guard_fraction": 0.0}),
    ("K4V2 g64 hadamard", {}, {"key_bits": 4, "value_bits": 2, "group_size": 64, "key_transform": "hadamard"}),
    ("guard 0.05 bf16", {}, {"guard_fraction": 0.05, "guard_bits": 16}),
    ("guard 0.1 bf16", {}, {"guard_fraction": 0.1, "guard_bits": 16}),
    ("guard 0.2 bf16", {}, {"guard_fraction": 0.2, "guard_bits": 16}),
    # An 8-bit guard costs ~half a bf16 one, so the same ratio keeps more tokens.
    ("guard 0.1 8-bit", {}, {"guard_fraction": 0.1, "guard_bits": 8}),
    ("guard 0.2 8-bit", {}, {"guard_fraction": 0.2, "guard_bits": 8}),
    ("guard 0.3 8-bit", {}, {"guard_fraction": 0.3, "guard_bits": 8}),
)


def _long(base: CompressionConfig) -> list[CompressionConfig]:
    """A variant the base cannot take (a pyramid whose first layer would keep more than the
    whole prompt at the base's retain ratio, as with qwen_5x_tuned) is left out, with a note."""
    target = quality.planned_ratio(base)
    configs = [variant(base, f"long: base ({base.name})")]
    for label, sparsity, quantization in LONG_VARIANTS:
        try:
            changed = variant(base, f"long: {label}", sparsity=sparsity, quantization=quantization)
        except ConfigError as exc:
            print(f"[ablate] long: {label} left out for {base.name}: {exc}", file=sys.stderr)
            continue
        configs.append(at_ratio(changed, target))
    return configs


GROUPS: dict[str, Callable[[CompressionConfig], list[CompressionConfig]]] = {
    "shipped": _shipped,
    "mode": _mode,
    "budget": _budget,
    "ratio": _ratio,
    "transform": _transform,
    "guard": _guard,
    "scoring": _scoring,
    "long": _long,
}
# What runs without --only: every group but `long` (opt-in: it re-solves retain ratios and
# is meant for other lengths), so the documented default command is unchanged.
DEFAULT_GROUPS = [group for group in GROUPS if group != "long"]


def build_variants(base: CompressionConfig, groups: Sequence[str]) -> dict[str, tuple[str, CompressionConfig]]:
    """name -> (group, config); a name met twice keeps its first group."""
    variants: dict[str, tuple[str, CompressionConfig]] = {}
    for group in groups:
        for config in GROUPS[group](base):
            variants.setdefault(config.name, (group, config))
    return variants


def chosen_variants(parser: argparse.ArgumentParser, base: Path, groups: Sequence[str],
                    names: Sequence[str] | None) -> dict[str, tuple[str, CompressionConfig]]:
    """`build_variants` of the base config, only those `names` if given; an unknown name or a
    bad base config ends the command with the parser's error (naming what there is)."""
    try:
        variants = build_variants(load_config(base), groups)
    except ConfigError as exc:
        parser.error(str(exc))
    if names:
        unknown = [name for name in names if name not in variants]
        if unknown:
            parser.error(f"unknown variant {unknown[0]!r}; the chosen groups have: {sorted(variants)}")
        variants = {name: variants[name] for name in names}
    return variants


def same_settings_as(variants: dict[str, tuple[str, CompressionConfig]]) -> dict[str, str]:
    """Variant name -> the variant whose answers stand for it: the first one with the same
    settings, names aside (`hybrid (base)`, `budget uniform (base)` and `scoring window (base)`
    of a uniform, window-scored base are one server, about 45 s of device time each, or one
    pass over the samples on the reference path)."""
    first: dict[str, str] = {}
    return {name: first.setdefault(json.dumps({**config_to_dict(config), "name": None}, sort_keys=True), name)
            for name, (_, config) in variants.items()}


# ---- served variants -------------------------------------------------------------------------------
STOCK = "bf16"  # serve_eval's name for the stock server: the full cache of a served ablation
SERVER_RATIO_BASIS = ("server KV capacity: max_total_num_tokens over stock SGLang's at the same "
                      "--mem-fraction-static (the pool sized by the planner for the served model)")


def write_variant_configs(variants: dict[str, tuple[str, CompressionConfig]], folder: Path) -> list[str]:
    """Each distinct variant (`same_settings_as`) as a YAML file a server loads with --kv-compress;
    returns serve_eval's NAME:PATH arguments, in the variants' order."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    server_of = same_settings_as(variants)
    for index, (name, (_, config)) in enumerate(variants.items()):
        if server_of[name] != name:
            continue
        path = folder / f"{index:02d}-{re.sub(r'[^A-Za-z0-9.]+', '-', name).strip('-')}.yaml"
        path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        specs.append(f"{name}:{path}")
    return specs


def planned_ratios(variants: dict[str, tuple[str, CompressionConfig]]) -> dict[str, float]:
    """quality.planned_ratio of every variant; computed before any server starts, so that what
    it needs (the Qwen2.5-7B config under tests/data) is missing in seconds, not after the
    servers have run."""
    return {name: quality.planned_ratio(config) for name, (_, config) in variants.items()}


def server_report(served: dict, variants: dict[str, tuple[str, CompressionConfig]], planned: dict[str, float],
                  command: str, model: str) -> dict:
    """An ablation report (the reference path's schema, so markdown_table and plot apply) from
    serve_eval's report of stock SGLang and the variants (a variant with another's settings takes
    that one's answers, `same_settings_as`); a variant whose server failed or ran out of time is listed
    under `not_served` with its error."""
    servers = {record["name"]: record for record in served["servers"]}
    stock = servers.get(STOCK)
    if stock is None or not stock.get("suite"):
        raise ValueError(f"the stock server answered no suite ({(stock or {}).get('error', 'not run')}); "
                         "nothing to compare the variants with")
    full_mean = stock["suite"]["mean_accuracy"]

    def result(name: str, record: dict, planned: float, config: dict | None) -> dict:
        suite = record["suite"]
        return {"name": name, "mean_accuracy": suite["mean_accuracy"],
                "relative_accuracy": suite["mean_accuracy"] / full_mean,
                "measured_ratio": record["max_total_num_tokens"] / stock["max_total_num_tokens"],
                "planned_ratio": planned, "accuracy": suite["accuracy"],
                "max_total_num_tokens": record["max_total_num_tokens"], "config": config}

    results = {quality.FULL: result(quality.FULL, stock, 1.0, None)}
    predictions = {quality.FULL: stock["suite"]["predictions"]}
    not_served = {}
    server_of = same_settings_as(variants)
    for name, (_, config) in variants.items():
        # Its own server if one answered under its name (reports merged from several calls may
        # hold two servers of the same settings), else the one `same_settings_as` chose for it.
        server = name if servers.get(name, {}).get("suite") else server_of[name]
        record = servers.get(server, {"error": "not run"})
        if not record.get("suite"):
            not_served[name] = record.get("error", "no suite")
            continue
        results[name] = {**result(name, record, planned[name], config_to_dict(config)), "server": server}
        predictions[name] = record["suite"]["predictions"]
    return {
        "date": served["date"], "command": command, "device": served["device"], "versions": served["versions"],
        "model": model, "suite": served["suite"],
        "path": "SGLang server (eval/tiny/serve_eval.py: /generate with input_ids), greedy, exact match of the "
                "first answer line; full = stock SGLang",
        "planned_ratio_basis": quality.PLANNED_RATIO_BASIS,
        "measured_ratio_basis": SERVER_RATIO_BASIS,
        "results": results, "predictions": predictions, "not_served": not_served,
        "groups": {name: group for name, (group, _) in variants.items() if name in results},
        **({"sources": served["sources"]} if "sources" in served else {}),
    }


def served_records(report: dict) -> dict:
    """A report of answers by server, serve_eval's schema: a serve_eval.json as it is, or a
    served ablation's ablation.json (its servers' answers and capacities, taken back apart; a
    device call returns 8 files, so its serve_eval.json may not come back when its configs
    and logs are many)."""
    if "servers" in report:
        return report
    if report.get("measured_ratio_basis") != SERVER_RATIO_BASIS:
        raise ValueError("neither a serve_eval.json nor a served ablation's ablation.json (eval.ablate --server)")
    servers = {}
    for name, result in report["results"].items():
        server = STOCK if name == quality.FULL else result["server"]
        servers.setdefault(server, {"name": server, "max_total_num_tokens": result["max_total_num_tokens"],
                                    "suite": {"accuracy": result["accuracy"],
                                              "mean_accuracy": result["mean_accuracy"],
                                              "predictions": report["predictions"][name]}})
    return {key: report[key] for key in ("date", "command", "device", "versions", "suite")} | {
        "servers": list(servers.values())}


def merge_serve_reports(reports: Sequence[dict], sources: Sequence[str]) -> dict:
    """serve_eval reports of one sweep split over several device calls, as one: their servers
    together, the first file's date, device and versions, and `sources` (each file's date and
    command). Only reports of the same suite (tasks, lengths, samples, seed: the same held-out
    samples) merge, and a server answers in one of them only."""
    first = reports[0]
    merged = {**first, "servers": [], "sources": []}
    answered_in: dict[str, str] = {}
    for report, source in zip(reports, sources):
        if report["suite"] != first["suite"]:
            raise ValueError(f"{source} ran another suite ({report['suite']}) than {sources[0]} "
                             f"({first['suite']}); its answers are not on the same samples")
        for record in report["servers"]:
            if record.get("suite") and record["name"] in answered_in:
                raise ValueError(f"{record['name']!r} answered in both {answered_in[record['name']]} and {source}")
            if record.get("suite"):
                answered_in[record["name"]] = source
        merged["sources"].append({"file": source, "date": report["date"], "command": report.get("command")})
        merged["servers"] += report["servers"]
    # A server that failed in one call and answered in another: the answering record counts.
    merged["servers"] = [record for record in merged["servers"]
                         if record.get("suite") or record["name"] not in answered_in]
    return merged


def serve_variants(args: argparse.Namespace, variants: dict[str, tuple[str, CompressionConfig]]) -> dict:
    """Stock SGLang (unless --no-stock) and every variant as servers (eval/tiny/serve_eval.py);
    its report."""
    from eval.tiny import serve_eval

    specs = write_variant_configs(variants, args.out / "configs")
    stock = [] if args.no_stock else [STOCK]
    serve_args = ["--configs", *stock, *specs, "--out", str(args.out / "serve"), "--model-path", str(args.model),
                  "--tasks", *args.tasks, "--lengths", *map(str, args.lengths), "--samples", str(args.samples),
                  "--seed", str(args.seed), "--shared-contexts", "0"]
    if args.deadline_s is not None:
        serve_args += ["--deadline-s", str(args.deadline_s)]
    if args.gpus is not None:
        serve_args += ["--gpus", str(args.gpus)]
    serve_eval.main(serve_args)
    return json.loads((args.out / "serve" / "serve_eval.json").read_text())


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    by_group: dict[str, list[tuple[float, float, str]]] = {}
    for name, result in report["results"].items():
        group = report["groups"].get(name, "baseline")
        by_group.setdefault(group, []).append((result["measured_ratio"], 100 * result["relative_accuracy"], name))
    for group, points in by_group.items():
        xs, ys, names = zip(*points)
        ax.scatter(xs, ys, label=group, s=30)
        for x, y, name in points:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log", base=2)
    basis = report.get("measured_ratio_basis", "bf16 KV bytes / compressed KV bytes, these prompts")
    # wrapped: the server's basis is longer than the figure is wide
    ax.set_xlabel(textwrap.fill(f"measured compression ratio ({basis})", 120), fontsize=8)
    ax.set_ylabel("accuracy relative to the full cache (%)")
    suite = report["suite"]
    ax.set_title(f"tiny model, {'+'.join(suite['tasks'])} at {suite['lengths']} tokens, "
                 f"{suite['samples']} samples each")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for ablation.{json,md,png}")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="config the variants are derived from")
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), default=DEFAULT_GROUPS,
                        help=f"groups to run (default: {' '.join(DEFAULT_GROUPS)})")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="run only these variants of the chosen groups (names as in the table)")
    quality.add_suite_arguments(parser, quality.Suite(lengths=(1024, 2048, 4096), samples=30))
    parser.add_argument("--server", action="store_true",
                        help="serve each variant with SGLang (GPU) instead of the transformers reference path")
    parser.add_argument("--deadline-s", type=float,
                        help="with --server: start no new server after this many seconds")
    parser.add_argument("--gpus", type=int,
                        help="with --server: servers at once, one per GPU (eval/tiny/serve_eval.py --gpus)")
    parser.add_argument("--serve-report", type=Path, nargs="+", metavar="SERVE_EVAL_JSON",
                        help="with --server: build the report from these serve_eval.json files (e.g. a device "
                             "call's, cut short; or a served ablation.json; several: one sweep over several "
                             "calls, merged) instead of starting servers")
    parser.add_argument("--no-stock", action="store_true",
                        help="with --server: serve the variants only (stock SGLang answered in another call); "
                             "writes DIR/serve/serve_eval.json and no report: build it with --serve-report")
    args = parser.parse_args(argv)
    for option in ("deadline_s", "serve_report", "gpus"):
        if getattr(args, option) is not None and not args.server:
            parser.error(f"--{option.replace('_', '-')} applies to --server only")
    if args.no_stock and (not args.server or args.serve_report):
        parser.error("--no-stock applies to --server runs that start servers (not with --serve-report)")

    variants = chosen_variants(parser, args.base, args.only, args.variants)
    command = shlex.join(["python", "-m", "eval.ablate", *argv])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.server:
        planned = planned_ratios(variants)
        if args.serve_report:
            served = merge_serve_reports([served_records(json.loads(path.read_text())) for path in args.serve_report],
                                         [str(path) for path in args.serve_report])
        else:
            served = serve_variants(args, variants)
        if args.no_stock:
            print(f"served without stock SGLang: {args.out / 'serve' / 'serve_eval.json'}; build the report with "
                  "--serve-report and a serve_eval.json that has stock's answers")
            return 0
        report = server_report(served, variants, planned, command, str(args.model))
        measured_basis = SERVER_RATIO_BASIS
    else:
        evaluator = quality.TinyEvaluator(args.model, args.device)
        suite = quality.suite_from_args(args)
        answered_by = same_settings_as(variants)
        distinct = {name: config for name, (_, config) in variants.items() if answered_by[name] == name}
        evaluated = quality.evaluate_configs(evaluator, distinct, suite)
        results = {quality.FULL: evaluated[quality.FULL]} | {
            name: dataclasses.replace(evaluated[answered_by[name]], name=name, config=dataclasses.asdict(config))
            for name, (_, config) in variants.items()}
        report = quality.report(results, suite, evaluator, command)
        report["groups"] = {name: group for name, (group, _) in variants.items()}
        measured_basis = "bf16 bytes / compressed bytes of the caches these prompts left (tiny model shape)"
    report["base"] = str(args.base)

    (args.out / "ablation.json").write_text(json.dumps(report, indent=1))
    table = quality.markdown_table(report)
    missing = "".join(f"\nNot served: {name} ({error})." for name, error in report.get("not_served", {}).items())
    (args.out / "ablation.md").write_text(
        f"# Ablations on the tiny model ({report['date']}, {report['device']})\n\n`{report['command']}`\n\n"
        f"Path: {report['path']}. Planned ratio: {report['planned_ratio_basis']}. Measured ratio: "
        f"{measured_basis}.{missing}\n\n{table}")
    plot(report, args.out / "ablation.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
