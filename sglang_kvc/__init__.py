"""sglang-kvc: hybrid KV-cache compression (token sparsification + low-bit KV) for SGLang."""

__version__ = "0.1.0"
