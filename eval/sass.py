"""Reading nvdisasm's SASS listing of a compiled kernel (eval/compile_kernels.py): its loop
bodies and what one iteration issues. Plain text parsing, no Triton, so that tests can import
it without touching the interpreter setting compile_kernels.py forces."""

from __future__ import annotations

import re
from collections import Counter

SASS_LABEL = re.compile(r"^\s*\.?(L_x_\d+):")
SASS_ADDRESSED = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
SASS_BRANCH_TARGET = re.compile(r"BRA\s+`?\(?\.?(L_x_\d+)")
# Opcodes (with their width suffix) counted per loop body: how a tile reaches shared memory
# (16-bit stores one code at a time vs 128-bit vectors), barriers, register moves.
LOOP_OPCODES = ("STS.U16", "STS.128", "LDS.64", "LDSM.16.M88.4", "BAR.SYNC.DEFER_BLOCKING", "IMAD.MOV.U32", "HMMA.16816.F32")


def sass_loops(sass: str) -> list[dict]:
    """The loop bodies of a kernel, in address order: every backward branch to a label spans one
    (from the label to the branch). Per body its instruction count, the LOOP_OPCODES counts and
    every opcode's count (`opcodes`, with its suffixes, most frequent first): static counts, i.e.
    what one iteration issues per warp (predicated-off instructions included)."""
    labels, instructions, pending = {}, [], None
    for line in sass.splitlines():
        addressed = SASS_ADDRESSED.search(line)
        if not addressed:
            label = SASS_LABEL.match(line)
            pending = label.group(1) if label else pending
            continue
        address = int(addressed.group(1), 16)
        instructions.append((address, addressed.group(2)))
        if pending:
            labels[pending], pending = address, None
    loops = []
    for address, text in instructions:
        branch = SASS_BRANCH_TARGET.search(text)
        if branch and labels.get(branch.group(1), address) < address:
            body = [t for a, t in instructions if labels[branch.group(1)] <= a <= address]
            opcodes = [t.split()[1] if t.startswith("@") else t.split()[0] for t in body]
            loops.append({"instructions": len(body), **{op: opcodes.count(op) for op in LOOP_OPCODES},
                          "opcodes": dict(Counter(opcodes).most_common())})
    return loops
