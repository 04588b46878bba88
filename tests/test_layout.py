"""The top-level kernels/ and patches/ folders are sglang_kvc.kernels / sglang_kvc.patches only:
run from the repository root, `import kernels` must still be the PyPI package SGLang uses."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_repo_root_on_sys_path_does_not_shadow_pypi_kernels():
    code = (
        "import kernels, sglang_kvc.kernels.decode_attention, sglang_kvc.patches.memory\n"
        "print(kernels.__file__)\n"
        "import patches\n"
        "try:\n"
        "    from patches import memory\n"
        "    print('patches.memory imported')\n"
        "except ImportError as exc:\n"
        "    print('no patches:', patches.__file__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kernels_file, patches_line = result.stdout.strip().splitlines()[-2:]
    assert "site-packages" in kernels_file and str(REPO) not in kernels_file
    # Nothing else provides `patches`: an empty shell (no file, no submodules), as transformers
    # expects of a stray folder it probes (sglang_kvc/shadowing.py).
    assert patches_line.startswith("no patches: None")
