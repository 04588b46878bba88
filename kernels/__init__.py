"""Triton kernels on the packed KV layout, importable as `sglang_kvc.kernels` (design, bytes
per token and versions: docs/kernels.md). Import the modules: `decode_attention`, `quantize`."""

if __name__ != "sglang_kvc.kernels":
    # Found as a top-level `kernels` because the repository root is on sys.path: that name
    # belongs to the PyPI package SGLang and transformers import.
    from sglang_kvc.shadowing import yield_name

    yield_name(__name__, __file__)
