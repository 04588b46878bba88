"""Keep the repository's top-level `kernels/` and `patches/` folders from posing as packages.

They are installed as `sglang_kvc.kernels` and `sglang_kvc.patches` (setuptools package-dir),
but whenever the repository root is on sys.path (`python -m ...` or pytest run from it) a
plain `import kernels` finds the folder first. `kernels` is also the name of a PyPI package
that SGLang and transformers import, so the folder's `__init__` calls `yield_name` to hand
the name back to whatever else on sys.path provides it.

Where nothing else provides it (the GPU image has no PyPI `kernels`), the import gives an
empty shell that looks like a stray PEP 420 folder (`__file__` None, no submodules, no
attributes), not an error: transformers probes `kernels` with find_spec + import_module and
treats exactly such a shell as "not installed", while an exception there broke
`import transformers.models.qwen2` (seen on the H200, transformers 5.17). `from kernels
import x` still raises ImportError, which is what optional users of the package catch.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def yield_name(name: str, init_file: str) -> None:
    """Replace the module being imported as top-level `name` (our folder) by the next
    package of that name on sys.path, or make the import fail if there is none."""
    repo_root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo_root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        shell = sys.modules[name]
        for attribute in [a for a in vars(shell) if not a.startswith("__")]:
            delattr(shell, attribute)
        shell.__file__ = None
        shell.__path__ = []
        shell.__doc__ = f"Not a package: {repo_root}/{name} is sglang_kvc.{name}, and nothing else provides {name!r}."
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns sys.modules[name]
    spec.loader.exec_module(module)
