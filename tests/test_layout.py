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
        "try:\n"
        "    import patches\n"
        "    print('patches imported')\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('no patches:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kernels_file, patches_line = result.stdout.strip().splitlines()[-2:]
    assert "site-packages" in kernels_file and str(REPO) not in kernels_file
    assert patches_line.startswith("no patches:")
