import os
import sys
from pathlib import Path

# Triton decides at decoration time (including its own standard library, at `import triton`)
# whether kernels are interpreted, so the switch must precede every import that may pull in
# triton (SGLang, transformers). Set TRITON_INTERPRET=0 to run the kernel tests on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # tests/sim.py, the scheduler simulator

QWEN_CONFIG = TESTS / "data" / "qwen2.5-7b-instruct" / "config.json"


@pytest.fixture(scope="session", autouse=True)
def sglang_runtime_context():
    """SGLang reads process-wide config bags (e.g. in Req.effective_kv_committed_len);
    publish a CPU ServerArgs for the tests, as the scheduler does for its process."""
    os.environ.pop("SGLANG_KVC_CONFIG", None)
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=str(QWEN_CONFIG.parent), device="cpu", skip_tokenizer_init=True, load_format="dummy")
    runtime_context.publish(server_args, role="test")
    yield


@pytest.fixture
def seeded():
    """A torch generator with a fresh seed every run (printed, so a failure can be replayed
    with KVC_TEST_SEED)."""
    import torch

    seed = int(os.environ.get("KVC_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"KVC_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
