"""Kernel tests run the Triton kernels in the interpreter (TRITON_INTERPRET=1), on CPU
tensors, against the torch references of sglang_kvc.quant / stores / attention.

The variable must be set before any kernel is decorated by `triton.jit` (the decorator
decides then whether to interpret), so it is set here, at conftest import, before the
test modules import `sglang_kvc.kernels`. `TRITON_INTERPRET=0` on a GPU machine runs the
same tests compiled, on CUDA tensors.

Every test draws fresh random data: the `seed` fixture picks a new seed per test and
prints it (shown with a failure); `KVC_TEST_SEED=<n>` replays one.
"""

from __future__ import annotations

import os
import secrets
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")


def _probe_triton() -> str | None:
    """None if a tiny kernel runs in this mode, else why not."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _add_one(ptr, N: tl.constexpr):
            offs = tl.arange(0, N)
            tl.store(ptr + offs, tl.load(ptr + offs) + 1)

        device = "cpu" if INTERPRET else "cuda"
        x = torch.zeros(4, device=device)
        _add_one[(1,)](x, N=4)
        if x.tolist() != [1.0] * 4:
            return "triton probe kernel returned a wrong result"
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot run kernels here
        return f"triton cannot run {'in interpreter mode' if INTERPRET else 'on CUDA'}: {exc!r}"
    early = sys.modules.get("sglang_kvc.kernels.decode_attention")
    if INTERPRET and early is not None and not type(early._decode_split_kernel).__name__.startswith("Interpreted"):
        return "sglang_kvc.kernels was imported (compiled) before this conftest set TRITON_INTERPRET=1"
    return None


_TRITON_UNAVAILABLE = _probe_triton()


@pytest.fixture(autouse=True)
def _require_triton():
    if _TRITON_UNAVAILABLE:
        pytest.skip(_TRITON_UNAVAILABLE)


@pytest.fixture(scope="session", autouse=True)
def sglang_runtime_context():
    """Overrides tests/conftest.py's fixture of that name for this folder: the kernels
    never touch SGLang's runtime config, and importing SGLang costs ~10 s of the budget."""
    yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu" if INTERPRET else "cuda")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed; replay with KVC_TEST_SEED), applied to torch."""
    value = int(os.environ.get("KVC_TEST_SEED") or secrets.randbits(31))
    print(f"seed = {value}  (replay: KVC_TEST_SEED={value})")
    torch.manual_seed(value)
    return value


@pytest.fixture
def gen(seed: int, device: torch.device) -> torch.Generator:
    """A generator on the test device, seeded with the test's seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
