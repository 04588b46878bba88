#!/usr/bin/env python3
"""Compile the project's Triton kernels for the H200 (sm_90) without a GPU and report what
ptxas says: registers per thread, spill stores / loads (bytes), shared memory.

    python eval/compile_kernels.py --out DIR      # DIR/compile_kernels.{json,md}

Why: a register or spill problem shows here in seconds, before a GPU call is spent on it
(the score kernel's fp32 "ieee" dot spilled ~6 KB per thread; tf32 does not). Shapes are
Qwen2.5-7B's (28 query heads, 4 KV heads, head_dim 128) unless a case says otherwise;
the configs are the shipped ones' formats. Nothing here runs a kernel.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, not interpret, whatever the caller set

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root, for eval.sass

import sglang_kvc.kernels.decode_attention as decode_module  # noqa: E402
from eval.sass import LOOP_OPCODES, sass_loops  # noqa: E402
import sglang_kvc.kernels.gather_rows as gather_module  # noqa: E402
import sglang_kvc.kernels.score as score_module  # noqa: E402
import sglang_kvc.kernels.staging as staging_module  # noqa: E402
import eval.operand_probe as probe_module  # noqa: E402
from sglang_kvc.quant import PackedFormat  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
NVDISASM = PTXAS.with_name("nvdisasm")
# "/*0a40*/   @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;" -> LDG
SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
CONVERSION_OPCODES = {"I2F", "I2FP", "F2F", "F2FP", "F2I", "I2I", "F2IP", "I2IP"}
Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128

# name: (key bits, value bits, group size, guard bits), as configs/*.yaml store them.
DECODE_FORMATS = {
    "qwen_12x": (2, 2, 64, 16),
    "qwen_8x": (3, 2, 32, 16),
    "qwen_8x_aggressive": (2, 2, 32, 16),
    "tuned (K4V2 g64)": (4, 2, 64, 16),
    "8-bit guard (K2V2 g32)": (2, 2, 32, 8),
    "qwen_5x_tuned (K4V2 g64, 8-bit guard)": (4, 2, 64, 8),
}
# eval/configs/retain_all_8bit.yaml (the fidelity check against stock, not a shipped config):
# compiled only where bench v18 measured it (v4 at 32, v5 at 64, capped and not).
RETAIN_ALL_8BIT = (8, 8, 32, 16)


def compile_and_measure(kernel, pointer_types: dict[str, str], constexprs: dict, int_values: dict | None = None,
                        num_warps=4, num_stages=3, max_registers: int | None = None) -> dict:
    """Every argument not in `constexprs` is a pointer (type from `pointer_types`, else
    *i32; 16-byte aligned) or a scalar: fp32 for qk_scale, else int32. Integers with a
    representative value in `int_values` are specialized as Triton's launcher does (1 ->
    constexpr, a multiple of 16 -> divisibility 16), so strides compile as in a real call."""
    signature, attributes, constexprs = {}, {}, dict(constexprs)
    unspecialized = {param.name for param in kernel.params if param.do_not_specialize}
    for index, name in enumerate(kernel.arg_names):
        # An argument the kernel does not specialize on compiles as a plain i32 in a real call.
        value = None if name in unspecialized else (int_values or {}).get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*i32")
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
            if value is not None and value % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if max_registers is not None:
        options["maxnreg"] = max_registers  # as decode_attention's max_registers launches it
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attributes), target=TARGET,
                                  options=options)
    except Exception as exc:  # noqa: BLE001 - recorded, the next case still compiles
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(compiled.asm["ptx"])
    cubin = ptx.name + ".cubin"
    report = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", ptx.name, "-o", cubin],
                            capture_output=True, text=True).stderr
    sass = subprocess.run([str(NVDISASM), cubin], capture_output=True, text=True).stdout
    os.unlink(ptx.name)
    os.unlink(cubin)
    opcodes = [match.group(1).split(".")[0] for match in SASS_INSTRUCTION.finditer(sass)]
    ttgir = compiled.asm["ttgir"]
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None,
            "shared_bytes": compiled.metadata.shared, "num_warps": num_warps, "num_stages": num_stages,
            # Static counts over the whole kernel (every tier's loop): conversions run at a
            # quarter of the FMA rate on sm_90, so they are counted apart.
            "sass_instructions": len(opcodes),
            "sass_conversions": sum(op in CONVERSION_OPCODES for op in opcodes),
            # Register tensors stored to shared memory (ttg.local_alloc of a value), e.g. a
            # dequantized tile on its way to an mma operand; async copies are not counted.
            "shared_stores_of_registers": len(re.findall(r"ttg\.local_alloc %", ttgir)),
            "ldmatrix": opcodes.count("LDSM"), "shared_loads": opcodes.count("LDS"),
            "shared_stores": opcodes.count("STS"), "loops": sass_loops(sass)}


def decode_case(version: str, formats: tuple, block_n: int, head_dim: int = HEAD_DIM, query_group: int = 7,
                prefetch: bool = False, dot_precision: str = "auto", num_warps: int = 4,
                max_registers: int | None = None, pair_order: bool = False, bias_register: bool = False,
                in_place_values: bool = False, lane_keys: bool = False, pipelined_loads: bool = False,
                wide_offsets: bool = False, block_g: int = 16) -> dict:
    """decode_attention's split kernel as it launches it; `dot_precision` "auto" or "bf16"
    (the bf16 rows' dots on bf16 operands), `max_registers` its register cap, `pair_order` (v4 /
    v5) the codes in pair order, `bias_register` their bias from the kernel argument,
    `in_place_values` the value codes masked in place, `lane_keys` the key codes in lane order,
    `pipelined_loads` the packed loops' loads by Triton's pipeliner, `wide_offsets` 64-bit row
    offsets (v4 / v5; False: the 32-bit ones decode_attention takes for tables below 2**31 elements),
    `block_g` the rows the query group is padded to (decode_attention's `block_g`)."""
    key_bits, value_bits, group, guard_bits = formats
    dense_precision = {"auto": "tf32", "bf16": "bf16"}[dot_precision]
    kernel = {"v1": decode_module._decode_split_kernel,
              "v4": decode_module._decode_split_kernel_v4,
              "v5": decode_module._decode_split_kernel_v4}.get(version, decode_module._decode_split_kernel_v2)
    register_slots = None
    if version == "v3":  # v2's kernel with the register-operand low-bit loop, codes viewed as containers
        register_slots = [decode_module.register_operand_slots(PackedFormat(bits, head_dim, group))
                          for bits in (key_bits, value_bits)]
        if None in register_slots:
            return {"error": f"no register-operand loop for K{key_bits}V{value_bits} g{group}"}
    guard_packed = guard_bits != 16
    pointers = {"q_ptr": "*bf16", "staging_k_ptr": "*bf16", "staging_v_ptr": "*bf16", "entry_tier_ptr": "*i8",
                "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32"}
    if not guard_packed:
        pointers.update({name: "*bf16" for name in ("guard_k_ptr", "guard_v_ptr", "guard_k_pairs_ptr", "guard_v_pairs_ptr")})
    constexprs = {"QUERY_GROUP": query_group, "HEAD_DIM": head_dim, "KEY_BITS": key_bits,
                  "KEY_GROUP_SIZE": group, "VALUE_BITS": value_bits, "VALUE_GROUP_SIZE": group,
                  "GUARD_PACKED": guard_packed, "GUARD_BITS": guard_bits,
                  "GUARD_GROUP_SIZE": group if guard_packed else head_dim, "BLOCK_G": block_g,
                  "BLOCK_D": triton.next_power_of_2(head_dim), "BLOCK_N": block_n, "DOT_PRECISION": dense_precision}
    if version in ("v4", "v5"):  # output slices of the value group (one group size for every tier here)
        constexprs.update(ACC_COLS=group, PACKED_DOT_PRECISION="fp16", TRANSPOSED=version == "v5",
                          PAIR_ORDER=pair_order, BIAS_REGISTER=bias_register, IN_PLACE_VALUES=in_place_values,
                          LANE_KEYS=lane_keys, PIPELINED_LOADS=pipelined_loads, WIDE_OFFSETS=wide_offsets)
    elif version != "v1":
        # dot_precision as decode_attention runs it: fp16 on packed rows (a bf16 guard here unless
        # guard_bits 8), tf32 or bf16 on the bf16 ones
        constexprs.update(PREFETCH=prefetch, LOWBIT_DOT_PRECISION="fp16",
                          GUARD_DOT_PRECISION="fp16" if guard_packed else dense_precision,
                          REGISTER_OPERANDS=False, KEY_SLOTS=1, VALUE_SLOTS=1, PAIRED_ASM=False)
    if register_slots:
        constexprs.update(REGISTER_OPERANDS=True, KEY_SLOTS=register_slots[0], VALUE_SLOTS=register_slots[1],
                          PAIRED_ASM=True)
        container_types = {8: "*i8", 16: "*i16", 32: "*i32"}
        pointers.update(lowbit_k_codes_ptr=container_types[register_slots[0] * key_bits],
                        lowbit_v_codes_ptr=container_types[register_slots[1] * value_bits])
    q_heads, kv_heads = query_group * KV_HEADS, KV_HEADS

    def words(bits):  # int32 words per row and head (quant.PackedFormat)
        return -(-head_dim // (32 // bits))

    def code_units(bits, slots):  # the words' length in the kernel's code units (v3: containers)
        return words(bits) * 32 // (slots * bits) if slots else words(bits)

    key_units = code_units(key_bits, register_slots and register_slots[0])
    value_units = code_units(value_bits, register_slots and register_slots[1])

    groups = head_dim // group
    strides = {"stride_q_batch": q_heads * head_dim, "stride_q_head": head_dim,
               "stride_staging_row": kv_heads * head_dim, "stride_staging_head": head_dim,
               "stride_lk_row": kv_heads * key_units, "stride_lk_head": key_units,
               "stride_lk_pairs_row": kv_heads * groups, "stride_lk_pairs_head": groups,
               "stride_lv_row": kv_heads * value_units, "stride_lv_head": value_units,
               "stride_lv_pairs_row": kv_heads * groups, "stride_lv_pairs_head": groups,
               "stride_po_batch": q_heads * 16 * head_dim, "stride_po_head": 16 * head_dim, "stride_po_split": head_dim,
               "stride_pl_batch": q_heads * 16, "stride_pl_head": 16,
               "stride_tier_indptr_batch": 4, "stride_tier_indptr_tier": 1}
    if guard_packed:
        strides.update(stride_guard_row=kv_heads * words(guard_bits), stride_guard_head=words(guard_bits),
                       stride_guard_pairs_row=kv_heads * groups, stride_guard_pairs_head=groups)
    else:
        strides.update(stride_guard_row=kv_heads * head_dim, stride_guard_head=head_dim,
                       stride_guard_pairs_row=0, stride_guard_pairs_head=0)
    return compile_and_measure(kernel, pointers, constexprs, strides, num_warps=num_warps,
                               max_registers=max_registers)


def region_builder_cases() -> list[tuple[str, callable]]:
    """The launches of a decode pass's entry lists as the engine makes them (BLOCK 1024, 4
    warps; 32 position blocks: a 32K context): every layer's counts at once, then one
    scatter per layer."""
    pointers = {"req_pool_indices_ptr": "*i64", "entry_tier_ptr": "*i8"}
    strides = {"stride_req_to_token": 32768, "num_blocks": 32, "stride_location_layer": 1 << 20,
               "num_layers": 28, "batch": 64}
    return [
        ("entry builder in regions: count, all layers (BLOCK 1024)",
         lambda: compile_and_measure(decode_module._count_held_kernel, pointers,
                                     {"BLOCK": 1024, "LAYERS_PER_STEP": decode_module._COUNT_LAYERS_PER_STEP},
                                     strides)),
        ("entry builder in regions: scatter (BLOCK 1024, 32 blocks)",
         lambda: compile_and_measure(decode_module._region_scatter_kernel, pointers,
                                     {"BLOCK": 1024, "BLOCKS_PER_STEP": decode_module._SCATTER_BLOCKS_PER_STEP},
                                     strides)),
    ]


def gather_case(formats: tuple) -> dict:
    """The prefix gather of prefill over a cached prefix (kernels/gather_rows.py), bf16 out."""
    key_bits, value_bits, group, guard_bits = formats
    guard_packed = guard_bits != 16
    pointers = {name: "*bf16" for name in ("out_k_ptr", "out_v_ptr", "staging_k_ptr", "staging_v_ptr")}
    pointers["entry_tier_ptr"] = "*i8"
    if not guard_packed:
        pointers.update({name: "*bf16" for name in ("guard_k_ptr", "guard_v_ptr", "guard_k_pairs_ptr", "guard_v_pairs_ptr")})
    constexprs = {"KEY_BITS": key_bits, "KEY_GROUP_SIZE": group, "VALUE_BITS": value_bits, "VALUE_GROUP_SIZE": group,
                  "GUARD_PACKED": guard_packed, "GUARD_BITS": guard_bits,
                  "GUARD_GROUP_SIZE": group if guard_packed else HEAD_DIM, "HEAD_DIM": HEAD_DIM,
                  "BLOCK_N": gather_module._BLOCK_N, "BLOCK_D": HEAD_DIM}
    words = {bits: -(-HEAD_DIM // (32 // bits)) for bits in (key_bits, value_bits, guard_bits)}
    groups = HEAD_DIM // group
    strides = {"stride_out_row": KV_HEADS * HEAD_DIM, "stride_out_head": HEAD_DIM,
               "stride_staging_row": KV_HEADS * HEAD_DIM, "stride_staging_head": HEAD_DIM,
               "stride_lk_row": KV_HEADS * words[key_bits], "stride_lk_head": words[key_bits],
               "stride_lk_pairs_row": KV_HEADS * groups, "stride_lk_pairs_head": groups,
               "stride_lv_row": KV_HEADS * words[value_bits], "stride_lv_head": words[value_bits],
               "stride_lv_pairs_row": KV_HEADS * groups, "stride_lv_pairs_head": groups}
    if guard_packed:
        strides.update(stride_guard_row=KV_HEADS * words[guard_bits], stride_guard_head=words[guard_bits],
                       stride_guard_pairs_row=KV_HEADS * groups, stride_guard_pairs_head=groups)
    else:
        strides.update(stride_guard_row=KV_HEADS * HEAD_DIM, stride_guard_head=HEAD_DIM,
                       stride_guard_pairs_row=0, stride_guard_pairs_head=0)
    return compile_and_measure(gather_module._gather_rows_kernel, pointers, constexprs, strides)


def score_case(kernel, dot_precision: str = "tf32") -> dict:
    pointers = {"q_ptr": "*fp32", "row_positions_ptr": "*i64", "k_ptr": "*bf16", "key_positions_ptr": "*i64",
                "key_starts_ptr": "*i64",
                "row_max_ptr": "*fp32", "row_sum_ptr": "*fp32", "scores_ptr": "*fp32"}
    constexprs = {"ROWS_PER_HEAD": 7 * 32, "HEAD_DIM": HEAD_DIM, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": HEAD_DIM,
                  "DOT_PRECISION": dot_precision}
    strides = {"stride_q_row": HEAD_DIM, "stride_k_token": KV_HEADS * HEAD_DIM, "stride_k_head": HEAD_DIM,
               "stride_scores_head": 32768}
    return compile_and_measure(kernel, pointers, constexprs, strides)


def cases() -> list[tuple[str, callable]]:
    result = []
    for name, formats in DECODE_FORMATS.items():
        result.append((f"decode v1 {name} BLOCK_N 16", lambda f=formats: decode_case("v1", f, 16)))
        for block_n in (16, 32, 64):
            result.append((f"decode v2 {name} BLOCK_N {block_n}", lambda f=formats, b=block_n: decode_case("v2", f, b)))
        for block_n in (16, 64):
            result.append((f"decode v2 {name} BLOCK_N {block_n}, prefetch",
                           lambda f=formats, b=block_n: decode_case("v2", f, b, prefetch=True)))
    for name in ("tuned (K4V2 g64)", "qwen_8x_aggressive", "qwen_12x"):
        for block_n in (32, 64):
            result.append((f"decode v3 {name} BLOCK_N {block_n}",
                           lambda f=DECODE_FORMATS[name], b=block_n: decode_case("v3", f, b)))
    for version in ("v4", "v5"):
        for name, formats in DECODE_FORMATS.items():
            for block_n in (32, 64):
                result.append((f"decode {version} {name} BLOCK_N {block_n}",
                               lambda f=formats, b=block_n, v=version: decode_case(v, f, b)))
    # The next bench call's levers (docs/kernels.md, "Twenty-sixth session"): the codes in pair
    # order (every format), bf16 dots on the bf16 rows, BLOCK_N 128 on 8 warps, register caps.
    for version, block_n in (("v4", 32), ("v5", 64)):
        for name, formats in DECODE_FORMATS.items():
            result.append((f"decode {version} {name} BLOCK_N {block_n}, pairs",
                           functools.partial(decode_case, version, formats, block_n, pair_order=True)))
    for version, name, block_n, pairs in (("v2", "tuned (K4V2 g64)", 64, False), ("v4", "tuned (K4V2 g64)", 32, True),
                                          ("v5", "tuned (K4V2 g64)", 64, True), ("v4", "qwen_8x", 64, False)):
        result.append((f"decode {version} {name} BLOCK_N {block_n}, bf16 dots" + (", pairs" if pairs else ""),
                       functools.partial(decode_case, version, DECODE_FORMATS[name], block_n, dot_precision="bf16",
                                         pair_order=pairs)))
    result.append(("decode v5 tuned (K4V2 g64) BLOCK_N 128, 8 warps, pairs",
                   lambda: decode_case("v5", DECODE_FORMATS["tuned (K4V2 g64)"], 128, num_warps=8, pair_order=True)))
    # Register caps: fewer registers per thread, more 4-warp programs per SM (65,536 registers).
    for version, name, block_n, pairs in (("v5", "tuned (K4V2 g64)", 64, True), ("v4", "tuned (K4V2 g64)", 32, True),
                                          ("v2", "qwen_8x_aggressive", 64, False)):
        for cap in (168, 128):
            result.append((f"decode {version} {name} BLOCK_N {block_n}, at most {cap} registers"
                           + (", pairs" if pairs else ""),
                           functools.partial(decode_case, version, DECODE_FORMATS[name], block_n, max_registers=cap,
                                             pair_order=pairs)))
    for version, block_n, cap in (("v4", 32, None), ("v5", 64, None), ("v5", 64, 168)):
        result.append((f"decode {version} retain_all_8bit (K8V8 g32) BLOCK_N {block_n}"
                       + (f", at most {cap} registers" if cap else ""),
                       functools.partial(decode_case, version, RETAIN_ALL_8BIT, block_n, max_registers=cap)))
    # The pairs' bias in a register (one LOP3 per pair instead of two), on the engine's kernel
    # for K4V2 g64 and on v4.
    for name in ("tuned (K4V2 g64)", "qwen_5x_tuned (K4V2 g64, 8-bit guard)"):
        for bias_register in (False, True):
            result.append((f"decode v5 {name} BLOCK_N 64, at most 168 registers, bf16 dots, pairs"
                           + (", bias register" if bias_register else ""),
                           functools.partial(decode_case, "v5", DECODE_FORMATS[name], 64, dot_precision="bf16",
                                             max_registers=168, pair_order=True, bias_register=bias_register)))
    result.append(("decode v4 tuned (K4V2 g64) BLOCK_N 32, pairs, bias register",
                   functools.partial(decode_case, "v4", DECODE_FORMATS["tuned (K4V2 g64)"], 32, pair_order=True,
                                     bias_register=True)))
    # The value codes masked in place (one shift per word instead of one per slot), on the engine's
    # kernel for K4V2 g64 with and without the bias register, and on v4.
    for name in ("tuned (K4V2 g64)", "qwen_5x_tuned (K4V2 g64, 8-bit guard)"):
        for bias_register in (False, True):
            result.append((f"decode v5 {name} BLOCK_N 64, at most 168 registers, bf16 dots, pairs"
                           + (", bias register" if bias_register else "") + ", in-place values",
                           functools.partial(decode_case, "v5", DECODE_FORMATS[name], 64, dot_precision="bf16",
                                             max_registers=168, pair_order=True, bias_register=bias_register,
                                             in_place_values=True)))
    result.append(("decode v4 tuned (K4V2 g64) BLOCK_N 32, pairs, bias register, in-place values",
                   functools.partial(decode_case, "v4", DECODE_FORMATS["tuned (K4V2 g64)"], 32, pair_order=True,
                                     bias_register=True, in_place_values=True)))
    # The key codes in lane order and the loads left to Triton's pipeliner, each and together, on
    # the engine's kernel for K4V2 g64 (in-place values) and on v4:32 in pair order.
    engine_options = {"dot_precision": "bf16", "max_registers": 168, "pair_order": True, "in_place_values": True}
    for lane_keys, pipelined_loads in ((True, False), (False, True), (True, True)):
        label = ", ".join(part for part, on in (("lane keys", lane_keys), ("pipelined loads", pipelined_loads)) if on)
        for name in ("tuned (K4V2 g64)", "qwen_5x_tuned (K4V2 g64, 8-bit guard)"):
            result.append((f"decode v5 {name} BLOCK_N 64, engine (in-place values), {label}",
                           functools.partial(decode_case, "v5", DECODE_FORMATS[name], 64, lane_keys=lane_keys,
                                             pipelined_loads=pipelined_loads, **engine_options)))
        result.append((f"decode v4 tuned (K4V2 g64) BLOCK_N 32, pairs, {label}",
                       functools.partial(decode_case, "v4", DECODE_FORMATS["tuned (K4V2 g64)"], 32, pair_order=True,
                                         lane_keys=lane_keys, pipelined_loads=pipelined_loads)))
    # 32-bit row offsets (decode_attention's choice wherever the tables allow them) against 64-bit
    # ones, on the engine's kernel for K4V2 g64 and on v4 as the engine runs it for the other formats.
    for wide_offsets in (True, False):
        label = "64-bit row offsets" if wide_offsets else "32-bit row offsets"
        for name in ("tuned (K4V2 g64)", "qwen_5x_tuned (K4V2 g64, 8-bit guard)"):
            result.append((f"decode v5 {name} BLOCK_N 64, engine (in-place values), {label}",
                           functools.partial(decode_case, "v5", DECODE_FORMATS[name], 64, wide_offsets=wide_offsets,
                                             **engine_options)))
        for name, formats, block_n in (("qwen_12x", DECODE_FORMATS["qwen_12x"], 32),
                                       ("qwen_8x", DECODE_FORMATS["qwen_8x"], 64),
                                       ("8-bit retain-all", RETAIN_ALL_8BIT, 32)):
            result.append((f"decode v4 {name} BLOCK_N {block_n}, {label}",
                           functools.partial(decode_case, "v4", formats, block_n, wide_offsets=wide_offsets)))
    # The query group padded to 8 rows instead of 16 (v5's packed dots take it as their N), on the
    # engine's kernel for K4V2 g64 (64-bit offsets, as it runs), at BLOCK_N 64 and 128, capped and not.
    for block_n, cap in ((64, 168), (64, 128), (64, None), (128, 168), (128, None)):
        result.append((f"decode v5 tuned (K4V2 g64) BLOCK_N {block_n}, engine (in-place values), 64-bit row offsets, "
                       f"query rows 8" + (f", at most {cap} registers" if cap else ", registers uncapped"),
                       functools.partial(decode_case, "v5", DECODE_FORMATS["tuned (K4V2 g64)"], block_n, block_g=8,
                                         wide_offsets=True, **{**engine_options, "max_registers": cap})))
    result += operand_probe_cases()
    result.append(("decode v2 tuned (K4V2 g64) BLOCK_N 64, tiny model (head_dim 64, group 4)",
                   lambda: decode_case("v2", DECODE_FORMATS["tuned (K4V2 g64)"], 64, head_dim=64, query_group=4)))
    result += region_builder_cases()
    for name in ("tuned (K4V2 g64)", "qwen_8x", "8-bit guard (K2V2 g32)"):
        result.append((f"prefix gather {name}", lambda f=DECODE_FORMATS[name]: gather_case(f)))
    result.append(("staging insert (K and V, 4 heads x 128)", lambda: compile_and_measure(
        staging_module._write_staged_kernel,
        {"k_ptr": "*bf16", "v_ptr": "*bf16", "slots_ptr": "*i64", "staging_row_ptr": "*i32", "k_table_ptr": "*bf16",
         "v_table_ptr": "*bf16"},
        {"HEADS": KV_HEADS, "HEAD_DIM": HEAD_DIM, "BLOCK_H": KV_HEADS, "BLOCK_D": HEAD_DIM},
        {"stride_k_token": 36 * HEAD_DIM, "stride_k_head": HEAD_DIM, "stride_v_token": 36 * HEAD_DIM,
         "stride_v_head": HEAD_DIM})))
    result.append(("window scores: row statistics (W 32, group 7)", lambda: score_case(score_module._row_stats_kernel)))
    result.append(("window scores: key scores (W 32, group 7)", lambda: score_case(score_module._key_scores_kernel)))
    for kernel in (score_module._row_stats_kernel, score_module._key_scores_kernel):  # why tf32
        result.append((f"window scores: {kernel.fn.__name__} with fp32 'ieee' dots (not used)",
                       lambda k=kernel: score_case(k, "ieee")))
    return result


def markdown(report: dict) -> str:
    lines = [f"# Triton kernels compiled for sm_90 ({report['date']}, no GPU)", "", f"`{report['command']}`", "",
             f"triton {report['triton']}, ptxas from triton's bundle. 4 warps, 3 stages unless noted; strides "
             f"specialized as Triton's launcher does for Qwen2.5-7B-shaped tables. "
             f"Registers per thread; spills in bytes; SASS instructions counted statically over the whole "
             f"kernel (nvdisasm), conversions (I2F, F2F, F2FP, ...) apart.", "",
             "| kernel | registers | spill stores / loads | shared memory | SASS instructions | conversions |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, result in report["cases"].items():
        if "error" in result:
            lines.append(f"| {name} | error: {result['error']} | | | | |")
        else:
            lines.append(f"| {name} | {result['registers']} | {result['spill_store_bytes']} / "
                         f"{result['spill_load_bytes']} | {result['shared_bytes']:,} B | "
                         f"{result['sass_instructions']:,} | {result['sass_conversions']:,} |")
    lines += ["", "Loop bodies of the decode split kernels, in address order (v2 / v4: staging, low-bit, guard; "
              "v1: one loop): SASS instructions one iteration issues per warp, and some of them by opcode "
              "(every opcode's count: the JSON's `loops[].opcodes`).", "",
              "| kernel | loop | instructions | " + " | ".join(LOOP_OPCODES) + " |",
              "|---|---:|---:|" + "---:|" * len(LOOP_OPCODES)]
    for name, result in report["cases"].items():
        if name.startswith("decode") and "error" not in result:
            for index, loop in enumerate(result.get("loops", [])):
                lines.append(f"| {name} | {index} | {loop['instructions']:,} | "
                             + " | ".join(str(loop[op]) for op in LOOP_OPCODES) + " |")
    return "\n".join(lines) + "\n"


def operand_probe_cases() -> list[tuple[str, callable]]:
    """eval/operand_probe.py's kernels: one unpack-and-dot loop each, words loaded in the loop
    (num_stages 3: by Triton's pipeliner; 1: plain loads)."""
    pointers = {"q_ptr": "*fp16", "p_ptr": "*fp16", "out_ptr": "*fp32"}
    result = []
    for order, label in ((0, "pair order"), (1, "lane order")):
        result.append((f"operand probe: key tile, wgmma A, {label}", functools.partial(
            compile_and_measure, probe_module.key_tile_probe, pointers, {"ORDER": order})))
    result.append(("operand probe: value tile, wgmma A (codes^T), pair order", functools.partial(
        compile_and_measure, probe_module.value_tile_probe, pointers, {})))
    for order, label in ((0, "pair order"), (1, "natural order")):
        for stages in (1, 3):
            result.append((f"operand probe: value tile, mma.sync B, {label}, {stages} stages", functools.partial(
                compile_and_measure, probe_module.value_tile_mma_v2_probe, pointers, {"ORDER": order},
                num_stages=stages)))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=[], help="compile only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(["python", "eval/compile_kernels.py", *argv]),
              "triton": triton.__version__, "target": "sm_90a", "cases": {}}
    for name, compile_case in cases():
        if args.only and not any(part in name for part in args.only):
            continue
        report["cases"][name] = compile_case()
        print(name, report["cases"][name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_kernels.json").write_text(json.dumps(report, indent=1))
    (args.out / "compile_kernels.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
