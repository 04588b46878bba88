"""The `sglang-kvc` command line.

    sglang-kvc plan CONFIG --model-config PATH/config.json [--kv-memory-gb 110] [--json]
    sglang-kvc demo [--config CONFIG] [--model PATH] [--device cpu|cuda] [--samples 3]

`plan` prints what a compression config costs per token in every tier, what one prompt
compresses to, and how many tokens fit in a KV budget. The numbers come from
`KVPlan.report`, the same planner that sizes the pool inside SGLang.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from sglang_kvc import demo as demo_command
from sglang_kvc.argtypes import positive_float, positive_int
from sglang_kvc.config import ConfigError, load_config
from sglang_kvc.planner import KVPlan, ModelShape, RuntimeLimits, plan_for

GIB = 2**30
EXIT_USAGE = 2  # what argparse uses for a bad command line; a bad file is the same kind of error


class UsageError(Exception):
    """An input the user can fix (config, model config, sizes); printed without a traceback."""


# ---- argument parsing ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglang-kvc", description="Hybrid KV-cache compression for SGLang."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    plan = commands.add_parser(
        "plan",
        help="bytes per token, compression ratio and capacity of a compression config",
        description="Print what a compression config costs and buys for one model.",
    )
    plan.add_argument("config", metavar="CONFIG", help="compression config YAML (see configs/)")
    plan.add_argument(
        "--model-config",
        required=True,
        metavar="PATH",
        help="the model's Hugging Face config.json (or the folder holding it)",
    )
    plan.add_argument(
        "--kv-memory-gb",
        type=positive_float,
        default=110.0,
        metavar="N",
        help="KV-cache memory in GiB (2**30 bytes), staging included (default: 110)",
    )
    plan.add_argument(
        "--prompt-len",
        type=positive_int,
        default=32768,
        metavar="N",
        help="prompt length for the compression ratio (default: 32768)",
    )
    plan.add_argument(
        "--chunked-prefill-size",
        type=positive_int,
        default=RuntimeLimits.chunked_prefill_size,
        metavar="N",
        help=f"SGLang's --chunked-prefill-size (default: {RuntimeLimits.chunked_prefill_size})",
    )
    plan.add_argument(
        "--max-running-requests",
        type=positive_int,
        default=RuntimeLimits.max_running_requests,
        metavar="N",
        help=f"SGLang's --max-running-requests (default: {RuntimeLimits.max_running_requests})",
    )
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    plan.set_defaults(run=_run_plan)
    demo = commands.add_parser(
        "demo",
        help="answer passkey prompts with a full and a compressed KV cache (transformers, local model)",
        description="Answer seeded passkey prompts with a full and a compressed KV cache.",
    )
    demo_command.add_arguments(demo)
    demo.set_defaults(run=demo_command.main)
    return parser


# ---- plan -----------------------------------------------------------------------------------


def _load_model_shape(path_text: str) -> ModelShape:
    path = Path(path_text)
    if path.is_dir():
        path = path / "config.json"
    try:
        return ModelShape.from_hf_config(path)
    except OSError as exc:
        raise UsageError(f"--model-config: cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-config: {path} is not valid JSON: {exc}") from None
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        raise UsageError(
            f"--model-config: {path} is not a usable Hugging Face config ({exc!r}); it needs "
            f"num_hidden_layers, num_attention_heads and hidden_size (or head_dim)"
        ) from None


def _run_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    shape = _load_model_shape(args.model_config)
    limits = RuntimeLimits(
        chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=args.max_running_requests,
    )
    plan = plan_for(config, shape, limits)
    kv_memory_bytes = int(args.kv_memory_gb * GIB)
    try:
        report = plan.report(args.prompt_len, kv_memory_bytes)
    except ValueError as exc:  # the budget does not cover the staging tier
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(plan, report))
    return 0


def _bits_label(bits: int) -> str:
    return "bf16" if bits == 16 else f"{bits}-bit"


def _retain_lines(ratios: list[float], per_line: int = 10) -> list[str]:
    if len(set(ratios)) == 1:
        return [f"  all {len(ratios)} layers  {ratios[0]:.4f}"]
    lines = []
    for start in range(0, len(ratios), per_line):
        chunk = ratios[start : start + per_line]
        span = f"layers {start}-{start + len(chunk) - 1}"
        lines.append(f"  {span:<13}" + " ".join(f"{r:.4f}" for r in chunk))
    return lines


def format_report(plan: KVPlan, report: dict) -> str:
    """The report as an aligned table; every number is one of `report`'s, not recomputed."""
    quant = plan.config.quantization
    sparsity = plan.config.sparsity
    per_layer = report["bytes_per_token_per_layer"]
    meta = report["metadata_bytes"]
    model = report["model"]
    limits = report["limits"]
    prompt = report["prompt"]
    ratios = report["layer_retain_ratios"]

    def row(label: str, value: str, note: str = "") -> str:
        return f"  {label:<26}{value:>16}  {note}".rstrip()

    def count(n: int) -> str:
        return f"{n:,}"

    lines = [
        f"sglang-kvc plan: {report['config']}",
        f"model: {model['num_layers']} layers, {model['kv_heads']} KV heads, "
        f"head_dim {model['head_dim']}, context {count(model['context_len'])}",
        f"runtime: chunked_prefill_size {count(limits['chunked_prefill_size'])}, "
        f"max_running_requests {count(limits['max_running_requests'])}",
        "",
        f"Bytes per token per layer (K+V, all {model['kv_heads']} KV heads)",
        row("bf16 (uncompressed)", count(per_layer["bf16"])),
        row(
            "low-bit row",
            count(per_layer["lowbit"]),
            f"K {quant.key_bits}-bit, V {quant.value_bits}-bit, group {quant.group_size}",
        ),
        row("  codes", count(per_layer["lowbit_codes"]), "int32 words"),
        row("  scales", count(per_layer["lowbit_scales"]), "fp16 (scale, minimum) per group"),
        row(
            "guard row",
            count(per_layer["guard"]),
            f"{_bits_label(quant.guard_bits)}, {quant.guard_fraction:.0%} of kept tokens",
        ),
        row("staging row", count(per_layer["staging"]), "bf16, prompt chunks and decode window"),
        "",
        "Metadata (bytes)",
        row(
            "location map",
            count(meta["location_map_per_token"]),
            f"per logical token ({model['num_layers']} layers x int32)",
        ),
        row("row free list", count(meta["free_list_per_row"]), "per kept row (int64)"),
        row("logical free list", count(meta["logical_free_list_per_token"]), "per logical token (int64)"),
        row(
            "staging fixed cost",
            count(meta["staging_fixed"]),
            f"{meta['staging_fixed'] / GIB:.2f} GiB",
        ),
        row(
            "staging rows",
            count(meta["staging_rows"]),
            "context + prefill chunk + running requests x (decode_window + 1)",
        ),
        "",
        f"Retain ratio per layer ({sparsity.budget}, mean {sum(ratios) / len(ratios):.4f})",
        *_retain_lines(ratios),
        "",
        f"One prompt of {count(report['prompt_len'])} tokens (bytes)",
        row("bf16 KV", count(prompt["bf16"])),
        row(
            "compressed payload",
            count(prompt["payload"]),
            f"{count(prompt['guard_rows'])} guard rows + {count(prompt['lowbit_rows'])} low-bit rows",
        ),
        row("compressed metadata", count(prompt["metadata"])),
        row("compressed total", count(prompt["compressed"])),
        row("compression ratio", f"{report['compression_ratio']:.3f}x", "with metadata"),
        row("payload ratio", f"{report['payload_compression_ratio']:.3f}x", "without metadata"),
        "",
        f"Capacity in {report['kv_memory_bytes'] / GIB:g} GiB of KV memory "
        f"({count(report['kv_memory_bytes'])} bytes)",
        row("bytes per logical token", f"{report['bytes_per_logical_token']:,.1f}"),
        row("logical tokens fit", count(report["logical_tokens_fit"])),
        row("bf16 tokens fit", count(report["bf16_tokens_fit"])),
        row("capacity gain", f"{report['capacity_gain']:.3f}x", "logical / bf16 tokens"),
    ]
    return "\n".join(lines)


# ---- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, UsageError) as exc:
        print(f"sglang-kvc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
